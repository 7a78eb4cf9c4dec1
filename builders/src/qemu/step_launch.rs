//! Starts QEMU: the build disk, the cloud-init seed, user-mode networking
//! with SSH forwarded to a free loopback port, the serial console captured
//! to a bounded file (see `serial_log`), no display.
//!
//! Uses `state.work_dir`, `state.disk` and `state.seed`. Produces
//! `state.machine`; cleanup stops QEMU.

use super::QemuState;
use super::accel;
use super::config::Firmware;
use super::plan::Plan;
use super::serial_log;
use crate::common::process::{self, ProcessIdentity};
use crate::common::tracked::{record, release};
use async_trait::async_trait;
use imgbuild_core::{CleanupOutcome, Resource, ResourceId, Step, StepContext, StepError};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

const STDERR_LINES_KEPT: usize = 30;
const SERIAL_LINES_SHOWN: usize = 25;

/// A running (or exited) QEMU process.
#[derive(Clone)]
pub struct Machine {
    pub pid: i32,
    /// The pid with its start time: only this process is ever signalled.
    pub identity: ProcessIdentity,
    pub ssh_port: u16,
    pub serial_log: PathBuf,
    pub started: std::time::Instant,
    exit: watch::Receiver<Option<String>>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
}

impl Machine {
    /// Why the machine cannot come up any more, if it cannot: QEMU exited, or
    /// KVM reported an internal error (QEMU then pauses instead of exiting).
    pub fn failure(&self) -> Option<String> {
        let stderr = self.stderr_text();
        if let Some(status) = self.exit.borrow().clone() {
            return Some(format!("QEMU exited ({status}): {stderr}"));
        }
        if accel::is_kvm_failure(&stderr) {
            return Some(format!("QEMU reported: {stderr}"));
        }
        None
    }

    pub fn has_exited(&self) -> bool {
        self.exit.borrow().is_some()
    }

    pub async fn wait_exit(&self, limit: Duration) -> bool {
        let mut exit = self.exit.clone();
        tokio::time::timeout(limit, exit.wait_for(|status| status.is_some()))
            .await
            .is_ok()
    }

    fn stderr_text(&self) -> String {
        let tail = self.stderr_tail.lock().expect("stderr lock poisoned");
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// The end of the serial console, for errors about a boot that went wrong.
    pub fn serial_tail(&self) -> String {
        let lines = serial_log::last_lines(&self.serial_log, SERIAL_LINES_SHOWN);
        if lines.is_empty() {
            return "(the serial console printed nothing)".to_owned();
        }
        format!(
            "last lines of the serial console ({}):\n    {}",
            self.serial_log.display(),
            lines.join("\n    ")
        )
    }
}

pub struct StepLaunch {
    plan: Arc<Plan>,
    process: Option<(ResourceId, Machine)>,
}

impl StepLaunch {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepLaunch {
            plan,
            process: None,
        }
    }

