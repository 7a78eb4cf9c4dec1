//! What a build produces, and the checksums that identify it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Artifact {
    /// The builder type that made it.
    pub builder: String,
    /// How downstream tools refer to it: a file path, an image id, an AMI id.
    pub id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<ArtifactFile>,
    pub source: SourceIdentity,
    /// Builder-specific facts (AMI ids per region, Docker tags, ...).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArtifactFile {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// The base a build started from: a disk image file or URL, a container
/// image, an AMI.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SourceIdentity {
    pub kind: String,
    pub reference: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl SourceIdentity {
    /// What the base holds, as step keys see it: a base with a SHA-256 is
    /// its content, so the same bytes at another path or URL (another
    /// runner's download directory, a mirror) make the same machine.
    pub fn content(&self) -> serde_json::Value {
        match &self.sha256 {
            Some(sha256) => serde_json::json!({ "sha256": sha256 }),
            None => serde_json::json!(self),
        }
    }
}

const HASH_BUFFER: usize = 1 << 20;

/// `<artifact>.sha256`: where a file artifact's checksum line goes, in the
/// format `sha256sum -c` reads.
pub fn checksum_path(artifact: &Path) -> PathBuf {
    let mut name = artifact.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

/// The artifact's files and their checksum files that exist, as run
/// journal records.
pub fn file_resources(artifact: &Artifact) -> Vec<imgbuild_core::Resource> {
    use std::os::unix::fs::MetadataExt;
    artifact
        .files
        .iter()
        .flat_map(|file| [file.path.clone(), checksum_path(&file.path)])
        .filter_map(|path| {
            let meta = std::fs::symlink_metadata(&path).ok()?;
            Some(imgbuild_core::Resource::ArtifactFile {
                path,
                device: meta.dev(),
                inode: meta.ino(),
            })
        })
        .collect()
}

/// `path` with `.` dropped and `..` folded into its parent, without asking
/// the file system: two spellings of one output path compare equal even
/// before the file exists.
pub fn lexical_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut result = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir if result.file_name().is_some() => {
                result.pop();
            }
            other => result.push(other),
        }
    }
    result
}

/// SHA-256 and size of a file, read in large blocks (sha2 uses the CPU's SHA
/// extensions where present, so the disk or page cache is the limit).
pub fn sha256_file(path: &Path) -> io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; HASH_BUFFER];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

pub async fn sha256_file_async(path: PathBuf) -> io::Result<(u64, String)> {
    tokio::task::spawn_blocking(move || sha256_file(&path))
        .await
        .map_err(|join| io::Error::other(join.to_string()))?
}

/// Removes each of `files` (an artifact's SBOM documents, its tar) that
/// still holds what the build wrote, and lists what it removed. A file
/// already gone counts as removed; one whose content changed since is left
/// alone and reported, with the others still removed.
pub async fn remove_recorded_files(files: &[ArtifactFile]) -> Result<Vec<String>, String> {
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    for file in files {
        let path = &file.path;
        match sha256_file_async(path.clone()).await {
            Ok((_, actual)) if actual == file.sha256 => {
                match crate::common::tracked::remove_path(path, false).await {
                    Ok(()) => removed.push(path.display().to_string()),
                    Err(err) => errors.push(format!("cannot remove {}: {err}", path.display())),
                }
            }
            Ok((_, actual)) => errors.push(format!(
                "{} is not the file the build wrote (its sha256 is {actual}, the build wrote {}); it was left alone: remove it by hand if it must go",
                path.display(),
                file.sha256
            )),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => errors.push(format!("cannot read {}: {err}", path.display())),
        }
    }
    if errors.is_empty() {
        Ok(removed)
    } else {
        Err(errors.join("; "))
    }
}

/// Hashes everything written through it, so an artifact streamed to disk is
/// checksummed without reading it back.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    pub fn finish(self) -> (W, u64, String) {
        (
            self.inner,
            self.written,
            hex::encode(self.hasher.finalize()),
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(data)?;
        self.hasher.update(&data[..written]);
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `<file>.sha256` in the format `sha256sum -c` reads.
pub fn checksum_line(sha256: &str, path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    format!("{sha256}  {name}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_hash_matches_known_digest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, b"abc").unwrap();
        let (size, digest) = sha256_file(&path).unwrap();
        assert_eq!(size, 3);
        assert_eq!(
            digest,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hashing_writer_matches_file_hash() {
        let mut writer = HashingWriter::new(Vec::new());
        writer.write_all(b"abc").unwrap();
        let (bytes, size, digest) = writer.finish();
        assert_eq!(bytes, b"abc");
        assert_eq!(size, 3);
        assert_eq!(
            digest,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[tokio::test]
    async fn recorded_files_go_only_while_they_hold_what_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let record = |name: &str, content: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, content).unwrap();
            let (size, sha256) = sha256_file(&path).unwrap();
            ArtifactFile { path, size, sha256 }
        };
        let kept = record("a.spdx.json", b"{}");
        let changed = record("a.cdx.json", b"{}");
        std::fs::write(&changed.path, b"edited").unwrap();
        let gone = record("a.intoto.json", b"x");
        std::fs::remove_file(&gone.path).unwrap();
        let error = remove_recorded_files(&[kept.clone(), changed.clone(), gone])
            .await
            .unwrap_err();
        assert!(
            error.contains("a.cdx.json is not the file the build wrote"),
            "{error}"
        );
        assert!(!kept.path.exists(), "the unchanged file still goes");
        assert!(changed.path.exists(), "a changed file is left alone");
        assert_eq!(
            remove_recorded_files(&[kept]).await.unwrap(),
            Vec::<String>::new(),
            "what is gone counts as removed"
        );
    }
}
