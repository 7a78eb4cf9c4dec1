//! `[[test]]` on a QEMU artifact: the finished image boots afresh on a
//! throwaway qcow2 overlay, through the build's own steps for the disk, the
//! cloud-init seed, QEMU and SSH, and the tests run over that connection.
//! The artifact is only ever read: every write of the test boot lands in
//! the overlay, which goes with the working directory afterwards.
//!
//! Steps, in order: open the artifact (verify its checksum, unpack a zstd
//! one), create the overlay disk, write the seed, launch QEMU, connect, run
//! the tests. No shutdown step: the overlay is thrown away, so there is
//! nothing to flush, and the launch step's cleanup powers the VM off.

use super::QemuState;
use super::config::{Compression, DiskFormat, QemuConfig};
use super::plan::{BaseSource, Plan};
use super::step_fetch_base::{BaseHash, BaseImage};
use super::{qemu_img, step_cloud_init, step_connect, step_create_disk, step_launch};
use crate::common::artifact::{ArtifactFile, checksum_path, sha256_file_async};
use crate::common::step_run_tests::StepRunTests;
use crate::common::tracked::{TrackedPath, remove_path};
use crate::{Artifact, BuildError};
use async_trait::async_trait;
use imgbuild_core::fsutil::{parent_dir, partial_path};
use imgbuild_core::{CleanupOutcome, Step, StepContext, StepError};
use imgbuild_provisioners::image_test::ImageTest;
use std::path::Path;
use std::sync::Arc;

/// What the test run needs to know about the artifact, read from what the
/// export recorded (the config may have changed since, for `imgbuild test`).
#[derive(Clone)]
pub struct ArtifactDisk {
    pub file: ArtifactFile,
    pub format: DiskFormat,
    pub compression: Compression,
}

impl ArtifactDisk {
    pub fn of(artifact: &Artifact, config: &QemuConfig) -> Result<ArtifactDisk, BuildError> {
        let file = artifact.files.first().cloned().ok_or_else(|| {
            BuildError::Refused(format!(
                "the QEMU artifact {} lists no image file to test; is the manifest entry complete?",
                artifact.id
            ))
        })?;
        let format = match artifact.details["format"].as_str() {
            Some("raw") => DiskFormat::Raw,
            Some("qcow2") => DiskFormat::Qcow2,
            _ => config.format,
        };
        let compression = match artifact.details["compression"].as_str() {
            Some("zstd") => Compression::Zstd,
            Some("none") => Compression::None,
            _ => config.compression,
        };
        Ok(ArtifactDisk {
            file,
            format,
            compression,
        })
    }
}

/// The test run's plan: the build's, booting the artifact in a working
/// directory of its own beside it, under a cloud-init instance id of its own.
pub fn test_plan(mut plan: Plan, disk: &ArtifactDisk) -> Plan {
    let dir = parent_dir(&disk.file.path).to_path_buf();
    let stem = plan
        .work_dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    plan.work_dir = dir.join(format!("{stem}-test"));
    plan.output_dir = dir;
    plan.output = disk.file.path.clone();
    plan.base = BaseSource::File {
        path: disk.file.path.clone(),
        checksum: None,
    };
    // The artifact already has the size the build gave it.
    plan.config.disk_size = None;
    plan.instance_id = format!("{}-test", plan.instance_id);
    plan
}

/// The steps of a test run; the last leaves the tests' outcomes in the
/// state.
pub fn steps(
    plan: &Arc<Plan>,
    disk: ArtifactDisk,
    tests: &[ImageTest],
) -> Vec<Box<dyn Step<QemuState>>> {
    vec![
        Box::new(StepOpenArtifact::new(disk)),
        Box::new(step_create_disk::StepCreateDisk::new(plan.clone())),
        Box::new(step_cloud_init::StepCloudInit::new(plan.clone())),
        Box::new(step_launch::StepLaunch::new(plan.clone())),
        Box::new(step_connect::StepConnect::new(plan.clone())),
        Box::new(StepRunTests::new(tests.to_vec())),
    ]
}

/// Checks that the artifact is still what the build recorded, unpacks a
/// compressed one beside it, and checks it as a base image before anything
/// boots from it.
///
/// Produces `state.base`; cleanup removes the unpacked copy.
pub struct StepOpenArtifact {
    disk: ArtifactDisk,
    unpacked: Option<TrackedPath>,
}

impl StepOpenArtifact {
    pub fn new(disk: ArtifactDisk) -> Self {
        StepOpenArtifact {
            disk,
            unpacked: None,
        }
    }
}

