//! Launches the build instance and waits until it runs.
//!
//! The instance is recorded in the journal with a fresh ClientToken before
//! RunInstances: the SDK resends the same token when it retries, so a retry
//! never launches a second instance, and the token is also put on the
//! instance as a tag at launch, so an instance whose RunInstances answer
//! never arrived can still be found and terminated. Cleanup always
//! terminates it and waits until it is gone; an instance it cannot find
//! yet stays recorded rather than be forgotten while it may still start.

use super::client::{AwsResultExt, CLIENT_TOKEN_TAG, RUN_ID_TAG, filter, tag_spec};
use super::kind::Ec2Resource;
use super::poll::{InstanceTarget, look_until_found, wait_for_instance};
use super::{Ec2State, InstanceInfo, Plan};
use crate::common::tracked::{record, release};
use async_trait::async_trait;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, IamInstanceProfileSpecification,
    InstanceNetworkInterfaceSpecification, InstanceType, ResourceType, VolumeType,
};
use imgbuild_core::{BuildLog, CleanupOutcome, ResourceId, Step, StepContext, StepError};
use std::sync::Arc;
use std::time::Duration;

/// Instances of run `run_id` launched with `client_token`, terminated ones
/// included, as (id, state).
async fn find_by_client_token(
    client: &Client,
    region: &str,
    run_id: &str,
    client_token: &str,
) -> Result<Vec<(String, String)>, StepError> {
    let output = client
        .describe_instances()
        .filters(filter(&format!("tag:{CLIENT_TOKEN_TAG}"), client_token))
        .filters(filter(&format!("tag:{RUN_ID_TAG}"), run_id))
        .send()
        .await
        .aws("DescribeInstances", region)?;
    Ok(output
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter_map(|i| {
            let id = i.instance_id()?.to_owned();
            Some((id, super::poll::instance_state(i).to_owned()))
        })
        .collect())
}

/// The instances launched with `client_token` that are not terminated
/// yet, for a launch whose answer never arrived; looked for up to `lookup`
/// (see [`look_until_found`]), `None` when none showed up.
async fn look_up_launched(
    client: &Client,
    region: &str,
    run_id: &str,
    client_token: &str,
    lookup: Duration,
    log: Option<&BuildLog>,
) -> Result<Option<Vec<String>>, StepError> {
    let found = look_until_found(
        format!("looking for the instance with client token {client_token} in {region}"),
        lookup,
        log,
        || find_by_client_token(client, region, run_id, client_token),
    )
    .await?;
    Ok(found.map(|found| {
        found
            .into_iter()
            .filter(|(_, state)| state != "terminated")
            .map(|(id, _)| id)
            .collect()
    }))
}

fn not_found_yet(launch: &Launch<'_>, region: &str) -> StepError {
    StepError::failed(format!(
        "no instance with client token {} (run {}) found in {region} after {}; it may still be starting: the record is kept, run `imgbuild clean` again",
        launch.client_token,
        launch.run_id,
        humantime::format_duration(launch.lookup)
    ))
}

/// Looks for the instance a record without an id stands for; `None` when
/// nothing has appeared within `launch.lookup`.
pub async fn find_launched(
    client: &Client,
    region: &str,
    launch: &Launch<'_>,
) -> Result<Option<Vec<String>>, StepError> {
    look_up_launched(
        client,
        region,
        launch.run_id,
        launch.client_token,
        launch.lookup,
        None,
    )
    .await
}

/// A launched instance as the journal knows it.
pub struct Launch<'a> {
    pub instance_id: Option<&'a str>,
    pub client_token: &'a str,
    pub run_id: &'a str,
    /// How long to look for it when `instance_id` is `None`.
    pub lookup: Duration,
}

/// Terminates the instance and waits until it is gone. When its id was
/// never learned it is looked up by its client token among its run's
/// instances (see [`look_up_launched`]). Returns the ids terminated.
pub async fn terminate(
    client: &Client,
    region: &str,
    launch: &Launch<'_>,
    timeout: Duration,
    log: Option<&BuildLog>,
) -> Result<Vec<String>, StepError> {
    let ids = match launch.instance_id {
        Some(id) => vec![id.to_owned()],
        None => look_up_launched(
            client,
            region,
            launch.run_id,
            launch.client_token,
            launch.lookup,
            log,
        )
        .await?
        .ok_or_else(|| not_found_yet(launch, region))?,
    };
    if ids.is_empty() {
        return Ok(ids);
    }
    let result = client
        .terminate_instances()
        .set_instance_ids(Some(ids.clone()))
        .send()
        .await
        .aws("TerminateInstances", region);
    match result {
        Ok(_) => {}
        Err(err) if err.is("InvalidInstanceID.NotFound") => return Ok(Vec::new()),
        Err(err) => return Err(err.into()),
    }
    for id in &ids {
        wait_for_instance(client, region, id, InstanceTarget::Terminated, timeout, log).await?;
    }
    Ok(ids)
}

