//! Creates the build's working directory and a copy-on-write disk on top of
//! the base image, so the base is never written to.

use super::config::{QemuConfig, parse_size};
use super::{QemuState, qemu_img};
use crate::common::tracked::TrackedPath;
use async_trait::async_trait;
use imgbuild_core::{CleanupOutcome, Step, StepContext, StepError};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::sync::Arc;

pub struct StepCreateDisk {
    config: Arc<QemuConfig>,
    config_dir: std::path::PathBuf,
    work_dir: Option<TrackedPath>,
}

impl StepCreateDisk {
    pub fn new(config: Arc<QemuConfig>, config_dir: std::path::PathBuf) -> Self {
        StepCreateDisk {
            config,
            config_dir,
            work_dir: None,
        }
    }
}

#[async_trait]
impl Step<QemuState> for StepCreateDisk {
    fn name(&self) -> &'static str {
        "create_disk"
    }

    async fn run(&mut self, state: &mut QemuState, cx: &StepContext) -> Result<(), StepError> {
        let base = state
            .base
            .as_ref()
            .ok_or_else(|| StepError::failed("no base image"))?;
        // The working directory sits in the output directory: the disk can
        // grow to gigabytes, and the export then renames within one file system.
        let output_dir = self.config_dir.join(&self.config.output_dir);
        std::fs::create_dir_all(&output_dir).map_err(|err| {
            StepError::failed(format!(
                "cannot create the output directory {}: {err}",
                output_dir.display()
            ))
        })?;
        let work_dir = output_dir.join(format!(".imgbuild-{}-{}", cx.run_id, cx.build_name()));
        let tracked = TrackedPath::dir(cx, work_dir.clone())?;
        self.work_dir = Some(tracked);
        // Private: it holds the writable disk, the cloud-init seed (with a
        // password, when one is configured) and the serial console.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&work_dir)
            .map_err(|err| {
                StepError::failed(format!("cannot create {}: {err}", work_dir.display()))
            })?;

        let disk = work_dir.join("disk.qcow2");
        let backing = base.path.to_string_lossy().into_owned();
        let disk_text = disk.to_string_lossy().into_owned();
        let mut args = vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            &base.format,
            "-b",
            &backing,
            &disk_text,
        ];
        let size_bytes;
        if let Some(size) = &self.config.disk_size {
            size_bytes = parse_size(size).map_err(StepError::failed)?.to_string();
            args.push(&size_bytes);
        }
        qemu_img::run(&args)
            .await
            .map_err(|err| err.context("creating the build disk"))?;
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o600)).map_err(|err| {
            StepError::failed(format!("cannot make {} private: {err}", disk.display()))
        })?;
        state.work_dir = Some(work_dir);
        state.disk = Some(disk);
        Ok(())
    }

    async fn cleanup(
        &mut self,
        _state: &mut QemuState,
        cx: &StepContext,
        _outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        match self.work_dir.take() {
            Some(dir) => dir.remove(cx).await,
            None => Ok(()),
        }
    }
}
