//! Copies the finished AMI to `ami_regions`, all at once: each copy is
//! recorded in the journal before its CopyImage, tagged like the original,
//! waited for and logged as it lands.
//!
//! Two phases: every CopyImage call runs to its answer even when another
//! fails, so no copy exists whose id is unknown (dropping a call in flight
//! could leave one behind); then the waits, where the first failure stops
//! the rest. Cleanup deregisters every copy made, as it does on
//! cancellation or when a later step fails.

use super::client::{AwsResultExt, tag_spec, tags};
use super::poll::wait_for_image;
use super::step_create_image::{deregister, snapshot_ids, tag_snapshots};
use super::{AmiInfo, Ec2State, Plan, SourceAmi};
use crate::common::tracked::{record, release};
use async_trait::async_trait;
use aws_sdk_ec2::types::ResourceType;
use futures_util::future::{join_all, try_join_all};
use imgbuild_core::{CleanupOutcome, ResourceId, Step, StepContext, StepError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A copy, as far as it got.
#[derive(Debug, Clone)]
struct Copy {
    journal_id: ResourceId,
    image_id: Option<String>,
}

pub struct StepCopyRegions {
    plan: Arc<Plan>,
    /// By destination region. Written as each copy progresses, so cleanup
    /// knows about copies whose futures were dropped by a cancellation.
    copies: Mutex<BTreeMap<String, Copy>>,
}

impl StepCopyRegions {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepCopyRegions {
            plan,
            copies: Mutex::default(),
        }
    }

    fn note(&self, region: &str, copy: Copy) {
        self.copies
            .lock()
            .expect("copies lock poisoned")
            .insert(region.to_owned(), copy);
    }

    /// Records and starts the copy into `region`; returns the copy's id.
    async fn start_copy(
        &self,
        cx: &StepContext,
        source_image_id: &str,
        source: &SourceAmi,
        region: &str,
    ) -> Result<String, StepError> {
        let plan = &self.plan;
        let client = plan.clients.get(region);
        let ami_tags = plan.artifact_tags(&plan.config.ami_tags, source);
        let journal_id = record(cx, plan.journal_image(region, None))?;
        self.note(
            region,
            Copy {
                journal_id,
                image_id: None,
            },
        );
        let mut request = client
            .copy_image()
            .source_image_id(source_image_id)
            .source_region(&plan.region)
            .name(&plan.ami_name)
            .set_description(plan.ami_description.clone())
            // The SDK resends the same token on a retry: never two copies.
            .client_token(uuid::Uuid::new_v4().to_string())
            .tag_specifications(tag_spec(ResourceType::Image, &ami_tags));
        if plan.config.encrypt_boot {
            request = request
                .encrypted(true)
                .set_kms_key_id(plan.copy_kms_key(region));
        }
        let output = match request.send().await.aws("CopyImage", region) {
            Ok(output) => output,
            Err(err) if err.is_refusal() => {
                // EC2 turned the copy down: there is nothing to look for.
                self.copies
                    .lock()
                    .expect("copies lock poisoned")
                    .remove(region);
                release(cx, journal_id)?;
                return Err(err.into());
            }
            Err(err) => return Err(err.into()),
        };
        let image_id = output
            .image_id()
            .ok_or_else(|| {
                StepError::failed(format!("CopyImage to {region} returned no image id"))
            })?
            .to_owned();
        self.note(
            region,
            Copy {
                journal_id,
                image_id: Some(image_id.clone()),
            },
        );
        cx.journal
            .update(
                journal_id,
                plan.journal_image(region, Some(image_id.clone())),
            )
            .map_err(StepError::failed)?;
        cx.log.info(format!("copying to {region} as {image_id}"));
        // Tag specifications on CopyImage are not honoured everywhere (moto
        // drops them); tagging again is harmless.
        client
            .create_tags()
            .resources(&image_id)
            .set_tags(Some(tags(&ami_tags)))
            .send()
            .await
            .aws("CreateTags", region)?;
        Ok(image_id)
    }

    /// Waits for the copy to land and tags its snapshots.
    async fn finish_copy(
        &self,
        cx: &StepContext,
        source: &SourceAmi,
        region: &str,
        image_id: &str,
    ) -> Result<AmiInfo, StepError> {
        let plan = &self.plan;
        let client = plan.clients.get(region);
        let image =
            wait_for_image(&client, region, image_id, plan.config.ami_timeout, &cx.log).await?;
        let snapshots = snapshot_ids(&image);
        tag_snapshots(
            &client,
            region,
            &snapshots,
            &plan.artifact_tags(&plan.config.snapshot_tags, source),
        )
        .await?;
        cx.log
            .info(format!("copy {image_id} is available in {region}"));
        Ok(AmiInfo {
            image_id: image_id.to_owned(),
            snapshot_ids: snapshots,
        })
    }
}

