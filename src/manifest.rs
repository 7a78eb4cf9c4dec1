//! The artifact manifest: one JSON file that downstream tools (Terraform,
//! deploy pipelines, `jq` in CI) read to find what was built.
//!
//! Entries are appended, and an entry's test verdict is replaced by
//! `imgbuild test`, atomically and under a lock, so two builds finishing at
//! once both land and a reader never sees a half-written file.

use imgbuild_builders::{Artifact, ArtifactFile, SourceIdentity};
use imgbuild_core::Redactor;
use imgbuild_core::fsutil::{parent_dir, write_atomic};
pub use imgbuild_provisioners::image_test::TestResult;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// 2: entries carry a test verdict (`status`, `tests`, ...). A version 1
/// reader would ignore `status` and hand out a failed version, and a
/// version 1 writer would drop the verdicts of every entry when it appends,
/// so a manifest written by this imgbuild says 2 and a version 1 imgbuild
/// refuses it. Version 1 files read as entries without verdicts (`built`).
pub const FORMAT_VERSION: u32 = 2;
pub const DEFAULT_FILE_NAME: &str = "imgbuild-manifest.json";

#[derive(Debug, Error)]
pub enum ManifestError {
    #[error("cannot {action} the manifest {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the manifest {path} is not valid JSON in the imgbuild format ({source}); fix or move it, it is never overwritten"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the manifest {path} has format version {found}, newer than this imgbuild understands ({FORMAT_VERSION}); upgrade imgbuild"
    )]
    TooNew { path: PathBuf, found: u32 },
    #[error(
        "the manifest {path} no longer records build {build} of {image} version {version}; it was there when the run started: was the manifest replaced meanwhile?"
    )]
    EntryGone {
        path: PathBuf,
        image: String,
        version: String,
        build: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub builds: Vec<Entry>,
}

