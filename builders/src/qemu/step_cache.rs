//! The QEMU step cache: the disk's state after each cacheable provisioner,
//! kept as a qcow2 layer in the step store, and a later build that shares
//! the first steps booting from the longest kept prefix.
//!
//! Keeping a step (`keep`): the guest flushes its file systems (`sync`),
//! then a live external snapshot over QMP makes QEMU write to a new overlay
//! from then on. The overlay it leaves, now read-only, holds exactly the
//! step's changes; a copy of it, its backing file renamed to the layer
//! below in the store (or the base image), goes into the store. The names
//! are relative to the store (see [`store_backing_name`]), so a layer's
//! bytes are the same wherever the store and the base are.
//!
//! A layer only makes sense on top of the exact bytes it was taken over,
//! and two builds with equal step keys write different bytes (logs,
//! timestamps). So a layer is stored under its step key combined with the
//! SHA-256 of the layer below it: a rebuilt lower layer (after a corrupt
//! entry was discarded, say) can never end up under a higher layer taken
//! over its predecessor. Finding the longest prefix walks the chain up
//! from the base, each entry verified by the store.
//!
//! With every step and the "final" layer (the disk after shutdown and the
//! cleanup of what the build set up) kept, nothing boots: the export
//! converts the store's chain.
//!
//! Uses `state.base`. Produces `state.cache`, and `state.disk` when every
//! step is kept.

use super::QemuState;
use super::config::{DiskFormat, QemuConfig};
use super::plan::Plan;
use super::qemu_img::QemuImg;
use super::qmp::Qmp;
use super::step_launch::DRIVE_ID;
use super::step_shutdown::{LogLines, forget_key_command, trust_key_command};
use crate::common::cache::{StepCache, base_key, chain, digest_json, step_label};
use crate::common::step_store::{EntryInfo, StepStore};
use async_trait::async_trait;
use imgbuild_core::{Event, Step, StepContext, StepError};
use imgbuild_provisioners::{CommError, ExitStatus};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long the guest's `sync` may take before the keep is given up (the
/// build goes on without it).
const KEEP_LIMIT: Duration = Duration::from_secs(600);

/// The settings of a QEMU build that shape what its provisioners find on
/// the disk: what the guest's disk is made of and what it boots into. The
/// output format and compression apply at export, which always runs.
pub fn cache_settings(config: &QemuConfig) -> serde_json::Value {
    serde_json::json!({
        "base_format": config.base_format,
        "disk_size": config.disk_size,
        "firmware": config.firmware,
        "machine": config.machine,
        "kernel": config.kernel,
        "initrd": config.initrd,
        "kernel_args": config.kernel_args,
        "qemu_args": config.qemu_args,
        "cloud_init": config.cloud_init,
        "cloud_init_cleanup": config.cloud_init_cleanup,
        "ssh_username": config.ssh.username,
    })
}

/// The key of the disk after the last provisioner, the shutdown and the
/// cleanup before it: what that cleanup does depends on these too.
fn final_key(last: &str, config: &QemuConfig) -> String {
    digest_json(&serde_json::json!({
        "after": last,
        "final": {
            "shutdown_command": config.shutdown_command(),
            "password": config.ssh.password.is_some(),
            "temporary_key": config.ssh.password.is_none() && config.ssh.private_key_file.is_none(),
        },
    }))
}

/// The store key of a layer: its step key over the exact layer below.
fn layer_key(step_key: &str, below_sha256: &str) -> String {
    let mut hasher = Sha256::new();
    // v2: layers name what they stand on by store-relative names.
    hasher.update(b"layer-v2\n");
    hasher.update(step_key.as_bytes());
    hasher.update(b"\n");
    hasher.update(below_sha256.as_bytes());
    hex::encode(hasher.finalize())
}

