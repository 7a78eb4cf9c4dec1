//! The guest's serial console, captured to a file in the work directory.
//!
//! The guest writes what it likes, as much as it likes: the file is created
//! private before QEMU starts, kept under [`MAX_BYTES`] while the build runs
//! (its last part moved to `serial.log.1`), and only its tail is ever read.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;

/// Past this the log is cut: enough for any boot, small enough that a guest
/// printing without end cannot fill the disk.
pub const MAX_BYTES: u64 = 8 << 20;
/// What is kept of the log when it is cut, in `serial.log.1`.
const KEPT_BYTES: u64 = 256 << 10;
/// How much of the end is read to show its last lines.
const TAIL_BYTES: u64 = 64 << 10;
const CHECK_EVERY: Duration = Duration::from_millis(500);

/// Creates (or empties) the log, readable only by the building user. QEMU
/// is told to append, so it writes into this file with these permissions,
/// and keeps writing at the end after the file is cut.
pub fn create(path: &Path) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map(drop)
}

/// QEMU's arguments for a serial console appended to `path`.
pub fn qemu_args(path: &Path) -> [String; 4] {
    [
        "-chardev".into(),
        format!("file,id=serial0,path={},append=on", path.display()),
        "-serial".into(),
        "chardev:serial0".into(),
    ]
}

fn previous(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Keeps the log under [`MAX_BYTES`] until the machine exits.
pub fn keep_bounded(path: PathBuf, mut exit: watch::Receiver<Option<String>>) {
    tokio::spawn(async move {
        loop {
            let exited = tokio::time::timeout(CHECK_EVERY, async {
                exit.wait_for(Option::is_some).await.is_ok()
            })
            .await;
            let path = path.clone();
            let _ = tokio::task::spawn_blocking(move || cut_if_large(&path, MAX_BYTES)).await;
            if exited.is_ok() {
                return;
            }
        }
    });
}

/// Moves the last [`KEPT_BYTES`] to `<path>.1` and empties `path` once it
/// holds more than `limit` bytes.
pub fn cut_if_large(path: &Path, limit: u64) -> io::Result<()> {
    if std::fs::metadata(path)?.len() <= limit {
        return Ok(());
    }
    let kept = read_tail(path, KEPT_BYTES)?;
    let previous = previous(path);
    let mut saved = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&previous)?;
    saved.write_all(&kept)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)
}

fn read_tail(path: &Path, bytes: u64) -> io::Result<Vec<u8>> {
    let mut file = std::fs::File::open(path)?;
    let length = file.metadata()?.len();
    file.seek(SeekFrom::Start(length.saturating_sub(bytes)))?;
    let mut tail = Vec::with_capacity(bytes.min(length) as usize);
    file.take(bytes).read_to_end(&mut tail)?;
    Ok(tail)
}

/// The last `count` lines, read from the end of the log (and of the part
/// cut off before it, when the log was just cut).
pub fn last_lines(path: &Path, count: usize) -> Vec<String> {
    let mut bytes = read_tail(path, TAIL_BYTES).unwrap_or_default();
    let lines_in = |bytes: &[u8]| bytes.iter().filter(|b| **b == b'\n').count();
    if lines_in(&bytes) < count
        && let Ok(mut earlier) = read_tail(&previous(path), TAIL_BYTES)
    {
        earlier.append(&mut bytes);
        bytes = earlier;
    }
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..]
        .iter()
        .map(|line| (*line).to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_log_is_cut_keeping_its_end_and_the_tail_spans_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        create(&path).unwrap();
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        for i in 0..200_000 {
            writeln!(log, "line {i}").unwrap();
        }
        cut_if_large(&path, 1 << 20).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // The writer appends and carries on at the new end.
        writeln!(log, "after the cut").unwrap();
        let lines = last_lines(&path, 3);
        assert_eq!(lines, ["line 199998", "line 199999", "after the cut"]);
        assert!(std::fs::metadata(previous(&path)).unwrap().len() <= KEPT_BYTES);
    }
}
