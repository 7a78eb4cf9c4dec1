//! Warm starts: a build resumes a machine saved right after an earlier
//! build's first SSH login, instead of booting it.
//!
//! Saving (a build that booted, with no state for its key yet): the guest
//! flushes its file systems, QEMU pauses it (`stop` also flushes QEMU's own
//! disk caches), its memory and device state go through `zstd` into a file
//! (`migrate`), and the build disk, unchanged while paused, is copied.
//! Then the guest runs on and the build goes on as if nothing happened.
//! The state, the disk copy and a record (see [`Record`]) go into the step
//! store under the warm key, which covers everything a saved state depends
//! on: the disk it stands on (the base, or a kept step layer), QEMU's binary
//! and version, the accelerator, the machine, memory, CPUs, firmware, kernel
//! and the devices the build attaches.
//!
//! Restoring: the build disk is a copy of the kept one (a state fits only
//! the exact disk it was saved with), QEMU starts with the same devices and
//! `-incoming`, and `cont` runs the guest on. Before any provisioner runs,
//! over SSH: the clock is set from the host's, fresh entropy is written to
//! `/dev/urandom` (and the `vmgenid` device, whose id changes on every
//! start, makes Linux reseed its CRNG), the identity files the guest made
//! at its first boot are made anew, and the keys are swapped (below).
//!
//! Keys: a build with a temporary key never saves that key into a state.
//! The state has a key of its own, trusted in the saved guest and kept in
//! the record (0600, like everything in the store): a restoring build logs
//! in with it, trusts its own key and stops trusting the state's, so no
//! image and no other build's machine accepts either key afterwards.
//!
//! A state that cannot be loaded (QEMU changed under the same version, a
//! file damaged with a matching checksum), or whose machine does not let
//! the build in within a minute (its key rejected, its SSH server gone), is
//! reported and discarded, and the build boots normally.

use super::QemuState;
use super::config::{Accelerator, QemuConfig};
use super::qmp::Qmp;
use super::step_cache::{Below, cache_settings, layer_problem, store_backing_name};
use super::step_shutdown::{LogLines, forget_key_command, trust_key_command};
use crate::common::cache::digest_json;
use crate::common::step_store::{EntryInfo, StepStore};
use async_trait::async_trait;
use imgbuild_core::{BuildLog, Event, Step, StepContext, StepError};
use imgbuild_provisioners::communicator::StdoutLines;
use imgbuild_provisioners::shell::shell_quote;
use imgbuild_provisioners::ssh::TemporaryKey;
use imgbuild_provisioners::{Communicator, ExitStatus};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long saving or loading a state may take before it is given up.
const STATE_LIMIT: Duration = Duration::from_secs(300);

/// Bumped when what a state holds, or how it is made, changes.
const SCHEME: u32 = 2;

/// What is kept beside a state's memory and disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// The state's own key, trusted in the saved guest; `None` when the
    /// build logs in with a password or a key file of its own.
    pub private_key: Option<String>,
    /// Files the guest made at its first boot that must be unique per
    /// machine: made anew after every restore.
    pub derived: Vec<String>,
    /// RFC 3339.
    pub saved_at: String,
    /// The SHA-256 of the state's disk and memory entries: a state is never
    /// put together from the parts of two saves (a part evicted here and
    /// fetched anew from a shared store that holds a newer state).
    pub disk_sha256: String,
    pub memory_sha256: String,
}

/// A state found for the build, verified by the store.
pub struct Saved {
    pub disk: PathBuf,
    pub memory: PathBuf,
    pub record: Record,
    pub key: Option<Arc<TemporaryKey>>,
    /// The SHA-256 the record was found with (the record names the others).
    record_sha256: String,
}

impl Saved {
    /// The store keys of the state's parts, with the SHA-256 each was found
    /// with: a discard removes those bytes and never a state saved since.
    fn parts(&self, key: &str) -> [(String, String); 3] {
        parts(
            key,
            &self.record_sha256,
            &self.record.memory_sha256,
            &self.record.disk_sha256,
        )
    }
}

/// The store keys of the parts of the state `key`, record first, each with
/// its SHA-256.
fn parts(key: &str, record: &str, memory: &str, disk: &str) -> [(String, String); 3] {
    [
        (record_key(key), record.to_owned()),
        (memory_key(key), memory.to_owned()),
        (key.to_owned(), disk.to_owned()),
    ]
}

/// The build's warm start, once its key is known.
pub struct WarmStart {
    pub key: String,
    /// The key of everything but the disk (see [`machine_key`]), for the
    /// states saved after kept steps.
    machine: String,
    store: Arc<StepStore>,
    image: String,
    /// What the build disk stands on, for a fresh one when a restore fails.
    pub backing: PathBuf,
    pub backing_format: String,
    backing_sha256: String,
    /// The state to restore, until the launch restored it or gave up.
    pub saved: Option<Saved>,
    /// The machine running now was restored, not booted.
    pub restored: bool,
}

fn memory_key(key: &str) -> String {
    format!("{key}-memory")
}

fn record_key(key: &str) -> String {
    format!("{key}-record")
}

impl WarmStart {
    /// Gives the state up for this build and removes it from the store,
    /// and with `everywhere` from a shared store too: when the failure is
    /// the state's own (its machine rejected the key it keeps), not
    /// possibly this runner's (no `zstd`, too little memory, a busy host).
    pub async fn discard(&mut self, everywhere: bool, log: &BuildLog) {
        self.restored = false;
        let Some(saved) = self.saved.take() else {
            return;
        };
        let _lock = self.store.lock(&self.key).await;
        discard_parts(&self.store, &saved.parts(&self.key), everywhere, log).await;
    }