/// How a file kept in `store` names `below` as its backing file: by file
/// name when `below` is in the store too (a kept layer), else (the base)
/// by `base-<sha256>` in the store: a hard link to this runner's verified
/// copy (so it keeps the bytes when that copy's path is removed or reused
/// by another job), or, across file systems, a symbolic link to it. Both
/// names are the same on every runner, so a kept file's bytes do not
/// depend on where the store or the base lives, and a runner with other
/// paths can use what another shared. QEMU resolves a relative backing
/// name from the directory of the file that holds it.
pub fn store_backing_name(
    store: &StepStore,
    below: &Path,
    sha256: &str,
) -> Result<PathBuf, String> {
    if below.parent() == Some(store.root()) {
        return Ok(PathBuf::from(below.file_name().unwrap_or_default()));
    }
    if sha256.is_empty() {
        return Ok(below.to_path_buf());
    }
    let name = PathBuf::from(format!("base-{sha256}"));
    let link = store.root().join(&name);
    // A hard link made earlier holds the base's bytes, whatever became of
    // the path it was made from.
    if std::fs::symlink_metadata(&link).is_ok_and(|meta| meta.file_type().is_file()) {
        return Ok(name);
    }
    let target = std::path::absolute(below)
        .map_err(|err| format!("cannot resolve {}: {err}", below.display()))?;
    if std::fs::read_link(&link).ok().as_deref() == Some(target.as_path()) {
        return Ok(name);
    }
    // Another build may be linking the same base (at its own path, with the
    // same content) right now: a new link replaces the old at once.
    std::fs::create_dir_all(store.root())
        .map_err(|err| format!("cannot create {}: {err}", store.root().display()))?;
    let temp = store.root().join(format!(
        ".{name}.{}.link",
        uuid::Uuid::new_v4().simple(),
        name = name.display()
    ));
    std::fs::hard_link(&target, &temp)
        .or_else(|_| std::os::unix::fs::symlink(&target, &temp))
        .and_then(|()| std::fs::rename(&temp, &link))
        .map_err(|err| {
            let _ = std::fs::remove_file(&temp);
            format!(
                "cannot link {} to {}: {err}",
                link.display(),
                target.display()
            )
        })?;
    Ok(name)
}

/// Why a kept qcow2 file (a layer, a saved disk), as `qemu-img info`
/// describes it, must not be used: it stands on something other than
/// `expected`, or keeps its data in an external file (which could name any
/// file of the build host, and would be read into the image).
pub fn layer_problem(info: &serde_json::Value, expected: &Path) -> Option<String> {
    let backing = info["backing-filename"].as_str().unwrap_or_default();
    if Path::new(backing) != expected {
        return Some(format!(
            "stands on {backing}, not on {}",
            expected.display()
        ));
    }
    if let Some(data_file) = info["format-specific"]["data"]["data-file"].as_str() {
        return Some(format!("keeps its data in the external file {data_file}"));
    }
    None
}

/// A file the disk's newest changes stand on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Below {
    pub path: PathBuf,
    pub format: String,
    pub sha256: String,
}

/// The build's step keys and where its disk starts.
pub struct CachePlan {
    pub store: Arc<StepStore>,
    pub keys: Vec<Option<String>>,
    /// The key of the disk after shutdown; `None` when a step is not
    /// cacheable.
    pub final_key: Option<String>,
    /// Provisioners the start layer already went through.
    pub done: usize,
    /// Every step and the final layer are kept: nothing boots.
    pub fully_cached: bool,
    /// The SHA-256 of the kept final layer a fully cached build exports:
    /// its package list is kept under a key made from it.
    pub final_layer: Option<String>,
    /// What the disk's current top overlay stands on, as kept layers name
    /// it (a layer in the store, or the base). `None` once a step could not
    /// be kept: a later layer would have nothing in the store to stand on.
    pub below: Option<Below>,
    image: String,
    steps: Vec<String>,
}

impl CachePlan {
    fn info(&self, build: &str, step: String) -> EntryInfo {
        EntryInfo {
            image: self.image.clone(),
            build: build.to_owned(),
            step,
        }
    }
}

pub struct StepFindCached {
    plan: Arc<Plan>,
    cache: StepCache,
    image: String,
    steps: Vec<String>,
}

impl StepFindCached {
    pub fn new(plan: Arc<Plan>, cache: StepCache, image: String, steps: Vec<String>) -> Self {
        StepFindCached {
            plan,
            cache,
            image,
            steps,
        }
    }
}

