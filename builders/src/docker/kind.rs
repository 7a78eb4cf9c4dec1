//! The Docker builder's entry in the registry, and the resources it records
//! in the run journal.

use super::{DockerBuilder, DockerConfig};
use crate::Builder;
use crate::common::orphans::Removal;
use crate::registry::{self, BuilderKind, BuilderKindError, JournalResource};
use async_trait::async_trait;
use imgbuild_core::{BuilderResource, Resource};
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub struct DockerKind;

#[async_trait]
impl BuilderKind for DockerKind {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn summary(&self) -> &'static str {
        "a tagged Docker image (or a filesystem tar), from a container provisioned through the Engine API"
    }

    fn parse(
        &self,
        table: &toml::Spanned<toml::de::DeValue<'_>>,
    ) -> Result<Box<dyn Builder>, BuilderKindError> {
        let config: DockerConfig = registry::deserialize(table)?;
        Ok(Box::new(DockerBuilder::new(config)))
    }

    /// An engine on the vfs driver copies the whole image for a container
    /// create, and goes on with it after the client died.
    fn creation_grace(&self) -> Duration {
        Duration::from_secs(5 * 60)
    }

    async fn clean_orphan(
        &self,
        resource: &BuilderResource,
        run_id: &str,
    ) -> Result<Removal, String> {
        super::clean_orphan(&Resource::Builder(resource.clone()), run_id).await
    }
}

/// What the Docker builder records in the run journal. The names keep the
/// builder's prefix so that a journal line or a `clean` event says what it
/// is on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum DockerResource {
    /// The build container, by its deterministic name; removed only when
    /// it carries the run's id.
    #[serde(rename = "docker_container")]
    Container { name: String },
    /// A committed image: its temporary tag, then its id.
    #[serde(rename = "docker_image")]
    Image { reference: String },
}

impl JournalResource for DockerResource {
    const BUILDER: &'static str = "docker";

    fn describe(&self) -> String {
        match self {
            DockerResource::Container { name } => format!("docker container {name}"),
            DockerResource::Image { reference } => format!("docker image {reference}"),
        }
    }
}

impl From<DockerResource> for Resource {
    fn from(resource: DockerResource) -> Resource {
        resource.to_resource()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_round_trip_through_the_journal_form() {
        for resource in [
            DockerResource::Container {
                name: "imgbuild-0123-box".into(),
            },
            DockerResource::Image {
                reference: "sha256:abc".into(),
            },
        ] {
            let opaque = Resource::from(resource.clone());
            let line = serde_json::to_string(&opaque).unwrap();
            let back: Resource = serde_json::from_str(&line).unwrap();
            assert_eq!(back.describe(), resource.describe());
            assert_eq!(
                DockerResource::from_resource(&back).unwrap().unwrap(),
                resource,
                "{line}"
            );
            assert!(
                registry::find(DockerResource::BUILDER).is_some(),
                "the journal names a registered kind"
            );
        }
        let file = Resource::File {
            path: "/tmp/x".into(),
        };
        assert!(DockerResource::from_resource(&file).is_none());
    }
}
