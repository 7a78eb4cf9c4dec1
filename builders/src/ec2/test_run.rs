//! `[[test]]` on an AMI: an instance of the new AMI is launched in the
//! build region with the build's own steps for the key pair, the security
//! group, the launch and SSH, the tests run over that connection, and the
//! steps' cleanup terminates the instance and deletes the key pair and the
//! group, on success, failure and cancel alike. Everything is recorded in
//! the run journal before it is made, as in a build. The AMI itself is only
//! launched from, never changed.
//!
//! Steps, in order: find the AMI (still registered and available), key
//! pair, security group, run the instance, connect, run the tests. The last
//! produces `state.test_results`.

use super::step_connect::StepConnect;
use super::step_key_pair::StepKeyPair;
use super::step_run_instance::StepRunInstance;
use super::step_security_group::StepSecurityGroup;
use super::{Ec2State, Plan, SourceAmi};
use crate::common::outcome::steps_result;
use crate::common::step_run_tests::{HasTestResults, StepRunTests};
use crate::{Artifact, BuildError};
use async_trait::async_trait;
use imgbuild_core::{OnError, Step, StepContext, StepError, run_steps};
use imgbuild_provisioners::image_test::{ImageTest, TestResult};
use std::collections::BTreeMap;
use std::sync::Arc;

impl HasTestResults for Ec2State {
    fn set_test_results(&mut self, results: Vec<TestResult>) {
        self.test_results = Some(results);
    }
}

/// The AMIs a build made, as its artifact records them (the config may
/// have changed since, for a later test run or delete).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedAmis {
    /// The build region, where the instance under test runs.
    pub region: String,
    pub ami_name: String,
    /// Image id by region: the build region's and every copy.
    pub amis: BTreeMap<String, String>,
    /// Snapshot ids by region, as the build saw them.
    pub snapshots: BTreeMap<String, Vec<String>>,
}

impl RecordedAmis {
    pub fn of(artifact: &Artifact) -> Result<RecordedAmis, BuildError> {
        let incomplete = |what: &str| {
            BuildError::Refused(format!(
                "the EC2 artifact {} records no {what}; is its manifest entry complete?",
                artifact.id
            ))
        };
        let details = &artifact.details;
        let region = details["region"]
            .as_str()
            .ok_or_else(|| incomplete("build region (`details.region`)"))?
            .to_owned();
        let ami_name = details["ami_name"]
            .as_str()
            .ok_or_else(|| incomplete("AMI name (`details.ami_name`)"))?
            .to_owned();
        let amis: BTreeMap<String, String> = serde_json::from_value(details["amis"].clone())
            .map_err(|_| incomplete("AMI ids by region (`details.amis`)"))?;
        if !amis.contains_key(&region) {
            return Err(incomplete(&format!("AMI in its build region {region}")));
        }
        // Older records may lack snapshots; the AMIs still name theirs.
        let snapshots = serde_json::from_value(details["snapshots"].clone()).unwrap_or_default();
        Ok(RecordedAmis {
            region,
            ami_name,
            amis,
            snapshots,
        })
    }

    /// The AMI in the build region.
    pub fn home_image(&self) -> &str {
        &self.amis[&self.region]
    }
}

/// The test run's plan: the build's, in the region the AMI was made in,
/// under a build name of its own. The temporary key pair and group are
/// named after the build name, so the test run's never collide with the
/// build's (one whose deletion failed is still there, on record), and the
/// instance's `Name` says it is the test instance.
pub fn test_plan(mut plan: Plan, amis: &RecordedAmis) -> Plan {
    plan.region = amis.region.clone();
    plan.copy_regions = Vec::new();
    plan.ami_name = amis.ami_name.clone();
    plan.build_name = format!("{}-test", plan.build_name);
    plan
}

/// The steps of a test run; the last leaves the tests' outcomes in the
/// state.
pub fn steps(
    plan: &Arc<Plan>,
    image_id: &str,
    tests: &[ImageTest],
) -> Vec<Box<dyn Step<Ec2State>>> {
    vec![
        Box::new(StepFindAmi {
            plan: plan.clone(),
            image_id: image_id.to_owned(),
        }),
        Box::new(StepKeyPair::new(plan.clone())),
        Box::new(StepSecurityGroup::new(plan.clone())),
        Box::new(StepRunInstance::new(plan.clone())),
        Box::new(StepConnect::new(plan.clone())),
        Box::new(StepRunTests::new(tests.to_vec())),
    ]
}

