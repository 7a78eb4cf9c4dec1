//! Waits for the VM's SSH server through the forwarded port and logs in.
//!
//! Uses `state.machine`, `state.ssh_key` and `state.warm`. Produces
//! `state.communicator`, which cleanup drops, unless the launch already
//! logged in to a restored machine (a restore counts only once the machine
//! lets the build in; see `step_launch`).

use super::QemuState;
use super::plan::Plan;
use super::step_launch::Machine;
use crate::common::ssh::{self, LoginError};
use async_trait::async_trait;
use imgbuild_core::{CleanupOutcome, Step, StepContext, StepError};
use imgbuild_provisioners::ssh::{Liveness, SshCommunicator, SshTarget};
use std::sync::Arc;
use std::time::Duration;

/// How long a restored machine may take to let the build in before it is
/// given up for a boot. Its SSH server was already running when its state
/// was saved, so it answers within seconds (2.8 s under TCG here), and a
/// credential it rejects will stay rejected.
const RESTORED_LOGIN_LIMIT: Duration = Duration::from_secs(60);

pub struct StepConnect {
    plan: Arc<Plan>,
}

impl StepConnect {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepConnect { plan }
    }
}

/// Logs in to `machine`: a booted one as patiently as `ssh.timeout` says, a
/// restored one (`state.warm`) with its saved state's key and only briefly.
/// Failures carry the serial console's last lines.
pub async fn log_in(
    plan: &Plan,
    state: &QemuState,
    machine: &Machine,
    cx: &StepContext,
) -> Result<SshCommunicator, LoginError> {
    let restored = state.warm.as_ref().is_some_and(|warm| warm.restored);
    // A restored machine trusts its saved state's key, not this build's
    // (see `warm_start`).
    let login_key = state.warm.as_ref().and_then(|warm| warm.login_key());
    let mut wait = plan.config.ssh.wait_options();
    if restored {
        wait.timeout = wait.timeout.min(RESTORED_LOGIN_LIMIT);
        wait.rejection_limit = Duration::ZERO;
    }
    let watched = machine.clone();
    let liveness: Liveness = Arc::new(move || watched.failure());
    let target = SshTarget {
        host: "127.0.0.1".to_owned(),
        port: machine.ssh_port,
    };
    let result = ssh::connect(
        &plan.config.ssh,
        &plan.config_dir,
        target,
        login_key.as_deref().or(state.ssh_key.as_deref()),
        wait,
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
            Ok(communicator)
        }
        Err(err) => {
            let with_tail = |message: String| format!("{message}\n{}", machine.serial_tail());
            Err(match err {
                LoginError::Rejected(message) => LoginError::Rejected(with_tail(message)),
                LoginError::Failed(message) => LoginError::Failed(with_tail(message)),
                LoginError::Cancelled => LoginError::Cancelled,
            })
        }
    }
}

#[async_trait]
impl Step<QemuState> for StepConnect {
    fn name(&self) -> &'static str {
        "connect"
    }

    async fn run(&mut self, state: &mut QemuState, cx: &StepContext) -> Result<(), StepError> {
        if state.communicator.is_some() {
            return Ok(());
        }
        let machine = state
            .machine
            .clone()
            .ok_or_else(|| StepError::failed("the VM is not running"))?;
        let communicator = log_in(&self.plan, state, &machine, cx).await?;
        state.communicator = Some(Arc::new(communicator));
        Ok(())
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