    /// The key to log in with: the state's, for a restored machine whose
    /// build has a temporary key.
    pub fn login_key(&self) -> Option<Arc<TemporaryKey>> {
        self.saved
            .as_ref()
            .filter(|_| self.restored)
            .and_then(|saved| saved.key.clone())
    }
}

/// The QEMU arguments of a machine that can be saved and restored: the
/// `vmgenid` device, where the machine type has the ACPI it needs.
pub fn qemu_args(config: &QemuConfig) -> Vec<String> {
    if has_acpi(&config.machine) {
        vec!["-device".into(), "vmgenid,guid=auto".into()]
    } else {
        Vec::new()
    }
}

fn has_acpi(machine: &str) -> bool {
    let machine = machine.split(',').next().unwrap_or_default();
    machine == "pc" || machine == "q35" || machine.starts_with("pc-")
}

/// What a saved state depends on besides the disk it stands on: QEMU,
/// the machine and the login credentials.
pub fn machine_key(
    config: &QemuConfig,
    accelerator: Accelerator,
    qemu_version: &str,
    credentials: &str,
) -> String {
    digest_json(&serde_json::json!({
        "warm_start": SCHEME,
        "qemu": {"binary": config.qemu_binary, "version": qemu_version},
        "accelerator": accelerator,
        "machine": config.machine,
        "memory": config.memory,
        "cpus": config.cpus,
        "ovmf_code": config.ovmf_code,
        "settings": cache_settings(config),
        "devices": qemu_args(config),
        "credentials": credentials,
    }))
}

/// The warm key: everything a saved state depends on, the machine's key
/// over the SHA-256 of the disk below the state's own overlay (the base,
/// or a kept step layer).
pub fn warm_key(machine: &str, below_sha256: &str) -> String {
    // v2: a saved disk names what it stands on by a store-relative name.
    digest_json(&serde_json::json!({"scheme": 2, "machine": machine, "below": below_sha256}))
}

/// What logging in to a saved guest depends on, as a hash: a state saved
/// with one password or key file (which cloud-init set up at its boot)
/// would not let a build with another in. Empty input for a temporary key.
pub fn credentials_digest(config: &QemuConfig, config_dir: &Path) -> String {
    let mut hasher = sha2::Sha256::new();
    if let Some(password) = &config.ssh.password {
        hasher.update(b"password\n");
        hasher.update(password.as_bytes());
    }
    if let Some(file) = &config.ssh.private_key_file {
        hasher.update(b"\nprivate key file\n");
        hasher.update(std::fs::read(config_dir.join(file)).unwrap_or_default());
    }
    hex::encode(hasher.finalize())
}

/// `qemu-system-* --version`'s first line: a state saved by one QEMU may
/// not load in another.
async fn qemu_version(binary: &str) -> Option<String> {
    let output = tokio::process::Command::new(binary)
        .arg("--version")
        .output()
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().next().map(str::to_owned)
}

/// Finds the build's saved state, if there is one. Skipped with
/// `warm_start = false` and `--no-cache` (the step is then not run).
pub struct StepFindWarm {
    config: QemuConfig,
    config_dir: PathBuf,
    accelerator: Accelerator,
    store: Arc<StepStore>,
    image: String,
}

impl StepFindWarm {
    pub fn new(
        config: QemuConfig,
        config_dir: PathBuf,
        accelerator: Accelerator,
        store: StepStore,
        image: String,
    ) -> Self {
        StepFindWarm {
            config,
            config_dir,
            accelerator,
            store: Arc::new(store),
            image,
        }
    }
}

#[async_trait]
impl Step<QemuState> for StepFindWarm {
    fn name(&self) -> &'static str {
        "find_warm_start"
    }

    async fn run(&mut self, state: &mut QemuState, cx: &StepContext) -> Result<(), StepError> {
        let base = state
            .base
            .as_mut()
            .ok_or_else(|| StepError::failed("no base image"))?;
        let (backing, backing_format, backing_sha256) = match state.cache.as_ref() {
            Some(cache) if cache.fully_cached => return Ok(()),
            Some(cache) if cache.below.is_some() => {
                let below = cache.below.as_ref().expect("checked");
                (
                    below.path.clone(),
                    below.format.clone(),
                    below.sha256.clone(),
                )
            }
            _ => {
                let identity = base.identity().await?;
                (
                    base.path.clone(),
                    base.format.clone(),
                    identity.sha256.unwrap_or_default(),
                )
            }
        };
        if backing_sha256.is_empty() {
            return Ok(());
        }
        let Some(version) = qemu_version(&self.config.qemu_binary).await else {
            // The launch says what is wrong with the binary.
            return Ok(());
        };
        let machine = machine_key(
            &self.config,
            self.accelerator,
            &version,
            &credentials_digest(&self.config, &self.config_dir),
        );
        let key = warm_key(&machine, &backing_sha256);
        self.store.record_shares_in(cx);
        let wanted = Wanted {
            key: &key,
            backing: &backing,
            backing_sha256: &backing_sha256,
        };
        let saved = find(&self.store, &wanted, state, cx).await;
        if saved.is_some() {
            let after = match state.cache.as_ref().map_or(0, |cache| cache.done) {
                0 => "this base and machine".to_owned(),
                done => format!("this machine after its first {done} step(s)"),
            };
            cx.log.info(format!(
                "a saved machine state is kept for {after} ({}): restoring it instead of booting",
                &key[..12]
            ));
        }
        state.warm = Some(WarmStart {
            key,
            machine,
            store: self.store.clone(),
            image: self.image.clone(),
            backing,
            backing_format,
            backing_sha256,
            saved,
            restored: false,
        });
        Ok(())
    }
}

