//! `imgbuild build` with `push`, end to end: a pushed version is recorded
//! with the digest the registry holds, and a push that fails after the
//! tests exits 1 and records nothing. The registries are the ones
//! `.ci/start-registry.sh` starts (see builders/tests/docker_push.rs).

use imgbuild_test_support::{cli::*, common::*, docker::ImageCleanup};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

const AUTH: &str = "127.0.0.1:5443";

fn state_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("IMGBUILD_REGISTRY_STATE")
            .unwrap_or_else(|_| "/var/lib/imgbuild-registry".to_owned()),
    )
}

fn config(repository: &str, version: &str) -> String {
    format!(
        r#"
[image]
name = "pushed"
version = "{version}"

[builders.app]
type = "docker"
image = "{base}"
pull = false
repository = "{repository}"
push = ["{AUTH}/{repository}"]

[[provision]]
type = "shell"
inline = ["echo {version} > /etc/pushed-version"]

[[test]]
name = "the version file is there"
inline = ["grep -qx {version} /etc/pushed-version"]
"#,
        base = docker_base_image(),
    )
}

/// A credential helper speaking the real protocol. With `revoke_once`
/// (a local image reference), it answers with a wrong password once that
/// image exists: a login revoked while the build ran, so preflight and the
/// build's own check pass and the push after the commit fails.
fn helper(workspace: &Workspace, revoke_once: Option<&str>) -> PathBuf {
    let bin = workspace.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = bin.join("docker-credential-imgbuildtest");
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/sh
[ "$1" = get ] || exit 2
read -r server
secret=$(cat {password})
if [ -n "{revoke}" ] && docker image inspect "{revoke}" >/dev/null 2>&1; then secret=revoked-password; fi
printf '{{"ServerURL":"%s","Username":"imgbuild","Secret":"%s"}}\n' "$server" "$secret"
"#,
            revoke = revoke_once.unwrap_or_default(),
            password = state_dir().join("auth/password").display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    workspace.write(
        "docker-config/config.json",
        &serde_json::json!({"credHelpers": {AUTH: "imgbuildtest"}}).to_string(),
    );
    bin
}

fn build(workspace: &Workspace, bin: &std::path::Path) -> Outcome {
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    workspace
        .imgbuild()
        .args(["build", "image.toml"])
        .env("DOCKER_CONFIG", workspace.join("docker-config"))
        .env("PATH", path)
        .run()
}

#[test]
fn a_pushed_version_is_recorded_with_its_digest_and_a_failed_push_records_nothing() {
    run_script(".ci/start-registry.sh", &[]);
    let repository = unique("imgbuild-test/cli-push");
    let mut cleanup = ImageCleanup::repository(&repository);
    cleanup.add(format!("{AUTH}/{repository}"));

    // Pushed: the entry names the digest the registry reports.
    let workspace = Workspace::new();
    let version = unique_version();
    cleanup.add(format!("{AUTH}/{repository}:{version}"));
    workspace.write("image.toml", &config(&repository, &version));
    let bin = helper(&workspace, None);
    build(&workspace, &bin).exits_with(EXIT_OK);
    let manifest = workspace.manifest();
    let entry = manifest["builds"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    let pushed = &entry["details"]["pushed"][0];
    assert_eq!(pushed["repository"], format!("{AUTH}/{repository}"));
    assert_eq!(pushed["tag"], version.as_str());
    let digest = pushed["digest"].as_str().unwrap();
    assert_eq!(pushed["reference"], format!("{AUTH}/{repository}@{digest}"));
    assert!(digest.starts_with("sha256:"), "{entry}");
    assert!(
        !serde_json::to_string(&manifest).unwrap().contains(
            std::fs::read_to_string(state_dir().join("auth/password"))
                .unwrap()
                .trim()
        ),
        "the password reached the manifest"
    );

    // Promotion looks for the pushed digest in the registry, not in the
    // engine: the local image may be gone (another runner promotes).
    let promote = |workspace: &Workspace| {
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        workspace
            .imgbuild()
            .args(["promote", "pushed", &version, "--channel", "prod"])
            .env("DOCKER_CONFIG", workspace.join("docker-config"))
            .env("PATH", path)
            .run()
    };
    let image_id = entry["artifact_id"].as_str().unwrap();
    let removed = std::process::Command::new("docker")
        .args(["rmi", "-f", image_id])
        .output()
        .unwrap();
    assert!(removed.status.success(), "{removed:?}");
    promote(&workspace).exits_with(EXIT_OK);
    // A record whose digest the registry does not hold under the tag.
    let wrong = format!("sha256:{}", "0".repeat(64));
    let text = workspace
        .read("imgbuild-manifest.json")
        .replace(digest, &wrong);
    workspace.write("imgbuild-manifest.json", &text);
    promote(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("its artifact is gone")
        .stderr_has(&format!("now names {digest}"));

    // The login is revoked after the build's own check: the push fails
    // after the tests passed, exit 1, nothing recorded, no image left.
    let workspace = Workspace::new();
    let version = unique_version();
    cleanup.add(format!("{AUTH}/{repository}:{version}"));
    workspace.write("image.toml", &config(&repository, &version));
    let bin = helper(&workspace, Some(&format!("{repository}:{version}")));
    build(&workspace, &bin)
        .exits_with(EXIT_BUILD_FAILED)
        .stderr_has(&format!(
            "cannot push {AUTH}/{repository}:{version} to the registry {AUTH}"
        ))
        .stderr_has(&format!("docker login {AUTH}"));
    let recorded = std::fs::read_to_string(workspace.join("imgbuild-manifest.json"))
        .map(|text| serde_json::from_str::<serde_json::Value>(&text).unwrap())
        .ok();
    let entries = recorded
        .as_ref()
        .and_then(|m| m["builds"].as_array().cloned())
        .unwrap_or_default();
    assert!(
        entries
            .iter()
            .all(|e| e["image"]["version"] != version.as_str()),
        "a failed push was recorded: {recorded:?}"
    );
    let tags = docker(&[
        "image",
        "ls",
        "--format",
        "{{.Tag}}",
        &format!("{repository}:{version}"),
    ]);
    assert!(
        tags.trim().is_empty(),
        "the unrecorded image stayed: {tags}"
    );
}
