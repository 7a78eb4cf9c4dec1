//! Writes the finished disk as a standalone image (no backing file) under a
//! temporary name in the output directory, checksums it, and only then gives
//! it its final `<name>-<version>` name, never replacing an existing file.
//!
//! Uses `state.disk`, `state.base` (for the artifact's source) and
//! `state.accelerator`. Produces `state.artifact`.

use super::QemuState;
use super::config::Compression;
use super::plan::Plan;
use crate::common::artifact::{
    Artifact, ArtifactFile, HashingWriter, checksum_line, sha256_file_async,
};
use crate::common::tracked::TrackedPath;
use async_trait::async_trait;
use imgbuild_core::fsutil::{parent_dir, partial_path, persist_no_clobber, write_atomic};
use imgbuild_core::{CleanupOutcome, Step, StepContext, StepError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct StepExport {
    plan: Arc<Plan>,
    partials: Vec<TrackedPath>,
}

impl StepExport {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepExport {
            plan,
            partials: Vec::new(),
        }
    }

    fn track(&mut self, cx: &StepContext, path: PathBuf) -> Result<(), StepError> {
        self.partials.push(TrackedPath::file(cx, path)?);
        Ok(())
    }
}

/// Streams `source` through zstd into `target`, hashing what is written.
fn compress(source: &Path, target: &Path) -> std::io::Result<(u64, String)> {
    let input = std::fs::File::open(source)?;
    let output = std::fs::File::create(target)?;
    let hashing = HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, output));
    let mut encoder = zstd::Encoder::new(hashing, 3)?;
    encoder.multithread(std::thread::available_parallelism().map_or(1, |n| n.get() as u32))?;
    std::io::copy(
        &mut std::io::BufReader::with_capacity(1 << 20, input),
        &mut encoder,
    )?;
    let hashing = encoder.finish()?;
    let (buffered, size, digest) = hashing.finish();
    let file = buffered.into_inner().map_err(|err| err.into_error())?;
    file.sync_all()?;
    Ok((size, digest))
}

