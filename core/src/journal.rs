//! The durable record of what a run has created.
//!
//! Every resource is written here (and flushed to disk) *before* the call that
//! creates it, and marked released once it is cleaned up or handed over as an
//! artifact. The running process holds an exclusive lock on its journal, so a
//! journal whose lock can be taken belongs to a run that died, by SIGKILL or a
//! CI timeout, and lists exactly what it left behind.
//!
//! A journal only ever appears under its final name already locked, and only
//! journals that are plain files of the current user, in a runs directory
//! that is a real directory of that user, are read: anything else in the
//! state directory could make `imgbuild clean` act on resources it was never
//! given.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("cannot {action} the run journal {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing {path}: {reason}")]
    Refused { path: PathBuf, reason: String },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io {
        action,
        path,
        source,
    }
}

/// Something a build creates that must not outlive it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resource {
    /// A local process that writes its pid to `pidfile`. Once started, its
    /// pid and kernel start time (clock ticks after boot, field 22 of
    /// `/proc/PID/stat`) are recorded: together they name exactly one
    /// process, so a recycled pid, or another process whose command line
    /// merely mentions the build, is never signalled.
    Process {
        pidfile: PathBuf,
        description: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        start_time: Option<u64>,
    },
    File {
        path: PathBuf,
    },
    Directory {
        path: PathBuf,
    },
    /// A file of an artifact that no manifest records yet, named by its
    /// path and by the inode it had when recorded: a file written at that
    /// path since (the version built again, and recorded) is another file,
    /// and is left alone.
    ArtifactFile {
        path: PathBuf,
        device: u64,
        inode: u64,
    },
    /// An object a build is putting into an object store shared with other
    /// runners (a step cache entry's data): `name` under `location`.
    /// Recorded before the upload starts, released once the entry's record
    /// names it or it is removed again.
    SharedObject {
        location: String,
        name: String,
    },
    /// Something a builder made (a container, an instance, a key pair): the
    /// journal carries the builder's own record of it without reading it,
    /// and `imgbuild clean` hands it back to the builder of that name.
    Builder(BuilderResource),
    /// A record in the journal of another imgbuild version, of a kind this
    /// one does not have, as written. Never created by a build: it keeps a
    /// leftover this version cannot remove from being forgotten.
    Unreadable {
        record: serde_json::Value,
    },
}

/// A builder's resource, opaque to the journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuilderResource {
    /// The builder kind that made it and knows how to remove it (`type` in
    /// the config: "docker", "ec2").
    pub builder: String,
    /// One line naming it for `imgbuild clean`, written when it is recorded,
    /// so even a record no builder here can read is shown for what it is.
    pub description: String,
    /// The builder's own record, in the builder's own shape.
    pub data: serde_json::Value,
}

impl BuilderResource {
    /// The builder's record read back into its own type.
    pub fn read<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.data)
    }
}

impl Resource {
    pub fn describe(&self) -> String {
        match self {
            Resource::Process {
                description,
                pidfile,
                ..
            } => format!("{description} (pid file {})", pidfile.display()),
            Resource::File { path } => format!("file {}", path.display()),
            Resource::Directory { path } => format!("directory {}", path.display()),
            Resource::ArtifactFile { path, .. } => {
                format!("unrecorded artifact file {}", path.display())
            }
            Resource::SharedObject { location, name } => {
                format!("the shared object {name} in {location}")
            }
            Resource::Builder(resource) => resource.description.clone(),
            Resource::Unreadable { record } => {
                format!("a resource recorded by another version of imgbuild: {record}")
            }
        }
    }
}

pub type ResourceId = u64;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    Run {
        run_id: String,
        pid: u32,
        started_at: String,
        config: String,
    },
    Create {
        id: ResourceId,
        build: String,
        resource: Resource,
        /// When the record was written, Unix milliseconds (absent in
        /// journals of older versions).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        at: Option<u64>,
    },
    /// The creating call returned: the resource exists (an `Update` says so
    /// too).
    Created {
        id: ResourceId,
    },
    Update {
        id: ResourceId,
        resource: Resource,
    },
    Release {
        id: ResourceId,
    },
}