/// Standard base64 with padding, as EC2 wants `UserData`.
pub fn user_data_base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

struct Launched {
    journal_id: ResourceId,
    client_token: String,
    instance_id: Option<String>,
}

pub struct StepRunInstance {
    plan: Arc<Plan>,
    launched: Option<Launched>,
}

impl StepRunInstance {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepRunInstance {
            plan,
            launched: None,
        }
    }

    fn user_data(&self) -> Result<Option<String>, StepError> {
        let config = &self.plan.config;
        if let Some(text) = &config.user_data {
            return Ok(Some(user_data_base64(text.as_bytes())));
        }
        if let Some(path) = &config.user_data_file {
            let path = self.plan.config_dir.join(path);
            let data = std::fs::read(&path).map_err(|err| {
                StepError::failed(format!(
                    "cannot read `user_data_file` {}: {err}",
                    path.display()
                ))
            })?;
            return Ok(Some(user_data_base64(&data)));
        }
        Ok(None)
    }

    /// The root volume as configured, when anything about it is.
    fn root_volume(&self, state: &Ec2State) -> Result<Option<BlockDeviceMapping>, StepError> {
        let config = &self.plan.config;
        if config.root_volume_size.is_none()
            && config.root_volume_type.is_none()
            && !config.encrypt_boot
        {
            return Ok(None);
        }
        let source = state
            .source
            .as_ref()
            .ok_or_else(|| StepError::failed("no source AMI"))?;
        let device = source.root_device_name.clone().ok_or_else(|| {
            StepError::failed(format!(
                "source AMI {} does not name its root device, so its size, type or encryption cannot be changed",
                source.id
            ))
        })?;
        let ebs = EbsBlockDevice::builder()
            .delete_on_termination(true)
            .set_volume_size(config.root_volume_size)
            .set_volume_type(config.root_volume_type.as_deref().map(VolumeType::from))
            .set_encrypted(config.encrypt_boot.then_some(true))
            .set_kms_key_id(config.kms_key_id.clone())
            .build();
        Ok(Some(
            BlockDeviceMapping::builder()
                .device_name(device)
                .ebs(ebs)
                .build(),
        ))
    }
}