#[async_trait]
impl Step<Ec2State> for StepCopyRegions {
    fn name(&self) -> &'static str {
        "copy_regions"
    }

    async fn run(&mut self, state: &mut Ec2State, cx: &StepContext) -> Result<(), StepError> {
        let plan = self.plan.clone();
        if plan.copy_regions.is_empty() {
            return Ok(());
        }
        let source = state
            .source
            .clone()
            .ok_or_else(|| StepError::failed("no source AMI"))?;
        let home = state
            .amis
            .get(&plan.region)
            .map(|ami| ami.image_id.clone())
            .ok_or_else(|| StepError::failed("no AMI to copy"))?;
        cx.log.info(format!(
            "copying {home} to {}",
            plan.copy_regions.join(", ")
        ));
        let this = &*self;
        let (home, source) = (&home, &source);
        let starts = plan.copy_regions.iter().map(|region| async move {
            let started = this.start_copy(cx, home, source, region).await;
            (region.clone(), started)
        });
        let mut started = Vec::new();
        let mut failures = Vec::new();
        for (region, result) in join_all(starts).await {
            match result {
                Ok(image_id) => started.push((region, image_id)),
                Err(StepError::Cancelled) => return Err(StepError::Cancelled),
                Err(StepError::Failed(message)) => {
                    failures.push(format!("copy to {region}: {message}"))
                }
            }
        }
        if !failures.is_empty() {
            return Err(StepError::failed(failures.join("; ")));
        }
        let waits = started.iter().map(|(region, image_id)| async move {
            this.finish_copy(cx, source, region, image_id)
                .await
                .map(|ami| (region.clone(), ami))
                .map_err(|err| err.context(format!("copy to {region}")))
        });
        let done = try_join_all(waits).await?;
        state.amis.extend(done);
        Ok(())
    }

    async fn cleanup(
        &mut self,
        state: &mut Ec2State,
        cx: &StepContext,
        outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        let copies = std::mem::take(&mut *self.copies.lock().expect("copies lock poisoned"));
        if outcome == CleanupOutcome::Succeeded {
            for copy in copies.values() {
                release(cx, copy.journal_id)?;
            }
            return Ok(());
        }
        let plan = self.plan.clone();
        let removals = copies.iter().map(|(region, copy)| {
            let plan = plan.clone();
            async move {
                let client = plan.clients.get(region);
                let result = deregister(
                    &client,
                    region,
                    copy.image_id.as_deref(),
                    &plan.ami_name,
                    Some(&plan.run_id),
                    plan.lookup_timeout,
                    Some(&cx.log),
                )
                .await;
                (region.clone(), copy.clone(), result)
            }
        });
        let mut failures = Vec::new();
        for (region, copy, result) in join_all(removals).await {
            state.amis.remove(&region);
            match result {
                Ok(()) => release(cx, copy.journal_id)?,
                Err(err) => {
                    failures.push(err.to_string());
                    self.note(&region, copy);
                }
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(StepError::failed(format!(
                "{}; the copies stay recorded in the run journal for `imgbuild clean`",
                failures.join("; ")
            )))
        }
    }
}
