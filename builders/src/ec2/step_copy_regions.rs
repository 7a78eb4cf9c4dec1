//! Copies the finished AMI to `ami_regions`, all at once: each copy is
//! recorded in the journal before its CopyImage, tagged like the original,
//! waited for and logged as it lands.
//!
//! Two phases: every CopyImage call runs to its answer even when another
//! fails, so no copy exists whose id is unknown (dropping a call in flight
//! could leave one behind); then the waits, where the first failure stops
//! the rest. Cleanup deregisters every copy made, as it does on
//! cancellation or when a later step fails.

use super::api::NewCopy;
use super::poll::wait_for_image;
use super::step_create_image::{deregister, tag_snapshots};
use super::{AmiInfo, Ec2State, Plan, SourceAmi};
use crate::common::tracked::{record, release};
use async_trait::async_trait;
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
        let api = plan.api_in(region);
        let ami_tags = plan.artifact_tags(&plan.config.ami_tags, source);
        let journal_id = record(cx, plan.journal_image(region, None))?;
        self.note(
            region,
            Copy {
                journal_id,
                image_id: None,
            },
        );
        let copy = NewCopy {
            source_image_id,
            source_region: &plan.region,
            name: &plan.ami_name,
            description: plan.ami_description.clone(),
            // The SDK resends the same token on a retry: never two copies.
            client_token: uuid::Uuid::new_v4().to_string(),
            encrypt_with: plan.config.encrypt_boot.then(|| plan.copy_kms_key(region)),
            tags: ami_tags.clone(),
        };
        let image_id = match api.copy_image(copy).await {
            Ok(image_id) => image_id,
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
        api.create_tags(std::slice::from_ref(&image_id), &ami_tags)
            .await?;
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
        let api = plan.api_in(region);
        let image =
            wait_for_image(api.as_ref(), image_id, plan.config.ami_timeout, &cx.log).await?;
        let snapshots = image.snapshot_ids;
        tag_snapshots(
            api.as_ref(),
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
                let result = deregister(
                    plan.api_in(region).as_ref(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::ec2::api::fake::{FakeEc2, plan};

    fn built(fake: &FakeEc2) -> Ec2State {
        let mut state = Ec2State {
            source: Some(SourceAmi {
                id: "ami-source".to_owned(),
                name: None,
                owner: None,
                creation_date: None,
                root_device_name: None,
            }),
            ..Ec2State::default()
        };
        let home = fake.with_own_image("eu-west-1", "app-1.0", "unit0123");
        state.amis.insert(
            "eu-west-1".to_owned(),
            AmiInfo {
                image_id: home,
                snapshot_ids: Vec::new(),
            },
        );
        state
    }

    #[tokio::test(start_paused = true)]
    async fn every_copy_lands_tagged_and_is_kept_on_success() {
        let fake = FakeEc2::new("eu-west-1");
        let settings = serde_json::json!({"ami_regions": ["us-west-2", "ap-south-1"]});
        let test = TestContext::new("app");
        let mut state = built(&fake);
        let mut step = StepCopyRegions::new(plan(settings, &fake));
        step.run(&mut state, &test.cx).await.unwrap();
        assert_eq!(
            state.amis.keys().collect::<Vec<_>>(),
            ["ap-south-1", "eu-west-1", "us-west-2"]
        );
        for region in ["us-west-2", "ap-south-1"] {
            let copy = &state.amis[region];
            assert_eq!(
                fake.amis_in(region),
                [(copy.image_id.clone(), "app-1.0".to_owned())]
            );
            assert_eq!(copy.snapshot_ids.len(), 1, "{copy:?}");
        }
        step.cleanup(&mut state, &test.cx, CleanupOutcome::Succeeded)
            .await
            .unwrap();
        assert_eq!(fake.amis_in("us-west-2").len(), 1);
        assert!(test.cx.journal.outstanding().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_copy_fails_the_step_and_cleanup_removes_the_copies_made() {
        let fake = FakeEc2::new("eu-west-1");
        let settings = serde_json::json!({"ami_regions": ["us-west-2", "ap-south-1"]});
        fake.at("ap-south-1")
            .fail_next("CopyImage", Some("InvalidParameterValue"), Some(400));
        let test = TestContext::new("app");
        let mut state = built(&fake);
        let mut step = StepCopyRegions::new(plan(settings, &fake));
        let err = step
            .run(&mut state, &test.cx)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("copy to ap-south-1: EC2 CopyImage in ap-south-1 failed"),
            "{err}"
        );
        // The refused copy made nothing; the other one is on record.
        assert_eq!(test.cx.journal.outstanding().len(), 1);
        let made = fake.amis_in("us-west-2");
        assert_eq!(made.len(), 1);
        let made_snapshots: Vec<String> = fake
            .world
            .lock()
            .unwrap()
            .snapshots
            .iter()
            .filter(|((region, _), ami)| region == "us-west-2" && **ami == made[0].0)
            .map(|((_, id), _)| id.clone())
            .collect();
        assert_eq!(made_snapshots.len(), 1);

        step.cleanup(&mut state, &test.cx, CleanupOutcome::Failed)
            .await
            .unwrap();
        assert!(fake.amis_in("us-west-2").is_empty());
        assert!(fake.amis_in("ap-south-1").is_empty());
        let calls = fake.calls();
        assert!(
            calls.contains(&format!("us-west-2 DeleteSnapshot {}", made_snapshots[0])),
            "{calls:?}"
        );
        // The build region's AMI is the create step's to remove.
        assert_eq!(fake.amis_in("eu-west-1").len(), 1);
        assert!(test.cx.journal.outstanding().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_whose_answer_was_lost_is_found_by_name_and_run_and_removed() {
        let fake = FakeEc2::new("eu-west-1");
        let settings = serde_json::json!({"ami_regions": ["us-west-2"]});
        fake.at("us-west-2").fail_next("CopyImage", None, None);
        let test = TestContext::new("app");
        let mut state = built(&fake);
        let mut step = StepCopyRegions::new(plan(settings, &fake));
        step.run(&mut state, &test.cx).await.unwrap_err();
        assert_eq!(test.cx.journal.outstanding().len(), 1);
        // EC2 made the copy after all, tagged with the run; a same-named
        // AMI of another run must be left alone.
        let ours = fake.with_own_image("us-west-2", "app-1.0", "unit0123");
        let theirs = fake.with_own_image("us-west-2", "app-1.0", "other-run");
        step.cleanup(&mut state, &test.cx, CleanupOutcome::Cancelled)
            .await
            .unwrap();
        assert_eq!(
            fake.amis_in("us-west-2"),
            [(theirs, "app-1.0".to_owned())],
            "{ours} should be gone"
        );
        assert!(test.cx.journal.outstanding().is_empty());
    }
}