#[async_trait]
impl Step<QemuState> for StepExport {
    fn name(&self) -> &'static str {
        "export"
    }

    async fn run(&mut self, state: &mut QemuState, cx: &StepContext) -> Result<(), StepError> {
        let disk = state
            .disk
            .clone()
            .ok_or_else(|| StepError::failed("no build disk"))?;
        let plan = self.plan.clone();
        let output = &plan.output;
        let dir = parent_dir(output).to_path_buf();
        let final_name = output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let converted = partial_path(&dir, &format!("{final_name}.convert"), &cx.run_id);
        self.track(cx, converted.clone())?;
        cx.log.info(format!(
            "writing a standalone {} image",
            self.plan.config.format.as_str()
        ));
        let log = cx.log.clone();
        state
            .qemu_img
            .convert(&disk, &converted, plan.config.format, &move |percent| {
                log.progress_percent("write image", percent)
            })
            .await?;

        let (finished, size, sha256) = match self.plan.config.compression {
            Compression::None => {
                let (size, sha256) = sha256_file_async(converted.clone()).await.map_err(|err| {
                    StepError::failed(format!("cannot hash {}: {err}", converted.display()))
                })?;
                (converted.clone(), size, sha256)
            }
            Compression::Zstd => {
                let compressed = partial_path(&dir, &final_name, &cx.run_id);
                self.track(cx, compressed.clone())?;
                cx.log.info("compressing with zstd");
                let (source, target) = (converted.clone(), compressed.clone());
                let (size, sha256) =
                    tokio::task::spawn_blocking(move || compress(&source, &target))
                        .await
                        .map_err(|err| StepError::failed(err.to_string()))?
                        .map_err(|err| {
                            StepError::failed(format!("zstd compression failed: {err}"))
                        })?;
                (compressed, size, sha256)
            }
        };
        persist_no_clobber(&finished, output).map_err(|err| {
            StepError::failed(format!(
                "cannot store the image as {}: {err}",
                output.display()
            ))
        })?;
        let checksum_file = &plan.checksum_file;
        write_atomic(checksum_file, checksum_line(&sha256, output).as_bytes()).map_err(|err| {
            StepError::failed(format!("cannot write {}: {err}", checksum_file.display()))
        })?;
        cx.log
            .info(format!("image {} (sha256 {sha256})", output.display()));

        let source = match state.base.as_mut() {
            Some(base) => base.identity().await?,
            None => return Err(StepError::failed("no base image")),
        };
        let output = std::fs::canonicalize(output).unwrap_or_else(|_| output.clone());
        state.artifact = Some(Artifact {
            builder: "qemu".to_owned(),
            id: output.display().to_string(),
            files: vec![ArtifactFile {
                path: output,
                size,
                sha256,
            }],
            source,
            details: serde_json::json!({
                "format": self.plan.config.format.as_str(),
                "compression": match self.plan.config.compression {
                    Compression::None => "none",
                    Compression::Zstd => "zstd",
                },
                "checksum_file": checksum_file,
                "accelerator": state.accelerator.unwrap_or_default().to_string(),
            }),
        });
        Ok(())
    }

    async fn cleanup(
        &mut self,
        _state: &mut QemuState,
        cx: &StepContext,
        _outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        // On success the finished file was renamed away; removing the
        // partial names is a no-op then, and clears them otherwise.
        let mut first_error = None;
        for partial in self.partials.drain(..).rev() {
            if let Err(err) = partial.remove(cx).await {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::qemu::config::DiskFormat;
    use crate::qemu::plan::tests::plan;
    use crate::qemu::qemu_img::fake::{Call, FakeQemuImg};
    use crate::qemu::step_fetch_base::{BaseHash, BaseImage};
    use serde_json::json;
    use sha2::{Digest, Sha256};

    async fn export(
        config: serde_json::Value,
    ) -> (tempfile::TempDir, Arc<Plan>, Arc<FakeQemuImg>, QemuState) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("output")).unwrap();
        let disk = dir.path().join("disk.qcow2");
        std::fs::write(&disk, b"overlay").unwrap();
        let plan = Arc::new(plan(config, dir.path()));
        let fake = Arc::new(FakeQemuImg::new(json!({})));
        let mut state = QemuState {
            qemu_img: fake.clone(),
            disk: Some(disk),
            base: Some(BaseImage {
                path: dir.path().join("base.img"),
                format: "raw".into(),
                reference: "base.img".into(),
                sha256: BaseHash::Known("1".repeat(64)),
            }),
            ..QemuState::default()
        };
        let t = TestContext::new("vm");
        let mut step = StepExport::new(plan.clone());
        step.run(&mut state, &t.cx).await.unwrap();
        step.cleanup(&mut state, &t.cx, CleanupOutcome::Succeeded)
            .await
            .unwrap();
        (dir, plan, fake, state)
    }

    fn hex_sha256(bytes: &[u8]) -> String {
        Sha256::digest(bytes)
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    #[tokio::test]
    async fn export_converts_to_the_configured_format_and_writes_the_checksum_file() {
        let (dir, plan, fake, state) =
            export(json!({"base_image": "base.img", "format": "raw"})).await;
        assert_eq!(plan.output, dir.path().join("output/web-1.2.raw"));
        match &fake.calls()[..] {
            [
                Call::Convert {
                    source,
                    target,
                    format,
                },
            ] => {
                assert_eq!(source, state.disk.as_ref().unwrap());
                assert_eq!(*format, DiskFormat::Raw);
                assert_ne!(
                    target, &plan.output,
                    "converted under a temporary name first"
                );
                assert!(!target.exists(), "the temporary name is gone");
            }
            other => panic!("{other:?}"),
        }
        let written = std::fs::read(&plan.output).unwrap();
        assert_eq!(written, fake.converted);
        let sha256 = hex_sha256(&written);
        assert_eq!(
            std::fs::read_to_string(&plan.checksum_file).unwrap(),
            checksum_line(&sha256, &plan.output)
        );
        let artifact = state.artifact.unwrap();
        assert_eq!(artifact.files[0].sha256, sha256);
        assert_eq!(artifact.details["format"], "raw");
        assert_eq!(artifact.details["compression"], "none");
        assert_eq!(
            artifact.source.sha256.as_deref(),
            Some("1".repeat(64).as_str())
        );
    }

    #[tokio::test]
    async fn a_zstd_export_compresses_the_converted_image_and_hashes_what_is_stored() {
        let (_dir, plan, fake, state) =
            export(json!({"base_image": "base.img", "compression": "zstd"})).await;
        assert!(matches!(
            fake.calls()[..],
            [Call::Convert {
                format: DiskFormat::Qcow2,
                ..
            }]
        ));
        assert!(plan.output.to_string_lossy().ends_with(".qcow2.zst"));
        let stored = std::fs::read(&plan.output).unwrap();
        assert_eq!(zstd::decode_all(&stored[..]).unwrap(), fake.converted);
        let sha256 = hex_sha256(&stored);
        assert_eq!(
            std::fs::read_to_string(&plan.checksum_file).unwrap(),
            checksum_line(&sha256, &plan.output)
        );
        assert_eq!(state.artifact.unwrap().details["compression"], "zstd");
        let leftovers: Vec<_> = std::fs::read_dir(plan.output.parent().unwrap())
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers.len(),
            2,
            "only the image and its checksum: {leftovers:?}"
        );
    }
}
