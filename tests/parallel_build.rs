//! One config, a VM and a container image of the same version, built at the
//! same time with their output kept apart.

use imgbuild_test_support::{cli::*, common::*, docker::ImageCleanup};

#[test]
fn qemu_and_docker_builds_of_one_image_run_in_parallel() {
    let workspace = Workspace::with_templates();
    let version = unique_version();
    std::fs::write(
        workspace.join("qemu-and-docker.toml"),
        workspace
            .read("qemu-and-docker.toml")
            .replace("version = \"0.9.0\"", &format!("version = \"{version}\"")),
    )
    .unwrap();
    let _cleanup = ImageCleanup::references(vec![format!("edge-node:{version}")]);
    let outcome = workspace
        .imgbuild()
        .args([
            "build",
            "qemu-and-docker.toml",
            "--var",
            "pull=never",
            "--var",
        ])
        .arg(format!("base_vm_image={}", base_vm_image()))
        .arg("--var")
        .arg(format!("base_container_image={}", docker_base_image()))
        .run()
        .exits_with(EXIT_OK);

    // Every line of a build carries its prefix; both builds' provisioner
    // output is there, each under its own name.
    assert!(
        outcome
            .stderr
            .lines()
            .any(|l| l.starts_with("       vm | ==> provision")),
        "{}",
        outcome.stderr
    );
    assert!(
        outcome
            .stderr
            .lines()
            .any(|l| l.starts_with("container | ==> provision")),
        "{}",
        outcome.stderr
    );

    let manifest = workspace.manifest();
    let entries = manifest["builds"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    let by_name = |name: &str| {
        entries
            .iter()
            .find(|e| e["build"]["name"] == name)
            .unwrap()
            .clone()
    };
    let (vm, container) = (by_name("vm"), by_name("container"));
    assert_eq!(vm["build"]["type"], "qemu");
    assert_eq!(container["build"]["type"], "docker");
    assert_eq!(vm["run_id"], container["run_id"]);
    // The template's test ran on each artifact (a boot of the raw disk, a
    // container of the image) and passed on both.
    for entry in [&vm, &container] {
        assert_eq!(entry["status"], "tested", "{entry}");
        assert_eq!(entry["tests"][0]["name"], "the node release is recorded");
        assert_eq!(entry["tests"][0]["passed"], true, "{entry}");
    }
    // They overlapped in time: each started before the other finished.
    let time = |e: &serde_json::Value, field: &str| e[field].as_str().unwrap().to_owned();
    assert!(time(&vm, "started_at") < time(&container, "finished_at"));
    assert!(time(&container, "started_at") < time(&vm, "finished_at"));

    // Both carry the same provisioner's work.
    let release = docker(&[
        "run",
        "--rm",
        &format!("edge-node:{version}"),
        "cat",
        "/etc/node-release",
    ]);
    assert_eq!(release, format!("edge-node {version} (edge, docker)"));
    // The VM's artifact is the raw disk the config asks for, and the
    // provisioner's file is on it.
    let disk = workspace.join(&format!("output/edge-node-{version}.raw"));
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(
        info.status.success(),
        "qemu-img info {}: {}",
        disk.display(),
        String::from_utf8_lossy(&info.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "raw", "{info}");
    let vm_release = with_mounted_disk(&disk, |root| {
        std::fs::read_to_string(root.join("etc/node-release")).unwrap()
    });
    assert_eq!(vm_release, format!("edge-node {version} (edge, qemu)\n"));
    assert!(workspace.journals().is_empty());
    assert!(workspace.qemu_processes().is_empty());
}
