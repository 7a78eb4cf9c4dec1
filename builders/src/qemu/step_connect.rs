//! Waits for the VM's SSH server through the forwarded port and logs in.
//!
//! Uses `state.machine`, `state.ssh_key` and `state.warm`. Produces
//! `state.communicator`, which cleanup drops.

use super::QemuState;
use super::plan::Plan;
use crate::common::ssh;
use async_trait::async_trait;
use imgbuild_core::{CleanupOutcome, Step, StepContext, StepError};
use imgbuild_provisioners::ssh::{Liveness, SshTarget};
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
impl Step<QemuState> for StepConnect {
    fn name(&self) -> &'static str {
        "connect"
    }

    async fn run(&mut self, state: &mut QemuState, cx: &StepContext) -> Result<(), StepError> {
        let machine = state
            .machine
            .clone()
            .ok_or_else(|| StepError::failed("the VM is not running"))?;
        // A restored machine trusts its saved state's key, not this build's
        // (see `warm_start`).
        let login_key = state.warm.as_ref().and_then(|warm| warm.login_key());
        let watched = machine.clone();
        let liveness: Liveness = Arc::new(move || watched.failure());
        let target = SshTarget {
            host: "127.0.0.1".to_owned(),
            port: machine.ssh_port,
        };
        let result = ssh::connect(
            &self.plan.config.ssh,
            &self.plan.config_dir,
            target,
            login_key.as_deref().or(state.ssh_key.as_deref()),
            cx,
            Some(liveness),
        )
        .await;
        match result {
            Ok(communicator) => {
                cx.log.info(format!(
                    "connected over SSH {:.1}s after QEMU started",
                    machine.started.elapsed().as_secs_f64()
                ));
                state.communicator = Some(Arc::new(communicator));
                Ok(())
            }
            Err(StepError::Cancelled) => Err(StepError::Cancelled),
            Err(StepError::Failed(message)) => Err(StepError::Failed(format!(
                "{message}\n{}",
                machine.serial_tail()
            ))),
        }
    }

    async fn cleanup(
        &mut self,
        state: &mut QemuState,
        _cx: &StepContext,
        _outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        state.communicator = None;
        Ok(())
    }
}
