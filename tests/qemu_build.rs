//! `imgbuild build` end to end on real QEMU VMs booted from the fixture
//! image, provisioned over real SSH: the produced image boots and carries
//! the provisioners' changes, the manifest describes it truthfully, and
//! failures, interrupts and kills leave nothing behind.

use imgbuild_test_support::{cli::*, common::*};
use std::time::Duration;

const BUILD_LIMIT: Duration = Duration::from_secs(900);

/// A small QEMU config on the fixture image (password login, no cloud-init).
fn vm_config(version: &str, provision: &str) -> String {
    format!(
        r#"[image]
name = "probe"
version = "{version}"

[variables]
base_image = {{ description = "the fixture" }}

[builders.vm]
type = "qemu"
base_image = "{{{{ var.base_image }}}}"
cloud_init = false
memory = 768
cpus = 1

[builders.vm.ssh]
username = "imgbuild"
password = "fixture-password"

{provision}
"#
    )
}

/// `imgbuild build image.toml` on the fixture base image.
fn build_image_toml(workspace: &Workspace) -> Imgbuild {
    workspace
        .imgbuild()
        .args(["build", "image.toml", "--var"])
        .arg(format!("base_image={}", base_vm_image()))
}

/// What `dpkg-query` lists from the dpkg database inside the QEMU image
/// `image` (the fixture's layout: an ext4 partition at sector 2048), read
/// out with debugfs: an independent reading of what the SBOM lists.
fn dpkg_packages_in(image: &std::path::Path) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let admin = dir.path().join("dpkg");
    std::fs::create_dir_all(admin.join("updates")).unwrap();
    std::fs::create_dir_all(admin.join("info")).unwrap();
    let run = |command: &mut std::process::Command| {
        let output = command.output().unwrap();
        assert!(output.status.success(), "{command:?}: {output:?}");
        output.stdout
    };
    run(std::process::Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(image)
        .arg(&raw));
    run(std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!(
            "dump /var/lib/dpkg/status {}",
            admin.join("status").display()
        ))
        .arg(format!("{}?offset={}", raw.display(), 2048 * 512)));
    let listed = run(std::process::Command::new("dpkg-query")
        .arg(format!("--admindir={}", admin.display()))
        .args([
            "-W",
            &format!("-f={}", imgbuild_test_support::sbom::DPKG_QUERY_FORMAT),
        ]));
    imgbuild_test_support::sbom::present_packages(&String::from_utf8_lossy(&listed))
}

fn assert_nothing_left(workspace: &Workspace) {
    assert_nothing_left_in(workspace, &["output"]);
}

/// No VM, no journal, and no work file (a hidden `.imgbuild-*` directory or
/// `.partial` download) in any of `dirs`, the output directories and caches
/// the test's builds used.
fn assert_nothing_left_in(workspace: &Workspace, dirs: &[&str]) {
    assert!(
        workspace.qemu_processes().is_empty(),
        "QEMU processes are left: {:?}",
        workspace.qemu_processes()
    );
    assert!(
        workspace.journals().is_empty(),
        "journals are left: {:?}",
        workspace.journals()
    );
    for dir in dirs {
        let leftovers: Vec<String> = workspace
            .files_in(dir)
            .into_iter()
            .filter(|name| name.starts_with('.'))
            .collect();
        assert!(
            leftovers.is_empty(),
            "work files are left in {dir}/: {leftovers:?}"
        );
    }
}

