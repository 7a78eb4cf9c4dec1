//! The step store's shared tier: an object store (`s3://bucket/prefix`, or
//! a directory every runner mounts) that CI runners share, so that a runner
//! with an empty local cache resumes from what another kept.
//!
//! An entry is two objects under `steps/`: its data, named by the entry key
//! and the data's SHA-256 (`<key>.<sha256>.layer`), and its record
//! (`<key>.json`, the local record's fields). The data goes up first and
//! the record is created only if absent: a reader finds a record only once
//! its data is whole, and when two runners keep the same key, the first
//! record wins and names the data it came with; the loser removes its own
//! data object. Downloads are verified against the record's SHA-256 (and
//! transferred in parallel parts by the S3 backend); an object that does
//! not match is reported and removed from the shared store.
//!
//! The shared tier is a cache: a failure to reach it, to fetch or to share
//! is a warning, and the build goes on with the local store alone.
//! `imgbuild cache prune` and eviction act on the local store only; a
//! bucket lifecycle rule expires the shared one.

use super::{Entry, EntryInfo, StepStore, StoreError, io_error};
use crate::common::artifact::sha256_file;
use crate::common::object_store::{self, ObjectStore, ObjectStoreError};
use crate::common::object_store::{LocalStore, S3Options, S3Store};
use crate::common::orphans::Removal;
use imgbuild_core::{BuildLog, Journal, Resource};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

pub(super) struct Remote {
    location: String,
    opened: tokio::sync::OnceCell<Option<Arc<dyn ObjectStore>>>,
}

fn record_key(key: &str) -> String {
    format!("steps/{key}.json")
}