impl Default for Manifest {
    fn default() -> Self {
        Manifest {
            format_version: FORMAT_VERSION,
            builds: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BuildRecord {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// What a recorded version is good for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryStatus {
    /// Built, and no `[[test]]` ran on it (none apply, or `--skip-tests`).
    /// Entries written before tests existed read as this.
    #[default]
    Built,
    /// Every test passed on the artifact.
    Tested,
    /// A test failed, or the tests could not run. The version stays taken;
    /// `imgbuild output` refuses it unless asked with `--allow-failed`.
    Failed,
}

impl EntryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryStatus::Built => "built",
            EntryStatus::Tested => "tested",
            EntryStatus::Failed => "failed",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub run_id: String,
    pub image: ImageRecord,
    pub build: BuildRecord,
    /// How downstream tools refer to the artifact: a file path, a Docker
    /// image id, `<region>:<ami-id>`.
    pub artifact_id: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<ArtifactFile>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
    pub source: SourceIdentity,
    /// SHA-256 over the resolved config of this build, the scripts and files
    /// it reads and the identity of its base: equal hashes, equal inputs.
    pub inputs_sha256: String,
    /// The same hash with the version masked wherever it appears: equal for
    /// two versions built from equal inputs (`--skip-unchanged`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub unversioned_inputs_sha256: String,
    /// Each provisioner step: its key in the step cache, its config
    /// (sensitive values masked) and the files it read, with their hashes;
    /// what `plan` compares to say what changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<crate::pipeline::keys::StepRecord>,
    pub started_at: String,
    pub finished_at: String,
    pub duration_secs: f64,
    pub imgbuild_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
    #[serde(default)]
    pub status: EntryStatus,
    /// Each `[[test]]`'s result, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<TestResult>,
    /// `--skip-tests` was given although tests apply to this build.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tests_skipped: bool,
    /// Why the tests could not run at all (the builder cannot test, the
    /// machine did not start), when that is what failed the version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_error: Option<String>,
    /// `on_test_failure = "delete"` removed the artifact: the version is
    /// taken, but nothing exists under its id.
    #[serde(default, skip_serializing_if = "is_false")]
    pub deleted: bool,
    /// When `imgbuild test` last replaced the verdict (RFC 3339); the build
    /// recorded the first one at `finished_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retested_at: Option<String>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl Entry {
    /// The names of the tests that failed, for messages.
    pub fn failed_tests(&self) -> Vec<&str> {
        self.tests
            .iter()
            .filter(|t| !t.passed)
            .map(|t| t.name.as_str())
            .collect()
    }

    /// Masks sensitive values in the entry's free text: the description,
    /// label values and a URL the base came from (a token in its query or
    /// credentials in it). Identities (image and build names, version,
    /// artifact id, file paths, tags, AMI ids, local base paths) are never
    /// rewritten: a secret that happens to be a substring of a name must not
    /// turn the recorded path into one that does not exist.
    pub fn mask_free_text(&mut self, redactor: &Redactor) {
        let mask = |text: &mut String| {
            if let Cow::Owned(masked) = redactor.redact(text) {
                *text = masked;
            }
        };
        if let Some(description) = &mut self.image.description {
            mask(description);
        }
        self.image.labels.values_mut().for_each(mask);
        if self.source.kind == "url" {
            mask(&mut self.source.reference);
        }
        // What the machine printed during a test can echo a secret the test
        // was given through `env`.
        for test in &mut self.tests {
            test.output_tail.iter_mut().for_each(mask);
            if let Some(error) = &mut test.error {
                mask(error);
            }
        }
        if let Some(error) = &mut self.test_error {
            mask(error);
        }
    }

    pub fn from_artifact(
        artifact: &Artifact,
    ) -> (String, Vec<ArtifactFile>, serde_json::Value, SourceIdentity) {
        (
            artifact.id.clone(),
            artifact.files.clone(),
            artifact.details.clone(),
            artifact.source.clone(),
        )
    }
}

pub fn default_path(config_dir: &Path) -> PathBuf {
    config_dir.join(DEFAULT_FILE_NAME)
}

pub fn read(path: &Path) -> Result<Manifest, ManifestError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Manifest::default()),
        Err(source) => {
            return Err(ManifestError::Io {
                action: "read",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|source| ManifestError::Corrupt {
            path: path.to_path_buf(),
            source,
        })?;
    if manifest.format_version > FORMAT_VERSION {
        return Err(ManifestError::TooNew {
            path: path.to_path_buf(),
            found: manifest.format_version,
        });
    }
    Ok(manifest)
}

/// Holds an exclusive lock on the manifest's directory for as long as it
/// lives. The directory, not the file, because the file is replaced by
/// rename on every write, and a lock on a replaced inode protects nothing.
struct DirectoryLock(File);

impl DirectoryLock {
    fn acquire(path: &Path) -> Result<Self, ManifestError> {
        let dir = parent_dir(path);
        let io = |action: &'static str| {
            let dir = dir.to_path_buf();
            move |source| ManifestError::Io {
                action,
                path: dir,
                source,
            }
        };
        std::fs::create_dir_all(dir).map_err(io("create the directory of"))?;
        let handle = File::open(dir).map_err(io("open the directory of"))?;
        handle.lock().map_err(io("lock the directory of"))?;
        Ok(DirectoryLock(handle))
    }
}

impl Drop for DirectoryLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// Appends `entry`, unless an entry for the same image version and build is
/// already there: then nothing is written and the existing one is returned.
pub fn append(path: &Path, entry: Entry) -> Result<Option<Entry>, ManifestError> {
    let _lock = DirectoryLock::acquire(path)?;
    let mut manifest = read(path)?;
    if let Some(existing) = find(
        &manifest,
        &entry.image.name,
        &entry.image.version,
        &entry.build.name,
    ) {
        return Ok(Some(existing.clone()));
    }
    manifest.builds.push(entry);
    write(path, manifest).map(|()| None)
}

/// Changes the entry of `image` `version` `build` with `change`, under the
/// lock and atomically, and returns it as written. The entry is looked up
/// again under the lock: builds recorded since the caller read the
/// manifest are kept.
pub fn update(
    path: &Path,
    image: &str,
    version: &str,
    build: &str,
    change: impl FnOnce(&mut Entry),
) -> Result<Entry, ManifestError> {
    let _lock = DirectoryLock::acquire(path)?;
    let mut manifest = read(path)?;
    let entry = manifest
        .builds
        .iter_mut()
        .find(|e| e.image.name == image && e.image.version == version && e.build.name == build)
        .ok_or_else(|| ManifestError::EntryGone {
            path: path.to_path_buf(),
            image: image.to_owned(),
            version: version.to_owned(),
            build: build.to_owned(),
        })?;
    change(entry);
    let updated = entry.clone();
    write(path, manifest)?;
    Ok(updated)
}

/// Replaces the manifest file; the caller holds the lock. Written in this
/// imgbuild's format, whatever version the file had.
fn write(path: &Path, mut manifest: Manifest) -> Result<(), ManifestError> {
    manifest.format_version = FORMAT_VERSION;
    let mut text = serde_json::to_vec_pretty(&manifest).expect("manifests always serialize");
    text.push(b'\n');
    write_atomic(path, &text).map_err(|source| ManifestError::Io {
        action: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// The most recently recorded version of `build` of `image`.
pub fn latest<'a>(manifest: &'a Manifest, image: &str, build: &str) -> Option<&'a Entry> {
    manifest
        .builds
        .iter()
        .rev()
        .find(|e| e.image.name == image && e.build.name == build)
}

impl Entry {
    /// How long ago the build finished, when its time is readable.
    pub fn age(&self) -> Option<std::time::Duration> {
        let finished = time::OffsetDateTime::parse(
            &self.finished_at,
            &time::format_description::well_known::Rfc3339,
        )
        .ok()?;
        (time::OffsetDateTime::now_utc() - finished).try_into().ok()
    }
}

pub fn find<'a>(
    manifest: &'a Manifest,
    image: &str,
    version: &str,
    build: &str,
) -> Option<&'a Entry> {
    manifest
        .builds
        .iter()
        .find(|e| e.image.name == image && e.image.version == version && e.build.name == build)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn entry(build: &str, version: &str) -> Entry {
        Entry {
            run_id: "run".into(),
            image: ImageRecord {
                name: "img".into(),
                version: version.into(),
                description: None,
                labels: BTreeMap::new(),
            },
            build: BuildRecord {
                name: build.into(),
                kind: "qemu".into(),
            },
            artifact_id: format!("/out/{build}"),
            files: Vec::new(),
            details: serde_json::Value::Null,
            source: SourceIdentity {
                kind: "file".into(),
                reference: "/base".into(),
                sha256: None,
            },
            inputs_sha256: "00".into(),
            unversioned_inputs_sha256: String::new(),
            steps: Vec::new(),
            started_at: "t0".into(),
            finished_at: "t1".into(),
            duration_secs: 1.0,
            imgbuild_version: "0".into(),
            git_commit: None,
            status: EntryStatus::Built,
            tests: Vec::new(),
            tests_skipped: false,
            test_error: None,
            deleted: false,
            retested_at: None,
        }
    }

