//! `imgbuild build` end to end on real QEMU VMs booted from the fixture
//! image, provisioned over real SSH: the produced image boots and carries
//! the provisioners' changes, the manifest describes it truthfully, and
//! failures, interrupts and kills leave nothing behind.

mod support;

use std::time::Duration;
use support::*;

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

fn assert_nothing_left(workspace: &Workspace) {
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
    let leftovers: Vec<String> = workspace
        .files_in("output")
        .into_iter()
        .filter(|name| name.starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "work files are left in output/: {leftovers:?}"
    );
}

#[test]
fn the_template_builds_an_image_that_boots_with_the_provisioners_changes() {
    let base = base_vm_image();
    let workspace = Workspace::with_templates();
    workspace
        .imgbuild()
        .args(["build", "qemu-debian.toml", "--var"])
        .arg(format!("base_image={base}"))
        .run()
        .exits_with(EXIT_OK)
        .stdout_has("all builds finished")
        // Without a terminal, progress is a line now and then, and at the end.
        .stderr_has("debian |     write image: 100%\n");
    assert_nothing_left(&workspace);
    assert_eq!(
        workspace.files_in("output"),
        vec![
            "debian-baseline-1.0.0.qcow2",
            "debian-baseline-1.0.0.qcow2.sha256"
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

    // Boot the produced image and read the changes back out of it.
    workspace.write(
        "verify.toml",
        &vm_config(
            "1.0.0",
            r#"
[[provision]]
type = "shell"
# Downloads run as the login user, who cannot read all of /etc (a
# download that cannot read everything fails): copy what is checked.
inline = [
  "dpkg-query -W -f '${Package} ${Version}\n' imgbuild-baseline > /tmp/packages",
  "mkdir /tmp/etc && cp /etc/imgbuild-release /etc/imgbuild-greeting /etc/motd /tmp/etc/",
]

[[provision]]
type = "file"
direction = "download"
source = "/tmp/etc/"
destination = "from-image/etc/"

[[provision]]
type = "file"
direction = "download"
source = "/tmp/packages"
destination = "from-image/packages"
"#,
        )
        .replace("name = \"probe\"", "name = \"verify\""),
    );
    workspace
        .imgbuild()
        .args([
            "build",
            "verify.toml",
            "--var",
            "base_image=output/debian-baseline-1.0.0.qcow2",
        ])
        .run()
        .exits_with(EXIT_OK);
    let release = workspace.read("from-image/etc/imgbuild-release");
    assert!(
        release.starts_with("debian-baseline 1.0.0 built by imgbuild (run "),
        "{release}"
    );
    assert_eq!(
        workspace.read("from-image/etc/imgbuild-greeting"),
        "welcome & good luck\n"
    );
    assert!(
        workspace
            .read("from-image/etc/motd")
            .contains("immutable image")
    );
    assert_eq!(
        workspace.read("from-image/packages"),
        "imgbuild-baseline 1.0.0\n"
    );
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
    assert_eq!(workspace.manifest()["builds"].as_array().unwrap().len(), 2);
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

#[test]
fn a_killed_run_leaves_a_journal_that_clean_uses_to_remove_everything() {
    let workspace = Workspace::new();
    let running = build_stuck_in_provisioning(&workspace);
    running.signal(libc::SIGKILL);
    running.wait(Duration::from_secs(30));

    // SIGKILL allows no cleanup: the VM and its disk are still there.
    assert_eq!(workspace.qemu_processes().len(), 1);
    assert_eq!(workspace.journals().len(), 1);
    assert!(
        workspace
            .files_in("output")
            .iter()
            .any(|f| f.starts_with(".imgbuild-"))
    );

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
    workspace.write(
        "image.toml",
        &vm_config(
            "1.0.0",
            "[[provision]]\ntype = \"shell\"\ninline = [\"exit 7\"]\n",
        ),
    );
    workspace
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
    let url = format!(
        "{}/{}",
        server.url(),
        base_path.file_name().unwrap().to_string_lossy()
    );
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
    let manifest = workspace.manifest();
    let entry = &manifest["builds"][0];
    assert_eq!(entry["source"]["kind"], "url");
    assert_eq!(entry["source"]["reference"], url);
    assert_eq!(entry["source"]["sha256"], checksum);
    assert_eq!(entry["details"]["compression"], "zstd");
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
    assert_nothing_left(&workspace);
}

/// A real HTTP server (Python's http.server) on a free loopback port.
struct HttpServer {
    child: std::process::Child,
    port: u16,
}

impl HttpServer {
    fn serving(dir: &std::path::Path) -> HttpServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = std::process::Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", "--directory"])
            .arg(dir)
            .arg(port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 runs");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return HttpServer { child, port };
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
    let config = vm_config("1.0.0", "").replace(
        "password = \"fixture-password\"",
        "password = \"fixture-password\"\ntimeout = \"3s\"",
    );
    workspace.write("image.toml", &config);
    build_image_toml(&workspace)
        .run()
        .exits_with(EXIT_BUILD_FAILED)
        .stderr_has("imgbuild@127.0.0.1:")
        .stderr_has("serial console");
    assert_nothing_left(&workspace);
}
