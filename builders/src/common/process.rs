//! Stopping local processes (QEMU) that a run started, including those a
//! dead run left behind, without ever signalling an unrelated process that
//! reused the pid.
//!
//! A process is named by its pid together with its start time (clock ticks
//! after boot, from `/proc/PID/stat`): a recycled pid comes with another
//! start time, and nothing else (a command line mentioning the build, say)
//! makes a process "ours".

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

pub fn read_pidfile(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Exactly one process: its pid and when the kernel started it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessIdentity {
    pub pid: i32,
    pub start_time: u64,
}

/// What `/proc/PID/stat` says: (state, start time).
fn stat(pid: i32) -> Option<(char, u64)> {
    if pid <= 0 {
        return None;
    }
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(stat: &str) -> Option<(char, u64)> {
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after it start at the last ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 3 was `state`; field 22 is `starttime`.
    let start_time = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, start_time))
}

impl ProcessIdentity {
    /// The process that has `pid` now, if any.
    pub fn of(pid: i32) -> Option<ProcessIdentity> {
        stat(pid).map(|(_, start_time)| ProcessIdentity { pid, start_time })
    }

    /// Whether this very process still runs. A zombie has exited and only
    /// waits for its parent to reap it.
    pub fn is_running(&self) -> bool {
        matches!(stat(self.pid), Some((state, start)) if start == self.start_time && state != 'Z')
    }

    /// Sends `signal` to this process and no other. The pid is pinned with a
    /// pidfd before its start time is checked, so it cannot be recycled in
    /// between. Returns whether the signal was sent.
    fn signal(&self, signal: i32) -> bool {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        if fd < 0 {
            return false;
        }
        // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        if !self.is_running() {
            return false;
        }
        // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
        let sent = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        sent == 0
    }
}

/// Asks the process to stop, then forces it after `grace`. Returns whether
/// it is gone (a process that is not this one any more is gone too).
pub async fn terminate(process: ProcessIdentity, grace: Duration) -> bool {
    if !process.is_running() {
        return true;
    }
    process.signal(libc::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        if !process.is_running() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    process.signal(libc::SIGKILL);
    for _ in 0..100 {
        if !process.is_running() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    !process.is_running()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_read_past_a_command_name_with_spaces_and_parens() {
        let stat = "4242 (qemu) (x) y) S 1 4242 4242 0 -1 4194560 2861 0 0 0 12 5 0 0 20 0 3 0 987654 1000 50";
        assert_eq!(parse_stat(stat), Some(('S', 987654)));
    }

    #[test]
    fn another_start_time_is_another_process() {
        let me = ProcessIdentity::of(std::process::id() as i32).unwrap();
        assert!(me.is_running());
        assert!(me.start_time > 0);
        let other = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.is_running(), "another start time is another process");
    }
}
