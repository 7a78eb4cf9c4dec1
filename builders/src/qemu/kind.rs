//! The QEMU builder's entry in the registry. Most of its leftovers are
//! generic journal resources (the QEMU process, work files); its own
//! record is the S3 upload of a delivery (`QemuResource`).

use super::{QemuBuilder, QemuConfig};
use crate::Builder;
use crate::common::orphans::Removal;
use crate::registry::{self, BuilderKind, BuilderKindError, JournalResource};
use async_trait::async_trait;
use imgbuild_core::Resource;
use imgbuild_core::journal::BuilderResource;
use serde::{Deserialize, Serialize};

/// What the QEMU builder records in the run journal itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum QemuResource {
    /// An object a delivery is uploading: `name` under the `upload`
    /// location `location` (`s3://bucket/prefix/`). Recorded before the
    /// upload starts, released once the delivery is over; a dead run's
    /// record means the object, or the parts of its multipart upload, are
    /// that run's and belong to no recorded version.
    #[serde(rename = "qemu_s3_upload")]
    Upload { location: String, name: String },
}

impl JournalResource for QemuResource {
    const BUILDER: &'static str = "qemu";

    fn describe(&self) -> String {
        match self {
            QemuResource::Upload { location, name } => {
                format!("the S3 upload {location}{name}")
            }
        }
    }
}

impl From<QemuResource> for Resource {
    fn from(resource: QemuResource) -> Resource {
        resource.to_resource()
    }
}

pub struct QemuKind;

#[async_trait]
impl BuilderKind for QemuKind {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn summary(&self) -> &'static str {
        "a qcow2 or raw disk image, from a base disk booted under QEMU"
    }

    fn parse(
        &self,
        table: &toml::Spanned<toml::de::DeValue<'_>>,
    ) -> Result<Box<dyn Builder>, BuilderKindError> {
        let config: QemuConfig = registry::deserialize(table)?;
        Ok(Box::new(QemuBuilder::new(config)))
    }

    /// The uploaded object when the image was uploaded (what other
    /// machines read; the local file may be on another runner), else the
    /// local files.
    /// An upload a dead run left: its unfinished multipart uploads are
    /// aborted and the object, if it was stored whole, removed. Its key
    /// holds the version, which no other run can have uploaded (`upload`
    /// refuses an existing key), and which the dead run never recorded.
    async fn clean_orphan(
        &self,
        resource: &BuilderResource,
        _run_id: &str,
    ) -> Result<Removal, String> {
        let QemuResource::Upload { location, name } =
            resource.read::<QemuResource>().map_err(|err| {
                format!(
                    "the journal's record of {} cannot be read by this imgbuild ({err}); clean with the version that wrote it, or remove it by hand",
                    resource.description
                )
            })?;
        super::step_upload::remove_orphan_upload(&location, &name).await
    }

    async fn missing(&self, artifact: &crate::Artifact) -> Result<Vec<String>, String> {
        if let Some(url) = artifact.details["upload"]["url"].as_str() {
            let present = crate::common::object_store::object_size(url)
                .await
                .map_err(|err| format!("cannot check {url}: {err}"))?;
            return Ok(match present {
                Some(_) => Vec::new(),
                None => vec![url.to_owned()],
            });
        }
        Ok(artifact
            .files
            .iter()
            .filter(|file| !file.path.exists())
            .map(|file| file.path.display().to_string())
            .collect())
    }

    async fn retire(
        &self,
        artifact: &crate::Artifact,
        _cx: &imgbuild_core::StepContext,
    ) -> Result<Vec<String>, String> {
        let removed = artifact
            .files
            .iter()
            .flat_map(|file| {
                [
                    file.path.clone(),
                    crate::common::artifact::checksum_path(&file.path),
                ]
            })
            .filter(|path| path.exists())
            .map(|path| path.display().to_string())
            .collect();
        super::test_run::delete(artifact)
            .await
            .map_err(|err| err.to_string())?;
        Ok(removed)
    }
}