#[test]
fn the_template_builds_an_image_whose_test_boot_finds_the_provisioners_changes() {
    let base = base_vm_image();
    let workspace = Workspace::with_templates();
    // Built twice and compared (`--check-reproducible`): the second build
    // is the one kept, recorded and checked below.
    workspace
        .imgbuild()
        .args(["build", "qemu-debian.toml", "--check-reproducible", "--var"])
        .arg(format!("base_image={base}"))
        .run()
        .exits_with(EXIT_OK)
        .stdout_has("all builds finished")
        .stderr_has("the first of two builds")
        .stderr_has("paths compared")
        // Without a terminal, progress is a line now and then, and at the end.
        .stderr_has("debian |     write image: 100%\n");
    assert_nothing_left(&workspace);
    assert_eq!(
        workspace.files_in("output"),
        vec![
            "debian-baseline-1.0.0.cdx.json",
            "debian-baseline-1.0.0.intoto.json",
            "debian-baseline-1.0.0.qcow2",
            "debian-baseline-1.0.0.qcow2.sha256",
            "debian-baseline-1.0.0.spdx.json",
        ]
    );

    // The manifest tells the truth about the file.
    let image = workspace.join("output/debian-baseline-1.0.0.qcow2");
    let digest = sha256_of(&image);
    let manifest = workspace.manifest();
    let entries = manifest["builds"].as_array().unwrap();
    assert_eq!(entries.len(), 1);
    let entry = &entries[0];
    assert_eq!(entry["image"]["name"], "debian-baseline");
    assert_eq!(entry["image"]["version"], "1.0.0");
    assert_eq!(entry["image"]["labels"]["team"], "platform");
    assert_eq!(entry["build"]["name"], "debian");
    assert_eq!(entry["build"]["type"], "qemu");
    assert_eq!(entry["files"][0]["sha256"], digest);
    assert_eq!(
        entry["files"][0]["size"],
        std::fs::metadata(&image).unwrap().len()
    );
    assert_eq!(
        entry["artifact_id"],
        image.canonicalize().unwrap().display().to_string()
    );
    assert_eq!(entry["source"]["kind"], "file");
    assert_eq!(
        entry["source"]["sha256"],
        sha256_of(std::path::Path::new(&base))
    );
    assert_eq!(entry["inputs_sha256"].as_str().unwrap().len(), 64);
    // The two machines' files were listed and compared; what the
    // provisioners wrote from the config alone is the same in both.
    let report = &entry["reproducibility"];
    assert!(
        report["files"]["compared"].as_u64().unwrap_or_default() > 1000,
        "the whole root file system is listed: {report}"
    );
    let differing: Vec<&str> = report["files"]["differences"]
        .as_array()
        .unwrap_or_else(|| panic!("no differences list: {report}"))
        .iter()
        .filter_map(|difference| difference["path"].as_str())
        .collect();
    for same in [
        "/etc/motd",
        "/etc/imgbuild-greeting",
        "/usr/share/doc/imgbuild-baseline/VERSION",
    ] {
        assert!(!differing.contains(&same), "{same} differs: {report}");
    }
    assert_eq!(
        workspace.read("output/debian-baseline-1.0.0.qcow2.sha256"),
        format!("{digest}  debian-baseline-1.0.0.qcow2\n")
    );
    // Standalone: no backing file pointing into a deleted work directory.
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&image)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["format"], "qcow2");
    assert!(info.get("backing-filename").is_none(), "{info}");

    // The SBOM (sbom = "both" by default) validates with the reference
    // libraries and lists what dpkg finds in the image's own database.
    let spdx = workspace.join("output/debian-baseline-1.0.0.spdx.json");
    let cdx = workspace.join("output/debian-baseline-1.0.0.cdx.json");
    let sbom = &entry["details"]["sbom"];
    assert_eq!(sbom["database"], "dpkg", "{entry}");
    for path in [&spdx, &cdx] {
        let path = path.canonicalize().unwrap();
        let listed = entry["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|file| file["path"] == path.display().to_string())
            .unwrap_or_else(|| panic!("{} is not in the manifest: {entry}", path.display()));
        assert_eq!(listed["sha256"], sha256_of(&path));
    }
    let packages = imgbuild_test_support::sbom::validated_packages(&spdx, &cdx);
    assert_eq!(sbom["packages"], packages.len());
    assert_eq!(packages, dpkg_packages_in(&image));

    // The template's test booted the produced image and found the
    // provisioners' changes in it.
    assert_eq!(entry["status"], "tested", "{entry}");
    assert_eq!(entry["tests"][0]["name"], "the baseline is installed");
    assert_eq!(entry["tests"][0]["passed"], true, "{entry}");
    // The uploaded script and motd were cleaned from /tmp by the baseline.
    assert_nothing_left(&workspace);

    // The same version is never built twice.
    let outcome = workspace
        .imgbuild()
        .args(["build", "qemu-debian.toml", "--var"])
        .arg(format!("base_image={base}"))
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("image debian-baseline version 1.0.0 was already built")
        .stderr_has("bump `image.version`")
        .stderr_has("nothing was launched")
        .stderr_lacks("==> launch");
    drop(outcome);
    assert_eq!(workspace.manifest()["builds"].as_array().unwrap().len(), 1);
}

