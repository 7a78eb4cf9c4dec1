//! Finds the base disk image: a local file, or an http(s) URL downloaded once
//! into a cache keyed by its checksum, verified on every use; then checks
//! that it is a standalone qcow2 or raw disk.

use super::config::{QemuConfig, is_url, parse_checksum};
use super::{QemuState, qemu_img};
use crate::common::artifact::{HashingWriter, SourceIdentity, sha256_file_async};
use crate::common::tracked::TrackedPath;
use async_trait::async_trait;
use futures_util::StreamExt;
use imgbuild_core::fsutil::parent_dir;
use imgbuild_core::{CleanupOutcome, Step, StepContext, StepError};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::task::JoinHandle;

pub struct BaseImage {
    pub path: PathBuf,
    pub format: String,
    pub reference: String,
    /// The base's SHA-256: known up front for checksummed and downloaded
    /// bases, otherwise computed in the background while the VM boots.
    pub sha256: BaseHash,
}

pub enum BaseHash {
    Known(String),
    Pending(JoinHandle<std::io::Result<(u64, String)>>),
}

impl BaseImage {
    pub async fn identity(&mut self) -> Result<SourceIdentity, StepError> {
        let digest = match std::mem::replace(&mut self.sha256, BaseHash::Known(String::new())) {
            BaseHash::Known(digest) => digest,
            BaseHash::Pending(task) => {
                task.await
                    .map_err(|err| StepError::failed(err.to_string()))?
                    .map_err(|err| StepError::failed(format!("cannot hash the base image: {err}")))?
                    .1
            }
        };
        self.sha256 = BaseHash::Known(digest.clone());
        Ok(SourceIdentity {
            kind: if is_url(&self.reference) {
                "url"
            } else {
                "file"
            }
            .to_owned(),
            reference: self.reference.clone(),
            sha256: Some(digest),
        })
    }
}

pub struct StepFetchBase {
    config: Arc<QemuConfig>,
    config_dir: PathBuf,
    partial_download: Option<TrackedPath>,
}

impl StepFetchBase {
    pub fn new(config: Arc<QemuConfig>, config_dir: PathBuf) -> Self {
        StepFetchBase {
            config,
            config_dir,
            partial_download: None,
        }
    }

