//! The QEMU builder: boots a base disk image under QEMU, provisions it over
//! SSH and writes a standalone, checksummed image.
//!
//! Steps, in order: fetch the base image, find the kept layers of the
//! build's first steps (see `step_cache`), create the copy-on-write disk,
//! write the cloud-init seed, launch QEMU, connect over SSH, provision
//! (keeping a layer after each cacheable provisioner), read the SBOM (see
//! `common::step_sbom`), shut down, export.
//! A build whose every step is kept skips everything that boots.
//!
//! `[[test]]` boots the finished image again through the same disk, seed,
//! launch and connect steps, on an overlay of its own (see `test_run`).
//!
//! Delivery (`upload`) runs after the tests, as steps of its own (see
//! `step_upload`): only an image that passed them is uploaded, whether its
//! build booted or came whole from the step cache.

mod accel;
pub mod config;
pub mod kind;
mod plan;
mod qemu_img;
pub mod qmp;
mod serial_log;
mod step_cache;
mod step_cloud_init;
mod step_connect;
mod step_create_disk;
mod step_export;
mod step_fetch_base;
mod step_launch;
mod step_shutdown;
mod step_upload;
mod test_run;
mod warm_start;

pub use config::QemuConfig;

use crate::common::artifact::checksum_path;
use crate::common::outcome::{LeftRunning, debugging_hint, finish, steps_result};
use crate::common::step_provision::{StepProvision, has_communicator};
use crate::common::step_sbom::{SbomTarget, StepSbom};
use crate::{
    Artifact, BuildError, BuildRequest, Builder, ConfigProblem, ImageInfo, PlannedArtifact,
    SourceIdentity,
};
use async_trait::async_trait;
use config::Accelerator;
use imgbuild_core::step::StepsReport;
use imgbuild_core::{
    CleanupOutcome, OnError, Step, StepContext, StepError, cleanup_steps, run_steps,
};
use imgbuild_provisioners::Communicator;
use imgbuild_provisioners::image_test::{ImageTest, TestResult};
use imgbuild_provisioners::ssh::TemporaryKey;
use plan::Plan;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct QemuBuilder {
    config: QemuConfig,
}

impl QemuBuilder {
    pub fn new(config: QemuConfig) -> Self {
        QemuBuilder { config }
    }
}

/// What the steps hand each other.
pub struct QemuState {
    /// How the steps run `qemu-img`.
    pub qemu_img: Arc<dyn qemu_img::QemuImg>,
    pub work_dir: Option<PathBuf>,
    pub base: Option<step_fetch_base::BaseImage>,
    pub disk: Option<PathBuf>,
    pub seed: Option<PathBuf>,
    pub ssh_key: Option<Arc<TemporaryKey>>,
    pub machine: Option<step_launch::Machine>,
    pub communicator: Option<Arc<dyn Communicator>>,
    pub artifact: Option<Artifact>,
    /// The accelerator actually in use for this attempt.
    pub accelerator: Option<Accelerator>,
    /// What a test run of the artifact found.
    pub test_results: Option<Vec<TestResult>>,
    /// The step cache for this build, once the base is known.
    pub cache: Option<step_cache::CachePlan>,
    /// The packages the SBOM step read, kept with the final layer.
    pub sbom_packages: Option<imgbuild_provisioners::sbom::PackageList>,
    /// The build's warm start: the state to restore, or the key to save
    /// one under.
    pub warm: Option<warm_start::WarmStart>,
}

impl Default for QemuState {
    fn default() -> Self {
        QemuState {
            qemu_img: Arc::new(qemu_img::Tool),
            work_dir: None,
            base: None,
            disk: None,
            seed: None,
            ssh_key: None,
            machine: None,
            communicator: None,
            artifact: None,
            accelerator: None,
            test_results: None,
            cache: None,
            sbom_packages: None,
            warm: None,
        }
    }
}

has_communicator!(QemuState);
#[async_trait]
impl crate::common::step_provision::KeepsSteps for QemuState {
    fn steps_done(&self) -> usize {
        self.cache.as_ref().map_or(0, |cache| cache.done)
    }

