//! One object-store interface for everything imgbuild keeps outside a
//! build: the step cache's layers and the image catalog, in a local
//! directory or in an S3 bucket.
//!
//! Small objects (records, the catalog) are read whole with a version token
//! and written conditionally: [`ObjectStore::put_if_absent`] creates only,
//! [`ObjectStore::put_if_match`] replaces only the version that was read.
//! A lost race is [`ObjectStoreError::PreconditionFailed`] (HTTP 412), never
//! a silent overwrite, and [`read_modify_write`] turns that into an update
//! that is never lost. Large files (disk layers) go through
//! [`ObjectStore::upload_file`] and [`ObjectStore::download_file`], which
//! transfer in parallel where the backend allows and verify SHA-256.
//!
//! Keys are `/`-separated relative names (`catalog.json`,
//! `steps/<key>.layer`); a segment may not start with `.`, which the local
//! backend keeps for its lock and temporary files.

mod local;
#[cfg(test)]
pub(crate) mod meddled;
mod s3;

pub use local::LocalStore;
pub use s3::{S3Options, S3Store};

use async_trait::async_trait;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use thiserror::Error;

/// The version of an object as the store reports it: S3's ETag, or the
/// local backend's SHA-256 of the content. Opaque: only ever handed back to
/// [`ObjectStore::put_if_match`] or [`ObjectStore::delete_if_match`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version(pub String);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An object read whole, with the version to make a conditional write
/// against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    pub bytes: Vec<u8>,
    pub version: Version,
}

/// One key found by [`ObjectStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub modified: Option<SystemTime>,
}

/// What [`ObjectStore::upload_file`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub size: u64,
    pub sha256: String,
    pub version: Version,
}

/// Called with (bytes done, bytes in all) as a transfer advances, from the
/// task that awaits the transfer.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Send + Sync);

#[derive(Debug, Error)]
pub enum ObjectStoreError {
    #[error(
        "{key} in {store} changed since it was read, or appeared meanwhile: the write was refused (precondition failed, HTTP 412); read it again and retry"
    )]
    PreconditionFailed { store: String, key: String },

    #[error("{key} is not in {store}")]
    NotFound { store: String, key: String },

    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{store} refused {operation} of {key}: {message}; check the AWS credentials (environment, profile, SSO or role) and that they are allowed {operation} on this bucket"
    )]
    Auth {
        store: String,
        key: String,
        operation: &'static str,
        message: String,
    },

    #[error("{operation} of {key} in {store} failed: {message}")]
    Service {
        store: String,
        key: String,
        operation: &'static str,
        /// The HTTP status of the answer, absent when there was none.
        status: Option<u16>,
        /// S3's error code (`NoSuchBucket`), when it gave one.
        code: Option<String>,
        message: String,
    },

    #[error(
        "{key} in {store} does not have the expected content: SHA-256 {actual}, expected {expected}; nothing was kept (a corrupt or replaced object: remove it and store it again)"
    )]
    Integrity {
        store: String,
        key: String,
        expected: String,
        actual: String,
    },

    #[error(
        "{path} changed while it was being uploaded to {key} in {store} ({detail}); the upload was abandoned and nothing was stored: upload it again once nothing writes to it"
    )]
    SourceChanged {
        store: String,
        key: String,
        path: PathBuf,
        detail: String,
    },

    #[error("{key:?} is not a valid object key: {reason}")]
    InvalidKey { key: String, reason: &'static str },

    #[error(
        "{location:?} is not an object store location: {reason} (use a directory path or s3://bucket/prefix)"
    )]
    InvalidLocation {
        location: String,
        reason: &'static str,
    },

    #[error(
        "gave up updating {key} in {store} after {attempts} attempts: another writer changed it between every read and write; try again, or spread the writers out"
    )]
    Contended {
        store: String,
        key: String,
        attempts: u32,
    },
}

impl ObjectStoreError {
    /// A conditional write lost its race: read again and retry.
    pub fn is_precondition_failed(&self) -> bool {
        matches!(self, ObjectStoreError::PreconditionFailed { .. })
    }
}

#[async_trait]
pub trait ObjectStore: Send + Sync + std::fmt::Debug {
    /// Where the store is (`/var/cache/imgbuild`, `s3://bucket/prefix`), for
    /// messages.
    fn location(&self) -> String;

    /// The object and its version, `None` when there is none.
    async fn get(&self, key: &str) -> Result<Option<Object>, ObjectStoreError>;

    /// Creates the object; `PreconditionFailed` if it already exists.
    async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<Version, ObjectStoreError>;

    /// Replaces the object only if it is still at `version`;
    /// `PreconditionFailed` if it changed or was removed since.
    async fn put_if_match(
        &self,
        key: &str,
        bytes: Vec<u8>,
        version: &Version,
    ) -> Result<Version, ObjectStoreError>;

