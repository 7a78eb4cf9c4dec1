//! Starts QEMU: the build disk, the cloud-init seed, user-mode networking
//! with SSH forwarded to a free loopback port, the serial console captured
//! to a bounded file (see `serial_log`), no display.
//!
//! With a saved machine state to restore (`state.warm`), QEMU loads it
//! (`-incoming`) and runs it on, and the build logs in to it at once; a
//! state that does not load, or whose machine does not let the build in, is
//! discarded, and the machine boots on a fresh disk instead.
//!
//! Uses `state.work_dir`, `state.disk`, `state.seed` and `state.warm`.
//! Produces `state.machine`, and `state.communicator` for a restored
//! machine; cleanup stops QEMU.

use super::QemuState;
use super::accel;
use super::config::Firmware;
use super::first_line;
use super::plan::Plan;
use super::serial_log;
use super::step_connect;
use super::step_create_disk::create_disk;
use super::warm_start;
use crate::common::process::{self, ProcessIdentity};
use crate::common::ssh::LoginError;
use crate::common::tracked::{TrackedPath, record, release};
use async_trait::async_trait;
use imgbuild_core::{CleanupOutcome, Resource, ResourceId, Step, StepContext, StepError};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

const STDERR_LINES_KEPT: usize = 30;
/// The build disk's name in QEMU, for QMP commands on it.
pub const DRIVE_ID: &str = "disk0";
/// The longest unix socket path the kernel binds (`sun_path`, 108 bytes
/// with its terminating zero).
const SOCKET_PATH_MAX: usize = 107;
const SERIAL_LINES_SHOWN: usize = 25;

/// A running (or exited) QEMU process.
#[derive(Clone)]
pub struct Machine {
    pub pid: i32,
    /// The pid with its start time: only this process is ever signalled.
    pub identity: ProcessIdentity,
    pub ssh_port: u16,
    pub serial_log: PathBuf,
    /// QEMU's monitor socket (QMP), when the working directory's path is
    /// short enough for one.
    pub qmp: Option<PathBuf>,
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
    /// The monitor socket's own directory, when the working directory's
    /// path is too long to hold it.
    monitor_dir: Option<TrackedPath>,
}

impl StepLaunch {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepLaunch {
            plan,
            process: None,
            monitor_dir: None,
        }
    }

    fn command_line(
        &self,
        state: &QemuState,
        work_dir: &Path,
        port: u16,
        marker: &str,
        qmp: Option<&Path>,
        incoming: Option<&Path>,
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
                "id={DRIVE_ID},file={},if=virtio,format=qcow2,cache=writeback,discard=unmap,detect-zeroes=unmap",
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
            // A restore needs no saved copy: the flash's contents are
            // guest RAM to QEMU, in the state, written back here on resume.
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
        if let Some(qmp) = qmp {
            args.extend([
                "-qmp".into(),
                format!("unix:{},server=on,wait=off", qmp.display()),
            ]);
        }
        args.extend(serial_log::qemu_args(&work_dir.join("serial.log")));
        if state.warm.is_some() {
            args.extend(warm_start::qemu_args(config));
        }
        if let Some(memory) = incoming {
            args.extend(["-incoming".into(), warm_start::incoming_arg(memory)]);
        }
        args.extend(config.qemu_args.iter().cloned());
        Ok(args)
    }

    /// Where QEMU's monitor socket goes: the private working directory, or,
    /// when that path is too long for a unix socket, a private directory of
    /// its own under the system's temporary directory. `None` (with a
    /// warning) when neither fits.
    fn monitor_socket(
        &mut self,
        work_dir: &Path,
        cx: &StepContext,
    ) -> Result<Option<PathBuf>, StepError> {
        let beside = work_dir.join("qmp.sock");
        if beside.as_os_str().len() <= SOCKET_PATH_MAX {
            return Ok(Some(beside));
        }
        let build = hex::encode(&Sha256::digest(cx.build_name().as_bytes())[..4]);
        let dir = std::env::temp_dir().join(format!("imgbuild-qmp-{}-{build}", cx.run_id));
        let socket = dir.join("qmp.sock");
        if socket.as_os_str().len() > SOCKET_PATH_MAX {
            cx.log.warn(format!(
                "{} is too long a path for QEMU's monitor socket: the build keeps no steps in the step cache; a shorter `output_dir` (or TMPDIR) avoids this",
                beside.display()
            ));
            return Ok(None);
        }
        let tracked = TrackedPath::dir(cx, dir.clone())?;
        self.monitor_dir = Some(tracked);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|err| StepError::failed(format!("cannot create {}: {err}", dir.display())))?;
        Ok(Some(socket))
    }

    async fn spawn(
        &mut self,
        state: &QemuState,
        cx: &StepContext,
        work_dir: &Path,
        qmp: Option<PathBuf>,
        incoming: Option<&Path>,
    ) -> Result<Machine, StepError> {
        let port = free_loopback_port()
            .map_err(|err| StepError::failed(format!("cannot find a free loopback port: {err}")))?;
        let marker = format!("imgbuild-{}-{}", cx.run_id, cx.build_name());
        if let Some(qmp) = &qmp {
            // A stale socket from an attempt whose QEMU exited at once.
            let _ = std::fs::remove_file(qmp);
        }
        let args = self.command_line(state, work_dir, port, &marker, qmp.as_deref(), incoming)?;
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
            qmp,
            started: std::time::Instant::now(),
            exit: exit_rx,
            stderr_tail,
        };
        self.process = Some((id, machine.clone()));
        Ok(machine)
    }
}

