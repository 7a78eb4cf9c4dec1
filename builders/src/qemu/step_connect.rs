//! Waits for the VM's SSH server through the forwarded port and logs in.

use super::QemuState;
use super::config::QemuConfig;
use crate::common::ssh;
use async_trait::async_trait;
use imgbuild_core::{CleanupOutcome, Step, StepContext, StepError};
use imgbuild_provisioners::ssh::{Liveness, SshTarget};
use std::path::PathBuf;
use std::sync::Arc;

pub struct StepConnect {
    config: Arc<QemuConfig>,
    config_dir: PathBuf,
}

impl StepConnect {
    pub fn new(config: Arc<QemuConfig>, config_dir: PathBuf) -> Self {
        StepConnect { config, config_dir }
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
        let watched = machine.clone();
        let liveness: Liveness = Arc::new(move || watched.failure());
        let target = SshTarget {
            host: "127.0.0.1".to_owned(),
            port: machine.ssh_port,
        };
        let result = ssh::connect(
            &self.config.ssh,
            &self.config_dir,
            target,
            state.ssh_key.as_deref(),
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
