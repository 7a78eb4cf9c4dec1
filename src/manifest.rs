//! The image catalog (the manifest): one JSON document that downstream
//! tools (Terraform, deploy pipelines, `jq` in CI) read to find what was
//! built, which version each channel (`dev`, `prod`) hands out, and what
//! was revoked or retired.
//!
//! It lives in a file (beside the config by default, meant to be
//! committed) or in an S3 object shared by many CI runners. Every change is
//! a read-modify-write: under a directory lock for a file, as a conditional
//! PUT retried on 412 for S3, so no concurrent update is lost and a reader
//! never sees a half-written document.
//!
//! On disk the document is meant for review in a pull request: one object
//! per recorded build, appended in the order they finished, then the
//! channels of each image, keys in a stable order. Promoting changes one
//! line (a channel's `version`); a build adds one object at the end of
//! `builds`. `imgbuild catalog --output json` groups it by image and
//! version.

use imgbuild_builders::common::object_store::{self, ObjectStoreError, UpdateError};
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

/// 3: `channels`, statuses `revoked` and `retired`, `parent`. 2 added test
/// verdicts (`status`, `tests`, ...); a version 1 file reads as entries
/// without verdicts (`built`). Older files are read as they are and
/// written in this format on the first change. An older imgbuild refuses a
/// newer format rather than drop what it does not know (a version 2 writer
/// would drop every channel).
pub const FORMAT_VERSION: u32 = 3;
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
        "the manifest {location} is not valid JSON in the imgbuild format ({source}); fix or move it, it is never overwritten"
    )]
    Corrupt {
        location: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the manifest {location} has format version {found}, newer than this imgbuild understands ({FORMAT_VERSION}); upgrade imgbuild"
    )]
    TooNew { location: String, found: u32 },
    #[error(
        "the manifest {location} no longer records build {build} of {image} version {version}; it was there when the run started: was the manifest replaced meanwhile?"
    )]
    EntryGone {
        location: String,
        image: String,
        version: String,
        build: String,
    },
    #[error("the manifest {location}: {source}")]
    Store {
        location: String,
        #[source]
        source: Box<ObjectStoreError>,
    },
    /// A catalog command refused what it was asked (promote a failed
    /// version, roll back a channel with no earlier version, ...).
    #[error("{0}")]
    Refused(String),
}

/// The catalog in memory: every recorded build of every version, oldest
/// first (by when it finished), and each image's channels.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub format_version: u32,
    pub builds: Vec<Entry>,
    /// Image name → channel name → the channel.
    pub channels: BTreeMap<String, BTreeMap<String, Channel>>,
}

impl Default for Manifest {
    fn default() -> Self {
        Manifest {
            format_version: FORMAT_VERSION,
            builds: Vec::new(),
            channels: BTreeMap::new(),
        }
    }
}

/// How many changes a channel remembers: enough to roll back several
/// times and to see who moved it lately, short enough to review.
pub const CHANNEL_HISTORY: usize = 20;

/// A name (`dev`, `prod`) that hands out one version of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    /// The version the channel hands out. Editing this line in a pull
    /// request is a promotion; the history then lags one change behind,
    /// which `rollback` and `catalog` account for.
    pub version: String,
    /// The changes imgbuild made, oldest first, at most
    /// [`CHANNEL_HISTORY`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<ChannelChange>,
    /// The SSM parameter every change of the channel is published to
    /// (AMIs only; `promote --ssm` sets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssm_parameter: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelChange {
    /// The version the channel was set to.
    pub version: String,
    /// `promote`, `rollback` or `revoke` (moved off a revoked version).
    pub action: String,
    pub at: String,
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Who or what made a change: `IMGBUILD_ACTOR`, else the CI's actor
/// (`GITHUB_ACTOR`, `GITLAB_USER_LOGIN`), else the local user.
pub fn actor() -> String {
    [
        "IMGBUILD_ACTOR",
        "GITHUB_ACTOR",
        "GITLAB_USER_LOGIN",
        "USER",
    ]
    .iter()
    .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
    .unwrap_or_else(|| "unknown".to_owned())
}

/// Why a version changed status after its build, and who changed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusNote {
    pub at: String,
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The status before the change.
    pub previous_status: EntryStatus,
}

/// What `imgbuild retire` removed of a version's artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retirement {
    pub at: String,
    pub by: String,
    /// The artifact's parts that are gone (files, tags, AMIs, snapshots).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
    /// Why the removal did not finish; the version keeps its status until
    /// a later `retire` finishes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The imgbuild version a build started from, when its base is itself an
