//! `on_test_failure = "delete"`: the AMI is deregistered and its snapshots
//! deleted in every region it was made or copied in, as the artifact
//! records them. Every AMI is recorded in the run journal before the first
//! is touched, and let go once it and its snapshots are gone: a deletion
//! that fails or is killed part way is finished by `imgbuild clean`. An AMI
//! or snapshot already gone counts as deleted, so a deletion can be run
//! again.

use super::api::{Ec2Api, Ec2Apis};
use super::kind::Ec2Resource;
use super::step_create_image::{delete_snapshot, deregister};
use super::test_run::RecordedAmis;
use crate::BuildError;
use crate::common::tracked::{record, release};
use imgbuild_core::{BuildLog, StepContext, StepError};
use std::time::Duration;

pub async fn delete(
    apis: &dyn Ec2Apis,
    amis: &RecordedAmis,
    endpoint_url: Option<&str>,
    lookup: Duration,
    cx: &StepContext,
) -> Result<(), BuildError> {
    let failed = |message: String| BuildError::Failed {
        step: "delete".to_owned(),
        message,
    };
    let mut recorded = Vec::new();
    for (region, image_id) in &amis.amis {
        let resource = Ec2Resource::Image {
            region: region.clone(),
            endpoint_url: endpoint_url.map(str::to_owned),
            name: amis.ami_name.clone(),
            image_id: Some(image_id.clone()),
        };
        let journal_id = record(cx, resource.into()).map_err(|err| failed(err.to_string()))?;
        recorded.push((region, image_id, journal_id));
    }
    let mut errors = Vec::new();
    for (region, image_id, journal_id) in recorded {
        let api = apis.in_region(region);
        let snapshots = amis.snapshots.get(region).map(Vec::as_slice).unwrap_or(&[]);
        let removed = remove(
            api.as_ref(),
            image_id,
            &amis.ami_name,
            snapshots,
            lookup,
            &cx.log,
        )
        .await;
        match removed {
            Ok(()) => release(cx, journal_id).map_err(|err| failed(err.to_string()))?,
            // The other regions' AMIs still go.
            Err(err) => errors.push(format!("AMI {image_id} in {region}: {err}")),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(failed(format!(
            "could not delete {}; what is left stays recorded in the run journal, and `imgbuild clean` removes it",
            errors.join("; ")
        )))
    }
}

/// The AMI and the snapshots EC2 names for it, then the snapshots the
/// build recorded: those stay behind an AMI deregistered by a deletion
/// that broke off, where EC2 no longer names them.
async fn remove(
    api: &dyn Ec2Api,
    image_id: &str,
    name: &str,
    recorded_snapshots: &[String],
    lookup: Duration,
    log: &BuildLog,
) -> Result<(), StepError> {
    deregister(api, Some(image_id), name, None, lookup, Some(log)).await?;
    for snapshot in recorded_snapshots {
        delete_snapshot(api, snapshot, Some(log)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::ec2::api::fake::FakeEc2;
    use std::collections::BTreeMap;

    /// `app-1.0` made in eu-west-1 and copied to us-east-2, as recorded,
    /// with an AMI of another build beside each.
    fn made(fake: &FakeEc2) -> RecordedAmis {
        let mut amis = BTreeMap::new();
        let mut snapshots = BTreeMap::new();
        for region in ["eu-west-1", "us-east-2"] {
            let id = fake.with_own_image(region, "app-1.0", "unit0123");
            fake.with_own_image(region, "other-2.0", "run-other");
            let world = fake.world.lock().unwrap();
            let ami = &world.amis[&(region.to_owned(), id.clone())];
            snapshots.insert(region.to_owned(), ami.snapshot_ids.clone());
            amis.insert(region.to_owned(), id);
        }
        RecordedAmis {
            region: "eu-west-1".to_owned(),
            ami_name: "app-1.0".to_owned(),
            amis,
            snapshots,
        }
    }

    /// (region, AMI name) of every AMI, and how many snapshots are left.
    fn left(fake: &FakeEc2) -> (Vec<(String, String)>, usize) {
        let world = fake.world.lock().unwrap();
        let amis = world
            .amis
            .iter()
            .map(|((region, _), ami)| (region.clone(), ami.name.clone()))
            .collect();
        (amis, world.snapshots.len())
    }

    #[tokio::test(start_paused = true)]
    async fn every_region_loses_the_ami_and_its_snapshots_and_nothing_else() {
        let fake = FakeEc2::new("eu-west-1");
        let amis = made(&fake);
        let test = TestContext::new("app");
        delete(&fake, &amis, None, Duration::from_secs(5), &test.cx)
            .await
            .unwrap();
        let other = |region: &str| (region.to_owned(), "other-2.0".to_owned());
        assert_eq!(
            left(&fake),
            (vec![other("eu-west-1"), other("us-east-2")], 2)
        );
        assert!(test.cx.journal.outstanding().is_empty());
        // A second run finds everything gone, which is fine.
        delete(&fake, &amis, None, Duration::from_secs(5), &test.cx)
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_recorded_snapshot_behind_an_ami_already_deregistered_is_still_deleted() {
        let fake = FakeEc2::new("eu-west-1");
        let amis = made(&fake);
        let copy = amis.amis["us-east-2"].clone();
        {
            // A deletion broke off after DeregisterImage: the AMI is gone,
            // and EC2 no longer ties its snapshot to it.
            let mut world = fake.world.lock().unwrap();
            world.amis.remove(&("us-east-2".to_owned(), copy.clone()));
            let snapshot = amis.snapshots["us-east-2"][0].clone();
            world
                .snapshots
                .insert(("us-east-2".to_owned(), snapshot), "forgotten".to_owned());
        }
        let test = TestContext::new("app");
        delete(&fake, &amis, None, Duration::from_secs(5), &test.cx)
            .await
            .unwrap();
        assert_eq!(left(&fake).1, 2, "only the other build's snapshots stay");
        assert!(test.cx.journal.outstanding().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_region_that_fails_stays_on_record_and_the_others_are_still_deleted() {
        let fake = FakeEc2::new("eu-west-1");
        let amis = made(&fake);
        fake.at("eu-west-1")
            .fail_next("DeregisterImage", Some("UnauthorizedOperation"), Some(403));
        let test = TestContext::new("app");
        let err = delete(&fake, &amis, None, Duration::from_secs(5), &test.cx)
            .await
            .unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("step delete failed: could not delete AMI "),
            "{message}"
        );
        assert!(message.contains(" in eu-west-1: "), "{message}");
        assert!(message.contains("`imgbuild clean`"), "{message}");
        let names: Vec<(String, String)> = left(&fake).0;
        assert!(
            names.contains(&("eu-west-1".to_owned(), "app-1.0".to_owned())),
            "{names:?}"
        );
        assert!(
            !names.contains(&("us-east-2".to_owned(), "app-1.0".to_owned())),
            "{names:?}"
        );
        let recorded: Vec<String> = test
            .cx
            .journal
            .outstanding()
            .iter()
            .map(|o| o.resource.describe())
            .collect();
        assert_eq!(recorded.len(), 1, "{recorded:?}");
        assert!(
            recorded[0].contains(&amis.amis["eu-west-1"]),
            "{recorded:?}"
        );
    }
}
