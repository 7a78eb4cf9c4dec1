//! Refuses to build an AMI whose name is taken in the build region or any
//! copy region: image versions are immutable, and EC2 would only notice at
//! CreateImage (or, for a copy, at the very end). Runs in preflight, before
//! anything is created, and again as the first step, in case another run
//! took the name in between.

use super::client::{AwsError, AwsResultExt, filter};
use super::{Ec2State, Plan};
use async_trait::async_trait;
use futures_util::future::try_join_all;
use imgbuild_core::{Step, StepContext, StepError};
use std::sync::Arc;

/// AMIs this account owns named `name` in `region`, as (id, state).
pub async fn find_by_name(
    client: &aws_sdk_ec2::Client,
    region: &str,
    name: &str,
) -> Result<Vec<(String, String)>, AwsError> {
    let output = client
        .describe_images()
        .owners("self")
        .filters(filter("name", name))
        .send()
        .await
        .aws("DescribeImages", region)?;
    Ok(output
        .images()
        .iter()
        // The name filter is a wildcard pattern; `*` and `?` are not allowed
        // in AMI names, but compare exactly all the same.
        .filter(|image| image.name() == Some(name))
        .filter_map(|image| {
            let id = image.image_id()?.to_owned();
            let state = image
                .state()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default();
            Some((id, state))
        })
        .collect())
}

pub async fn refuse_existing(plan: &Plan) -> Result<(), StepError> {
    let regions: Vec<&String> = std::iter::once(&plan.region)
        .chain(&plan.copy_regions)
        .collect();
    let lookups = regions.iter().map(|region| async move {
        let client = plan.clients.get(region);
        find_by_name(&client, region, &plan.ami_name)
            .await
            .map(|found| {
                found
                    .into_iter()
                    .map(|(id, state)| format!("{id} in {region} ({state})"))
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