/// artifact the catalog records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub image: String,
    pub version: String,
    pub build: String,
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
    /// `imgbuild revoke`: never promoted or handed out again, and no build
    /// may start from it.
    Revoked,
    /// `imgbuild retire` removed its artifact; the record stays.
    Retired,
}

impl EntryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryStatus::Built => "built",
            EntryStatus::Tested => "tested",
            EntryStatus::Failed => "failed",
            EntryStatus::Revoked => "revoked",
            EntryStatus::Retired => "retired",
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
    /// The recorded version this build's base is, when it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
    /// Set by `imgbuild revoke`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<StatusNote>,
    /// Set by `imgbuild retire`, also when it did not finish.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retirement: Option<Retirement>,
    /// The signed (or unsigned) provenance of this version: its DSSE
    /// envelope's path and sha256, the key that signed it, and the
    /// checksum file's signature (`imgbuild verify` checks them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<crate::attest::AttestationRecord>,
    /// Set by `build --check-reproducible`: how this version compared with
    /// a second build of the same inputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reproducibility: Option<crate::pipeline::reproducible::Reproducibility>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

impl Entry {
    /// The artifact as its builder recorded it, for the builder's hooks
    /// (`test`, `retire`, the presence check before a promotion).
    pub fn artifact(&self) -> Artifact {
        Artifact {
            builder: self.build.kind.clone(),
            id: self.artifact_id.clone(),
            files: self.files.clone(),
            source: self.source.clone(),
            details: self.details.clone(),
        }
    }

    /// ` (why)` when the entry was revoked with a reason, for messages that
    /// say it is revoked.
    pub fn revocation_reason(&self) -> String {
        self.revocation
            .as_ref()
            .and_then(|note| note.reason.as_deref())
            .map(|reason| format!(" ({reason})"))
            .unwrap_or_default()
    }

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

/// Where the catalog lives: a local file, or an S3 object
/// (`s3://bucket/key`: the standard AWS credential chain and
/// `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File(PathBuf),
    S3 { url: String },
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(path) => write!(f, "{}", path.display()),
            Location::S3 { url } => f.write_str(url),
        }
    }
}

impl From<PathBuf> for Location {
    fn from(path: PathBuf) -> Self {
        Location::File(path)
    }
}

impl std::str::FromStr for Location {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Some(rest) = text.strip_prefix("s3://") {
            match rest.split_once('/') {
                Some((bucket, key))
                    if !bucket.is_empty() && !key.is_empty() && !key.ends_with('/') =>
                {
                    Ok(Location::S3 {
                        url: text.to_owned(),
                    })
                }
                _ => Err(format!(
                    "{text:?} names no object: use s3://bucket/key, e.g. s3://images/catalog.json"
                )),
            }
        } else if text.contains("://") {
            Err(format!(
                "{text:?}: the manifest is a file path or an s3://bucket/key URL"
            ))
        } else if text.is_empty() {
            Err("the manifest location is empty".to_owned())
        } else {
            Ok(Location::File(PathBuf::from(text)))
        }
    }
}

impl Location {
    /// The catalog as it is now; an absent one is empty.
    pub async fn read(&self) -> Result<Manifest, ManifestError> {
        match self {
            Location::File(path) => read(path),
            Location::S3 { url } => {
                let (store, key) = self.open_store(url).await?;
                let object = store
                    .get(&key)
                    .await
                    .map_err(|source| ManifestError::Store {
                        location: url.clone(),
                        source: Box::new(source),
                    })?;
                match object {
                    Some(object) => parse(&object.bytes, url),
                    None => Ok(Manifest::default()),
                }
            }
        }
    }

    /// Applies `change` to the catalog as it is at the moment of writing,
    /// and writes the result if it differs. `change` may run more than once
    /// (a lost race on S3 is retried on a fresh read), so it must depend
    /// only on the catalog it is given. An error from `change` writes
    /// nothing.
    pub async fn modify<R>(
        &self,
        mut change: impl FnMut(&mut Manifest) -> Result<R, ManifestError> + Send,
    ) -> Result<R, ManifestError> {
        match self {
            Location::File(path) => {
                let _lock = DirectoryLock::acquire(path)?;
                let mut manifest = read(path)?;
                let before = render(&manifest);
                let result = change(&mut manifest)?;
                let after = render(&manifest);
                // An unchanged catalog in an old format is still migrated:
                // the first write is the migration.
                if after != before || manifest.format_version != FORMAT_VERSION {
                    write(path, &after)?;
                }
                Ok(result)
            }
            Location::S3 { url } => {
                let (store, key) = self.open_store(url).await?;
                let mut result = None;
                let written = object_store::read_modify_write(store.as_ref(), &key, |bytes| {
                    let mut manifest = match bytes {
                        Some(bytes) => parse(bytes, url)?,
                        None => Manifest::default(),
                    };
                    result = Some(change(&mut manifest)?);
                    Ok::<_, ManifestError>(render(&manifest))
                })
                .await;
                match written {
                    Ok(_) => Ok(result.expect("a write follows a change")),
                    Err(UpdateError::Modify(err)) => Err(err),
                    Err(UpdateError::Store(source)) => Err(ManifestError::Store {
                        location: url.clone(),
                        source: Box::new(source),
                    }),
                }
            }
        }
    }

