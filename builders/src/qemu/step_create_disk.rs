//! Creates the build's working directory and a copy-on-write disk on top of
//! the base image, so the base is never written to.
//!
//! Uses `state.base`, `state.cache` (the kept layer to start from) and
//! `state.warm` (a saved machine's disk, copied).
//! Produces `state.work_dir` and `state.disk`; cleanup removes the working
//! directory with everything in it.

use super::QemuState;
use super::plan::Plan;
use super::qemu_img::QemuImg;
use crate::common::tracked::TrackedPath;
use async_trait::async_trait;
use imgbuild_core::{CleanupOutcome, Step, StepContext, StepError};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

pub struct StepCreateDisk {
    plan: Arc<Plan>,
    work_dir: Option<TrackedPath>,
}

impl StepCreateDisk {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepCreateDisk {
            plan,
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
        let output_dir = &self.plan.output_dir;
        std::fs::create_dir_all(output_dir).map_err(|err| {
            StepError::failed(format!(
                "cannot create the output directory {}: {err}",
                output_dir.display()
            ))
        })?;
        let work_dir = self.plan.work_dir.clone();
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

        // A build resumed from the step cache starts on the kept layer of
        // its last cached step; one whose every step is kept boots nothing
        // and exports the store's chain as it is.
        let start = match state.cache.as_ref() {
            Some(cache) if cache.fully_cached => None,
            Some(cache) => Some(match &cache.below {
                Some(below) => (below.path.clone(), below.format.clone()),
                None => (base.path.clone(), base.format.clone()),
            }),
            None => Some((base.path.clone(), base.format.clone())),
        };
        state.work_dir = Some(work_dir.clone());
        let Some((backing, backing_format)) = start else {
            return Ok(());
        };
        let disk = work_dir.join("disk.qcow2");
        let saved_disk = state
            .warm
            .as_ref()
            .and_then(|warm| warm.saved.as_ref())
            .map(|saved| saved.disk.clone());
        match saved_disk {
            // A saved machine state fits only the exact disk it was saved
            // with: a copy of it, standing on the same backing file. The
            // kept disk names that file relative to the store; the copy
            // here names it where it is.
            Some(saved) => {
                tokio::fs::copy(&saved, &disk).await.map_err(|err| {
                    StepError::failed(format!(
                        "cannot copy {} to {}: {err}",
                        saved.display(),
                        disk.display()
                    ))
                })?;
                make_private(&disk)?;
                state
                    .qemu_img
                    .rebase_unsafe(&disk, &backing, &backing_format)
                    .await?;
            }
            None => {
                create_disk(
                    state.qemu_img.as_ref(),
                    &disk,
                    &backing,
                    &backing_format,
                    &self.plan,
                )
                .await?;
            }
        }
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

/// A new build disk at `disk` over `backing`, grown to the configured
/// size, private to the user.
pub async fn create_disk(
    qemu_img: &dyn QemuImg,
    disk: &Path,
    backing: &Path,
    backing_format: &str,
    plan: &Plan,
) -> Result<(), StepError> {
    let size = plan.config.disk_size.as_ref().map(|size| size.bytes());
    qemu_img
        .create_overlay(disk, backing, backing_format, size)
        .await
        .map_err(|err| err.context("creating the build disk"))?;
    make_private(disk)
}

fn make_private(disk: &Path) -> Result<(), StepError> {
    std::fs::set_permissions(disk, std::fs::Permissions::from_mode(0o600))
        .map_err(|err| StepError::failed(format!("cannot make {} private: {err}", disk.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::qemu::plan::tests::plan;
    use crate::qemu::qemu_img::fake::{Call, FakeQemuImg};
    use crate::qemu::step_fetch_base::{BaseHash, BaseImage};
    use serde_json::json;

    fn state_on(fake: &Arc<FakeQemuImg>, format: &str) -> QemuState {
        QemuState {
            qemu_img: fake.clone(),
            base: Some(BaseImage {
                path: "/images/base.img".into(),
                format: format.into(),
                reference: "base.img".into(),
                sha256: BaseHash::Known("0".repeat(64)),
            }),
            ..QemuState::default()
        }
    }

    #[tokio::test]
    async fn the_disk_is_a_private_overlay_read_as_the_inspected_format_and_grown() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Arc::new(plan(
            json!({"base_image": "base.img", "disk_size": "8G", "output_dir": "out"}),
            dir.path(),
        ));
        let fake = Arc::new(FakeQemuImg::new(json!({})));
        let mut state = state_on(&fake, "raw");
        let t = TestContext::new("vm");
        let mut step = StepCreateDisk::new(plan.clone());
        step.run(&mut state, &t.cx).await.unwrap();

        let disk = plan.work_dir.join("disk.qcow2");
        assert_eq!(
            fake.calls(),
            vec![Call::CreateOverlay {
                disk: disk.clone(),
                backing: "/images/base.img".into(),
                backing_format: "raw".into(),
                size: Some(8 << 30),
            }]
        );
        assert_eq!(state.disk.as_deref(), Some(disk.as_path()));
        assert_eq!(state.work_dir.as_deref(), Some(plan.work_dir.as_path()));
        let mode =
            |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&plan.work_dir), 0o700);
        assert_eq!(mode(&disk), 0o600);

        step.cleanup(&mut state, &t.cx, CleanupOutcome::Failed)
            .await
            .unwrap();
        assert!(
            !plan.work_dir.exists(),
            "cleanup removes the working directory"
        );
    }

    #[tokio::test]
    async fn without_disk_size_the_disk_keeps_the_base_size() {
        let dir = tempfile::tempdir().unwrap();
        let plan = Arc::new(plan(json!({"base_image": "base.img"}), dir.path()));
        let fake = Arc::new(FakeQemuImg::new(json!({})));
        let mut state = state_on(&fake, "qcow2");
        let t = TestContext::new("vm");
        let mut step = StepCreateDisk::new(plan.clone());
        step.run(&mut state, &t.cx).await.unwrap();
        match &fake.calls()[..] {
            [
                Call::CreateOverlay {
                    backing_format,
                    size,
                    ..
                },
            ] => assert_eq!((backing_format.as_str(), *size), ("qcow2", None)),
            other => panic!("{other:?}"),
        }
        step.cleanup(&mut state, &t.cx, CleanupOutcome::Succeeded)
            .await
            .unwrap();
    }
}
