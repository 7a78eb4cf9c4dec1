//! Signed provenance end to end: a key from `imgbuild keygen`, a real
//! Docker build (an exported root filesystem with its checksum file, and a
//! committed image) signed with it, and the result checked by `imgbuild
//! verify`, by Debian's `minisign`, and by the in-toto reference libraries
//! (tests/verify_attestation.py); then each kind of tampering, one at a
//! time, is caught with its own message.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use imgbuild_test_support::{cli::*, common::*, docker::ImageCleanup};
use std::path::{Path, PathBuf};
use std::process::Command;

const TOKEN: &str = "s3cr3t-token-value-4711";

fn config(name: &str, version: &str) -> String {
    format!(
        r#"[image]
name = "{name}"
version = "{version}"

[variables]
base = {{ description = "base image" }}
greeting = "hello"
token = {{ default = "{TOKEN}", sensitive = true }}

[builders.tar]
type = "docker"
image = "{{{{ var.base }}}}"
pull = "never"
export_path = "out/rootfs-{{{{ image.version }}}}.tar"

[builders.image]
type = "docker"
image = "{{{{ var.base }}}}"
pull = "never"

[[provision]]
type = "shell"
script = "scripts/setup.sh"
env = {{ GREETING = "{{{{ var.greeting }}}}", TOKEN = "{{{{ var.token }}}}" }}
"#
    )
}

fn python() -> PathBuf {
    let venv = std::env::var_os("IMGBUILD_MOTO_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/imgbuild/moto-venv")
        });
    venv.join("bin/python")
}