/// Runs `tests` on a fresh instance of the AMI in its build region.
pub async fn run(
    plan: &Arc<Plan>,
    amis: &RecordedAmis,
    tests: &[ImageTest],
    on_error: OnError,
    cx: &StepContext,
) -> Result<Vec<TestResult>, BuildError> {
    let mut state = Ec2State::default();
    let mut steps = steps(plan, amis.home_image(), tests);
    let mut report = run_steps(&mut steps, &mut state, cx, on_error).await;
    if report.left_for_debugging {
        cx.log.warn(super::debugging_hint(plan, &state, cx));
    }
    steps_result(&mut report)?;
    state.test_results.take().ok_or_else(|| BuildError::Failed {
        step: "test".to_owned(),
        message: "the tests finished without results".to_owned(),
    })
}

/// Makes sure the AMI is still registered and available, and hands it to
/// the launch as the image to start from.
///
/// Produces `state.source`.
struct StepFindAmi {
    plan: Arc<Plan>,
    image_id: String,
}

#[async_trait]
impl Step<Ec2State> for StepFindAmi {
    fn name(&self) -> &'static str {
        "find_ami"
    }

    async fn run(&mut self, state: &mut Ec2State, cx: &StepContext) -> Result<(), StepError> {
        let (id, region) = (&self.image_id, &self.plan.region);
        let image = self.plan.api().source_image(id).await?.ok_or_else(|| {
            StepError::failed(format!(
                "AMI {id} ({}) is no longer in {region}: it was deregistered after it was built, so there is nothing to test; build a new version",
                self.plan.ami_name
            ))
        })?;
        let state_name = image.state.as_deref().unwrap_or("unknown");
        if state_name != "available" {
            return Err(StepError::failed(format!(
                "AMI {id} in {region} is {state_name}, not available, so no instance can be launched from it; check it with `aws ec2 describe-images --region {region} --image-ids {id}`"
            )));
        }
        cx.log
            .info(format!("testing AMI {id} on a new instance in {region}"));
        state.source = Some(SourceAmi {
            id: image.image_id,
            name: image.name,
            owner: image.owner,
            creation_date: image.creation_date,
            root_device_name: image.root_device_name,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::ec2::AmiInfo;
    use crate::ec2::api::fake::{FakeEc2, plan};
    use crate::ec2::client::RUN_ID_TAG;

    /// What the build recorded for `app-1.0`: `home` in eu-west-1 and a
    /// copy in us-east-2.
    fn recorded(fake: &FakeEc2, home: &str, copy: &str) -> Artifact {
        let build = plan(serde_json::json!({"ami_regions": ["us-east-2"]}), fake);
        let snapshots = |region: &str, id: &str| {
            fake.world
                .lock()
                .unwrap()
                .amis
                .get(&(region.to_owned(), id.to_owned()))
                .map(|ami| ami.snapshot_ids.clone())
                .unwrap_or_default()
        };
        let state = Ec2State {
            source: Some(SourceAmi {
                id: "ami-source".to_owned(),
                name: None,
                owner: None,
                creation_date: None,
                root_device_name: None,
            }),
            amis: BTreeMap::from([
                (
                    "eu-west-1".to_owned(),
                    AmiInfo {
                        image_id: home.to_owned(),
                        snapshot_ids: snapshots("eu-west-1", home),
                    },
                ),
                (
                    "us-east-2".to_owned(),
                    AmiInfo {
                        image_id: copy.to_owned(),
                        snapshot_ids: snapshots("us-east-2", copy),
                    },
                ),
            ]),
            ..Ec2State::default()
        };
        crate::ec2::artifact(&build, &state).unwrap()
    }

    /// The test run's steps up to the launch (SSH needs a machine), run
    /// and cleaned up as the builder runs them.
    async fn launch_and_clean(
        fake: &FakeEc2,
        artifact: &Artifact,
        test: &TestContext,
    ) -> Result<(), BuildError> {
        let amis = RecordedAmis::of(artifact)?;
        let build = plan(serde_json::json!({}), fake);
        let plan = Arc::new(test_plan(Arc::into_inner(build).unwrap(), &amis));
        let mut steps = steps(&plan, amis.home_image(), &[]);
        steps.truncate(4);
        let mut state = Ec2State::default();
        let mut report = run_steps(&mut steps, &mut state, &test.cx, OnError::Cleanup).await;
        assert!(report.cleanup_failures.is_empty(), "{report:?}");
        steps_result(&mut report)
    }

    #[test]
    fn the_record_of_a_build_gives_every_ami_and_snapshot_by_region() {
        let fake = FakeEc2::new("eu-west-1");
        let home = fake.with_own_image("eu-west-1", "app-1.0", "unit0123");
        let copy = fake.with_own_image("us-east-2", "app-1.0", "unit0123");
        let amis = RecordedAmis::of(&recorded(&fake, &home, &copy)).unwrap();
        assert_eq!(amis.region, "eu-west-1");
        assert_eq!(amis.ami_name, "app-1.0");
        assert_eq!(amis.home_image(), home);
        assert_eq!(amis.amis["us-east-2"], copy);
        assert_eq!(amis.snapshots["us-east-2"].len(), 1, "{amis:?}");

        let mut broken = recorded(&fake, &home, &copy);
        broken.details["amis"] = serde_json::json!({"us-east-2": copy});
        match RecordedAmis::of(&broken) {
            Err(BuildError::Refused(message)) => {
                assert!(
                    message.contains("AMI in its build region eu-west-1"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_of_the_ami_runs_with_its_own_key_pair_and_group_and_all_goes_after() {
        let fake = FakeEc2::new("eu-west-1");
        let home = fake.with_own_image("eu-west-1", "app-1.0", "unit0123");
        let copy = fake.with_own_image("us-east-2", "app-1.0", "unit0123");
        let artifact = recorded(&fake, &home, &copy);
        let test = TestContext::new("app");
        launch_and_clean(&fake, &artifact, &test).await.unwrap();

        let name = "imgbuild-app-test-unit0123";
        let world = fake.world.lock().unwrap();
        let instances: Vec<_> = world.instances.iter().collect();
        assert_eq!(instances.len(), 1, "{instances:?}");
        let ((region, _), instance) = instances[0];
        assert_eq!(region, "eu-west-1");
        assert_eq!(
            instance.launch.image_id, home,
            "launched from the AMI under test"
        );
        assert_eq!(instance.launch.key_name.as_deref(), Some(name));
        assert_eq!(instance.launch.instance_tags[RUN_ID_TAG], "unit0123");
        assert_eq!(
            instance.launch.instance_tags["Name"],
            "imgbuild app-test (app-1.0)"
        );
        assert_eq!(instance.state, "terminated");
        assert!(world.key_pairs.is_empty(), "{:?}", world.key_pairs);
        assert!(world.groups.is_empty(), "{:?}", world.groups);
        // Launched from, never changed.
        assert_eq!(world.amis.len(), 2);
        drop(world);
        let calls = fake.calls();
        let made: Vec<&String> = calls
            .iter()
            .filter(|c| c.contains("ImportKeyPair") || c.contains("CreateSecurityGroup"))
            .collect();
        assert_eq!(
            made,
            [
                &format!("eu-west-1 ImportKeyPair {name} ssh-ed25519"),
                &format!("eu-west-1 CreateSecurityGroup {name} in the default VPC"),
            ]
        );
        assert!(test.cx.journal.outstanding().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_ami_deregistered_since_its_build_fails_the_run_before_anything_is_made() {
        let fake = FakeEc2::new("eu-west-1");
        let home = fake.with_own_image("eu-west-1", "app-1.0", "unit0123");
        let copy = fake.with_own_image("us-east-2", "app-1.0", "unit0123");
        let artifact = recorded(&fake, &home, &copy);
        fake.world
            .lock()
            .unwrap()
            .amis
            .remove(&("eu-west-1".to_owned(), home.clone()));
        let test = TestContext::new("app");
        match launch_and_clean(&fake, &artifact, &test).await {
            Err(BuildError::Failed { step, message }) => {
                assert_eq!(step, "find_ami");
                assert!(
                    message.contains(&format!("AMI {home} (app-1.0) is no longer in eu-west-1")),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fake.calls(), [format!("eu-west-1 DescribeImages {home}")]);
        assert!(test.cx.journal.outstanding().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_launch_that_fails_still_removes_the_key_pair_and_group_made_for_it() {
        let fake = FakeEc2::new("eu-west-1");
        let home = fake.with_own_image("eu-west-1", "app-1.0", "unit0123");
        let copy = fake.with_own_image("us-east-2", "app-1.0", "unit0123");
        let artifact = recorded(&fake, &home, &copy);
        fake.fail_next(
            "RunInstances",
            Some("InsufficientInstanceCapacity"),
            Some(400),
        );
        let test = TestContext::new("app");
        let err = launch_and_clean(&fake, &artifact, &test).await.unwrap_err();
        assert!(
            matches!(&err, BuildError::Failed { step, .. } if step == "run_instance"),
            "{err:?}"
        );
        let world = fake.world.lock().unwrap();
        assert!(world.key_pairs.is_empty(), "{:?}", world.key_pairs);
        assert!(world.groups.is_empty(), "{:?}", world.groups);
        drop(world);
        assert!(test.cx.journal.outstanding().is_empty());
    }
}
