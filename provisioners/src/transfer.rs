//! Tar streams for moving files, built and unpacked off the async runtime,
//! with progress reported as bytes flow.

use crate::communicator::ByteStream;
use crate::provisioner::ProvisionError;
use crate::unpack::{UnpackError, Unpacker};
use imgbuild_core::BuildLog;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::task::JoinHandle;
use tokio_util::io::SyncIoBridge;

/// How much of the archive may sit between the tar builder and the wire.
const PIPE_BUFFER: usize = 1 << 20;

/// An archive of one in-memory file (a script, inline content).
pub fn single_file_archive(
    name: &str,
    content: &[u8],
    mode: u32,
) -> Result<ByteStream, ProvisionError> {
    let mut builder = tar::Builder::new(Vec::with_capacity(content.len() + 1024));
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(mode);
    header.set_mtime(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    );
    header.set_entry_type(tar::EntryType::Regular);
    builder
        .append_data(&mut header, name, content)
        .and_then(|()| builder.into_inner())
        .map(|bytes| Box::new(io::Cursor::new(bytes)) as ByteStream)
        .map_err(|source| ProvisionError::Read {
            path: name.to_owned(),
            source,
        })
}

/// One local file or directory tree to pack, and the name it gets in the
/// archive.
#[derive(Debug, Clone)]
pub struct PackEntry {
    pub local: PathBuf,
    pub name_in_archive: PathBuf,
}

/// Total bytes of regular files under the entries, for progress bars.
pub fn total_size(entries: &[PackEntry]) -> u64 {
    entries
        .iter()
        .flat_map(|entry| walkdir::WalkDir::new(&entry.local).follow_links(false))
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// A tar archive produced on a blocking thread while it is read. The archive
/// stream ends early if packing fails; `finish` then reports why.
pub struct PackedArchive {
    pub stream: ByteStream,
    packer: JoinHandle<io::Result<()>>,
}

impl PackedArchive {
    pub async fn finish(self) -> Result<(), ProvisionError> {
        match self.packer.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(ProvisionError::Read {
                path: "upload source".into(),
                source,
            }),
            Err(join) => Err(ProvisionError::Read {
                path: "upload source".into(),
                source: io::Error::other(join.to_string()),
            }),
        }
    }
}

pub fn pack(entries: Vec<PackEntry>) -> PackedArchive {
    let (reader, writer) = tokio::io::duplex(PIPE_BUFFER);
    let packer = tokio::task::spawn_blocking(move || {
        let mut builder = tar::Builder::new(SyncIoBridge::new(writer));
        builder.follow_symlinks(false);
        for entry in &entries {
            append_tree(&mut builder, &entry.local, &entry.name_in_archive)?;
        }
        let mut bridge = builder.into_inner()?;
        io::Write::flush(&mut bridge)?;
        bridge.shutdown()
    });
    PackedArchive {
        stream: Box::new(reader),
        packer,
    }
}

fn append_tree<W: io::Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    name: &Path,
) -> io::Result<()> {
    for item in walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
    {
        let item = item.map_err(io::Error::other)?;
        let relative = item.path().strip_prefix(root).map_err(io::Error::other)?;
        let archive_name = if relative.as_os_str().is_empty() {
            name.to_path_buf()
        } else {
            name.join(relative)
        };
        if archive_name.as_os_str().is_empty() {
            continue; // the root of a "contents of" upload is the destination itself
        }
        let metadata = std::fs::symlink_metadata(item.path())?;
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(&metadata, tar::HeaderMode::Complete);
        // Ownership on the machine follows whoever extracts (root or the SSH
        // user), never the uid of the person running the build.
        header.set_uid(0);
        header.set_gid(0);
        let _ = header.set_username("root");
        let _ = header.set_groupname("root");
        if metadata.file_type().is_symlink() {
            let target = std::fs::read_link(item.path())?;
            header.set_size(0);
            builder.append_link(&mut header, &archive_name, target)?;
        } else if metadata.is_dir() {
            header.set_size(0);
            builder.append_data(&mut header, &archive_name, io::empty())?;
        } else if metadata.is_file() {
            let file = std::fs::File::open(item.path())?;
            builder.append_data(&mut header, &archive_name, file)?;
        }
    }
    Ok(())
}