/// What a state must fit.
struct Wanted<'a> {
    key: &'a str,
    /// The disk below the state's own, and its SHA-256.
    backing: &'a Path,
    backing_sha256: &'a str,
}

/// The state kept under `wanted.key`, all three parts sound and its disk
/// still standing on `wanted.backing`; anything less is removed.
async fn find(
    store: &StepStore,
    wanted: &Wanted<'_>,
    state: &QemuState,
    cx: &StepContext,
) -> Option<Saved> {
    let key = wanted.key;
    let _lock = store.lock(key).await.ok()?;
    let record = store.get(&record_key(key), &cx.log).await;
    let memory = store.get(&memory_key(key), &cx.log).await;
    let disk = store.get(key, &cx.log).await;
    let (Some(record_entry), Some(memory_entry), Some(disk_entry)) = (record, memory, disk) else {
        // A part evicted or found damaged (the store said so, and a shared
        // store removed its damaged copy): the rest is of no use alone here.
        for part in [record_key(key), memory_key(key), key.to_owned()] {
            store.remove(&part);
        }
        return None;
    };
    let parts = parts(
        key,
        &record_entry.sha256,
        &memory_entry.sha256,
        &disk_entry.sha256,
    );
    // `everywhere`: what is wrong is wrong for every runner, and the state
    // leaves a shared store too.
    let discard = async |why: &str, everywhere: bool| {
        cx.log.warn(format!(
            "the saved machine state {} {why}: discarding it; the build boots",
            &key[..12]
        ));
        discard_parts(store, &parts, everywhere, &cx.log).await;
        None
    };
    let Some(record) = std::fs::read(store.path(&record_key(key)))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Record>(&bytes).ok())
    else {
        return discard("has an unreadable record", true).await;
    };
    if (&record.memory_sha256, &record.disk_sha256) != (&parts[1].1, &parts[2].1) {
        // A part evicted here and fetched anew from a shared store holding
        // a newer state: each store is whole, this mix is not.
        return discard("has parts of two different saves", false).await;
    }
    let disk_path = store.path(key);
    let expected = match store_backing_name(store, wanted.backing, wanted.backing_sha256) {
        Ok(expected) => expected,
        // This runner's trouble, not the state's.
        Err(err) => {
            cx.log.warn(format!(
                "the saved machine state {} cannot be used here: {err}; the build boots",
                &key[..12]
            ));
            return None;
        }
    };
    match state
        .qemu_img
        .info(&disk_path, Some(super::config::DiskFormat::Qcow2))
        .await
    {
        Ok(info) => {
            if let Some(problem) = layer_problem(&info, &expected) {
                return discard(&problem, true).await;
            }
        }
        // Perhaps `qemu-img` here rather than the disk: this runner's alone.
        Err(err) => {
            return discard(&format!("is not a readable qcow2 image ({err})"), false).await;
        }
    }
    let key_pair = match &record.private_key {
        Some(text) => match TemporaryKey::from_private_openssh(text) {
            Ok(key) => Some(Arc::new(key)),
            Err(err) => return discard(&format!("has an unreadable key ({err})"), true).await,
        },
        None => None,
    };
    Some(Saved {
        disk: disk_path,
        memory: store.path(&memory_key(key)),
        record,
        key: key_pair,
        record_sha256: record_entry.sha256,
    })
}

/// Removes a state's parts as they were found (record first), here and,
/// with `everywhere`, from a shared store, until a shared removal fails:
/// a shared record then still names the rest.
async fn discard_parts(
    store: &StepStore,
    parts: &[(String, String)],
    everywhere: bool,
    log: &BuildLog,
) {
    let mut everywhere = everywhere;
    for (key, sha256) in parts {
        everywhere &= store.discard(key, sha256, everywhere, log).await;
    }
}

/// The `-incoming` argument that loads `memory`.
pub fn incoming_arg(memory: &Path) -> String {
    format!(
        "exec:zstd -dcq < {}",
        shell_quote(&memory.display().to_string())
    )
}

