//! The local step store: files (a QEMU disk layer, say) kept under a step
//! key, for later builds to start from.
//!
//! An entry is `<key>.layer` with `<key>.json` beside it (its SHA-256,
//! size, what made it, when it was last used). Both appear only complete:
//! the data is copied to a temporary name and renamed, and the record is
//! written last, atomically. An entry is verified on every use; one whose
//! record is missing or whose data does not match it (a crash mid-put, a
//! bit flip, a hand edit) is reported, removed and treated as absent, never
//! used. A lock per key lets concurrent builds share the store: the second
//! to keep a key finds it present and keeps nothing.
//!
//! A store may also be shared with other runners (see [`remote`]): an entry
//! missing here is fetched from there, and a new one is shared.

mod remote;

pub use remote::{Scratch, remove_orphan_share};

use crate::common::artifact::sha256_file;
use imgbuild_core::BuildLog;
use imgbuild_core::fsutil::write_atomic;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "cannot {action} {path} in the step cache: {source}; set IMGBUILD_CACHE_DIR to a writable directory, or pass --no-cache"
    )]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// What an entry is, as `imgbuild cache ls` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EntryInfo {
    /// The image and build that kept it.
    pub image: String,
    pub build: String,
    /// "step 2 (shell (setup.sh))", "final".
    pub step: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub sha256: String,
    pub size: u64,
    #[serde(flatten)]
    pub info: EntryInfo,
    /// RFC 3339.
    pub created: String,
    pub last_used: String,
    pub hits: u64,
}

impl Entry {
    /// A new entry, made and last used now, never hit.
    fn new(key: String, sha256: String, size: u64, info: EntryInfo) -> Entry {
        let time = now();
        Entry {
            key,
            sha256,
            size,
            info,
            created: time.clone(),
            last_used: time,
            hits: 0,
        }
    }
}

pub struct StepStore {
    root: PathBuf,
    remote: Option<remote::Remote>,
    /// The run journal and build that record shared uploads before they
    /// start, so that `imgbuild clean` finds what a killed run left.
    journal: std::sync::OnceLock<(std::sync::Arc<imgbuild_core::Journal>, String)>,
}

impl std::fmt::Debug for StepStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepStore")
            .field("root", &self.root)
            .field(
                "shared",
                &self.remote.as_ref().map(|remote| remote.location()),
            )
            .finish()
    }
}

/// Held while a key is checked and kept; released on drop.
pub struct KeyLock {
    _file: File,
}

