//! The object store as a local directory: a key is a file under the root.
//! Every write goes to a temporary file and is renamed into place, so a
//! reader sees an object whole or not at all; writes that depend on what is
//! there (create-only, replace-if-unchanged, and every replacement that
//! could race one) hold `<root>/.lock`, which serialises imgbuild processes
//! sharing the directory. An object's version is the SHA-256 of its
//! content, so it needs no record beside it.

use super::{
    Listed, Object, ObjectStore, ObjectStoreError, Progress, Uploaded, Version, check_key,
    check_prefix,
};
use crate::common::artifact::HashingWriter;
use async_trait::async_trait;
use imgbuild_core::fsutil::{parent_dir, write_atomic};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

const LOCK_FILE: &str = ".lock";
const COPY_CHUNK: usize = 8 << 20;

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ObjectStoreError {
    let path = path.to_path_buf();
    move |source| ObjectStoreError::Io {
        action,
        path,
        source,
    }
}

fn version_of(bytes: &[u8]) -> Version {
    Version(hex::encode(Sha256::digest(bytes)))
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    path: &Path,
    work: impl FnOnce() -> Result<T, ObjectStoreError> + Send + 'static,
) -> Result<T, ObjectStoreError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|join| ObjectStoreError::Io {
            action: "work on",
            path: path.to_path_buf(),
            source: io::Error::other(join.to_string()),
        })?
}

impl LocalStore {
    /// The store in `root`, created on the first write.
    pub fn new(root: impl Into<PathBuf>) -> LocalStore {
        LocalStore { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where `key` lives: a stable path, which a QEMU layer above it can
    /// name as its backing file.
    pub fn path(&self, key: &str) -> Result<PathBuf, ObjectStoreError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Removes the temporary files of unfinished uploads of `key`, and
    /// says how many there were: for a dead run's upload, whose key is its
    /// own (the local counterpart of aborting S3's multipart uploads).
    pub fn remove_partials_of(&self, key: &str) -> Result<usize, ObjectStoreError> {
        let target = self.path(key)?;
        let dir = parent_dir(&target);
        let prefix = partial_prefix(&target);
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(err) => return Err(io_error("list", dir)(err)),
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry.map_err(io_error("list", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix) && name.ends_with(PARTIAL_SUFFIX) {
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                    Err(err) => return Err(io_error("remove", &entry.path())(err)),
                }
            }
        }
        Ok(removed)
    }

    fn precondition_failed(&self, key: &str) -> ObjectStoreError {
        ObjectStoreError::PreconditionFailed {
            store: self.location(),
            key: key.to_owned(),
        }
    }

    /// Runs `work` holding the store's lock, off the async threads.
    async fn locked<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, ObjectStoreError> + Send + 'static,
    ) -> Result<T, ObjectStoreError> {
        let root = self.root.clone();
        blocking(&self.root, move || {
            std::fs::create_dir_all(&root)
                .map_err(io_error("create the store directory", &root))?;
            let lock_path = root.join(LOCK_FILE);
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(io_error("open the lock", &lock_path))?;
            lock.lock().map_err(io_error("lock", &lock_path))?;
            let result = work();
            drop(lock);
            result
        })
        .await
    }
}

fn read_current(path: &Path) -> Result<Option<Vec<u8>>, ObjectStoreError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(io_error("read", path)(err)),
    }
}

fn write_object(path: &Path, bytes: &[u8]) -> Result<(), ObjectStoreError> {
    let dir = parent_dir(path);
    std::fs::create_dir_all(dir).map_err(io_error("create", dir))?;
    write_atomic(path, bytes).map_err(io_error("write", path))
}

/// A hidden temporary file beside `target`, readable like any file the
/// store writes (layers are read by QEMU and by other users' tools).
/// How the temporary files of a write to `target` are named: hidden, and
/// found again by [`LocalStore::remove_partials_of`].
fn partial_prefix(target: &Path) -> String {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!(".{name}.")
}

const PARTIAL_SUFFIX: &str = ".partial";

