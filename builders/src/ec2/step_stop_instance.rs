//! Stops the instance through the EC2 API, so its volumes are quiescent
//! when snapshotted, after taking the temporary key back out of the
//! machine's `authorized_keys` (cloud-init put it there from the key pair;
//! an image must not trust a build's key).

use super::poll::{InstanceTarget, wait_for_instance};
use super::{Ec2State, Plan};
use async_trait::async_trait;
use imgbuild_core::{Step, StepContext, StepError};
use imgbuild_provisioners::communicator::LogLines;
use imgbuild_provisioners::shell::shell_quote;
use std::sync::Arc;

pub struct StepStopInstance {
    plan: Arc<Plan>,
}

impl StepStopInstance {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepStopInstance { plan }
    }
}

#[async_trait]
impl Step<Ec2State> for StepStopInstance {
    fn name(&self) -> &'static str {
        "stop_instance"
    }

    async fn run(&mut self, state: &mut Ec2State, cx: &StepContext) -> Result<(), StepError> {
        let instance_id = state
            .instance
            .as_ref()
            .map(|i| i.id.clone())
            .ok_or_else(|| StepError::failed("the instance is not running"))?;
        if let (Some(comm), Some(key)) = (state.communicator.take(), &state.temporary_key) {
            let forget_key = format!(
                "f=\"$HOME/.ssh/authorized_keys\"; [ -f \"$f\" ] && grep -vF {} \"$f\" > \"$f.imgbuild\"; [ -f \"$f.imgbuild\" ] && cat \"$f.imgbuild\" > \"$f\" && rm -f \"$f.imgbuild\"; true",
                shell_quote(
                    key.public_openssh()
                        .split_whitespace()
                        .nth(1)
                        .unwrap_or("-")
                )
            );
            comm.exec(&forget_key, &LogLines(&cx.log))
                .await
                .map_err(|err| {
                    StepError::failed(format!("cannot remove the build key from the image: {err}"))
                })?;
        }
        // The SSH session must be closed before the machine goes down.
        state.communicator = None;

        let api = self.plan.api();
        cx.log.info(format!("stopping instance {instance_id}"));
        api.stop_instance(&instance_id).await?;
        wait_for_instance(
            api.as_ref(),
            &instance_id,
            InstanceTarget::Stopped,
            self.plan.instance_timeout(),
            Some(&cx.log),
        )
        .await?;
        cx.log.info(format!("instance {instance_id} is stopped"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::ec2::InstanceInfo;
    use crate::ec2::api::fake::{FakeEc2, plan};

    #[tokio::test(start_paused = true)]
    async fn the_instance_is_stopped_through_the_api_and_waited_for() {
        let fake = FakeEc2::new("eu-west-1");
        fake.with_instance("eu-west-1", "i-build", Default::default());
        let test = TestContext::new("app");
        let mut state = Ec2State {
            instance: Some(InstanceInfo {
                id: "i-build".to_owned(),
                public_ip: None,
                private_ip: None,
                public_dns: None,
                private_dns: None,
            }),
            ..Ec2State::default()
        };
        StepStopInstance::new(plan(serde_json::json!({}), &fake))
            .run(&mut state, &test.cx)
            .await
            .unwrap();
        assert_eq!(
            fake.calls(),
            [
                "eu-west-1 StopInstances i-build",
                "eu-west-1 DescribeInstances i-build"
            ]
        );
        assert_eq!(
            fake.instance_state("eu-west-1", "i-build").as_deref(),
            Some("stopped")
        );
    }

    #[tokio::test]
    async fn without_an_instance_nothing_is_called() {
        let fake = FakeEc2::new("eu-west-1");
        let test = TestContext::new("app");
        let err = StepStopInstance::new(plan(serde_json::json!({}), &fake))
            .run(&mut Ec2State::default(), &test.cx)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not running"), "{err}");
        assert!(fake.calls().is_empty());
    }
}
