//! The in-toto statement (v1) with a SLSA provenance (v1) predicate for
//! one recorded version, made from its manifest entry and the few inputs
//! the entry does not hold (the config file's digest, the non-sensitive
//! variables). It is a pure function of those, so `imgbuild verify` makes
//! it again from the entry and compares.
//!
//! Only what never changes once a version is recorded goes in: the test
//! verdict, channels, revocation and retirement are left out, since
//! `imgbuild test` and the catalog commands change them later.

use crate::manifest::Entry;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// How to read `buildDefinition` (README, "Provenance and signing"). A URN:
/// imgbuild publishes no web page to point a URL at.
pub const BUILD_TYPE: &str = "urn:imgbuild:build-type:image:v1";
/// The build platform: imgbuild run by whoever holds the signing key.
pub const BUILDER_ID: &str = "urn:imgbuild:builder:local";
/// The digest "algorithm" of an AMI subject: the AMI id itself. AWS never
/// reuses an id and an AMI's snapshots cannot change, so the id names
/// immutable contents (the in-toto DigestSet allows such identifiers).
pub const AMI_DIGEST: &str = "awsAmiId";

/// What the statement needs beyond the manifest entry: the build's
/// external parameters a user chose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalInputs {
    pub config: ConfigFile,
    /// Non-sensitive variables with their values; sensitive ones are left
    /// out entirely (not even their names' values masked in).
    pub variables: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigFile {
    pub path: String,
    pub sha256: String,
}

/// The statement for `entry`.
pub fn statement(entry: &Entry, inputs: &ExternalInputs) -> Value {
    json!({
        "_type": STATEMENT_TYPE,
        "subject": subjects(entry),
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "config": inputs.config,
                    "image": {"name": entry.image.name, "version": entry.image.version},
                    "build": {"name": entry.build.name, "type": entry.build.kind},
                    "variables": inputs.variables,
                },
                "internalParameters": {
                    "inputsSha256": entry.inputs_sha256,
                },
                "resolvedDependencies": resolved_dependencies(entry),
            },
            "runDetails": {
                "builder": {
                    "id": BUILDER_ID,
                    "version": {"imgbuild": entry.imgbuild_version},
                },
                "metadata": {
                    "invocationId": entry.run_id,
                    "startedOn": entry.started_at,
                    "finishedOn": entry.finished_at,
                },
            },
        },
    })
}

/// The external inputs a statement records, read back from it.
pub fn external_inputs(statement: &Value) -> Option<ExternalInputs> {
    let parameters = &statement["predicate"]["buildDefinition"]["externalParameters"];
    Some(ExternalInputs {
        config: serde_json::from_value(parameters.get("config")?.clone()).ok()?,
        variables: serde_json::from_value(parameters.get("variables")?.clone()).ok()?,
    })
}

fn file_name(path: &std::path::Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// `sha256:<hex>` (or bare hex) as its hex, when it is a SHA-256.
fn sha256_hex(digest: &str) -> Option<String> {
    let hex = digest.rsplit('@').next()?;
    let hex = hex.strip_prefix("sha256:").unwrap_or(hex);
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_lowercase())
}

