//! The QEMU step cache end to end, with the real binary, real QEMU and the
//! cloud-init fixture: a change to the last script restores the machine
//! saved after the step before it and runs only that script; an unchanged
//! build of a new version boots nothing; a bit-flipped layer is detected,
//! reported and rebuilt from the machine saved after the step below it.
//! Each artifact, read from its disk, holds every step's changes and no
//! build's (or saved machine's) SSH key.

use imgbuild_test_support::{cli::*, common::*};
use std::path::{Path, PathBuf};

/// Logs in as root, a user the base already has: cloud-init adds the
/// build's key to root's own `authorized_keys` instead of creating a user
/// whose removal at the end would take the keys with it.
fn config(version: &str) -> String {
    format!(
        r#"[image]
name = "layered"
version = "{version}"

[variables]
base_image = {{ description = "the cloud-init fixture" }}

[builders.vm]
type = "qemu"
base_image = "{{{{ var.base_image }}}}"
memory = 1024
cpus = 1

[builders.vm.ssh]
username = "root"
timeout = "10m"

[[provision]]
type = "shell"
script = "first.sh"

[[provision]]
type = "shell"
script = "second.sh"

[[provision]]
type = "shell"
script = "third.sh"
"#
    )
}

fn build(workspace: &Workspace, version: &str) -> Outcome {
    build_with(workspace, version, true)
}

/// `shared`: with the EC2 feature, the step cache is shared through S3.
fn build_with(workspace: &Workspace, version: &str, shared: bool) -> Outcome {
    workspace.write("image.toml", &config(version));
    let command = imgbuild(workspace);
    let command = if shared {
        command
    } else {
        command.env("IMGBUILD_CACHE_SHARED", "")
    };
    command
        .args(["--output", "json", "build", "image.toml", "--var"])
        .arg(format!("base_image={}", cloud_vm_image()))
        .run()
}

/// imgbuild with the step cache in the workspace, shared (with the EC2
/// feature's moto) through an S3 bucket of the test's own.
fn imgbuild(workspace: &Workspace) -> Imgbuild {
    let command = workspace
        .imgbuild()
        .env("IMGBUILD_NO_CACHE", "false")
        .env("IMGBUILD_CACHE_DIR", workspace.join("steps"));
    #[cfg(feature = "ec2")]
    let command = command
        .env("IMGBUILD_CACHE_SHARED", upload::shared_cache())
        .env("AWS_ENDPOINT_URL_S3", imgbuild_test_support::ec2::moto());
    command
}

fn steps_started(outcome: &Outcome) -> Vec<String> {
    outcome
        .events()
        .iter()
        .filter(|e| e["event"] == "step_started")
        .filter_map(|e| e["step"].as_str().map(str::to_owned))
        .collect()
}

fn artifact(workspace: &Workspace, version: &str) -> PathBuf {
    workspace.join(&format!("output/layered-{version}.qcow2"))
}

/// What the artifact's disk holds: each step's file, and every
/// `authorized_keys` line a build's temporary key left anywhere.
fn read_artifact(image: &Path) -> (Vec<String>, Vec<String>) {
    with_mounted_disk(image, |root| {
        let steps = ["step-one", "step-two", "step-three"]
            .iter()
            .map(|name| {
                std::fs::read_to_string(root.join("etc").join(name))
                    .unwrap_or_else(|_| format!("(no /etc/{name})"))
                    .trim()
                    .to_owned()
            })
            .collect();
        let mut homes = vec![root.join("root")];
        if let Ok(entries) = std::fs::read_dir(root.join("home")) {
            homes.extend(entries.map(|e| e.unwrap().path()));
        }
        let keys = homes
            .iter()
            .filter_map(|home| std::fs::read_to_string(home.join(".ssh/authorized_keys")).ok())
            .flat_map(|text| {
                text.lines()
                    .filter(|line| line.contains("imgbuild-temporary-key"))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        (steps, keys)
    })
}

/// The store's layer kept for provisioner `step` (1-based), by its record.
fn kept_layer(workspace: &Workspace, step: usize) -> PathBuf {
    let dir = workspace.join("steps");
    let prefix = format!("step {step} ");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|x| x == "json") {
            let record: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            if record["step"]
                .as_str()
                .unwrap_or_default()
                .starts_with(&prefix)
            {
                return dir.join(format!("{}.layer", record["key"].as_str().unwrap()));
            }
        }
    }
    panic!("no layer of step {step} in {}", dir.display());
}

fn assert_nothing_left(workspace: &Workspace) {
    assert!(
        workspace.qemu_processes().is_empty(),
        "QEMU processes are left: {:?}",
        workspace.qemu_processes()
    );
    assert!(
        workspace.journals().is_empty(),
        "{:?}",
        workspace.journals()
    );
    for dir in ["output", "steps"] {
        let leftovers: Vec<String> = workspace
            .files_in(dir)
            .into_iter()
            .filter(|name| name.starts_with('.') && name != ".locks")
            .collect();
        assert!(
            leftovers.is_empty(),
            "work files left in {dir}/: {leftovers:?}"
        );
    }
}

