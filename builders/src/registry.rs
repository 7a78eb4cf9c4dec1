//! Every builder kind imgbuild knows, in one list. Adding a builder is one
//! module implementing [`BuilderKind`] plus one line in [`BUILDERS`]; the
//! config loader, `imgbuild clean` and `imgbuild output` read the list and
//! hold no per-kind code, and the run journal carries each builder's
//! resources as its own serde type (see [`JournalResource`]).

use crate::Builder;
use crate::common::orphans::Removal;
use async_trait::async_trait;
use imgbuild_core::{BuilderResource, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::time::Duration;

/// The builder kinds, in the order help lists them.
pub static BUILDERS: &[&dyn BuilderKind] = &[
    &crate::qemu::kind::QemuKind,
    &crate::docker::kind::DockerKind,
    &crate::ec2::kind::Ec2Kind,
];

/// One `type = "..."` of a `[builders.NAME]` table.
#[async_trait]
pub trait BuilderKind: Sync {
    /// The `type` in the config, and the name the journal files this
    /// kind's resources under.
    fn name(&self) -> &'static str;

    /// One line for help and error messages.
    fn summary(&self) -> &'static str;

    /// Builds the builder from its table (templates already rendered,
    /// `type` removed). Unknown fields are errors, reported by the
    /// deserializer with their location.
    fn parse(
        &self,
        table: &toml::Spanned<toml::de::DeValue<'_>>,
    ) -> Result<Box<dyn Builder>, BuilderKindError>;

    /// How long after its record a resource of this kind whose creating
    /// call never returned may still appear: remote calls are finished by
    /// the server even after the client died.
    fn creation_grace(&self) -> Duration {
        Duration::ZERO
    }

    /// Removes a resource of this kind that the dead run `run_id` left
    /// behind, from its journal record alone, and says what it found.
    async fn clean_orphan(
        &self,
        resource: &BuilderResource,
        run_id: &str,
    ) -> Result<Removal, String> {
        let _ = run_id;
        Err(format!(
            "{}: the {} builder records no resources of its own, so this record was written by another version of imgbuild; remove it by hand",
            resource.description,
            self.name()
        ))
    }

    /// Removes a recorded artifact of this kind (`imgbuild retire`), from
    /// its record alone, and lists what it removed. What is already gone
    /// counts as removed, so a retirement that failed part way can be run
    /// again. Remote resources are journalled through `cx` before they are
    /// touched.
    async fn retire(
        &self,
        artifact: &crate::Artifact,
        cx: &imgbuild_core::StepContext,
    ) -> Result<Vec<String>, String> {
        let _ = cx;
        Err(format!(
            "the {} builder cannot remove its artifacts ({}); remove it by hand",
            self.name(),
            artifact.id
        ))
    }

    /// What of a recorded artifact is gone (a file removed by hand, a tag
    /// deleted from its registry, an AMI deregistered), so that `imgbuild
    /// promote` never points a channel at something that cannot start;
    /// empty when all of it is there. A kind that cannot look lists
    /// nothing.
    async fn missing(&self, artifact: &crate::Artifact) -> Result<Vec<String>, String> {
        let _ = artifact;
        Ok(Vec::new())
    }

    /// Whether [`BuilderKind::publish_channel`] does anything for this
    /// kind.
    fn publishes_channels(&self) -> bool {
        false
    }

    /// Publishes the artifact as what a channel hands out, under
    /// `parameter` (an SSM parameter for AMIs), and lists what it set.
    async fn publish_channel(
        &self,
        artifact: &RecordedArtifact<'_>,
        parameter: &str,
    ) -> Result<Vec<String>, String> {
        let _ = parameter;
        Err(format!(
            "build {}: {} artifacts cannot be published as SSM parameters, only EC2 AMIs",
            artifact.build,
            self.name()
        ))
    }

    /// What `imgbuild output` prints for an artifact of this kind: its
    /// artifact id, and with `--region` its copy there for kinds whose
    /// artifacts live in regions.
    fn output_id(
        &self,
        artifact: &RecordedArtifact<'_>,
        region: Option<&str>,
    ) -> Result<String, String> {
        match region {
            Some(region) => Err(format!(
                "--region {region} does not apply to build {}: {} artifacts are not kept per region",
                artifact.build,
                self.name()
            )),
            None => Ok(artifact.artifact_id.to_owned()),
        }
    }

    /// The pinned reference (`repository@sha256:...`) an artifact of this
    /// kind was pushed as, for `imgbuild output --format digest`: of
    /// `repository` when given, else of the first repository it went to.
    /// Only kinds that push to registries have one.
    fn output_digest(
        &self,
        artifact: &RecordedArtifact<'_>,
        repository: Option<&str>,
    ) -> Result<String, String> {
        let _ = repository;
        Err(format!(
            "build {} is a {} build, whose artifacts are not pushed to a registry: --format digest applies to Docker builds with `push`",
            artifact.build,
            self.name()
        ))
    }

    /// Named values besides `<build>_version` and `<build>_artifact_id` for
    /// the next tool; each name is prefixed with `<build>_`.
    fn outputs(
        &self,
        artifact: &RecordedArtifact<'_>,
        target: OutputTarget,
    ) -> Vec<(String, Value)> {
        let _ = (artifact, target);
        Vec::new()
    }
}

/// Why a known kind could not make a builder.
#[derive(Debug)]
pub enum BuilderKindError {
    /// This imgbuild was built without the kind (a cargo feature); says how
    /// to get it.
    NotCompiledIn(&'static str),
    /// The table does not deserialize: an unknown field, a wrong type.
    Invalid(toml::de::Error),
}

/// An artifact as the manifest recorded it.
#[derive(Debug, Clone, Copy)]
pub struct RecordedArtifact<'a> {
    /// The build's name in the config.
    pub build: &'a str,
    /// The image version it is of.
    pub version: &'a str,
    pub artifact_id: &'a str,
    /// The builder-specific facts the build recorded.
    pub details: &'a Value,
}

/// Where named outputs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputTarget {
    /// A Terraform `*.auto.tfvars.json` document: values may be maps.
    Tfvars,
    /// GitHub Actions step outputs: one line each.
    StepOutputs,
}

