//! Powers the VM off from inside with `shutdown_command`, so the guest
//! flushes its file systems, then waits for QEMU to exit.
//!
//! Uses `state.machine`, `state.ssh_key`, and takes `state.communicator`
//! (the connection ends with the machine). Produces nothing.

use super::QemuState;
use super::plan::Plan;
use super::step_cache;
use super::step_cloud_init::cleanup_script;
use crate::common::{file_listing, process};
use async_trait::async_trait;
use imgbuild_core::{Step, StepContext, StepError};
use imgbuild_provisioners::CommError;
use imgbuild_provisioners::shell::shell_quote;
use imgbuild_provisioners::ssh::TemporaryKey;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub struct StepShutdown {
    plan: Arc<Plan>,
    /// `build --check-reproducible`: list the machine's files here, after
    /// the build key and the cloud-init seed's changes are gone, so the
    /// listing is of what the image keeps.
    list_files: Option<PathBuf>,
}

impl StepShutdown {
    pub fn new(plan: Arc<Plan>, list_files: Option<PathBuf>) -> Self {
        StepShutdown { plan, list_files }
    }
}

pub use imgbuild_provisioners::communicator::LogLines;

/// A command for the build user that stops trusting `key`.
pub fn forget_key_command(key: &TemporaryKey) -> String {
    format!(
        "f=\"$HOME/.ssh/authorized_keys\"; [ -f \"$f\" ] && grep -vF {} \"$f\" > \"$f.imgbuild\"; [ -f \"$f.imgbuild\" ] && cat \"$f.imgbuild\" > \"$f\" && rm -f \"$f.imgbuild\"; true",
        shell_quote(
            key.public_openssh()
                .split_whitespace()
                .nth(1)
                .unwrap_or("-")
        )
    )
}

/// A command for the build user that trusts `key` (again).
pub fn trust_key_command(key: &TemporaryKey) -> String {
    format!(
        "mkdir -p \"$HOME/.ssh\" && chmod 700 \"$HOME/.ssh\" && printf '%s\\n' {} >> \"$HOME/.ssh/authorized_keys\" && chmod 600 \"$HOME/.ssh/authorized_keys\"",
        shell_quote(key.public_openssh())
    )
}

#[async_trait]
impl Step<QemuState> for StepShutdown {
    fn name(&self) -> &'static str {
        "shutdown"
    }

    async fn run(&mut self, state: &mut QemuState, cx: &StepContext) -> Result<(), StepError> {
        let machine = state
            .machine
            .clone()
            .ok_or_else(|| StepError::failed("the VM is not running"))?;
        let comm = state
            .communicator
            .take()
            .ok_or_else(|| StepError::failed("no connection to the VM"))?;
        if let Some(key) = &state.ssh_key {
            // The build's key must not stay trusted in the image it produced.
            comm.exec(&forget_key_command(key), &LogLines(&cx.log))
                .await
                .map_err(|err| {
                    StepError::failed(format!("cannot remove the build key from the image: {err}"))
                })?;
        }
        let config = &self.plan.config;
        let command = config.shutdown_command();
        let mut run = command.clone();
        let mut listing = None;
        if config.cloud_init && config.cloud_init_cleanup {
            cx.log
                .info("removing what the cloud-init seed set up for the build");
            let ssh = &config.ssh;
            let as_root = if ssh.username == "root" { "" } else { "sudo " };
            // In one root shell with the shutdown: the cleanup takes away
            // the build user's sudo. A listing goes between them, so that
            // it lists what the image keeps.
            let then = match &self.list_files {
                Some(to) => {
                    cx.log.info("listing the machine's files and their hashes, to compare with the other build");
                    listing = Some(to);
                    format!("{}; {command}", file_listing::script())
                }
                None => command.clone(),
            };
            let script = cleanup_script(&ssh.username, ssh.password.is_some(), &then);
            run = format!("{as_root}sh -c {}", shell_quote(&script));
        } else if let Some(to) = &self.list_files {
            file_listing::take_logged(comm.as_ref(), to, &[], &cx.log).await?;
        }
        cx.log.info(format!("shutting down with `{command}`"));
        if let Some(to) = listing {
            // The shutdown's own errors end the listing's decoding too.
            let listed = file_listing::ListingOutput::new(&cx.log)
                .run(comm.as_ref(), &run, to, &[])
                .await
                .map_err(|err| StepError::failed(err.to_string()))?;
            cx.log.info(format!("listed {listed} paths"));
        } else {
            match comm.exec(&run, &LogLines(&cx.log)).await {
                Ok(_) | Err(CommError::Disconnected { .. }) => {}
                Err(err) => return Err(StepError::failed(format!("`{command}` failed: {err}"))),
            }
        }
        drop(comm);
        let limit = config.shutdown_timeout;
        let exited = cx
            .cancellable(async { Ok(machine.wait_exit(limit).await) })
            .await?;
        if !exited {
            return Err(StepError::failed(format!(
                "the VM did not power off within {} of `{command}`; check the command, or raise `shutdown_timeout`\n{}",
                humantime::format_duration(limit),
                machine.serial_tail()
            )));
        }
        cx.log.info("the VM powered off");
        // Belt and braces: the pid must not linger as ours.
        process::terminate(machine.identity, Duration::from_secs(1)).await;
        step_cache::keep_final(state, cx).await;
        Ok(())
    }
}