    #[test]
    fn an_entry_written_before_tests_existed_reads_as_built() {
        // The shape of an entry from an imgbuild without `[[test]]`: no
        // status, no tests.
        let old = serde_json::json!({
            "run_id": "r", "image": {"name": "web", "version": "1"},
            "build": {"name": "vm", "type": "qemu"},
            "artifact_id": "/out/web-1.qcow2",
            "source": {"kind": "file", "reference": "/b"},
            "inputs_sha256": "0", "started_at": "a", "finished_at": "b",
            "duration_secs": 1.0, "imgbuild_version": "0.1.0"
        });
        let entry: Entry = serde_json::from_value(old).unwrap();
        assert_eq!(entry.status, EntryStatus::Built);
        assert!(entry.tests.is_empty());
        assert!(!entry.tests_skipped && !entry.deleted);
        assert!(entry.test_error.is_none());
    }

    #[test]
    fn a_tested_entry_round_trips_with_its_results() {
        let mut tested = entry("vm", "2");
        tested.status = EntryStatus::Failed;
        tested.tests = vec![TestResult {
            name: "nginx answers".into(),
            passed: false,
            exit_code: Some(7),
            duration_secs: 0.4,
            attempts: 2,
            output_tail: vec!["curl: (7) refused".into()],
            error: Some("`curl` failed".into()),
        }];
        let json = serde_json::to_value(&tested).unwrap();
        assert_eq!(json["status"], "failed");
        assert_eq!(json["tests"][0]["exit_code"], 7);
        let back: Entry = serde_json::from_value(json).unwrap();
        assert_eq!(back.status, EntryStatus::Failed);
        assert_eq!(back.tests, tested.tests);
        assert_eq!(back.failed_tests(), vec!["nginx answers"]);
    }

