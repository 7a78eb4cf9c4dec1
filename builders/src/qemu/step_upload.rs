//! Delivers the finished image to S3 (`upload = "s3://bucket/prefix/"`):
//! the image as `<prefix><file name>` through the object store's parallel
//! multipart upload (a SHA-256 per part, checked by S3), then its checksum
//! file beside it. Runs only after the image passed its tests, in the
//! builder's delivery (see `QemuBuilder::deliver`), so it is the same for a
//! build that booted and for one whose every step came from the step cache.
//!
//! An object is never replaced: `preflight` refuses a key that exists
//! before anything is built, and the step checks again just before it
//! uploads. A failed or interrupted upload leaves nothing behind: the store
//! aborts its multipart upload, and cleanup removes what this step already
//! stored, so the same version can be delivered again.
//!
//! Uses `state.artifact` (the tested image and `details.checksum_file`).
//! Produces `state.artifact` with `details.upload`.

use super::QemuState;
use super::config::UploadLocation;
use super::kind::QemuResource;
use crate::common::artifact::{checksum_line, checksum_path};
use crate::common::object_store::{ObjectStore, ObjectStoreError, S3Options, S3Store};
use crate::common::orphans::Removal;
use crate::common::tracked::{record, release};
use async_trait::async_trait;
use imgbuild_core::{CleanupOutcome, ResourceId, Step, StepContext, StepError};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// The store at `location`, with the standard AWS chain and the endpoint
/// override (`AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`).
async fn open(location: &UploadLocation) -> Result<S3Store, String> {
    S3Store::open(&location.to_string(), S3Options::default())
        .await
        .map_err(|err| format!("`upload = \"{location}\"`: {err}"))
}

/// Why `names` cannot be uploaded to `location`: the bucket is missing or
/// out of reach, or one of the objects already exists. Reads only.
pub async fn preflight(
    location: &UploadLocation,
    names: &[String],
    what: &str,
) -> Result<(), String> {
    let store = open(location).await?;
    store
        .check_bucket()
        .await
        .map_err(|err| format!("cannot upload {what} to {location}: {err}"))?;
    for name in names {
        refuse_existing(&store, location, name, what).await?;
    }
    Ok(())
}

async fn refuse_existing(
    store: &S3Store,
    location: &UploadLocation,
    name: &str,
    what: &str,
) -> Result<(), String> {
    let url = location.url_of(name);
    match store.head(name).await {
        Ok(None) => Ok(()),
        Ok(Some(size)) => Err(format!(
            "{url} already exists ({size} bytes): {what} was uploaded there before, and an upload never replaces an object; bump `image.version`, or remove the object (`aws s3 rm {url}`) if a failed run left it"
        )),
        Err(err) => Err(format!("cannot check that {url} is free: {err}")),
    }
}

pub struct StepUpload {
    location: UploadLocation,
    /// What `preflight` and the messages call the image.
    what: String,
    store: Option<S3Store>,
    /// The key being uploaded, until it is stored whole.
    in_flight: Option<String>,
    /// Keys this step stored, removed again if the delivery fails.
    stored: Vec<String>,
    /// The journal's records of the uploads, so that `imgbuild clean`
    /// finds what a killed run left in the bucket; released once the
    /// delivery is over and nothing of a failed one is left.
    journalled: Vec<ResourceId>,
}

impl StepUpload {
    pub fn new(location: UploadLocation, what: String) -> Self {
        StepUpload {
            location,
            what,
            store: None,
            in_flight: None,
            stored: Vec::new(),
            journalled: Vec::new(),
        }
    }
}

