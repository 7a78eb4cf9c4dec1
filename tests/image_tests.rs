//! `[[test]]` end to end through the CLI with the real Docker Engine: the
//! tests run on a container started from the committed image, their results
//! land in the manifest with the version's status, a failure fails the build
//! and `imgbuild output` refuses the failed version unless asked;
//! `imgbuild test` runs them again on a recorded version and replaces its
//! verdict.

use imgbuild_test_support::{cli::*, common::*, docker::ImageCleanup};

/// A Docker build of `name:version` whose provisioner writes the version
/// into the image, followed by `tests`.
fn config(name: &str, version: &str, image_extra: &str, tests: &str) -> String {
    format!(
        r#"[image]
name = "{name}"
version = "{version}"
{image_extra}

[variables]
base = {{ description = "base image" }}

[builders.box]
type = "docker"
image = "{{{{ var.base }}}}"
pull = "never"

[[provision]]
type = "shell"
inline = ["echo {{{{ image.version }}}} > /etc/imgbuild-release"]

{tests}
"#
    )
}

/// Three tests: the middle one fails with exit code 3 after printing a
/// marker; the last one passes, proving every test runs after a failure.
const FAILING_SUITE: &str = r#"
[[test]]
name = "release file"
inline = ["test \"$(cat /etc/imgbuild-release)\" = \"$EXPECTED\""]
env = { EXPECTED = "{{ image.version }}" }

[[test]]
name = "service answers"
inline = ["echo probe-said-no", "exit 3"]

[[test]]
name = "runs after a failure"
inline = ["true"]
"#;

/// `imgbuild build`, as in GitHub Actions: step outputs go to
/// `github_output` in the workspace.
fn build(workspace: &Workspace, extra: &[&str]) -> Outcome {
    workspace
        .imgbuild()
        .args(["build", "image.toml", "--var"])
        .arg(format!("base={}", docker_base_image()))
        .args(extra)
        .env("GITHUB_OUTPUT", workspace.join("github_output"))
        .run()
}

/// `imgbuild test`: the config's tests again, on the recorded version.
fn retest(workspace: &Workspace, extra: &[&str]) -> Outcome {
    retest_command(workspace, extra).run()
}

fn retest_command(workspace: &Workspace, extra: &[&str]) -> Imgbuild {
    workspace
        .imgbuild()
        .args(["test", "image.toml", "--var"])
        .arg(format!("base={}", docker_base_image()))
        .args(extra)
}

fn output(workspace: &Workspace, extra: &[&str]) -> Outcome {
    workspace.imgbuild().arg("output").args(extra).run()
}

fn image_exists(reference: &str) -> bool {
    std::process::Command::new("docker")
        .args(["image", "inspect", reference])
        .output()
        .unwrap()
        .status
        .success()
}

/// No container of the run is left, the test container included.
fn assert_nothing_left(workspace: &Workspace, run_id: &str) {
    assert!(
        containers_labelled(&format!("org.imgbuild.run-id={run_id}")).is_empty(),
        "a container of run {run_id} is left"
    );
    assert!(workspace.journals().is_empty());
}

#[test]
fn a_passing_suite_marks_the_version_tested() {
    let workspace = Workspace::new();
    let version = unique_version();
    let reference = format!("imgbuild-tested:{version}");
    let _cleanup = ImageCleanup::references(vec![reference.clone()]);
    let suite = r#"
[[test]]
name = "release file"
script = "checks/release.sh"
env = { EXPECTED = "{{ image.version }}" }

[[test]]
name = "shell works"
inline = ["test -x /bin/sh"]
"#;
    workspace.write(
        "image.toml",
        &config("imgbuild-tested", &version, "", suite),
    );
    workspace.write(
        "checks/release.sh",
        "#!/bin/sh\ntest \"$(cat /etc/imgbuild-release)\" = \"$EXPECTED\"\n",
    );
    let outcome = build(&workspace, &["--output", "json"]).exits_with(EXIT_OK);

    // JSON shows each test like a step: started, then finished with its result.
    let events = outcome.events();
    let of = |kind: &str| -> Vec<&serde_json::Value> {
        events.iter().filter(|e| e["event"] == kind).collect()
    };
    let started: Vec<&str> = of("test_started")
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        started,
        ["release file", "shell works"],
        "{}",
        outcome.stdout
    );
    let finished = of("test_finished");
    assert_eq!(finished.len(), 2, "{}", outcome.stdout);
    assert!(
        finished
            .iter()
            .all(|e| e["passed"] == true && e["build"] == "box")
    );

    let manifest = workspace.manifest();
    let entry = &manifest["builds"][0];
    assert_eq!(entry["status"], "tested", "{entry}");
    let tests = entry["tests"].as_array().unwrap();
    assert_eq!(tests.len(), 2, "{entry}");
    assert_eq!(tests[0]["name"], "release file");
    assert_eq!(tests[0]["passed"], true);
    assert_eq!(tests[0]["exit_code"], 0);
    assert!(entry.get("tests_skipped").is_none(), "{entry}");

    // A tested version is handed out.
    let id = docker(&["image", "inspect", "--format", "{{.Id}}", &reference]);
    output(&workspace, &[]).exits_with(EXIT_OK).stdout_has(&id);
    assert!(
        workspace
            .read("github_output")
            .contains(&format!("box_artifact_id={id}")),
    );
    assert_nothing_left(&workspace, entry["run_id"].as_str().unwrap());
}