impl StepLaunch {
    /// Stops the QEMU this step started, if it still runs.
    async fn stop(&mut self, cx: &StepContext) -> Result<(), StepError> {
        if let Some((id, machine)) = self.process.take() {
            if !machine.has_exited() {
                process::terminate(machine.identity, Duration::from_secs(10)).await;
                if !machine.wait_exit(Duration::from_secs(5)).await {
                    return Err(StepError::failed(format!(
                        "QEMU (pid {}) did not exit; it stays recorded in the run journal for `imgbuild clean`",
                        machine.pid
                    )));
                }
            }
            release(cx, id)?;
        }
        Ok(())
    }

    /// Gives up the saved state (`why` it cannot be restored; `everywhere`
    /// when that is the state's fault, see `WarmStart::discard`) and makes
    /// the build disk a fresh one, for a normal boot.
    async fn boot_instead(
        &mut self,
        state: &mut QemuState,
        cx: &StepContext,
        why: &str,
        everywhere: bool,
    ) -> Result<(), StepError> {
        let Some(warm) = state.warm.as_mut() else {
            return Ok(());
        };
        cx.log.warn(format!(
            "the saved machine state cannot be restored ({why}): discarded; booting instead"
        ));
        warm.discard(everywhere, &cx.log).await;
        let (backing, backing_format) = (warm.backing.clone(), warm.backing_format.clone());
        let disk = state
            .disk
            .clone()
            .ok_or_else(|| StepError::failed("no build disk"))?;
        let _ = std::fs::remove_file(&disk);
        create_disk(
            state.qemu_img.as_ref(),
            &disk,
            &backing,
            &backing_format,
            &self.plan,
        )
        .await
    }
}