#[test]
fn a_failing_provisioner_exits_1_and_leaves_no_vm_disk_or_artifact() {
    let workspace = Workspace::new();
    workspace.write(
        "image.toml",
        &vm_config(
            "1.0.0",
            "[[provision]]\ntype = \"shell\"\ninline = [\"echo about to fail\", \"exit 3\"]\n",
        ),
    );
    build_image_toml(&workspace)
        .run()
        .exits_with(EXIT_BUILD_FAILED)
        .stderr_has("failed with exit code 3")
        .stderr_has("about to fail")
        .stderr_has("build failed");
    assert_nothing_left(&workspace);
    assert!(
        workspace.files_in("output").is_empty(),
        "{:?}",
        workspace.files_in("output")
    );
    assert!(!workspace.join("imgbuild-manifest.json").exists());
}

/// Starts a build whose provisioner sleeps, and returns once it does.
fn build_stuck_in_provisioning(workspace: &Workspace) -> Running {
    workspace.write(
        "image.toml",
        &vm_config(
            "1.0.0",
            "[[provision]]\ntype = \"shell\"\ninline = [\"echo provisioning-started\", \"sleep 600\"]\n",
        ),
    );
    let mut running = build_image_toml(workspace).spawn(&workspace.join("build.log"));
    running.wait_for_output("provisioning-started", BUILD_LIMIT);
    running
}

#[test]
fn an_interrupt_during_provisioning_exits_130_and_cleans_up() {
    let workspace = Workspace::new();
    let running = build_stuck_in_provisioning(&workspace);
    assert_eq!(workspace.qemu_processes().len(), 1);
    running.signal(libc::SIGINT);
    // An impatient second Ctrl-C must not cut cleanup short (that it is
    // acknowledged is checked where its timing can be controlled, in the
    // signal watcher's own test).
    std::thread::sleep(Duration::from_millis(30));
    running.signal(libc::SIGINT);
    let (status, log) = running.wait(Duration::from_secs(120));
    assert_eq!(status.code(), Some(EXIT_INTERRUPTED), "{log}");
    assert!(log.contains("cancelling all builds"), "{log}");
    assert!(log.contains("build cancelled"), "{log}");
    assert_nothing_left(&workspace);
    assert!(workspace.files_in("output").is_empty());
}

/// Killed while its artifact is tested, before the manifest records it:
/// the disk image, its checksum file and SBOM documents are in the run
/// journal, and `imgbuild clean` removes them with the test's VM.
#[test]
fn an_artifact_killed_before_it_is_recorded_is_removed_by_clean() {
    let workspace = Workspace::new();
    workspace.write(
        "image.toml",
        &vm_config(
            "1.0.0",
            "[[provision]]\ntype = \"shell\"\ninline = [\"true\"]\n\n[[test]]\nname = \"slow\"\ninline = [\"echo testing-started\", \"sleep 600\"]\n",
        ),
    );
    let mut running = build_image_toml(&workspace).spawn(&workspace.join("build.log"));
    running.wait_for_output("testing-started", BUILD_LIMIT);
    running.signal(libc::SIGKILL);
    let (_, log) = running.wait(Duration::from_secs(30));
    let artifact = workspace.join("output/probe-1.0.0.qcow2");
    assert!(artifact.exists(), "the artifact was exported: {log}");
    assert!(!workspace.join("imgbuild-manifest.json").exists());

    workspace
        .imgbuild()
        .args(["clean"])
        .run()
        .exits_with(EXIT_OK)
        .stdout_has("probe-1.0.0.qcow2");
    assert_nothing_left(&workspace);
    assert!(
        workspace.files_in("output").is_empty(),
        "{:?}",
        workspace.files_in("output")
    );
}

