//! Finds the base disk image: a local file, or an http(s) URL downloaded once
//! into a cache keyed by its checksum, verified on every use; then checks
//! that it is a standalone qcow2 or raw disk.
//!
//! Uses nothing from the state. Produces `state.base`.

use super::config::is_url;
use super::plan::{BaseSource, Plan};
use super::{QemuState, qemu_img};
use crate::common::artifact::{HashingWriter, SourceIdentity, sha256_file_async};
use crate::common::tracked::TrackedPath;
use async_trait::async_trait;
use futures_util::StreamExt;
use imgbuild_core::fsutil::parent_dir;
use imgbuild_core::{CleanupOutcome, Sha256Digest, Step, StepContext, StepError};
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
    plan: Arc<Plan>,
    partial_download: Option<TrackedPath>,
}

impl StepFetchBase {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepFetchBase {
            plan,
            partial_download: None,
        }
    }

    async fn local(
        &self,
        path: &Path,
        checksum: Option<&Sha256Digest>,
        cx: &StepContext,
    ) -> Result<BaseImage, StepError> {
        let path = std::fs::canonicalize(path)
            .map_err(|err| StepError::failed(format!("base image {}: {err}", path.display())))?;
        let sha256 = match checksum {
            Some(expected) => {
                let expected = expected.hex();
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

    async fn download(
        &mut self,
        url: &str,
        checksum: &Sha256Digest,
        cx: &StepContext,
    ) -> Result<BaseImage, StepError> {
        let url = url.to_owned();
        let expected = checksum.hex().to_owned();
        let cached = cached_download_path(&self.plan.cache_dir, &expected);
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
        let plan = self.plan.clone();
        let mut base = match &plan.base {
            BaseSource::Url { url, checksum } => self.download(url, checksum, cx).await?,
            BaseSource::File { path, checksum } => self.local(path, checksum.as_ref(), cx).await?,
        };
        base.format =
            qemu_img::inspect_base(state.qemu_img.as_ref(), &base.path, plan.config.base_format)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::qemu::config::DiskFormat;
    use crate::qemu::plan::tests::plan;
    use crate::qemu::qemu_img::fake::{Call, FakeQemuImg};
    use crate::qemu::step_create_disk::StepCreateDisk;
    use imgbuild_core::{OnError, run_steps};
    use serde_json::json;

    fn steps(plan: &Arc<super::Plan>) -> Vec<Box<dyn Step<QemuState>>> {
        vec![
            Box::new(StepFetchBase::new(plan.clone())),
            Box::new(StepCreateDisk::new(plan.clone())),
        ]
    }

    #[tokio::test]
    async fn a_base_with_a_backing_file_is_refused_before_a_disk_is_made() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.qcow2"), b"qcow2").unwrap();
        let plan = Arc::new(plan(json!({"base_image": "base.qcow2"}), dir.path()));
        let fake = Arc::new(FakeQemuImg::new(
            json!({"format": "qcow2", "backing-filename": "/etc/shadow"}),
        ));
        let mut state = QemuState {
            qemu_img: fake.clone(),
            ..QemuState::default()
        };
        let t = TestContext::new("vm");
        let mut steps = steps(&plan);
        let report = run_steps(&mut steps, &mut state, &t.cx, OnError::Cleanup).await;
        match report.failure {
            Some((step, StepError::Failed(message))) => {
                assert_eq!(step, "fetch_base");
                assert!(message.contains("refusing the base image"), "{message}");
                assert!(message.contains("/etc/shadow"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let canonical = std::fs::canonicalize(dir.path().join("base.qcow2")).unwrap();
        assert_eq!(
            fake.calls(),
            vec![Call::Info {
                path: canonical,
                declared: None
            }],
            "nothing but the inspection may touch the base"
        );
        assert!(state.disk.is_none());
        assert!(!plan.work_dir.exists());
    }

    #[tokio::test]
    async fn a_declared_format_is_passed_on_and_the_inspected_one_recorded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.img"), b"raw disk").unwrap();
        let plan = Arc::new(plan(
            json!({"base_image": "base.img", "base_format": "raw"}),
            dir.path(),
        ));
        let fake = Arc::new(FakeQemuImg::new(json!({"format": "raw"})));
        let mut state = QemuState {
            qemu_img: fake.clone(),
            ..QemuState::default()
        };
        let t = TestContext::new("vm");
        let mut step = StepFetchBase::new(plan.clone());
        step.run(&mut state, &t.cx).await.unwrap();
        assert!(matches!(
            fake.calls()[..],
            [Call::Info {
                declared: Some(DiskFormat::Raw),
                ..
            }]
        ));
        let base = state.base.as_mut().unwrap();
        assert_eq!(base.format, "raw");
        let identity = base.identity().await.unwrap();
        assert_eq!(identity.kind, "file");
        assert_eq!(
            identity.sha256.unwrap(),
            crate::common::artifact::sha256_file(&base.path).unwrap().1
        );
    }

    #[tokio::test]
    async fn a_local_base_that_does_not_match_its_checksum_is_never_inspected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("base.img"), b"tampered").unwrap();
        let plan = Arc::new(plan(
            json!({"base_image": "base.img", "base_checksum": format!("sha256:{}", "0".repeat(64))}),
            dir.path(),
        ));
        let fake = Arc::new(FakeQemuImg::new(json!({"format": "raw"})));
        let mut state = QemuState {
            qemu_img: fake.clone(),
            ..QemuState::default()
        };
        let t = TestContext::new("vm");
        let err = StepFetchBase::new(plan)
            .run(&mut state, &t.cx)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("but base_checksum says"), "{err}");
        assert!(fake.calls().is_empty());
    }
}