#[async_trait]
impl Step<QemuState> for StepOpenArtifact {
    fn name(&self) -> &'static str {
        "open_artifact"
    }

    async fn run(&mut self, state: &mut QemuState, cx: &StepContext) -> Result<(), StepError> {
        let file = &self.disk.file;
        let path = file.path.clone();
        cx.log
            .info(format!("verifying the checksum of {}", path.display()));
        let (_, actual) = sha256_file_async(path.clone())
            .await
            .map_err(|err| StepError::failed(format!("cannot read {}: {err}", path.display())))?;
        if actual != file.sha256 {
            return Err(StepError::failed(format!(
                "{} has sha256 {actual}, but its build recorded {}: the file changed since it was built, so testing it would say nothing about the recorded version; restore it or build a new version",
                path.display(),
                file.sha256
            )));
        }
        let bootable = match self.disk.compression {
            Compression::None => path.clone(),
            Compression::Zstd => {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let unpacked =
                    partial_path(parent_dir(&path), &format!("{name}.unpacked"), &cx.run_id);
                self.unpacked = Some(TrackedPath::file(cx, unpacked.clone())?);
                cx.log.info(format!("unpacking {}", path.display()));
                let (source, target) = (path.clone(), unpacked.clone());
                tokio::task::spawn_blocking(move || unpack(&source, &target))
                    .await
                    .map_err(|err| StepError::failed(err.to_string()))?
                    .map_err(|err| {
                        StepError::failed(format!(
                            "cannot unpack {} into {}: {err}",
                            path.display(),
                            unpacked.display()
                        ))
                    })?;
                unpacked
            }
        };
        let format =
            qemu_img::inspect_base(state.qemu_img.as_ref(), &bootable, Some(self.disk.format))
                .await?;
        state.base = Some(BaseImage {
            path: bootable,
            format,
            reference: path.display().to_string(),
            sha256: BaseHash::Known(actual),
        });
        Ok(())
    }

    async fn cleanup(
        &mut self,
        _state: &mut QemuState,
        cx: &StepContext,
        _outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        match self.unpacked.take() {
            Some(unpacked) => unpacked.remove(cx).await,
            None => Ok(()),
        }
    }
}

fn unpack(source: &Path, target: &Path) -> std::io::Result<()> {
    let input = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(source)?);
    let output = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(target)?;
    let mut output = std::io::BufWriter::with_capacity(1 << 20, output);
    zstd::stream::copy_decode(input, &mut output)?;
    std::io::Write::flush(&mut output)
}

