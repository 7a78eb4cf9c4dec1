//! Stopping what a dead run left running, against real processes: only the
//! exact process the journal names (pid and start time) is ever signalled,
//! never one that merely mentions the build or reuses a recorded pid.

use imgbuild_builders::common::orphans::{Removal, clean_orphan};
use imgbuild_builders::common::process::ProcessIdentity;
use imgbuild_core::Resource;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

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
    tokio::time::sleep(Duration::from_millis(300)).await;
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
    assert_eq!(watcher.exited(), None, "tail -f was signalled");
}