/// The kind named `name`, if imgbuild has it.
pub fn find(name: &str) -> Option<&'static dyn BuilderKind> {
    BUILDERS.iter().copied().find(|kind| kind.name() == name)
}

/// Every kind's name, in registry order.
pub fn names() -> Vec<&'static str> {
    BUILDERS.iter().map(|kind| kind.name()).collect()
}

/// Deserializes a kind's config type, the first thing every kind does.
pub fn deserialize<T: DeserializeOwned>(
    table: &toml::Spanned<toml::de::DeValue<'_>>,
) -> Result<T, BuilderKindError> {
    T::deserialize(toml::de::ValueDeserializer::from(table.clone()))
        .map_err(BuilderKindError::Invalid)
}

/// A builder's own record of a resource it creates, carried opaquely in the
/// run journal as [`Resource::Builder`] and handed back to that builder's
/// [`BuilderKind::clean_orphan`].
pub trait JournalResource: Serialize + DeserializeOwned {
    /// The builder kind's name: the registry entry that removes it.
    const BUILDER: &'static str;

    /// One line naming it, for `imgbuild clean`.
    fn describe(&self) -> String;

    fn to_resource(&self) -> Resource {
        Resource::Builder(BuilderResource {
            builder: Self::BUILDER.to_owned(),
            description: self.describe(),
            data: serde_json::to_value(self).expect("journal resources always serialize"),
        })
    }

    /// This builder's record in `resource`. `None` for anything else: a
    /// generic resource or another builder's.
    fn from_resource(resource: &Resource) -> Option<Result<Self, String>> {
        let Resource::Builder(resource) = resource else {
            return None;
        };
        if resource.builder != Self::BUILDER {
            return None;
        }
        Some(resource.read().map_err(|err| {
            format!(
                "the journal's record of {} cannot be read by this imgbuild ({err}); it was written by another version: clean with that version, or remove it by hand",
                resource.description
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_unique_and_found() {
        let mut names = names();
        for name in &names {
            let kind = find(name).unwrap_or_else(|| panic!("`{name}` is listed but not found"));
            assert_eq!(kind.name(), *name);
            assert!(!kind.summary().is_empty(), "`{name}` has no summary");
        }
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a builder kind is listed twice");
        assert!(find("nimbus").is_none());
    }

    #[test]
    fn ec2_is_known_with_or_without_its_feature() {
        let kind = find("ec2").expect("ec2 is always registered");
        let table = toml::de::DeTable::parse("instance_type = 't3.micro'").unwrap();
        let table = toml::Spanned::new(table.span(), toml::de::DeValue::Table(table.into_inner()));
        let parsed = kind.parse(&table);
        if cfg!(feature = "ec2") {
            // It gets as far as the fields: a missing source AMI, say.
            assert!(!matches!(parsed, Err(BuilderKindError::NotCompiledIn(_))));
        } else {
            match parsed {
                Err(BuilderKindError::NotCompiledIn(message)) => {
                    assert!(message.contains("`ec2` feature"), "{message}")
                }
                _ => panic!("expected NotCompiledIn"),
            }
        }
    }
}