/// A resource still outstanding in a journal.
#[derive(Debug, Clone)]
pub struct Outstanding {
    pub id: ResourceId,
    pub build: String,
    pub resource: Resource,
    /// The creating call returned. When it did not, the call may still be
    /// completing (a Docker engine goes on creating a container after the
    /// client died), so not finding the resource does not prove it absent.
    pub confirmed: bool,
    /// When the resource was recorded, just before its creating call;
    /// `None` in journals of older versions.
    pub recorded_at: Option<SystemTime>,
}

impl Outstanding {
    /// How long ago the resource was recorded; `None` when unknown.
    pub fn age(&self, now: SystemTime) -> Option<Duration> {
        self.recorded_at
            .map(|at| now.duration_since(at).unwrap_or_default())
    }
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn from_millis(millis: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(millis)
}

struct Inner {
    file: File,
    next_id: ResourceId,
    outstanding: BTreeMap<ResourceId, Outstanding>,
}

pub struct Journal {
    run_id: String,
    path: PathBuf,
    inner: Mutex<Inner>,
}

/// Where imgbuild keeps run journals: `$IMGBUILD_STATE_DIR`, else
/// `$XDG_STATE_HOME/imgbuild`, else `~/.local/state/imgbuild`.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("IMGBUILD_STATE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("imgbuild");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".local/state/imgbuild")
}

fn runs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("runs")
}

