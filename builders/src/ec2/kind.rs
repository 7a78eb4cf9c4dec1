//! The EC2 builder's entry in the registry, the resources it records in the
//! run journal, and what `imgbuild output` hands on for an AMI.
//!
//! This module is compiled without the `ec2` feature too (see `lib.rs`), so
//! such an imgbuild still recognises `type = "ec2"` and says how to get it,
//! names EC2 leftovers in a journal, and reads EC2 entries of a manifest.

use crate::Builder;
use crate::common::orphans::Removal;
use crate::registry::{
    BuilderKind, BuilderKindError, JournalResource, OutputTarget, RecordedArtifact,
};
use async_trait::async_trait;
use imgbuild_core::{BuilderResource, Resource};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

pub struct Ec2Kind;

#[async_trait]
impl BuilderKind for Ec2Kind {
    fn name(&self) -> &'static str {
        "ec2"
    }

    fn summary(&self) -> &'static str {
        "an EBS-backed AMI, from an instance of a source AMI, copied and shared as asked"
    }

    fn parse(
        &self,
        table: &toml::Spanned<toml::de::DeValue<'_>>,
    ) -> Result<Box<dyn Builder>, BuilderKindError> {
        #[cfg(feature = "ec2")]
        {
            let config: super::Ec2Config = crate::registry::deserialize(table)?;
            Ok(Box::new(super::Ec2Builder::new(config)))
        }
        #[cfg(not(feature = "ec2"))]
        {
            let _ = table;
            Err(BuilderKindError::NotCompiledIn(
                "this imgbuild was compiled without the `ec2` feature; rebuild with default features",
            ))
        }
    }

    /// EC2 finishes a RunInstances, CreateImage or CopyImage it accepted
    /// whether or not the caller is still there.
    fn creation_grace(&self) -> Duration {
        Duration::from_secs(2 * 60)
    }

    async fn clean_orphan(
        &self,
        resource: &BuilderResource,
        run_id: &str,
    ) -> Result<Removal, String> {
        #[cfg(feature = "ec2")]
        {
            super::clean_orphan(&Resource::Builder(resource.clone()), run_id).await
        }
        #[cfg(not(feature = "ec2"))]
        {
            let _ = run_id;
            Err(format!(
                "{} cannot be removed: this imgbuild was compiled without the `ec2` feature",
                resource.description
            ))
        }
    }

    /// Deregisters the AMI and deletes its snapshots in every region the
    /// record lists (the endpoint from `AWS_ENDPOINT_URL_EC2` /
    /// `AWS_ENDPOINT_URL`, as for any SDK client).
    async fn retire(
        &self,
        artifact: &crate::Artifact,
        cx: &imgbuild_core::StepContext,
    ) -> Result<Vec<String>, String> {
        #[cfg(feature = "ec2")]
        {
            super::retire(artifact, cx).await
        }
        #[cfg(not(feature = "ec2"))]
        {
            let _ = cx;
            Err(format!(
                "{} cannot be removed: this imgbuild was compiled without the `ec2` feature",
                artifact.id
            ))
        }
    }

    async fn missing(&self, artifact: &crate::Artifact) -> Result<Vec<String>, String> {
        #[cfg(feature = "ec2")]
        {
            super::missing(artifact).await
        }
        #[cfg(not(feature = "ec2"))]
        {
            let _ = artifact;
            Ok(Vec::new())
        }
    }

    fn publishes_channels(&self) -> bool {
        true
    }

    async fn publish_channel(
        &self,
        artifact: &RecordedArtifact<'_>,
        parameter: &str,
    ) -> Result<Vec<String>, String> {
        #[cfg(feature = "ec2")]
        {
            super::publish_channel(artifact, parameter).await
        }
        #[cfg(not(feature = "ec2"))]
        {
            let _ = parameter;
            Err(format!(
                "{} cannot be published: this imgbuild was compiled without the `ec2` feature",
                artifact.artifact_id
            ))
        }
    }

    /// The AMI id in `region`, by default the build's own.
    fn output_id(
        &self,
        artifact: &RecordedArtifact<'_>,
        region: Option<&str>,
    ) -> Result<String, String> {
        let amis = amis(artifact.details);
        let region = match region {
            Some(region) => region.to_owned(),
            None => home_region(artifact.details)
                .ok_or_else(|| "the entry names no region".to_owned())?,
        };
        amis.get(&region).cloned().ok_or_else(|| {
            format!(
                "build {} version {} has no AMI in {region}; it has AMIs in: {}",
                artifact.build,
                artifact.version,
                amis.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// `ami_id` (the build's own region) and, for Terraform, `ami_ids` (a
    /// map by region); step outputs are single values, so there one
    /// `ami_id_<region>` each.
    fn outputs(
        &self,
        artifact: &RecordedArtifact<'_>,
        target: OutputTarget,
    ) -> Vec<(String, Value)> {
        let amis = amis(artifact.details);
        let mut outputs = Vec::new();
        if let Ok(home) = self.output_id(artifact, None) {
            outputs.push(("ami_id".to_owned(), Value::from(home)));
        }
        match target {
            OutputTarget::Tfvars => outputs.push((
                "ami_ids".to_owned(),
                Value::Object(
                    amis.into_iter()
                        .map(|(region, id)| (region, id.into()))
                        .collect(),
                ),
            )),
            OutputTarget::StepOutputs => outputs.extend(
                amis.into_iter()
                    .map(|(region, id)| (format!("ami_id_{region}"), Value::from(id))),
            ),
        }
        outputs
    }
}

/// AMI ids by region, as the build recorded them.
fn amis(details: &Value) -> BTreeMap<String, String> {
    details
        .get("amis")
        .and_then(Value::as_object)
        .map(|amis| {
            amis.iter()
                .filter_map(|(region, id)| Some((region.clone(), id.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// The build's own region.
fn home_region(details: &Value) -> Option<String> {
    details
        .get("region")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// What the EC2 builder records in the run journal. Each names its region
/// and endpoint, so `imgbuild clean` reaches it from the record alone; the
/// names keep the builder's prefix so that a journal line or a `clean`
/// event says what it is on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Ec2Resource {
    /// Launched with `client_token`; its id once RunInstances answered.
    #[serde(rename = "ec2_instance")]
    Instance {
        region: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint_url: Option<String>,
        client_token: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance_id: Option<String>,
    },
    #[serde(rename = "ec2_key_pair")]
    KeyPair {
        region: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint_url: Option<String>,
        name: String,
    },
    #[serde(rename = "ec2_security_group")]
    SecurityGroup {
        region: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint_url: Option<String>,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group_id: Option<String>,
    },
    /// An AMI being made under `name`, with its snapshots.
    #[serde(rename = "ec2_image")]
    Image {
        region: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint_url: Option<String>,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image_id: Option<String>,
    },
}

impl Ec2Resource {
    /// Where it lives: the region, and the endpoint when not AWS's own.
    pub fn place(&self) -> (&str, Option<&str>) {
        let (Ec2Resource::Instance {
            region,
            endpoint_url,
            ..
        }
        | Ec2Resource::KeyPair {
            region,
            endpoint_url,
            ..
        }
        | Ec2Resource::SecurityGroup {
            region,
            endpoint_url,
            ..
        }
        | Ec2Resource::Image {
            region,
            endpoint_url,
            ..
        }) = self;
        (region, endpoint_url.as_deref())
    }
}

impl JournalResource for Ec2Resource {
    const BUILDER: &'static str = "ec2";

    fn describe(&self) -> String {
        match self {
            Ec2Resource::Instance {
                region,
                client_token,
                instance_id,
                ..
            } => match instance_id {
                Some(id) => format!("EC2 instance {id} in {region}"),
                None => format!("EC2 instance with client token {client_token} in {region}"),
            },
            Ec2Resource::KeyPair { region, name, .. } => {
                format!("EC2 key pair {name} in {region}")
            }
            Ec2Resource::SecurityGroup { region, name, .. } => {
                format!("EC2 security group {name} in {region}")
            }
            Ec2Resource::Image {
                region,
                name,
                image_id,
                ..
            } => match image_id {
                Some(id) => format!("AMI {id} ({name}) in {region}"),
                None => format!("AMI named {name} in {region}"),
            },
        }
    }
}

impl From<Ec2Resource> for Resource {
    fn from(resource: Ec2Resource) -> Resource {
        resource.to_resource()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_round_trip_through_the_journal_form() {
        let endpoint = Some("http://127.0.0.1:5055".to_owned());
        for resource in [
            Ec2Resource::Instance {
                region: "eu-west-1".into(),
                endpoint_url: endpoint.clone(),
                client_token: "token".into(),
                instance_id: None,
            },
            Ec2Resource::Instance {
                region: "eu-west-1".into(),
                endpoint_url: None,
                client_token: "token".into(),
                instance_id: Some("i-1".into()),
            },
            Ec2Resource::KeyPair {
                region: "eu-west-1".into(),
                endpoint_url: endpoint.clone(),
                name: "imgbuild-key".into(),
            },
            Ec2Resource::SecurityGroup {
                region: "eu-west-1".into(),
                endpoint_url: endpoint.clone(),
                name: "imgbuild-sg".into(),
                group_id: Some("sg-1".into()),
            },
            Ec2Resource::Image {
                region: "us-east-1".into(),
                endpoint_url: endpoint.clone(),
                name: "web-1.0.0".into(),
                image_id: None,
            },
        ] {
            let opaque = Resource::from(resource.clone());
            let line = serde_json::to_string(&opaque).unwrap();
            let back: Resource = serde_json::from_str(&line).unwrap();
            assert_eq!(back.describe(), resource.describe());
            assert_eq!(
                Ec2Resource::from_resource(&back).unwrap().unwrap(),
                resource,
                "{line}"
            );
        }
        assert!(crate::registry::find(Ec2Resource::BUILDER).is_some());
    }

    #[test]
    fn another_builders_record_is_not_taken_for_one_of_ours() {
        let docker = Resource::Builder(BuilderResource {
            builder: "docker".into(),
            description: "docker container x".into(),
            data: serde_json::json!({"kind": "docker_container", "name": "x"}),
        });
        assert!(Ec2Resource::from_resource(&docker).is_none());
        // Ours by name, but of a shape this version does not know.
        let future = Resource::Builder(BuilderResource {
            builder: "ec2".into(),
            description: "EC2 elastic IP 1.2.3.4".into(),
            data: serde_json::json!({"kind": "ec2_elastic_ip", "ip": "1.2.3.4"}),
        });
        let err = Ec2Resource::from_resource(&future).unwrap().unwrap_err();
        assert!(
            err.contains("EC2 elastic IP 1.2.3.4") && err.contains("another version"),
            "{err}"
        );
    }
}