#[test]
fn a_failing_test_fails_the_build_and_output_refuses_the_version() {
    let workspace = Workspace::new();
    let version = unique_version();
    let reference = format!("imgbuild-untrusted:{version}");
    let _cleanup = ImageCleanup::references(vec![reference.clone()]);
    workspace.write(
        "image.toml",
        &config("imgbuild-untrusted", &version, "", FAILING_SUITE),
    );
    let outcome = build(&workspace, &[])
        .exits_with(EXIT_BUILD_FAILED)
        // The failure shows the test, its exit code and its output.
        .stderr_has("test failed: service answers (exit code 3")
        .stderr_has("probe-said-no")
        .stderr_has("1 of 3 tests failed on the artifact: `service answers` (inline `echo probe-said-no; exit 3`: exit code 3)")
        .stderr_has("test passed: runs after a failure");
    let run_id = run_id_in(&outcome.stderr);

    // Recorded as failed, with every test's result; the artifact is kept.
    let manifest = workspace.manifest();
    let entry = &manifest["builds"][0];
    assert_eq!(entry["status"], "failed", "{entry}");
    let tests = entry["tests"].as_array().unwrap();
    let passed: Vec<bool> = tests.iter().map(|t| t["passed"] == true).collect();
    assert_eq!(passed, [true, false, true], "{entry}");
    assert_eq!(tests[1]["exit_code"], 3);
    assert!(
        tests[1]["output_tail"]
            .as_array()
            .unwrap()
            .iter()
            .any(|line| line == "probe-said-no"),
        "{entry}"
    );
    assert!(entry.get("deleted").is_none(), "{entry}");
    assert!(image_exists(&reference), "on_test_failure = keep keeps it");
    assert!(
        !workspace.join("github_output").exists(),
        "a failed version is not handed to later steps"
    );
    assert_nothing_left(&workspace, &run_id);

    // `output` refuses it, naming the version and the failed test, in every
    // format; --allow-failed hands it out.
    for format in ["id", "json", "tfvars"] {
        output(&workspace, &["--format", format])
            .exits_with(EXIT_USAGE)
            .stderr_has(&format!("build box version {version} failed its tests"))
            .stderr_has("`service answers`")
            .stderr_has("--allow-failed");
    }
    let id = docker(&["image", "inspect", "--format", "{{.Id}}", &reference]);
    output(&workspace, &["--allow-failed"])
        .exits_with(EXIT_OK)
        .stdout_has(&id);

    // The version stays taken.
    build(&workspace, &[])
        .exits_with(EXIT_USAGE)
        .stderr_has("failed")
        .stderr_has("nothing was launched");
}

#[test]
fn on_test_failure_delete_removes_the_image_and_records_the_failure() {
    let workspace = Workspace::new();
    let version = unique_version();
    let reference = format!("imgbuild-deleted:{version}");
    let _cleanup = ImageCleanup::references(vec![reference.clone()]);
    workspace.write(
        "image.toml",
        &config(
            "imgbuild-deleted",
            &version,
            "on_test_failure = \"delete\"",
            FAILING_SUITE,
        ),
    );
    build(&workspace, &[])
        .exits_with(EXIT_BUILD_FAILED)
        .stderr_has("the artifact was deleted");
    let manifest = workspace.manifest();
    let entry = &manifest["builds"][0];
    assert_eq!(entry["status"], "failed", "{entry}");
    assert_eq!(entry["deleted"], true, "{entry}");
    assert!(!image_exists(&reference), "the failed image is deleted");
    // So are the SBOM documents that described it.
    workspace.assert_recorded_files_gone(entry);
    // Nothing to hand out, even when failures are allowed.
    output(&workspace, &["--allow-failed"])
        .exits_with(EXIT_USAGE)
        .stderr_has("was deleted");

    // Nor to test again: refused, saying what to do, and nothing changes.
    let before = workspace.read("imgbuild-manifest.json");
    retest(&workspace, &[])
        .exits_with(EXIT_USAGE)
        .stderr_has(&format!(
            "build `box` of imgbuild-deleted version {version} failed its tests and its artifact"
        ))
        .stderr_has("was deleted (on_test_failure = \"delete\"), so there is nothing to test")
        .stderr_has("build a new version")
        .stderr_has("nothing was tested")
        .stderr_lacks("==> test");
    assert_eq!(workspace.read("imgbuild-manifest.json"), before);
    assert!(workspace.journals().is_empty());
}