/// Waits until the incoming QEMU at `qmp_path` loaded its state, then runs
/// the guest on. `failure` says why QEMU can no longer come up.
pub async fn resume_incoming(
    qmp_path: &Path,
    failure: impl Fn() -> Option<String>,
) -> Result<(), String> {
    let deadline = Instant::now() + STATE_LIMIT;
    let mut qmp = loop {
        if let Some(failure) = failure() {
            return Err(failure);
        }
        match Qmp::connect(qmp_path).await {
            Ok(qmp) => break qmp,
            Err(err) if Instant::now() > deadline => return Err(err.to_string()),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    loop {
        if let Some(failure) = failure() {
            return Err(failure);
        }
        let status = qmp
            .execute("query-status", None)
            .await
            .map_err(|err| err.to_string())?;
        match status["status"].as_str().unwrap_or_default() {
            "inmigrate" if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            "inmigrate" => return Err(format!("loading took over {STATE_LIMIT:?}")),
            "running" => return Ok(()),
            "paused" | "postmigrate" | "prelaunch" => {
                return qmp
                    .execute("cont", None)
                    .await
                    .map(|_| ())
                    .map_err(|err| err.to_string());
            }
            other => return Err(format!("QEMU is {other} after loading the state")),
        }
    }
}

async fn run(comm: &dyn Communicator, command: &str, what: &str) -> Result<Vec<String>, String> {
    let collect = StdoutLines::new(None);
    match comm.exec(command, &collect).await {
        Ok(ExitStatus::Code(0)) => Ok(collect.into_lines()),
        Ok(status) => Err(format!("{what} failed ({status})")),
        Err(err) => Err(format!("{what} failed: {err}")),
    }
}

/// Lists the identity files the guest made since it booted.
const DERIVED_SCRIPT: &str = r#"boot=$(( $(date +%s) - $(cut -d. -f1 /proc/uptime) - 5 )); for f in /etc/machine-id /etc/ssh/ssh_host_*_key; do [ -s "$f" ] && [ "$(stat -c %Y "$f")" -ge "$boot" ] && echo "derived $f"; done; true"#;

/// The kernel's `RNDRESEEDCRNG` ioctl, `_IO('R', 0x07)`: reseed the CRNG
/// from the input pool now. A write to `/dev/urandom` only mixes into that
/// pool, and the CRNG, restored as it was saved, would give every restored
/// machine the same numbers until its next scheduled reseed (seconds to a
/// minute later). perl-base is in every Debian and Ubuntu; python3 in most
/// cloud images.
const RESEED: &str = "{ perl -e 'open(my $f, \"<\", \"/dev/urandom\") or exit 1; ioctl($f, 0x5207, 0) or exit 1' || python3 -c 'import fcntl; fcntl.ioctl(open(\"/dev/urandom\"), 0x5207)'; } >/dev/null 2>&1 || echo 'not-done reseed'; ";

/// What a restored machine runs before anything else, as the build user,
/// as root (through one `sudo -n` when the user is not root: each costs a
/// second under TCG): the host's time, the host's entropy (then a reseed),
/// and anew what its first boot made (`derived`): the machine-id as
/// `machine_id` (from the host's RNG, which needs no reseed), and each SSH
/// host key as its kind in `host_keys`, made on the build host (an RSA key
/// takes the guest many seconds under TCG), else by the guest's
/// `ssh-keygen`. Prints what it could not do.
fn restore_script(
    epoch: u64,
    entropy: &str,
    machine_id: &str,
    derived: &[String],
    host_keys: &[HostKey],
) -> String {
    let mut body = format!(
        "date -u -s @{epoch} >/dev/null 2>&1 || echo 'not-done clock'; \
         printf '%s' {} | base64 -d > /dev/urandom 2>/dev/null || echo 'not-done entropy'; {RESEED}",
        shell_quote(entropy)
    );
    if derived.iter().any(|path| path == "/etc/machine-id") {
        body.push_str(&format!(
            "{{ rm -f /etc/machine-id && (umask 022; printf '%s\\n' {} > /etc/machine-id) && chmod 444 /etc/machine-id; }} || echo 'not-done machine-id'; ",
            shell_quote(machine_id)
        ));
    }
    for path in derived
        .iter()
        .filter(|path| path.starts_with("/etc/ssh/ssh_host_") && path.ends_with("_key"))
    {
        let quoted = shell_quote(path);
        let kind = path["/etc/ssh/ssh_host_".len()..path.len() - "_key".len()].to_owned();
        body.push_str(&format!("{{ rm -f {quoted} {quoted}.pub"));
        match host_keys.iter().find(|key| key.kind == kind) {
            Some(key) => {
                for (file, text, mode) in [
                    (path.clone(), &key.private, "600"),
                    (format!("{path}.pub"), &key.public, "644"),
                ] {
                    let encoded =
                        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, text);
                    let file = shell_quote(&file);
                    body.push_str(&format!(
                        " && (umask 077; printf %s {} | base64 -d > {file}) && chmod {mode} {file}",
                        shell_quote(&encoded)
                    ));
                }
            }
            None => body.push_str(&format!(
                " && ssh-keygen -q -N \"\" -t {} -f {quoted}",
                shell_quote(&kind)
            )),
        }
        body.push_str(&format!("; }} || echo not-done host key {kind}; "));
    }
    body.push_str("true");
    let body = shell_quote(&body);
    format!(
        "if [ \"$(id -u)\" = 0 ]; then sh -c {body}; else sudo -n sh -c {body} || echo 'not-done root'; fi"
    )
}

/// An SSH host key pair made on the build host.
pub struct HostKey {
    /// `rsa`, `ecdsa`, `ed25519`.
    kind: String,
    private: String,
    public: String,
}

/// New host keys of the kinds in `derived`, made with the build host's
/// `ssh-keygen` in `dir`; those it cannot make are left to the guest.
async fn make_host_keys(derived: &[String], dir: &Path) -> Vec<HostKey> {
    let mut keys = Vec::new();
    for path in derived {
        let Some(kind) = path
            .strip_prefix("/etc/ssh/ssh_host_")
            .and_then(|rest| rest.strip_suffix("_key"))
        else {
            continue;
        };
        if !matches!(kind, "rsa" | "dsa" | "ecdsa" | "ed25519") {
            continue;
        }
        let file = dir.join(format!("host-key-{kind}"));
        let _ = std::fs::remove_file(&file);
        let made = tokio::process::Command::new("ssh-keygen")
            .args(["-q", "-N", "", "-C", "", "-t", kind, "-f"])
            .arg(&file)
            .stdin(std::process::Stdio::null())
            .output()
            .await;
        let read = |path: &Path| std::fs::read_to_string(path).ok();
        let pair = match made {
            Ok(output) if output.status.success() => {
                read(&file).zip(read(&file.with_extension("pub")))
            }
            _ => None,
        };
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_file(file.with_extension("pub"));
        let Some((private, public)) = pair else {
            continue;
        };
        keys.push(HostKey {
            kind: kind.to_owned(),
            private,
            public,
        });
    }
    keys
}

/// Saves the running machine's state for later builds (see the module's
/// description), or, on a restored machine, makes it this build's.
pub struct StepWarmStart;

#[async_trait]
impl Step<QemuState> for StepWarmStart {
    fn name(&self) -> &'static str {
        "warm_start"
    }

    async fn run(&mut self, state: &mut QemuState, cx: &StepContext) -> Result<(), StepError> {
        let machine = state
            .machine
            .clone()
            .ok_or_else(|| StepError::failed("the VM is not running"))?;
        let restored = state.warm.as_ref().is_some_and(|warm| warm.restored);
        let ready = machine.started.elapsed();
        if state.warm.is_some() {
            cx.log.emit(Event::MachineReady {
                build: cx.build_name().to_owned(),
                restored,
                millis: ready.as_millis() as u64,
            });
        }
        if restored {
            return adopt(state, cx).await.map_err(StepError::failed);
        }
        if let Some(warm) = state.warm.as_ref() {
            let target = Target {
                key: warm.key.clone(),
                below: (warm.backing.clone(), warm.backing_sha256.clone()),
                when: "at its first login".to_owned(),
                otherwise: "later builds boot as this one did",
            };
            save_and_report(state, &target, cx).await;
        }
        Ok(())
    }
}