    async fn open_store(
        &self,
        url: &str,
    ) -> Result<(std::sync::Arc<dyn object_store::ObjectStore>, String), ManifestError> {
        let (prefix, key) = url.rsplit_once('/').expect("checked when parsed");
        let store = object_store::open(prefix)
            .await
            .map_err(|source| ManifestError::Store {
                location: url.to_owned(),
                source: Box::new(source),
            })?;
        Ok((store, key.to_owned()))
    }

    /// Appends `entry`, unless an entry for the same image version and
    /// build is already there: then nothing is written and the existing one
    /// is returned.
    pub async fn append(&self, entry: Entry) -> Result<Option<Entry>, ManifestError> {
        Ok(self.append_completed(entry, |_, _| {}).await?.err())
    }

    /// [`Location::append`], with `complete` filling in what depends on the
    /// catalog as it is at the moment of writing (a parent recorded since
    /// the run started). `Ok(written)`, or `Err(existing)` when the version
    /// was already recorded.
    pub async fn append_completed(
        &self,
        entry: Entry,
        complete: impl Fn(&Manifest, &mut Entry) + Send + Sync,
    ) -> Result<Result<Entry, Entry>, ManifestError> {
        self.modify(|manifest| {
            if let Some(existing) = find(
                manifest,
                &entry.image.name,
                &entry.image.version,
                &entry.build.name,
            ) {
                return Ok(Err(existing.clone()));
            }
            let mut written = entry.clone();
            complete(manifest, &mut written);
            manifest.builds.push(written.clone());
            Ok(Ok(written))
        })
        .await
    }

    /// Changes the entry of `image` `version` `build` with `change` and
    /// returns it as written. The entry is looked up at the moment of
    /// writing: builds recorded since the caller read the catalog are kept.
    pub async fn update(
        &self,
        image: &str,
        version: &str,
        build: &str,
        change: impl Fn(&mut Entry) + Send + Sync,
    ) -> Result<Entry, ManifestError> {
        let location = self.to_string();
        self.modify(|manifest| {
            let entry = manifest
                .builds
                .iter_mut()
                .find(|e| {
                    e.image.name == image && e.image.version == version && e.build.name == build
                })
                .ok_or_else(|| ManifestError::EntryGone {
                    location: location.clone(),
                    image: image.to_owned(),
                    version: version.to_owned(),
                    build: build.to_owned(),
                })?;
            change(entry);
            Ok(entry.clone())
        })
        .await
    }
}

/// The document: every build of every version in the order they were
/// recorded (`.builds[-1]` is the newest, as `jq` scripts read it since
/// format 1), then each image's channels. Keys in a stable order, so a
/// promotion changes one line and a build adds one object at the end.
#[derive(Serialize, Deserialize)]
struct CatalogFile {
    format_version: u32,
    #[serde(default)]
    builds: Vec<Entry>,
    /// Image name → channel name → channel.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    channels: BTreeMap<String, BTreeMap<String, Channel>>,
}

fn parse(bytes: &[u8], location: &str) -> Result<Manifest, ManifestError> {
    let corrupt = |source| ManifestError::Corrupt {
        location: location.to_owned(),
        source,
    };
    let file: CatalogFile = serde_json::from_slice(bytes).map_err(corrupt)?;
    if file.format_version > FORMAT_VERSION {
        return Err(ManifestError::TooNew {
            location: location.to_owned(),
            found: file.format_version,
        });
    }
    Ok(Manifest {
        format_version: file.format_version,
        builds: file.builds,
        channels: file.channels,
    })
}

/// The document in this imgbuild's format, whatever format it was read in.
fn render(manifest: &Manifest) -> Vec<u8> {
    let file = CatalogFile {
        format_version: FORMAT_VERSION,
        builds: manifest.builds.clone(),
        channels: manifest.channels.clone(),
    };
    let mut text = serde_json::to_vec_pretty(&file).expect("catalogs always serialize");
    text.push(b'\n');
    text
}

