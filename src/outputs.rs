//! Handing artifacts to the next tool: the latest artifact of a build as a
//! bare id for scripts, a Terraform variables file, and GitHub Actions step
//! outputs.

use crate::manifest::{Entry, EntryStatus, Manifest};
use imgbuild_builders::registry::{self, OutputTarget, RecordedArtifact};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// The most recent entry of each build in the manifest (entries are
/// appended in the order builds finished), of `image` only when given.
pub fn latest_by_build<'a>(
    manifest: &'a Manifest,
    image: Option<&str>,
) -> BTreeMap<String, &'a Entry> {
    let mut latest = BTreeMap::new();
    for entry in &manifest.builds {
        if image.is_none_or(|image| entry.image.name == image) {
            latest.insert(entry.build.name.clone(), entry);
        }
    }
    latest
}

/// The entries of the version `channel` of `image` hands out, by build.
pub fn on_channel<'a>(
    manifest: &'a Manifest,
    image: &str,
    channel: &str,
) -> Result<BTreeMap<String, &'a Entry>, String> {
    let Some(pointed) = manifest.channels.get(image).and_then(|c| c.get(channel)) else {
        let known: Vec<String> = manifest
            .channels
            .get(image)
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        return Err(format!(
            "image {image} has no channel {channel} (it has: {}); `imgbuild promote` makes one",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ));
    };
    let entries: BTreeMap<String, &Entry> = manifest
        .builds
        .iter()
        .filter(|e| e.image.name == image && e.image.version == pointed.version)
        .map(|e| (e.build.name.clone(), e))
        .collect();
    if entries.is_empty() {
        return Err(format!(
            "channel {channel} of {image} points at version {}, which the catalog does not record; promote a recorded version",
            pointed.version
        ));
    }
    Ok(entries)
}