    #[test]
    fn appends_and_refuses_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        assert!(append(&path, entry("a", "1")).unwrap().is_none());
        assert!(append(&path, entry("b", "1")).unwrap().is_none());
        assert!(append(&path, entry("a", "1")).unwrap().is_some());
        let manifest = read(&path).unwrap();
        assert_eq!(manifest.builds.len(), 2);
        assert_eq!(manifest.format_version, FORMAT_VERSION);
    }

    #[test]
    fn update_changes_one_entry_and_writes_the_current_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        // A file an imgbuild before tests wrote.
        let old = Manifest {
            format_version: 1,
            builds: vec![entry("a", "1"), entry("b", "1")],
        };
        std::fs::write(&path, serde_json::to_vec(&old).unwrap()).unwrap();

        let updated = update(&path, "img", "1", "b", |e| {
            e.status = EntryStatus::Failed;
            e.retested_at = Some("now".into());
        })
        .unwrap();
        assert_eq!(updated.status, EntryStatus::Failed);
        let manifest = read(&path).unwrap();
        assert_eq!(manifest.format_version, FORMAT_VERSION);
        assert_eq!(manifest.builds[0].status, EntryStatus::Built);
        assert_eq!(manifest.builds[1].status, EntryStatus::Failed);
        assert_eq!(manifest.builds[1].retested_at.as_deref(), Some("now"));

        let before = std::fs::read(&path).unwrap();
        let err = update(&path, "img", "2", "b", |_| panic!("no such entry")).unwrap_err();
        assert!(matches!(err, ManifestError::EntryGone { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn concurrent_appends_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || append(&path, entry(&format!("b{i}"), "1")).unwrap())
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(read(&path).unwrap().builds.len(), 16);
    }

    #[test]
    fn masking_keeps_identities_and_masks_free_text() {
        let redactor = Redactor::new();
        redactor.add("img");
        let mut masked = entry("img-build", "1");
        masked.image.description = Some("img with a token".into());
        masked
            .image
            .labels
            .insert("owner".into(), "img-team".into());
        masked.source = SourceIdentity {
            kind: "url".into(),
            reference: "https://host/base.qcow2?token=img".into(),
            sha256: None,
        };
        masked.mask_free_text(&redactor);
        assert_eq!(masked.image.name, "img");
        assert_eq!(masked.build.name, "img-build");
        assert_eq!(masked.artifact_id, "/out/img-build");
        assert_eq!(
            masked.image.description.as_deref(),
            Some("<sensitive> with a token")
        );
        assert_eq!(masked.image.labels["owner"], "<sensitive>-team");
        assert_eq!(
            masked.source.reference,
            "https://host/base.qcow2?token=<sensitive>"
        );
    }

    #[test]
    fn a_corrupt_manifest_is_reported_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.json");
        std::fs::write(&path, "{ not json").unwrap();
        let err = append(&path, entry("a", "1")).unwrap_err();
        assert!(err.to_string().contains("never overwritten"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{ not json");
    }
}
