//! The key pair the instance trusts. An existing one (`key_pair_name`, with
//! its private key in `ssh.private_key_file`) is checked and used; with a
//! password or a private key baked into the source AMI, none is needed.
//! Otherwise a temporary ed25519 key is generated here, its public half
//! imported as a key pair named after the run (the private half never
//! leaves this process), and the key pair deleted again on cleanup.

use super::client::{AwsError, AwsResultExt, tag_spec};
use super::kind::Ec2Resource;
use super::{Ec2State, Plan};
use crate::common::tracked::{record, release};
use async_trait::async_trait;
use aws_sdk_ec2::primitives::Blob;
use aws_sdk_ec2::types::ResourceType;
use imgbuild_core::{CleanupOutcome, ResourceId, Step, StepContext, StepError};
use imgbuild_provisioners::ssh::TemporaryKey;
use std::sync::Arc;

/// Deletes a key pair; one that is already gone counts as deleted.
pub async fn delete_key_pair(
    client: &aws_sdk_ec2::Client,
    region: &str,
    name: &str,
) -> Result<(), AwsError> {
    match client
        .delete_key_pair()
        .key_name(name)
        .send()
        .await
        .aws("DeleteKeyPair", region)
    {
        Ok(_) => Ok(()),
        Err(err) if err.is("InvalidKeyPair.NotFound") => Ok(()),
        Err(err) => Err(err),
    }
}

pub struct StepKeyPair {
    plan: Arc<Plan>,
    /// The temporary key pair, once recorded in the journal.
    created: Option<(ResourceId, String)>,
}

impl StepKeyPair {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepKeyPair {
            plan,
            created: None,
        }
    }

    async fn check_existing(&self, name: &str) -> Result<(), StepError> {
        let region = &self.plan.region;
        let result = self
            .plan
            .client()
            .describe_key_pairs()
            .key_names(name)
            .send()
            .await
            .aws("DescribeKeyPairs", region);
        match result {
            Ok(_) => Ok(()),
            Err(err) if err.is("InvalidKeyPair.NotFound") => Err(StepError::failed(format!(
                "key pair `{name}` (`key_pair_name`) does not exist in {region}; key pairs belong to one region"
            ))),
            Err(err) => Err(err.into()),
        }
    }
}

#[async_trait]
impl Step<Ec2State> for StepKeyPair {
    fn name(&self) -> &'static str {
        "key_pair"
    }

    async fn run(&mut self, state: &mut Ec2State, cx: &StepContext) -> Result<(), StepError> {
        let plan = self.plan.clone();
        let config = &plan.config;
        if let Some(name) = &config.key_pair_name {
            self.check_existing(name).await?;
            cx.log.info(format!("using the existing key pair `{name}`"));
            state.key_pair_name = Some(name.clone());
            return Ok(());
        }
        if !config.uses_temporary_key() {
            cx.log.info(
                "no key pair: the source AMI must already accept the configured SSH credential",
            );
            return Ok(());
        }

        let key = TemporaryKey::generate().map_err(StepError::failed)?;
        let name = plan.temporary_name();
        let id = record(
            cx,
            Ec2Resource::KeyPair {
                region: plan.region.clone(),
                endpoint_url: plan.endpoint_url.clone(),
                name: name.clone(),
            }
            .into(),
        )?;
        self.created = Some((id, name.clone()));
        plan.client()
            .import_key_pair()
            .key_name(&name)
            .public_key_material(Blob::new(key.public_openssh().as_bytes()))
            .tag_specifications(tag_spec(ResourceType::KeyPair, &plan.base_tags()))
            .send()
            .await
            .aws("ImportKeyPair", &plan.region)?;
        cx.log
            .info(format!("imported a temporary ed25519 key pair `{name}`"));
        state.key_pair_name = Some(name);
        state.temporary_key = Some(Arc::new(key));
        Ok(())
    }

    async fn cleanup(
        &mut self,
        _state: &mut Ec2State,
        cx: &StepContext,
        _outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        let Some((id, name)) = self.created.take() else {
            return Ok(());
        };
        if let Err(err) = delete_key_pair(&self.plan.client(), &self.plan.region, &name).await {
            self.created = Some((id, name));
            return Err(err.into());
        }
        cx.log
            .info(format!("deleted the temporary key pair `{name}`"));
        release(cx, id)
    }
}
