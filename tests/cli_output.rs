//! `--output json`: one JSON event per line on stdout, and nothing else
//! there, so CI can pipe it to `jq`; human logs and diagnostics on stderr.

use imgbuild_test_support::{cli::*, common::*, docker::ImageCleanup};

fn config(version: &str, secret_line: &str) -> String {
    format!(
        r#"[image]
name = "imgbuild-json"
version = "{version}"

[variables]
base = {{ description = "base image" }}
token = {{ default = "tok-3f9a-very-secret", sensitive = true }}

[builders.box]
type = "docker"
image = "{{{{ var.base }}}}"
pull = "never"

[[provision]]
type = "shell"
env = {{ TOKEN = "{{{{ var.token }}}}" }}
inline = ["echo hello from the build", "{secret_line}"]
"#
    )
}

#[test]
fn json_output_is_one_event_per_line_ending_with_the_artifacts() {
    let workspace = Workspace::new();
    let version = unique_version();
    workspace.write("image.toml", &config(&version, "echo token is $TOKEN"));
    let _cleanup = ImageCleanup::references(vec![format!("imgbuild-json:{version}")]);
    let github_output = workspace.join("github-output");
    let outcome = workspace
        .imgbuild()
        .args(["--output", "json", "build", "image.toml", "--var"])
        .arg(format!("base={}", docker_base_image()))
        .env("GITHUB_OUTPUT", &github_output)
        .run()
        .exits_with(EXIT_OK);
    let events = outcome.events();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"run_started"));
    assert_eq!(kinds.last(), Some(&"run_finished"));
    for expected in [
        "build_started",
        "step_started",
        "output",
        "artifact",
        "build_finished",
    ] {
        assert!(
            kinds.contains(&expected),
            "no {expected} event in {kinds:?}"
        );
    }
    assert!(
        events.iter().all(|e| e["time"].is_string()),
        "every event is timestamped"
    );
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "output" && e["line"] == "hello from the build")
    );

    let finished = events.last().unwrap();
    assert_eq!(finished["exit_code"], 0);
    let artifact = &finished["artifacts"][0];
    assert_eq!(artifact["build"]["name"], "box");
    assert_eq!(artifact["image"]["version"], version);
    assert!(
        artifact["artifact_id"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );

    // The sensitive value never leaves the process, even when a script
    // prints it.
    assert!(!outcome.stdout.contains("tok-3f9a-very-secret"));
    assert!(!outcome.stderr.contains("tok-3f9a-very-secret"));
    assert!(events.iter().any(|e| e["line"] == "token is <sensitive>"));
    assert!(
        !workspace
            .read("imgbuild-manifest.json")
            .contains("tok-3f9a-very-secret")
    );
}

#[test]
fn a_failed_build_reports_its_error_and_exit_code_in_json() {
    let workspace = Workspace::new();
    let version = unique_version();
    workspace.write("image.toml", &config(&version, "exit 9"));
    let outcome = workspace
        .imgbuild()
        .args(["--output", "json", "build", "image.toml", "--var"])
        .arg(format!("base={}", docker_base_image()))
        .run()
        .exits_with(EXIT_BUILD_FAILED);
    let events = outcome.events();
    let failed = events
        .iter()
        .find(|e| e["event"] == "build_finished")
        .unwrap();
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["error"].as_str().unwrap().contains("exit code 9"),
        "{failed}"
    );
    assert_eq!(events.last().unwrap()["exit_code"], 1);
    assert_eq!(events.last().unwrap()["artifacts"], serde_json::json!([]));
}

#[test]
fn a_reader_that_stops_early_gets_no_panic_and_the_command_still_succeeds() {
    let workspace = Workspace::new();
    workspace.write("image.toml", &config("1.0.0", "true"));
    for command in [
        &["inspect", "image.toml", "--var", "base=debian"][..],
        &["validate", "image.toml", "--var", "base=debian"],
        &[
            "inspect",
            "--output",
            "json",
            "image.toml",
            "--var",
            "base=debian",
        ],
    ] {
        workspace
            .imgbuild()
            .args(command)
            .run_with_stdout_closed()
            .exits_with(EXIT_OK)
            .stderr_lacks("panicked");
    }
}

#[test]
fn a_secret_inside_a_name_never_rewrites_what_the_manifest_records() {
    let workspace = Workspace::new();
    let version = unique_version();
    // The sensitive value is also part of the image's name, as a password
    // like "debian" is part of "debian-baseline".
    let text = config(&version, "true")
        .replace("tok-3f9a-very-secret", "imgbuild")
        .replace(
            "[variables]",
            "description = \"built with {{ var.token }}\"\n\n[variables]",
        );
    workspace.write("image.toml", &text);
    let reference = format!("imgbuild-json:{version}");
    let _cleanup = ImageCleanup::references(vec![reference.clone()]);
    let outcome = workspace
        .imgbuild()
        .args(["--output", "json", "build", "image.toml", "--var"])
        .arg(format!("base={}", docker_base_image()))
        .run()
        .exits_with(EXIT_OK);

    let entry = &workspace.manifest()["builds"][0];
    assert_eq!(entry["image"]["name"], "imgbuild-json");
    assert_eq!(entry["details"]["references"][0], reference.as_str());
    assert_eq!(entry["image"]["description"], "built with <sensitive>");
    let events = outcome.events();
    let artifact = &events.last().unwrap()["artifacts"][0];
    assert_eq!(artifact["image"]["name"], "imgbuild-json");
    assert_eq!(artifact["details"]["references"][0], reference.as_str());

    let output = workspace
        .imgbuild()
        .args(["output", "--format", "json"])
        .run()
        .exits_with(EXIT_OK);
    let handed_out: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
    assert_eq!(handed_out["image"]["name"], "imgbuild-json");
    assert_eq!(handed_out["details"]["references"][0], reference.as_str());
}

#[test]
fn help_lists_every_registered_builder_and_provisioner_type() {
    let workspace = Workspace::new();
    let outcome = workspace.imgbuild().arg("--help").run().exits_with(EXIT_OK);
    let help = outcome.stdout.clone();
    let kinds = imgbuild_builders::registry::names()
        .into_iter()
        .chain(imgbuild_provisioners::registry::names());
    for kind in kinds {
        assert!(
            help.lines()
                .any(|line| line.split_whitespace().next() == Some(kind)),
            "`imgbuild --help` does not list the `{kind}` type:\n{help}"
        );
    }
}
