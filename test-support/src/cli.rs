//! A harness for driving the real `imgbuild` binary the way users do, so
//! tests read as a specification: given a config, this command exits with
//! this code and says this.

use crate::common::repo_root;
pub use crate::docker::base_image as docker_base_image;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const EXIT_OK: i32 = 0;
pub const EXIT_BUILD_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_INTERRUPTED: i32 = 130;

/// A temporary directory holding configs, outputs, the manifest and the
/// state directory of the runs a test makes.
pub struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("imgbuild-test-")
            .tempdir()
            .expect("a temporary directory");
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        Workspace { dir }
    }

    /// A workspace with a copy of the repository's `templates/`, so example
    /// configs run exactly as users copy them.
    pub fn with_templates() -> Self {
        let workspace = Workspace::new();
        copy_tree(&repo_root().join("templates"), workspace.path());
        workspace
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.join("state")
    }

    pub fn write(&self, relative: &str, content: &str) -> PathBuf {
        let path = self.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, content).unwrap();
        path
    }

    pub fn read(&self, relative: &str) -> String {
        std::fs::read_to_string(self.join(relative))
            .unwrap_or_else(|err| panic!("cannot read {relative}: {err}"))
    }

    pub fn manifest(&self) -> serde_json::Value {
        serde_json::from_str(&self.read("imgbuild-manifest.json")).expect("the manifest is JSON")
    }

    /// Asserts that the manifest entry `entry` records files (its SBOM
    /// documents at least) and that none of them exists any more.
    pub fn assert_recorded_files_gone(&self, entry: &serde_json::Value) {
        let files = entry["files"]
            .as_array()
            .expect("the entry records its files");
        assert!(!files.is_empty(), "{entry}");
        for file in files {
            let path = self.join(file["path"].as_str().expect("a file has a path"));
            assert!(!path.exists(), "{} is left", path.display());
        }
    }

    /// `imgbuild` run in this workspace with its own state directory.
    pub fn imgbuild(&self) -> Imgbuild {
        let mut command = Command::new(imgbuild_binary());
        command
            .current_dir(self.path())
            .env("IMGBUILD_STATE_DIR", self.state_dir())
            .env("XDG_CACHE_HOME", cache_dir())
            .env("NO_COLOR", "1")
            // Tests that build the same steps twice assert what ran; the
            // step cache would make that depend on earlier tests. Its own
            // tests turn it on (`.env("IMGBUILD_NO_CACHE", "false")`).
            .env("IMGBUILD_NO_CACHE", "true")
            .env_remove("IMGBUILD_OUTPUT")
            .env_remove("IMGBUILD_CACHE_SHARED")
            .stdin(Stdio::null());
        Imgbuild { command }
    }

    /// Names of files directly in `relative` (hidden ones included).
    pub fn files_in(&self, relative: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.join(relative))
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// QEMU processes whose command line mentions this workspace: a run's
    /// VMs keep their disks here, so any such process belongs to a test run.
    pub fn qemu_processes(&self) -> Vec<u32> {
        crate::common::qemu_processes_mentioning(self.path())
    }

    /// Journals of runs in this workspace's state directory.
    pub fn journals(&self) -> Vec<String> {
        self.files_in("state/runs")
    }
}

/// The `imgbuild` binary cargo built for the integration test that is
/// running: named by cargo at run time where it does so, or else beside the
/// test binary's `deps/` directory, where cargo puts it.
pub fn imgbuild_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("CARGO_BIN_EXE_imgbuild") {
        return PathBuf::from(path);
    }
    let test_binary = std::env::current_exe().expect("the test binary's path");
    let profile_dir = test_binary
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in <target>/<profile>/deps");
    profile_dir.join(format!("imgbuild{}", std::env::consts::EXE_SUFFIX))
}

impl Default for Workspace {
    fn default() -> Self {
        Workspace::new()
    }
}

pub struct Imgbuild {
    command: Command,
}