#[test]
fn a_killed_run_leaves_a_journal_that_clean_uses_to_remove_everything() {
    let workspace = Workspace::new();
    let running = build_stuck_in_provisioning(&workspace);
    running.signal(libc::SIGKILL);
    running.wait(Duration::from_secs(30));

    // SIGKILL allows no cleanup: the VM and its disk are still there.
    assert_eq!(workspace.qemu_processes().len(), 1);
    assert_eq!(workspace.journals().len(), 1);
    let work_dir = workspace
        .files_in("output")
        .into_iter()
        .find(|f| f.starts_with(".imgbuild-"))
        .expect("the work directory is left");
    // The work directory, and what is in it (the writable disk, the serial
    // console), is private to the user who builds.
    use std::os::unix::fs::PermissionsExt;
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    let work_dir = workspace.join("output").join(work_dir);
    assert_eq!(mode(&work_dir), 0o700, "{}", work_dir.display());
    for entry in std::fs::read_dir(&work_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            assert_eq!(
                mode(&path) & 0o077,
                0,
                "{} is readable by others",
                path.display()
            );
        }
    }

    workspace
        .imgbuild()
        .args(["clean", "--dry-run"])
        .run()
        .exits_with(EXIT_OK)
        .stdout_has("would remove QEMU for build vm")
        .stdout_has("would remove directory");
    assert_eq!(
        workspace.qemu_processes().len(),
        1,
        "a dry run removes nothing"
    );

    workspace
        .imgbuild()
        .args(["clean"])
        .run()
        .exits_with(EXIT_OK)
        .stdout_has("removed QEMU for build vm");
    assert_nothing_left(&workspace);
    assert!(workspace.files_in("output").is_empty());
    workspace
        .imgbuild()
        .args(["clean"])
        .run()
        .exits_with(EXIT_OK)
        .stdout_has("nothing to clean");
}

#[test]
fn on_error_abort_leaves_the_vm_reachable_until_clean() {
    let workspace = Workspace::new();
    // Before failing, the guest floods its serial console: the log on the
    // host stays bounded.
    workspace.write(
        "image.toml",
        &vm_config(
            "1.0.0",
            "[[provision]]\ntype = \"shell\"\ninline = [\"echo left-for-debugging > /tmp/abort-marker\", \"head -c 12000000 /dev/zero | tr '\\\\0' x | sudo tee /dev/ttyS0 >/dev/null\", \"sleep 2\", \"exit 7\"]\n",
        ),
    );
    let outcome = workspace
        .imgbuild()
        .args(["build", "image.toml", "--on-error", "abort", "--var"])
        .arg(format!("base_image={}", base_vm_image()))
        .run()
        .exits_with(EXIT_BUILD_FAILED)
        .stderr_has("left running for debugging")
        .stderr_has("ssh -p ")
        .stderr_has("imgbuild@127.0.0.1")
        .stderr_has("imgbuild clean --run");
    assert_eq!(
        workspace.qemu_processes().len(),
        1,
        "the VM stays up for debugging"
    );

    // The printed command logs in to the failed VM, as a user would: the
    // file its provisioner wrote before failing is there.
    let command = outcome
        .stderr
        .lines()
        .find_map(|line| line.find("ssh -p ").map(|at| &line[at..]))
        .unwrap();
    // A password login says so after the command; the password comes from
    // an askpass program, as no terminal is there to type it.
    let command = command
        .strip_suffix(" (with the configured credentials)")
        .unwrap_or(command);
    let askpass = workspace.write("askpass", "#!/bin/sh\necho fixture-password\n");
    std::fs::set_permissions(
        &askpass,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let words: Vec<&str> = command.split_whitespace().collect();
    // `timeout` only catches a hang.
    let login = std::process::Command::new("timeout")
        .arg("300")
        .args(&words)
        .arg("cat /tmp/abort-marker /etc/hostname")
        .env("SSH_ASKPASS", &askpass)
        .env("SSH_ASKPASS_REQUIRE", "force")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        login.status.success(),
        "{command} failed ({}): {}",
        login.status,
        String::from_utf8_lossy(&login.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&login.stdout),
        "left-for-debugging\nimgbuild-vm\n"
    );
    let work_dir = workspace
        .files_in("output")
        .into_iter()
        .find(|f| f.starts_with(".imgbuild-"))
        .map(|name| workspace.join("output").join(name))
        .expect("the work directory stays with the VM");
    let size = |name: &str| std::fs::metadata(work_dir.join(name)).map(|m| m.len());
    let log = size("serial.log").unwrap();
    let earlier = size("serial.log.1").expect("the log was cut");
    assert!(
        log + earlier <= 9 << 20,
        "serial.log is {log} bytes, serial.log.1 {earlier}: 12 MB were printed"
    );
    workspace
        .imgbuild()
        .args(["clean"])
        .run()
        .exits_with(EXIT_OK);
    assert_nothing_left(&workspace);
}

