//! The QEMU builder: boots a base disk image under QEMU, provisions it over
//! SSH and writes a standalone, checksummed image.
//!
//! Steps, in order: fetch the base image, create the copy-on-write disk,
//! write the cloud-init seed, launch QEMU, connect over SSH, provision, shut
//! down, export.
//!
//! `[[test]]` boots the finished image again through the same disk, seed,
//! launch and connect steps, on an overlay of its own (see `test_run`).

mod accel;
pub mod config;
pub mod kind;
mod plan;
mod qemu_img;
mod serial_log;
mod step_cloud_init;
mod step_connect;
mod step_create_disk;
mod step_export;
mod step_fetch_base;
mod step_launch;
mod step_shutdown;
mod test_run;

pub use config::QemuConfig;

use crate::common::artifact::checksum_path;
use crate::common::outcome::{LeftRunning, debugging_hint, finish, steps_result};
use crate::common::step_provision::{StepProvision, has_communicator};
use crate::{
    Artifact, BuildError, BuildRequest, Builder, ConfigProblem, ImageInfo, PlannedArtifact,
    SourceIdentity,
};
use async_trait::async_trait;
use config::Accelerator;
use imgbuild_core::step::StepsReport;
use imgbuild_core::{Step, StepContext, cleanup_steps, run_steps};
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
        }
    }
}

has_communicator!(QemuState);
// Per-step disk layers are not kept yet: every build runs every step.
impl crate::common::step_provision::KeepsSteps for QemuState {}

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

    fn cache_settings(&self) -> Option<serde_json::Value> {
        // What the guest's disk is made of and what it boots into; the
        // output format and compression apply at export, which always runs.
        let c = &self.config;
        Some(serde_json::json!({
            "base_format": c.base_format,
            "disk_size": c.disk_size,
            "firmware": c.firmware,
            "machine": c.machine,
            "kernel": c.kernel,
            "initrd": c.initrd,
            "kernel_args": c.kernel_args,
            "qemu_args": c.qemu_args,
            "cloud_init": c.cloud_init,
            "cloud_init_cleanup": c.cloud_init_cleanup,
            "ssh_username": c.ssh.username,
        }))
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

    async fn delete_artifact(
        &self,
        artifact: &Artifact,
        _cx: &StepContext,
    ) -> Result<(), BuildError> {
        test_run::delete(artifact).await
    }
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
        vec![
            Box::new(step_fetch_base::StepFetchBase::new(plan.clone())),
            Box::new(step_create_disk::StepCreateDisk::new(plan.clone())),
            Box::new(step_cloud_init::StepCloudInit::new(plan.clone())),
            Box::new(step_launch::StepLaunch::new(plan.clone())),
            Box::new(step_connect::StepConnect::new(plan.clone())),
            Box::new(StepProvision::new(request.provisioners.clone())),
            Box::new(step_shutdown::StepShutdown::new(plan.clone())),
            Box::new(step_export::StepExport::new(plan.clone())),
        ]
    }
}
