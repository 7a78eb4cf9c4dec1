//! Refuses to build an AMI whose name is taken in the build region or any
//! copy region: image versions are immutable, and EC2 would only notice at
//! CreateImage (or, for a copy, at the very end). Runs in preflight, before
//! anything is created, and again as the first step, in case another run
//! took the name in between.

use super::{Ec2State, Plan};
use async_trait::async_trait;
use futures_util::future::try_join_all;
use imgbuild_core::{Step, StepContext, StepError};
use std::sync::Arc;

pub async fn refuse_existing(plan: &Plan) -> Result<(), StepError> {
    let regions: Vec<&String> = std::iter::once(&plan.region)
        .chain(&plan.copy_regions)
        .collect();
    let lookups = regions.iter().map(|region| async move {
        plan.api_in(region)
            .own_images_named(&plan.ami_name)
            .await
            .map(|found| {
                found
                    .into_iter()
                    .map(|image| format!("{} in {region} ({})", image.image_id, image.state))
                    .collect::<Vec<_>>()
            })
    });
    let taken: Vec<String> = try_join_all(lookups).await?.into_iter().flatten().collect();
    if taken.is_empty() {
        return Ok(());
    }
    Err(StepError::failed(format!(
        "an AMI named `{}` already exists: {}; image {} version {} was built before and is never overwritten: bump `image.version` (or deregister the AMI if it is a leftover)",
        plan.ami_name,
        taken.join(", "),
        plan.image.name,
        plan.image.version
    )))
}

pub struct StepCheckAmi {
    plan: Arc<Plan>,
}

impl StepCheckAmi {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepCheckAmi { plan }
    }
}

#[async_trait]
impl Step<Ec2State> for StepCheckAmi {
    fn name(&self) -> &'static str {
        "check_ami"
    }

    async fn run(&mut self, _state: &mut Ec2State, cx: &StepContext) -> Result<(), StepError> {
        refuse_existing(&self.plan).await?;
        cx.log.info(format!(
            "AMI name `{}` is free in {}",
            self.plan.ami_name,
            std::iter::once(&self.plan.region)
                .chain(&self.plan.copy_regions)
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::ec2::api::fake::{FakeEc2, plan};

    #[tokio::test]
    async fn a_name_taken_in_a_copy_region_is_refused_before_anything_is_made() {
        let fake = FakeEc2::new("eu-west-1").with_image("us-west-2", "app-1.0", "ami-theirs");
        let plan = plan(serde_json::json!({"ami_regions": ["us-west-2"]}), &fake);
        let test = TestContext::new("app");
        let mut step = StepCheckAmi::new(plan);
        let err = step
            .run(&mut Ec2State::default(), &test.cx)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`app-1.0` already exists: ami-theirs in us-west-2 (available)")
                && err.contains("bump `image.version`"),
            "{err}"
        );
        let mut calls = fake.calls();
        calls.sort();
        assert_eq!(
            calls,
            [
                "eu-west-1 DescribeImages app-1.0",
                "us-west-2 DescribeImages app-1.0"
            ]
        );
    }

    #[tokio::test]
    async fn a_free_name_everywhere_passes() {
        // Same name, other region; other name, same region: neither counts.
        let fake = FakeEc2::new("eu-west-1")
            .with_image("ap-south-1", "app-1.0", "ami-elsewhere")
            .with_image("eu-west-1", "app-0.9", "ami-older");
        let plan = plan(serde_json::json!({"ami_regions": ["us-west-2"]}), &fake);
        let test = TestContext::new("app");
        StepCheckAmi::new(plan)
            .run(&mut Ec2State::default(), &test.cx)
            .await
            .unwrap();
    }
}
