//! `imgbuild test`: runs a config's `[[test]]`s again on artifacts the
//! manifest already records (after a fix to the tests, or on a schedule to
//! catch an image that rotted), and replaces each tested entry's verdict.
//!
//! The tests run as after a build (the same builder call, verdict and
//! messages, a run journal of their own), one build after another. A
//! finished run makes a version `tested` or `failed`, whatever it was
//! before; an interrupted one changes nothing.

use super::{
    RunOptions, RunStatus, Verdict, finish_journal, open_journal, request_for, warn_about_leftovers,
};
use crate::config::{Build, Config};
use crate::manifest::{self, Entry};
use imgbuild_core::{BuildLog, CancellationToken, Event, StepContext};
use std::path::Path;

/// A build with tests and the recorded entry they run on.
struct Target<'a> {
    build: &'a Build,
    entry: Entry,
}

pub async fn run(
    config: Config,
    options: RunOptions,
    log: BuildLog,
    cancel: CancellationToken,
) -> RunStatus {
    warn_about_leftovers(&options, &log);
    let targets = match select(&config, &options.manifest).await {
        Ok(targets) => targets,
        Err(problems) => {
            for problem in problems {
                log.error(problem);
            }
            log.error("nothing was tested: the problems above must be fixed first");
            return RunStatus::Refused;
        }
    };
    for build in config.builds.iter().filter(|b| b.tests.is_empty()) {
        log.for_build(&build.name)
            .warn("no [[test]] applies to this build; it is left out");
    }

    let Some(journal) = open_journal(&options, &config.path, &log) else {
        return RunStatus::Refused;
    };
    // The human UI finds the run id here, as in a build's first line.
    let names: Vec<&str> = targets.iter().map(|t| t.build.name.as_str()).collect();
    log.info(format!(
        "imgbuild run {}: testing {} version {} of {}",
        options.run_id,
        config.image.name,
        config.image.version,
        names.join(", ")
    ));

    let mut outcomes = Vec::new();
    for target in &targets {
        if cancel.is_cancelled() {
            outcomes.push(Retested::Interrupted);
            continue;
        }
        let cx = StepContext {
            log: log.for_build(&target.build.name),
            journal: journal.clone(),
            cancel: cancel.clone(),
            run_id: options.run_id.clone(),
        };
        outcomes.push(retest(&config, target, &cx, &options).await);
    }
    finish_journal(journal, &log, &options);

    let interrupted = outcomes.iter().any(|o| matches!(o, Retested::Interrupted));
    let status = if cancel.is_cancelled() || interrupted {
        RunStatus::Interrupted
    } else if outcomes.iter().all(|o| matches!(o, Retested::Passed(_))) {
        RunStatus::Succeeded
    } else {
        RunStatus::Failed
    };
    log.emit(Event::RunFinished {
        run_id: options.run_id.clone(),
        exit_code: status.exit_code(),
        artifacts: outcomes
            .into_iter()
            .filter_map(|o| match o {
                Retested::Passed(entry) | Retested::Failed(Some(entry)) => Some(entry),
                _ => None,
            })
            .collect(),
    });
    status
}

/// How one build's tests ended, with its entry as recorded after them.
enum Retested {
    Passed(serde_json::Value),
    /// `None`: the verdict could not be recorded.
    Failed(Option<serde_json::Value>),
    Interrupted,
}

/// The builds to test and their entries, or every reason why not: nothing
/// is launched unless every selected build with tests has an artifact.
async fn select<'a>(
    config: &'a Config,
    manifest_path: &manifest::Location,
) -> Result<Vec<Target<'a>>, Vec<String>> {
    let recorded = manifest_path
        .read()
        .await
        .map_err(|err| vec![err.to_string()])?;
    let (image, version) = (&config.image.name, &config.image.version);
    let manifest_name = manifest_path;
    let mut problems = Vec::new();
    let mut targets = Vec::new();
    for build in config.builds.iter().filter(|b| !b.tests.is_empty()) {
        let name = &build.name;
        let Some(entry) = manifest::find(&recorded, image, version, name) else {
            let versions: Vec<&str> = recorded
                .builds
                .iter()
                .filter(|e| e.image.name == *image && e.build.name == *name)
                .map(|e| e.image.version.as_str())
                .collect();
            let known = if versions.is_empty() {
                "none".to_owned()
            } else {
                versions.join(", ")
            };
            problems.push(format!(
                "{manifest_name} records no build `{name}` of {image} version {version}, so there is no artifact to test (versions it records for this build: {known}); choose one with --version, leave the build out with --except {name}, or build this version with `imgbuild build`"
            ));
            continue;
        };
        if let Err(problem) = usable(entry, build.builder.kind(), &config.path, &config.dir) {
            problems.push(problem);
            continue;
        }
        targets.push(Target {
            build,
            entry: entry.clone(),
        });
    }
    if targets.is_empty() && problems.is_empty() {
        let names: Vec<&str> = config.builds.iter().map(|b| b.name.as_str()).collect();
        problems.push(format!(
            "no [[test]] applies to the selected builds ({}): add a [[test]] table to {}",
            names.join(", "),
            config.path.display()
        ));
    }
    if problems.is_empty() {
        Ok(targets)
    } else {
        Err(problems)
    }
}