    fn cache_dir(&self) -> PathBuf {
        if let Some(dir) = &self.config.cache_dir {
            return self.config_dir.join(dir);
        }
        if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir).join("imgbuild");
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        home.join(".cache/imgbuild")
    }

    async fn local(&self, cx: &StepContext) -> Result<BaseImage, StepError> {
        let path = self.config_dir.join(&self.config.base_image);
        let path = std::fs::canonicalize(&path)
            .map_err(|err| StepError::failed(format!("base image {}: {err}", path.display())))?;
        let sha256 = match &self.config.base_checksum {
            Some(expected) => {
                let expected = parse_checksum(expected).map_err(StepError::failed)?;
                cx.log
                    .info(format!("verifying the checksum of {}", path.display()));
                let (_, actual) = sha256_file_async(path.clone()).await.map_err(|err| {
                    StepError::failed(format!("cannot read {}: {err}", path.display()))
                })?;
                if actual != expected {
                    return Err(StepError::failed(format!(
                        "{} has sha256 {actual}, but base_checksum says {expected}",
                        path.display()
                    )));
                }
                BaseHash::Known(actual)
            }
            None => BaseHash::Pending(tokio::spawn(sha256_file_async(path.clone()))),
        };
        Ok(BaseImage {
            reference: path.display().to_string(),
            path,
            format: String::new(),
            sha256,
        })
    }

    async fn download(&mut self, cx: &StepContext) -> Result<BaseImage, StepError> {
        let url = self.config.base_image.clone();
        let expected = parse_checksum(
            self.config
                .base_checksum
                .as_deref()
                .ok_or_else(|| StepError::failed("a base image URL needs base_checksum"))?,
        )
        .map_err(StepError::failed)?;
        let cached = cached_download_path(&self.cache_dir(), &expected);
        let dir = parent_dir(&cached).to_path_buf();
        // The cache is only a copy: a truncated, bit-rotted or tampered file
        // under the right name must never be booted, so it is hashed on
        // every use and the recorded digest is the one measured here.
        if cached.is_file() {
            cx.log
                .info(format!("verifying the cached download of {url}"));
            let actual = sha256_file_async(cached.clone())
                .await
                .map(|(_, digest)| digest)
                .unwrap_or_else(|err| format!("unreadable ({err})"));
            if actual == expected {
                return Ok(BaseImage {
                    path: cached,
                    format: String::new(),
                    reference: url,
                    sha256: BaseHash::Known(actual),
                });
            }
            cx.log.warn(format!(
                "the cached download {} has sha256 {actual}, not {expected}; discarding it and downloading again",
                cached.display()
            ));
            std::fs::remove_file(&cached).map_err(|err| {
                StepError::failed(format!(
                    "cannot remove the corrupt cached download {}: {err}",
                    cached.display()
                ))
            })?;
        }
        std::fs::create_dir_all(&dir)
            .map_err(|err| StepError::failed(format!("cannot create {}: {err}", dir.display())))?;
        let partial = dir.join(format!(".{expected}.{}.partial", cx.run_id));
        self.partial_download = Some(TrackedPath::file(cx, partial.clone())?);

        cx.log.info(format!("downloading {url}"));
        let response = reqwest::get(&url)
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|err| StepError::failed(format!("cannot download {url}: {err}")))?;
        let total = response.content_length();
        let file = std::fs::File::create(&partial).map_err(|err| {
            StepError::failed(format!("cannot write {}: {err}", partial.display()))
        })?;
        let mut writer = HashingWriter::new(std::io::BufWriter::with_capacity(1 << 20, file));
        let mut body = response.bytes_stream();
        let mut done = 0u64;
        let mut last_report = std::time::Instant::now();
        while let Some(chunk) = body.next().await {
            let chunk = chunk
                .map_err(|err| StepError::failed(format!("download of {url} broke off: {err}")))?;
            writer.write_all(&chunk).map_err(|err| {
                StepError::failed(format!("cannot write {}: {err}", partial.display()))
            })?;
            done += chunk.len() as u64;
            if last_report.elapsed().as_millis() >= 250 {
                cx.log.progress("download base image", done, total);
                last_report = std::time::Instant::now();
            }
        }
        cx.log
            .progress("download base image", done, total.or(Some(done)));
        let (buffered, _, actual) = writer.finish();
        let file = buffered.into_inner().map_err(|err| {
            StepError::failed(format!("cannot write {}: {err}", partial.display()))
        })?;
        file.sync_all().map_err(|err| {
            StepError::failed(format!("cannot write {}: {err}", partial.display()))
        })?;
        if actual != expected {
            return Err(StepError::failed(format!(
                "the download of {url} has sha256 {actual}, but base_checksum says {expected}; the file changed upstream or the checksum is wrong"
            )));
        }
        std::fs::rename(&partial, &cached).map_err(|err| {
            StepError::failed(format!("cannot store {}: {err}", cached.display()))
        })?;
        if let Some(tracked) = self.partial_download.take() {
            tracked.keep(cx)?;
        }
        Ok(BaseImage {
            path: cached,
            format: String::new(),
            reference: url,
            sha256: BaseHash::Known(actual),
        })
    }
}

#[async_trait]
impl Step<QemuState> for StepFetchBase {
    fn name(&self) -> &'static str {
        "fetch_base"
    }

    async fn run(&mut self, state: &mut QemuState, cx: &StepContext) -> Result<(), StepError> {
        let mut base = if is_url(&self.config.base_image) {
            self.download(cx).await?
        } else {
            self.local(cx).await?
        };
        base.format = qemu_img::inspect_base(
            &base.path,
            self.config.base_format.map(|format| format.as_str()),
        )
        .await?;
        cx.log
            .info(format!("base image {} ({})", base.reference, base.format));
        state.base = Some(base);
        Ok(())
    }

    async fn cleanup(
        &mut self,
        state: &mut QemuState,
        cx: &StepContext,
        _outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        if let Some(base) = state.base.as_mut()
            && let BaseHash::Pending(task) = &base.sha256
        {
            task.abort();
        }
        match self.partial_download.take() {
            Some(partial) => partial.remove(cx).await,
            None => Ok(()),
        }
    }
}

/// Downloads are cached under their checksum: a changed file upstream can
/// never be mistaken for the cached one.
fn cached_download_path(cache_dir: &Path, sha256: &str) -> PathBuf {
    cache_dir.join("downloads").join(format!("{sha256}.img"))
}