impl StepStore {
    /// `IMGBUILD_CACHE_DIR`, else `$XDG_CACHE_HOME/imgbuild/steps`, else
    /// `~/.cache/imgbuild/steps`.
    pub fn default_root() -> PathBuf {
        if let Some(dir) = std::env::var_os("IMGBUILD_CACHE_DIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir).join("imgbuild/steps");
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        home.join(".cache/imgbuild/steps")
    }

    pub fn at(root: impl Into<PathBuf>) -> StepStore {
        StepStore {
            root: root.into(),
            remote: None,
            journal: std::sync::OnceLock::new(),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the data of `key` lives once kept: a stable path, so a QEMU
    /// layer above it can name it as its backing file.
    pub fn path(&self, key: &str) -> PathBuf {
        self.root.join(format!("{key}.layer"))
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.root.join(format!("{key}.json"))
    }

    fn ensure_root(&self) -> Result<(), StoreError> {
        std::fs::create_dir_all(self.root.join(".locks")).map_err(io_error("create", &self.root))
    }

    /// Waits for the lock on `key`.
    pub async fn lock(&self, key: &str) -> Result<KeyLock, StoreError> {
        self.ensure_root()?;
        let path = self.root.join(".locks").join(format!("{key}.lock"));
        tokio::task::spawn_blocking(move || {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io_error("open the lock", &path))?;
            file.lock().map_err(io_error("lock", &path))?;
            Ok(KeyLock { _file: file })
        })
        .await
        .map_err(|err| StoreError::Io {
            action: "lock",
            path: self.root.clone(),
            source: std::io::Error::other(err.to_string()),
        })?
    }

    /// The entry for `key` if it is present and sound (its data hashes to
    /// its record), counting the use. An unsound entry is reported in `log`
    /// and removed. An absent or removed entry is fetched from the shared
    /// store, if there is one and it holds the key; otherwise `None`.
    pub async fn get(&self, key: &str, log: &BuildLog) -> Option<Entry> {
        self.get_or_fetch(key, true, log).await
    }

    /// Like [`get`](Self::get), without asking the shared store: for a
    /// check that only decides whether to keep an entry of one's own.
    pub async fn get_local(&self, key: &str, log: &BuildLog) -> Option<Entry> {
        self.get_or_fetch(key, false, log).await
    }

    async fn get_or_fetch(&self, key: &str, fetch: bool, log: &BuildLog) -> Option<Entry> {
        let record_path = self.record_path(key);
        let data = self.path(key);
        let record = match std::fs::read(&record_path) {
            Ok(bytes) => serde_json::from_slice::<Entry>(&bytes).ok(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                if data.exists() {
                    log.warn(format!(
                        "the step cache holds {} without its record (a build died while keeping it): removing it",
                        data.display()
                    ));
                    let _ = std::fs::remove_file(&data);
                }
                return self.fetch_if(fetch, key, log).await;
            }
            Err(_) => None,
        };
        let measured = tokio::task::spawn_blocking({
            let data = data.clone();
            move || sha256_file(&data)
        })
        .await
        .ok()
        .and_then(Result::ok);
        let sound = match (&record, &measured) {
            (Some(record), Some((size, sha256))) => {
                record.key == key && record.size == *size && record.sha256 == *sha256
            }
            _ => false,
        };
        if !sound {
            log.warn(format!(
                "the step cache entry {key} is corrupt or incomplete ({}): discarding it; the step runs again",
                match (&record, &measured) {
                    (None, _) => "its record is unreadable".to_owned(),
                    (Some(_), None) => format!("{} is missing or unreadable", data.display()),
                    (Some(record), Some((_, sha256))) => format!(
                        "sha256 {} where {} was kept",
                        &sha256[..12],
                        &record.sha256[..record.sha256.len().min(12)]
                    ),
                }
            ));
            self.remove(key);
            // The shared store may still hold it whole.
            return self.fetch_if(fetch, key, log).await;
        }
        let mut entry = record?;
        entry.hits += 1;
        entry.last_used = now();
        // Counting a use is bookkeeping: a read-only store still serves.
        let _ = write_atomic(
            &record_path,
            &serde_json::to_vec_pretty(&entry).unwrap_or_default(),
        );
        Some(entry)
    }

    /// With `fetch` and a shared store, the shared store's entry for `key`
    /// installed here; `None` otherwise.
    async fn fetch_if(&self, fetch: bool, key: &str, log: &BuildLog) -> Option<Entry> {
        match (&self.remote, fetch) {
            (Some(remote), true) => self.fetch(remote, key, log).await,
            _ => None,
        }
    }

    /// Installs the shared store's entry for `key` here.
    async fn fetch(&self, remote: &remote::Remote, key: &str, log: &BuildLog) -> Option<Entry> {
        self.ensure_root().ok()?;
        let data = self.path(key);
        let mut entry = remote.fetch(key, &data, log).await?;
        entry.hits = 1;
        entry.last_used = now();
        let bytes = serde_json::to_vec_pretty(&entry).expect("entries serialize");
        if let Err(err) = write_atomic(&self.record_path(key), &bytes) {
            log.warn(format!(
                "cannot write the record of the fetched step cache entry {key}: {err}; the step runs again"
            ));
            let _ = std::fs::remove_file(&data);
            return None;
        }
        Some(entry)
    }

    /// Keeps a copy of `source` under `key`, unless a sound entry is
    /// already there (another build kept it first), and shares it. Call
    /// with the key's lock held.
    pub async fn put(
        &self,
        key: &str,
        source: &Path,
        info: EntryInfo,
        log: &BuildLog,
    ) -> Result<Entry, StoreError> {
        if let Some(existing) = self.get_local(key, log).await {
            return Ok(existing);
        }
        let entry = self.put_local(key, source, info).await?;
        if let Some(remote) = &self.remote {
            remote
                .share(&entry, &self.path(key), self.journal.get(), log)
                .await;
        }
        Ok(entry)
    }

    async fn put_local(
        &self,
        key: &str,
        source: &Path,
        info: EntryInfo,
    ) -> Result<Entry, StoreError> {
        self.ensure_root()?;
        let temp = self
            .root
            .join(format!(".{key}.{}.partial", uuid::Uuid::new_v4().simple()));
        let (data, record_path) = (self.path(key), self.record_path(key));
        let source = source.to_path_buf();
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            let result = (|| {
                std::fs::copy(&source, &temp).map_err(io_error("copy into", &temp))?;
                File::open(&temp)
                    .and_then(|file| file.sync_all())
                    .map_err(io_error("flush", &temp))?;
                let (size, sha256) = sha256_file(&temp).map_err(io_error("hash", &temp))?;
                std::fs::rename(&temp, &data).map_err(io_error("store", &data))?;
                let entry = Entry::new(key, sha256, size, info);
                let bytes = serde_json::to_vec_pretty(&entry).expect("entries serialize");
                write_atomic(&record_path, &bytes).map_err(io_error("write", &record_path))?;
                Ok(entry)
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&temp);
            }
            result
        })
        .await
        .map_err(|err| StoreError::Io {
            action: "keep",
            path: self.root.clone(),
            source: std::io::Error::other(err.to_string()),
        })?
    }

