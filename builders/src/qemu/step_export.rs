//! Writes the finished disk as a standalone image (no backing file) under a
//! temporary name in the output directory, checksums it, and only then gives
//! it its final `<name>-<version>` name, never replacing an existing file.

use super::QemuState;
use super::config::{Compression, QemuConfig};
use crate::common::artifact::{
    Artifact, ArtifactFile, HashingWriter, checksum_line, sha256_file_async,
};
use crate::common::tracked::TrackedPath;
use async_trait::async_trait;
use imgbuild_core::fsutil::{parent_dir, partial_path, persist_no_clobber, write_atomic};
use imgbuild_core::{CleanupOutcome, Step, StepContext, StepError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

pub struct StepExport {
    config: Arc<QemuConfig>,
    output: PathBuf,
    partials: Vec<TrackedPath>,
}

impl StepExport {
    pub fn new(config: Arc<QemuConfig>, output: PathBuf) -> Self {
        StepExport {
            config,
            output,
            partials: Vec::new(),
        }
    }

    fn track(&mut self, cx: &StepContext, path: PathBuf) -> Result<(), StepError> {
        self.partials.push(TrackedPath::file(cx, path)?);
        Ok(())
    }

    async fn convert(&self, cx: &StepContext, disk: &Path, target: &Path) -> Result<(), StepError> {
        let format = self.config.format.as_str();
        let mut child = Command::new("qemu-img")
            .args(["convert", "-p", "-O", format])
            .arg(disk)
            .arg(target)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| {
                StepError::failed(format!("cannot run qemu-img ({err}); install `qemu-utils`"))
            })?;
        // `-p` rewrites "(12.34/100%)" in place; turn it into progress events.
        let mut stdout = child.stdout.take().expect("piped");
        let mut buffer = [0u8; 256];
        let mut pending = String::new();
        let mut last = -1i64;
        loop {
            let read = stdout
                .read(&mut buffer)
                .await
                .map_err(|err| StepError::failed(format!("reading qemu-img progress: {err}")))?;
            if read == 0 {
                break;
            }
            pending.push_str(&String::from_utf8_lossy(&buffer[..read]));
            while let Some(end) = pending.find(['\r', '\n']) {
                let piece: String = pending.drain(..=end).collect();
                if let Some(percent) = parse_progress(&piece) {
                    let whole = percent as i64;
                    if whole != last {
                        last = whole;
                        cx.log.progress_percent("write image", whole as u64);
                    }
                }
            }
        }
        let output = child
            .wait_with_output()
            .await
            .map_err(|err| StepError::failed(format!("qemu-img convert: {err}")))?;
        if !output.status.success() {
            return Err(StepError::failed(format!(
                "qemu-img convert failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }
}

fn parse_progress(text: &str) -> Option<f64> {
    let inner = text.trim().trim_start_matches('(');
    let number = inner.split('/').next()?;
    number.trim().parse().ok()
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
        let dir = parent_dir(&self.output).to_path_buf();
        let final_name = self
            .output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let converted = partial_path(&dir, &format!("{final_name}.convert"), &cx.run_id);
        self.track(cx, converted.clone())?;
        cx.log.info(format!(
            "writing a standalone {} image",
            self.config.format.as_str()
        ));
        self.convert(cx, &disk, &converted).await?;

        let (finished, size, sha256) = match self.config.compression {
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
        persist_no_clobber(&finished, &self.output).map_err(|err| {
            StepError::failed(format!(
                "cannot store the image as {}: {err}",
                self.output.display()
            ))
        })?;
        let checksum_file = PathBuf::from(format!("{}.sha256", self.output.display()));
        write_atomic(
            &checksum_file,
            checksum_line(&sha256, &self.output).as_bytes(),
        )
        .map_err(|err| {
            StepError::failed(format!("cannot write {}: {err}", checksum_file.display()))
        })?;
        cx.log
            .info(format!("image {} (sha256 {sha256})", self.output.display()));

        let source = match state.base.as_mut() {
            Some(base) => base.identity().await?,
            None => return Err(StepError::failed("no base image")),
        };
        let output = std::fs::canonicalize(&self.output).unwrap_or_else(|_| self.output.clone());
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
                "format": self.config.format.as_str(),
                "compression": match self.config.compression {
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

    #[test]
    fn reads_qemu_img_progress() {
        assert_eq!(parse_progress("    (12.50/100%)\r"), Some(12.5));
        assert_eq!(parse_progress("(100.00/100%)"), Some(100.0));
        assert_eq!(parse_progress("garbage"), None);
    }
}
