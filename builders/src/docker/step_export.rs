//! `export_path`: writes the container's filesystem as one tar file (what
//! `docker export` writes, loadable with `docker import`), hashed as it is
//! written, under a temporary name next to it; only complete, it gets its
//! final name, never replacing an existing file.
//!
//! Uses `state.container` and `state.base`. Produces `state.artifact`.

use super::DockerState;
use super::engine;
use super::plan::Plan;
use super::stop_container;
use crate::ImageInfo;
use crate::common::artifact::{Artifact, ArtifactFile, checksum_line, checksum_path};
use crate::common::tracked::TrackedPath;
use async_trait::async_trait;
use futures_util::StreamExt;
use imgbuild_core::fsutil::{parent_dir, partial_path, persist_no_clobber, write_atomic};
use imgbuild_core::{CleanupOutcome, Step, StepContext, StepError};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Refuses when the tar or its checksum file exists: artifacts are immutable.
pub fn ensure_absent(path: &Path, image: &ImageInfo) -> Result<(), String> {
    let checksum = checksum_path(path);
    for existing in [path, checksum.as_path()] {
        if existing.exists() {
            return Err(format!(
                "{} already exists: image {} version {} was exported before and is never overwritten; bump `image.version` to build a new one (with `{{{{ image.version }}}}` in `export_path`, each version gets its own file)",
                existing.display(),
                image.name,
                image.version
            ));
        }
    }
    Ok(())
}

pub struct StepExport {
    plan: Arc<Plan>,
    output: PathBuf,
    checksum_file: PathBuf,
    partial: Option<TrackedPath>,
}

impl StepExport {
    /// `output` and `checksum_file` are the plan's export paths.
    pub fn new(plan: Arc<Plan>, output: PathBuf, checksum_file: PathBuf) -> Self {
        StepExport {
            plan,
            output,
            checksum_file,
            partial: None,
        }
    }

    /// Streams the export into `partial`; returns its size and SHA-256.
    async fn write(
        &self,
        state: &DockerState,
        container_id: &str,
        partial: &Path,
        cx: &StepContext,
    ) -> Result<(u64, String), StepError> {
        let write_error = |err: std::io::Error| {
            StepError::failed(format!("cannot write {}: {err}", partial.display()))
        };
        let file = tokio::fs::File::create(partial)
            .await
            .map_err(write_error)?;
        let mut writer = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut last_report = Instant::now();
        let task = "export filesystem";
        cx.log.progress(task, 0, None);
        let mut stream = state.engine.slow().export_container(container_id);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|err| {
                StepError::failed(format!(
                    "the export of the build container broke off after {size} bytes: {}",
                    engine::describe(&err)
                ))
            })?;
            hasher.update(&chunk);
            writer.write_all(&chunk).await.map_err(write_error)?;
            size += chunk.len() as u64;
            if last_report.elapsed() >= PROGRESS_EVERY {
                cx.log.progress(task, size, None);
                last_report = Instant::now();
            }
        }
        writer.flush().await.map_err(write_error)?;
        writer.into_inner().sync_all().await.map_err(write_error)?;
        cx.log.progress(task, size, Some(size));
        if size == 0 {
            return Err(StepError::failed("the engine exported an empty filesystem"));
        }
        Ok((size, hex::encode(hasher.finalize())))
    }
}

#[async_trait]
impl Step<DockerState> for StepExport {
    fn name(&self) -> &'static str {
        "export"
    }

    async fn run(&mut self, state: &mut DockerState, cx: &StepContext) -> Result<(), StepError> {
        let base = state
            .base
            .clone()
            .ok_or_else(|| StepError::failed("no base image"))?;
        let container = state
            .container
            .clone()
            .ok_or_else(|| StepError::failed("the build container is not running"))?;
        ensure_absent(&self.output, &self.plan.image).map_err(StepError::failed)?;
        let dir = parent_dir(&self.output).to_path_buf();
        std::fs::create_dir_all(&dir)
            .map_err(|err| StepError::failed(format!("cannot create {}: {err}", dir.display())))?;
        let final_name = self
            .output
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .ok_or_else(|| {
                StepError::failed(format!("{} does not name a file", self.output.display()))
            })?;
        let partial = partial_path(&dir, &final_name, &cx.run_id);
        self.partial = Some(TrackedPath::file(cx, partial.clone())?);

        stop_container(&state.engine, &container.id).await?;
        cx.log.info(format!(
            "exporting the filesystem of {} to {}",
            container.name,
            self.output.display()
        ));
        let (size, sha256) = self.write(state, &container.id, &partial, cx).await?;
        persist_no_clobber(&partial, &self.output).map_err(|err| {
            StepError::failed(format!(
                "cannot store the export as {}: {err}",
                self.output.display()
            ))
        })?;
        write_atomic(
            &self.checksum_file,
            checksum_line(&sha256, &self.output).as_bytes(),
        )
        .map_err(|err| {
            StepError::failed(format!(
                "cannot write {}: {err}",
                self.checksum_file.display()
            ))
        })?;
        cx.log.info(format!(
            "exported {} ({size} bytes, sha256 {sha256})",
            self.output.display()
        ));

        let output = std::fs::canonicalize(&self.output).unwrap_or_else(|_| self.output.clone());
        state.artifact = Some(Artifact {
            builder: "docker".to_owned(),
            id: output.display().to_string(),
            files: vec![ArtifactFile {
                path: output,
                size,
                sha256,
            }],
            source: base.identity(),
            details: serde_json::json!({
                "format": "tar",
                "checksum_file": self.checksum_file,
                "base_image": base.details(),
            }),
        });
        Ok(())
    }

    async fn cleanup(
        &mut self,
        _state: &mut DockerState,
        cx: &StepContext,
        _outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        // After success the partial name was renamed away and removing it is
        // a no-op; otherwise it clears the unfinished file.
        match self.partial.take() {
            Some(partial) => partial.remove(cx).await,
            None => Ok(()),
        }
    }
}