/// Why the recorded `entry` cannot be tested with the build of `kind` in
/// the config at `config_path`: its artifact is gone, or was made by
/// another kind of builder. Relative file paths are below `config_dir`.
fn usable(entry: &Entry, kind: &str, config_path: &Path, config_dir: &Path) -> Result<(), String> {
    let (name, version) = (&entry.build.name, &entry.image.version);
    let image = &entry.image.name;
    if entry.deleted {
        return Err(format!(
            "build `{name}` of {image} version {version} failed its tests and its artifact {} was deleted (on_test_failure = \"delete\"), so there is nothing to test: fix the image and build a new version (bump `image.version`)",
            entry.artifact_id
        ));
    }
    if entry.build.kind != kind {
        return Err(format!(
            "build `{name}` of {image} version {version} was made by the {} builder, but `{name}` is a {kind} builder in {} now: its tests cannot run on that artifact; test it with the config it was built from",
            entry.build.kind,
            config_path.display()
        ));
    }
    let missing: Vec<String> = entry
        .files
        .iter()
        .map(|file| config_dir.join(&file.path))
        .filter(|path| !path.exists())
        .map(|path| path.display().to_string())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the artifact of build `{name}` of {image} version {version} is gone ({} no longer exists), so there is nothing to test: restore it, or build a new version (bump `image.version`)",
            missing.join(", ")
        ));
    }
    Ok(())
}

/// Runs one build's tests on its recorded artifact and records the verdict.
async fn retest(
    config: &Config,
    target: &Target<'_>,
    cx: &StepContext,
    options: &RunOptions,
) -> Retested {
    let (build, entry) = (target.build, &target.entry);
    let version = &config.image.version;
    let manifest_path = &options.manifest;
    cx.log.info(format!(
        "testing the artifact {} of version {version}, recorded by run {} as {}",
        entry.artifact_id,
        entry.run_id,
        entry.status.as_str()
    ));
    let artifact = entry.artifact();
    let request = request_for(config, build, options.on_error);
    let verdict = super::test(build, &request, &artifact, cx, false).await;
    if verdict.cancelled {
        cx.log.warn(format!(
            "interrupted before the tests finished; the entry of version {version} in {} is unchanged ({})",
            manifest_path,
            entry.status.as_str()
        ));
        return Retested::Interrupted;
    }

    let updated = record(config, build, &verdict, manifest_path).await;
    let updated = match updated {
        Ok(updated) => updated,
        Err(err) => {
            cx.log.error(format!(
                "the tests ended ({}) but their verdict cannot be recorded: {err}",
                verdict.status.as_str()
            ));
            return Retested::Failed(None);
        }
    };
    let json = serde_json::to_value(&updated).expect("entries serialize");
    cx.log.emit(Event::Artifact {
        build: build.name.clone(),
        artifact: json.clone(),
    });
    let was = entry.status.as_str();
    match verdict.failure(build) {
        None => {
            cx.log.info(format!(
                "all {} tests passed: version {version} is recorded as tested in {} (it was {was})",
                verdict.tests.len(),
                manifest_path
            ));
            Retested::Passed(json)
        }
        Some(failure) => {
            cx.log.error(format!(
                "{failure}; version {version} is recorded as failed in {} (it was {was}), and `imgbuild output` refuses it without --allow-failed",
                manifest_path
            ));
            Retested::Failed(Some(json))
        }
    }
}

/// Replaces the entry's verdict with `verdict`.
async fn record(
    config: &Config,
    build: &Build,
    verdict: &Verdict,
    manifest_path: &manifest::Location,
) -> Result<Entry, String> {
    let (image, version, name) = (
        config.image.name.clone(),
        config.image.version.clone(),
        build.name.clone(),
    );
    let (status, tests, error) = (verdict.status, verdict.tests.clone(), verdict.error.clone());
    let redactor = config.redactor.clone();
    let change = move |entry: &mut Entry| {
        entry.status = status;
        entry.tests = tests.clone();
        entry.test_error = error.clone();
        // The tests ran now, whether or not the build skipped them.
        entry.tests_skipped = false;
        entry.retested_at = Some(super::now_rfc3339());
        entry.mask_free_text(&redactor);
    };
    manifest_path
        .update(&image, &version, &name, change)
        .await
        .map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(kind: &str, file: &Path, deleted: bool) -> Entry {
        serde_json::from_value(serde_json::json!({
            "run_id": "r", "image": {"name": "web", "version": "1"},
            "build": {"name": "vm", "type": kind},
            "artifact_id": file,
            "files": [{"path": file, "size": 1, "sha256": "00"}],
            "source": {"kind": "file", "reference": "/b"},
            "inputs_sha256": "0", "started_at": "a", "finished_at": "b",
            "duration_secs": 1.0, "imgbuild_version": "0.1.0",
            "status": "tested", "deleted": deleted
        }))
        .unwrap()
    }

    #[test]
    fn only_an_artifact_that_is_still_there_and_of_the_same_kind_is_tested() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("image.toml");
        std::fs::create_dir(dir.path().join("out")).unwrap();
        std::fs::write(dir.path().join("out/web-1.qcow2"), "disk").unwrap();
        // Relative paths are below the config's directory.
        let there = recorded("qemu", Path::new("out/web-1.qcow2"), false);
        assert_eq!(usable(&there, "qemu", &config, dir.path()), Ok(()));

        let gone = recorded("qemu", Path::new("out/web-0.qcow2"), false);
        let err = usable(&gone, "qemu", &config, dir.path()).unwrap_err();
        assert!(err.contains("out/web-0.qcow2 no longer exists"), "{err}");
        assert!(err.contains("build a new version"), "{err}");

        let deleted = recorded("qemu", Path::new("out/web-1.qcow2"), true);
        let err = usable(&deleted, "qemu", &config, dir.path()).unwrap_err();
        assert!(err.contains("was deleted (on_test_failure"), "{err}");

        let err = usable(&there, "docker", &config, dir.path()).unwrap_err();
        assert!(
            err.contains("made by the qemu builder, but `vm` is a docker builder"),
            "{err}"
        );
    }
}
