//! Stopping what a dead run left running, against real processes: only the
//! exact process the journal names (pid and start time) is ever signalled,
//! never one that merely mentions the build or reuses a recorded pid.

use imgbuild_builders::common::orphans::{Removal, clean_orphan};
use imgbuild_builders::common::process::ProcessIdentity;
use imgbuild_core::Resource;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Kills and reaps the child when dropped, so a failing test leaves nothing.
struct Spawned(Child);

impl Spawned {
    fn new(program: &str, args: &[&str]) -> Spawned {
        Spawned(
            Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Whether it still runs (`Some` exit status once it ended).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.try_wait().unwrap()
    }

    /// What a signal sent to it has left, if any: the kernel queues a
    /// signal before kill(2) or pidfd_send_signal(2) returns, so right
    /// after the call it is either still pending or has already ended the
    /// process (a zombie until reaped). No waiting, so no window for a
    /// slow machine to hide it in.
    fn signal_trace(&self) -> Option<String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in /proc/{}/status", self.pid()))
                .trim()
                .to_owned()
        };
        let state = field("State:");
        let pending = [field("SigPnd:"), field("ShdPnd:")];
        let none_pending = pending
            .iter()
            .all(|mask| mask.chars().all(|digit| digit == '0'));
        (state.starts_with('Z') || state.starts_with('X') || !none_pending)
            .then(|| format!("state {state}, pending signals {pending:?}"))
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A QEMU work directory as a build lays it out.
fn work_dir(root: &Path) -> PathBuf {
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let dir = root.join(format!(".imgbuild-{run_id}-vm"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("serial.log"), b"booting\n").unwrap();
    dir
}

fn process(pidfile: &Path, pid: Option<i32>, start_time: Option<u64>) -> Resource {
    Resource::Process {
        pidfile: pidfile.to_path_buf(),
        description: "QEMU for build vm".to_owned(),
        pid,
        start_time,
    }
}

#[tokio::test]
async fn clean_orphan_signals_only_the_exact_process_the_journal_names() {
    let root = tempfile::tempdir().unwrap();
    let dir = work_dir(root.path());
    let pidfile = dir.join("qemu.pid");

    // Someone follows the dead VM's console: its command line contains the
    // work directory, and so the build's name; its pid is even in the pid
    // file (a recycled pid). Its start time is not the recorded one.
    let serial = dir.join("serial.log");
    let mut watcher = Spawned::new("tail", &["-f", serial.to_str().unwrap()]);
    std::fs::write(&pidfile, format!("{}\n", watcher.pid())).unwrap();
    let watcher_identity = ProcessIdentity::of(watcher.pid()).unwrap();
    let recorded = process(
        &pidfile,
        Some(watcher.pid()),
        Some(watcher_identity.start_time + 1),
    );
    let found = clean_orphan(&recorded, "dead-run").await.unwrap();
    assert_eq!(found, Removal::Absent, "the recorded process is gone");
    // Not recorded at all (the run died before it could): left alone too,
    // and said so.
    let unrecorded = process(&pidfile, None, None);
    let err = clean_orphan(&unrecorded, "dead-run").await.unwrap_err();
    assert!(err.contains(&format!("kill {}", watcher.pid())), "{err}");
    assert_eq!(watcher.signal_trace(), None, "tail -f was signalled");
    assert_eq!(watcher.exited(), None, "tail -f was signalled");

    // The process the journal does name is stopped.
    let mut qemu = Spawned::new("sleep", &["1000"]);
    let identity = ProcessIdentity::of(qemu.pid()).unwrap();
    std::fs::write(&pidfile, format!("{}\n", qemu.pid())).unwrap();
    let recorded = process(&pidfile, Some(identity.pid), Some(identity.start_time));
    let found = clean_orphan(&recorded, "dead-run").await.unwrap();
    assert_eq!(found, Removal::Removed);
    let status = qemu.0.wait().unwrap();
    assert!(!status.success(), "stopped by a signal: {status}");
    assert_eq!(watcher.signal_trace(), None, "tail -f was signalled");
    assert_eq!(watcher.exited(), None, "tail -f was signalled");
}
