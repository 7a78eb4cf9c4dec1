//! The QEMU builder's entry in the registry. Its leftovers are generic
//! journal resources (the QEMU process, work files), so it keeps the
//! default cleaning.

use super::{QemuBuilder, QemuConfig};
use crate::Builder;
use crate::registry::{self, BuilderKind, BuilderKindError};
use async_trait::async_trait;

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
