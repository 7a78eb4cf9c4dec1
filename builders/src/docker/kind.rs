//! The Docker builder's entry in the registry, and the resources it records
//! in the run journal.

use super::{DockerBuilder, DockerConfig};
use crate::Builder;
use crate::common::orphans::Removal;
use crate::registry::{
    self, BuilderKind, BuilderKindError, JournalResource, OutputTarget, RecordedArtifact,
};
use async_trait::async_trait;
use imgbuild_core::{BuilderResource, Resource};
use serde::{Deserialize, Serialize};
use serde_json::Value;
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

    /// The version tag's `repository@digest` from `details.pushed`.
    fn output_digest(
        &self,
        artifact: &RecordedArtifact<'_>,
        repository: Option<&str>,
    ) -> Result<String, String> {
        let pushed = pushed_versions(artifact.details, artifact.version);
        if pushed.is_empty() {
            return Err(format!(
                "build {} version {} was not pushed to a registry; set `push` in its docker builder to record a pinned reference",
                artifact.build, artifact.version
            ));
        }
        match repository {
            None => Ok(pushed[0].1.clone()),
            Some(wanted) => pushed
                .iter()
                .find(|(repository, _)| repository == wanted)
                .map(|(_, reference)| reference.clone())
                .ok_or_else(|| {
                    format!(
                        "build {} version {} was not pushed to {wanted}; it was pushed to: {}",
                        artifact.build,
                        artifact.version,
                        pushed
                            .iter()
                            .map(|(repository, _)| repository.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }),
        }
    }

    /// `pushed_reference` (the first repository's), and for Terraform
    /// `pushed_references`, a map by repository.
    fn outputs(
        &self,
        artifact: &RecordedArtifact<'_>,
        target: OutputTarget,
    ) -> Vec<(String, Value)> {
        let pushed = pushed_versions(artifact.details, artifact.version);
        let mut outputs = Vec::new();
        if let Some((_, first)) = pushed.first() {
            outputs.push(("pushed_reference".to_owned(), Value::from(first.clone())));
        }
        if target == OutputTarget::Tfvars && !pushed.is_empty() {
            outputs.push((
                "pushed_references".to_owned(),
                Value::Object(
                    pushed
                        .into_iter()
                        .map(|(repository, reference)| (repository, Value::from(reference)))
                        .collect(),
                ),
            ));
        }
        outputs
    }

    /// A pushed image by its version tag in every registry it went to
    /// (what deployments pull, from wherever the build ran), else the image
    /// in the local engine, or the exported tar.
    async fn missing(&self, artifact: &crate::Artifact) -> Result<Vec<String>, String> {
        use super::kept::Kept;
        let (id, version) = match Kept::of(artifact)? {
            Kept::Nothing => {
                return Ok(vec![format!(
                    "{} (discard = true kept no image)",
                    artifact.id
                )]);
            }
            Kept::Tar { path, .. } => {
                return Ok(if path.exists() {
                    Vec::new()
                } else {
                    vec![path.display().to_string()]
                });
            }
            Kept::Image { id, tags, .. } => (id, tags[0].clone()),
        };
        let pushed = pushed_versions(&artifact.details, &version);
        if pushed.is_empty() {
            let engine = super::engine::Engine::connect().await?;
            return match super::engine::ImageApi::inspect_image(&engine, &id).await {
                Ok(_) => Ok(Vec::new()),
                Err(err) if super::engine::is_not_found(&err) => Ok(vec![id]),
                Err(err) => Err(format!("cannot look for image {id}: {err}")),
            };
        }
        let mut missing = Vec::new();
        for (repository, pinned) in pushed {
            let digest = pinned.rsplit_once('@').map_or("", |(_, digest)| digest);
            let tagged = format!("{repository}:{version}");
            match super::remote::current_digest(&repository, &version).await {
                Ok(Some(now)) if now == digest => {}
                Ok(Some(now)) => {
                    missing.push(format!("{pinned} (the tag {tagged} now names {now})"))
                }
                Ok(None) => missing.push(format!("{pinned} (no tag {tagged})")),
                Err(err) => return Err(format!("cannot look for {tagged}: {err}")),
            }
        }
        Ok(missing)
    }

    async fn retire(
        &self,
        artifact: &crate::Artifact,
        cx: &imgbuild_core::StepContext,
    ) -> Result<Vec<String>, String> {
        use super::kept::Kept;
        let removed = match Kept::of(artifact)? {
            Kept::Nothing => Vec::new(),
            Kept::Image {
                id,
                repository,
                tags,
            } => tags
                .iter()
                .map(|tag| format!("{repository}:{tag}"))
                .chain([id])
                .collect(),
            Kept::Tar {
                path,
                checksum_file,
                ..
            } => vec![
                path.display().to_string(),
                checksum_file.display().to_string(),
            ],
        };
        super::delete::delete(artifact, cx)
            .await
            .map_err(|err| err.to_string())?;
        Ok(removed)
    }
}

/// `(repository, repository@digest)` of the version tag in each repository
/// the image was pushed to, in push order.
fn pushed_versions(details: &Value, version: &str) -> Vec<(String, String)> {
    details["pushed"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|entry| entry["tag"] == version)
        .filter_map(|entry| {
            Some((
                entry["repository"].as_str()?.to_owned(),
                entry["reference"].as_str()?.to_owned(),
            ))
        })
        .collect()
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

    #[test]
    fn the_pinned_reference_is_the_version_tags() {
        let details = serde_json::json!({"pushed": [
            {"repository": "r.example.com/a", "tag": "1.0", "digest": "sha256:aa", "reference": "r.example.com/a@sha256:aa"},
            {"repository": "r.example.com/a", "tag": "latest", "digest": "sha256:aa", "reference": "r.example.com/a@sha256:aa"},
            {"repository": "q.example.com/b", "tag": "1.0", "digest": "sha256:bb", "reference": "q.example.com/b@sha256:bb"},
        ]});
        let artifact = RecordedArtifact {
            build: "app",
            version: "1.0",
            artifact_id: "sha256:id",
            details: &details,
        };
        assert_eq!(
            DockerKind.output_digest(&artifact, None).unwrap(),
            "r.example.com/a@sha256:aa"
        );
        assert_eq!(
            DockerKind
                .output_digest(&artifact, Some("q.example.com/b"))
                .unwrap(),
            "q.example.com/b@sha256:bb"
        );
        let err = DockerKind
            .output_digest(&artifact, Some("x.example.com/c"))
            .unwrap_err();
        assert!(err.contains("r.example.com/a, q.example.com/b"), "{err}");
        let tfvars = DockerKind.outputs(&artifact, OutputTarget::Tfvars);
        assert_eq!(tfvars[0].1, "r.example.com/a@sha256:aa");
        assert_eq!(tfvars[1].1["q.example.com/b"], "q.example.com/b@sha256:bb");
        let unpushed = serde_json::json!({"tags": ["1.0"]});
        let artifact = RecordedArtifact {
            details: &unpushed,
            ..artifact
        };
        assert!(
            DockerKind
                .output_digest(&artifact, None)
                .unwrap_err()
                .contains("set `push`")
        );
        assert!(
            DockerKind
                .outputs(&artifact, OutputTarget::StepOutputs)
                .is_empty()
        );
    }
}
