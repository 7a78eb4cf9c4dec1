//! Gives the provisioners a way into the build container: the Engine exec
//! and archive APIs, with the builder's `env` on every command.
//!
//! Uses `state.engine` and `state.container`. Produces
//! `state.communicator`, which cleanup drops.

use super::DockerState;
use super::communicator::DockerCommunicator;
use super::plan::Plan;
use async_trait::async_trait;
use imgbuild_core::{CleanupOutcome, Step, StepContext, StepError};
use imgbuild_provisioners::Communicator;
use std::sync::Arc;

pub struct StepConnect {
    plan: Arc<Plan>,
}

impl StepConnect {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepConnect { plan }
    }
}

#[async_trait]
impl Step<DockerState> for StepConnect {
    fn name(&self) -> &'static str {
        "connect"
    }

    async fn run(&mut self, state: &mut DockerState, cx: &StepContext) -> Result<(), StepError> {
        let container = state
            .container
            .as_ref()
            .ok_or_else(|| StepError::failed("the build container is not running"))?;
        let communicator = DockerCommunicator::new(
            state.engine.clone(),
            container.id.clone(),
            &container.name,
            self.plan.exec_env.clone(),
            container.working_dir.clone(),
            &container.user,
        );
        // The container may have stopped since it started: say so here, not
        // as a puzzling failure of the first provisioner.
        communicator.reconnect().await.map_err(StepError::failed)?;
        cx.log.info(format!(
            "commands run in {} through the Docker exec API, starting in {}",
            communicator.target(),
            container.working_dir
        ));
        state.communicator = Some(Arc::new(communicator));
        Ok(())
    }

    async fn cleanup(
        &mut self,
        state: &mut DockerState,
        _cx: &StepContext,
        _outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        state.communicator = None;
        Ok(())
    }
}