/// tests/verify_attestation.py on `envelope` with `key`: its exit status
/// and output.
fn reference_verify(envelope: &Path, key: &Path) -> (bool, String) {
    let output = Command::new(python())
        .arg(repo_root().join("tests/verify_attestation.py"))
        .arg(envelope)
        .arg(key)
        .output()
        .expect("the tests' Python runs (tests/setup.sh installs it)");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

fn minisign_verifies(file: &Path, key: &Path) -> bool {
    Command::new("minisign")
        .arg("-Vm")
        .arg(file)
        .arg("-p")
        .arg(key)
        .output()
        .expect("minisign runs (tests/setup.sh installs it)")
        .status
        .success()
}

fn verify(workspace: &Workspace, build: &str, key: &str) -> Outcome {
    workspace
        .imgbuild()
        .args(["verify", "--build", build, "--key", key])
        .run()
}

/// Runs `check` with `path` changed by `change`, then puts it back.
fn tampered(path: &Path, change: impl FnOnce(&mut Vec<u8>), check: impl FnOnce()) {
    let original = std::fs::read(path).unwrap();
    let mut changed = original.clone();
    change(&mut changed);
    assert_ne!(changed, original);
    std::fs::write(path, &changed).unwrap();
    check();
    std::fs::write(path, &original).unwrap();
}

#[test]
fn a_signed_build_verifies_everywhere_and_each_tampering_fails_with_its_reason() {
    let workspace = Workspace::new();
    let name = unique("attest");
    let version = unique_version();
    let _cleanup = ImageCleanup::repository(&name);
    workspace.write("image.toml", &config(&name, &version));
    workspace.write(
        "scripts/setup.sh",
        "#!/bin/sh\nset -e\necho \"$GREETING\" > /etc/greeting\n",
    );

    workspace
        .imgbuild()
        .args(["keygen", "--out", "keys"])
        .run()
        .exits_with(EXIT_OK)
        .stdout_has("keys/imgbuild.key");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(workspace.join("keys/imgbuild.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let secret = workspace.read("keys/imgbuild.key");
    workspace
        .imgbuild()
        .args(["keygen", "--out", "keys"])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("already exists");
    assert_eq!(
        workspace.read("keys/imgbuild.key"),
        secret,
        "never overwritten"
    );
    workspace
        .imgbuild()
        .args(["keygen", "--out", "other-keys"])
        .run()
        .exits_with(EXIT_OK);

    let built = workspace
        .imgbuild()
        .args([
            "build",
            "image.toml",
            "--sign-key",
            "keys/imgbuild.key",
            "--var",
        ])
        .arg(format!("base={}", docker_base_image()))
        .run()
        .exits_with(EXIT_OK)
        .stderr_lacks(TOKEN);
    assert!(!built.stdout.contains(TOKEN));

    let manifest = workspace.manifest();
    let text = workspace.read("imgbuild-manifest.json");
    assert!(!text.contains(TOKEN), "{text}");
    let entry = |build: &str| {
        manifest["builds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["build"]["name"] == build)
            .unwrap()
            .clone()
    };
    let tar = entry("tar");
    let image = entry("image");

    // The exported file: its envelope beside it, recorded with its digest,
    // naming the file by name and SHA-256.
    let envelope_path = workspace.join(&format!("out/rootfs-{version}.intoto.json"));
    let tarball = workspace.join(&format!("out/rootfs-{version}.tar"));
    let checksum = workspace.join(&format!("out/rootfs-{version}.tar.sha256"));
    assert_eq!(
        tar["attestation"]["path"],
        envelope_path.canonicalize().unwrap().display().to_string(),
        "{tar}"
    );
    assert_eq!(tar["attestation"]["sha256"], sha256_of(&envelope_path));
    let envelope_text = std::fs::read_to_string(&envelope_path).unwrap();
    assert!(!envelope_text.contains(TOKEN));
    let envelope: serde_json::Value = serde_json::from_str(&envelope_text).unwrap();
    assert_eq!(envelope["payloadType"], "application/vnd.in-toto+json");
    let payload = STANDARD
        .decode(envelope["payload"].as_str().unwrap())
        .unwrap();
    assert!(!String::from_utf8_lossy(&payload).contains(TOKEN));
    let statement: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(statement["_type"], "https://in-toto.io/Statement/v1");
    assert_eq!(statement["predicateType"], "https://slsa.dev/provenance/v1");
    // The tarball, and every other file the entry records (the SBOMs).
    assert_eq!(
        statement["subject"][0],
        serde_json::json!({
            "name": format!("rootfs-{version}.tar"),
            "digest": {"sha256": sha256_of(&tarball)},
        })
    );
    let files = tar["files"].as_array().unwrap();
    assert_eq!(statement["subject"].as_array().unwrap().len(), files.len());
    for (subject, file) in statement["subject"].as_array().unwrap().iter().zip(files) {
        assert_eq!(subject["digest"]["sha256"], file["sha256"], "{subject}");
    }
    let definition = &statement["predicate"]["buildDefinition"];
    let external = &definition["externalParameters"];
    assert_eq!(
        external["config"]["sha256"],
        sha256_of(&workspace.join("image.toml"))
    );
    assert_eq!(external["variables"]["greeting"], "hello");
    assert!(
        external["variables"].get("token").is_none(),
        "sensitive variables are left out: {external}"
    );
    let dependencies = definition["resolvedDependencies"].as_array().unwrap();
    assert!(
        dependencies.iter().any(|d| d["name"] == "scripts/setup.sh"
            && d["digest"]["sha256"] == sha256_of(&workspace.join("scripts/setup.sh"))),
        "{dependencies:?}"
    );
    let base_id = docker(&[
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        &docker_base_image(),
    ]);
    assert_eq!(
        dependencies[0]["digest"]["sha256"],
        base_id.trim_start_matches("sha256:"),
        "{dependencies:?}"
    );
    assert_eq!(
        statement["predicate"]["runDetails"]["metadata"]["invocationId"],
        tar["run_id"]
    );

    // The committed image: named by its image id.
    let image_statement: serde_json::Value = {
        // Beside the image's other outputs (its SBOM), or in the config's
        // directory when it has none.
        let path = image["attestation"]["path"].as_str().unwrap();
        assert!(
            path.ends_with(&format!("/{name}-{version}.image.intoto.json")),
            "{path}"
        );
        assert!(Path::new(path).starts_with(workspace.path().canonicalize().unwrap()));
        let envelope: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        serde_json::from_slice(
            &STANDARD
                .decode(envelope["payload"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    let image_id = docker(&[
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        &format!("{name}:{version}"),
    ]);
    let reference = format!("{name}:{version}");
    let subject = image_statement["subject"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == reference.as_str())
        .unwrap_or_else(|| panic!("no subject {reference}: {image_statement}"));
    assert_eq!(
        subject["digest"]["sha256"],
        image_id.trim_start_matches("sha256:")
    );

    // Everything holds: imgbuild, minisign and the in-toto reference
    // implementation agree.
    verify(&workspace, "tar", "keys/imgbuild.pub")
        .exits_with(EXIT_OK)
        .stdout_has("verified with key");
    verify(&workspace, "image", "keys/imgbuild.pub").exits_with(EXIT_OK);
    let json = workspace
        .imgbuild()
        .args(["verify", "--build", "tar", "--key", "keys/imgbuild.pub"])
        .args(["--output", "json"])
        .run()
        .exits_with(EXIT_OK);
    let report: serde_json::Value = serde_json::from_str(json.stdout.trim()).unwrap();
    assert_eq!(report["verified"], true, "{report}");
    let public_key = workspace.join("keys/imgbuild.pub");
    assert!(minisign_verifies(&checksum, &public_key));
    let (ok, output) = reference_verify(&envelope_path, &public_key);
    assert!(ok, "{output}");
    assert!(output.contains(&sha256_of(&tarball)), "{output}");

    // A wrong key: imgbuild, minisign and the reference all refuse.
    let other_key = workspace.join("other-keys/imgbuild.pub");
    verify(&workspace, "tar", "other-keys/imgbuild.pub")
        .exits_with(EXIT_BUILD_FAILED)
        .stdout_has("signed by another key");
    assert!(!minisign_verifies(&checksum, &other_key));
    let (ok, output) = reference_verify(&envelope_path, &other_key);
    assert!(!ok, "{output}");

    // One flipped byte in the artifact.
    tampered(
        &tarball,
        |bytes| {
            let middle = bytes.len() / 2;
            bytes[middle] ^= 1;
        },
        || {
            verify(&workspace, "tar", "keys/imgbuild.pub")
                .exits_with(EXIT_BUILD_FAILED)
                .stdout_has("was modified")
                .stdout_has("verification failed: the artifact was modified");
        },
    );

    // An envelope whose statement was edited to name another digest.
    tampered(
        &envelope_path,
        |bytes| {
            let mut edited = statement.clone();
            edited["subject"][0]["digest"]["sha256"] = "0".repeat(64).into();
            let mut envelope = envelope.clone();
            envelope["payload"] = STANDARD.encode(serde_json::to_vec(&edited).unwrap()).into();
            *bytes = serde_json::to_vec_pretty(&envelope).unwrap();
        },
        || {
            verify(&workspace, "tar", "keys/imgbuild.pub")
                .exits_with(EXIT_BUILD_FAILED)
                .stdout_has("changed after it was signed");
            let (ok, output) = reference_verify(&envelope_path, &public_key);
            assert!(!ok, "{output}");
        },
    );

    // A checksum file edited to match a replaced artifact.
    tampered(
        &checksum,
        |bytes| *bytes = format!("{}  rootfs-{version}.tar\n", "1".repeat(64)).into_bytes(),
        || {
            assert!(!minisign_verifies(&checksum, &public_key));
            verify(&workspace, "tar", "keys/imgbuild.pub")
                .exits_with(EXIT_BUILD_FAILED)
                .stdout_has("the checksum file's signature does not hold");
        },
    );

    // Restored, everything holds again.
    verify(&workspace, "tar", "keys/imgbuild.pub").exits_with(EXIT_OK);

    // A build --skip-unchanged leaves out writes no attestation.
    let next = unique_version();
    workspace.write("image.toml", &config(&name, &next));
    workspace
        .imgbuild()
        .args(["build", "image.toml", "--skip-unchanged"])
        .args(["--sign-key", "keys/imgbuild.key", "--var"])
        .arg(format!("base={}", docker_base_image()))
        .run()
        .exits_with(EXIT_OK);
    let written: Vec<PathBuf> = walkdir::WalkDir::new(workspace.path())
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| e.path().to_path_buf())
        .filter(|p| p.display().to_string().contains(&next))
        .collect();
    assert!(written.is_empty(), "{written:?}");
}

#[test]
fn an_unsigned_build_records_its_provenance_and_verify_says_it_is_unsigned() {
    let workspace = Workspace::new();
    let name = unique("attest-unsigned");
    let version = unique_version();
    let _cleanup = ImageCleanup::repository(&name);
    workspace.write("image.toml", &config(&name, &version));
    workspace.write("scripts/setup.sh", "#!/bin/sh\ntrue\n");
    workspace
        .imgbuild()
        .args(["keygen", "--out", "keys"])
        .run()
        .exits_with(EXIT_OK);
    workspace
        .imgbuild()
        .args(["build", "image.toml", "--only", "tar", "--var"])
        .arg(format!("base={}", docker_base_image()))
        .env_remove_signing_key()
        .run()
        .exits_with(EXIT_OK);
    let manifest = workspace.manifest();
    let record = &manifest["builds"][0]["attestation"];
    assert!(record["key_id"].is_null(), "{record}");
    assert!(record["checksum_signature"].is_null(), "{record}");
    let envelope: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(record["path"].as_str().unwrap()).unwrap())
            .unwrap();
    assert_eq!(envelope["signatures"], serde_json::json!([]));
    assert!(
        !workspace
            .join(&format!("out/rootfs-{version}.tar.sha256.minisig"))
            .exists()
    );
    verify(&workspace, "tar", "keys/imgbuild.pub")
        .exits_with(EXIT_BUILD_FAILED)
        .stdout_has("the attestation is unsigned");
}

trait WithoutSigningKey {
    fn env_remove_signing_key(self) -> Self;
}

impl WithoutSigningKey for Imgbuild {
    /// A developer's own IMGBUILD_SIGNING_KEY must not sign the unsigned
    /// test's build.
    fn env_remove_signing_key(self) -> Self {
        self.env("IMGBUILD_SIGNING_KEY", "")
    }
}