pub(super) fn temp_beside(target: &Path) -> Result<tempfile::NamedTempFile, ObjectStoreError> {
    let dir = parent_dir(target);
    std::fs::create_dir_all(dir).map_err(io_error("create", dir))?;
    tempfile::Builder::new()
        .prefix(&partial_prefix(target))
        .suffix(PARTIAL_SUFFIX)
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(dir)
        .map_err(io_error("create a temporary file in", dir))
}

/// Copies `from` into `to` while hashing, on a blocking thread, reporting
/// each chunk to `progress` from this task. Returns the size and SHA-256.
async fn copy_hashing(
    mut from: File,
    from_path: &Path,
    to: File,
    to_path: &Path,
    total: u64,
    progress: Progress<'_>,
) -> Result<(u64, String), ObjectStoreError> {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let (from_path_owned, to_path_owned) = (from_path.to_path_buf(), to_path.to_path_buf());
    let copy = tokio::task::spawn_blocking(move || {
        let mut writer = HashingWriter::new(to);
        let mut buffer = vec![0u8; COPY_CHUNK];
        let mut done = 0u64;
        loop {
            let read = from
                .read(&mut buffer)
                .map_err(io_error("read", &from_path_owned))?;
            if read == 0 {
                break;
            }
            writer
                .write_all(&buffer[..read])
                .map_err(io_error("write", &to_path_owned))?;
            done += read as u64;
            let _ = done_tx.send(done);
        }
        let (file, size, sha256) = writer.finish();
        file.sync_all().map_err(io_error("flush", &to_path_owned))?;
        Ok::<_, ObjectStoreError>((size, sha256))
    });
    while let Some(done) = done_rx.recv().await {
        progress(done, total.max(done));
    }
    copy.await.map_err(|join| ObjectStoreError::Io {
        action: "copy",
        path: from_path.to_path_buf(),
        source: io::Error::other(join.to_string()),
    })?
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    async fn get(&self, key: &str) -> Result<Option<Object>, ObjectStoreError> {
        let path = self.path(key)?;
        let read_path = path.clone();
        let bytes = blocking(&path, move || read_current(&read_path)).await?;
        Ok(bytes.map(|bytes| Object {
            version: version_of(&bytes),
            bytes,
        }))
    }

    async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<Version, ObjectStoreError> {
        let path = self.path(key)?;
        let refused = self.precondition_failed(key);
        self.locked(move || {
            if path.try_exists().map_err(io_error("check", &path))? {
                return Err(refused);
            }
            write_object(&path, &bytes)?;
            Ok(version_of(&bytes))
        })
        .await
    }

    async fn put_if_match(
        &self,
        key: &str,
        bytes: Vec<u8>,
        version: &Version,
    ) -> Result<Version, ObjectStoreError> {
        let path = self.path(key)?;
        let refused = self.precondition_failed(key);
        let expected = version.clone();
        self.locked(move || {
            match read_current(&path)? {
                Some(current) if version_of(&current) == expected => {}
                _ => return Err(refused),
            }
            write_object(&path, &bytes)?;
            Ok(version_of(&bytes))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Listed>, ObjectStoreError> {
        check_prefix(prefix)?;
        let root = self.root.clone();
        let prefix = prefix.to_owned();
        blocking(&self.root, move || {
            let mut found = Vec::new();
            // Only the directories that can hold a match are walked.
            let start = match prefix.rfind('/') {
                Some(slash) => root.join(&prefix[..slash]),
                None => root.clone(),
            };
            let walker = walkdir::WalkDir::new(&start)
                .sort_by_file_name()
                .into_iter()
                .filter_entry(|e| {
                    e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.')
                });
            for entry in walker {
                let entry = match entry {
                    Ok(entry) => entry,
                    Err(err)
                        if err.io_error().map(io::Error::kind) == Some(io::ErrorKind::NotFound) =>
                    {
                        continue;
                    }
                    Err(err) => {
                        let path = err.path().unwrap_or(&start).to_path_buf();
                        return Err(ObjectStoreError::Io {
                            action: "list",
                            path,
                            source: err.into(),
                        });
                    }
                };
                if !entry.file_type().is_file() {
                    continue;
                }
                let Ok(relative) = entry.path().strip_prefix(&root) else {
                    continue;
                };
                let Some(key) = relative.to_str().map(str::to_owned) else {
                    continue;
                };
                if !key.starts_with(&prefix) {
                    continue;
                }
                let metadata = entry.metadata().map_err(|err| ObjectStoreError::Io {
                    action: "list",
                    path: entry.path().to_path_buf(),
                    source: err.into(),
                })?;
                found.push(Listed {
                    key,
                    size: metadata.len(),
                    modified: metadata.modified().ok(),
                });
            }
            found.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(found)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectStoreError> {
        let path = self.path(key)?;
        self.locked(move || match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(io_error("remove", &path)(err)),
        })
        .await
    }

    async fn delete_if_match(&self, key: &str, version: &Version) -> Result<(), ObjectStoreError> {
        let path = self.path(key)?;
        let refused = self.precondition_failed(key);
        let expected = version.clone();
        self.locked(move || match read_current(&path)? {
            None => Ok(()),
            Some(current) if version_of(&current) == expected => {
                std::fs::remove_file(&path).map_err(io_error("remove", &path))
            }
            Some(_) => Err(refused),
        })
        .await
    }

    async fn upload_file(
        &self,
        key: &str,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<Uploaded, ObjectStoreError> {
        let target = self.path(key)?;
        let source = File::open(path).map_err(io_error("open", path))?;
        let total = source.metadata().map_err(io_error("inspect", path))?.len();
        let temp = {
            let target = target.clone();
            blocking(&target.clone(), move || temp_beside(&target)).await?
        };
        let destination = temp
            .as_file()
            .try_clone()
            .map_err(io_error("open", temp.path()))?;
        let (size, sha256) =
            copy_hashing(source, path, destination, temp.path(), total, progress).await?;
        // Under the lock, so a replacement cannot slip between another
        // writer's conditional check and its rename.
        self.locked(move || {
            temp.persist(&target)
                .map_err(|err| io_error("rename into", &target)(err.error))?;
            Ok(())
        })
        .await?;
        Ok(Uploaded {
            size,
            version: Version(sha256.clone()),
            sha256,
        })
    }

    async fn download_file(
        &self,
        key: &str,
        path: &Path,
        expected_sha256: &str,
        progress: Progress<'_>,
    ) -> Result<u64, ObjectStoreError> {
        let stored = self.path(key)?;
        let source = match File::open(&stored) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(ObjectStoreError::NotFound {
                    store: self.location(),
                    key: key.to_owned(),
                });
            }
            Err(err) => return Err(io_error("open", &stored)(err)),
        };
        let total = source
            .metadata()
            .map_err(io_error("inspect", &stored))?
            .len();
        let temp = {
            let path = path.to_path_buf();
            blocking(&path.clone(), move || temp_beside(&path)).await?
        };
        let destination = temp
            .as_file()
            .try_clone()
            .map_err(io_error("open", temp.path()))?;
        let (size, sha256) =
            copy_hashing(source, &stored, destination, temp.path(), total, progress).await?;
        if !sha256.eq_ignore_ascii_case(expected_sha256) {
            return Err(ObjectStoreError::Integrity {
                store: self.location(),
                key: key.to_owned(),
                expected: expected_sha256.to_owned(),
                actual: sha256,
            });
        }
        temp.persist(path)
            .map_err(|err| io_error("rename into", path)(err.error))?;
        Ok(size)
    }
}

#[cfg(test)]
mod tests {
    use super::super::meddled::Meddled;
    use super::super::{RetryPolicy, UpdateError, read_modify_write, read_modify_write_with};
    use super::*;
    use crate::common::artifact::sha256_file;
    use std::os::unix::fs::MetadataExt;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn no_progress(_: u64, _: u64) {}

    #[tokio::test]
    async fn create_only_and_replace_only_the_version_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("store"));
        assert_eq!(store.get("a/b.json").await.unwrap(), None);

        let v1 = store
            .put_if_absent("a/b.json", b"one".to_vec())
            .await
            .unwrap();
        let err = store
            .put_if_absent("a/b.json", b"two".to_vec())
            .await
            .unwrap_err();
        assert!(err.is_precondition_failed(), "{err}");
        assert_eq!(store.get("a/b.json").await.unwrap().unwrap().bytes, b"one");

        let v2 = store
            .put_if_match("a/b.json", b"two".to_vec(), &v1)
            .await
            .unwrap();
        assert_ne!(v1, v2);
        // The version read before the replacement is stale now.
        let err = store
            .put_if_match("a/b.json", b"three".to_vec(), &v1)
            .await
            .unwrap_err();
        assert!(err.is_precondition_failed(), "{err}");
        let current = store.get("a/b.json").await.unwrap().unwrap();
        assert_eq!(
            (current.bytes.as_slice(), &current.version),
            (&b"two"[..], &v2)
        );

        // Removed since it was read: refused too, not recreated.
        store.delete("a/b.json").await.unwrap();
        store.delete("a/b.json").await.unwrap();
        let err = store
            .put_if_match("a/b.json", b"four".to_vec(), &v2)
            .await
            .unwrap_err();
        assert!(err.is_precondition_failed(), "{err}");
        assert_eq!(store.get("a/b.json").await.unwrap(), None);
    }

    #[tokio::test]
    async fn list_finds_keys_by_prefix_and_skips_the_stores_own_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        for key in [
            "steps/k1.layer",
            "steps/k1.json",
            "steps2/x",
            "catalog.json",
        ] {
            store
                .put_if_absent(key, key.as_bytes().to_vec())
                .await
                .unwrap();
        }
        std::fs::write(dir.path().join("steps/.k2.layer.x.partial"), b"half").unwrap();
        let keys = |listed: Vec<Listed>| listed.into_iter().map(|l| l.key).collect::<Vec<_>>();
        assert_eq!(
            keys(store.list("steps/").await.unwrap()),
            ["steps/k1.json", "steps/k1.layer"]
        );
        assert_eq!(
            keys(store.list("steps").await.unwrap()),
            ["steps/k1.json", "steps/k1.layer", "steps2/x"]
        );
        assert_eq!(keys(store.list("").await.unwrap()).len(), 4);
        assert!(store.list("nothing/").await.unwrap().is_empty());
        let listed = store.list("catalog").await.unwrap();
        assert_eq!(listed[0].size, "catalog.json".len() as u64);
    }

    #[tokio::test]
    async fn a_file_goes_in_and_comes_back_only_with_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("store"));
        let source = dir.path().join("layer");
        let content: Vec<u8> = (0..(20u32 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&source, &content).unwrap();

        let reported = AtomicU64::new(0);
        let progress = |done: u64, total: u64| {
            assert_eq!(total, content.len() as u64);
            reported.fetch_max(done, Ordering::SeqCst);
        };
        let uploaded = store
            .upload_file("steps/k.layer", &source, &progress)
            .await
            .unwrap();
        let (size, sha256) = sha256_file(&source).unwrap();
        assert_eq!((uploaded.size, &uploaded.sha256), (size, &sha256));
        assert_eq!(reported.load(Ordering::SeqCst), size);

        let back = dir.path().join("back");
        let got = store
            .download_file("steps/k.layer", &back, &sha256, &no_progress)
            .await
            .unwrap();
        assert_eq!(got, size);
        assert!(std::fs::read(&back).unwrap() == content);

        // A flipped bit in the store is caught and nothing is written.
        let stored = store.path("steps/k.layer").unwrap();
        let mut bytes = std::fs::read(&stored).unwrap();
        bytes[12345] ^= 1;
        std::fs::write(&stored, &bytes).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        let err = store
            .download_file("steps/k.layer", &elsewhere, &sha256, &no_progress)
            .await
            .unwrap_err();
        assert!(matches!(err, ObjectStoreError::Integrity { .. }), "{err}");
        assert!(!elsewhere.exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

        let err = store
            .download_file("steps/none.layer", &elsewhere, &sha256, &no_progress)
            .await
            .unwrap_err();
        assert!(matches!(err, ObjectStoreError::NotFound { .. }), "{err}");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("not JSON: {0}")]
    struct NotJson(#[from] serde_json::Error);

    fn append(item: String) -> impl FnMut(Option<&[u8]>) -> Result<Vec<u8>, NotJson> {
        move |current| {
            let mut items: Vec<String> = match current {
                Some(bytes) => serde_json::from_slice(bytes)?,
                None => Vec::new(),
            };
            items.push(item.clone());
            Ok(serde_json::to_vec(&items)?)
        }
    }

    /// Twenty writers on separate threads, each with its own runtime and
    /// its own handle on the directory (as separate imgbuild processes
    /// would be), append to one JSON list at once.
    #[test]
    fn twenty_concurrent_writers_lose_no_update() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let barrier = Arc::new(std::sync::Barrier::new(20));
        let writers: Vec<_> = (0..20)
            .map(|i| {
                let (root, barrier) = (root.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    let store = LocalStore::new(root);
                    barrier.wait();
                    runtime
                        .block_on(read_modify_write(
                            &store,
                            "catalog.json",
                            append(format!("w{i}")),
                        ))
                        .unwrap();
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        let store = LocalStore::new(root);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let object = runtime
            .block_on(store.get("catalog.json"))
            .unwrap()
            .unwrap();
        let mut items: Vec<String> = serde_json::from_slice(&object.bytes).unwrap();
        items.sort();
        let mut expected: Vec<String> = (0..20).map(|i| format!("w{i}")).collect();
        expected.sort();
        assert_eq!(items, expected);
    }

    #[tokio::test]
    async fn an_update_that_always_loses_gives_up_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        // Another writer changes the object after every read.
        let store = Meddled::new(LocalStore::new(dir.path()), |_, current| {
            let mut changed = current.unwrap_or_default().to_vec();
            changed.push(b' ');
            Some(changed)
        });
        let policy = RetryPolicy {
            attempts: 4,
            base_backoff: std::time::Duration::from_millis(1),
            max_backoff: std::time::Duration::from_millis(5),
        };
        let mut calls = 0;
        let err = read_modify_write_with(&store, "catalog.json", policy, |_| {
            calls += 1;
            Ok::<_, NotJson>(b"[\"mine\"]".to_vec())
        })
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                UpdateError::Store(ObjectStoreError::Contended { attempts: 4, .. })
            ),
            "{err}"
        );
        assert_eq!(calls, 4);
        assert!(err.to_string().contains("after 4 attempts"), "{err}");
    }

    #[tokio::test]
    async fn the_callers_error_stops_the_update_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        store
            .put_if_absent("catalog.json", b"{not json".to_vec())
            .await
            .unwrap();
        let err = read_modify_write(&store, "catalog.json", append("x".into()))
            .await
            .unwrap_err();
        assert!(matches!(err, UpdateError::Modify(NotJson(_))), "{err}");
        assert_eq!(
            store.get("catalog.json").await.unwrap().unwrap().bytes,
            b"{not json"
        );
    }

    #[tokio::test]
    async fn unchanged_content_is_not_written_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path());
        let v1 = store.put_if_absent("k", b"same".to_vec()).await.unwrap();
        let path = store.path("k").unwrap();
        // Every write renames a new file into place: the same inode means
        // nothing was written.
        let before = std::fs::metadata(&path).unwrap().ino();
        let v2 = read_modify_write(&store, "k", |c| Ok::<_, NotJson>(c.unwrap().to_vec()))
            .await
            .unwrap();
        assert_eq!(v1, v2);
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), before);
    }
}