    /// Every entry with a readable record, oldest use first.
    pub fn list(&self) -> Vec<Entry> {
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut entries: Vec<Entry> = dir
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|bytes| serde_json::from_slice(&bytes).ok())
            .collect();
        entries.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.key.cmp(&b.key)));
        entries
    }

    /// Which entries a prune removes: all of them with `all`; otherwise
    /// those last used longer ago than `older_than`, then the least
    /// recently used until the rest fit in `max_size` bytes.
    pub fn select_for_prune(
        &self,
        max_size: Option<u64>,
        older_than: Option<std::time::Duration>,
        all: bool,
    ) -> Vec<Entry> {
        let entries = self.list();
        if all {
            return entries;
        }
        let now = time::OffsetDateTime::now_utc();
        let age = |entry: &Entry| {
            time::OffsetDateTime::parse(
                &entry.last_used,
                &time::format_description::well_known::Rfc3339,
            )
            .ok()
            .and_then(|used| std::time::Duration::try_from(now - used).ok())
        };
        let (mut chosen, kept): (Vec<Entry>, Vec<Entry>) = entries
            .into_iter()
            .partition(|e| matches!((older_than, age(e)), (Some(limit), Some(age)) if age > limit));
        if let Some(limit) = max_size {
            let mut total: u64 = kept.iter().map(|e| e.size).sum();
            // `list` is oldest use first.
            for entry in kept {
                if total <= limit {
                    break;
                }
                total -= entry.size;
                chosen.push(entry);
            }
        }
        chosen
    }

    /// Removes the `base-<sha256>` links QEMU layers stand on (a hard link
    /// keeps a base's bytes): with every entry gone, none is needed.
    pub fn remove_base_links(&self) {
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in dir.filter_map(Result::ok) {
            if entry.file_name().to_string_lossy().starts_with("base-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Removes the entry `key` holding the bytes `sha256`, which verified
    /// but proved unusable, here and, with `everywhere`, from the shared
    /// store, so that no runner fetches it again and the next to make it
    /// shares a new one. An entry kept since with other bytes stays. Call
    /// with the key's lock held. False when the shared store could not be
    /// told.
    pub async fn discard(&self, key: &str, sha256: &str, everywhere: bool, log: &BuildLog) -> bool {
        let kept = std::fs::read(self.record_path(key))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Entry>(&bytes).ok());
        if kept.is_some_and(|entry| entry.sha256 == sha256) {
            self.remove(key);
        }
        match (&self.remote, everywhere) {
            (Some(remote), true) => remote.forget(key, sha256, log).await,
            _ => true,
        }
    }

    /// Removes an entry: its record first, so a reader never finds a record
    /// without its data.
    pub fn remove(&self, key: &str) {
        let _ = std::fs::remove_file(self.record_path(key));
        let _ = std::fs::remove_file(self.path(key));
    }
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgbuild_core::events::MemorySink;
    use std::sync::Arc;

    fn info() -> EntryInfo {
        EntryInfo {
            image: "web".into(),
            build: "vm".into(),
            step: "step 1 (shell)".into(),
        }
    }

    fn log() -> (Arc<MemorySink>, BuildLog) {
        let sink = Arc::new(MemorySink::default());
        let log = BuildLog::root(sink.clone(), imgbuild_core::Redactor::new());
        (sink, log)
    }

    #[tokio::test]
    async fn a_kept_file_comes_back_verified_and_counts_its_uses() {
        let dir = tempfile::tempdir().unwrap();
        let store = StepStore::at(dir.path().join("steps"));
        let source = dir.path().join("layer");
        std::fs::write(&source, b"disk delta").unwrap();
        let (_, log) = log();
        let _lock = store.lock("k1").await.unwrap();
        let kept = store.put("k1", &source, info(), &log).await.unwrap();
        assert_eq!(kept.size, 10);
        assert_eq!(std::fs::read(store.path("k1")).unwrap(), b"disk delta");
        let got = store.get("k1", &log).await.unwrap();
        assert_eq!(got.hits, 1);
        assert_eq!(store.list().len(), 1);
        assert!(store.get("absent", &log).await.is_none());
        // No temporary file is left beside the entry.
        let names: Vec<String> = std::fs::read_dir(store.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".locks"))
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[tokio::test]
    async fn a_bit_flipped_or_recordless_entry_is_reported_removed_and_never_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = StepStore::at(dir.path());
        let source = dir.path().join("layer");
        std::fs::write(&source, b"disk delta").unwrap();
        let (sink, log) = log();
        store.put("k1", &source, info(), &log).await.unwrap();
        std::fs::write(store.path("k1"), b"disk delTa").unwrap();
        assert!(store.get("k1", &log).await.is_none());
        assert!(!store.path("k1").exists());
        assert!(format!("{:?}", sink.events()).contains("corrupt"));

        // Data whose record was never written: a put that died midway.
        std::fs::write(store.path("k2"), b"half").unwrap();
        assert!(store.get("k2", &log).await.is_none());
        assert!(!store.path("k2").exists());
    }

    #[tokio::test]
    async fn prune_takes_the_least_recently_used_until_the_rest_fit() {
        let dir = tempfile::tempdir().unwrap();
        let store = StepStore::at(dir.path().join("s"));
        let (_, log) = log();
        for (key, size) in [("old", 40), ("mid", 30), ("new", 20)] {
            let source = dir.path().join(key);
            std::fs::write(&source, vec![b'x'; size]).unwrap();
            store.put(key, &source, info(), &log).await.unwrap();
            // Distinct last-use times, oldest first.
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        }
        let keys = |entries: Vec<Entry>| entries.into_iter().map(|e| e.key).collect::<Vec<_>>();
        assert_eq!(
            keys(store.select_for_prune(Some(40), None, false)),
            ["old", "mid"]
        );
        assert_eq!(
            keys(store.select_for_prune(Some(90), None, false)),
            Vec::<String>::new()
        );
        assert_eq!(keys(store.select_for_prune(None, None, true)).len(), 3);
        assert_eq!(
            keys(store.select_for_prune(None, Some(std::time::Duration::from_secs(3600)), false)),
            Vec::<String>::new()
        );
    }

    #[tokio::test]
    async fn a_second_put_of_a_kept_key_keeps_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = StepStore::at(dir.path().join("s"));
        let (first, second) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&first, b"first").unwrap();
        std::fs::write(&second, b"second").unwrap();
        let (_, log) = log();
        store.put("k", &first, info(), &log).await.unwrap();
        let entry = store.put("k", &second, info(), &log).await.unwrap();
        assert_eq!(entry.size, 5);
        assert_eq!(std::fs::read(store.path("k")).unwrap(), b"first");
    }

    /// A run killed while sharing leaves its journal's record of the data
    /// object, and `imgbuild clean` removes the object, unless the entry's
    /// record names it; a share that finished releases its record.
    #[tokio::test]
    async fn clean_removes_the_data_of_a_share_cut_off_before_its_record() {
        use crate::common::object_store;
        use crate::common::orphans::{Cleaned, clean_outstanding};
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared").display().to_string();
        let store = StepStore::at(dir.path().join("s")).shared_with(Some(shared.clone()));
        let t = crate::common::testing::TestContext::new("vm");
        store.record_shares_in(&t.cx);
        let source = dir.path().join("layer");
        std::fs::write(&source, b"disk delta").unwrap();
        let whole = store.put("k1", &source, info(), &t.cx.log).await.unwrap();
        assert!(
            t.cx.journal.outstanding().is_empty(),
            "a finished share is released"
        );

        let objects = object_store::open(&shared).await.unwrap();
        let cut_off = "steps/k2.0123abcd.layer";
        objects
            .upload_file(cut_off, &source, &|_, _| {})
            .await
            .unwrap();
        let clean = |name: &str| {
            let id =
                t.cx.journal
                    .record(
                        "vm",
                        imgbuild_core::Resource::SharedObject {
                            location: shared.clone(),
                            name: name.to_owned(),
                        },
                    )
                    .unwrap();
            let item =
                t.cx.journal
                    .outstanding()
                    .into_iter()
                    .find(|item| item.id == id)
                    .unwrap();
            async move { clean_outstanding(&item, "r1", std::time::SystemTime::now()).await }
        };
        // What a run killed in the middle of copying it leaves beside it.
        let half_copied = dir
            .path()
            .join("shared/steps/.k2.0123abcd.layer.Xy12ab.partial");
        std::fs::write(&half_copied, b"disk").unwrap();
        assert!(matches!(clean(cut_off).await, Ok(Cleaned::Removed)));
        assert!(objects.list(cut_off).await.unwrap().is_empty());
        assert!(!half_copied.exists(), "{}", half_copied.display());
        assert!(
            matches!(clean(cut_off).await, Ok(Cleaned::Removed)),
            "gone counts as removed"
        );

        let in_use = format!("steps/k1.{}.layer", whole.sha256);
        assert!(matches!(clean(&in_use).await, Ok(Cleaned::NotOurs(_))));
        assert_eq!(objects.list(&in_use).await.unwrap().len(), 1);
    }

    /// An entry that verified but proved unusable leaves the shared store
    /// too, if asked to; one kept anew since, here or there, stays.
    #[tokio::test]
    async fn a_discarded_entry_leaves_the_shared_store_unless_it_was_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared").display().to_string();
        let runner =
            |name: &str| StepStore::at(dir.path().join(name)).shared_with(Some(shared.clone()));
        let (_, log) = log();
        let (bad, good) = (dir.path().join("bad"), dir.path().join("good"));
        std::fs::write(&bad, b"unusable state").unwrap();
        std::fs::write(&good, b"a newer state").unwrap();

        let first = runner("one");
        let kept = first.put("k", &bad, info(), &log).await.unwrap();
        let second = runner("two");
        assert!(second.get("k", &log).await.is_some(), "not shared");
        assert!(second.discard("k", &kept.sha256, false, &log).await);
        assert!(second.get_local("k", &log).await.is_none());
        assert!(
            runner("three").get("k", &log).await.is_some(),
            "discarded from the shared store when only this runner's was meant"
        );
        assert!(second.discard("k", &kept.sha256, true, &log).await);
        assert!(
            runner("four").get("k", &log).await.is_none(),
            "a fourth runner fetched the discarded entry"
        );

        // Good bytes are shared under the key, and kept here too, before
        // `first` discards what it found: the newer entry stays everywhere.
        let newer = runner("five").put("k", &good, info(), &log).await.unwrap();
        assert!(first.discard("k", &kept.sha256, true, &log).await);
        let fetched = runner("six").get("k", &log).await.unwrap();
        assert_eq!(fetched.sha256, newer.sha256);
        let here = runner("five");
        assert!(here.discard("k", &kept.sha256, true, &log).await);
        assert_eq!(
            here.get_local("k", &log).await.unwrap().sha256,
            newer.sha256
        );
    }

    /// Between a runner's read of a shared record and its removal, another
    /// runner removes the entry and shares a newer one under the key: the
    /// newer one stays.
    #[tokio::test]
    async fn a_discard_leaves_a_record_replaced_after_it_was_read() {
        use crate::common::object_store::meddled::Meddled;
        use crate::common::object_store::{LocalStore, ObjectStore};
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        let (_, log) = log();
        let (bad, good) = (dir.path().join("bad"), dir.path().join("good"));
        std::fs::write(&bad, b"unusable state").unwrap();
        std::fs::write(&good, b"a newer state").unwrap();
        let kept = StepStore::at(dir.path().join("one"))
            .shared_with(Some(shared.display().to_string()))
            .put("k", &bad, info(), &log)
            .await
            .unwrap();
        let (_, newer_sha256) = crate::common::artifact::sha256_file(&good).unwrap();
        LocalStore::new(&shared)
            .upload_file(&format!("steps/k.{newer_sha256}.layer"), &good, &|_, _| {})
            .await
            .unwrap();

        let racing = Arc::new(AtomicBool::new(false));
        let meddled = {
            let racing = racing.clone();
            let newer_sha256 = newer_sha256.clone();
            Meddled::new(LocalStore::new(&shared), move |key, current| {
                if key != "steps/k.json" || !racing.swap(false, Ordering::SeqCst) {
                    return None;
                }
                let mut newer: serde_json::Value = serde_json::from_slice(current?).unwrap();
                newer["sha256"] = newer_sha256.clone().into();
                newer["size"] = 13.into();
                Some(serde_json::to_vec(&newer).unwrap())
            })
        };
        let second = StepStore::at(dir.path().join("two")).shared_through(Arc::new(meddled));
        assert_eq!(second.get("k", &log).await.unwrap().sha256, kept.sha256);
        racing.store(true, Ordering::SeqCst);
        assert!(second.discard("k", &kept.sha256, true, &log).await);
        assert!(!racing.load(Ordering::SeqCst), "the discard read no record");

        let fetched = StepStore::at(dir.path().join("three"))
            .shared_with(Some(shared.display().to_string()))
            .get("k", &log)
            .await
            .expect("the newer entry left the shared store");
        assert_eq!(fetched.sha256, newer_sha256);
    }
}