/// `delete_artifact`: each image file and the `.sha256` beside it. One
/// already gone is fine: a deletion that broke off can be run again.
pub async fn delete(artifact: &Artifact) -> Result<(), BuildError> {
    for file in &artifact.files {
        for path in [file.path.clone(), checksum_path(&file.path)] {
            remove_path(&path, false)
                .await
                .map_err(|err| BuildError::Failed {
                    step: "delete".to_owned(),
                    message: format!("cannot remove {}: {err}; remove it by hand", path.display()),
                })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::artifact::sha256_file;
    use crate::common::testing::TestContext;
    use crate::qemu::plan::tests::plan;
    use imgbuild_core::cleanup_steps;
    use serde_json::json;

    /// Opens `disk` and makes the overlay on it with the real `qemu-img`,
    /// returns what `qemu-img info` says of the overlay, then cleans up.
    async fn overlay_on(
        config_dir: &Path,
        disk: ArtifactDisk,
    ) -> Result<serde_json::Value, String> {
        let plan = Arc::new(test_plan(
            plan(
                json!({"base_image": "base.img", "disk_size": "8G"}),
                config_dir,
            ),
            &disk,
        ));
        let mut steps: Vec<Box<dyn Step<QemuState>>> = vec![
            Box::new(StepOpenArtifact::new(disk)),
            Box::new(step_create_disk::StepCreateDisk::new(plan.clone())),
        ];
        let mut state = QemuState::default();
        let t = TestContext::new("vm");
        // Step by step, to look at the overlay before the cleanup removes it.
        for (index, step) in steps.iter_mut().enumerate() {
            if let Err(err) = step.run(&mut state, &t.cx).await {
                let name = step.name();
                cleanup_steps(
                    &mut steps[..=index],
                    &mut state,
                    &t.cx,
                    CleanupOutcome::Failed,
                )
                .await;
                assert!(t.cx.journal.outstanding().is_empty());
                return Err(format!("{name}: {err}"));
            }
        }
        let disk = state.disk.clone().expect("an overlay disk");
        assert!(disk.starts_with(&plan.work_dir));
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&disk)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        let failures =
            cleanup_steps(&mut steps[..], &mut state, &t.cx, CleanupOutcome::Succeeded).await;
        assert!(failures.is_empty(), "{failures:?}");
        assert!(!plan.work_dir.exists(), "the working directory is removed");
        assert!(t.cx.journal.outstanding().is_empty());
        Ok(info)
    }

    fn artifact_disk(path: &Path, format: DiskFormat, compression: Compression) -> ArtifactDisk {
        let (size, sha256) = sha256_file(path).unwrap();
        ArtifactDisk {
            file: ArtifactFile {
                path: path.to_path_buf(),
                size,
                sha256,
            },
            format,
            compression,
        }
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_raw_artifact_is_the_raw_backing_file_of_an_overlay_that_takes_the_writes() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("output");
        std::fs::create_dir(&output).unwrap();
        let image = output.join("web-1.2.raw");
        std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
        let before = sha256_file(&image).unwrap();

        let info = overlay_on(
            dir.path(),
            artifact_disk(&image, DiskFormat::Raw, Compression::None),
        )
        .await
        .unwrap();
        assert_eq!(info["format"], "qcow2", "{info}");
        assert_eq!(info["backing-filename-format"], "raw", "{info}");
        assert_eq!(
            info["backing-filename"],
            image.display().to_string(),
            "{info}"
        );
        // The artifact's size, not the build's `disk_size`.
        assert_eq!(info["virtual-size"], 1 << 20, "{info}");
        assert_eq!(sha256_file(&image).unwrap(), before);
        assert_eq!(names_in(&output), vec!["web-1.2.raw"]);
    }

    #[tokio::test]
    async fn a_zstd_artifact_is_unpacked_beside_it_for_the_boot_and_the_copy_removed() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("output");
        std::fs::create_dir(&output).unwrap();
        let qcow2 = dir.path().join("made.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&qcow2)
            .arg("4M")
            .status()
            .unwrap();
        assert!(made.success());
        let image = output.join("web-1.2.qcow2.zst");
        let packed = zstd::encode_all(&std::fs::read(&qcow2).unwrap()[..], 3).unwrap();
        std::fs::write(&image, packed).unwrap();

        let info = overlay_on(
            dir.path(),
            artifact_disk(&image, DiskFormat::Qcow2, Compression::Zstd),
        )
        .await
        .unwrap();
        assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
        let backing = info["backing-filename"].as_str().unwrap();
        assert!(
            backing.starts_with(&format!(
                "{}/.web-1.2.qcow2.zst.unpacked.",
                output.display()
            )),
            "{info}"
        );
        assert_eq!(info["virtual-size"], 4 << 20, "{info}");
        assert_eq!(
            names_in(&output),
            vec!["web-1.2.qcow2.zst"],
            "the unpacked copy is removed"
        );
    }

    #[tokio::test]
    async fn an_artifact_changed_since_its_build_is_refused_before_anything_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("output");
        std::fs::create_dir(&output).unwrap();
        let image = output.join("web-1.2.raw");
        std::fs::write(&image, b"as built").unwrap();
        let disk = artifact_disk(&image, DiskFormat::Raw, Compression::None);
        std::fs::write(&image, b"tampered").unwrap();

        let err = overlay_on(dir.path(), disk).await.unwrap_err();
        assert!(err.starts_with("open_artifact: "), "{err}");
        assert!(err.contains("changed since it was built"), "{err}");
        assert_eq!(names_in(&output), vec!["web-1.2.raw"]);
    }

    #[test]
    fn the_test_plan_boots_beside_the_artifact_as_a_new_cloud_init_instance() {
        let build = plan(
            json!({"base_image": "base.img", "output_dir": "out", "disk_size": "8G"}),
            Path::new("/cfg"),
        );
        let disk = ArtifactDisk {
            file: ArtifactFile {
                path: "/elsewhere/web-1.2.qcow2".into(),
                size: 1,
                sha256: "0".repeat(64),
            },
            format: DiskFormat::Qcow2,
            compression: Compression::None,
        };
        let test = test_plan(build.clone(), &disk);
        assert_eq!(
            test.work_dir,
            Path::new("/elsewhere/.imgbuild-run1-vm-test")
        );
        assert_eq!(test.config.disk_size, None);
        // A boot under the build's id would be the same instance to an
        // image that kept its cloud-init state: no user, no key for the test.
        assert_ne!(test.instance_id, build.instance_id);
    }
}