fn refused(path: &Path, reason: impl Into<String>) -> JournalError {
    JournalError::Refused {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Checks what is found at a journal's place: a plain file (directory for
/// the runs directory) of this user, never a link to somewhere else.
fn check_owned(path: &Path, meta: &std::fs::Metadata, dir: bool) -> Result<(), JournalError> {
    let what = if dir {
        "the run journals directory"
    } else {
        "the run journal"
    };
    if meta.file_type().is_symlink() {
        return Err(refused(
            path,
            format!(
                "{what} is a symbolic link; imgbuild never makes one there, so remove it (and check where it points)"
            ),
        ));
    }
    if dir && !meta.is_dir() || !dir && !meta.is_file() {
        return Err(refused(
            path,
            format!(
                "{what} is not a plain {}; remove it",
                if dir { "directory" } else { "file" }
            ),
        ));
    }
    if meta.uid() != euid() {
        return Err(refused(
            path,
            format!(
                "{what} belongs to uid {}, not to you (uid {}); run imgbuild as its owner, or remove it if nobody should have put it there",
                meta.uid(),
                euid()
            ),
        ));
    }
    Ok(())
}

/// The runs directory, if it exists, after checking it is ours.
fn checked_runs_dir(state_dir: &Path) -> Result<Option<PathBuf>, JournalError> {
    let dir = runs_dir(state_dir);
    match std::fs::symlink_metadata(&dir) {
        Ok(meta) => {
            check_owned(&dir, &meta, true)?;
            Ok(Some(dir))
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(io_error("inspect the directory of", &dir)(err)),
    }
}

impl Journal {
    /// Starts the journal of a new run and takes its lock for the life of the
    /// process.
    ///
    /// The journal is written and locked under a temporary name first and
    /// only then linked to its final name, so `imgbuild clean` never finds
    /// it unlocked and takes a live run for a dead one.
    pub fn create(state_dir: &Path, run_id: &str, config: &Path) -> Result<Journal, JournalError> {
        let dir = runs_dir(state_dir);
        std::fs::create_dir_all(state_dir).map_err(io_error("create the directory of", &dir))?;
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(io_error("create the directory of", &dir)(err)),
        }
        checked_runs_dir(state_dir)?;
        let path = dir.join(format!("{run_id}.journal"));
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{run_id}."))
            .suffix(".partial")
            .tempfile_in(&dir)
            .map_err(io_error("create", &path))?;
        let (file, temp_path) = temp.into_parts();
        file.lock().map_err(io_error("lock", &path))?;
        let journal = Journal {
            run_id: run_id.to_owned(),
            path,
            inner: Mutex::new(Inner {
                file,
                next_id: 1,
                outstanding: BTreeMap::new(),
            }),
        };
        let started_at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        journal.append(
            &mut journal.inner.lock().expect("journal lock poisoned"),
            &Record::Run {
                run_id: run_id.to_owned(),
                pid: std::process::id(),
                started_at,
                config: config.display().to_string(),
            },
        )?;
        crate::fsutil::persist_no_clobber(&temp_path, &journal.path)
            .map_err(io_error("create", &journal.path))?;
        // The temporary name is gone; nothing is left for the guard to delete.
        let _ = temp_path.keep();
        Ok(journal)
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn append(&self, inner: &mut Inner, record: &Record) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(record).expect("journal records always serialize");
        line.push(b'\n');
        inner
            .file
            .write_all(&line)
            .and_then(|()| inner.file.sync_data())
            .map_err(io_error("write", &self.path))
    }

    /// Records a resource that is about to be created. Call this before the
    /// creating call, never after.
    pub fn record(&self, build: &str, resource: Resource) -> Result<ResourceId, JournalError> {
        let mut inner = self.inner.lock().expect("journal lock poisoned");
        let id = inner.next_id;
        inner.next_id += 1;
        self.append(
            &mut inner,
            &Record::Create {
                id,
                build: build.to_owned(),
                resource: resource.clone(),
                at: Some(now_millis()),
            },
        )?;
        inner.outstanding.insert(
            id,
            Outstanding {
                id,
                build: build.to_owned(),
                resource,
                confirmed: false,
                recorded_at: Some(SystemTime::now()),
            },
        );
        Ok(id)
    }

    /// The creating call returned and the resource exists: from now on,
    /// `imgbuild clean` not finding it means it is gone.
    pub fn confirm(&self, id: ResourceId) -> Result<(), JournalError> {
        let mut inner = self.inner.lock().expect("journal lock poisoned");
        self.append(&mut inner, &Record::Created { id })?;
        if let Some(entry) = inner.outstanding.get_mut(&id) {
            entry.confirmed = true;
        }
        Ok(())
    }

    /// Adds what was learned once the resource exists (an instance id, say);
    /// it also confirms the resource, as [`Journal::confirm`] does.
    pub fn update(&self, id: ResourceId, resource: Resource) -> Result<(), JournalError> {
        let mut inner = self.inner.lock().expect("journal lock poisoned");
        self.append(
            &mut inner,
            &Record::Update {
                id,
                resource: resource.clone(),
            },
        )?;
        if let Some(entry) = inner.outstanding.get_mut(&id) {
            entry.resource = resource;
            entry.confirmed = true;
        }
        Ok(())
    }

    /// The resource is gone, or has become a kept artifact.
    pub fn release(&self, id: ResourceId) -> Result<(), JournalError> {
        let mut inner = self.inner.lock().expect("journal lock poisoned");
        self.append(&mut inner, &Record::Release { id })?;
        inner.outstanding.remove(&id);
        Ok(())
    }

    pub fn outstanding(&self) -> Vec<Outstanding> {
        let inner = self.inner.lock().expect("journal lock poisoned");
        inner.outstanding.values().cloned().collect()
    }

    /// Ends the run: the journal is deleted when nothing is outstanding, and
    /// kept (for `imgbuild clean`) otherwise.
    pub fn finish(self) -> Result<Vec<Outstanding>, JournalError> {
        let outstanding = self.outstanding();
        if outstanding.is_empty() {
            std::fs::remove_file(&self.path).map_err(io_error("remove", &self.path))?;
        }
        Ok(outstanding)
    }
}

/// The journal of a run that is no longer alive; holding it keeps its lock,
/// so two `imgbuild clean` cannot work on the same run at once.
pub struct DeadRun {
    pub run_id: String,
    pub pid: Option<u32>,
    pub started_at: Option<String>,
    pub config: Option<String>,
    pub path: PathBuf,
    outstanding: BTreeMap<ResourceId, Outstanding>,
    file: File,
}

impl DeadRun {
    /// Outstanding resources, newest first: the order to clean them in.
    pub fn outstanding(&self) -> Vec<Outstanding> {
        self.outstanding.values().rev().cloned().collect()
    }

    pub fn release(&mut self, id: ResourceId) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(&Record::Release { id }).expect("serializes");
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|()| self.file.sync_data())
            .map_err(io_error("write", &self.path))?;
        self.outstanding.remove(&id);
        Ok(())
    }

    /// Removes the journal once everything it listed is gone.
    pub fn finish(self) -> Result<bool, JournalError> {
        if self.outstanding.is_empty() {
            std::fs::remove_file(&self.path).map_err(io_error("remove", &self.path))?;
            return Ok(true);
        }
        Ok(false)
    }
}

