//! Shares every AMI the build made (the original and each copy) with
//! `ami_users` and `ami_groups`. Launch permissions are per AMI and per
//! region, and CopyImage does not carry them over.

use super::{Ec2State, Plan};
use async_trait::async_trait;
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
}

#[async_trait]
impl Step<Ec2State> for StepLaunchPermissions {
    fn name(&self) -> &'static str {
        "launch_permissions"
    }

    async fn run(&mut self, state: &mut Ec2State, cx: &StepContext) -> Result<(), StepError> {
        let plan = &self.plan;
        let (users, groups) = (&plan.config.ami_users, &plan.config.ami_groups);
        if users.is_empty() && groups.is_empty() {
            return Ok(());
        }
        let shares = state.amis.iter().map(|(region, ami)| async move {
            plan.api_in(region)
                .add_launch_permissions(&ami.image_id, users, groups)
                .await
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::ec2::AmiInfo;
    use crate::ec2::api::fake::{FakeEc2, plan};

    fn amis(regions: &[(&str, &str)]) -> Ec2State {
        let mut state = Ec2State::default();
        for (region, image_id) in regions {
            state.amis.insert(
                (*region).to_owned(),
                AmiInfo {
                    image_id: (*image_id).to_owned(),
                    snapshot_ids: Vec::new(),
                },
            );
        }
        state
    }

    #[tokio::test]
    async fn every_ami_in_every_region_is_shared_with_the_listed_accounts() {
        let fake = FakeEc2::new("eu-west-1");
        let settings = serde_json::json!({
            "ami_regions": ["us-west-2"],
            "ami_users": ["123456789012", "210987654321"],
            "ami_groups": ["all"],
        });
        let test = TestContext::new("app");
        let mut state = amis(&[("eu-west-1", "ami-home"), ("us-west-2", "ami-copy")]);
        StepLaunchPermissions::new(plan(settings, &fake))
            .run(&mut state, &test.cx)
            .await
            .unwrap();
        let whom = vec![
            "123456789012".to_owned(),
            "210987654321".to_owned(),
            "all".to_owned(),
        ];
        let shared = fake.world.lock().unwrap().launch_permissions.clone();
        assert_eq!(
            shared.into_iter().collect::<Vec<_>>(),
            [
                (
                    ("eu-west-1".to_owned(), "ami-home".to_owned()),
                    whom.clone()
                ),
                (("us-west-2".to_owned(), "ami-copy".to_owned()), whom),
            ]
        );
    }

    #[tokio::test]
    async fn nobody_listed_means_no_call() {
        let fake = FakeEc2::new("eu-west-1");
        let test = TestContext::new("app");
        let mut state = amis(&[("eu-west-1", "ami-home")]);
        StepLaunchPermissions::new(plan(serde_json::json!({}), &fake))
            .run(&mut state, &test.cx)
            .await
            .unwrap();
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    }

    #[tokio::test]
    async fn a_refused_share_fails_the_step_naming_the_region() {
        let fake = FakeEc2::new("eu-west-1");
        let settings = serde_json::json!({
            "ami_regions": ["us-west-2"],
            "ami_users": ["123456789012"],
        });
        let test = TestContext::new("app");
        let mut state = amis(&[("eu-west-1", "ami-home"), ("us-west-2", "ami-copy")]);
        fake.at("us-west-2").fail_next(
            "ModifyImageAttribute",
            Some("InvalidUserID.Malformed"),
            Some(400),
        );
        let err = StepLaunchPermissions::new(plan(settings, &fake))
            .run(&mut state, &test.cx)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("EC2 ModifyImageAttribute in us-west-2 failed: InvalidUserID.Malformed"),
            "{err}"
        );
    }
}
