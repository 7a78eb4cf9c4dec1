//! Shares every AMI the build made (the original and each copy) with
//! `ami_users` and `ami_groups`. Launch permissions are per AMI and per
//! region, and CopyImage does not carry them over.

use super::client::AwsResultExt;
use super::{Ec2State, Plan};
use async_trait::async_trait;
use aws_sdk_ec2::types::{LaunchPermission, LaunchPermissionModifications, PermissionGroup};
use futures_util::future::try_join_all;
use imgbuild_core::{Step, StepContext, StepError};
use std::sync::Arc;

pub struct StepLaunchPermissions {
    plan: Arc<Plan>,
}

impl StepLaunchPermissions {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepLaunchPermissions { plan }
    }

    fn permissions(&self) -> Vec<LaunchPermission> {
        let config = &self.plan.config;
        let users = config
            .ami_users
            .iter()
            .map(|user| LaunchPermission::builder().user_id(user).build());
        let groups = config.ami_groups.iter().map(|group| {
            LaunchPermission::builder()
                .group(PermissionGroup::from(group.as_str()))
                .build()
        });
        users.chain(groups).collect()
    }
}

#[async_trait]
impl Step<Ec2State> for StepLaunchPermissions {
    fn name(&self) -> &'static str {
        "launch_permissions"
    }

    async fn run(&mut self, state: &mut Ec2State, cx: &StepContext) -> Result<(), StepError> {
        let permissions = self.permissions();
        if permissions.is_empty() {
            return Ok(());
        }
        let plan = &self.plan;
        let shares = state.amis.iter().map(|(region, ami)| {
            let permissions = permissions.clone();
            async move {
                plan.clients
                    .get(region)
                    .modify_image_attribute()
                    .image_id(&ami.image_id)
                    .launch_permission(
                        LaunchPermissionModifications::builder()
                            .set_add(Some(permissions))
                            .build(),
                    )
                    .send()
                    .await
                    .aws("ModifyImageAttribute", region)
                    .map(|_| ())
            }
        });
        try_join_all(shares).await?;
        let mut whom: Vec<String> = plan
            .config
            .ami_users
            .iter()
            .map(|u| format!("account {u}"))
            .collect();
        if plan.config.ami_groups.iter().any(|g| g == "all") {
            whom.push("everyone (public)".to_owned());
        }
        cx.log.info(format!(
            "{} AMI(s) may be launched by {}",
            state.amis.len(),
            whom.join(", ")
        ));
        Ok(())
    }
}