#[test]
fn skip_tests_records_an_untested_version() {
    let workspace = Workspace::new();
    let version = unique_version();
    let reference = format!("imgbuild-skipped:{version}");
    let _cleanup = ImageCleanup::references(vec![reference.clone()]);
    workspace.write(
        "image.toml",
        &config("imgbuild-skipped", &version, "", FAILING_SUITE),
    );
    build(&workspace, &["--skip-tests"])
        .exits_with(EXIT_OK)
        .stderr_has("--skip-tests: the 3 test(s) of this build did not run")
        .stderr_lacks("test failed");
    let manifest = workspace.manifest();
    let entry = &manifest["builds"][0];
    assert_eq!(entry["status"], "built", "{entry}");
    assert_eq!(entry["tests_skipped"], true, "{entry}");
    assert!(entry.get("tests").is_none(), "{entry}");
    output(&workspace, &[]).exits_with(EXIT_OK);
}

/// Starts `command`, waits for the test to run, interrupts it, and returns
/// the run id and the log.
fn interrupt_during_the_test(workspace: &Workspace, command: Imgbuild, log: &str) -> String {
    let mut running = command.spawn(&workspace.join(log));
    running.wait_for_output("test-is-running", std::time::Duration::from_secs(300));
    let run_id = run_id_in(&running.log());
    running.signal(libc::SIGINT);
    let (status, log) = running.wait(std::time::Duration::from_secs(120));
    assert_eq!(status.code(), Some(EXIT_INTERRUPTED), "{log}");
    assert_nothing_left(workspace, &run_id);
    run_id
}

#[test]
fn an_interrupt_during_the_tests_removes_the_test_container_and_keeps_the_artifact_untested() {
    let workspace = Workspace::new();
    let version = unique_version();
    let reference = format!("imgbuild-interrupted:{version}");
    let _cleanup = ImageCleanup::references(vec![reference.clone()]);
    let slow = "[[test]]\nname = \"slow\"\ninline = [\"echo test-is-running\", \"sleep 600\"]\n";
    // `delete` would remove an artifact that failed its tests: an
    // interrupted test run is no failure, so it must not.
    let write_config = |suite: &str| {
        workspace.write(
            "image.toml",
            &config(
                "imgbuild-interrupted",
                &version,
                "on_test_failure = \"delete\"",
                suite,
            ),
        )
    };
    write_config(slow);
    let command = workspace
        .imgbuild()
        .args(["build", "image.toml", "--var"])
        .arg(format!("base={}", docker_base_image()));
    interrupt_during_the_test(&workspace, command, "build.log");

    // The image exists, so its version is taken: recorded, with no test
    // result, as failed (never handed out untested), and kept.
    assert!(
        image_exists(&reference),
        "an interrupt deleted the artifact"
    );
    let manifest = workspace.manifest();
    let entry = &manifest["builds"][0];
    assert_eq!(entry["status"], "failed", "{entry}");
    assert!(entry.get("deleted").is_none(), "{entry}");
    assert!(entry.get("tests").is_none(), "{entry}");
    let error = entry["test_error"].as_str().unwrap();
    assert!(
        error.contains("interrupted before the tests finished"),
        "{entry}"
    );
    assert!(error.contains("no test failed"), "{entry}");
    assert!(
        error.contains("until `imgbuild test` passes on it"),
        "{entry}"
    );

    // An interrupted `imgbuild test` removes its container too and leaves
    // the entry as it was.
    let before = workspace.read("imgbuild-manifest.json");
    interrupt_during_the_test(&workspace, retest_command(&workspace, &[]), "test.log");
    assert_eq!(workspace.read("imgbuild-manifest.json"), before);
    assert!(image_exists(&reference));

    // Tested to the end, the version is tested and handed out.
    write_config("[[test]]\nname = \"quick\"\ninline = [\"true\"]\n");
    retest(&workspace, &[])
        .exits_with(EXIT_OK)
        .stderr_has("test passed: quick")
        .stderr_has("is recorded as tested")
        .stderr_has("(it was failed)");
    let manifest = workspace.manifest();
    assert_eq!(manifest["builds"][0]["status"], "tested");
    assert!(manifest["builds"][0].get("test_error").is_none());
    output(&workspace, &[]).exits_with(EXIT_OK);
}