    fn key_after(&self, index: usize) -> Option<String> {
        let cache = self.cache.as_ref()?;
        // Nothing more is kept once a layer is missing from the chain.
        cache.below.as_ref()?;
        cache.keys.get(index)?.clone()
    }

    async fn keep(&mut self, key: &str, cx: &StepContext) -> Result<(), String> {
        step_cache::keep(self, key, cx).await
    }
}

/// A step only a build that boots needs: passed over when every step of
/// the build is kept in the step cache.
struct Boots(Box<dyn Step<QemuState>>);

#[async_trait]
impl Step<QemuState> for Boots {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn skipped(&self, state: &QemuState) -> bool {
        state.cache.as_ref().is_some_and(|cache| cache.fully_cached)
    }

    async fn run(&mut self, state: &mut QemuState, cx: &StepContext) -> Result<(), StepError> {
        self.0.run(state, cx).await
    }

    async fn cleanup(
        &mut self,
        state: &mut QemuState,
        cx: &StepContext,
        outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        self.0.cleanup(state, cx, outcome).await
    }
}

impl crate::common::step_run_tests::HasTestResults for QemuState {
    fn set_test_results(&mut self, results: Vec<TestResult>) {
        self.test_results = Some(results);
    }
}

#[async_trait]
impl Builder for QemuBuilder {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn validate(&self, config_dir: &Path) -> Vec<ConfigProblem> {
        self.config.problems(config_dir)
    }

    fn resolved_config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn secrets(&self) -> Vec<String> {
        self.config.ssh.password.iter().cloned().collect()
    }

    fn planned_artifact(&self, image: &ImageInfo, config_dir: &Path) -> PlannedArtifact {
        let path = plan::output_path(&self.config, image, config_dir);
        let checksum = checksum_path(&path);
        PlannedArtifact {
            description: format!("{} image {}", self.config.format.as_str(), path.display()),
            files: vec![path, checksum],
        }
    }

    fn claims(&self, image: &ImageInfo, config_dir: &Path) -> Vec<String> {
        let planned = self.planned_artifact(image, config_dir);
        let mut claims: Vec<String> = planned
            .files
            .iter()
            .map(|path| {
                format!(
                    "the file {}",
                    crate::common::artifact::lexical_path(path).display()
                )
            })
            .collect();
        if let Some(location) = &self.config.upload {
            claims.extend(
                upload_names(&planned.files[0])
                    .iter()
                    .map(|name| format!("the S3 object {}", location.url_of(name))),
            );
        }
        claims
    }

    fn cache_settings(&self) -> Option<serde_json::Value> {
        Some(step_cache::cache_settings(&self.config))
    }

    async fn resolve_source(
        &self,
        request: &BuildRequest,
        cx: &StepContext,
    ) -> Result<SourceIdentity, BuildError> {
        let plan = Plan::new(
            &self.config,
            request,
            &cx.run_id,
            cx.build_name(),
            self.config.accelerator,
        )
        .map_err(BuildError::Refused)?;
        plan.base.identity().await.map_err(BuildError::Refused)
    }

    async fn preflight(&self, request: &BuildRequest, _cx: &StepContext) -> Result<(), BuildError> {
        let path = plan::output_path(&self.config, &request.image, &request.config_dir);
        if path.exists() {
            return Err(BuildError::Refused(format!(
                "{} already exists: image {} version {} was built before and is never overwritten; bump `image.version` to build a new one",
                path.display(),
                request.image.name,
                request.image.version
            )));
        }
        if let Some(location) = &self.config.upload {
            step_upload::preflight(location, &upload_names(&path), &what(request))
                .await
                .map_err(BuildError::Refused)?;
        }
        Ok(())
    }

    async fn build(
        &self,
        request: &BuildRequest,
        cx: &StepContext,
    ) -> Result<Artifact, BuildError> {
        self.attempts(
            request,
            cx,
            |plan| plan,
            |plan| Self::steps(plan, request),
            |state, report| finish(report, state.artifact.take(), "export"),
        )
        .await
    }