/// Unpacks a downloaded archive whose entries start with one top-level name.
/// With `rename_root = Some(path)`, that top-level entry becomes `path`;
/// otherwise entries are placed inside `dest_dir` as they are.
///
/// The archive comes from the machine under build and is not trusted: see
/// the `unpack` module for what is refused. Nothing reaches the destination
/// unless the whole archive was accepted and read to its end.
pub async fn unpack(
    stream: ByteStream,
    dest_dir: PathBuf,
    rename_root: Option<PathBuf>,
) -> Result<u64, ProvisionError> {
    let destination = rename_root.clone().unwrap_or_else(|| dest_dir.clone());
    let read_error = Arc::new(Mutex::new(None));
    let source = FirstReadError {
        inner: SyncIoBridge::new(stream),
        first: read_error.clone(),
    };
    let task = tokio::task::spawn_blocking(move || -> Result<u64, UnpackError> {
        let mut unpacker = Unpacker::new(&dest_dir, rename_root.as_deref())?;
        let mut archive = tar::Archive::new(source);
        for entry in archive.entries().map_err(UnpackError::Archive)? {
            unpacker.add(&mut entry.map_err(UnpackError::Archive)?)?;
        }
        // tar stops at the end-of-archive marker, but the stream only
        // reports how the remote tar ended once read to its end: a missing
        // or unreadable source still yields a valid (empty or partial)
        // archive, and its error comes after it.
        io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(UnpackError::Archive)?;
        unpacker.finish()
    });
    let result = task
        .await
        .unwrap_or_else(|join| Err(UnpackError::Archive(io::Error::other(join.to_string()))));
    result.map_err(|err| {
        let read_error = read_error.lock().ok().and_then(|mut first| first.take());
        match read_error {
            // The tar crate wraps errors from the stream in messages of its
            // own that hide them; the remote side's account is the useful
            // one, unless the machine's archive was refused outright.
            Some(source) if !err.is_refusal() => ProvisionError::Read {
                path: "download source".into(),
                source,
            },
            _ => ProvisionError::Write {
                path: destination.display().to_string(),
                source: io::Error::new(
                    if err.is_refusal() {
                        io::ErrorKind::InvalidData
                    } else {
                        io::ErrorKind::Other
                    },
                    err,
                ),
            },
        }
    })
}

/// Keeps the first error reading a downloaded stream, so that a failure on
/// the machine is not reported as a failure to write the local files.
struct FirstReadError<R> {
    inner: R,
    first: Arc<Mutex<Option<io::Error>>>,
}

impl<R: io::Read> io::Read for FirstReadError<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).inspect_err(|err| {
            if let Ok(mut first) = self.first.lock() {
                first.get_or_insert_with(|| io::Error::new(err.kind(), err.to_string()));
            }
        })
    }
}

/// Counts bytes through a stream and reports progress at most a few times a
/// second, so a 1 GiB transfer does not become a million events. Transfers
/// under [`PROGRESS_MIN_BYTES`] are too quick to be worth a progress bar.
pub struct ProgressReader<R> {
    inner: R,
    log: BuildLog,
    task: String,
    total: Option<u64>,
    done: u64,
    last_report: Instant,
}

const REPORT_EVERY: Duration = Duration::from_millis(250);
pub const PROGRESS_MIN_BYTES: u64 = 1 << 20;

impl<R> ProgressReader<R> {
    pub fn new(inner: R, log: BuildLog, task: String, total: Option<u64>) -> Self {
        if total.is_some_and(|total| total >= PROGRESS_MIN_BYTES) {
            log.progress(&task, 0, total);
        }
        ProgressReader {
            inner,
            log,
            task,
            total,
            done: 0,
            last_report: Instant::now(),
        }
    }

    fn worth_reporting(&self) -> bool {
        self.total.unwrap_or(self.done) >= PROGRESS_MIN_BYTES
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for ProgressReader<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            let read = (buf.filled().len() - before) as u64;
            this.done += read;
            let at_end = read == 0;
            if this.worth_reporting() && (at_end || this.last_report.elapsed() >= REPORT_EVERY) {
                this.last_report = Instant::now();
                // Tar headers and padding make the stream a little longer
                // than the payload; never report past the total.
                let done = this.total.map_or(this.done, |total| this.done.min(total));
                let done = if at_end {
                    this.total.unwrap_or(done)
                } else {
                    done
                };
                let total = if at_end { Some(done) } else { this.total };
                this.log.progress(&this.task, done, total);
            }
        }
        poll
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn pack_then_unpack_preserves_tree_modes_and_links() {
        use std::os::unix::fs::PermissionsExt;
        let src = tempfile::tempdir().unwrap();
        let tree = src.path().join("tree");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::write(tree.join("run.sh"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(tree.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::fs::write(tree.join("sub/secret"), b"s").unwrap();
        std::fs::set_permissions(
            tree.join("sub/secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("run.sh", tree.join("link")).unwrap();

        let mut packed = pack(vec![PackEntry {
            local: tree.clone(),
            name_in_archive: "tree".into(),
        }]);
        let mut bytes = Vec::new();
        packed.stream.read_to_end(&mut bytes).await.unwrap();
        packed.finish().await.unwrap();

        let out = tempfile::tempdir().unwrap();
        let renamed = out.path().join("copy");
        unpack(
            Box::new(io::Cursor::new(bytes)),
            out.path().to_path_buf(),
            Some(renamed.clone()),
        )
        .await
        .unwrap();
        let mode = |p: &str| {
            std::fs::metadata(renamed.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("run.sh"), 0o755);
        assert_eq!(mode("sub/secret"), 0o600);
        assert_eq!(
            std::fs::read_link(renamed.join("link")).unwrap(),
            Path::new("run.sh")
        );
    }
}