/// Refuses an entry whose artifact must not be handed on: one that failed
/// its tests (unless `allow_failed`), and one whose artifact was deleted
/// (there is nothing to hand on).
pub fn check_usable(entry: &Entry, allow_failed: bool) -> Result<(), String> {
    let (build, version) = (&entry.build.name, &entry.image.version);
    match entry.status {
        EntryStatus::Failed => {}
        EntryStatus::Revoked => {
            return Err(format!(
                "build {build} version {version} is revoked{}; it is never handed out: promote or build another version",
                entry.revocation_reason()
            ));
        }
        EntryStatus::Retired => {
            return Err(format!(
                "build {build} version {version} is retired: its artifact {} was removed",
                entry.artifact_id
            ));
        }
        EntryStatus::Built | EntryStatus::Tested => return Ok(()),
    }
    let why = match (&entry.test_error, entry.failed_tests()) {
        (Some(error), _) => error.clone(),
        (None, failed) => format!(
            "failed tests: {}",
            failed
                .iter()
                .map(|name| format!("`{name}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    if entry.deleted {
        return Err(format!(
            "build {build} version {version} failed its tests ({why}) and its artifact {} was deleted (on_test_failure = \"delete\"); there is nothing to hand out: fix the image and build a new version",
            entry.artifact_id
        ));
    }
    if allow_failed {
        return Ok(());
    }
    Err(format!(
        "build {build} version {version} failed its tests ({why}); a failed version is not handed out: fix the image and build a new version, or pass --allow-failed to use it anyway"
    ))
}

/// The entry as its builder kind reads it.
fn recorded(entry: &Entry) -> RecordedArtifact<'_> {
    RecordedArtifact {
        build: &entry.build.name,
        version: &entry.image.version,
        artifact_id: &entry.artifact_id,
        details: &entry.details,
    }
}

/// The pinned reference (`repository@sha256:...`) a pushed image was
/// pushed as, in `repository` or the first one pushed to.
pub fn digest_for(entry: &Entry, repository: Option<&str>) -> Result<String, String> {
    let kind = registry::find(&entry.build.kind).ok_or_else(|| {
        format!(
            "build {}: this imgbuild has no `{}` builder",
            entry.build.name, entry.build.kind
        )
    })?;
    kind.output_digest(&recorded(entry), repository)
}

/// The SBOM document the build wrote in `format` (`spdx`, `cyclonedx`, or
/// either, SPDX first), as long as it still holds what the build recorded.
pub fn sbom_for(entry: &Entry, format: Option<&str>) -> Result<String, String> {
    let sbom = &entry.details["sbom"];
    let formats = match format {
        Some(format) => vec![format],
        None => vec!["spdx", "cyclonedx"],
    };
    let Some(path) = formats.iter().find_map(|f| sbom[*f].as_str()) else {
        return Err(format!(
            "build {} version {} recorded no {} SBOM (its `[image] sbom` setting, or a build from before SBOMs)",
            entry.build.name,
            entry.image.version,
            format.unwrap_or("")
        ));
    };
    let path = Path::new(path);
    let recorded = entry
        .files
        .iter()
        .find(|file| file.path == path)
        .ok_or_else(|| format!("{} is not among the entry's files", path.display()))?;
    let (_, sha256) = imgbuild_builders::common::artifact::sha256_file(path)
        .map_err(|err| format!("cannot read the SBOM {}: {err}", path.display()))?;
    if sha256 != recorded.sha256 {
        return Err(format!(
            "the SBOM {} changed since the build (SHA-256 {sha256}, recorded {}); it is not handed out",
            path.display(),
            recorded.sha256
        ));
    }
    std::fs::read_to_string(path)
        .map(|text| text.trim_end().to_owned())
        .map_err(|err| format!("cannot read the SBOM {}: {err}", path.display()))
}

/// What a script wants from an entry: what its builder kind hands on (the
/// AMI id for EC2, in `region` or the build's own), else the artifact id.
pub fn artifact_for(entry: &Entry, region: Option<&str>) -> Result<String, String> {
    match registry::find(&entry.build.kind) {
        Some(kind) => kind.output_id(&recorded(entry), region),
        // A kind this imgbuild does not have (a manifest another version
        // wrote): its artifact id is all that can be said.
        None => match region {
            Some(region) => Err(format!(
                "--region {region} does not apply to build {}: this imgbuild has no `{}` builder",
                entry.build.name, entry.build.kind
            )),
            None => Ok(entry.artifact_id.clone()),
        },
    }
}

/// The builder kind's own named values for an entry, named `<build>_<what>`.
fn kind_outputs(entry: &Entry, target: OutputTarget) -> Vec<(String, Value)> {
    registry::find(&entry.build.kind)
        .map(|kind| kind.outputs(&recorded(entry), target))
        .unwrap_or_default()
        .into_iter()
        .map(|(what, value)| (output_name(&entry.build.name, &what), value))
        .collect()
}

/// Output names are `<build>_<what>`, with characters outside
/// `[A-Za-z0-9_]` turned into `_` so they are valid identifiers everywhere
/// (Terraform variables, GitHub expressions).
pub fn output_name(build: &str, what: &str) -> String {
    let clean = |text: &str| -> String {
        text.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    format!("{}_{}", clean(build), clean(what))
}

/// Flat name → value pairs describing one entry.
pub fn named_outputs(entry: &Entry) -> Vec<(String, Value)> {
    let build = &entry.build.name;
    let mut outputs = vec![
        (
            output_name(build, "version"),
            Value::from(entry.image.version.clone()),
        ),
        (
            output_name(build, "artifact_id"),
            Value::from(entry.artifact_id.clone()),
        ),
    ];
    outputs.extend(kind_outputs(entry, OutputTarget::StepOutputs));
    outputs
}

/// A Terraform `*.auto.tfvars.json` document for the latest entry of every
/// build: `<build>_ami_id`, `<build>_ami_ids` (a map by region),
/// `<build>_artifact_id`, `<build>_version`. Refused when a latest entry
/// failed its tests, unless `allow_failed`: Terraform would deploy it.
pub fn tfvars(entries: &BTreeMap<String, &Entry>, allow_failed: bool) -> Result<Value, String> {
    let mut document = Map::new();
    for (build, entry) in entries {
        check_usable(entry, allow_failed)?;
        document.insert(
            output_name(build, "version"),
            entry.image.version.clone().into(),
        );
        document.insert(
            output_name(build, "artifact_id"),
            entry.artifact_id.clone().into(),
        );
        document.extend(kind_outputs(entry, OutputTarget::Tfvars));
    }
    Ok(Value::Object(document))
}

/// Appends `name=value` lines to the file GitHub Actions names in
/// `GITHUB_OUTPUT`, so later steps read `steps.<id>.outputs.<build>_ami_id`.
pub fn write_github_outputs(path: &Path, entry: &Entry) -> std::io::Result<()> {
    let mut text = String::new();
    for (name, value) in named_outputs(entry) {
        let value = match value {
            Value::String(text) => text,
            other => other.to_string(),
        };
        // Values are ids and versions: single-line, so the simple form works.
        text.push_str(&format!("{name}={}\n", value.replace('\n', " ")));
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(build: &str, kind: &str, version: &str, artifact_id: &str, details: Value) -> Entry {
        serde_json::from_value(serde_json::json!({
            "run_id": "r", "image": {"name": "web", "version": version},
            "build": {"name": build, "type": kind},
            "artifact_id": artifact_id,
            "details": details,
            "source": {"kind": "file", "reference": "/b"},
            "inputs_sha256": "0", "started_at": "a", "finished_at": "b", "duration_secs": 1.0,
            "imgbuild_version": "0.1.0"
        }))
        .unwrap()
    }

    fn ec2(version: &str, home: &str) -> Entry {
        entry(
            "web-ami",
            "ec2",
            version,
            "eu-west-1:ami-1",
            serde_json::json!({"region": "eu-west-1", "amis": {"eu-west-1": home, "us-east-1": "ami-copy"}}),
        )
    }

    #[test]
    fn picks_the_ami_of_the_home_region_or_the_one_asked_for() {
        let entry = ec2("1", "ami-home");
        assert_eq!(artifact_for(&entry, None).unwrap(), "ami-home");
        assert_eq!(artifact_for(&entry, Some("us-east-1")).unwrap(), "ami-copy");
        let err = artifact_for(&entry, Some("ap-south-1")).unwrap_err();
        assert!(err.contains("eu-west-1, us-east-1"), "{err}");
        let disk = entry_of_qemu();
        assert_eq!(artifact_for(&disk, None).unwrap(), "/out/vm-2");
        assert!(artifact_for(&disk, Some("eu-west-1")).is_err());
    }

    fn entry_of_qemu() -> Entry {
        entry("vm", "qemu", "2", "/out/vm-2", Value::Null)
    }

    #[test]
    fn tfvars_hold_the_latest_of_each_build() {
        let manifest = Manifest {
            format_version: 1,
            builds: vec![ec2("1", "ami-old"), entry_of_qemu(), ec2("2", "ami-new")],
            ..Manifest::default()
        };
        let vars = tfvars(&latest_by_build(&manifest, None), false).unwrap();
        assert_eq!(vars["web_ami_ami_id"], "ami-new");
        assert_eq!(vars["web_ami_version"], "2");
        assert_eq!(vars["web_ami_ami_ids"]["us-east-1"], "ami-copy");
        assert_eq!(vars["vm_artifact_id"], "/out/vm-2");
    }

    #[test]
    fn github_outputs_are_appended_as_name_value_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("github_output");
        std::fs::write(&path, "earlier=1\n").unwrap();
        write_github_outputs(&path, &ec2("3", "ami-3")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("earlier=1\n"));
        assert!(text.contains("web_ami_ami_id=ami-3\n"), "{text}");
        assert!(
            text.contains("web_ami_ami_id_us_east_1=ami-copy\n"),
            "{text}"
        );
        assert!(text.contains("web_ami_version=3\n"), "{text}");
    }

    fn failed(mut entry: Entry, deleted: bool) -> Entry {
        entry.status = EntryStatus::Failed;
        entry.deleted = deleted;
        entry.tests = vec![crate::manifest::TestResult {
            name: "nginx answers".into(),
            passed: false,
            exit_code: Some(7),
            duration_secs: 0.1,
            attempts: 1,
            output_tail: Vec::new(),
            error: None,
        }];
        entry
    }

    #[test]
    fn a_failed_version_is_refused_unless_allowed() {
        let entry = failed(entry_of_qemu(), false);
        let err = check_usable(&entry, false).unwrap_err();
        assert!(err.contains("build vm version 2"), "{err}");
        assert!(err.contains("`nginx answers`"), "{err}");
        assert!(err.contains("--allow-failed"), "{err}");
        check_usable(&entry, true).unwrap();
        check_usable(&entry_of_qemu(), false).unwrap();

        // tfvars would hand it to Terraform: refused the same way.
        let manifest = Manifest {
            format_version: 1,
            builds: vec![ec2("1", "ami-old"), entry.clone()],
            ..Manifest::default()
        };
        let err = tfvars(&latest_by_build(&manifest, None), false).unwrap_err();
        assert!(err.contains("build vm version 2"), "{err}");
        assert_eq!(
            tfvars(&latest_by_build(&manifest, None), true).unwrap()["vm_artifact_id"],
            "/out/vm-2"
        );
    }

    #[test]
    fn a_deleted_artifact_is_refused_even_when_failures_are_allowed() {
        let entry = failed(entry_of_qemu(), true);
        let err = check_usable(&entry, true).unwrap_err();
        assert!(err.contains("was deleted"), "{err}");
    }
}