    async fn test_artifact(
        &self,
        request: &BuildRequest,
        artifact: &Artifact,
        tests: &[ImageTest],
        cx: &StepContext,
    ) -> Result<Vec<TestResult>, BuildError> {
        let disk = test_run::ArtifactDisk::of(artifact, &self.config)?;
        self.attempts(
            request,
            cx,
            |plan| test_run::test_plan(plan, &disk),
            |plan| test_run::steps(plan, disk.clone(), tests),
            |state, report| {
                steps_result(report)?;
                state.test_results.take().ok_or_else(|| BuildError::Failed {
                    step: "test".to_owned(),
                    message: "the steps finished without test results".to_owned(),
                })
            },
        )
        .await
    }

    async fn deliver(
        &self,
        request: &BuildRequest,
        artifact: Artifact,
        cx: &StepContext,
    ) -> Result<Artifact, BuildError> {
        let Some(location) = &self.config.upload else {
            return Ok(artifact);
        };
        let mut steps: Vec<Box<dyn Step<QemuState>>> = vec![Box::new(
            step_upload::StepUpload::new(location.clone(), what(request)),
        )];
        let mut state = QemuState {
            artifact: Some(artifact),
            ..QemuState::default()
        };
        // Always cleaned up, even with `--on-error abort`: half a delivery
        // in a bucket is nothing to debug, and would block the next one.
        let mut report = run_steps(&mut steps, &mut state, cx, OnError::Cleanup).await;
        let artifact = finish(&mut report, state.artifact.take(), "upload");
        match (artifact, report.cleanup_failures.is_empty()) {
            (Err(BuildError::Failed { step, message }), false) => Err(BuildError::Failed {
                step,
                message: format!(
                    "{message}; {}",
                    report
                        .cleanup_failures
                        .iter()
                        .map(|(_, failure)| failure.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            }),
            (artifact, _) => artifact,
        }
    }

    async fn delete_artifact(
        &self,
        artifact: &Artifact,
        _cx: &StepContext,
    ) -> Result<(), BuildError> {
        test_run::delete(artifact).await
    }
}

/// The object names `upload` stores the image at `image` under: its file
/// name, and its checksum file's.
fn upload_names(image: &Path) -> Vec<String> {
    let name = image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    vec![name.clone(), format!("{name}.sha256")]
}

/// The image version a build makes, as messages name it.
fn what(request: &BuildRequest) -> String {
    format!(
        "image {} version {}",
        request.image.name, request.image.version
    )
}

impl QemuBuilder {
    /// Runs the steps `steps` makes for the plan `adapt` makes of the
    /// build's, once per accelerator to try: an `auto` run whose KVM attempt
    /// fails in a KVM-shaped way is made again under TCG. `outcome` turns a
    /// finished run's state and report into the result.
    async fn attempts<T>(
        &self,
        request: &BuildRequest,
        cx: &StepContext,
        adapt: impl Fn(Plan) -> Plan,
        steps: impl Fn(&Arc<Plan>) -> Vec<Box<dyn Step<QemuState>>>,
        outcome: impl Fn(&mut QemuState, &mut StepsReport) -> Result<T, BuildError>,
    ) -> Result<T, BuildError> {
        let mut candidates = accel::candidates(self.config.accelerator, &cx.log).await;
        loop {
            let accelerator = candidates.remove(0);
            let plan = Plan::new(
                &self.config,
                request,
                &cx.run_id,
                cx.build_name(),
                accelerator,
            )
            .map_err(BuildError::Refused)?;
            let plan = Arc::new(adapt(plan));
            let mut state = QemuState {
                accelerator: Some(accelerator),
                ..QemuState::default()
            };
            let mut steps = steps(&plan);
            let mut report = run_steps(&mut steps, &mut state, cx, request.on_error).await;
            let (step, message) = match outcome(&mut state, &mut report) {
                Err(BuildError::Failed { step, message }) => (step, message),
                other => return other,
            };
            let kvm_broke = accelerator == Accelerator::Kvm
                && self.config.accelerator == Accelerator::Auto
                && accel::is_kvm_failure(&message);
            if kvm_broke && !candidates.is_empty() {
                if report.left_for_debugging {
                    // A VM that never ran is nothing to debug.
                    cleanup_steps(&mut steps[..report.started], &mut state, cx, report.outcome)
                        .await;
                }
                accel::mark_kvm_unusable();
                cx.log.warn(format!(
                    "KVM does not work here ({}); falling back to TCG software emulation, which is much slower. Set `accelerator = \"tcg\"` to skip the attempt.",
                    first_line(&message)
                ));
                continue;
            }
            if report.left_for_debugging {
                cx.log.warn(vm_debugging_hint(&state, &plan));
            }
            return Err(BuildError::Failed { step, message });
        }
    }
}

/// How to reach a VM left running by `--on-error abort`, and how to get rid
/// of it afterwards.
fn vm_debugging_hint(state: &QemuState, plan: &Plan) -> String {
    let clean = format!(
        "remove it and its files with `imgbuild clean --run {}`",
        plan.run_id
    );
    let left = state
        .machine
        .as_ref()
        .filter(|m| !m.has_exited())
        .map(|machine| {
            let port = plan.config.ssh.port.unwrap_or(machine.ssh_port);
            let user = &plan.config.ssh.username;
            let reach = match (&state.ssh_key, &state.work_dir) {
                (Some(key), Some(work_dir)) => {
                    let key_file = work_dir.join("ssh-key");
                    match key.write_private_openssh(&key_file) {
                        Ok(()) => format!(
                            "ssh -i {} -p {port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null {user}@127.0.0.1",
                            key_file.display()
                        ),
                        Err(err) => format!("(the build key could not be saved: {err})"),
                    }
                }
                _ => format!(
                    "ssh -p {port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null {user}@127.0.0.1 (with the configured credentials)"
                ),
            };
            LeftRunning {
                what: format!(
                    "the VM (QEMU pid {}, serial console in {})",
                    machine.pid,
                    machine.serial_log.display()
                ),
                reach,
            }
        });
    debugging_hint(left, &clean)
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

impl QemuBuilder {
    fn steps(plan: &Arc<Plan>, request: &BuildRequest) -> Vec<Box<dyn Step<QemuState>>> {
        let mut steps: Vec<Box<dyn Step<QemuState>>> =
            vec![Box::new(step_fetch_base::StepFetchBase::new(plan.clone()))];
        if request.cache.enabled && request.cache.steps.len() == request.provisioners.len() {
            steps.push(Box::new(step_cache::StepFindCached::new(
                plan.clone(),
                request.cache.clone(),
                request.image.name.clone(),
                request.step_descriptions(),
            )));
        }
        if request.cache.enabled && plan.config.warm_start {
            steps.push(Box::new(Boots(Box::new(warm_start::StepFindWarm::new(
                plan.config.clone(),
                plan.config_dir.clone(),
                plan.accelerator,
                request.cache.store(),
                request.image.name.clone(),
            )))));
        }
        steps.push(Box::new(step_create_disk::StepCreateDisk::new(
            plan.clone(),
        )));
        let booting: [Box<dyn Step<QemuState>>; 5] = [
            Box::new(step_cloud_init::StepCloudInit::new(plan.clone())),
            Box::new(step_launch::StepLaunch::new(plan.clone())),
            Box::new(step_connect::StepConnect::new(plan.clone())),
            Box::new(warm_start::StepWarmStart),
            Box::new(StepProvision::new(request.provisioners.clone())),
        ];
        steps.extend(
            booting
                .into_iter()
                .map(|step| Box::new(Boots(step)) as Box<dyn Step<QemuState>>),
        );
        // Not passed over when nothing boots: the SBOM then comes from the
        // package list kept with the cache entry.
        let stem = request.image.artifact_stem();
        steps.extend(StepSbom::for_request(
            request,
            "qemu",
            SbomTarget::beside(&plan.output, Some(&stem)),
        ));
        steps.push(Box::new(Boots(Box::new(step_shutdown::StepShutdown::new(
            plan.clone(),
            request.list_files.clone(),
        )))));
        steps.push(Box::new(step_export::StepExport::new(plan.clone())));
        steps
    }
}
