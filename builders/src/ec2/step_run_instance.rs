//! Launches the build instance and waits until it runs.
//!
//! The instance is recorded in the journal with a fresh ClientToken before
//! RunInstances: the SDK resends the same token when it retries, so a retry
//! never launches a second instance, and the token is also put on the
//! instance as a tag at launch, so an instance whose RunInstances answer
//! never arrived can still be found and terminated. Cleanup always
//! terminates it and waits until it is gone; an instance it cannot find
//! yet stays recorded rather than be forgotten while it may still start.

use super::api::{Ec2Api, NewInstance, RootVolume};
use super::client::CLIENT_TOKEN_TAG;
use super::kind::Ec2Resource;
use super::poll::{InstanceTarget, look_until_found, wait_for_instance};
use super::{Ec2State, InstanceInfo, Plan};
use crate::common::tracked::{record, release};
use async_trait::async_trait;
use imgbuild_core::{BuildLog, CleanupOutcome, ResourceId, Step, StepContext, StepError};
use std::sync::Arc;
use std::time::Duration;

/// The instances launched with `client_token` that are not terminated
/// yet, for a launch whose answer never arrived; looked for up to `lookup`
/// (see [`look_until_found`]), `None` when none showed up.
async fn look_up_launched(
    api: &dyn Ec2Api,
    run_id: &str,
    client_token: &str,
    lookup: Duration,
    log: Option<&BuildLog>,
) -> Result<Option<Vec<String>>, StepError> {
    let found = look_until_found(
        format!(
            "looking for the instance with client token {client_token} in {}",
            api.region()
        ),
        lookup,
        log,
        || async { Ok(api.instances_launched_with(run_id, client_token).await?) },
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
    api: &dyn Ec2Api,
    launch: &Launch<'_>,
) -> Result<Option<Vec<String>>, StepError> {
    look_up_launched(api, launch.run_id, launch.client_token, launch.lookup, None).await
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
    api: &dyn Ec2Api,
    launch: &Launch<'_>,
    timeout: Duration,
    log: Option<&BuildLog>,
) -> Result<Vec<String>, StepError> {
    let ids = match launch.instance_id {
        Some(id) => vec![id.to_owned()],
        None => look_up_launched(api, launch.run_id, launch.client_token, launch.lookup, log)
            .await?
            .ok_or_else(|| not_found_yet(launch, api.region()))?,
    };
    if ids.is_empty() {
        return Ok(ids);
    }
    match api.terminate_instances(&ids).await {
        Ok(_) => {}
        Err(err) if err.is("InvalidInstanceID.NotFound") => return Ok(Vec::new()),
        Err(err) => return Err(err.into()),
    }
    for id in &ids {
        wait_for_instance(api, id, InstanceTarget::Terminated, timeout, log).await?;
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
    fn root_volume(&self, state: &Ec2State) -> Result<Option<RootVolume>, StepError> {
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
        Ok(Some(RootVolume {
            device_name: device,
            size_gib: config.root_volume_size,
            volume_type: config.root_volume_type.clone(),
            encrypted: config.encrypt_boot,
            kms_key_id: config.kms_key_id.clone(),
        }))
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
        let api = plan.api();
        let launch = NewInstance {
            image_id: source.id.clone(),
            instance_type: config.instance_type.clone(),
            client_token: client_token.clone(),
            key_name: state.key_pair_name.clone(),
            user_data,
            root_volume,
            instance_tags,
            volume_tags: plan.run_tags(),
            iam_instance_profile: config.iam_instance_profile.clone(),
            associate_public_ip: config.associate_public_ip,
            subnet_id: config.subnet_id.clone(),
            security_group_ids: state.security_group_ids.clone(),
        };
        let instance_id = match api.run_instance(launch).await {
            Ok(instance_id) => instance_id,
            Err(err) if err.is_refusal() => {
                // EC2 said no to this client token: no instance exists to
                // look for, now or later.
                self.launched = None;
                release(cx, journal_id)?;
                return Err(err.into());
            }
            Err(err) => return Err(err.into()),
        };
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

        let instance = wait_for_instance(
            api.as_ref(),
            &instance_id,
            InstanceTarget::Running,
            plan.instance_timeout(),
            Some(&cx.log),
        )
        .await?
        .ok_or_else(|| StepError::failed(format!("instance {instance_id} disappeared")))?;
        let info = InstanceInfo {
            id: instance_id.clone(),
            public_ip: instance.public_ip.clone(),
            private_ip: instance.private_ip.clone(),
            public_dns: instance.public_dns.clone(),
            private_dns: instance.private_dns.clone(),
        };
        cx.log.info(format!(
            "instance {instance_id} is running in {}: public IP {}, private IP {}",
            instance.availability_zone.as_deref().unwrap_or(region),
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
            self.plan.api().as_ref(),
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
    use super::*;
    use crate::common::testing::TestContext;
    use crate::ec2::SourceAmi;
    use crate::ec2::api::fake::{FakeEc2, plan};
    use crate::ec2::client::RUN_ID_TAG;
    use crate::registry::JournalResource;

    fn ready() -> Ec2State {
        Ec2State {
            source: Some(SourceAmi {
                id: "ami-source".to_owned(),
                name: None,
                owner: None,
                creation_date: None,
                root_device_name: Some("/dev/xvda".to_owned()),
            }),
            key_pair_name: Some("imgbuild-app-unit0123".to_owned()),
            security_group_ids: vec!["sg-1".to_owned()],
            ..Ec2State::default()
        }
    }

    /// The client token of the one instance on record.
    fn recorded_token(test: &TestContext) -> String {
        let recorded = test.cx.journal.outstanding();
        assert_eq!(recorded.len(), 1);
        match Ec2Resource::from_resource(&recorded[0].resource) {
            Some(Ok(Ec2Resource::Instance { client_token, .. })) => client_token,
            other => panic!("not an instance record: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_instance_is_launched_as_planned_and_terminated_on_cleanup() {
        let fake = FakeEc2::new("eu-west-1");
        let test = TestContext::new("app");
        let settings = serde_json::json!({"root_volume_size": 20, "subnet_id": "subnet-1"});
        let mut step = StepRunInstance::new(plan(settings, &fake));
        let mut state = ready();
        step.run(&mut state, &test.cx).await.unwrap();
        let token = recorded_token(&test);
        let instance = state.instance.clone().unwrap();
        assert_eq!(instance.private_ip.as_deref(), Some("10.0.0.5"));
        {
            let world = fake.world.lock().unwrap();
            let launch = &world.instances[&("eu-west-1".to_owned(), instance.id.clone())].launch;
            assert_eq!(launch.image_id, "ami-source");
            assert_eq!(launch.client_token, token);
            assert_eq!(launch.key_name.as_deref(), Some("imgbuild-app-unit0123"));
            assert_eq!(launch.security_group_ids, ["sg-1"]);
            assert_eq!(launch.subnet_id.as_deref(), Some("subnet-1"));
            let root = launch.root_volume.as_ref().unwrap();
            assert_eq!(
                (root.device_name.as_str(), root.size_gib),
                ("/dev/xvda", Some(20))
            );
            // Tagged so a launch whose answer is lost can still be found.
            assert_eq!(launch.instance_tags[CLIENT_TOKEN_TAG], token);
            assert_eq!(launch.instance_tags[RUN_ID_TAG], "unit0123");
        }

        step.cleanup(&mut state, &test.cx, CleanupOutcome::Succeeded)
            .await
            .unwrap();
        assert_eq!(
            fake.instance_state("eu-west-1", &instance.id).as_deref(),
            Some("terminated")
        );
        assert!(state.instance.is_none());
        assert!(test.cx.journal.outstanding().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_launch_whose_answer_was_lost_is_found_by_its_client_token_and_terminated() {
        let fake = FakeEc2::new("eu-west-1");
        fake.fail_next("RunInstances", None, None);
        let test = TestContext::new("app");
        let mut step = StepRunInstance::new(plan(serde_json::json!({}), &fake));
        let mut state = ready();
        step.run(&mut state, &test.cx).await.unwrap_err();
        let token = recorded_token(&test);
        // EC2 launched it after all; another launch of the run is not ours.
        let tags = |token: &str| {
            std::collections::BTreeMap::from([
                (RUN_ID_TAG.to_owned(), "unit0123".to_owned()),
                (CLIENT_TOKEN_TAG.to_owned(), token.to_owned()),
            ])
        };
        fake.with_instance("eu-west-1", "i-late", tags(&token));
        fake.with_instance("eu-west-1", "i-other", tags("another-token"));
        step.cleanup(&mut state, &test.cx, CleanupOutcome::Failed)
            .await
            .unwrap();
        assert_eq!(
            fake.instance_state("eu-west-1", "i-late").as_deref(),
            Some("terminated")
        );
        assert_eq!(
            fake.instance_state("eu-west-1", "i-other").as_deref(),
            Some("running")
        );
        assert!(test.cx.journal.outstanding().is_empty());
    }

    #[tokio::test]
    async fn a_refused_launch_leaves_nothing_on_record() {
        let fake = FakeEc2::new("eu-west-1");
        fake.fail_next("RunInstances", Some("InvalidParameterValue"), Some(400));
        let test = TestContext::new("app");
        let mut step = StepRunInstance::new(plan(serde_json::json!({}), &fake));
        let mut state = ready();
        let err = step.run(&mut state, &test.cx).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("EC2 RunInstances in eu-west-1 failed"),
            "{err}"
        );
        assert!(test.cx.journal.outstanding().is_empty());
        step.cleanup(&mut state, &test.cx, CleanupOutcome::Failed)
            .await
            .unwrap();
        assert_eq!(fake.calls(), ["eu-west-1 RunInstances ami-source t3.micro"]);
    }

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