    /// The keys starting with `prefix` (a plain string prefix, as in S3),
    /// sorted.
    async fn list(&self, prefix: &str) -> Result<Vec<Listed>, ObjectStoreError>;

    /// Removes the object; removing one that is not there is not an error.
    async fn delete(&self, key: &str) -> Result<(), ObjectStoreError>;

    /// Removes the object only if it is still at `version`;
    /// `PreconditionFailed` if it was replaced since. One removed already
    /// is not an error. (S3 honours `If-Match` on DeleteObject; a service
    /// that ignored it would delete unconditionally.)
    async fn delete_if_match(&self, key: &str, version: &Version) -> Result<(), ObjectStoreError>;

    /// Stores the file at `path` under `key`, replacing what was there. The
    /// object appears whole or not at all: a failed upload leaves nothing
    /// behind (S3: the multipart upload is aborted).
    async fn upload_file(
        &self,
        key: &str,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<Uploaded, ObjectStoreError>;

    /// Writes the object to `path` (replacing it) if its content hashes to
    /// `expected_sha256` (hex); otherwise `Integrity`, and `path` is left as
    /// it was. Returns the size.
    async fn download_file(
        &self,
        key: &str,
        path: &Path,
        expected_sha256: &str,
        progress: Progress<'_>,
    ) -> Result<u64, ObjectStoreError>;
}

/// Whether `location` names an object store [`open`] can open, without
/// opening it: for config validation, before anything runs.
pub fn check_location(location: &str) -> Result<(), ObjectStoreError> {
    let invalid = |reason| ObjectStoreError::InvalidLocation {
        location: location.to_owned(),
        reason,
    };
    if location.starts_with("s3://") {
        s3::parse_url(location).map(|_| ())
    } else if location.contains("://") {
        Err(invalid("the only URL scheme supported is s3://"))
    } else if location.is_empty() {
        Err(invalid("it is empty"))
    } else {
        Ok(())
    }
}

/// The store at `location`: `s3://bucket/prefix` (the standard AWS
/// credential chain, `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`), anything
/// else a local directory.
pub async fn open(location: &str) -> Result<Arc<dyn ObjectStore>, ObjectStoreError> {
    check_location(location)?;
    if location.starts_with("s3://") {
        Ok(Arc::new(
            S3Store::open(location, S3Options::default()).await?,
        ))
    } else {
        Ok(Arc::new(LocalStore::new(location)))
    }
}

/// The size of the object at `url` (`s3://bucket/prefix/name`, or a path),
/// `None` when there is none.
pub async fn object_size(url: &str) -> Result<Option<u64>, ObjectStoreError> {
    let names_a_key = url
        .strip_prefix("s3://")
        .is_none_or(|rest| rest.contains('/'));
    let (location, name) = url
        .rsplit_once('/')
        .filter(|(_, name)| names_a_key && !name.is_empty())
        .ok_or_else(|| ObjectStoreError::InvalidLocation {
            location: url.to_owned(),
            reason: "it names no object",
        })?;
    let store = open(location).await?;
    Ok(store
        .list(name)
        .await?
        .into_iter()
        .find(|listed| listed.key == name)
        .map(|listed| listed.size))
}

/// How [`read_modify_write_with`] retries a lost race.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// The backoff after the first lost race; doubled after each, up to
    /// `max_backoff`. Each wait is drawn uniformly from zero to that bound
    /// ("full jitter"), so writers that collided once do not collide again
    /// in lockstep.
    pub base_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // Enough for dozens of CI runners recording builds at once: each
        // round lets at least one writer through, and the jitter spreads
        // the rest.
        RetryPolicy {
            attempts: 50,
            base_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self, lost: u32) -> Duration {
        let bound = self
            .base_backoff
            .saturating_mul(1u32 << lost.min(16))
            .min(self.max_backoff);
        bound.mul_f64(fastrand::f64())
    }
}

/// A failed [`read_modify_write`]: the store's error, or the caller's.
#[derive(Debug, Error)]
pub enum UpdateError<E: std::error::Error + 'static> {
    #[error(transparent)]
    Store(#[from] ObjectStoreError),
    #[error(transparent)]
    Modify(E),
}

/// Updates `key` so that no concurrent update is lost: reads it, computes
/// the new content with `modify` (given the current content, `None` when
/// absent), and writes it conditionally on the version read, starting over
/// on a lost race. `modify` may therefore run several times and must only
/// depend on what it is given. Content `modify` leaves unchanged is not
/// written. Returns the version written (or found unchanged).
pub async fn read_modify_write<F, E>(
    store: &dyn ObjectStore,
    key: &str,
    modify: F,
) -> Result<Version, UpdateError<E>>
where
    F: FnMut(Option<&[u8]>) -> Result<Vec<u8>, E>,
    E: std::error::Error + 'static,
{
    read_modify_write_with(store, key, RetryPolicy::default(), modify).await
}