#[test]
fn imgbuild_test_runs_the_tests_again_and_replaces_the_verdict() {
    let workspace = Workspace::new();
    let version = unique_version();
    let reference = format!("imgbuild-retested:{version}");
    let _cleanup = ImageCleanup::references(vec![reference.clone()]);
    let release = r#"
[[test]]
name = "release file"
inline = ["test \"$(cat /etc/imgbuild-release)\" = \"$EXPECTED\""]
env = { EXPECTED = "{{ image.version }}" }
"#;
    let write_config = |version: &str, suite: &str| {
        workspace.write(
            "image.toml",
            &config("imgbuild-retested", version, "", suite),
        )
    };
    write_config(&version, release);
    build(&workspace, &[]).exits_with(EXIT_OK);
    let built = workspace.manifest()["builds"][0].clone();
    assert_eq!(built["status"], "tested", "{built}");

    // Again, with JSON events: the test like a step, then the entry as now
    // recorded. Nothing is rebuilt.
    let outcome = retest(&workspace, &["--output", "json"]).exits_with(EXIT_OK);
    let events = outcome.events();
    let finished: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["event"] == "test_finished")
        .collect();
    assert_eq!(finished.len(), 1, "{}", outcome.stdout);
    assert_eq!(finished[0]["name"], "release file");
    assert_eq!(finished[0]["passed"], true);
    let run = events
        .iter()
        .find(|e| e["event"] == "run_finished")
        .unwrap();
    assert_eq!(run["exit_code"], 0, "{run}");
    assert_eq!(run["artifacts"][0]["status"], "tested", "{run}");
    assert_nothing_left(&workspace, run["run_id"].as_str().unwrap());
    let manifest = workspace.manifest();
    let entries = manifest["builds"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "{manifest}");
    let entry = &entries[0];
    assert_eq!(entry["artifact_id"], built["artifact_id"]);
    assert_eq!(entry["run_id"], built["run_id"], "the build's run stays");
    assert!(entry["retested_at"].is_string(), "{entry}");
    assert_eq!(run["artifacts"][0], *entry);

    // A test added since fails on the recorded image: exit 1, the version
    // is failed, and `output` refuses it.
    write_config(
        &version,
        &format!("{release}\n[[test]]\nname = \"has curl\"\ninline = [\"command -v curl\"]\n"),
    );
    retest(&workspace, &[])
        .exits_with(EXIT_BUILD_FAILED)
        .stderr_has("test passed: release file")
        .stderr_has("test failed: has curl")
        .stderr_has("1 of 2 tests failed on the artifact: `has curl`")
        .stderr_has("is recorded as failed")
        .stderr_has("(it was tested)");
    let manifest = workspace.manifest();
    let entry = &manifest["builds"][0];
    assert_eq!(entry["status"], "failed", "{entry}");
    let passed: Vec<bool> = entry["tests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["passed"] == true)
        .collect();
    assert_eq!(passed, [true, false], "{entry}");
    assert!(image_exists(&reference), "a retest never deletes");
    output(&workspace, &[])
        .exits_with(EXIT_USAGE)
        .stderr_has("failed its tests")
        .stderr_has("`has curl`");

    // The config moved on to a version that was never built: refused,
    // naming the versions there are. `--version` tests the recorded one,
    // with `{{ image.version }}` rendered as that version, so its release
    // file test passes again.
    write_config("9.9.9", release);
    retest(&workspace, &[])
        .exits_with(EXIT_USAGE)
        .stderr_has("records no build `box` of imgbuild-retested version 9.9.9")
        .stderr_has(&format!("versions it records for this build: {version}"))
        .stderr_lacks("==> test");
    retest(&workspace, &["--version", &version])
        .exits_with(EXIT_OK)
        .stderr_has("test passed: release file")
        .stderr_has("(it was failed)");
    assert_eq!(workspace.manifest()["builds"][0]["status"], "tested");
    output(&workspace, &[]).exits_with(EXIT_OK);
}