    fn command_line(
        &self,
        state: &QemuState,
        work_dir: &Path,
        port: u16,
        marker: &str,
    ) -> Result<Vec<String>, StepError> {
        let config = &self.plan.config;
        let disk = state
            .disk
            .as_ref()
            .ok_or_else(|| StepError::failed("no build disk"))?;
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("{marker},process={marker}"),
            "-machine".into(),
            config.machine.clone(),
        ];
        args.extend(accel::qemu_args(self.plan.accelerator));
        args.extend([
            "-m".into(),
            config.memory.to_string(),
            "-smp".into(),
            config.cpus.to_string(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-pidfile".into(),
            work_dir.join("qemu.pid").display().to_string(),
            "-drive".into(),
            format!(
                "file={},if=virtio,format=qcow2,cache=writeback,discard=unmap,detect-zeroes=unmap",
                disk.display()
            ),
            "-netdev".into(),
            format!("user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22"),
            "-device".into(),
            "virtio-net-pci,netdev=net0".into(),
        ]);
        if let Some(seed) = &state.seed {
            args.extend([
                "-drive".into(),
                format!("file={},if=virtio,format=raw,readonly=on", seed.display()),
            ]);
        }
        if config.firmware == Firmware::Uefi {
            let vars = work_dir.join("OVMF_VARS.fd");
            std::fs::copy(&config.ovmf_vars, &vars).map_err(|err| {
                StepError::failed(format!("cannot copy {}: {err}", config.ovmf_vars.display()))
            })?;
            args.extend([
                "-drive".into(),
                format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    config.ovmf_code.display()
                ),
                "-drive".into(),
                format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
            ]);
        }
        if let Some(kernel) = &self.plan.kernel {
            args.extend(["-kernel".into(), kernel.display().to_string()]);
            if let Some(initrd) = &self.plan.initrd {
                args.extend(["-initrd".into(), initrd.display().to_string()]);
            }
            if let Some(kernel_args) = &config.kernel_args {
                args.extend(["-append".into(), kernel_args.clone()]);
            }
        }
        args.extend(serial_log::qemu_args(&work_dir.join("serial.log")));
        args.extend(config.qemu_args.iter().cloned());
        Ok(args)
    }

    async fn spawn(
        &mut self,
        state: &QemuState,
        cx: &StepContext,
        work_dir: &Path,
    ) -> Result<Machine, StepError> {
        let port = free_loopback_port()
            .map_err(|err| StepError::failed(format!("cannot find a free loopback port: {err}")))?;
        let marker = format!("imgbuild-{}-{}", cx.run_id, cx.build_name());
        let args = self.command_line(state, work_dir, port, &marker)?;
        let serial = work_dir.join("serial.log");
        serial_log::create(&serial).map_err(|err| {
            StepError::failed(format!("cannot create {}: {err}", serial.display()))
        })?;
        let pidfile = work_dir.join("qemu.pid");
        let description = format!("QEMU for build {}", cx.build_name());
        let id = record(
            cx,
            Resource::Process {
                pidfile: pidfile.clone(),
                description: description.clone(),
                pid: None,
                start_time: None,
            },
        )?;
        let mut child = Command::new(&self.plan.config.qemu_binary)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|err| {
                let _ = release(cx, id);
                StepError::failed(format!(
                    "cannot start {} ({err}); install Debian's `qemu-system-x86` package or set `qemu_binary`",
                    self.plan.config.qemu_binary
                ))
            })?;
        let pid = child.id().map(|p| p as i32).unwrap_or(-1);
        // Not reaped before the wait task below runs, so the pid cannot have
        // been recycled yet: this is QEMU's start time.
        let Some(identity) = ProcessIdentity::of(pid) else {
            let _ = child.start_kill();
            let _ = child.wait().await;
            let _ = release(cx, id);
            return Err(StepError::failed(format!(
                "cannot read /proc/{pid}/stat of the QEMU just started; is /proc mounted?"
            )));
        };
        let recorded = Resource::Process {
            pidfile,
            description,
            pid: Some(identity.pid),
            start_time: Some(identity.start_time),
        };
        if let Err(err) = cx.journal.update(id, recorded) {
            // Unrecorded, it could not be told apart from a recycled pid
            // later: stop it now rather than leave it running.
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(StepError::failed(err));
        }
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(stderr) = child.stderr.take() {
            let tail = stderr_tail.clone();
            let log = cx.log.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    log.output(imgbuild_core::Stream::Stderr, &format!("qemu: {line}"));
                    let mut tail = tail.lock().expect("stderr lock poisoned");
                    if tail.len() == STDERR_LINES_KEPT {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
            });
        }
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(err) => format!("unknown status: {err}"),
            };
            let _ = exit_tx.send(Some(status));
        });
        serial_log::keep_bounded(serial.clone(), exit_rx.clone());
        let machine = Machine {
            pid,
            identity,
            ssh_port: port,
            serial_log: serial,
            started: std::time::Instant::now(),
            exit: exit_rx,
            stderr_tail,
        };
        self.process = Some((id, machine.clone()));
        Ok(machine)
    }
}

/// Asks the kernel for a free port. Another process can take it before QEMU
/// binds it; QEMU then exits at once and the launch is retried.
fn free_loopback_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

#[async_trait]
impl Step<QemuState> for StepLaunch {
    fn name(&self) -> &'static str {
        "launch"
    }

    async fn run(&mut self, state: &mut QemuState, cx: &StepContext) -> Result<(), StepError> {
        let work_dir = state
            .work_dir
            .clone()
            .ok_or_else(|| StepError::failed("no working directory"))?;
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let machine = self.spawn(state, cx, &work_dir).await?;
            // QEMU fails within milliseconds when the forwarded port was
            // taken in the meantime; anything later is the guest's business.
            let exited = machine.wait_exit(Duration::from_millis(300)).await;
            if exited {
                let failure = machine.failure().unwrap_or_default();
                if let Some((id, _)) = self.process.take() {
                    release(cx, id)?;
                }
                let port_taken = failure.contains("hostfwd") || failure.contains("host forwarding");
                if port_taken && attempt < ATTEMPTS {
                    continue;
                }
                return Err(StepError::failed(failure));
            }
            cx.log.info(format!(
                "QEMU started ({}, pid {}), SSH forwarded from 127.0.0.1:{}",
                self.plan.accelerator, machine.pid, machine.ssh_port
            ));
            state.machine = Some(machine);
            return Ok(());
        }
        unreachable!("the loop returns on its last attempt")
    }

    async fn cleanup(
        &mut self,
        _state: &mut QemuState,
        cx: &StepContext,
        _outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        let Some((id, machine)) = self.process.take() else {
            return Ok(());
        };
        if !machine.has_exited() {
            process::terminate(machine.identity, Duration::from_secs(10)).await;
            if !machine.wait_exit(Duration::from_secs(5)).await {
                return Err(StepError::failed(format!(
                    "QEMU (pid {}) did not exit; it stays recorded in the run journal for `imgbuild clean`",
                    machine.pid
                )));
            }
        }
        release(cx, id)
    }
}