/// Makes a restored machine this build's: clock, entropy, identity, keys.
async fn adopt(state: &mut QemuState, cx: &StepContext) -> Result<(), String> {
    let comm = state
        .communicator
        .clone()
        .ok_or("no connection to the VM")?;
    let warm = state.warm.as_ref().ok_or("no warm start")?;
    let saved = warm.saved.as_ref().ok_or("no saved state")?;
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|since| since.as_secs())
        .unwrap_or_default();
    let mut entropy = [0u8; 64];
    getrandom::fill(&mut entropy).map_err(|err| format!("no host entropy: {err}"))?;
    let entropy = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, entropy);
    let work_dir = state.work_dir.clone().ok_or("no working directory")?;
    let host_keys = make_host_keys(&saved.record.derived, &work_dir).await;
    let mut machine_id = [0u8; 16];
    getrandom::fill(&mut machine_id).map_err(|err| format!("no host entropy: {err}"))?;
    let script = restore_script(
        epoch,
        &entropy,
        &hex::encode(machine_id),
        &saved.record.derived,
        &host_keys,
    );
    let lines = run(comm.as_ref(), &script, "setting up the restored machine").await?;
    for line in lines {
        let Some(what) = line.strip_prefix("not-done ") else {
            continue;
        };
        cx.log.warn(match what {
            "clock" => "the restored machine's clock could not be set (`date -s`): it runs from the time its state was saved; set `warm_start = false` if the provisioners need the real time".to_owned(),
            "root" => "the restored machine could not be set up as root (`sudo -n` failed): its clock runs from the time its state was saved, and what its first boot made (machine-id, SSH host keys) is shared with every build restored from the state; give the build user passwordless sudo, or set `warm_start = false`".to_owned(),
            "reseed" => "the restored machine's kernel RNG could not be reseeded at once (the `RNDRESEEDCRNG` ioctl needs perl or python3 in the guest): until its next scheduled reseed, within a minute, it may draw the same random numbers as other machines restored from the state; install either, or set `warm_start = false`".to_owned(),
            other => format!("the restored machine's {other} could not be made anew"),
        });
    }
    if let (Some(own), Some(state_key)) = (&state.ssh_key, &saved.key) {
        let swap = format!(
            "{} && {}",
            trust_key_command(own),
            forget_key_command(state_key)
        );
        run(comm.as_ref(), &swap, "trusting the build's key").await?;
    }
    Ok(())
}

/// Saves the machine as it is now, after the kept step `step` whose layer
/// is `layer` (QEMU writes the disk's changes since to an overlay of its
/// own by now), so that a build resuming from that layer restores the
/// machine instead of booting the layer. Not after the last provisioner:
/// a build that shares every step boots nothing. Any failure only costs
/// a later build time.
pub async fn save_after_step(state: &mut QemuState, layer: &Below, step: &str, cx: &StepContext) {
    let Some(warm) = state.warm.as_ref() else {
        return;
    };
    let target = Target {
        key: warm_key(&warm.machine, &layer.sha256),
        below: (layer.path.clone(), layer.sha256.clone()),
        when: format!("after {step}"),
        otherwise: "a build that changes only what follows boots the kept layer instead",
    };
    save_and_report(state, &target, cx).await;
}

/// Where a state goes.
struct Target {
    key: String,
    /// The file the saved disk stands on, and its SHA-256: the saved copy
    /// names it by its store-relative name.
    below: (PathBuf, String),
    /// When the machine is saved, for the log and the store's listing.
    when: String,
    /// What a failure to save costs.
    otherwise: &'static str,
}

