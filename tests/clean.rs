//! `imgbuild clean` against what killed runs really leave: a journal written
//! by the same code a build uses, a real process, a real Docker Engine. Clean
//! lets a record go only once its resource is proven gone, and removes
//! nothing that may still be in use.

use imgbuild_builders::docker::kind::DockerResource;
use imgbuild_core::{Journal, Resource};
use imgbuild_test_support::cli::*;
use std::path::Path;
use std::process::{Child, Command, Stdio};

fn run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..16].to_owned()
}

fn events_of<'a>(events: &'a [serde_json::Value], kind: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["event"] == kind).collect()
}

/// Kills and reaps the child when dropped, so a failing test leaves nothing.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Force-removes the container when dropped, so a failing test leaves none.
struct ContainerGone(String);

impl Drop for ContainerGone {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A run killed right after it started QEMU, before it could record the
/// process's start time: the pid in the pid file runs, but nothing proves it
/// is that QEMU. Clean must neither signal it nor pull the work directory
/// from under it; once it is gone, the next clean removes both.
#[test]
fn a_work_directory_stays_while_its_process_may_still_run() {
    let workspace = Workspace::new();
    let run_id = run_id();
    let work_dir = workspace.join(&format!("out/.imgbuild-{run_id}-vm"));
    std::fs::create_dir_all(&work_dir).unwrap();
    std::fs::write(work_dir.join("disk.qcow2"), b"in use").unwrap();
    let sleeper = Reaped(
        Command::new("sleep")
            .arg("1000")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = sleeper.0.id();
    let pidfile = work_dir.join("qemu.pid");
    std::fs::write(&pidfile, format!("{pid}\n")).unwrap();
    {
        let journal =
            Journal::create(&workspace.state_dir(), &run_id, Path::new("image.toml")).unwrap();
        journal
            .record(
                "vm",
                Resource::Directory {
                    path: work_dir.clone(),
                },
            )
            .unwrap();
        journal
            .record(
                "vm",
                Resource::Process {
                    pidfile: pidfile.clone(),
                    description: "QEMU for build vm".to_owned(),
                    pid: None,
                    start_time: None,
                },
            )
            .unwrap();
    }

    let outcome = workspace
        .imgbuild()
        .args(["--output", "json", "clean"])
        .run()
        .exits_with(EXIT_BUILD_FAILED);
    let events = outcome.events();
    let failed = events_of(&events, "remove_failed");
    assert_eq!(failed.len(), 1, "{events:?}");
    assert_eq!(failed[0]["resource"]["kind"], "process");
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains(&format!("kill {pid}")),
        "{events:?}"
    );
    let kept = events_of(&events, "kept");
    assert_eq!(kept.len(), 1, "{events:?}");
    assert_eq!(kept[0]["resource"]["kind"], "directory");
    assert!(
        work_dir.join("disk.qcow2").exists(),
        "the work directory of a process that may still run stays"
    );
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "an unproven process is never signalled"
    );
    assert_eq!(workspace.journals().len(), 1, "both records stay");

    // The user stops it, as the message says; now both go.
    drop(sleeper);
    let outcome = workspace
        .imgbuild()
        .args(["--output", "json", "clean"])
        .run()
        .exits_with(EXIT_OK);
    assert_eq!(
        events_of(&outcome.events(), "removed").len(),
        2,
        "{:?}",
        outcome.events()
    );
    assert!(!work_dir.exists());
    assert!(workspace.journals().is_empty());
}

/// The user's report: SIGKILL while the engine was still creating the build
/// container (the vfs driver takes seconds). A clean right away finds no
/// container; the engine then finishes, leaving a `Created` container. That
/// clean must keep the record, so the next one removes the container.
#[test]
fn a_container_the_engine_finishes_creating_after_a_clean_is_removed_by_the_next() {
    let base = docker_base_image();
    let workspace = Workspace::new();
    let run_id = run_id();
    let name = format!("imgbuild-{run_id}-box");
    let label = format!("org.imgbuild.run-id={run_id}");
    let _gone = ContainerGone(name.clone());
    {
        // What the build step writes before its create call, which the kill
        // then cut short: no confirmation follows.
        let journal =
            Journal::create(&workspace.state_dir(), &run_id, Path::new("image.toml")).unwrap();
        journal
            .record(
                "box",
                Resource::from(DockerResource::Container { name: name.clone() }),
            )
            .unwrap();
    }

    let outcome = workspace
        .imgbuild()
        .args(["--output", "json", "clean"])
        .run()
        .exits_with(EXIT_BUILD_FAILED);
    let events = outcome.events();
    let kept = events_of(&events, "kept");
    assert_eq!(kept.len(), 1, "{events:?}");
    assert!(
        kept[0]["reason"]
            .as_str()
            .unwrap()
            .contains("may still be being created"),
        "{events:?}"
    );
    assert!(events_of(&events, "removed").is_empty(), "{events:?}");
    assert_eq!(workspace.journals().len(), 1);
    workspace
        .imgbuild()
        .arg("clean")
        .run()
        .exits_with(EXIT_BUILD_FAILED)
        .stdout_has(&format!("kept docker container {name}"))
        .stdout_has("run `imgbuild clean` again");

    // The engine completes the create only now.
    docker(&[
        "create", "--name", &name, "--label", &label, &base, "sleep", "300",
    ]);
    assert_eq!(containers_labelled(&label).len(), 1);

    let outcome = workspace
        .imgbuild()
        .args(["--output", "json", "clean"])
        .run()
        .exits_with(EXIT_OK);
    let removed = events_of(&outcome.events(), "removed").len();
    assert_eq!(removed, 1, "{:?}", outcome.events());
    assert!(containers_labelled(&label).is_empty());
    assert!(workspace.journals().is_empty());
}

/// A journal written by an imgbuild with a builder this one lacks: clean
/// names the record and the builder, keeps it (exit 1), and never panics or
/// lets it go as if removed.
#[test]
fn a_record_of_an_unknown_builder_is_named_and_kept() {
    let workspace = Workspace::new();
    let run_id = run_id();
    {
        let journal =
            Journal::create(&workspace.state_dir(), &run_id, Path::new("image.toml")).unwrap();
        journal
            .record(
                "cloud",
                Resource::Builder(imgbuild_core::BuilderResource {
                    builder: "nimbus".to_owned(),
                    description: "nimbus machine m-1 in zone z1".to_owned(),
                    data: serde_json::json!({"kind": "nimbus_machine", "id": "m-1"}),
                }),
            )
            .unwrap();
    }

    workspace
        .imgbuild()
        .args(["clean", "--dry-run"])
        .run()
        .exits_with(EXIT_OK)
        .stdout_has("would remove nimbus machine m-1 in zone z1 (build cloud)");
    let outcome = workspace
        .imgbuild()
        .args(["--output", "json", "clean"])
        .run()
        .exits_with(EXIT_BUILD_FAILED);
    let events = outcome.events();
    let failed = events_of(&events, "remove_failed");
    assert_eq!(failed.len(), 1, "{events:?}");
    assert_eq!(failed[0]["resource"]["builder"], "nimbus");
    let error = failed[0]["error"].as_str().unwrap();
    assert!(
        error.contains("nimbus machine m-1 in zone z1") && error.contains("no such builder"),
        "{error}"
    );
    assert_eq!(workspace.journals().len(), 1, "the record stays");
}