/// The artifact's digests: files by name and SHA-256; a committed Docker
/// image by its image id (the SHA-256 of its config) and every pushed
/// manifest by its digest; AMIs per region by id, with their snapshots;
/// uploaded objects by URL and SHA-256.
pub fn subjects(entry: &Entry) -> Vec<Value> {
    let mut subjects: Vec<Value> = entry
        .files
        .iter()
        .map(|file| json!({"name": file_name(&file.path), "digest": {"sha256": file.sha256}}))
        .collect();
    let details = &entry.details;
    if let Some(id) = details["image_id"].as_str().and_then(sha256_hex) {
        let name = details["references"][0]
            .as_str()
            .or(details["repository"].as_str())
            .unwrap_or(&entry.artifact_id);
        subjects.push(json!({
            "name": name,
            "digest": {"sha256": id},
            "annotations": {"imgbuild.digestOf": "docker image config (image id)"},
        }));
    }
    for pushed in details["pushed"].as_array().into_iter().flatten() {
        let Some(digest) = pushed["digest"].as_str().and_then(sha256_hex) else {
            continue;
        };
        let name = pushed["repository"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| {
                pushed["reference"]
                    .as_str()
                    .and_then(|r| r.split('@').next())
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "_".to_owned());
        subjects.push(json!({
            "name": name,
            "digest": {"sha256": digest},
            "annotations": {"imgbuild.digestOf": "pushed image manifest"},
        }));
    }
    for (key, url_field) in [("uploads", "url"), ("uploaded", "url")] {
        for object in details[key].as_array().into_iter().flatten() {
            let (Some(url), Some(sha256)) = (
                object[url_field].as_str().or(object["uri"].as_str()),
                object["sha256"].as_str().and_then(sha256_hex),
            ) else {
                continue;
            };
            subjects.push(json!({"name": url, "uri": url, "digest": {"sha256": sha256}}));
        }
    }
    if let Some(amis) = details["amis"].as_object() {
        for (region, ami) in amis {
            let Some(ami) = ami.as_str() else { continue };
            let snapshots = details["snapshots"][region].clone();
            subjects.push(json!({
                "name": format!("{region}:{ami}"),
                "uri": format!("arn:aws:ec2:{region}::image/{ami}"),
                "digest": {AMI_DIGEST: ami},
                "annotations": {"snapshotIds": if snapshots.is_null() { json!([]) } else { snapshots }},
            }));
        }
    }
    subjects
}

/// The base with its identity, every file the provisioners read with its
/// SHA-256 (once each, however many steps read it), and the commit the
/// config was checked out at.
fn resolved_dependencies(entry: &Entry) -> Vec<Value> {
    let source = &entry.source;
    let mut digest = serde_json::Map::new();
    if let Some(sha256) = source.sha256.as_deref().and_then(sha256_hex) {
        digest.insert("sha256".into(), sha256.into());
    }
    if source.kind == "ami"
        && let Some(ami) = source.reference.rsplit(':').next()
    {
        digest.insert(AMI_DIGEST.into(), ami.into());
    }
    let mut base = json!({
        "name": source.reference,
        "digest": digest,
        "annotations": {"imgbuild.role": "base", "imgbuild.kind": source.kind},
    });
    if source.kind == "url" {
        base["uri"] = source.reference.clone().into();
    }
    let mut dependencies = vec![base];

    let files: BTreeMap<&str, &str> = entry
        .steps
        .iter()
        .flat_map(|step| step.files.iter())
        .map(|(name, sha256)| (name.as_str(), sha256.as_str()))
        .collect();
    dependencies.extend(files.into_iter().map(|(name, sha256)| {
        json!({
            "name": name,
            "digest": {"sha256": sha256},
            "annotations": {"imgbuild.role": "provisioner input"},
        })
    }));
    if let Some(commit) = &entry.git_commit {
        dependencies.push(json!({
            "name": "config repository",
            "digest": {"gitCommit": commit},
            "annotations": {"imgbuild.role": "source"},
        }));
    }
    dependencies
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::keys::StepRecord;
    use imgbuild_builders::{ArtifactFile, SourceIdentity};

    fn entry() -> Entry {
        let mut entry = crate::manifest::tests::entry("vm", "1.2.3");
        entry.files = vec![ArtifactFile {
            path: "/out/web-1.2.3.qcow2".into(),
            size: 3,
            sha256: "a".repeat(64),
        }];
        entry.source = SourceIdentity {
            kind: "file".into(),
            reference: "/bases/debian.qcow2".into(),
            sha256: Some("b".repeat(64)),
        };
        let step = |files: &[(&str, &str)]| StepRecord {
            provisioner: "shell".into(),
            key: None,
            config: json!({}),
            files: files
                .iter()
                .map(|(n, h)| (n.to_string(), h.to_string()))
                .collect(),
            uncacheable: None,
        };
        entry.steps = vec![
            step(&[("setup.sh", &"c".repeat(64))]),
            step(&[
                ("setup.sh", &"c".repeat(64)),
                ("files/app.conf", &"d".repeat(64)),
            ]),
        ];
        entry.git_commit = Some("e".repeat(40));
        entry.run_id = "run-7".into();
        entry.started_at = "2026-12-01T10:00:00Z".into();
        entry.finished_at = "2026-12-01T10:05:00Z".into();
        entry
    }

    fn inputs() -> ExternalInputs {
        ExternalInputs {
            config: ConfigFile {
                path: "/src/image.toml".into(),
                sha256: "f".repeat(64),
            },
            variables: [("mirror".to_owned(), "http://deb".to_owned())].into(),
        }
    }

    #[test]
    fn the_statement_carries_subjects_definition_and_run_details() {
        let statement = statement(&entry(), &inputs());
        assert_eq!(statement["_type"], STATEMENT_TYPE);
        assert_eq!(statement["predicateType"], PREDICATE_TYPE);
        assert_eq!(
            statement["subject"],
            json!([{"name": "web-1.2.3.qcow2", "digest": {"sha256": "a".repeat(64)}}])
        );
        let definition = &statement["predicate"]["buildDefinition"];
        assert_eq!(definition["buildType"], BUILD_TYPE);
        let external = &definition["externalParameters"];
        assert_eq!(external["config"]["sha256"], "f".repeat(64));
        assert_eq!(external["variables"], json!({"mirror": "http://deb"}));
        assert_eq!(external["build"]["name"], "vm");
        assert_eq!(external["image"]["version"], "1.2.3");

        let dependencies = definition["resolvedDependencies"].as_array().unwrap();
        assert_eq!(dependencies[0]["name"], "/bases/debian.qcow2");
        assert_eq!(dependencies[0]["digest"]["sha256"], "b".repeat(64));
        // setup.sh is read by two steps and listed once.
        let names: Vec<&str> = dependencies
            .iter()
            .map(|d| d["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "/bases/debian.qcow2",
                "files/app.conf",
                "setup.sh",
                "config repository"
            ]
        );
        assert_eq!(dependencies[3]["digest"]["gitCommit"], "e".repeat(40));

        let run = &statement["predicate"]["runDetails"];
        assert_eq!(run["builder"]["id"], BUILDER_ID);
        assert_eq!(run["metadata"]["invocationId"], "run-7");
        assert_eq!(run["metadata"]["startedOn"], "2026-12-01T10:00:00Z");
        assert_eq!(run["metadata"]["finishedOn"], "2026-12-01T10:05:00Z");

        assert_eq!(external_inputs(&statement), Some(inputs()));
    }

    #[test]
    fn later_changes_to_the_entry_leave_the_statement_alone_and_identities_do_not() {
        let before = statement(&entry(), &inputs());
        let mut retested = entry();
        retested.status = crate::manifest::EntryStatus::Failed;
        retested.retested_at = Some("later".into());
        assert_eq!(statement(&retested, &inputs()), before);

        let mut other = entry();
        other.files[0].sha256 = "0".repeat(64);
        assert_ne!(statement(&other, &inputs()), before);
    }

    #[test]
    fn images_and_amis_are_named_by_their_immutable_identities() {
        let mut docker = entry();
        docker.files.clear();
        docker.details = json!({
            "image_id": format!("sha256:{}", "1".repeat(64)),
            "repository": "web",
            "references": ["web:1.2.3", "web:latest"],
            "pushed": [{"repository": "127.0.0.1:5000/team/web", "digest": format!("sha256:{}", "2".repeat(64))}],
        });
        let subjects = subjects(&docker);
        assert_eq!(subjects.len(), 2);
        assert_eq!(subjects[0]["name"], "web:1.2.3");
        assert_eq!(subjects[0]["digest"]["sha256"], "1".repeat(64));
        assert_eq!(subjects[1]["name"], "127.0.0.1:5000/team/web");
        assert_eq!(subjects[1]["digest"]["sha256"], "2".repeat(64));

        let mut ec2 = entry();
        ec2.files.clear();
        ec2.details = json!({
            "amis": {"eu-west-1": "ami-1", "us-east-1": "ami-2"},
            "snapshots": {"eu-west-1": ["snap-1"], "us-east-1": ["snap-2"]},
        });
        let subjects = super::subjects(&ec2);
        assert_eq!(subjects[0]["name"], "eu-west-1:ami-1");
        assert_eq!(subjects[0]["digest"][AMI_DIGEST], "ami-1");
        assert_eq!(subjects[0]["uri"], "arn:aws:ec2:eu-west-1::image/ami-1");
        assert_eq!(subjects[1]["annotations"]["snapshotIds"], json!(["snap-2"]));
    }
}
