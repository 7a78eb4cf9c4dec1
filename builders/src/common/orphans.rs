//! Removes what a dead run left behind, from the journal's description alone.
//!
//! A record is only let go once its resource is proven gone: removed here,
//! or not found after any creating call that was still in flight when the
//! run died could have completed.

use super::process::{self, ProcessIdentity};
use super::tracked::remove_path;
use crate::registry;
use imgbuild_core::Resource;
use imgbuild_core::journal::Outstanding;
use std::time::{Duration, SystemTime};

/// What removing a leftover found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// It was there and is removed now.
    Removed,
    /// Nothing by that name exists (any more, or yet).
    Absent,
    /// Something by that name exists but is not this run's; it was left
    /// alone, for the reason given.
    NotOurs(String),
}

/// How long a stopped process gets between SIGTERM and SIGKILL.
const PROCESS_GRACE: Duration = Duration::from_secs(5);

/// What cleaning one leftover came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cleaned {
    /// Removed, or proven gone: the record can be released.
    Removed,
    /// Not found, but its creating call never returned and may still
    /// complete: the record stays for a later `imgbuild clean`. Says why.
    Kept(String),
    /// Something of that name exists but is not this run's; it was left
    /// alone, and nothing of this run's can appear under that name.
    NotOurs(String),
}

/// How long after its record a resource whose creating call never returned
/// may still appear. Local things (processes, files) are there or not by the
/// time their creator is gone; remote calls are finished by the server even
/// after the client died (a Docker engine on the vfs driver copies the whole
/// image for a container create).
pub fn creation_grace(resource: &Resource) -> Duration {
    match resource {
        Resource::Process { .. }
        | Resource::File { .. }
        | Resource::Directory { .. }
        | Resource::ArtifactFile { .. } => Duration::ZERO,
        // The upload is the dead client's own: nothing finishes it later.
        Resource::Unreadable { .. } | Resource::SharedObject { .. } => Duration::ZERO,
        // An unknown builder's record is never found absent: it fails.
        Resource::Builder(resource) => registry::find(&resource.builder)
            .map(|kind| kind.creation_grace())
            .unwrap_or_default(),
    }
}

/// Cleans one outstanding resource of the dead run `run_id`, as of `now`.
pub async fn clean_outstanding(
    item: &Outstanding,
    run_id: &str,
    now: SystemTime,
) -> Result<Cleaned, String> {
    match clean_orphan(&item.resource, run_id).await? {
        Removal::Removed => Ok(Cleaned::Removed),
        Removal::NotOurs(reason) => Ok(Cleaned::NotOurs(reason)),
        Removal::Absent => {
            let grace = creation_grace(&item.resource);
            // Journals of older versions record no time; their runs ended
            // before this version was installed, long enough ago.
            let age = item.age(now).unwrap_or(Duration::MAX);
            if item.confirmed || age >= grace {
                return Ok(Cleaned::Removed);
            }
            let wait = grace - age;
            Ok(Cleaned::Kept(format!(
                "not found, but the run died while creating it {} ago, and it may still be being created; run `imgbuild clean` again in {} (it is then removed, or forgotten if it never appeared)",
                humantime::format_duration(Duration::from_secs(age.as_secs())),
                humantime::format_duration(Duration::from_secs(wait.as_secs() + 1))
            )))
        }
    }
}

/// Removes one leftover resource of the run `run_id` and says what it found.
pub async fn clean_orphan(resource: &Resource, run_id: &str) -> Result<Removal, String> {
    match resource {
        Resource::Process {
            pidfile,
            description,
            pid,
            start_time,
        } => {
            let pid = pid.or_else(|| process::read_pidfile(pidfile));
            let Some(pid) = pid else {
                return Ok(Removal::Absent);
            };
            let Some(start_time) = start_time else {
                return match ProcessIdentity::of(pid) {
                    Some(running) if running.is_running() => Err(format!(
                        "pid {pid} (from {}) is running, but the journal records no start time for {description} (the run died while starting it, or an older imgbuild wrote the journal), so nothing proves it is that process and it is not signalled; if `ps -o args= -p {pid}` shows it, stop it with `kill {pid}`, then run `imgbuild clean` again",
                        pidfile.display()
                    )),
                    _ => Ok(Removal::Absent),
                };
            };
            let recorded = ProcessIdentity {
                pid,
                start_time: *start_time,
            };
            if !recorded.is_running() {
                return Ok(Removal::Absent);
            }
            if process::terminate(recorded, PROCESS_GRACE).await {
                Ok(Removal::Removed)
            } else {
                Err(format!(
                    "{description} (pid {pid}) did not stop after SIGTERM and SIGKILL; it stays in the run journal for `imgbuild clean`"
                ))
            }
        }
        Resource::File { path } => remove_path(path, false)
            .await
            .map(|()| Removal::Removed)
            .map_err(|err| format!("cannot remove {}: {err}", path.display())),
        Resource::Directory { path } => remove_path(path, true)
            .await
            .map(|()| Removal::Removed)
            .map_err(|err| format!("cannot remove {}: {err}", path.display())),
        Resource::SharedObject { location, name } => {
            crate::common::step_store::remove_orphan_share(location, name).await
        }
        Resource::ArtifactFile {
            path,
            device,
            inode,
        } => {
            use std::os::unix::fs::MetadataExt;
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.dev() == *device && meta.ino() == *inode => {
                    remove_path(path, false)
                        .await
                        .map(|()| Removal::Removed)
                        .map_err(|err| format!("cannot remove {}: {err}", path.display()))
                }
                Ok(_) => Ok(Removal::NotOurs(
                    "another file was written at that path since (the version built again?)"
                        .to_owned(),
                )),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Removal::Absent),
                Err(err) => Err(format!("cannot look at {}: {err}", path.display())),
            }
        }
        Resource::Builder(resource) => match registry::find(&resource.builder) {
            Some(kind) => kind.clean_orphan(resource, run_id).await,
            None => Err(format!(
                "{} cannot be removed: the journal says the `{}` builder made it, and this imgbuild has no such builder (it has: {}); the journal was written by another version of imgbuild: run its `imgbuild clean`, or remove it by hand",
                resource.description,
                resource.builder,
                registry::names().join(", ")
            )),
        },
        Resource::Unreadable { record } => Err(format!(
            "this imgbuild cannot read the journal's record of it ({record}); the journal was written by another version of imgbuild: run that version's `imgbuild clean`, or remove what the record names by hand and then the run's journal"
        )),
    }
}