/// The kept layer for `step_key` over `below`, verified by the store and
/// naming `below` as its backing file (anything else is removed, unusable).
async fn find_layer(
    store: &StepStore,
    qemu_img: &dyn QemuImg,
    step_key: &str,
    below: &Below,
    cx: &StepContext,
) -> Result<Option<Below>, StepError> {
    let key = layer_key(step_key, &below.sha256);
    // Under the lock: a layer another build is putting right now is
    // complete or absent, never half there.
    let _lock = store
        .lock(&key)
        .await
        .map_err(|err| StepError::failed(err.to_string()))?;
    let Some(entry) = store.get(&key, &cx.log).await else {
        return Ok(None);
    };
    let path = store.path(&key);
    let expected =
        store_backing_name(store, &below.path, &below.sha256).map_err(StepError::failed)?;
    let problem = match qemu_img.info(&path, Some(DiskFormat::Qcow2)).await {
        Ok(info) => layer_problem(&info, &expected),
        Err(err) => Some(format!("it is not a readable qcow2 image ({err})")),
    };
    if let Some(problem) = problem {
        cx.log.warn(format!(
            "the step cache layer {} {problem}: discarding it, the step runs again",
            path.display(),
        ));
        store.remove(&key);
        return Ok(None);
    }
    Ok(Some(Below {
        path,
        format: "qcow2".to_owned(),
        sha256: entry.sha256,
    }))
}

#[async_trait]
impl Step<QemuState> for StepFindCached {
    fn name(&self) -> &'static str {
        "find_cached_steps"
    }

    async fn run(&mut self, state: &mut QemuState, cx: &StepContext) -> Result<(), StepError> {
        let base = state
            .base
            .as_mut()
            .ok_or_else(|| StepError::failed("no base image"))?;
        // The keys need the base's SHA-256, which a local base without a
        // checksum is still being hashed for.
        let identity = base.identity().await?;
        let config = &self.plan.config;
        let first = base_key("qemu", &cache_settings(config), &identity);
        let keys = chain(&first, &self.cache.steps);
        let last = match keys.last() {
            Some(key) => key.clone(),
            None => Some(first),
        };
        let mut below = Below {
            path: base.path.clone(),
            format: base.format.clone(),
            sha256: identity.sha256.clone().unwrap_or_default(),
        };
        let store = Arc::new(self.cache.store());
        store.record_shares_in(cx);
        let mut done = 0;
        for key in &keys {
            let Some(key) = key else { break };
            match find_layer(&store, state.qemu_img.as_ref(), key, &below, cx).await? {
                Some(layer) => {
                    below = layer;
                    done += 1;
                }
                None => break,
            }
        }
        let final_key = last.map(|last| final_key(&last, config));
        let mut fully_cached = false;
        let mut final_layer = None;
        if done == keys.len()
            && let Some(key) = &final_key
            && let Some(layer) =
                find_layer(&store, state.qemu_img.as_ref(), key, &below, cx).await?
        {
            fully_cached = true;
            final_layer = Some(layer.sha256.clone());
            cx.log.info(format!(
                "every step of the build is in the step cache: exporting {} without booting",
                layer.path.display()
            ));
            state.disk = Some(layer.path);
        }
        if done > 0 || fully_cached {
            if !fully_cached {
                cx.log.info(format!(
                    "the first {done} of {} provisioner(s) are in the step cache: booting from {}",
                    keys.len(),
                    below.path.display()
                ));
            }
            let key = match (&final_key, fully_cached) {
                (Some(key), true) => key.clone(),
                _ => keys[done - 1].clone().unwrap_or_default(),
            };
            cx.log.emit(Event::StepsCached {
                build: cx.build_name().to_owned(),
                steps: done,
                key,
            });
        }
        state.cache = Some(CachePlan {
            store,
            keys,
            final_key,
            done,
            fully_cached,
            final_layer,
            below: Some(below),
            image: self.image.clone(),
            steps: std::mem::take(&mut self.steps),
        });
        Ok(())
    }
}

