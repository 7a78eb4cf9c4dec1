//! Snapshots the stopped instance into the AMI, waits until it is
//! available, and tags its snapshots. The AMI is recorded in the journal
//! under its name before CreateImage (the name is known up front and, per
//! the name check, not taken), so it can be found even if the answer to
//! CreateImage is lost. On failure or cancellation the AMI is deregistered
//! and its snapshots deleted; on success it is kept as the artifact.

use super::api::Ec2Api;
use super::poll::{Backoff, Poller, look_until_found, wait_for_image};
use super::{AmiInfo, Ec2State, Plan};
use crate::common::tracked::{record, release};
use async_trait::async_trait;
use imgbuild_core::{BuildLog, CleanupOutcome, ResourceId, Step, StepContext, StepError};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Tags an AMI's snapshots (separately from CreateImage: a `snapshot` tag
/// specification there is not supported everywhere, moto answers it 500).
pub async fn tag_snapshots(
    api: &dyn Ec2Api,
    snapshots: &[String],
    values: &BTreeMap<String, String>,
) -> Result<(), StepError> {
    if snapshots.is_empty() {
        return Ok(());
    }
    api.create_tags(snapshots, values).await?;
    Ok(())
}

pub(super) async fn delete_snapshot(
    api: &dyn Ec2Api,
    snapshot_id: &str,
    log: Option<&BuildLog>,
) -> Result<(), StepError> {
    let region = api.region();
    let backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(10));
    let mut poller = Poller::new(
        format!("deleting snapshot {snapshot_id} in {region}"),
        Duration::from_secs(300),
        backoff,
        log,
    );
    loop {
        match api.delete_snapshot(snapshot_id).await {
            Ok(_) => return Ok(()),
            Err(err) if err.is("InvalidSnapshot.NotFound") => return Ok(()),
            // The deregistration has not reached the snapshot yet.
            Err(err) if err.is("InvalidSnapshot.InUse") => {
                poller.pending("still in use by the AMI").await?
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// The AMIs named `name` of run `run_id`, for a CreateImage or CopyImage
/// whose answer never arrived; looked for up to `lookup` (see
/// [`look_until_found`]), `None` when none showed up.
pub async fn look_up_own(
    api: &dyn Ec2Api,
    name: &str,
    run_id: Option<&str>,
    lookup: Duration,
    log: Option<&BuildLog>,
) -> Result<Option<Vec<String>>, StepError> {
    look_until_found(
        format!("looking for AMI `{name}` in {}", api.region()),
        lookup,
        log,
        || async { Ok(api.own_images_of_run(name, run_id).await?) },
    )
    .await
}

/// Deregisters an AMI and deletes its snapshots. Without an id, the AMI is
/// looked up by name among those imgbuild made, for up to `lookup` (see
/// [`look_up_own`]). An AMI or snapshot already gone counts as removed.
pub async fn deregister(
    api: &dyn Ec2Api,
    image_id: Option<&str>,
    name: &str,
    run_id: Option<&str>,
    lookup: Duration,
    log: Option<&BuildLog>,
) -> Result<(), StepError> {
    let region = api.region();
    let ids: Vec<String> = match image_id {
        Some(id) => vec![id.to_owned()],
        None => look_up_own(api, name, run_id, lookup, log)
            .await?
            .ok_or_else(|| {
                let run = run_id.map(|id| format!(" of run {id}")).unwrap_or_default();
                StepError::failed(format!(
                    "no AMI named `{name}`{run} found in {region} after {}; it may still be being made: the record is kept, run `imgbuild clean` again",
                    humantime::format_duration(lookup)
                ))
            })?,
    };
    for id in ids {
        let mut snapshots = match api.describe_image(&id).await? {
            Some(image) => image.snapshot_ids,
            None => Vec::new(),
        };
        match api.deregister_image(&id).await {
            Ok(_) => {}
            Err(err) if err.is("InvalidAMIID.NotFound") || err.is("InvalidAMIID.Unavailable") => {}
            Err(err) => return Err(err.into()),
        }
        for snapshot in api.snapshots_described_for(&id).await? {
            if !snapshots.contains(&snapshot) {
                snapshots.push(snapshot);
            }
        }
        for snapshot in &snapshots {
            delete_snapshot(api, snapshot, log).await?;
        }
        if let Some(log) = log {
            let deleted = if snapshots.is_empty() {
                String::new()
            } else {
                format!(" and deleted snapshot(s) {}", snapshots.join(", "))
            };
            log.info(format!("deregistered AMI {id} in {region}{deleted}"));
        }
    }
    Ok(())
}

/// After a lost answer and a retry, CreateImage fails as a duplicate of the
/// AMI its first attempt made; that one carries this run's id.
async fn adopt_own_duplicate(plan: &Plan, api: &dyn Ec2Api) -> Result<Option<String>, StepError> {
    let found = api
        .own_images_of_run(&plan.ami_name, Some(&plan.run_id))
        .await?;
    Ok(found.into_iter().next())
}

/// An AMI this step made, as far as it got.
struct Made {
    journal_id: ResourceId,
    image_id: Option<String>,
}

pub struct StepCreateImage {
    plan: Arc<Plan>,
    made: Option<Made>,
}

impl StepCreateImage {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepCreateImage { plan, made: None }
    }
}

#[async_trait]
impl Step<Ec2State> for StepCreateImage {
    fn name(&self) -> &'static str {
        "create_image"
    }

    async fn run(&mut self, state: &mut Ec2State, cx: &StepContext) -> Result<(), StepError> {
        let plan = self.plan.clone();
        let region = &plan.region;
        let api = plan.api();
        let instance_id = state
            .instance
            .as_ref()
            .map(|i| i.id.clone())
            .ok_or_else(|| StepError::failed("no instance to snapshot"))?;
        let source = state
            .source
            .clone()
            .ok_or_else(|| StepError::failed("no source AMI"))?;

        let journal_id = record(cx, plan.journal_image(region, None))?;
        self.made = Some(Made {
            journal_id,
            image_id: None,
        });
        cx.log.info(format!(
            "creating AMI `{}` from instance {instance_id}",
            plan.ami_name
        ));
        let result = api
            .create_image(
                &instance_id,
                &plan.ami_name,
                plan.ami_description.clone(),
                &plan.artifact_tags(&plan.config.ami_tags, &source),
            )
            .await;
        let image_id = match result {
            Ok(image_id) => image_id,
            Err(err) if err.is("InvalidAMIName.Duplicate") => {
                match adopt_own_duplicate(&plan, api.as_ref()).await? {
                    Some(id) => id,
                    None => {
                        // Someone else took the name since the check: nothing
                        // of ours exists, and theirs must not be touched.
                        self.made = None;
                        release(cx, journal_id)?;
                        return Err(err.into());
                    }
                }
            }
            Err(err) if err.is_refusal() => {
                // EC2 turned CreateImage down: there is no AMI to look for.
                self.made = None;
                release(cx, journal_id)?;
                return Err(err.into());
            }
            Err(err) => return Err(err.into()),
        };
        if let Some(made) = self.made.as_mut() {
            made.image_id = Some(image_id.clone());
        }
        cx.journal
            .update(
                journal_id,
                plan.journal_image(region, Some(image_id.clone())),
            )
            .map_err(StepError::failed)?;

        let image =
            wait_for_image(api.as_ref(), &image_id, plan.config.ami_timeout, &cx.log).await?;
        let snapshots = image.snapshot_ids;
        tag_snapshots(
            api.as_ref(),
            &snapshots,
            &plan.artifact_tags(&plan.config.snapshot_tags, &source),
        )
        .await?;
        cx.log.info(format!(
            "AMI {image_id} is available in {region} (snapshot {})",
            if snapshots.is_empty() {
                "none".to_owned()
            } else {
                snapshots.join(", ")
            }
        ));
        state.amis.insert(
            region.clone(),
            AmiInfo {
                image_id,
                snapshot_ids: snapshots,
            },
        );
        Ok(())
    }

    async fn cleanup(
        &mut self,
        state: &mut Ec2State,
        cx: &StepContext,
        outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        let Some(made) = self.made.take() else {
            return Ok(());
        };
        if outcome == CleanupOutcome::Succeeded {
            // The AMI is the artifact now; the journal lets go of it.
            return release(cx, made.journal_id);
        }
        state.amis.remove(&self.plan.region);
        let result = deregister(
            self.plan.api().as_ref(),
            made.image_id.as_deref(),
            &self.plan.ami_name,
            Some(&self.plan.run_id),
            self.plan.lookup_timeout,
            Some(&cx.log),
        )
        .await;
        match result {
            Ok(()) => release(cx, made.journal_id),
            Err(err) => {
                let message = format!(
                    "{err}; the AMI stays recorded in the run journal for `imgbuild clean`"
                );
                self.made = Some(made);
                Err(StepError::failed(message))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::ec2::api::fake::{FakeEc2, plan};
    use crate::ec2::{InstanceInfo, SourceAmi};

    fn stopped() -> Ec2State {
        Ec2State {
            source: Some(SourceAmi {
                id: "ami-source".to_owned(),
                name: None,
                owner: None,
                creation_date: None,
                root_device_name: None,
            }),
            instance: Some(InstanceInfo {
                id: "i-build".to_owned(),
                public_ip: None,
                private_ip: None,
                public_dns: None,
                private_dns: None,
            }),
            ..Ec2State::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_ami_is_made_tagged_and_removed_with_its_snapshots_when_the_build_fails() {
        let fake = FakeEc2::new("eu-west-1");
        let test = TestContext::new("app");
        let mut state = stopped();
        let mut step = StepCreateImage::new(plan(serde_json::json!({}), &fake));
        step.run(&mut state, &test.cx).await.unwrap();
        let ami = state.amis["eu-west-1"].clone();
        assert_eq!(ami.snapshot_ids.len(), 1);
        let calls = fake.calls();
        assert_eq!(calls[0], "eu-west-1 CreateImage app-1.0 from i-build");
        assert_eq!(
            calls.last().unwrap(),
            &format!("eu-west-1 CreateTags {}", ami.snapshot_ids[0])
        );
        assert_eq!(test.cx.journal.outstanding().len(), 1);

        step.cleanup(&mut state, &test.cx, CleanupOutcome::Failed)
            .await
            .unwrap();
        assert!(fake.amis_in("eu-west-1").is_empty());
        assert!(fake.world.lock().unwrap().snapshots.is_empty());
        assert!(!state.amis.contains_key("eu-west-1"));
        assert!(test.cx.journal.outstanding().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_duplicate_left_by_this_runs_lost_answer_is_adopted() {
        let fake = FakeEc2::new("eu-west-1");
        // The first CreateImage went through but its answer was lost; the
        // retry is turned down as a duplicate of it.
        let first = fake.with_own_image("eu-west-1", "app-1.0", "unit0123");
        fake.fail_next("CreateImage", Some("InvalidAMIName.Duplicate"), Some(400));
        let test = TestContext::new("app");
        let mut state = stopped();
        let mut step = StepCreateImage::new(plan(serde_json::json!({}), &fake));
        step.run(&mut state, &test.cx).await.unwrap();
        assert_eq!(state.amis["eu-west-1"].image_id, first);
        assert_eq!(fake.amis_in("eu-west-1").len(), 1);
    }

    #[tokio::test]
    async fn a_duplicate_of_someone_else_fails_and_is_left_alone() {
        let fake = FakeEc2::new("eu-west-1").with_image("eu-west-1", "app-1.0", "ami-theirs");
        fake.fail_next("CreateImage", Some("InvalidAMIName.Duplicate"), Some(400));
        let test = TestContext::new("app");
        let mut state = stopped();
        let mut step = StepCreateImage::new(plan(serde_json::json!({}), &fake));
        let err = step.run(&mut state, &test.cx).await.unwrap_err();
        assert!(err.to_string().contains("bump `image.version`"), "{err}");
        assert!(test.cx.journal.outstanding().is_empty());
        step.cleanup(&mut state, &test.cx, CleanupOutcome::Failed)
            .await
            .unwrap();
        assert_eq!(
            fake.amis_in("eu-west-1"),
            [("ami-theirs".to_owned(), "app-1.0".to_owned())]
        );
    }
}
