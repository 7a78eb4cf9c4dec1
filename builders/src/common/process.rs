//! Stopping local processes (QEMU) that a run started, including those a
//! dead run left behind, without ever signalling an unrelated process that
//! reused the pid.

use std::path::Path;
use std::time::Duration;

pub fn read_pidfile(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Whether `pid` is alive and its command line contains `marker`.
pub fn is_ours(pid: i32, marker: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let text = String::from_utf8_lossy(&cmdline);
            text.contains(marker)
        }
        Err(_) => false,
    }
}

pub fn is_alive(pid: i32) -> bool {
    // Signal 0 checks existence and permission without delivering anything.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn signal(pid: i32, signal: i32) {
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Asks the process to stop, then forces it after `grace`. Returns once it
/// is gone (or no longer ours).
pub async fn terminate(pid: i32, marker: &str, grace: Duration) {
    if !is_ours(pid, marker) {
        return;
    }
    signal(pid, libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        if !is_ours(pid, marker) || is_zombie(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if is_ours(pid, marker) {
        signal(pid, libc::SIGKILL);
        for _ in 0..100 {
            if !is_ours(pid, marker) || is_zombie(pid) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A zombie has exited and only waits for its parent to reap it.
fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let after_name = stat.rsplit_once(')')?.1;
            after_name
                .split_whitespace()
                .next()
                .map(|state| state == "Z")
        })
        .unwrap_or(false)
}