/// Puts a copy of the read-only overlay `frozen` into the store under
/// `step_key` over `below`, named as standing on `below`'s file. `None`
/// when another build kept the same step first: its layer holds other
/// bytes, so nothing of this build can stand on it.
async fn store_layer(
    state: &QemuState,
    frozen: &Path,
    step_key: &str,
    below: &Below,
    step: String,
    cx: &StepContext,
) -> Result<Option<Below>, String> {
    let cache = state.cache.as_ref().ok_or("no step cache")?;
    let work_dir = state.work_dir.as_ref().ok_or("no working directory")?;
    let store = &cache.store;
    let key = layer_key(step_key, &below.sha256);
    let _lock = store.lock(&key).await.map_err(|err| err.to_string())?;
    if store.get_local(&key, &cx.log).await.is_some() {
        return Ok(None);
    }
    // Rebased on a copy: QEMU still reads the overlay itself, and the
    // export follows the working directory's chain.
    let copy = work_dir.join("keep.qcow2");
    std::fs::copy(frozen, &copy)
        .map_err(|err| format!("cannot copy {}: {err}", frozen.display()))?;
    let stored = async {
        let backing = store_backing_name(store, &below.path, &below.sha256)?;
        state
            .qemu_img
            .rebase_unsafe(&copy, &backing, &below.format)
            .await
            .map_err(|err| err.to_string())?;
        store
            .put(&key, &copy, cache.info(cx.build_name(), step), &cx.log)
            .await
            .map_err(|err| err.to_string())
    }
    .await;
    let _ = std::fs::remove_file(&copy);
    let entry = stored?;
    Ok(Some(Below {
        path: store.path(&key),
        format: "qcow2".to_owned(),
        sha256: entry.sha256,
    }))
}

/// Makes QEMU write the build disk's changes to a new overlay at `next`.
async fn snapshot(qmp_path: &Path, next: &Path) -> Result<(), String> {
    let mut qmp = Qmp::connect(qmp_path)
        .await
        .map_err(|err| err.to_string())?;
    qmp.execute(
        "blockdev-snapshot-sync",
        Some(serde_json::json!({
            "device": DRIVE_ID,
            "snapshot-file": next,
            "format": "qcow2",
            "mode": "absolute-paths",
        })),
    )
    .await
    .map(|_| ())
    .map_err(|err| err.to_string())
}

/// The file QEMU writes the build disk's changes to.
async fn top_file(qmp_path: &Path) -> Result<PathBuf, String> {
    let mut qmp = Qmp::connect(qmp_path)
        .await
        .map_err(|err| err.to_string())?;
    let blocks = qmp
        .execute("query-block", None)
        .await
        .map_err(|err| err.to_string())?;
    blocks
        .as_array()
        .into_iter()
        .flatten()
        .find(|block| block["device"] == DRIVE_ID)
        .and_then(|block| block["inserted"]["file"].as_str())
        .map(PathBuf::from)
        .ok_or_else(|| format!("`query-block` lists no disk {DRIVE_ID}: {blocks}"))
}

fn succeeded(result: Result<ExitStatus, CommError>, what: &str) -> Result<(), String> {
    match result {
        Ok(ExitStatus::Code(0)) => Ok(()),
        Ok(status) => Err(format!("{what} failed ({status})")),
        Err(err) => Err(format!("{what} failed: {err}")),
    }
}