#[async_trait]
impl Step<QemuState> for StepUpload {
    fn name(&self) -> &'static str {
        "upload"
    }

    async fn run(&mut self, state: &mut QemuState, cx: &StepContext) -> Result<(), StepError> {
        let artifact = state
            .artifact
            .as_ref()
            .ok_or_else(|| StepError::failed("no image to upload"))?;
        let image = artifact
            .files
            .first()
            .cloned()
            .ok_or_else(|| StepError::failed("the artifact names no image file"))?;
        let checksum_file = artifact.details["checksum_file"]
            .as_str()
            .map(PathBuf::from)
            .unwrap_or_else(|| checksum_path(&image.path));
        let name = image
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| {
                StepError::failed(format!("{} has no file name", image.path.display()))
            })?;
        let checksum_name = format!("{name}.sha256");

        // What goes up beside the image must vouch for the image as built
        // and tested, not for a file that changed since.
        let checksum_text = std::fs::read_to_string(&checksum_file).map_err(|err| {
            StepError::failed(format!("cannot read {}: {err}", checksum_file.display()))
        })?;
        if checksum_text != checksum_line(&image.sha256, &image.path) {
            return Err(StepError::failed(format!(
                "{} does not hold the image's SHA-256 {} as built and tested; it changed since: nothing was uploaded",
                checksum_file.display(),
                image.sha256
            )));
        }

        let location = self.location.clone();
        let store = open(&location).await.map_err(StepError::failed)?;
        // Checked again: another run may have taken the key since preflight.
        for key in [&name, &checksum_name] {
            refuse_existing(&store, &location, key, &self.what)
                .await
                .map_err(StepError::failed)?;
        }
        self.store = Some(store.clone());

        cx.log.info(format!(
            "uploading {} ({} bytes) to {}",
            image.path.display(),
            image.size,
            location.url_of(&name)
        ));
        let log = cx.log.clone();
        let task = format!("upload {name}");
        let progress = move |done: u64, total: u64| log.progress(&task, done, Some(total));
        self.journal(&name, cx)?;
        self.in_flight = Some(name.clone());
        let uploaded = cx
            .cancellable(async {
                store
                    .upload_file(&name, &image.path, &progress)
                    .await
                    .map_err(|err| StepError::failed(upload_failed(&location, &name, err)))
            })
            .await?;
        self.in_flight = None;
        self.stored.push(name.clone());
        if uploaded.sha256 != image.sha256 || uploaded.size != image.size {
            return Err(StepError::failed(format!(
                "{} changed since it was built and tested (SHA-256 {}, {} bytes then; {}, {} bytes uploaded): the upload is removed again",
                image.path.display(),
                image.sha256,
                image.size,
                uploaded.sha256,
                uploaded.size
            )));
        }

        self.journal(&checksum_name, cx)?;
        self.in_flight = Some(checksum_name.clone());
        let checksum = cx
            .cancellable(async {
                store
                    .upload_file(&checksum_name, &checksum_file, &|_, _| {})
                    .await
                    .map_err(|err| StepError::failed(upload_failed(&location, &checksum_name, err)))
            })
            .await?;
        self.in_flight = None;
        self.stored.push(checksum_name.clone());
        if checksum.sha256 != hex::encode(Sha256::digest(checksum_text.as_bytes())) {
            return Err(StepError::failed(format!(
                "{} changed while it was uploaded: the upload is removed again",
                checksum_file.display()
            )));
        }

        let url = location.url_of(&name);
        cx.log
            .info(format!("uploaded {url} (sha256 {})", image.sha256));
        let record = serde_json::json!({
            "url": url,
            "https_url": store.https_url(&name),
            "size": uploaded.size,
            "sha256": uploaded.sha256,
            "checksum_url": location.url_of(&checksum_name),
        });
        let artifact = state.artifact.as_mut().expect("checked above");
        match &mut artifact.details {
            serde_json::Value::Object(details) => {
                details.insert("upload".to_owned(), record);
            }
            other => *other = serde_json::json!({ "upload": record }),
        }
        Ok(())
    }

    async fn cleanup(
        &mut self,
        state: &mut QemuState,
        cx: &StepContext,
        outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        if outcome == CleanupOutcome::Succeeded {
            return self.release_records(cx);
        }
        let mut left = Vec::new();
        if let Some(store) = self.store.take() {
            left.extend(self.take_back(&store, cx, outcome).await);
        }
        // A version that was not delivered is not recorded; its image is
        // removed too, so that the version can be built again rather than
        // be refused for an output nothing records.
        if let Some(artifact) = &state.artifact {
            cx.log.warn(format!(
                "the upload did not finish, so {} is not recorded: removing {} so that it can be built again",
                self.what, artifact.id
            ));
            if let Err(err) = super::test_run::delete(artifact).await {
                left.push(err.to_string());
            }
        }
        if left.is_empty() {
            self.release_records(cx)
        } else {
            Err(StepError::failed(format!(
                "left behind: {}",
                left.join("; ")
            )))
        }
    }
}