/// Saves the machine, and says how long that took or why it failed: a
/// failure costs only later builds time.
async fn save_and_report(state: &mut QemuState, target: &Target, cx: &StepContext) {
    let started = Instant::now();
    match save(state, target, cx).await {
        Ok(Some(size)) => cx.log.info(format!(
            "saved the machine {} for warm starts in {:.1}s ({} MiB)",
            target.when,
            started.elapsed().as_secs_f64(),
            size / (1 << 20)
        )),
        Ok(None) => {}
        Err(message) => cx.log.warn(format!(
            "the machine could not be saved {} for warm starts: {message}; {}",
            target.when, target.otherwise
        )),
    }
}

/// Saves the state, unless another build saved one for the key first.
/// Returns the size kept.
async fn save(
    state: &mut QemuState,
    target: &Target,
    cx: &StepContext,
) -> Result<Option<u64>, String> {
    let warm = state.warm.as_ref().ok_or("no warm start")?;
    let (key, store) = (target.key.clone(), warm.store.clone());
    let comm = state
        .communicator
        .clone()
        .ok_or("no connection to the VM")?;
    let machine = state.machine.clone().ok_or("the VM is not running")?;
    let qmp_path = machine
        .qmp
        .clone()
        .ok_or("QEMU was started without a monitor socket")?;
    let disk = state.disk.clone().ok_or("no build disk")?;
    let work_dir = state.work_dir.clone().ok_or("no working directory")?;
    let _lock = store.lock(&key).await.map_err(|err| err.to_string())?;
    if store.get(&record_key(&key), &cx.log).await.is_some() {
        return Ok(None);
    }
    let state_key = match &state.ssh_key {
        Some(_) => Some(TemporaryKey::generate().map_err(|err| err.to_string())?),
        None => None,
    };
    let mut prepare = String::new();
    if let (Some(own), Some(state_key)) = (&state.ssh_key, &state_key) {
        prepare = format!(
            "{} && {}; ",
            trust_key_command(state_key),
            forget_key_command(own)
        );
    }
    prepare.push_str(DERIVED_SCRIPT);
    prepare.push_str("; sync");
    let prepared = tokio::time::timeout(
        STATE_LIMIT,
        run(comm.as_ref(), &prepare, "preparing the machine"),
    )
    .await
    .map_err(|_| format!("preparing the machine took over {STATE_LIMIT:?}"))
    .and_then(|result| result);
    let (memory, disk_copy) = (
        work_dir.join("warm-memory.zst"),
        work_dir.join("warm-disk.qcow2"),
    );
    let paused = match &prepared {
        Ok(_) => pause_and_save(&qmp_path, &memory, &disk, &disk_copy).await,
        Err(message) => Err(message.clone()),
    };
    let paused = match paused {
        Ok(()) => {
            let (below, sha256) = &target.below;
            let format = match below.parent() == Some(store.root()) {
                true => "qcow2",
                false => warm.backing_format.as_str(),
            };
            match store_backing_name(&store, below, sha256) {
                Ok(name) => state
                    .qemu_img
                    .rebase_unsafe(&disk_copy, &name, format)
                    .await
                    .map_err(|err| err.to_string()),
                Err(err) => Err(err),
            }
        }
        Err(message) => Err(message),
    };
    // The build goes on whatever happened: its own key trusted again, the
    // state's not trusted in its image.
    if let (Some(own), Some(state_key)) = (&state.ssh_key, &state_key) {
        let restore = format!(
            "{} && {}",
            trust_key_command(own),
            forget_key_command(state_key)
        );
        let log = LogLines(&cx.log);
        match comm.exec(&restore, &log).await {
            Ok(ExitStatus::Code(0)) => {}
            other => {
                return Err(format!(
                    "trusting the build key again failed ({other:?}); the build cannot go on without it"
                ));
            }
        }
    }
    let mut derived: Vec<String> = prepared?
        .into_iter()
        .filter_map(|line| line.strip_prefix("derived ").map(str::to_owned))
        .collect();
    // A restored machine's first boot is older than what the script can
    // see: what the state it came from named still holds.
    if let Some(saved) = warm.saved.as_ref().filter(|_| warm.restored) {
        for path in &saved.record.derived {
            if !derived.contains(path) {
                derived.push(path.clone());
            }
        }
    }
    let cleanup = || {
        let _ = std::fs::remove_file(&memory);
        let _ = std::fs::remove_file(&disk_copy);
    };
    if let Err(message) = paused {
        cleanup();
        return Err(message);
    }
    let info = |part: &str| EntryInfo {
        image: warm.image.clone(),
        build: cx.build_name().to_owned(),
        step: format!("warm start {} ({part})", target.when),
    };
    let put = async |part_key: String, file: &Path, part: &str| {
        let entry = store
            .put(&part_key, file, info(part), &cx.log)
            .await
            .map_err(|err| err.to_string());
        let _ = std::fs::remove_file(file);
        entry
    };
    let disk_entry = put(key.clone(), &disk_copy, "disk").await?;
    let memory_entry = put(memory_key(&key), &memory, "memory").await?;
    // The record goes last, naming the others' bytes: a state is found
    // only once it is whole, and only with the parts of one save.
    let record = Record {
        private_key: state_key.map(|key| key.private_openssh().to_owned()),
        derived,
        saved_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        disk_sha256: disk_entry.sha256.clone(),
        memory_sha256: memory_entry.sha256.clone(),
    };
    let record_file = work_dir.join("warm-record.json");
    std::fs::write(
        &record_file,
        serde_json::to_vec_pretty(&record).expect("records serialize"),
    )
    .and_then(|()| std::fs::set_permissions(&record_file, std::fs::Permissions::from_mode(0o600)))
    .map_err(|err| format!("cannot write {}: {err}", record_file.display()))?;
    let record_entry = put(record_key(&key), &record_file, "record").await?;
    Ok(Some(
        disk_entry.size + memory_entry.size + record_entry.size,
    ))
}