/// Whether a restored machine that did not let the build in costs its
/// state: `(why, everywhere)` to give the state up (`everywhere`: for every
/// runner, see `WarmStart::discard`), or the error the build stops with.
fn discard_after_failed_login(err: LoginError) -> Result<(String, bool), StepError> {
    match err {
        LoginError::Cancelled => Err(StepError::Cancelled),
        // The caller falls back to TCG; the state is not at fault.
        LoginError::Failed(message) if accel::is_kvm_failure(&message) => {
            Err(StepError::Failed(message))
        }
        // The key the state keeps no longer works: for anyone.
        LoginError::Rejected(message) => Ok((message, true)),
        // A busy host, a guest that died, a timeout: perhaps only here.
        LoginError::Failed(message) => Ok((message, false)),
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
        let qmp = self.monitor_socket(&work_dir, cx)?;
        if qmp.is_none() && state.warm.as_ref().is_some_and(|warm| warm.saved.is_some()) {
            self.boot_instead(
                state,
                cx,
                "QEMU gets no monitor socket to resume it through",
                false,
            )
            .await?;
        }
        const ATTEMPTS: usize = 3;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let incoming = state
                .warm
                .as_ref()
                .and_then(|warm| warm.saved.as_ref())
                .map(|saved| saved.memory.clone());
            let machine = self
                .spawn(state, cx, &work_dir, qmp.clone(), incoming.as_deref())
                .await?;
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
                // A state QEMU cannot load makes it exit at once. A broken
                // KVM does too, and is the caller's to fall back from.
                if incoming.is_some() && !port_taken && !accel::is_kvm_failure(&failure) {
                    self.boot_instead(
                        state,
                        cx,
                        &format!("QEMU could not load it: {}", first_line(&failure)),
                        false,
                    )
                    .await?;
                    attempt = 0;
                    continue;
                }
                return Err(StepError::failed(failure));
            }
            if incoming.is_some() {
                let watched = machine.clone();
                let qmp = qmp.as_deref().expect("checked before a restore");
                if let Err(message) =
                    warm_start::resume_incoming(qmp, move || watched.failure()).await
                {
                    self.stop(cx).await?;
                    self.boot_instead(
                        state,
                        cx,
                        &format!("QEMU could not load it: {}", first_line(&message)),
                        false,
                    )
                    .await?;
                    attempt = 0;
                    continue;
                }
                if let Some(warm) = state.warm.as_mut() {
                    warm.restored = true;
                }
                // A state counts as restored only once its machine lets the
                // build in: one whose key or SSH server no longer works
                // would otherwise cost the whole `ssh.timeout` and the build.
                let failure = match step_connect::log_in(&self.plan, state, &machine, cx).await {
                    Ok(communicator) => {
                        state.communicator = Some(Arc::new(communicator));
                        None
                    }
                    Err(err) => Some(discard_after_failed_login(err)?),
                };
                if let Some((message, everywhere)) = failure {
                    self.stop(cx).await?;
                    self.boot_instead(
                        state,
                        cx,
                        &format!(
                            "the restored machine did not let the build in: {}",
                            first_line(&message)
                        ),
                        everywhere,
                    )
                    .await?;
                    attempt = 0;
                    continue;
                }
            }
            cx.log.info(format!(
                "QEMU started ({}, pid {}){}, SSH forwarded from 127.0.0.1:{}",
                self.plan.accelerator,
                machine.pid,
                if incoming.is_some() {
                    ", resumed from a saved state"
                } else {
                    ""
                },
                machine.ssh_port
            ));
            state.machine = Some(machine);
            return Ok(());
        }
    }

    async fn cleanup(
        &mut self,
        _state: &mut QemuState,
        cx: &StepContext,
        _outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        self.stop(cx).await?;
        match self.monitor_dir.take() {
            Some(dir) => dir.remove(cx).await,
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::qemu::plan::tests::plan;
    use imgbuild_core::CleanupOutcome;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_a_rejected_key_costs_a_restored_state_everywhere_and_a_kvm_failure_none() {
        let everywhere = |err| discard_after_failed_login(err).map(|(_, everywhere)| everywhere);
        assert!(matches!(
            everywhere(LoginError::Rejected("publickey refused".into())),
            Ok(true)
        ));
        assert!(matches!(
            everywhere(LoginError::Failed(
                "no SSH server answered within 1m".into()
            )),
            Ok(false)
        ));
        assert!(matches!(
            everywhere(LoginError::Failed("QEMU exited (signal 9)".into())),
            Ok(false)
        ));
        let kvm = "KVM internal error. Suberror: 1\nemulation failure";
        assert!(accel::is_kvm_failure(kvm));
        assert!(matches!(
            everywhere(LoginError::Failed(kvm.into())),
            Err(StepError::Failed(message)) if message == kvm
        ));
        assert!(matches!(
            everywhere(LoginError::Cancelled),
            Err(StepError::Cancelled)
        ));
    }

    #[tokio::test]
    async fn the_monitor_socket_moves_to_a_private_directory_of_its_own_when_its_path_is_too_long()
    {
        let dir = tempfile::tempdir().unwrap();
        let plan = Arc::new(plan(serde_json::json!({"base_image": "b.img"}), dir.path()));
        let t = TestContext::new("vm");
        let mut step = StepLaunch::new(plan);

        let short = dir.path().join("w");
        let socket = step.monitor_socket(&short, &t.cx).unwrap();
        assert_eq!(socket, Some(short.join("qmp.sock")));
        assert!(step.monitor_dir.is_none());

        let long = dir.path().join("d".repeat(120));
        let socket = step.monitor_socket(&long, &t.cx).unwrap().unwrap();
        assert!(socket.as_os_str().len() <= SOCKET_PATH_MAX, "{socket:?}");
        let own = socket.parent().unwrap().to_path_buf();
        assert!(own.starts_with(std::env::temp_dir()), "{own:?}");
        let mode = std::fs::metadata(&own).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // A UnixListener binds there: the path really fits.
        let _listener = tokio::net::UnixListener::bind(&socket).unwrap();

        step.cleanup(&mut QemuState::default(), &t.cx, CleanupOutcome::Succeeded)
            .await
            .unwrap();
        assert!(!own.exists(), "cleanup removes it");
    }
}
