//! Snapshots the stopped instance into the AMI, waits until it is
//! available, and tags its snapshots. The AMI is recorded in the journal
//! under its name before CreateImage (the name is known up front and, per
//! the name check, not taken), so it can be found even if the answer to
//! CreateImage is lost. On failure or cancellation the AMI is deregistered
//! and its snapshots deleted; on success it is kept as the artifact.

use super::client::{AwsResultExt, RUN_ID_TAG, filter, tag_spec, tags};
use super::poll::{Backoff, Poller, describe_image, look_until_found, wait_for_image};
use super::{AmiInfo, Ec2State, Plan};
use crate::common::tracked::{record, release};
use async_trait::async_trait;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{Image, ResourceType};
use imgbuild_core::{BuildLog, CleanupOutcome, ResourceId, Step, StepContext, StepError};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The EBS snapshots behind an AMI.
pub fn snapshot_ids(image: &Image) -> Vec<String> {
    image
        .block_device_mappings()
        .iter()
        .filter_map(|mapping| mapping.ebs().and_then(|ebs| ebs.snapshot_id()))
        .map(str::to_owned)
        .collect()
}

/// Tags an AMI's snapshots (separately from CreateImage: a `snapshot` tag
/// specification there is not supported everywhere, moto answers it 500).
pub async fn tag_snapshots(
    client: &Client,
    region: &str,
    snapshots: &[String],
    values: &BTreeMap<String, String>,
) -> Result<(), StepError> {
    if snapshots.is_empty() {
        return Ok(());
    }
    client
        .create_tags()
        .set_resources(Some(snapshots.to_vec()))
        .set_tags(Some(tags(values)))
        .send()
        .await
        .aws("CreateTags", region)?;
    Ok(())
}

/// Snapshots whose description names `image_id`: EC2 describes the ones it
/// makes for an AMI as "Created by CreateImage(i-...) for ami-..." or
/// "Copied for DestinationAmi ami-...", which finds them even when the AMI
/// was deregistered before listing them.
async fn snapshots_described_for(
    client: &Client,
    region: &str,
    image_id: &str,
) -> Result<Vec<String>, StepError> {
    let output = client
        .describe_snapshots()
        .owner_ids("self")
        .filters(filter("description", format!("*{image_id}*")))
        .send()
        .await
        .aws("DescribeSnapshots", region)?;
    Ok(output
        .snapshots()
        .iter()
        .filter_map(|s| s.snapshot_id().map(str::to_owned))
        .collect())
}

async fn delete_snapshot(
    client: &Client,
    region: &str,
    snapshot_id: &str,
    log: Option<&BuildLog>,
) -> Result<(), StepError> {
    let backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(10));
    let mut poller = Poller::new(
        format!("deleting snapshot {snapshot_id} in {region}"),
        Duration::from_secs(300),
        backoff,
        log,
    );
    loop {
        match client
            .delete_snapshot()
            .snapshot_id(snapshot_id)
            .send()
            .await
            .aws("DeleteSnapshot", region)
        {
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

/// AMIs named `name` that imgbuild made: tagged with `run_id` when given,
/// with any run id otherwise. Used when an AMI's id was never learned; the
/// tag keeps a same-named AMI made by someone else out of reach.
async fn find_own(
    client: &Client,
    region: &str,
    name: &str,
    run_id: Option<&str>,
) -> Result<Vec<String>, StepError> {
    let tag_filter = match run_id {
        Some(run_id) => filter(&format!("tag:{RUN_ID_TAG}"), run_id),
        None => filter("tag-key", RUN_ID_TAG),
    };
    let output = client
        .describe_images()
        .owners("self")
        .filters(filter("name", name))
        .filters(tag_filter)
        .send()
        .await
        .aws("DescribeImages", region)?;
    Ok(output
        .images()
        .iter()
        .filter(|image| image.name() == Some(name))
        .filter_map(|image| image.image_id().map(str::to_owned))
        .collect())
}

/// The AMIs named `name` of run `run_id`, for a CreateImage or CopyImage
/// whose answer never arrived; looked for up to `lookup` (see
/// [`look_until_found`]), `None` when none showed up.
pub async fn look_up_own(
    client: &Client,
    region: &str,
    name: &str,
    run_id: Option<&str>,
    lookup: Duration,
    log: Option<&BuildLog>,
) -> Result<Option<Vec<String>>, StepError> {
    look_until_found(
        format!("looking for AMI `{name}` in {region}"),
        lookup,
        log,
        || find_own(client, region, name, run_id),
    )
    .await
}

/// Deregisters an AMI and deletes its snapshots. Without an id, the AMI is
/// looked up by name among those imgbuild made, for up to `lookup` (see
/// [`look_up_own`]). An AMI or snapshot already gone counts as removed.
pub async fn deregister(
    client: &Client,
    region: &str,
    image_id: Option<&str>,
    name: &str,
    run_id: Option<&str>,
    lookup: Duration,
    log: Option<&BuildLog>,
) -> Result<(), StepError> {
    let ids: Vec<String> = match image_id {
        Some(id) => vec![id.to_owned()],
        None => look_up_own(client, region, name, run_id, lookup, log)
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
        let mut snapshots = match describe_image(client, region, &id).await? {
            Some(image) => snapshot_ids(&image),
            None => Vec::new(),
        };
        match client
            .deregister_image()
            .image_id(&id)
            .send()
            .await
            .aws("DeregisterImage", region)
        {
            Ok(_) => {}
            Err(err) if err.is("InvalidAMIID.NotFound") || err.is("InvalidAMIID.Unavailable") => {}
            Err(err) => return Err(err.into()),
        }
        for snapshot in snapshots_described_for(client, region, &id).await? {
            if !snapshots.contains(&snapshot) {
                snapshots.push(snapshot);
            }
        }
        for snapshot in &snapshots {
            delete_snapshot(client, region, snapshot, log).await?;
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
async fn adopt_own_duplicate(plan: &Plan, client: &Client) -> Result<Option<String>, StepError> {
    let found = find_own(client, &plan.region, &plan.ami_name, Some(&plan.run_id)).await?;
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
        let client = plan.client();
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
        let result = client
            .create_image()
            .instance_id(&instance_id)
            .name(&plan.ami_name)
            .set_description(plan.ami_description.clone())
            .tag_specifications(tag_spec(
                ResourceType::Image,
                &plan.artifact_tags(&plan.config.ami_tags, &source),
            ))
            .send()
            .await
            .aws("CreateImage", region);
        let image_id = match result {
            Ok(output) => output
                .image_id()
                .ok_or_else(|| StepError::failed("CreateImage returned no image id"))?
                .to_owned(),
            Err(err) if err.is("InvalidAMIName.Duplicate") => {
                match adopt_own_duplicate(&plan, &client).await? {
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
            wait_for_image(&client, region, &image_id, plan.config.ami_timeout, &cx.log).await?;
        let snapshots = snapshot_ids(&image);
        tag_snapshots(
            &client,
            region,
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
            &self.plan.client(),
            &self.plan.region,
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