/// Journals of runs that have ended without releasing everything, locked for
/// the caller. Journals of live runs are skipped. A journal that is a link,
/// not a plain file, or not the current user's (or a runs directory like
/// that) is refused with an error naming it.
pub fn dead_runs(state_dir: &Path) -> Result<Vec<DeadRun>, JournalError> {
    let Some(dir) = checked_runs_dir(state_dir)? else {
        return Ok(Vec::new());
    };
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(io_error("list", &dir)(err)),
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "journal"))
        .collect();
    paths.sort();
    let mut runs = Vec::new();
    for path in paths {
        let file = match OpenOptions::new()
            .read(true)
            .append(true)
            // Never through a link; never blocking on a FIFO planted there.
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(file) => file,
            // Finished (and removed) since the directory was listed.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) if err.raw_os_error() == Some(libc::ELOOP) => {
                let meta = std::fs::symlink_metadata(&path).map_err(io_error("inspect", &path))?;
                check_owned(&path, &meta, false)?;
                return Err(io_error("open", &path)(err));
            }
            Err(err) => return Err(io_error("open", &path)(err)),
        };
        let meta = file.metadata().map_err(io_error("inspect", &path))?;
        check_owned(&path, &meta, false)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => continue,
            Err(std::fs::TryLockError::Error(err)) => return Err(io_error("lock", &path)(err)),
        }
        // Its run may have finished and removed it between the open and the
        // lock: only the file still under its name is a dead run's journal.
        let still_there = std::fs::symlink_metadata(&path)
            .is_ok_and(|now| now.dev() == meta.dev() && now.ino() == meta.ino());
        if !still_there {
            continue;
        }
        runs.push(read_dead_run(path, file)?);
    }
    Ok(runs)
}

/// A whole record whose resource this version cannot read, kept as
/// [`Resource::Unreadable`]; `None` for a torn line.
fn unreadable(line: &str) -> Option<Record> {
    #[derive(Deserialize)]
    #[serde(tag = "op", rename_all = "snake_case")]
    enum Raw {
        Create {
            id: ResourceId,
            build: String,
            resource: serde_json::Value,
            #[serde(default)]
            at: Option<u64>,
        },
        Update {
            id: ResourceId,
            resource: serde_json::Value,
        },
    }
    Some(match serde_json::from_str::<Raw>(line).ok()? {
        Raw::Create {
            id,
            build,
            resource,
            at,
        } => Record::Create {
            id,
            build,
            resource: Resource::Unreadable { record: resource },
            at,
        },
        Raw::Update { id, resource } => Record::Update {
            id,
            resource: Resource::Unreadable { record: resource },
        },
    })
}