#[test]
fn qemu_resumes_from_the_longest_kept_layer_boots_nothing_when_all_is_kept_and_rebuilds_a_corrupt_layer()
 {
    let workspace = Workspace::new();
    workspace.write("first.sh", "echo one > /etc/step-one\n");
    workspace.write("second.sh", "echo two > /etc/step-two\n");
    workspace.write("third.sh", "echo three-a > /etc/step-three\n");
    let versions: Vec<String> = (0..5).map(|_| unique_version()).collect();

    let first = build(&workspace, &versions[0]).exits_with(EXIT_OK);
    assert_eq!(
        first.provisioners_run(),
        [
            "provisioner 1 of 3",
            "provisioner 2 of 3",
            "provisioner 3 of 3"
        ]
    );
    assert_eq!(first.cached_steps(), None);
    assert!(!first.machine_restored(), "{}", first.stdout);
    assert_nothing_left(&workspace);

    // Only the last script changed: the build restores the machine saved
    // after step 2 (on the layer of step 2) and runs step 3 alone.
    workspace.write("third.sh", "echo three-b > /etc/step-three\n");
    let second = build(&workspace, &versions[1]).exits_with(EXIT_OK);
    assert_eq!(second.cached_steps(), Some(2), "{}", second.stdout);
    assert!(second.machine_restored(), "{}", second.stdout);
    assert_eq!(second.provisioners_run(), ["provisioner 3 of 3"]);
    assert_nothing_left(&workspace);
    let (steps, keys) = read_artifact(&artifact(&workspace, &versions[1]));
    assert_eq!(steps, ["one", "two", "three-b"]);
    assert!(keys.is_empty(), "a build's key is still trusted: {keys:?}");

    // Unchanged but for the version: nothing boots, the artifact is made
    // from the kept layers.
    // It also uploads its image (moto's S3): delivery must not depend on
    // a boot.
    #[cfg(feature = "ec2")]
    let (third, bucket) = upload::build(&workspace, &versions[2]);
    #[cfg(not(feature = "ec2"))]
    let third = build(&workspace, &versions[2]);
    let third = third.exits_with(EXIT_OK);
    assert_eq!(third.cached_steps(), Some(3), "{}", third.stdout);
    assert!(third.provisioners_run().is_empty());
    let started = steps_started(&third);
    for booting in [
        "cloud_init_seed",
        "launch",
        "connect",
        "provision",
        "shutdown",
    ] {
        assert!(
            !started.iter().any(|step| step == booting),
            "{booting} ran: {started:?}"
        );
    }
    assert!(started.iter().any(|step| step == "export"), "{started:?}");
    assert_nothing_left(&workspace);
    let image = artifact(&workspace, &versions[2]);
    let (steps, keys) = read_artifact(&image);
    assert_eq!(steps, ["one", "two", "three-b"]);
    assert!(keys.is_empty(), "{keys:?}");
    assert_eq!(
        workspace.read(&format!("output/layered-{}.qcow2.sha256", versions[2])),
        format!("{}  layered-{}.qcow2\n", sha256_of(&image), versions[2])
    );
    let entry = workspace.manifest()["builds"]
        .as_array()
        .unwrap()
        .last()
        .cloned()
        .unwrap();
    assert_eq!(entry["image"]["version"], versions[2].as_str());
    assert_eq!(entry["files"][0]["sha256"], sha256_of(&image));
    #[cfg(feature = "ec2")]
    upload::check(&entry, &bucket, &image);
    // Nothing booted: the SBOM lists the packages read from the machine of
    // the second build, whose final layer this one exports.
    let sbom = &entry["details"]["sbom"];
    assert!(
        sbom["reused_from"]
            .as_str()
            .is_some_and(|from| from.contains("SBOM package list")),
        "{entry}"
    );
    let documents = |version: &str| {
        (
            workspace.join(&format!("output/layered-{version}.spdx.json")),
            workspace.join(&format!("output/layered-{version}.cdx.json")),
        )
    };
    let (spdx, cdx) = documents(&versions[2]);
    let reused = imgbuild_test_support::sbom::validated_packages(&spdx, &cdx);
    let (spdx, cdx) = documents(&versions[1]);
    let read = imgbuild_test_support::sbom::validated_packages(&spdx, &cdx);
    assert!(read.iter().any(|p| p.starts_with("dpkg ")), "{read:?}");
    assert_eq!(reused, read);
    assert_eq!(sbom["packages"], reused.len());

    // A flipped bit in the layer of step 2 is found, reported and that
    // layer is rebuilt on top of the (sound) layer of step 1. (Not shared:
    // a shared store would supply the layer whole again.)
    let layer = kept_layer(&workspace, 2);
    let mut bytes = std::fs::read(&layer).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(&layer, bytes).unwrap();
    let fourth = build_with(&workspace, &versions[3], false).exits_with(EXIT_OK);
    assert_eq!(fourth.cached_steps(), Some(1), "{}", fourth.stdout);
    assert!(fourth.machine_restored(), "{}", fourth.stdout);
    assert_eq!(
        fourth.provisioners_run(),
        ["provisioner 2 of 3", "provisioner 3 of 3"]
    );
    let warnings: Vec<String> = fourth
        .events()
        .iter()
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .filter(|m| m.contains("corrupt"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", fourth.stdout);
    assert_nothing_left(&workspace);
    let (steps, keys) = read_artifact(&artifact(&workspace, &versions[3]));
    assert_eq!(steps, ["one", "two", "three-b"]);
    assert!(keys.is_empty(), "{keys:?}");

    // A runner with an empty local cache, its store and its copy of the
    // base at other paths, resumes from what the earlier builds shared in
    // S3: every step and the final layer come from the bucket, and nothing
    // boots.
    #[cfg(feature = "ec2")]
    {
        std::fs::remove_dir_all(workspace.join("steps")).unwrap();
        let elsewhere = workspace.join("runner-2");
        std::fs::create_dir_all(&elsewhere).unwrap();
        // Not a symbolic link, which the build would resolve to the
        // original path.
        let base = elsewhere.join("base.qcow2");
        std::fs::hard_link(cloud_vm_image(), &base)
            .or_else(|_| std::fs::copy(cloud_vm_image(), &base).map(|_| ()))
            .unwrap();
        workspace.write("image.toml", &config(&versions[4]));
        let fifth = imgbuild(&workspace)
            .env("IMGBUILD_CACHE_DIR", elsewhere.join("steps"))
            .args(["--output", "json", "build", "image.toml", "--var"])
            .arg(format!("base_image={}", base.display()))
            .run()
            .exits_with(EXIT_OK);
        assert_eq!(fifth.cached_steps(), Some(3), "{}", fifth.stdout);
        assert!(
            !steps_started(&fifth).iter().any(|step| step == "launch"),
            "{}",
            fifth.stdout
        );
        let fetched = fifth
            .events()
            .iter()
            .filter_map(|e| e["message"].as_str().map(str::to_owned))
            .filter(|m| m.starts_with("fetched the step cache entry"))
            .count();
        // Three step layers, the final one and its SBOM package list.
        assert_eq!(fetched, 5, "{}", fifth.stdout);
        assert_nothing_left(&workspace);
        let (steps, keys) = read_artifact(&artifact(&workspace, &versions[4]));
        assert_eq!(steps, ["one", "two", "three-b"]);
        assert!(keys.is_empty(), "{keys:?}");
    }
}

/// The fully cached build with `upload`, against moto's S3.
#[cfg(feature = "ec2")]
mod upload {
    use super::*;
    use imgbuild_builders::common::object_store::{ObjectStore, S3Store};
    use imgbuild_test_support::ec2::moto_s3;

    async fn store(bucket: &str) -> S3Store {
        moto_s3(&format!("s3://{bucket}/images/")).await
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Where the test's builds share their step cache: a bucket made once.
    pub fn shared_cache() -> String {
        static BUCKET: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let bucket = BUCKET.get_or_init(|| {
            runtime().block_on(imgbuild_test_support::ec2::moto_bucket("imgbuild-steps"))
        });
        format!("s3://{bucket}/ci")
    }

    /// Builds `version` uploading to a fresh bucket; returns the bucket.
    pub fn build(workspace: &Workspace, version: &str) -> (Outcome, String) {
        let bucket =
            runtime().block_on(imgbuild_test_support::ec2::moto_bucket("imgbuild-layered"));
        let config = config(version).replace(
            "cpus = 1\n",
            &format!("cpus = 1\nupload = \"s3://{bucket}/images/\"\n"),
        );
        workspace.write("image.toml", &config);
        // moto() has set fake credentials in this process's environment,
        // which the binary inherits.
        let outcome = imgbuild(workspace)
            .args(["--output", "json", "build", "image.toml", "--var"])
            .arg(format!("base_image={}", cloud_vm_image()))
            .run();
        (outcome, bucket)
    }

    /// The entry names the object, which downloads back to the image.
    pub fn check(entry: &serde_json::Value, bucket: &str, image: &Path) {
        let name = image.file_name().unwrap().to_string_lossy().into_owned();
        let sha256 = sha256_of(image);
        let upload = &entry["details"]["upload"];
        assert_eq!(
            upload["url"],
            format!("s3://{bucket}/images/{name}"),
            "{entry}"
        );
        assert_eq!(upload["sha256"], sha256.as_str());
        let back = image.with_extension("downloaded");
        runtime().block_on(async {
            let store = store(bucket).await;
            store
                .download_file(&name, &back, &sha256, &|_, _| {})
                .await
                .unwrap();
            let checksum = store.get(&format!("{name}.sha256")).await.unwrap().unwrap();
            assert_eq!(
                checksum.bytes,
                std::fs::read(format!("{}.sha256", image.display())).unwrap()
            );
        });
        assert_eq!(sha256_of(&back), sha256);
        std::fs::remove_file(&back).unwrap();
    }
}
