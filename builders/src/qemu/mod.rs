//! The QEMU builder: boots a base disk image under QEMU, provisions it over
//! SSH and writes a standalone, checksummed image.
//!
//! Steps, in order: fetch the base image, create the copy-on-write disk,
//! write the cloud-init seed, launch QEMU, connect over SSH, provision, shut
//! down, export.

mod accel;
pub mod config;
mod qemu_img;
mod serial_log;
mod step_cloud_init;
mod step_connect;
mod step_create_disk;
mod step_export;
mod step_fetch_base;
mod step_launch;
mod step_shutdown;

pub use config::QemuConfig;

use crate::common::outcome::steps_result;
use crate::common::step_provision::{HasCommunicator, StepProvision};
use crate::{
    Artifact, BuildError, BuildRequest, Builder, ConfigProblem, ImageInfo, PlannedArtifact,
};
use async_trait::async_trait;
use config::{Accelerator, Compression};
use imgbuild_core::{Step, StepContext, cleanup_steps, run_steps};
use imgbuild_provisioners::Communicator;
use imgbuild_provisioners::ssh::TemporaryKey;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct QemuBuilder {
    config: QemuConfig,
}

impl QemuBuilder {
    pub fn new(config: QemuConfig) -> Self {
        QemuBuilder { config }
    }

    fn output_file_name(&self, image: &ImageInfo) -> String {
        let extension = self.config.format.as_str();
        let compressed = match self.config.compression {
            Compression::None => "",
            Compression::Zstd => ".zst",
        };
        format!("{}.{extension}{compressed}", image.artifact_stem())
    }

    fn output_path(&self, image: &ImageInfo, config_dir: &Path) -> PathBuf {
        config_dir
            .join(&self.config.output_dir)
            .join(self.output_file_name(image))
    }
}

/// What the steps hand each other.
#[derive(Default)]
pub struct QemuState {
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
}

impl HasCommunicator for QemuState {
    fn communicator(&self) -> Option<Arc<dyn Communicator>> {
        self.communicator.clone()
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
        let path = self.output_path(image, config_dir);
        let checksum = PathBuf::from(format!("{}.sha256", path.display()));
        PlannedArtifact {
            description: format!("{} image {}", self.config.format.as_str(), path.display()),
            files: vec![path, checksum],
        }
    }

    async fn preflight(&self, request: &BuildRequest, _cx: &StepContext) -> Result<(), BuildError> {
        let path = self.output_path(&request.image, &request.config_dir);
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
        let mut candidates = accel::candidates(self.config.accelerator, &cx.log).await;
        loop {
            let accelerator = candidates.remove(0);
            let mut state = QemuState {
                accelerator: Some(accelerator),
                ..QemuState::default()
            };
            let mut steps = self.steps(request, accelerator);
            let mut report = run_steps(&mut steps, &mut state, cx, request.on_error).await;
            let (step, message) = match steps_result(&mut report) {
                Ok(()) => {
                    return state.artifact.ok_or_else(|| BuildError::Failed {
                        step: "export".into(),
                        message: "no artifact was produced".into(),
                    });
                }
                Err(BuildError::Failed { step, message }) => (step, message),
                Err(other) => return Err(other),
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
                cx.log.warn(debugging_hint(&state, &self.config, cx));
            }
            return Err(BuildError::Failed { step, message });
        }
    }
}

/// How to reach a VM left running by `--on-error abort`, and how to get rid
/// of it afterwards.
fn debugging_hint(state: &QemuState, config: &QemuConfig, cx: &StepContext) -> String {
    let clean = format!(
        "remove it and its files with `imgbuild clean --run {}`",
        cx.run_id
    );
    let Some(machine) = state.machine.as_ref().filter(|m| !m.has_exited()) else {
        return format!("the build's files are left for debugging; {clean}");
    };
    let port = config.ssh.port.unwrap_or(machine.ssh_port);
    let user = &config.ssh.username;
    let login = match (&state.ssh_key, &state.work_dir) {
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
    format!(
        "the VM is left running for debugging (QEMU pid {}, serial console in {}):\n  {login}\n{clean}",
        machine.pid,
        machine.serial_log.display()
    )
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or(text)
}

impl QemuBuilder {
    fn steps(
        &self,
        request: &BuildRequest,
        accelerator: Accelerator,
    ) -> Vec<Box<dyn Step<QemuState>>> {
        let config = Arc::new(self.config.clone());
        let dir = request.config_dir.clone();
        vec![
            Box::new(step_fetch_base::StepFetchBase::new(
                config.clone(),
                dir.clone(),
            )),
            Box::new(step_create_disk::StepCreateDisk::new(
                config.clone(),
                dir.clone(),
            )),
            Box::new(step_cloud_init::StepCloudInit::new(config.clone())),
            Box::new(step_launch::StepLaunch::new(
                config.clone(),
                dir.clone(),
                accelerator,
            )),
            Box::new(step_connect::StepConnect::new(config.clone(), dir.clone())),
            Box::new(StepProvision::new(request.provisioners.clone())),
            Box::new(step_shutdown::StepShutdown::new(config.clone())),
            Box::new(step_export::StepExport::new(
                config.clone(),
                self.output_path(&request.image, &dir),
            )),
        ]
    }
}