/// The order to clean a run's leftovers in: its processes first, then the
/// rest newest first, so nothing is removed from under a process that is
/// still running.
pub fn cleaning_order(mut outstanding: Vec<Outstanding>) -> Vec<Outstanding> {
    outstanding.sort_by_key(|item| {
        (
            !matches!(item.resource, Resource::Process { .. }),
            std::cmp::Reverse(item.id),
        )
    });
    outstanding
}

/// Whether removing `resource` must wait until the build's processes are
/// gone: a process may still use its files (QEMU writes its disk and logs in
/// the build's work directory).
pub fn needs_processes_gone(resource: &Resource) -> bool {
    // A test VM reads the artifact it boots through an overlay.
    matches!(
        resource,
        Resource::File { .. } | Resource::Directory { .. } | Resource::ArtifactFile { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgbuild_core::BuilderResource;

    /// A journal of another imgbuild may name a builder this one lacks: its
    /// record is refused with a message naming it and what to do, and is
    /// never let go as if removed.
    #[tokio::test]
    async fn a_record_of_an_unknown_builder_is_refused_clearly() {
        let resource = Resource::Builder(BuilderResource {
            builder: "nimbus".into(),
            description: "nimbus machine m-1 in z1".into(),
            data: serde_json::json!({"kind": "nimbus_machine", "id": "m-1"}),
        });
        let err = clean_orphan(&resource, "dead-run").await.unwrap_err();
        for part in [
            "nimbus machine m-1 in z1",
            "`nimbus` builder",
            &registry::names().join(", "),
            "another version of imgbuild",
        ] {
            assert!(err.contains(part), "{part:?} missing from: {err}");
        }
        let item = Outstanding {
            id: 1,
            build: "vm".into(),
            resource,
            confirmed: true,
            recorded_at: None,
        };
        assert!(
            clean_outstanding(&item, "dead-run", SystemTime::now())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_record_this_version_cannot_read_is_refused_clearly() {
        let record = serde_json::json!({"kind": "docker_container", "name": "imgbuild-0193-box"});
        let resource = Resource::Unreadable {
            record: record.clone(),
        };
        let err = clean_orphan(&resource, "dead-run").await.unwrap_err();
        assert!(
            err.contains(&record.to_string()) && err.contains("another version of imgbuild"),
            "{err}"
        );
    }

    /// An unrecorded artifact file is removed only while it is the file the
    /// dead run made: one written at its path since (the version built
    /// again and recorded) is left alone.
    #[tokio::test]
    async fn an_artifact_file_is_removed_only_while_it_is_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web-1.0.qcow2");
        std::fs::write(&path, b"the dead run's").unwrap();
        let artifact = crate::common::testing::docker_artifact(
            "x",
            vec![crate::ArtifactFile {
                path: path.clone(),
                size: 14,
                sha256: String::new(),
            }],
            serde_json::json!({}),
        );
        let recorded = crate::common::artifact::file_resources(&artifact);
        assert_eq!(recorded.len(), 1, "no checksum file beside it");

        let rebuilt = dir.path().join("rebuilt");
        std::fs::write(&rebuilt, b"a recorded rebuild's").unwrap();
        std::fs::rename(&rebuilt, &path).unwrap();
        let removal = clean_orphan(&recorded[0], "r1").await.unwrap();
        assert!(matches!(removal, Removal::NotOurs(_)), "{removal:?}");
        assert_eq!(std::fs::read(&path).unwrap(), b"a recorded rebuild's");

        let again = crate::common::artifact::file_resources(&artifact);
        assert_eq!(
            clean_orphan(&again[0], "r1").await.unwrap(),
            Removal::Removed
        );
        assert!(!path.exists());
        assert_eq!(
            clean_orphan(&again[0], "r1").await.unwrap(),
            Removal::Absent
        );
    }
}