fn data_key(key: &str, sha256: &str) -> String {
    format!("steps/{key}.{sha256}.layer")
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

impl Remote {
    pub(super) fn new(location: String) -> Remote {
        Remote {
            location,
            opened: tokio::sync::OnceCell::new(),
        }
    }

    pub(super) fn location(&self) -> &str {
        &self.location
    }

    /// The shared store, opened on first use; `None` (said once) when it
    /// cannot be opened.
    async fn store(&self, log: &BuildLog) -> Option<&Arc<dyn ObjectStore>> {
        self.opened
            .get_or_init(|| async {
                match object_store::open(&self.location).await {
                    Ok(store) => Some(store),
                    Err(err) => {
                        log.warn(format!(
                            "cannot open the shared step cache {}: {err}; this build uses the local step cache alone",
                            self.location
                        ));
                        None
                    }
                }
            })
            .await
            .as_ref()
    }

    /// Whether the store has no record for `key` (said as a warning when
    /// it cannot be read, which counts as not lacking it).
    async fn lacks(&self, key: &str, log: &BuildLog) -> bool {
        let Some(store) = self.store(log).await else {
            return false;
        };
        match store.get(&record_key(key)).await {
            Ok(found) => found.is_none(),
            Err(err) => {
                log.warn(format!(
                    "the shared step cache {} could not be read ({err}); this runner shares nothing",
                    store.location()
                ));
                false
            }
        }
    }

    /// Downloads the shared entry for `key` to `data` (replacing nothing
    /// unless it is whole and sound) and returns its record.
    pub(super) async fn fetch(&self, key: &str, data: &Path, log: &BuildLog) -> Option<Entry> {
        let store = self.store(log).await?;
        let warn = |what: String| {
            log.warn(format!(
                "the shared step cache {} {what}; the step runs again",
                store.location()
            ))
        };
        let record = match store.get(&record_key(key)).await {
            Ok(Some(object)) => object,
            Ok(None) => return None,
            Err(err) => {
                warn(format!("could not be read ({err})"));
                return None;
            }
        };
        let entry = match serde_json::from_slice::<Entry>(&record.bytes) {
            Ok(entry) if entry.key == key => entry,
            _ => {
                warn(format!("holds an unreadable record for {key}: removing it"));
                let _ = store
                    .delete_if_match(&record_key(key), &record.version)
                    .await;
                return None;
            }
        };
        let started = Instant::now();
        let source = data_key(key, &entry.sha256);
        match store
            .download_file(&source, data, &entry.sha256, &|_, _| {})
            .await
        {
            Ok(size) => {
                log.info(format!(
                    "fetched the step cache entry {} ({}) from {}: {:.1} MiB in {:.1}s",
                    &key[..key.len().min(12)],
                    entry.info.step,
                    store.location(),
                    mib(size),
                    started.elapsed().as_secs_f64()
                ));
                Some(entry)
            }
            Err(err @ (ObjectStoreError::Integrity { .. } | ObjectStoreError::NotFound { .. })) => {
                warn(format!(
                    "holds a damaged or incomplete entry {key} ({err}): removing it"
                ));
                // Unless another runner replaced the record meanwhile.
                if store
                    .delete_if_match(&record_key(key), &record.version)
                    .await
                    .is_ok()
                {
                    let _ = store.delete(&source).await;
                }
                None
            }
            Err(err) => {
                warn(format!("could not supply {key} ({err})"));
                None
            }
        }
    }

    /// Removes the shared entry for `key` if its record still names the
    /// data `sha256`: a runner found those bytes unusable. A record
    /// replaced since it was read (a newer entry, shared after someone else
    /// removed this one) stays, and so does everything it names. False
    /// when the record stays for a failure.
    pub(super) async fn forget(&self, key: &str, sha256: &str, log: &BuildLog) -> bool {
        let Some(store) = self.store(log).await else {
            return false;
        };
        let cannot = |what: &str, err: ObjectStoreError| {
            log.warn(format!(
                "could not {what} the shared step cache {} ({err}): its entry {} stays there",
                store.location(),
                &key[..key.len().min(12)]
            ));
            false
        };
        let record = match store.get(&record_key(key)).await {
            Ok(Some(record)) => record,
            Ok(None) => return true,
            Err(err) => return cannot("read", err),
        };
        if !serde_json::from_slice::<Entry>(&record.bytes).is_ok_and(|entry| entry.sha256 == sha256)
        {
            return true;
        }
        // The record first: a reader never finds a record without its data,
        // and data no record names is only a bucket's lifecycle rule's.
        match store
            .delete_if_match(&record_key(key), &record.version)
            .await
        {
            Ok(()) => {
                let _ = store.delete(&data_key(key, sha256)).await;
                true
            }
            Err(err) if err.is_precondition_failed() => true,
            Err(err) => cannot("update", err),
        }
    }

    /// Shares the local entry `entry`, whose data is at `data`, unless
    /// another runner shared the key first. With `journal`, the data's
    /// upload is recorded before it starts and released once the entry's
    /// record names it or it is removed again.
    pub(super) async fn share(
        &self,
        entry: &Entry,
        data: &Path,
        journal: Option<&(Arc<Journal>, String)>,
        log: &BuildLog,
    ) {
        let Some(store) = self.store(log).await else {
            return;
        };
        let started = Instant::now();
        let target = data_key(&entry.key, &entry.sha256);
        let recorded = match journal {
            Some((journal, build)) => {
                let resource = Resource::SharedObject {
                    location: self.location.clone(),
                    name: target.clone(),
                };
                match journal.record(build, resource) {
                    Ok(id) => Some((journal, id)),
                    Err(err) => {
                        log.warn(format!(
                            "not sharing the step cache entry {}: {err}",
                            &entry.key[..entry.key.len().min(12)]
                        ));
                        return;
                    }
                }
            }
            None => None,
        };
        // Whether the data object is settled: named by the entry's record,
        // or never stored, or removed again. Otherwise the journal keeps
        // it for `imgbuild clean`.
        let mut settled = true;
        let shared = async {
            if store.get(&record_key(&entry.key)).await?.is_some() {
                return Ok(false);
            }
            store.upload_file(&target, data, &|_, _| {}).await?;
            let record = serde_json::to_vec_pretty(entry).expect("entries serialize");
            match store.put_if_absent(&record_key(&entry.key), record).await {
                Ok(_) => Ok(true),
                Err(err) if err.is_precondition_failed() => {
                    // Another runner shared the key first. Its record may
                    // name the very object just written (the same bytes):
                    // that one stays.
                    let theirs = store
                        .get(&record_key(&entry.key))
                        .await
                        .ok()
                        .flatten()
                        .and_then(|record| serde_json::from_slice::<Entry>(&record.bytes).ok());
                    if theirs.is_none_or(|theirs| theirs.sha256 != entry.sha256) {
                        settled = store.delete(&target).await.is_ok();
                    }
                    Ok(false)
                }
                Err(err) => {
                    settled = store.delete(&target).await.is_ok();
                    Err(err)
                }
            }
        };
        let shared = shared.await;
        if let Some((journal, id)) = recorded
            && settled
            && let Err(err) = journal.release(id)
        {
            log.warn(format!("cannot update the run journal: {err}"));
        }
        match shared {
            Ok(true) => log.info(format!(
                "shared the step cache entry {} ({}) in {}: {:.1} MiB in {:.1}s",
                &entry.key[..entry.key.len().min(12)],
                entry.info.step,
                store.location(),
                mib(entry.size),
                started.elapsed().as_secs_f64()
            )),
            Ok(false) => {}
            Err(err) => log.warn(format!(
                "could not share the step cache entry {} in {}: {err}; other runners run that step themselves",
                &entry.key[..entry.key.len().min(12)],
                store.location()
            )),
        }
    }
}

impl StepStore {
    /// Whether this store is shared with other runners.
    pub fn is_shared(&self) -> bool {
        self.remote.is_some()
    }

    /// A file for data to share that the caller keeps elsewhere (a Docker
    /// engine keeps its images itself): created in the store's directory,
    /// recorded in the run journal first (see
    /// [`record_shares_in`](Self::record_shares_in)), removed on drop.
    pub fn scratch_file(&self) -> Result<Scratch, StoreError> {
        self.ensure_root()?;
        let path = self
            .root()
            .join(format!(".shared-{}.partial", uuid::Uuid::new_v4().simple()));
        let record = match self.journal.get() {
            Some((journal, build)) => {
                let resource = Resource::File { path: path.clone() };
                let id = journal
                    .record(build, resource)
                    .map_err(|err| StoreError::Io {
                        action: "record",
                        path: path.clone(),
                        source: std::io::Error::other(err.to_string()),
                    })?;
                Some((journal.clone(), id))
            }
            None => None,
        };
        let scratch = Scratch { path, record };
        std::fs::File::create(&scratch.path).map_err(io_error("create", &scratch.path))?;
        Ok(scratch)
    }

    /// Whether the shared store lacks `key`: worth making its data to
    /// [`share_file`](Self::share_file). False without a shared store, and
    /// when the shared store cannot be read (sharing would fail too).
    pub async fn shared_lacks(&self, key: &str, log: &BuildLog) -> bool {
        match &self.remote {
            Some(remote) => remote.lacks(key, log).await,
            None => false,
        }
    }

    /// Shares `data` under `key` without keeping a local entry, unless
    /// another runner shared the key first.
    pub async fn share_file(&self, key: &str, data: &Path, info: EntryInfo, log: &BuildLog) {
        let Some(remote) = &self.remote else {
            return;
        };
        let measured = tokio::task::spawn_blocking({
            let data = data.to_path_buf();
            move || sha256_file(&data)
        })
        .await;
        let (size, sha256) = match measured {
            Ok(Ok(measured)) => measured,
            Ok(Err(err)) => {
                log.warn(format!(
                    "cannot read {} to share it in the step cache: {err}",
                    data.display()
                ));
                return;
            }
            Err(err) => {
                log.warn(format!("cannot hash {}: {err}", data.display()));
                return;
            }
        };
        let entry = Entry::new(key.to_owned(), sha256, size, info);
        remote.share(&entry, data, self.journal.get(), log).await;
    }

    /// Records this store's shared uploads in the run journal under the
    /// build of `cx` before they start (the first call counts).
    pub fn record_shares_in(&self, cx: &imgbuild_core::StepContext) {
        let _ = self
            .journal
            .set((cx.journal.clone(), cx.build_name().to_owned()));
    }

    /// Downloads the shared entry for `key` into `data`, verified, without
    /// keeping a local entry; `None` when the shared store lacks it (or
    /// there is none).
    pub async fn fetch_file(&self, key: &str, data: &Path, log: &BuildLog) -> Option<Entry> {
        self.remote.as_ref()?.fetch(key, data, log).await
    }

    /// Shares this store's new entries in the object store at `location`
    /// (`s3://bucket/prefix`, or a directory), and fetches from it what
    /// is not kept locally.
    pub fn shared_with(mut self, location: Option<String>) -> StepStore {
        self.remote = location.map(Remote::new);
        self
    }

    /// Like [`shared_with`](Self::shared_with), through a store already
    /// open.
    pub fn shared_through(mut self, store: Arc<dyn ObjectStore>) -> StepStore {
        self.remote = Some(Remote {
            location: store.location(),
            opened: tokio::sync::OnceCell::new_with(Some(Some(store))),
        });
        self
    }
}

/// Removes what a killed run left of sharing an entry, as `imgbuild clean`
/// does for its journal's [`Resource::SharedObject`] record: the data
/// object `name` under `location` and any unfinished upload of it, unless
/// the entry's record names it (the run died after sharing it whole).
pub async fn remove_orphan_share(location: &str, name: &str) -> Result<Removal, String> {
    let store = object_store::open(location)
        .await
        .map_err(|err| format!("cannot open the shared step cache {location}: {err}"))?;
    let named_by = name
        .strip_prefix("steps/")
        .and_then(|rest| rest.strip_suffix(".layer"))
        .and_then(|rest| rest.rsplit_once('.'));
    if let Some((key, sha256)) = named_by {
        let record = store
            .get(&record_key(key))
            .await
            .map_err(|err| format!("cannot read {location}: {err}"))?;
        let entry = record.and_then(|record| serde_json::from_slice::<Entry>(&record.bytes).ok());
        if entry.is_some_and(|entry| entry.sha256 == sha256) {
            return Ok(Removal::NotOurs(
                "it is the data of a shared step cache entry, which other runners use".to_owned(),
            ));
        }
    }
    let aborted = if location.starts_with("s3://") {
        let s3 = S3Store::open(location, S3Options::default())
            .await
            .map_err(|err| format!("cannot open {location}: {err}"))?;
        s3.abort_uploads_of(name).await?
    } else {
        LocalStore::new(location)
            .remove_partials_of(name)
            .map_err(|err| err.to_string())?
    };
    let present = store
        .list(name)
        .await
        .map_err(|err| format!("cannot list {location}: {err}"))?
        .iter()
        .any(|listed| listed.key == name);
    if present {
        store
            .delete(name)
            .await
            .map_err(|err| format!("cannot remove {name} from {location}: {err}"))?;
    }
    Ok(if present || aborted > 0 {
        Removal::Removed
    } else {
        Removal::Absent
    })
}

/// A file of the step store's directory that goes away when dropped, and
/// is in the run journal while it exists.
pub struct Scratch {
    path: std::path::PathBuf,
    record: Option<(Arc<Journal>, imgbuild_core::ResourceId)>,
}

impl std::ops::Deref for Scratch {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let removed = match std::fs::remove_file(&self.path) {
            Ok(()) => true,
            Err(err) => err.kind() == std::io::ErrorKind::NotFound,
        };
        if let (true, Some((journal, id))) = (removed, self.record.take()) {
            let _ = journal.release(id);
        }
    }
}