/// Keeps the disk's state after the provisioner whose key is `key` (see
/// the module's description). Any failure only costs a later build time.
pub async fn keep(state: &mut QemuState, key: &str, cx: &StepContext) -> Result<(), String> {
    let cache = state.cache.as_ref().ok_or("no step cache")?;
    let below = cache
        .below
        .clone()
        .ok_or("an earlier step could not be kept")?;
    let (index, step) = step_label(&cache.keys, &cache.steps, key, cache.done);
    let comm = state
        .communicator
        .clone()
        .ok_or("no connection to the VM")?;
    let machine = state.machine.clone().ok_or("the VM is not running")?;
    let qmp_path = machine
        .qmp
        .clone()
        .ok_or("QEMU was started without a monitor socket (no path short enough for one; see the warning at launch)")?;
    let disk = state.disk.clone().ok_or("no build disk")?;
    let work_dir = state.work_dir.clone().ok_or("no working directory")?;
    let log = LogLines(&cx.log);

    // The layer must not carry this build's key: a later build resuming
    // from it brings its own, and removes only that one when it ends.
    // Taken out for the snapshot, trusted again right after it.
    let forget = state.ssh_key.as_ref().map(|key| forget_key_command(key));
    let trust = state.ssh_key.as_ref().map(|key| trust_key_command(key));
    let prepare = match &forget {
        Some(forget) => format!("{forget}; sync"),
        None => "sync".to_owned(),
    };
    let next = work_dir.join(format!("disk-{}.qcow2", index + 2));
    let synced = tokio::time::timeout(KEEP_LIMIT, comm.exec(&prepare, &log))
        .await
        .map_err(|_| format!("`sync` in the VM took over {KEEP_LIMIT:?}"))
        .and_then(|result| succeeded(result, "`sync` in the VM"));
    let snapshotted = match synced {
        Ok(()) => {
            let snapshotted = snapshot(&qmp_path, &next).await;
            if let Err(message) = &snapshotted {
                // The command may have taken effect before the error: the
                // export must read whatever file QEMU writes to now.
                match top_file(&qmp_path).await {
                    Ok(top) if top != disk => {
                        state.disk = Some(top);
                        if let Some(cache) = state.cache.as_mut() {
                            cache.below = None;
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        state.disk = None;
                        cx.log.warn(format!(
                            "the snapshot failed ({message}) and QEMU cannot say which disk file it writes to now ({err}): the build cannot export a disk it is unsure of"
                        ));
                    }
                }
            }
            snapshotted
        }
        Err(message) => Err(message),
    };
    if let Some(trust) = &trust {
        succeeded(
            comm.exec(trust, &log).await,
            "trusting the build key again after the snapshot",
        )?;
    }
    snapshotted?;
    // QEMU writes to the new overlay now, whatever becomes of the old one.
    state.disk = Some(next);
    let cache = state.cache.as_mut().expect("checked above");
    cache.below = None;
    let stored = store_layer(state, &disk, key, &below, step.clone(), cx).await?;
    let cache = state.cache.as_mut().expect("checked above");
    let last = index + 1 >= cache.keys.len();
    match stored {
        Some(layer) => {
            cache.below = Some(layer.clone());
            if !last {
                super::warm_start::save_after_step(state, &layer, &step, cx).await;
            }
            Ok(())
        }
        None => Err(
            "another build kept this step at the same time; this build keeps no later steps"
                .to_owned(),
        ),
    }
}

/// Keeps the disk after shutdown as the final layer, so that a build whose
/// every step is kept boots nothing. Called with the VM powered off.
pub async fn keep_final(state: &QemuState, cx: &StepContext) {
    let Some(cache) = state.cache.as_ref() else {
        return;
    };
    let (Some(key), Some(below), Some(disk)) = (&cache.final_key, &cache.below, &state.disk) else {
        return;
    };
    if cache.fully_cached {
        return;
    }
    match store_layer(state, disk, key, below, "final".to_owned(), cx).await {
        Ok(layer) => {
            cx.log.info(
                "kept the powered-off disk in the step cache: an unchanged build boots nothing",
            );
            // Only with the layer this build kept: one another build kept
            // first may hold other package versions.
            if let (Some(layer), Some(packages)) = (layer, &state.sbom_packages) {
                keep_packages(state, &layer.sha256, packages, cx).await;
            }
        }
        Err(message) => cx.log.warn(format!(
            "cannot keep the powered-off disk in the step cache ({message}); the build goes on, a later one boots again"
        )),
    }
}

/// The store key of the package list read from the machine whose disk
/// became the final layer `layer_sha256`.
fn packages_key(layer_sha256: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"sbom packages\n");
    hasher.update(layer_sha256.as_bytes());
    hex::encode(hasher.finalize())
}

/// Keeps the SBOM's package list beside the final layer, so that a build
/// that boots nothing still has one. A failure costs only that build's
/// SBOM, which it then records as missing.
async fn keep_packages(
    state: &QemuState,
    layer_sha256: &str,
    packages: &imgbuild_provisioners::sbom::PackageList,
    cx: &StepContext,
) {
    let kept = async {
        let cache = state.cache.as_ref().ok_or("no step cache")?;
        let work_dir = state.work_dir.as_ref().ok_or("no working directory")?;
        let key = packages_key(layer_sha256);
        let file = work_dir.join("sbom-packages.json");
        let json = serde_json::to_vec(packages).map_err(|err| err.to_string())?;
        std::fs::write(&file, json)
            .map_err(|err| format!("cannot write {}: {err}", file.display()))?;
        let _lock = cache
            .store
            .lock(&key)
            .await
            .map_err(|err| err.to_string())?;
        let info = cache.info(cx.build_name(), "final: SBOM package list".to_owned());
        let stored = cache.store.put(&key, &file, info, &cx.log).await;
        let _ = std::fs::remove_file(&file);
        stored.map(|_| ()).map_err(|err| err.to_string())
    };
    if let Err(message) = kept.await {
        cx.log.warn(format!(
            "cannot keep the SBOM's package list in the step cache ({message}); a build that boots nothing will record its SBOM as missing"
        ));
    }
}

