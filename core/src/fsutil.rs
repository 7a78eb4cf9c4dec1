//! Files that others read (manifests, images, checksums) only ever appear
//! complete under their final name.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes `contents` to `path` through a temporary file in the same directory,
/// flushed to disk, then renamed over `path`.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = parent_dir(path);
    // Readable like any file written with the usual umask: manifests and
    // checksums are meant for other tools and users.
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{}.", file_name(path)))
        .suffix(".tmp")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(dir)?;
    temp.write_all(contents)?;
    temp.as_file().sync_all()?;
    temp.persist(path).map_err(|err| err.error)?;
    sync_dir(dir);
    Ok(())
}

/// Moves a finished temporary file to `target` without ever replacing an
/// existing file there: immutable artifacts are never overwritten, even by a
/// concurrent build that raced this one.
pub fn persist_no_clobber(temp: &Path, target: &Path) -> io::Result<()> {
    std::fs::hard_link(temp, target).map_err(|err| {
        if err.kind() == io::ErrorKind::AlreadyExists {
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} already exists and is never overwritten",
                    target.display()
                ),
            )
        } else {
            err
        }
    })?;
    std::fs::remove_file(temp)?;
    sync_dir(parent_dir(target));
    Ok(())
}

/// A name in `dir` for work in progress on `final_name`: hidden, and marked
/// with the run id so a leftover can be traced to the run that made it.
pub fn partial_path(dir: &Path, final_name: &str, run_id: &str) -> PathBuf {
    dir.join(format!(".{final_name}.{run_id}.partial"))
}

pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into())
}

fn sync_dir(dir: &Path) {
    // Makes the rename durable; failure only weakens crash safety, so it is
    // not worth failing a finished build over.
    if let Ok(handle) = std::fs::File::open(dir) {
        let _ = handle.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file may remain");
    }

    #[test]
    fn no_clobber_refuses_existing_target() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("image.qcow2");
        std::fs::write(&target, b"old").unwrap();
        let temp = dir.path().join("partial");
        std::fs::write(&temp, b"new").unwrap();
        let err = persist_no_clobber(&temp, &target).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
    }
}