#[test]
fn the_cloud_image_template_downloads_verifies_caches_and_uses_cloud_init() {
    let base = cloud_vm_image();
    let base_path = std::path::Path::new(&base);
    let checksum = sha256_of(base_path);
    let server = HttpServer::serving(base_path.parent().unwrap());
    let served_name = base_path.file_name().unwrap().to_string_lossy();
    let url = format!("{}/{served_name}", server.url());
    let workspace = Workspace::with_templates();
    let cache = workspace.join("cache");
    let build = |version: &str| {
        workspace
            .imgbuild()
            .env("XDG_CACHE_HOME", &cache)
            .args(["build", "qemu-cloud-image.toml", "--var"])
            .arg(format!("base_image={url}"))
            .arg("--var")
            .arg(format!("base_checksum=sha256:{checksum}"))
            .arg("--var")
            .arg(format!("output_dir=output-{version}"))
            .run()
    };
    build("a")
        .exits_with(EXIT_OK)
        .stderr_has("downloading http://127.0.0.1");
    assert_eq!(server.requests_for(&served_name), 1, "{}", server.log());
    let manifest = workspace.manifest();
    let entry = &manifest["builds"][0];
    assert_eq!(entry["source"]["kind"], "url");
    assert_eq!(entry["source"]["reference"], url);
    assert_eq!(entry["source"]["sha256"], checksum);
    assert_eq!(entry["details"]["compression"], "zstd");
    // The template's test booted the produced image and found the release
    // and the hardening in effect.
    assert_eq!(entry["status"], "tested", "{entry}");
    assert_eq!(entry["tests"][0]["name"], "released and hardened");
    assert_eq!(entry["tests"][0]["passed"], true, "{entry}");
    let artifact = workspace.join("output-a/debian-cloud-hardened-2.3.0.qcow2.zst");
    assert_eq!(entry["files"][0]["sha256"], sha256_of(&artifact));
    // zstd frames start with the magic number 28 b5 2f fd.
    let head = std::fs::read(&artifact).unwrap();
    assert_eq!(&head[..4], &[0x28, 0xb5, 0x2f, 0xfd]);
    assert!(
        cache
            .join(format!("imgbuild/downloads/{checksum}.img"))
            .is_file(),
        "the download is cached under its checksum"
    );

    // A second build takes the base from the cache: it verifies the cached
    // copy and asks the server for nothing. Its output directory is a file,
    // so it stops at the step after the fetch, before anything boots.
    workspace.write("output-cached", "not a directory\n");
    workspace
        .imgbuild()
        .env("XDG_CACHE_HOME", &cache)
        .args([
            "build",
            "qemu-cloud-image.toml",
            "--manifest",
            "cached-manifest.json",
            "--var",
        ])
        .arg(format!("base_image={url}"))
        .arg("--var")
        .arg(format!("base_checksum=sha256:{checksum}"))
        .arg("--var")
        .arg("output_dir=output-cached")
        .run()
        .exits_with(EXIT_BUILD_FAILED)
        .stderr_has(&format!("verifying the cached download of {url}"))
        .stderr_has(&format!("base image {url} (qcow2)"))
        .stderr_has("cannot create the output directory")
        .stderr_lacks("downloading http://127.0.0.1")
        .stderr_lacks("==> launch");
    assert_eq!(
        server.requests_for(&served_name),
        1,
        "the cached build fetched the base again: {}",
        server.log()
    );

    // The artifact, decompressed and read from its disk: the provisioner's
    // changes are there, the disk grew, and nothing the seed set up for the
    // build stayed (the build user, its sudo rule, cloud-init's record).
    let disk = workspace.join("output-a/disk.qcow2");
    let status = std::process::Command::new("zstd")
        .args(["-q", "-d"])
        .arg(&artifact)
        .arg("-o")
        .arg(&disk)
        .status()
        .unwrap();
    assert!(status.success(), "zstd -d failed");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&disk)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["virtual-size"], 4u64 << 30, "{info}");
    assert_no_seed_credentials(&disk, "builder", |root| {
        assert_eq!(
            std::fs::read_to_string(root.join("etc/image-release")).unwrap(),
            "debian-cloud-hardened 2.3.0\n"
        );
        assert!(
            root.join("etc/ssh/sshd_config.d/50-hardening.conf")
                .is_file()
        );
    });

    // It boots: a build from it logs in through a new seed, with a password
    // this time, and that password is gone from its own artifact too.
    workspace.write(
        "verify.toml",
        r#"[image]
name = "verify-cloud"
version = "1.0.0"

[builders.check]
type = "qemu"
base_image = "output-a/disk.qcow2"
output_dir = "output-verify"
memory = 1024

[builders.check.ssh]
username = "checker"
password = "checker-pw-5521"

[[provision]]
type = "shell"
execute_command = "sudo sh {{ path }}"
inline = ["test \"$(cat /etc/image-release)\" = 'debian-cloud-hardened 2.3.0'", "touch /etc/verified"]
"#,
    );
    workspace
        .imgbuild()
        .args(["build", "verify.toml"])
        .run()
        .exits_with(EXIT_OK);
    let verified = workspace.join("output-verify/verify-cloud-1.0.0.qcow2");
    assert_no_seed_credentials(&verified, "checker", |root| {
        assert!(root.join("etc/verified").is_file());
        // cloud-init 23.1 and later turn password logins on in a drop-in,
        // Debian 12's 22.4 in sshd_config itself.
        assert!(
            !root
                .join("etc/ssh/sshd_config.d/50-cloud-init.conf")
                .exists(),
            "password logins stay enabled"
        );
        let sshd_config = std::fs::read_to_string(root.join("etc/ssh/sshd_config")).unwrap();
        assert!(
            !sshd_config.lines().any(|line| line
                .trim()
                .eq_ignore_ascii_case("PasswordAuthentication yes")),
            "password logins stay enabled: {sshd_config}"
        );
        let shadow = std::fs::read_to_string(root.join("etc/shadow")).unwrap();
        assert!(!shadow.contains("checker"), "{shadow}");
    });

    // A wrong checksum is caught before anything boots.
    workspace
        .imgbuild()
        .env("XDG_CACHE_HOME", workspace.join("empty-cache"))
        .args([
            "build",
            "qemu-cloud-image.toml",
            "--manifest",
            "other-manifest.json",
            "--var",
        ])
        .arg(format!("base_image={url}"))
        .arg("--var")
        .arg(format!("base_checksum=sha256:{}", "0".repeat(64)))
        .arg("--var")
        .arg("output_dir=output-bad")
        .run()
        .exits_with(EXIT_BUILD_FAILED)
        .stderr_has("but base_checksum says")
        .stderr_lacks("==> launch");
    assert!(
        workspace
            .files_in("empty-cache/imgbuild/downloads")
            .is_empty()
    );
    // The counter sees every fetch: the build with an empty cache made one.
    assert_eq!(server.requests_for(&served_name), 2, "{}", server.log());
    assert_nothing_left_in(
        &workspace,
        &[
            "output-a",
            "output-verify",
            "output-bad",
            "cache/imgbuild/downloads",
            "empty-cache/imgbuild/downloads",
        ],
    );
}