impl StepUpload {
    /// Records the upload of `name` in the run journal before it starts.
    fn journal(&mut self, name: &str, cx: &StepContext) -> Result<(), StepError> {
        let resource = QemuResource::Upload {
            location: self.location.to_string(),
            name: name.to_owned(),
        };
        self.journalled.push(record(cx, resource.into())?);
        Ok(())
    }

    fn release_records(&mut self, cx: &StepContext) -> Result<(), StepError> {
        for id in self.journalled.drain(..) {
            release(cx, id)?;
        }
        Ok(())
    }

    /// Removes what this step put in the bucket; says what it could not.
    async fn take_back(
        &mut self,
        store: &S3Store,
        cx: &StepContext,
        outcome: CleanupOutcome,
    ) -> Vec<String> {
        let mut left = Vec::new();
        // An upload cut off by Ctrl-C was dropped mid-way: the store aborts
        // it in the background, which a process about to exit may not
        // finish. Aborting here, before the run ends, makes sure.
        if let Some(key) = self.in_flight.take()
            && outcome == CleanupOutcome::Cancelled
            && let Err(err) = store.abort_uploads_of(&key).await
        {
            left.push(format!(
                "the unfinished upload of {} ({err}; remove it with `aws s3api list-multipart-uploads --bucket {}` and `abort-multipart-upload`)",
                self.location.url_of(&key),
                store.bucket()
            ));
        }
        for key in self.stored.drain(..).rev() {
            match store.delete(&key).await {
                Ok(()) => cx.log.info(format!(
                    "removed {} again: the delivery did not finish",
                    self.location.url_of(&key)
                )),
                Err(err) => left.push(format!(
                    "{} ({err}; remove it with `aws s3 rm {}`)",
                    self.location.url_of(&key),
                    self.location.url_of(&key)
                )),
            }
        }
        left
    }
}

fn upload_failed(location: &UploadLocation, name: &str, err: ObjectStoreError) -> String {
    let aborted = !matches!(
        err,
        ObjectStoreError::Service {
            operation: "AbortMultipartUpload",
            ..
        }
    );
    format!(
        "uploading {} failed: {err}{}",
        location.url_of(name),
        if aborted {
            " (nothing of it is left in the bucket)"
        } else {
            ""
        }
    )
}

/// Removes what a dead run's upload of `name` to `location` left: its
/// unfinished multipart uploads and the object itself.
pub async fn remove_orphan_upload(location: &str, name: &str) -> Result<Removal, String> {
    let store = S3Store::open(location, S3Options::default())
        .await
        .map_err(|err| format!("cannot open {location}: {err}"))?;
    let open_uploads = store.abort_uploads_of(name).await?;
    let stored = store
        .head(name)
        .await
        .map_err(|err| format!("cannot look for {location}{name}: {err}"))?;
    if stored.is_some() {
        store
            .delete(name)
            .await
            .map_err(|err| format!("cannot remove {location}{name}: {err}"))?;
    }
    Ok(if stored.is_some() || open_uploads > 0 {
        Removal::Removed
    } else {
        Removal::Absent
    })
}
