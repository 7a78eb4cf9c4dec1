//! `imgbuild build` end to end against the real Docker Engine: the template
//! produces a tagged, labelled image that runs with the provisioners'
//! changes; failures and interrupts leave no container and no tag.

use imgbuild_test_support::{cli::*, common::*, docker::ImageCleanup};
use std::time::Duration;

fn build_template(workspace: &Workspace, version: &str) -> Outcome {
    workspace
        .imgbuild()
        .args([
            "build",
            "docker-debian.toml",
            "--var",
            "pull=never",
            "--var",
        ])
        .arg(format!("base_image={}", docker_base_image()))
        .arg("--var")
        .arg(format!("version={version}"))
        .run()
}

#[test]
fn the_template_builds_a_tagged_image_that_runs_with_the_changes() {
    let workspace = Workspace::with_templates();
    let version = unique_version();
    let reference = format!("debian-app:{version}");
    let _cleanup = ImageCleanup::references(vec![reference.clone()]);
    build_template(&workspace, &version)
        .exits_with(EXIT_OK)
        .stderr_has("container | ==> provision");

    // The image runs as the app user with the uploaded script and the
    // Dockerfile-style changes applied.
    let output = docker(&["run", "--rm", &reference]);
    assert_eq!(
        output,
        format!("app debian-app {version} as app on port 8080")
    );
    let config = docker(&[
        "image",
        "inspect",
        "--format",
        "{{json .Config}}",
        &reference,
    ]);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert!(
        config["Env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e == "APP_PORT=8080"),
        "{config}"
    );
    assert_eq!(config["User"], "app");
    assert_eq!(config["WorkingDir"], "/srv/app");
    assert!(config["ExposedPorts"].get("8080/tcp").is_some(), "{config}");
    let labels = &config["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], version);
    assert_eq!(labels["org.opencontainers.image.title"], "debian-app");
    assert!(labels["org.opencontainers.image.created"].is_string());
    assert_eq!(labels["org.example.component"], "app");
    assert_eq!(labels["team"], "platform");
    assert_eq!(
        docker(&[
            "run",
            "--rm",
            "--entrypoint",
            "stat",
            &reference,
            "-c",
            "%a %U",
            "/srv/app/app.conf"
        ]),
        "644 app"
    );

    // The manifest records the image id, repository and tags.
    let manifest = workspace.manifest();
    let entry = &manifest["builds"][0];
    assert_eq!(entry["build"]["type"], "docker");
    let id = docker(&["image", "inspect", "--format", "{{.Id}}", &reference]);
    assert_eq!(entry["artifact_id"], id);
    assert_eq!(entry["details"]["repository"], "debian-app");
    // The version tag first, then the template's `tags = ["latest"]`, and
    // both name the image the build made.
    assert_eq!(
        entry["details"]["tags"],
        serde_json::json!([version, "latest"])
    );
    let latest = "debian-app:latest";
    assert_eq!(
        entry["details"]["references"],
        serde_json::json!([reference, latest])
    );
    assert_eq!(
        docker(&["image", "inspect", "--format", "{{.Id}}", latest]),
        id
    );
    assert_eq!(entry["source"]["kind"], "docker-image");
    // The template's test ran on a fresh container of the image and passed.
    assert_eq!(entry["status"], "tested", "{entry}");
    assert_eq!(entry["tests"][0]["passed"], true, "{entry}");

    // Nothing of the build (nor of its test) is left running.
    let run_id = entry["run_id"].as_str().unwrap();
    assert!(containers_labelled(&format!("org.imgbuild.run-id={run_id}")).is_empty());
    assert!(workspace.journals().is_empty());

    // The version is immutable.
    build_template(&workspace, &version)
        .exits_with(EXIT_USAGE)
        .stderr_has(&version)
        .stderr_has("nothing was launched");
}

/// A Docker build of `name` from the `base` variable's image, with
/// `provisioners` (TOML) as its `[[provision]]` tables.
fn docker_config(name: &str, version: &str, provisioners: &str) -> String {
    format!(
        r#"[image]
name = "{name}"
version = "{version}"

[variables]
base = {{ description = "base image" }}

[builders.box]
type = "docker"
image = "{{{{ var.base }}}}"
pull = "never"

{provisioners}"#
    )
}

fn failing_config(version: &str, command: &str) -> String {
    docker_config(
        "imgbuild-failing",
        version,
        &format!(
            "[[provision]]\ntype = \"shell\"\ninline = [\"echo provisioning-started\", \"{command}\"]\n"
        ),
    )
}

#[test]
fn a_failing_provisioner_leaves_no_container_and_no_tag() {
    let workspace = Workspace::new();
    let version = unique_version();
    workspace.write("image.toml", &failing_config(&version, "exit 4"));
    let _cleanup = ImageCleanup::references(vec![format!("imgbuild-failing:{version}")]);
    let outcome = workspace
        .imgbuild()
        .args(["build", "image.toml", "--var"])
        .arg(format!("base={}", docker_base_image()))
        .run()
        .exits_with(EXIT_BUILD_FAILED)
        .stderr_has("exit code 4");
    let run_id = run_id_in(&outcome.stderr);
    assert!(containers_labelled(&format!("org.imgbuild.run-id={run_id}")).is_empty());
    let tagged = std::process::Command::new("docker")
        .args(["image", "inspect", &format!("imgbuild-failing:{version}")])
        .output()
        .unwrap();
    assert!(!tagged.status.success(), "the version tag must not exist");
    assert!(workspace.journals().is_empty());
}

#[test]
fn an_interrupt_mid_provisioning_exits_130_and_removes_the_container() {
    let workspace = Workspace::new();
    let version = unique_version();
    workspace.write("image.toml", &failing_config(&version, "sleep 600"));
    let mut running = workspace
        .imgbuild()
        .args(["build", "image.toml", "--var"])
        .arg(format!("base={}", docker_base_image()))
        .spawn(&workspace.join("build.log"));
    running.wait_for_output("provisioning-started", Duration::from_secs(300));
    let run_id = run_id_in(&running.log());
    assert_eq!(
        containers_labelled(&format!("org.imgbuild.run-id={run_id}")).len(),
        1
    );
    running.signal(libc::SIGINT);
    let (status, log) = running.wait(Duration::from_secs(120));
    assert_eq!(status.code(), Some(EXIT_INTERRUPTED), "{log}");
    assert!(
        containers_labelled(&format!("org.imgbuild.run-id={run_id}")).is_empty(),
        "{log}"
    );
    assert!(workspace.journals().is_empty());
}

/// Killed while its image is tested, before the manifest records it: the
/// image is in the run journal, and `imgbuild clean` removes it with its
/// version tag (and the test's container), so the version can be built
/// again.
#[test]
fn an_image_killed_before_it_is_recorded_is_removed_by_clean() {
    let workspace = Workspace::new();
    let version = unique_version();
    workspace.write(
        "image.toml",
        &docker_config(
            "imgbuild-unrecorded",
            &version,
            "[[provision]]\ntype = \"shell\"\ninline = [\"true\"]\n\n[[test]]\nname = \"slow\"\ninline = [\"echo testing-started\", \"sleep 600\"]\n",
        ),
    );
    let reference = format!("imgbuild-unrecorded:{version}");
    let _cleanup = ImageCleanup::references(vec![reference.clone()]);
    let mut running = workspace
        .imgbuild()
        .args(["build", "image.toml", "--var"])
        .arg(format!("base={}", docker_base_image()))
        .spawn(&workspace.join("killed.log"));
    running.wait_for_output("testing-started", Duration::from_secs(300));
    running.signal(libc::SIGKILL);
    let (_, log) = running.wait(Duration::from_secs(30));
    assert_ne!(docker(&["images", "-q", &reference]), "", "{log}");
    assert!(!workspace.join("imgbuild-manifest.json").exists());

    workspace
        .imgbuild()
        .args(["--output", "json", "clean"])
        .run()
        .exits_with(EXIT_OK)
        .stdout_has("docker_image");
    assert_eq!(docker(&["images", "-q", &reference]), "");
    assert!(workspace.journals().is_empty());
}

#[test]
fn a_killed_run_is_reported_by_the_next_build_and_removed_by_clean() {
    let workspace = Workspace::new();
    let version = unique_version();
    workspace.write("image.toml", &failing_config(&version, "sleep 600"));
    let _cleanup = ImageCleanup::references(vec![format!("imgbuild-failing:{version}")]);
    let mut running = workspace
        .imgbuild()
        .args(["build", "image.toml", "--var"])
        .arg(format!("base={}", docker_base_image()))
        .spawn(&workspace.join("killed.log"));
    running.wait_for_output("provisioning-started", Duration::from_secs(300));
    let run_id = run_id_in(&running.log());
    running.signal(libc::SIGKILL);
    running.wait(Duration::from_secs(30));
    let label = format!("org.imgbuild.run-id={run_id}");
    assert_eq!(
        containers_labelled(&label).len(),
        1,
        "SIGKILL allows no cleanup"
    );

    // The next build warns before doing anything else (here it then fails
    // validation-free preflight on purpose: its base image does not exist).
    workspace
        .imgbuild()
        .args([
            "build",
            "image.toml",
            "--var",
            "base=imgbuild-no/such-image:1",
        ])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("ended without cleaning up 1 resource(s)")
        .stderr_has("imgbuild clean");

    workspace
        .imgbuild()
        .args(["--output", "json", "clean"])
        .run()
        .exits_with(EXIT_OK)
        .stdout_has("\"event\":\"removed\"")
        .stdout_has("docker_container");
    assert!(containers_labelled(&label).is_empty());
    assert!(workspace.journals().is_empty());
}

/// `--check-reproducible` builds twice and names what differs: here only
/// the file a provisioner fills with random bytes, not the one it writes
/// from `SOURCE_DATE_EPOCH`, nor anything the engine mounts per container.
#[test]
fn check_reproducible_names_the_one_file_that_differs_and_keeps_one_image() {
    let workspace = Workspace::new();
    let version = unique_version();
    workspace.write(
        "image.toml",
        &docker_config(
            "imgbuild-repro",
            &version,
            r#"[[provision]]
type = "shell"
inline = [
  "mkdir -p /opt/app",
  "echo \"built at $SOURCE_DATE_EPOCH\" > /opt/app/stable.txt",
  "touch -d @$SOURCE_DATE_EPOCH /opt/app/stable.txt",
  "head -c 16 /dev/urandom | od -An -tx1 > /opt/app/random.txt",
]
"#,
        ),
    );
    let reference = format!("imgbuild-repro:{version}");
    let _cleanup = ImageCleanup::references(vec![reference.clone()]);
    let outcome = workspace
        .imgbuild()
        .args(["build", "image.toml", "--check-reproducible", "--var"])
        .arg(format!("base={}", docker_base_image()))
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .run()
        .exits_with(EXIT_OK)
        .stderr_has("the first of two builds")
        .stderr_has("machine files differ")
        .stderr_has("/opt/app/random.txt: content");
    let first_image = outcome
        .stderr
        .split("deleted the first build's artifact ")
        .nth(1)
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("no deleted first artifact in:\n{}", outcome.stderr))
        .to_owned();

    let entry = &workspace.manifest()["builds"][0];
    let report = &entry["reproducibility"];
    assert_eq!(report["files_identical"], false, "{report}");
    // Image ids cover the engine's commit time: never equal.
    assert_eq!(report["artifact_identical"], false, "{report}");
    assert_eq!(report["files"]["differing"], 1, "{report}");
    assert_eq!(
        report["files"]["differences"],
        serde_json::json!([{"path": "/opt/app/random.txt", "differs": ["content"]}])
    );
    assert!(
        report["files"]["compared"].as_u64().unwrap() > 1000,
        "the whole root file system is listed: {report}"
    );

    // The first build's image is gone; the recorded one is tagged.
    assert_eq!(
        docker(&["image", "inspect", "--format", "{{.Id}}", &reference]),
        entry["artifact_id"]
    );
    assert_ne!(first_image, entry["artifact_id"]);
    let inspected = std::process::Command::new("docker")
        .args(["image", "inspect", &first_image])
        .output()
        .unwrap();
    assert!(!inspected.status.success(), "{first_image} is still there");
    // SOURCE_DATE_EPOCH reached the provisioner and stamps the label.
    assert_eq!(
        docker(&["run", "--rm", &reference, "cat", "/opt/app/stable.txt"]),
        "built at 1700000000"
    );
    assert_eq!(
        docker(&[
            "image",
            "inspect",
            "--format",
            "{{index .Config.Labels \"org.opencontainers.image.created\"}}",
            &reference
        ]),
        "2023-11-14T22:13:20Z"
    );
    assert!(workspace.journals().is_empty());
}

#[test]
fn a_malformed_source_date_epoch_is_refused_before_anything_runs() {
    let workspace = Workspace::new();
    workspace.write("image.toml", &failing_config(&unique_version(), "true"));
    workspace
        .imgbuild()
        .args(["build", "image.toml", "--var", "base=none"])
        .env("SOURCE_DATE_EPOCH", "yesterday")
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("SOURCE_DATE_EPOCH=`yesterday` is not a whole number of seconds");
}