pub fn read(path: &Path) -> Result<Manifest, ManifestError> {
    match std::fs::read(path) {
        Ok(bytes) => parse(&bytes, &path.display().to_string()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Manifest::default()),
        Err(source) => Err(ManifestError::Io {
            action: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A catalog file as git hands it to a merge driver: an empty file (no
/// common ancestor) is an empty catalog.
pub fn read_for_merge(path: &Path) -> Result<Manifest, ManifestError> {
    match std::fs::read(path) {
        Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Ok(Manifest::default()),
        _ => read(path),
    }
}

/// Replaces the catalog file at `path` with `manifest`, in this imgbuild's
/// format (no lock: for files nothing else writes, like a merge driver's).
pub fn save(path: &Path, manifest: &Manifest) -> Result<(), ManifestError> {
    write(path, &render(manifest))
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

/// Replaces the manifest file; the caller holds the lock.
fn write(path: &Path, text: &[u8]) -> Result<(), ManifestError> {
    write_atomic(path, text).map_err(|source| ManifestError::Io {
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
            parent: None,
            revocation: None,
            retirement: None,
            attestation: None,
            reproducibility: None,
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

    #[tokio::test]
    async fn appends_and_refuses_duplicates() {
        let dir = tempfile::tempdir().unwrap();
        let path = Location::File(dir.path().join("m.json"));
        assert!(path.append(entry("a", "1")).await.unwrap().is_none());
        assert!(path.append(entry("b", "1")).await.unwrap().is_none());
        assert!(path.append(entry("a", "1")).await.unwrap().is_some());
        let manifest = path.read().await.unwrap();
        assert_eq!(manifest.builds.len(), 2);
        assert_eq!(manifest.format_version, FORMAT_VERSION);
    }

    #[tokio::test]
    async fn update_changes_one_entry_and_migrates_an_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.json");
        let path = Location::File(file.clone());
        // A file an imgbuild before tests and channels wrote: a flat list.
        let old = serde_json::json!({
            "format_version": 1,
            "builds": [entry("a", "1"), entry("b", "1")],
        });
        std::fs::write(&file, serde_json::to_vec(&old).unwrap()).unwrap();
        assert_eq!(path.read().await.unwrap().builds.len(), 2);

        let updated = path
            .update("img", "1", "b", |e| {
                e.status = EntryStatus::Failed;
                e.retested_at = Some("now".into());
            })
            .await
            .unwrap();
        assert_eq!(updated.status, EntryStatus::Failed);
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(written["format_version"], FORMAT_VERSION);
        assert_eq!(written["builds"][0]["status"], "built");
        assert_eq!(written["builds"][1]["status"], "failed");
        assert_eq!(written["builds"][1]["retested_at"], "now");

        let before = std::fs::read(&file).unwrap();
        let err = path
            .update("img", "2", "b", |_| panic!("no such entry"))
            .await
            .unwrap_err();
        assert!(matches!(err, ManifestError::EntryGone { .. }), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), before);
    }

    #[tokio::test]
    async fn a_catalog_round_trips_in_recorded_order_with_its_channels() {
        let dir = tempfile::tempdir().unwrap();
        let path = Location::File(dir.path().join("m.json"));
        // Recorded order, not version order, says which is the latest.
        for version in ["9", "10"] {
            path.append(entry("vm", version)).await.unwrap();
        }
        path.modify(|m| {
            m.channels.entry("img".into()).or_default().insert(
                "prod".into(),
                Channel {
                    version: "9".into(),
                    history: Vec::new(),
                    ssm_parameter: None,
                },
            );
            Ok(())
        })
        .await
        .unwrap();
        let manifest = path.read().await.unwrap();
        let order: Vec<&str> = manifest
            .builds
            .iter()
            .map(|e| e.image.version.as_str())
            .collect();
        assert_eq!(order, ["9", "10"]);
        assert_eq!(latest(&manifest, "img", "vm").unwrap().image.version, "10");
        assert_eq!(manifest.channels["img"]["prod"].version, "9");
    }

    #[test]
    fn concurrent_appends_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = Location::File(dir.path().join("m.json"));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    runtime
                        .block_on(path.append(entry(&format!("b{i}"), "1")))
                        .unwrap()
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(runtime.block_on(path.read()).unwrap().builds.len(), 16);
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
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = runtime
            .block_on(Location::File(path.clone()).append(entry("a", "1")))
            .unwrap_err();
        assert!(err.to_string().contains("never overwritten"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{ not json");
    }
}
