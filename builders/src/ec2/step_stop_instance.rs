//! Stops the instance through the EC2 API, so its volumes are quiescent
//! when snapshotted, after taking the temporary key back out of the
//! machine's `authorized_keys` (cloud-init put it there from the key pair;
//! an image must not trust a build's key).

use super::client::AwsResultExt;
use super::poll::{InstanceTarget, wait_for_instance};
use super::{Ec2State, Plan};
use async_trait::async_trait;
use imgbuild_core::{BuildLog, Step, StepContext, StepError, Stream};
use imgbuild_provisioners::OutputSink;
use imgbuild_provisioners::shell::shell_quote;
use std::sync::Arc;

/// Remote output goes to the build log.
struct LogLines<'a>(&'a BuildLog);

impl OutputSink for LogLines<'_> {
    fn line(&self, stream: Stream, line: &str) {
        self.0.output(stream, line);
    }
}

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

        let region = &self.plan.region;
        let client = self.plan.client();
        cx.log.info(format!("stopping instance {instance_id}"));
        client
            .stop_instances()
            .instance_ids(&instance_id)
            .send()
            .await
            .aws("StopInstances", region)?;
        wait_for_instance(
            &client,
            region,
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