impl Imgbuild {
    pub fn arg(mut self, arg: impl AsRef<std::ffi::OsStr>) -> Self {
        self.command.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    pub fn run(mut self) -> Outcome {
        let output = self.command.output().expect("imgbuild runs");
        Outcome {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs imgbuild with a stdout whose reader has gone, as when its output
    /// is piped to `head` or `grep -q`; stdout in the outcome stays empty.
    pub fn run_with_stdout_closed(mut self) -> Outcome {
        let (reader, writer) = std::io::pipe().expect("a pipe");
        drop(reader);
        self.command.stdout(writer);
        self.run()
    }

    /// Starts imgbuild with its output captured to files, for tests that
    /// signal it mid-run.
    pub fn spawn(mut self, log: &Path) -> Running {
        let file = std::fs::File::create(log).unwrap();
        let child = self
            .command
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("imgbuild starts");
        Running {
            child,
            log: log.to_path_buf(),
        }
    }
}

pub struct Running {
    child: Child,
    log: PathBuf,
}

impl Running {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the output contains `text`, failing the test after
    /// `limit` with the output so far.
    pub fn wait_for_output(&mut self, text: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.log().contains(text) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "imgbuild exited ({status}) before printing {text:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        panic!(
            "imgbuild did not print {text:?} within {limit:?}:\n{}",
            self.log()
        );
    }

    pub fn signal(&self, signal: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    pub fn wait(mut self, limit: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, self.log());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("imgbuild did not exit within {limit:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    fn describe(&self) -> String {
        format!(
            "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    #[track_caller]
    pub fn exits_with(self, code: i32) -> Self {
        assert_eq!(
            self.code(),
            code,
            "unexpected exit code\n{}",
            self.describe()
        );
        self
    }

    #[track_caller]
    pub fn stderr_has(self, text: &str) -> Self {
        assert!(
            self.stderr.contains(text),
            "stderr lacks {text:?}\n{}",
            self.describe()
        );
        self
    }

    #[track_caller]
    pub fn stderr_lacks(self, text: &str) -> Self {
        assert!(
            !self.stderr.contains(text),
            "stderr has {text:?}\n{}",
            self.describe()
        );
        self
    }

    #[track_caller]
    pub fn stdout_has(self, text: &str) -> Self {
        assert!(
            self.stdout.contains(text),
            "stdout lacks {text:?}\n{}",
            self.describe()
        );
        self
    }

    #[track_caller]
    pub fn stdout_lacks(self, text: &str) -> Self {
        assert!(
            !self.stdout.contains(text),
            "stdout has {text:?}\n{}",
            self.describe()
        );
        self
    }

    /// Which provisioners ran (`--output json`), by their "provisioner N of
    /// M" progress lines: "provisioner 2 of 3".
    pub fn provisioners_run(&self) -> Vec<String> {
        self.events()
            .iter()
            .filter(|e| e["event"] == "message")
            .filter_map(|e| e["message"].as_str())
            .filter(|m| m.starts_with("provisioner ") && !m.contains(" done in "))
            .map(|m| m.split(':').next().unwrap_or_default().to_owned())
            .collect()
    }

    /// How many leading provisioners the step cache supplied, if any.
    pub fn cached_steps(&self) -> Option<u64> {
        self.events()
            .iter()
            .find(|e| e["event"] == "steps_cached")
            .and_then(|e| e["steps"].as_u64())
    }

    /// Whether the QEMU machine was restored from a saved state rather than
    /// booted, from the build's one `machine_ready` event.
    pub fn machine_restored(&self) -> bool {
        let ready: Vec<_> = self
            .events()
            .into_iter()
            .filter(|e| e["event"] == "machine_ready")
            .collect();
        assert_eq!(ready.len(), 1, "{ready:?}\n{}", self.stdout);
        ready[0]["restored"].as_bool().unwrap()
    }

    /// stdout as JSON lines (`--output json`).
    pub fn events(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|err| {
                    panic!(
                        "stdout line is not JSON ({err}): {line}\n{}",
                        self.describe()
                    )
                })
            })
            .collect()
    }
}

/// Downloads and fixture images are shared between tests and runs.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"))
}

pub fn copy_tree(from: &Path, to: &Path) {
    for entry in walkdir::WalkDir::new(from) {
        let entry = entry.unwrap();
        let target = to.join(entry.path().strip_prefix(from).unwrap());
        if entry.file_type().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

pub fn sha256_of(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap();
    hex::encode(sha2::Sha256::digest(&bytes))
}

/// Runs the docker CLI (for checking what the builder made, never for
/// building) and returns its stdout.
pub fn docker(args: &[&str]) -> String {
    let output = Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    assert!(
        output.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Containers carrying `label`, running or not.
pub fn containers_labelled(label: &str) -> Vec<String> {
    let listing = docker(&["ps", "-aq", "--filter", &format!("label={label}")]);
    listing
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

/// The run id a human-output log announces ("imgbuild run <id>: ...").
pub fn run_id_in(log: &str) -> String {
    log.split("imgbuild run ")
        .nth(1)
        .and_then(|rest| rest.split(':').next())
        .expect("the log names the run")
        .to_owned()
}

/// The root file system of a disk image (qcow2 or raw, first partition),
/// mounted read-only for `inspect`, without booting it: what an image
/// really holds on disk, including what no login could show. Needs root
/// (losetup, mount), as CI and the fixture scripts do.
pub fn with_mounted_disk<T>(image: &Path, inspect: impl FnOnce(&Path) -> T) -> T {
    let work = tempfile::Builder::new()
        .prefix("imgbuild-disk-")
        .tempdir()
        .unwrap();
    let raw = work.path().join("disk.raw");
    let run = |program: &str, args: &[&std::ffi::OsStr]| -> String {
        let output = Command::new(program).args(args).output().unwrap();
        assert!(
            output.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    };
    run(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-O".as_ref(),
            "raw".as_ref(),
            image.as_os_str(),
            raw.as_os_str(),
        ],
    );
    // The fixtures are MBR disks (extlinux): the first partition's start
    // sector is a little-endian u32 at byte 454 of the first sector.
    let mut mbr = [0u8; 512];
    std::io::Read::read_exact(&mut std::fs::File::open(&raw).unwrap(), &mut mbr).unwrap();
    assert_eq!(mbr[510..], [0x55, 0xaa], "{} has no MBR", image.display());
    let start = u32::from_le_bytes(mbr[454..458].try_into().unwrap());
    assert!(start > 0, "{} has no first partition", image.display());
    let offset = (u64::from(start) * 512).to_string();
    let loop_device = run(
        "losetup",
        &[
            "--find".as_ref(),
            "--show".as_ref(),
            "--read-only".as_ref(),
            "--offset".as_ref(),
            offset.as_ref(),
            raw.as_os_str(),
        ],
    );
    let root = work.path().join("root");
    std::fs::create_dir(&root).unwrap();
    struct Mounted<'a>(&'a Path, String);
    impl Drop for Mounted<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
            let _ = Command::new("losetup").args(["-d", &self.1]).status();
        }
    }
    let _mounted = Mounted(&root, loop_device.clone());
    run(
        "mount",
        &[
            "-o".as_ref(),
            "ro,noload".as_ref(),
            loop_device.as_ref(),
            root.as_os_str(),
        ],
    );
    inspect(&root)
}
