//! What every kind of test needs: where the repository is, its fixture
//! scripts and images, names no other test uses, a build log that keeps its
//! events, and polling for a condition.

use imgbuild_core::events::MemorySink;
use imgbuild_core::{BuildLog, CancellationToken, Redactor};
use imgbuild_provisioners::ProvisionContext;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The workspace root (where `tests/fixtures` and `.ci` live).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("test-support lives in the workspace")
        .to_path_buf()
}

/// Runs `bash <repo>/<relative> args...` and returns its stdout; panics
/// with its stderr when it fails.
pub fn run_script(relative: &str, args: &[&str]) -> String {
    try_run_script(relative, args).unwrap_or_else(|err| panic!("{err}"))
}

/// [`run_script`], for a caller that reports the failure itself.
pub(crate) fn try_run_script(relative: &str, args: &[&str]) -> Result<String, String> {
    let script = repo_root().join(relative);
    let output = Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .map_err(|err| format!("cannot run {}: {err}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} {args:?} failed ({}):\n{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A fixture made by a script under tests/fixtures: the environment
/// variable tests/run.sh sets, or else built (and cached) by the script,
/// which prints the fixture's path or image reference last. Asked once per
/// test binary: a failure is remembered, so every test reports it at once.
pub fn fixture(variable: &str, script: &str, args: &[&str]) -> String {
    if let Ok(value) = std::env::var(variable)
        && !value.is_empty()
    {
        return value;
    }
    static MADE: Mutex<Option<HashMap<String, Result<String, String>>>> = Mutex::new(None);
    let key = format!("{script} {args:?}");
    if let Some(made) = MADE.lock().unwrap().get_or_insert_default().get(&key) {
        return made.clone().unwrap_or_else(|err| panic!("{err}"));
    }
    let made = try_run_script(&format!("tests/fixtures/{script}"), args).and_then(|stdout| {
        stdout
            .lines()
            .rev()
            .map(str::trim)
            .find(|line| !line.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| format!("tests/fixtures/{script} {args:?} printed nothing"))
    });
    MADE.lock()
        .unwrap()
        .get_or_insert_default()
        .insert(key, made.clone());
    made.unwrap_or_else(|err| panic!("no fixture for the tests: {err}"))
}

/// The Debian base VM image (password login, no cloud-init).
pub fn base_vm_image() -> String {
    fixture("IMGBUILD_TEST_BASE_IMAGE", "base-vm-image.sh", &[])
}

/// The Debian base VM image with cloud-init and no credentials.
pub fn cloud_vm_image() -> String {
    fixture(
        "IMGBUILD_TEST_CLOUD_IMAGE",
        "base-vm-image.sh",
        &["--cloud-init"],
    )
}

/// `prefix-` and ten random hex digits: a name (image, run, repository)
/// that tests running at the same time, or earlier runs, never used.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", random_hex(10))
}

/// A version string no earlier run has used, since image tags are global to
/// the engine and versions are immutable.
pub fn unique_version() -> String {
    format!("1.0.{}-t{}", std::process::id(), random_hex(8))
}

pub(crate) fn random_hex(digits: usize) -> String {
    uuid::Uuid::new_v4().simple().to_string()[..digits].to_owned()
}

/// A build log for build `test` that keeps its events, for assertions.
pub fn test_log() -> (BuildLog, Arc<MemorySink>) {
    let sink = Arc::new(MemorySink::default());
    let log = BuildLog::root(sink.clone(), Redactor::new()).for_build("test");
    (log, sink)
}

/// What a provisioner runs with in a test: a log that keeps its events,
/// and a cancellation token nobody fires unless the test does.
pub fn provision_context() -> (ProvisionContext, Arc<MemorySink>) {
    let (log, sink) = test_log();
    let cx = ProvisionContext {
        log,
        cancel: CancellationToken::new(),
    };
    (cx, sink)
}

/// Polls `condition` until it holds. `within` only catches a hang: make it
/// generous, so that a loaded machine does not fail the test.
pub async fn wait_until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Command lines (arguments joined by spaces) of the processes on this
/// machine whose command line contains `text`: what a test checks for
/// leftovers, or for a secret on a command line.
pub fn processes_mentioning(text: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_str()
                .is_some_and(|name| name.chars().all(|c| c.is_ascii_digit()))
        })
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains(text))
        .collect()
}

/// QEMU processes whose command line mentions `dir`: a build's VM keeps its
/// disk, seed and serial console under its output directory, so any such
/// process belongs to a build or test run there.
pub fn qemu_processes_mentioning(dir: &Path) -> Vec<u32> {
    let marker = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with("qemu-system") && cmdline.contains(&marker) {
            found.push(pid);
        }
    }
    found
}