/// Reads `disk` without booting it: `user`, whom a build's cloud-init seed
/// created, is gone with its home, sudo rule and cloud-init's record of the
/// seed; then runs `more` on the same root.
fn assert_no_seed_credentials(
    disk: &std::path::Path,
    user: &str,
    more: impl FnOnce(&std::path::Path),
) {
    with_mounted_disk(disk, |root| {
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert!(
            !passwd
                .lines()
                .any(|line| line.starts_with(&format!("{user}:"))),
            "the build user {user} is still in /etc/passwd"
        );
        assert!(!root.join("home").join(user).exists());
        let sudoers = root.join("etc/sudoers.d/90-cloud-init-users");
        let rules = std::fs::read_to_string(&sudoers).unwrap_or_default();
        assert!(!rules.contains(user), "sudo rule left: {rules}");
        assert!(!root.join("var/lib/imgbuild-seed").exists());
        let instances = std::fs::read_dir(root.join("var/lib/cloud/instances"))
            .map(|entries| entries.count())
            .unwrap_or(0);
        assert_eq!(instances, 0, "cloud-init's record of the seed is left");
        more(root);
    });
}

/// A real HTTP server (Python's http.server) on a free loopback port. It
/// logs every request it answers, so a test can count what was fetched.
struct HttpServer {
    child: std::process::Child,
    port: u16,
    log: tempfile::NamedTempFile,
}