#[async_trait]
impl Step<Ec2State> for StepRunInstance {
    fn name(&self) -> &'static str {
        "run_instance"
    }

    async fn run(&mut self, state: &mut Ec2State, cx: &StepContext) -> Result<(), StepError> {
        let plan = self.plan.clone();
        let config = &plan.config;
        let region = &plan.region;
        let source = state
            .source
            .clone()
            .ok_or_else(|| StepError::failed("no source AMI"))?;
        let user_data = self.user_data()?;
        let root_volume = self.root_volume(state)?;

        let client_token = uuid::Uuid::new_v4().to_string();
        let journal_id = record(
            cx,
            Ec2Resource::Instance {
                region: region.clone(),
                endpoint_url: plan.endpoint_url.clone(),
                client_token: client_token.clone(),
                instance_id: None,
            }
            .into(),
        )?;
        self.launched = Some(Launched {
            journal_id,
            client_token: client_token.clone(),
            instance_id: None,
        });

        let mut instance_tags = plan.run_tags();
        instance_tags.insert(CLIENT_TOKEN_TAG.to_owned(), client_token.clone());
        let mut request = plan
            .client()
            .run_instances()
            .image_id(&source.id)
            .instance_type(InstanceType::from(config.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .client_token(&client_token)
            .set_key_name(state.key_pair_name.clone())
            .set_user_data(user_data)
            .set_block_device_mappings(root_volume.map(|mapping| vec![mapping]))
            .tag_specifications(tag_spec(ResourceType::Instance, &instance_tags))
            .tag_specifications(tag_spec(ResourceType::Volume, &plan.run_tags()));
        if let Some(profile) = &config.iam_instance_profile {
            let spec = IamInstanceProfileSpecification::builder();
            let spec = if profile.starts_with("arn:") {
                spec.arn(profile)
            } else {
                spec.name(profile)
            };
            request = request.iam_instance_profile(spec.build());
        }
        request = match config.associate_public_ip {
            // A public IP choice can only be made on a network interface,
            // which then carries the subnet and groups too.
            Some(public) => request.network_interfaces(
                InstanceNetworkInterfaceSpecification::builder()
                    .device_index(0)
                    .associate_public_ip_address(public)
                    .delete_on_termination(true)
                    .set_subnet_id(config.subnet_id.clone())
                    .set_groups(Some(state.security_group_ids.clone()))
                    .build(),
            ),
            None => request
                .set_subnet_id(config.subnet_id.clone())
                .set_security_group_ids(Some(state.security_group_ids.clone())),
        };
        let output = match request.send().await.aws("RunInstances", region) {
            Ok(output) => output,
            Err(err) if err.is_refusal() => {
                // EC2 said no to this client token: no instance exists to
                // look for, now or later.
                self.launched = None;
                release(cx, journal_id)?;
                return Err(err.into());
            }
            Err(err) => return Err(err.into()),
        };
        let instance_id = output
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .ok_or_else(|| StepError::failed("RunInstances returned no instance"))?
            .to_owned();
        if let Some(launched) = self.launched.as_mut() {
            launched.instance_id = Some(instance_id.clone());
        }
        cx.journal
            .update(
                journal_id,
                Ec2Resource::Instance {
                    region: region.clone(),
                    endpoint_url: plan.endpoint_url.clone(),
                    client_token,
                    instance_id: Some(instance_id.clone()),
                }
                .into(),
            )
            .map_err(StepError::failed)?;
        cx.log.info(format!(
            "launched instance {instance_id} ({}) from {}",
            config.instance_type, source.id
        ));

        let client = plan.client();
        let instance = wait_for_instance(
            &client,
            region,
            &instance_id,
            InstanceTarget::Running,
            plan.instance_timeout(),
            Some(&cx.log),
        )
        .await?
        .ok_or_else(|| StepError::failed(format!("instance {instance_id} disappeared")))?;
        let info = InstanceInfo {
            id: instance_id.clone(),
            public_ip: instance.public_ip_address().map(str::to_owned),
            private_ip: instance.private_ip_address().map(str::to_owned),
            public_dns: instance
                .public_dns_name()
                .filter(|d| !d.is_empty())
                .map(str::to_owned),
            private_dns: instance
                .private_dns_name()
                .filter(|d| !d.is_empty())
                .map(str::to_owned),
        };
        cx.log.info(format!(
            "instance {instance_id} is running in {}: public IP {}, private IP {}",
            instance
                .placement()
                .and_then(|p| p.availability_zone())
                .unwrap_or(region),
            info.public_ip.as_deref().unwrap_or("none"),
            info.private_ip.as_deref().unwrap_or("none"),
        ));
        state.instance = Some(info);
        Ok(())
    }

    async fn cleanup(
        &mut self,
        state: &mut Ec2State,
        cx: &StepContext,
        _outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        let Some(launched) = self.launched.take() else {
            return Ok(());
        };
        state.instance = None;
        let result = terminate(
            &self.plan.client(),
            &self.plan.region,
            &Launch {
                instance_id: launched.instance_id.as_deref(),
                client_token: &launched.client_token,
                run_id: &self.plan.run_id,
                lookup: self.plan.lookup_timeout,
            },
            self.plan.instance_timeout(),
            Some(&cx.log),
        )
        .await;
        match result {
            Ok(ids) => {
                if !ids.is_empty() {
                    cx.log
                        .info(format!("terminated instance {}", ids.join(", ")));
                }
                release(cx, launched.journal_id)
            }
            Err(err) => {
                let message = format!(
                    "{err}; the instance stays recorded in the run journal for `imgbuild clean`"
                );
                self.launched = Some(launched);
                Err(StepError::failed(message))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::user_data_base64;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in cases {
            assert_eq!(user_data_base64(input.as_bytes()), expected, "{input}");
        }
        assert_eq!(user_data_base64(&[0xff, 0xfe, 0xfd]), "//79");
    }
}