/// [`read_modify_write`] with its retries spelled out.
pub async fn read_modify_write_with<F, E>(
    store: &dyn ObjectStore,
    key: &str,
    policy: RetryPolicy,
    mut modify: F,
) -> Result<Version, UpdateError<E>>
where
    F: FnMut(Option<&[u8]>) -> Result<Vec<u8>, E>,
    E: std::error::Error + 'static,
{
    let attempts = policy.attempts.max(1);
    for attempt in 0..attempts {
        let current = store.get(key).await?;
        let new =
            modify(current.as_ref().map(|o| o.bytes.as_slice())).map_err(UpdateError::Modify)?;
        let written = match &current {
            Some(current) if current.bytes == new => return Ok(current.version.clone()),
            Some(current) => store.put_if_match(key, new, &current.version).await,
            None => store.put_if_absent(key, new).await,
        };
        match written {
            Ok(version) => return Ok(version),
            Err(err) if err.is_precondition_failed() => {
                if attempt + 1 < attempts {
                    tokio::time::sleep(policy.backoff(attempt)).await;
                }
            }
            Err(err) => return Err(err.into()),
        }
    }
    Err(ObjectStoreError::Contended {
        store: store.location(),
        key: key.to_owned(),
        attempts,
    }
    .into())
}

/// Refuses keys that could escape the store's directory, collide with the
/// local backend's own files, or mean different objects on the two
/// backends.
pub(crate) fn check_key(key: &str) -> Result<(), ObjectStoreError> {
    let invalid = |reason| ObjectStoreError::InvalidKey {
        key: key.to_owned(),
        reason,
    };
    if key.is_empty() {
        return Err(invalid("it is empty"));
    }
    if key.chars().any(|c| c.is_control() || c == '\\') {
        return Err(invalid("it holds a control character or a backslash"));
    }
    for segment in key.split('/') {
        if segment.is_empty() {
            return Err(invalid(
                "it starts or ends with `/`, or has `//` (an empty path segment)",
            ));
        }
        if segment.starts_with('.') {
            return Err(invalid(
                "a path segment starts with `.` (`.`, `..` and hidden names are reserved)",
            ));
        }
    }
    Ok(())
}

/// List prefixes are validated more loosely than keys: a prefix may end in
/// `/` or be empty, but may not climb out of the store.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), ObjectStoreError> {
    let trimmed = prefix.trim_end_matches('/');
    if trimmed.is_empty() {
        return Ok(());
    }
    check_key(trimmed).map_err(|_| ObjectStoreError::InvalidKey {
        key: prefix.to_owned(),
        reason: "as a list prefix: a segment starts with `.`, is empty, or holds a control character",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_object_is_found_by_its_url_and_not_by_a_prefix_of_its_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("disk.qcow2"), b"12345").unwrap();
        let url = |name: &str| format!("{}/{name}", dir.path().display());
        assert_eq!(object_size(&url("disk.qcow2")).await.unwrap(), Some(5));
        assert_eq!(object_size(&url("disk.qcow")).await.unwrap(), None);
        assert_eq!(object_size(&url("other")).await.unwrap(), None);
        assert!(matches!(
            object_size("s3://bucket").await,
            Err(ObjectStoreError::InvalidLocation { .. })
        ));
    }

    #[test]
    fn keys_that_escape_or_collide_are_refused() {
        for bad in [
            "",
            "/abs",
            "a//b",
            "a/",
            "../up",
            "a/../b",
            ".lock",
            "dir/.hidden",
            "tab\there",
            "back\\slash",
        ] {
            assert!(
                matches!(check_key(bad), Err(ObjectStoreError::InvalidKey { .. })),
                "{bad:?} should be refused"
            );
        }
        for good in ["catalog.json", "steps/abc.layer", "a/b/c-1.2_3"] {
            check_key(good).unwrap();
        }
        for prefix in ["", "steps/", "steps/ab"] {
            check_prefix(prefix).unwrap();
        }
        assert!(check_prefix("../").is_err());
    }

    #[test]
    fn backoff_stays_within_its_bound() {
        let policy = RetryPolicy {
            attempts: 5,
            base_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        };
        for lost in 0..40 {
            let wait = policy.backoff(lost);
            let bound = Duration::from_millis(10 << lost.min(3)).min(Duration::from_millis(50));
            assert!(
                wait <= bound,
                "wait {wait:?} after {lost} lost races exceeds {bound:?}"
            );
        }
    }

    #[tokio::test]
    async fn unknown_schemes_are_refused() {
        let err = open("gs://bucket/x").await.unwrap_err();
        assert!(
            matches!(err, ObjectStoreError::InvalidLocation { .. }),
            "{err}"
        );
    }
}