impl HttpServer {
    fn serving(dir: &std::path::Path) -> HttpServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = tempfile::NamedTempFile::new().unwrap();
        // -u: each request's log line is written when it is answered.
        let mut child = std::process::Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "--directory",
            ])
            .arg(dir)
            .arg(port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("python3 runs");
        // Probing with a connection, not a request: the log holds only what
        // the builds asked for.
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return HttpServer { child, port, log };
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("the HTTP server did not start");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap()
    }

    /// GET requests for `/name` answered so far (http.server logs each as
    /// `... "GET /name HTTP/1.1" 200 -`).
    fn requests_for(&self, name: &str) -> usize {
        let request = format!("\"GET /{name} HTTP/");
        self.log()
            .lines()
            .filter(|line| line.contains(&request))
            .count()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_ssh_wait_that_times_out_shows_the_serial_console_and_cleans_up() {
    let workspace = Workspace::new();
    // A wrong password keeps SSH from ever succeeding, so the wait can be
    // long enough for the guest to have printed its boot on ttyS0. Rejected
    // logins are retried for 30 s from the first rejection, which comes
    // after the boot: a 30 s wait always ends by timing out.
    let config = vm_config("1.0.0", "").replace(
        "password = \"fixture-password\"",
        "password = \"not-the-password\"\ntimeout = \"30s\"",
    );
    workspace.write("image.toml", &config);
    let outcome = build_image_toml(&workspace)
        .run()
        .exits_with(EXIT_BUILD_FAILED)
        .stderr_has("imgbuild@127.0.0.1:")
        .stderr_has("last lines of the serial console (")
        .stderr_lacks("the serial console printed nothing");
    // Timed out: either still rejected when the time was up, or no SSH yet.
    assert!(
        outcome.stderr.contains("timed out after")
            || outcome
                .stderr
                .contains("did not become available within 30s"),
        "{}",
        outcome.stderr
    );
    // Only the guest writes these: its kernel's log lines, stamped with
    // seconds since boot ("[    1.234567] ..."), systemd's status lines
    // ("[  OK  ] Started ...", maybe coloured) or the fixture's login prompt.
    let console = outcome
        .stderr
        .split("last lines of the serial console (")
        .nth(1)
        .unwrap();
    assert!(
        console.lines().skip(1).any(|line| {
            line.contains("  OK  ")
                || line.contains("imgbuild-vm login:")
                || line.split('[').skip(1).any(|rest| {
                    rest.split_once(']').is_some_and(|(stamp, _)| {
                        let stamp = stamp.trim();
                        stamp.contains('.') && stamp.parse::<f64>().is_ok()
                    })
                })
        }),
        "the console shows no line of the guest's boot:\n{}",
        outcome.stderr
    );
    assert_nothing_left(&workspace);
}

#[test]
fn a_base_disk_that_reaches_outside_itself_is_refused_before_anything_boots() {
    let workspace = Workspace::new();
    let qemu_img = |args: &[&str]| {
        let status = std::process::Command::new("qemu-img")
            .args(args)
            .current_dir(workspace.path())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "qemu-img {args:?}");
    };
    // A host file the guest must never see through its disk.
    workspace.write("host-secret", "the build host's secret\n");
    let secret = workspace.join("host-secret").display().to_string();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        &secret,
        "-F",
        "raw",
        "backed.qcow2",
        "64M",
    ]);
    workspace.write("data.raw", "");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=data.raw",
        "external.qcow2",
        "64M",
    ]);
    qemu_img(&["create", "-q", "-f", "vmdk", "disk.vmdk", "64M"]);
    let config = vm_config("1.0.0", "").replace(
        "password = \"fixture-password\"",
        "password = \"fixture-password\"\ntimeout = \"5s\"",
    );
    workspace.write("image.toml", &config);
    for (base, reason) in [
        ("backed.qcow2", "has a backing file"),
        ("external.qcow2", "external file"),
        ("disk.vmdk", "its format is vmdk"),
    ] {
        workspace
            .imgbuild()
            .args(["build", "image.toml", "--var"])
            .arg(format!("base_image={}", workspace.join(base).display()))
            .run()
            .exits_with(EXIT_BUILD_FAILED)
            .stderr_has("refusing the base image")
            .stderr_has(reason)
            .stderr_lacks("==> launch");
        assert_nothing_left(&workspace);
    }
}

