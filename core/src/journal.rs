//! The durable record of what a run has created.
//!
//! Every resource is written here (and flushed to disk) *before* the call that
//! creates it, and marked released once it is cleaned up or handed over as an
//! artifact. The running process holds an exclusive lock on its journal, so a
//! journal whose lock can be taken belongs to a run that died, by SIGKILL or a
//! CI timeout, and lists exactly what it left behind.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
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
    /// A local process that writes its pid to `pidfile`; `marker` appears in
    /// its command line, so a recycled pid is never killed by mistake.
    Process {
        pidfile: PathBuf,
        marker: String,
        description: String,
    },
    File {
        path: PathBuf,
    },
    Directory {
        path: PathBuf,
    },
    DockerContainer {
        name: String,
    },
    DockerImage {
        reference: String,
    },
    Ec2Instance {
        region: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint_url: Option<String>,
        client_token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance_id: Option<String>,
    },
    Ec2KeyPair {
        region: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint_url: Option<String>,
        name: String,
    },
    Ec2SecurityGroup {
        region: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint_url: Option<String>,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group_id: Option<String>,
    },
    /// An AMI being made under `name`, with its snapshots.
    Ec2Image {
        region: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint_url: Option<String>,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image_id: Option<String>,
    },
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
            Resource::DockerContainer { name } => format!("docker container {name}"),
            Resource::DockerImage { reference } => format!("docker image {reference}"),
            Resource::Ec2Instance {
                region,
                client_token,
                instance_id,
                ..
            } => match instance_id {
                Some(id) => format!("EC2 instance {id} in {region}"),
                None => format!("EC2 instance with client token {client_token} in {region}"),
            },
            Resource::Ec2KeyPair { region, name, .. } => {
                format!("EC2 key pair {name} in {region}")
            }
            Resource::Ec2SecurityGroup { region, name, .. } => {
                format!("EC2 security group {name} in {region}")
            }
            Resource::Ec2Image {
                region,
                name,
                image_id,
                ..
            } => match image_id {
                Some(id) => format!("AMI {id} ({name}) in {region}"),
                None => format!("AMI named {name} in {region}"),
            },
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

impl Journal {
    /// Starts the journal of a new run and takes its lock for the life of the
    /// process.
    pub fn create(state_dir: &Path, run_id: &str, config: &Path) -> Result<Journal, JournalError> {
        let dir = runs_dir(state_dir);
        std::fs::create_dir_all(&dir).map_err(io_error("create the directory of", &dir))?;
        let path = dir.join(format!("{run_id}.journal"));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_error("create", &path))?;
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
            },
        )?;
        inner.outstanding.insert(
            id,
            Outstanding {
                id,
                build: build.to_owned(),
                resource,
            },
        );
        Ok(id)
    }

    /// Adds what was learned once the resource exists (an instance id, say).
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
/// the caller. Journals of live runs are skipped.
pub fn dead_runs(state_dir: &Path) -> Result<Vec<DeadRun>, JournalError> {
    let dir = runs_dir(state_dir);
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
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io_error("open", &path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => continue,
            Err(std::fs::TryLockError::Error(err)) => return Err(io_error("lock", &path)(err)),
        }
        runs.push(read_dead_run(path, file)?);
    }
    Ok(runs)
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
        // A run killed mid-write leaves at most one torn last line.
        let Ok(record) = serde_json::from_str::<Record>(&line) else {
            continue;
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
            } => {
                run.outstanding.insert(
                    id,
                    Outstanding {
                        id,
                        build,
                        resource,
                    },
                );
            }
            Record::Update { id, resource } => {
                if let Some(entry) = run.outstanding.get_mut(&id) {
                    entry.resource = resource;
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
}