#[async_trait]
impl crate::common::step_sbom::HasSbom for QemuState {
    fn packages_read(&mut self, packages: &imgbuild_provisioners::sbom::PackageList) {
        self.sbom_packages = Some(packages.clone());
    }

    fn sbom_finished(
        &mut self,
        record: crate::common::step_sbom::SbomRecord,
    ) -> Result<(), crate::common::step_sbom::SbomRecord> {
        match self.artifact.as_mut() {
            Some(artifact) => {
                record.attach_to(artifact);
                Ok(())
            }
            None => Err(record),
        }
    }

    async fn kept_packages(
        &mut self,
        cx: &StepContext,
    ) -> Option<crate::common::step_sbom::KeptPackages> {
        let cache = self.cache.as_ref()?;
        let layer = cache.final_layer.as_ref()?;
        let key = packages_key(layer);
        let entry = cache.store.get(&key, &cx.log).await?;
        let path = cache.store.path(&key);
        let bytes = std::fs::read(&path).ok()?;
        match serde_json::from_slice(&bytes) {
            Ok(packages) => Some(crate::common::step_sbom::KeptPackages {
                packages,
                from: format!("step cache entry {} ({})", entry.key, entry.info.step),
            }),
            Err(err) => {
                cx.log.warn(format!(
                    "the SBOM package list {} in the step cache does not parse ({err}); discarding it",
                    path.display()
                ));
                cache.store.remove(&key);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::cache::StepInput;
    use crate::common::testing::TestContext;
    use crate::qemu::plan::tests::plan;
    use crate::qemu::qemu_img::fake::{Call, FakeQemuImg};
    use crate::qemu::step_create_disk::StepCreateDisk;
    use crate::qemu::step_fetch_base::{BaseHash, BaseImage};
    use imgbuild_core::CleanupOutcome;
    use serde_json::json;

    struct Fixture {
        dir: tempfile::TempDir,
        plan: Arc<Plan>,
        fake: Arc<FakeQemuImg>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("base.img"), b"base disk").unwrap();
            let plan = plan(
                json!({"base_image": "base.img", "output_dir": "out"}),
                dir.path(),
            );
            Fixture {
                plan: Arc::new(plan),
                fake: Arc::new(FakeQemuImg::new(json!({}))),
                dir,
            }
        }

        fn state(&self) -> QemuState {
            QemuState {
                qemu_img: self.fake.clone(),
                base: Some(BaseImage {
                    path: self.dir.path().join("base.img"),
                    format: "raw".into(),
                    reference: "base.img".into(),
                    sha256: BaseHash::Known("b".repeat(64)),
                }),
                ..QemuState::default()
            }
        }

        fn cache(&self, digests: &[&str]) -> StepCache {
            StepCache {
                steps: digests
                    .iter()
                    .map(|digest| StepInput {
                        digest: (*digest).into(),
                        uncacheable: None,
                    })
                    .collect(),
                enabled: true,
                store_root: Some(self.dir.path().join("steps")),
                shared: None,
            }
        }

        async fn find(&self, digests: &[&str], t: &TestContext) -> QemuState {
            let mut state = self.state();
            let mut step = StepFindCached::new(
                self.plan.clone(),
                self.cache(digests),
                "web".into(),
                digests.iter().map(|d| format!("shell {d}")).collect(),
            );
            step.run(&mut state, &t.cx).await.unwrap();
            state
        }

        /// Keeps what a build with these steps would, each layer's content
        /// naming its step, the way `keep` does after its snapshot.
        async fn keep_all(&self, digests: &[&str], t: &TestContext) -> QemuState {
            let mut state = self.find(digests, t).await;
            let work_dir = self.dir.path().join("work");
            std::fs::create_dir_all(&work_dir).unwrap();
            state.work_dir = Some(work_dir.clone());
            let cache = state.cache.as_ref().unwrap();
            let keys: Vec<String> = cache.keys.iter().map(|k| k.clone().unwrap()).collect();
            for (index, key) in keys.iter().enumerate().skip(cache.done) {
                let frozen = work_dir.join(format!("layer-{index}"));
                std::fs::write(&frozen, format!("delta of {}", digests[index])).unwrap();
                let below = state.cache.as_ref().unwrap().below.clone().unwrap();
                let layer = store_layer(&state, &frozen, key, &below, "s".into(), &t.cx)
                    .await
                    .unwrap()
                    .unwrap();
                state.cache.as_mut().unwrap().below = Some(layer);
            }
            let top = work_dir.join("top");
            std::fs::write(&top, b"after shutdown").unwrap();
            state.disk = Some(top);
            keep_final(&state, &t.cx).await;
            state
        }
    }

    fn rebases(fake: &FakeQemuImg) -> Vec<(PathBuf, String)> {
        fake.calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::RebaseUnsafe {
                    backing,
                    backing_format,
                    ..
                } => Some((backing, backing_format)),
                _ => None,
            })
            .collect()
    }

    /// A shared store's writer must not get a build to read a host file
    /// into its image through a qcow2 external data file.
    #[test]
    fn a_layer_with_an_external_data_file_or_another_backing_is_refused() {
        let expected = Path::new("base-ab");
        let sound = json!({"backing-filename": "base-ab", "format-specific": {"data": {}}});
        assert_eq!(layer_problem(&sound, expected), None);
        let data_file = json!({"backing-filename": "base-ab",
            "format-specific": {"data": {"data-file": "/root/.aws/credentials"}}});
        assert!(
            layer_problem(&data_file, expected)
                .unwrap()
                .contains("/root/.aws/credentials")
        );
        let elsewhere = json!({"backing-filename": "/etc/shadow"});
        assert!(
            layer_problem(&elsewhere, expected)
                .unwrap()
                .contains("/etc/shadow")
        );
    }

    #[tokio::test]
    async fn each_layer_is_named_as_standing_on_the_one_below_and_the_first_on_the_base() {
        let f = Fixture::new();
        let t = TestContext::new("vm");
        let state = f.keep_all(&["1", "2"], &t).await;
        let store = &state.cache.as_ref().unwrap().store;
        let rebased = rebases(&f.fake);
        assert_eq!(rebased.len(), 3, "two steps and the final layer");
        // Names that are the same on every runner: the base by a link in
        // the store named after its SHA-256, each layer by its file name.
        let (base_name, base_format) = &rebased[0];
        assert!(
            base_name.is_relative() && base_name.to_string_lossy().starts_with("base-"),
            "{base_name:?}"
        );
        assert_eq!(base_format, "raw");
        // A hard link: the base's bytes stay when its own path goes.
        use std::os::unix::fs::MetadataExt;
        let inode = |path: &Path| std::fs::metadata(path).unwrap().ino();
        assert_eq!(
            inode(&store.root().join(base_name)),
            inode(&f.dir.path().join("base.img"))
        );
        for (above, format) in &rebased[1..] {
            assert_eq!(format, "qcow2");
            assert_eq!(above.components().count(), 1, "{above:?}");
            assert!(store.root().join(above).is_file(), "{above:?}");
        }
        assert_eq!(store.list().len(), 3);
        let names: Vec<_> = std::fs::read_dir(f.dir.path().join("work"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("keep"))
            .collect();
        assert!(names.is_empty(), "the rebased copies are gone: {names:?}");
    }

    #[tokio::test]
    async fn a_build_resumes_from_the_longest_kept_prefix_and_its_disk_stands_on_that_layer() {
        let f = Fixture::new();
        let t = TestContext::new("vm");
        f.keep_all(&["1", "2", "3"], &t).await;

        // Only the last step changed.
        let mut state = f.find(&["1", "2", "3b"], &t).await;
        let cache = state.cache.as_ref().unwrap();
        assert_eq!(cache.done, 2);
        assert!(!cache.fully_cached);
        let start = cache.below.clone().unwrap();
        assert_eq!(
            std::fs::read_to_string(&start.path).unwrap().lines().next(),
            Some("delta of 2"),
            "the layer of step 2"
        );
        let cached: Vec<_> = t
            .sink
            .events()
            .into_iter()
            .filter_map(|e| match e {
                Event::StepsCached { steps, .. } => Some(steps),
                _ => None,
            })
            .collect();
        assert_eq!(cached, [2]);

        let mut create = StepCreateDisk::new(f.plan.clone());
        create.run(&mut state, &t.cx).await.unwrap();
        let overlays: Vec<_> = f
            .fake
            .calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::CreateOverlay {
                    backing,
                    backing_format,
                    ..
                } => Some((backing, backing_format)),
                _ => None,
            })
            .collect();
        assert_eq!(overlays, [(start.path.clone(), "qcow2".to_owned())]);
        create
            .cleanup(&mut state, &t.cx, CleanupOutcome::Succeeded)
            .await
            .unwrap();

        // A changed first step shares nothing.
        let state = f.find(&["1b", "2", "3"], &t).await;
        assert_eq!(state.cache.as_ref().unwrap().done, 0);
        assert_eq!(
            state.cache.as_ref().unwrap().below.as_ref().unwrap().path,
            f.dir.path().join("base.img")
        );
    }

    #[tokio::test]
    async fn with_every_step_and_the_final_layer_kept_the_disk_is_the_final_layer() {
        let f = Fixture::new();
        let t = TestContext::new("vm");
        f.keep_all(&["1", "2"], &t).await;
        let state = f.find(&["1", "2"], &t).await;
        let cache = state.cache.as_ref().unwrap();
        assert!(cache.fully_cached);
        assert_eq!(cache.done, 2);
        let disk = state.disk.clone().unwrap();
        assert!(
            std::fs::read_to_string(&disk)
                .unwrap()
                .starts_with("after shutdown")
        );
    }

    #[tokio::test]
    async fn a_corrupt_lower_layer_is_discarded_with_everything_kept_above_it() {
        let f = Fixture::new();
        let t = TestContext::new("vm");
        let kept = f.keep_all(&["1", "2"], &t).await;
        let store = kept.cache.as_ref().unwrap().store.clone();
        // Flip a bit in the first layer.
        let first = store
            .list()
            .into_iter()
            .map(|entry| store.path(&entry.key))
            .find(|path| std::fs::read(path).unwrap().starts_with(b"delta of 1\n"))
            .unwrap();
        let mut bytes = std::fs::read(&first).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&first, bytes).unwrap();

        let state = f.find(&["1", "2"], &t).await;
        let cache = state.cache.as_ref().unwrap();
        assert_eq!(cache.done, 0, "nothing above a corrupt layer is used");
        assert!(!cache.fully_cached);
        assert!(!first.exists(), "the corrupt layer is removed");
        assert!(
            format!("{:?}", t.sink.events()).contains("corrupt"),
            "the corruption is reported"
        );

        // Rebuilt, the new first layer has other bytes: the old second
        // layer, taken over the old first one, must never stand on it.
        let g = f;
        let rebuilt = {
            let mut state = g.find(&["1", "2"], &t).await;
            let work_dir = g.dir.path().join("work");
            state.work_dir = Some(work_dir.clone());
            let key = state.cache.as_ref().unwrap().keys[0].clone().unwrap();
            let frozen = work_dir.join("again");
            std::fs::write(&frozen, b"delta of 1, rebuilt").unwrap();
            let below = state.cache.as_ref().unwrap().below.clone().unwrap();
            store_layer(&state, &frozen, &key, &below, "s".into(), &t.cx)
                .await
                .unwrap()
                .unwrap()
        };
        let state = g.find(&["1", "2"], &t).await;
        let cache = state.cache.as_ref().unwrap();
        assert_eq!(cache.done, 1);
        assert_eq!(cache.below.as_ref(), Some(&rebuilt));
    }

    #[tokio::test]
    async fn a_step_kept_by_another_build_first_ends_this_builds_chain() {
        let f = Fixture::new();
        let t = TestContext::new("vm");
        let mut state = f.find(&["1"], &t).await;
        let work_dir = f.dir.path().join("work");
        std::fs::create_dir_all(&work_dir).unwrap();
        state.work_dir = Some(work_dir.clone());
        let key = state.cache.as_ref().unwrap().keys[0].clone().unwrap();
        let below = state.cache.as_ref().unwrap().below.clone().unwrap();
        let mine = work_dir.join("mine");
        std::fs::write(&mine, b"mine").unwrap();
        let theirs = work_dir.join("theirs");
        std::fs::write(&theirs, b"theirs").unwrap();
        let first = store_layer(&state, &theirs, &key, &below, "s".into(), &t.cx).await;
        assert!(first.unwrap().is_some());
        let second = store_layer(&state, &mine, &key, &below, "s".into(), &t.cx).await;
        assert_eq!(second.unwrap(), None);
    }
}
