//! The key pair the instance trusts. An existing one (`key_pair_name`, with
//! its private key in `ssh.private_key_file`) is checked and used; with a
//! password or a private key baked into the source AMI, none is needed.
//! Otherwise a temporary ed25519 key is generated here, its public half
//! imported as a key pair named after the run (the private half never
//! leaves this process), and the key pair deleted again on cleanup.

use super::api::Ec2Api;
use super::client::AwsError;
use super::kind::Ec2Resource;
use super::{Ec2State, Plan};
use crate::common::tracked::{record, release};
use async_trait::async_trait;
use imgbuild_core::{CleanupOutcome, ResourceId, Step, StepContext, StepError};
use imgbuild_provisioners::ssh::TemporaryKey;
use std::sync::Arc;

/// Deletes a key pair; one that is already gone counts as deleted.
pub async fn delete_key_pair(api: &dyn Ec2Api, name: &str) -> Result<(), AwsError> {
    match api.delete_key_pair(name).await {
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
        match self.plan.api().describe_key_pair(name).await {
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
        plan.api()
            .import_key_pair(&name, key.public_openssh(), &plan.base_tags())
            .await?;
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
        if let Err(err) = delete_key_pair(self.plan.api().as_ref(), &name).await {
            self.created = Some((id, name));
            return Err(err.into());
        }
        cx.log
            .info(format!("deleted the temporary key pair `{name}`"));
        release(cx, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::ec2::api::fake::{FakeEc2, plan};

    fn journalled(test: &TestContext) -> Vec<String> {
        test.cx
            .journal
            .outstanding()
            .iter()
            .map(|o| o.resource.describe())
            .collect()
    }

    #[tokio::test]
    async fn the_temporary_key_pair_is_imported_and_deleted_on_cleanup() {
        let fake = FakeEc2::new("eu-west-1");
        let test = TestContext::new("app");
        let mut step = StepKeyPair::new(plan(serde_json::json!({}), &fake));
        let mut state = Ec2State::default();
        step.run(&mut state, &test.cx).await.unwrap();
        let name = "imgbuild-app-unit0123";
        assert_eq!(state.key_pair_name.as_deref(), Some(name));
        assert!(state.temporary_key.is_some());
        assert_eq!(
            fake.calls(),
            [format!("eu-west-1 ImportKeyPair {name} ssh-ed25519")]
        );
        assert_eq!(journalled(&test).len(), 1);

        step.cleanup(&mut state, &test.cx, CleanupOutcome::Succeeded)
            .await
            .unwrap();
        assert_eq!(
            fake.calls().last().unwrap(),
            &format!("eu-west-1 DeleteKeyPair {name}")
        );
        assert!(fake.world.lock().unwrap().key_pairs.is_empty());
        assert!(journalled(&test).is_empty());
    }

    #[tokio::test]
    async fn a_key_pair_whose_import_went_unanswered_is_journalled_and_still_deleted() {
        let fake = FakeEc2::new("eu-west-1");
        // No answer: the key pair may exist, so it must be on record.
        fake.fail_next("ImportKeyPair", None, None);
        let test = TestContext::new("app");
        let mut step = StepKeyPair::new(plan(serde_json::json!({}), &fake));
        let mut state = Ec2State::default();
        let err = step.run(&mut state, &test.cx).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("EC2 ImportKeyPair in eu-west-1 failed")
        );
        let recorded = journalled(&test);
        assert_eq!(recorded.len(), 1);
        assert!(
            recorded[0].contains("imgbuild-app-unit0123"),
            "{recorded:?}"
        );

        // Gone already (the import never happened) counts as deleted.
        step.cleanup(&mut state, &test.cx, CleanupOutcome::Failed)
            .await
            .unwrap();
        assert_eq!(
            fake.calls().last().unwrap(),
            "eu-west-1 DeleteKeyPair imgbuild-app-unit0123"
        );
        assert!(journalled(&test).is_empty());
    }

    #[tokio::test]
    async fn a_failed_delete_keeps_the_key_pair_on_record() {
        let fake = FakeEc2::new("eu-west-1");
        let test = TestContext::new("app");
        let mut step = StepKeyPair::new(plan(serde_json::json!({}), &fake));
        let mut state = Ec2State::default();
        step.run(&mut state, &test.cx).await.unwrap();
        fake.fail_next("DeleteKeyPair", Some("UnauthorizedOperation"), Some(403));
        let err = step
            .cleanup(&mut state, &test.cx, CleanupOutcome::Failed)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("allow ec2:DeleteKeyPair"), "{err}");
        assert_eq!(journalled(&test).len(), 1);
        // A second cleanup (`imgbuild clean` does the same) gets it.
        step.cleanup(&mut state, &test.cx, CleanupOutcome::Failed)
            .await
            .unwrap();
        assert!(journalled(&test).is_empty());
    }

    #[tokio::test]
    async fn an_existing_key_pair_is_checked_and_nothing_is_made() {
        let fake = FakeEc2::new("eu-west-1");
        let test = TestContext::new("app");
        let settings = serde_json::json!({
            "key_pair_name": "ops",
            "ssh": {"username": "admin", "private_key_file": "id_ed25519"},
        });
        let mut step = StepKeyPair::new(plan(settings, &fake));
        let err = step
            .run(&mut Ec2State::default(), &test.cx)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("key pair `ops` (`key_pair_name`) does not exist in eu-west-1"),
            "{err}"
        );
        assert_eq!(fake.calls(), ["eu-west-1 DescribeKeyPairs ops"]);
        assert!(journalled(&test).is_empty());
    }
}