/// Pauses the guest, writes its state to `memory` and copies `disk` (which
/// QEMU does not write while paused) to `disk_copy`, then runs it on.
async fn pause_and_save(
    qmp_path: &Path,
    memory: &Path,
    disk: &Path,
    disk_copy: &Path,
) -> Result<(), String> {
    let mut qmp = Qmp::connect(qmp_path)
        .await
        .map_err(|err| err.to_string())?;
    qmp.execute("stop", None)
        .await
        .map_err(|err| err.to_string())?;
    let saved = async {
        // QEMU's default bandwidth cap is for live migration over a network.
        qmp.execute(
            "migrate-set-parameters",
            Some(serde_json::json!({"max-bandwidth": 10u64 << 30})),
        )
        .await
        .map_err(|err| err.to_string())?;
        let uri = format!(
            "exec:umask 077 && zstd -q -1 -T0 > {}",
            shell_quote(&memory.display().to_string())
        );
        qmp.execute("migrate", Some(serde_json::json!({"uri": uri})))
            .await
            .map_err(|err| err.to_string())?;
        let deadline = Instant::now() + STATE_LIMIT;
        loop {
            let status = qmp
                .execute("query-migrate", None)
                .await
                .map_err(|err| err.to_string())?;
            match status["status"].as_str().unwrap_or_default() {
                "completed" => break,
                "failed" | "cancelled" => {
                    return Err(format!(
                        "QEMU could not write the state: {}",
                        status["error-desc"].as_str().unwrap_or("no reason given")
                    ));
                }
                _ if Instant::now() > deadline => {
                    let _ = qmp.execute("migrate_cancel", None).await;
                    return Err(format!("writing the state took over {STATE_LIMIT:?}"));
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let (from, to) = (disk.to_path_buf(), disk_copy.to_path_buf());
        tokio::task::spawn_blocking(move || std::fs::copy(&from, &to))
            .await
            .map_err(|err| err.to_string())?
            .map_err(|err| format!("cannot copy {}: {err}", disk.display()))?;
        Ok(())
    }
    .await;
    let resumed = qmp
        .execute("cont", None)
        .await
        .map(|_| ())
        .map_err(|err| format!("QEMU did not run the guest on after saving: {err}"));
    saved.and(resumed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> QemuConfig {
        let mut value = serde_json::json!({"base_image": "b.qcow2"});
        value
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn the_key_changes_with_everything_a_state_depends_on_and_nothing_else() {
        let key = |extra: serde_json::Value, accel, version, below| {
            let config = config(extra);
            let credentials = credentials_digest(&config, Path::new("/nonexistent"));
            warm_key(&machine_key(&config, accel, version, &credentials), below)
        };
        let tcg = Accelerator::Tcg;
        let v = "QEMU emulator version 7.2.22";
        let same = key(serde_json::json!({}), tcg, v, "aa");
        assert_eq!(same, key(serde_json::json!({}), tcg, v, "aa"));
        // What the provisioners do and where the image goes do not matter.
        assert_eq!(
            same,
            key(
                serde_json::json!({"output_dir": "elsewhere", "format": "raw", "shutdown_timeout": "9m"}),
                tcg,
                v,
                "aa"
            )
        );
        for (index, changed) in [
            key(serde_json::json!({}), tcg, v, "bb"),
            key(serde_json::json!({}), Accelerator::Kvm, v, "aa"),
            key(
                serde_json::json!({}),
                tcg,
                "QEMU emulator version 8.0.0",
                "aa",
            ),
            key(serde_json::json!({"memory": 2048}), tcg, v, "aa"),
            key(serde_json::json!({"cpus": 3}), tcg, v, "aa"),
            key(serde_json::json!({"machine": "q35"}), tcg, v, "aa"),
            key(serde_json::json!({"firmware": "uefi"}), tcg, v, "aa"),
            key(
                serde_json::json!({"qemu_args": ["-device", "virtio-rng-pci"]}),
                tcg,
                v,
                "aa",
            ),
            key(
                serde_json::json!({"qemu_binary": "/opt/qemu/bin/qemu-system-x86_64"}),
                tcg,
                v,
                "aa",
            ),
            key(serde_json::json!({"cloud_init": false}), tcg, v, "aa"),
            key(serde_json::json!({"disk_size": "20G"}), tcg, v, "aa"),
        ]
        .iter()
        .enumerate()
        {
            assert_ne!(&same, changed, "change {index}");
        }
        // A password cloud-init set at the saved boot is part of the state.
        let with_password = |password: &str| {
            key(
                serde_json::json!({"ssh": {"username": "u", "password": password}}),
                tcg,
                v,
                "aa",
            )
        };
        assert_ne!(with_password("one"), with_password("two"));
        assert_ne!(
            key(serde_json::json!({"ssh": {"username": "u"}}), tcg, v, "aa"),
            with_password("one")
        );
    }

    #[test]
    fn only_machines_with_acpi_get_the_generation_id_device() {
        assert!(has_acpi("q35"));
        assert!(has_acpi("pc"));
        assert!(has_acpi("pc-q35-7.2,smm=off"));
        assert!(!has_acpi("microvm"));
        assert!(!has_acpi("isapc"));
    }

    #[test]
    fn the_restore_script_remakes_only_what_the_first_boot_made() {
        // The script goes to `sh -c` as one quoted word: read it unquoted.
        let body = |script: String| script.replace(r"'\''", "'");
        let id = "0123456789abcdef0123456789abcdef";
        let plain = body(restore_script(1_700_000_000, "QUJD", id, &[], &[]));
        assert!(plain.contains("date -u -s @1700000000"), "{plain}");
        let entropy = plain.find("QUJD | base64 -d > /dev/urandom").unwrap();
        let reseed = plain.find("ioctl($f, 0x5207, 0)").expect(&plain);
        assert!(entropy < reseed, "{plain}");
        assert!(plain.contains("else sudo -n sh -c"), "{plain}");
        assert!(!plain.contains("machine-id") && !plain.contains("ssh-keygen"));
        let derived = [
            "/etc/machine-id".to_owned(),
            "/etc/ssh/ssh_host_ed25519_key".to_owned(),
        ];
        let all = body(restore_script(1, "QQ==", id, &derived, &[]));
        assert!(
            all.contains(&format!("printf '%s\\n' {id} > /etc/machine-id")),
            "{all}"
        );
        assert!(
            all.contains(r#"rm -f /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key.pub && ssh-keygen -q -N "" -t ed25519 -f /etc/ssh/ssh_host_ed25519_key"#),
            "{all}"
        );
        // Keys the first boot did not make stay as the base has them.
        assert!(!all.contains("ssh_host_*") && !all.contains("rsa"), "{all}");
        let made = body(restore_script(
            1,
            "QQ==",
            id,
            &derived,
            &[HostKey {
                kind: "ed25519".to_owned(),
                private: "PRIVATE".to_owned(),
                public: "PUBLIC".to_owned(),
            }],
        ));
        assert!(!made.contains("ssh-keygen"), "{made}");
        assert!(
            made.contains("UFJJVkFURQ== | base64 -d > /etc/ssh/ssh_host_ed25519_key) && chmod 600 /etc/ssh/ssh_host_ed25519_key"),
            "{made}"
        );
        assert!(made.contains("chmod 644 /etc/ssh/ssh_host_ed25519_key.pub"));
    }

    /// Keeps a state's parts under `key` as a save would, its disk
    /// standing on `base`, its record naming `memory_sha256` (the memory's
    /// own unless given).
    async fn keep_state(
        store: &StepStore,
        key: &str,
        base: &Path,
        memory_sha256: Option<&str>,
        log: &imgbuild_core::BuildLog,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let info = || EntryInfo {
            image: "warm".into(),
            build: "vm".into(),
            step: "warm start".into(),
        };
        let put = async |part: String, bytes: Vec<u8>| {
            let file = dir.path().join(&part);
            std::fs::write(&file, bytes).unwrap();
            store.put(&part, &file, info(), log).await.unwrap()
        };
        let name = store_backing_name(store, base, "ab").unwrap();
        let backing = format!(
            "\n{}{}\n",
            crate::qemu::qemu_img::fake::BACKING_LINE,
            name.display()
        );
        let disk = put(key.to_owned(), backing.into_bytes()).await;
        let memory = put(memory_key(key), b"memory".to_vec()).await;
        let record = Record {
            private_key: None,
            derived: Vec::new(),
            saved_at: "2026-12-02T00:00:00Z".into(),
            disk_sha256: disk.sha256,
            memory_sha256: memory_sha256.map_or(memory.sha256, str::to_owned),
        };
        put(record_key(key), serde_json::to_vec(&record).unwrap()).await;
    }

    #[tokio::test]
    async fn a_state_is_used_only_with_the_parts_its_record_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = StepStore::at(dir.path().join("steps"));
        let base = dir.path().join("base.qcow2");
        std::fs::write(&base, b"base").unwrap();
        let t = crate::common::testing::TestContext::new("vm");
        let state = QemuState {
            qemu_img: Arc::new(crate::qemu::qemu_img::fake::FakeQemuImg::new(
                serde_json::json!({}),
            )),
            ..QemuState::default()
        };
        // Store keys are SHA-256 digests.
        let (whole, mixed) = ("a".repeat(64), "b".repeat(64));
        let wanted = |key| Wanted {
            key,
            backing: &base,
            backing_sha256: "ab",
        };

        keep_state(&store, &whole, &base, None, &t.cx.log).await;
        let saved = find(&store, &wanted(&whole), &state, &t.cx).await.unwrap();
        let part_keys: Vec<String> = saved
            .parts(&whole)
            .into_iter()
            .map(|(key, _)| key)
            .collect();
        assert_eq!(
            part_keys,
            [record_key(&whole), memory_key(&whole), whole.clone()]
        );

        // A memory part of another save, as a partly evicted state topped up
        // from a shared store holding a newer one would have.
        keep_state(&store, &mixed, &base, Some(&"0".repeat(64)), &t.cx.log).await;
        assert!(find(&store, &wanted(&mixed), &state, &t.cx).await.is_none());
        assert!(
            format!("{:?}", t.sink.events()).contains("has parts of two different saves"),
            "{:?}",
            t.sink.events()
        );
        assert!(!store.path(&mixed).exists(), "the mixed state was kept");
    }
}