fn read_dead_run(path: PathBuf, file: File) -> Result<DeadRun, JournalError> {
    let run_id = path
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut run = DeadRun {
        run_id,
        pid: None,
        started_at: None,
        config: None,
        path: path.clone(),
        outstanding: BTreeMap::new(),
        file: file.try_clone().map_err(io_error("read", &path))?,
    };
    for line in BufReader::new(file).lines() {
        let line = line.map_err(io_error("read", &path))?;
        let record = match serde_json::from_str::<Record>(&line) {
            Ok(record) => record,
            Err(_) => match unreadable(&line) {
                Some(record) => record,
                // A run killed mid-write leaves at most one torn last line.
                None => continue,
            },
        };
        match record {
            Record::Run {
                run_id,
                pid,
                started_at,
                config,
            } => {
                run.run_id = run_id;
                run.pid = Some(pid);
                run.started_at = Some(started_at);
                run.config = Some(config);
            }
            Record::Create {
                id,
                build,
                resource,
                at,
            } => {
                run.outstanding.insert(
                    id,
                    Outstanding {
                        id,
                        build,
                        resource,
                        confirmed: false,
                        recorded_at: at.map(from_millis),
                    },
                );
            }
            Record::Created { id } => {
                if let Some(entry) = run.outstanding.get_mut(&id) {
                    entry.confirmed = true;
                }
            }
            Record::Update { id, resource } => {
                if let Some(entry) = run.outstanding.get_mut(&id) {
                    entry.resource = resource;
                    entry.confirmed = true;
                }
            }
            Record::Release { id } => {
                run.outstanding.remove(&id);
            }
        }
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> Resource {
        Resource::File { path: path.into() }
    }

    #[test]
    fn live_runs_are_not_dead_and_finished_runs_vanish() {
        let state = tempfile::tempdir().unwrap();
        let journal = Journal::create(state.path(), "run-a", Path::new("image.toml")).unwrap();
        let id = journal.record("vm", file("/tmp/x")).unwrap();
        assert!(
            dead_runs(state.path()).unwrap().is_empty(),
            "a live run is locked"
        );
        journal.release(id).unwrap();
        assert!(journal.finish().unwrap().is_empty());
        assert!(dead_runs(state.path()).unwrap().is_empty());
        assert_eq!(
            std::fs::read_dir(state.path().join("runs"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn a_dead_run_lists_unreleased_resources_newest_first() {
        let state = tempfile::tempdir().unwrap();
        let journal = Journal::create(state.path(), "run-b", Path::new("image.toml")).unwrap();
        let first = journal.record("vm", file("/tmp/first")).unwrap();
        let second = journal.record("vm", file("/tmp/second")).unwrap();
        let third = journal.record("vm", file("/tmp/third")).unwrap();
        journal.update(first, file("/tmp/first-updated")).unwrap();
        journal.release(second).unwrap();
        // Dropping without finish releases the lock, as a killed process would.
        drop(journal);

        let mut runs = dead_runs(state.path()).unwrap();
        assert_eq!(runs.len(), 1);
        let run = &mut runs[0];
        assert_eq!(run.run_id, "run-b");
        assert_eq!(run.pid, Some(std::process::id()));
        let ids: Vec<_> = run.outstanding().iter().map(|o| o.id).collect();
        assert_eq!(ids, vec![third, first]);
        assert_eq!(run.outstanding()[1].resource, file("/tmp/first-updated"));

        run.release(third).unwrap();
        run.release(first).unwrap();
        let run = runs.pop().unwrap();
        assert!(run.finish().unwrap());
        assert!(dead_runs(state.path()).unwrap().is_empty());
    }

    #[test]
    fn a_torn_last_line_is_ignored() {
        let state = tempfile::tempdir().unwrap();
        let journal = Journal::create(state.path(), "run-c", Path::new("image.toml")).unwrap();
        journal.record("vm", file("/tmp/kept")).unwrap();
        let path = journal.path().to_path_buf();
        drop(journal);
        let mut handle = OpenOptions::new().append(true).open(&path).unwrap();
        handle
            .write_all(b"{\"op\":\"create\",\"id\":9,\"bu")
            .unwrap();
        let runs = dead_runs(state.path()).unwrap();
        assert_eq!(runs[0].outstanding().len(), 1);
    }

    #[test]
    fn creating_and_updating_confirm_a_resource_and_record_its_time() {
        let state = tempfile::tempdir().unwrap();
        let journal = Journal::create(state.path(), "run-d", Path::new("image.toml")).unwrap();
        let before = SystemTime::now() - Duration::from_secs(1);
        let pending = journal.record("vm", file("/tmp/pending")).unwrap();
        let confirmed = journal.record("vm", file("/tmp/confirmed")).unwrap();
        let updated = journal.record("vm", file("/tmp/updated")).unwrap();
        journal.confirm(confirmed).unwrap();
        journal.update(updated, file("/tmp/updated-2")).unwrap();
        drop(journal);
        let runs = dead_runs(state.path()).unwrap();
        let by_id = |id| {
            runs[0]
                .outstanding()
                .into_iter()
                .find(|o| o.id == id)
                .unwrap()
        };
        assert!(!by_id(pending).confirmed);
        assert!(by_id(confirmed).confirmed);
        assert!(by_id(updated).confirmed);
        let at = by_id(pending).recorded_at.unwrap();
        assert!(at >= before && at <= SystemTime::now(), "{at:?}");
    }

    #[test]
    fn journals_of_the_previous_version_still_read() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("runs");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("0193a1b2c3d4e5f6.journal"),
            concat!(
                r#"{"op":"run","run_id":"0193a1b2c3d4e5f6","pid":1,"started_at":"2026-11-27T03:15:00Z","config":"image.toml"}"#,
                "\n",
                r#"{"op":"create","id":1,"build":"vm","resource":{"kind":"process","pidfile":"/w/qemu.pid","marker":"imgbuild-0193a1b2c3d4e5f6-vm","description":"QEMU for build vm"}}"#,
                "\n",
            ),
        )
        .unwrap();
        let runs = dead_runs(state.path()).unwrap();
        let item = &runs[0].outstanding()[0];
        assert_eq!(
            item.resource,
            Resource::Process {
                pidfile: "/w/qemu.pid".into(),
                description: "QEMU for build vm".into(),
                pid: None,
                start_time: None,
            }
        );
        assert!(!item.confirmed);
        assert_eq!(item.recorded_at, None);
    }

    /// A builder's record comes back from a dead run's journal as it went
    /// in, whatever its shape, and the journal line stays readable: the
    /// builder's name and the description in plain sight.
    #[test]
    fn a_builder_resource_round_trips_opaquely() {
        let state = tempfile::tempdir().unwrap();
        let journal = Journal::create(state.path(), "run-e", Path::new("image.toml")).unwrap();
        let resource = |id: Option<&str>| {
            Resource::Builder(BuilderResource {
                builder: "nimbus".into(),
                description: format!("nimbus machine {id:?}"),
                data: serde_json::json!({"type": "machine", "zone": "z1", "id": id, "tags": [1, 2]}),
            })
        };
        let id = journal.record("vm", resource(None)).unwrap();
        journal.update(id, resource(Some("m-1"))).unwrap();
        let path = journal.path().to_path_buf();
        drop(journal);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(r#""resource":{"kind":"builder","builder":"nimbus","description":"nimbus machine None","data":{"#),
            "{text}"
        );
        let runs = dead_runs(state.path()).unwrap();
        let outstanding = runs[0].outstanding();
        assert_eq!(outstanding[0].resource, resource(Some("m-1")));
        assert_eq!(
            outstanding[0].resource.describe(),
            "nimbus machine Some(\"m-1\")"
        );
        let Resource::Builder(builder) = &outstanding[0].resource else {
            panic!("not a builder resource: {:?}", outstanding[0].resource)
        };
        #[derive(Deserialize, PartialEq, Debug)]
        struct Machine {
            zone: String,
            id: Option<String>,
        }
        assert_eq!(
            builder.read::<Machine>().unwrap(),
            Machine {
                zone: "z1".into(),
                id: Some("m-1".into())
            }
        );
    }

    /// Resources of kinds this version does not have (here the Docker
    /// container of a journal from before builders kept their own
    /// records) stay outstanding as written, so they are shown and kept
    /// rather than silently forgotten.
    #[test]
    fn a_record_of_an_unknown_kind_stays_outstanding_as_written() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("runs");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("0193a1b2c3d4e5f7.journal"),
            concat!(
                r#"{"op":"run","run_id":"0193a1b2c3d4e5f7","pid":1,"started_at":"2026-11-27T03:15:00Z","config":"image.toml"}"#,
                "\n",
                r#"{"op":"create","id":1,"build":"box","resource":{"kind":"docker_container","name":"imgbuild-0193-box"},"at":1764000000000}"#,
                "\n",
                r#"{"op":"created","id":1}"#,
                "\n",
                r#"{"op":"create","id":2,"build":"box","resource":{"kind":"file","path":"/tmp/x"}}"#,
                "\n",
                r#"{"op":"create","id":3,"build":"box","resource":{"kind":"docker_im"#,
            ),
        )
        .unwrap();
        let runs = dead_runs(state.path()).unwrap();
        let outstanding = runs[0].outstanding();
        assert_eq!(outstanding.len(), 2, "{outstanding:?}");
        let item = outstanding.iter().find(|o| o.id == 1).unwrap();
        assert_eq!(
            item.resource,
            Resource::Unreadable {
                record: serde_json::json!({"kind": "docker_container", "name": "imgbuild-0193-box"})
            }
        );
        assert!(item.confirmed);
        assert!(
            item.resource.describe().contains("imgbuild-0193-box"),
            "{}",
            item.resource.describe()
        );
    }

    /// `imgbuild clean` in a loop next to runs starting: it must never take
    /// a starting run's journal for a dead one (and remove it as empty), nor
    /// trip over a journal its run removed while clean was opening it.
    #[test]
    fn a_concurrent_clean_never_takes_or_removes_a_journal_being_created() {
        let state = tempfile::tempdir().unwrap();
        let state_dir = state.path().to_path_buf();
        std::fs::create_dir_all(state_dir.join("runs")).unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cleaner = {
            let done = done.clone();
            let state_dir = state_dir.clone();
            std::thread::spawn(move || {
                let (mut taken, mut errors) = (Vec::new(), Vec::new());
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let runs = match dead_runs(&state_dir) {
                        Ok(runs) => runs,
                        Err(err) => {
                            errors.push(err.to_string());
                            continue;
                        }
                    };
                    for run in runs {
                        taken.push(run.run_id.clone());
                        // What `imgbuild clean` does with a run with nothing
                        // outstanding.
                        if let Err(err) = run.finish() {
                            errors.push(err.to_string());
                        }
                    }
                }
                (taken, errors)
            })
        };
        let mut vanished = Vec::new();
        for i in 0..1500 {
            let run_id = format!("race-{i:04}");
            let journal = Journal::create(&state_dir, &run_id, Path::new("image.toml")).unwrap();
            if !journal.path().exists() {
                vanished.push(run_id);
            }
            // Finishing removes it; a cleaner that opened it just before
            // must skip it.
            if let Err(err) = journal.finish() {
                vanished.push(format!("{err}"));
            }
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let (taken, errors) = cleaner.join().unwrap();
        assert!(
            taken.is_empty() && vanished.is_empty() && errors.is_empty(),
            "live journals taken for dead: {taken:?}\nremoved under a live run: {vanished:?}\nclean failed: {errors:?}"
        );
    }

    fn dead_journal(state_dir: &Path, run_id: &str) -> PathBuf {
        let journal = Journal::create(state_dir, run_id, Path::new("image.toml")).unwrap();
        journal.record("vm", file("/tmp/leftover")).unwrap();
        journal.path().to_path_buf()
    }

    fn refusal(state_dir: &Path) -> (PathBuf, String) {
        match dead_runs(state_dir) {
            Err(err @ JournalError::Refused { .. }) => {
                let JournalError::Refused { ref path, .. } = err else {
                    unreachable!()
                };
                (path.clone(), err.to_string())
            }
            Err(other) => panic!("expected a refusal, got {other}"),
            Ok(runs) => panic!(
                "expected a refusal, got {} run(s): {:?}",
                runs.len(),
                runs.iter().map(|r| &r.path).collect::<Vec<_>>()
            ),
        }
    }

    #[test]
    fn a_journal_that_is_a_symlink_is_refused() {
        let elsewhere = tempfile::tempdir().unwrap();
        let target = dead_journal(elsewhere.path(), "planted");
        let state = tempfile::tempdir().unwrap();
        let runs = state.path().join("runs");
        std::fs::create_dir_all(&runs).unwrap();
        let link = runs.join("planted.journal");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let (path, message) = refusal(state.path());
        assert_eq!(path, link);
        assert!(message.contains("symbolic link"), "{message}");
    }

    #[test]
    fn a_runs_directory_that_is_a_symlink_is_refused() {
        let elsewhere = tempfile::tempdir().unwrap();
        dead_journal(elsewhere.path(), "planted");
        let state = tempfile::tempdir().unwrap();
        let link = state.path().join("runs");
        std::os::unix::fs::symlink(elsewhere.path().join("runs"), &link).unwrap();
        let (path, message) = refusal(state.path());
        assert_eq!(path, link);
        assert!(message.contains("symbolic link"), "{message}");
        let err = Journal::create(state.path(), "new-run", Path::new("image.toml"))
            .err()
            .expect("no journal is written through a linked runs directory");
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }

    #[test]
    fn a_journal_of_another_user_is_refused() {
        if euid() != 0 {
            eprintln!("skipped: only root can give a file to another user");
            return;
        }
        let state = tempfile::tempdir().unwrap();
        let path = dead_journal(state.path(), "someone-else");
        std::os::unix::fs::chown(&path, Some(65534), Some(65534)).unwrap();
        let (refused_path, message) = refusal(state.path());
        assert_eq!(refused_path, path);
        assert!(message.contains("uid 65534"), "{message}");
    }
}