#[test]
fn a_corrupt_cached_download_is_discarded_and_fetched_again() {
    let workspace = Workspace::new();
    // A small raw "disk": enough to check the download path; it boots
    // nothing, so the build stops at the SSH wait.
    let served = workspace.join("served");
    std::fs::create_dir(&served).unwrap();
    std::fs::write(served.join("base.raw"), vec![0u8; 1 << 20]).unwrap();
    let checksum = sha256_of(&served.join("base.raw"));
    let cache = workspace.join("cache");
    let cached = cache.join(format!("imgbuild/downloads/{checksum}.img"));
    std::fs::create_dir_all(cached.parent().unwrap()).unwrap();
    // Same name, same size, one flipped bit.
    let mut corrupt = vec![0u8; 1 << 20];
    corrupt[4096] = 1;
    std::fs::write(&cached, &corrupt).unwrap();

    let server = HttpServer::serving(&served);
    let config = vm_config("1.0.0", "")
        .replace(
            "base_image = \"{{ var.base_image }}\"",
            &format!(
                "base_image = \"{}/base.raw\"\nbase_checksum = \"sha256:{checksum}\"",
                server.url()
            ),
        )
        .replace("base_image = { description = \"the fixture\" }", "")
        .replace(
            "password = \"fixture-password\"",
            "password = \"fixture-password\"\ntimeout = \"3s\"",
        );
    workspace.write("image.toml", &config);
    workspace
        .imgbuild()
        .env("XDG_CACHE_HOME", &cache)
        .args(["build", "image.toml"])
        .run()
        .exits_with(EXIT_BUILD_FAILED)
        .stderr_has("discarding it and downloading again")
        .stderr_has("downloading http://127.0.0.1");
    assert_eq!(
        sha256_of(&cached),
        checksum,
        "the cache holds the good copy"
    );
    assert_nothing_left(&workspace);
}
