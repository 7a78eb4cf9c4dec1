//! What each provisioner step of a build is made of, for the step cache
//! (exact keys), for `plan` (what changed since the recorded version) and
//! for `--skip-unchanged` (the inputs with the version masked).

use crate::config::{Build, Config};
use imgbuild_builders::SourceIdentity;
use imgbuild_builders::common::artifact::sha256_file;
use imgbuild_builders::common::cache::{StepCache, StepInput, base_key, chain, digest_json};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// One provisioner step as recorded with a version: enough to say later
/// which field or file changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// "shell (setup.sh)".
    pub provisioner: String,
    /// The key of the machine's state after this step; absent when the
    /// step cannot be cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Its resolved config, sensitive values masked.
    pub config: serde_json::Value,
    /// Each local file it reads (relative to the config), with its SHA-256.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uncacheable: Option<String>,
}

/// The steps of one build, worked out before it runs.
pub struct BuildSteps {
    /// What the builder gets: a digest per step.
    pub inputs: Vec<StepInput>,
    /// What the manifest records (keys filled in once the base is known).
    pub records: Vec<StepRecord>,
}

impl BuildSteps {
    /// Hashes every step's config (sensitive values entering only as their
    /// SHA-256) and files. Reads the files: call off the async threads.
    pub fn of(build: &Build, config: &Config) -> std::io::Result<BuildSteps> {
        let mut inputs = Vec::new();
        let mut records = Vec::new();
        for ((provisioner, resolved), source) in build
            .provisioners
            .iter()
            .zip(&build.provisioner_configs)
            .zip(&build.steps)
        {
            let files = hash_files(&source.files, &config.dir)?;
            let mut keyed = resolved.clone();
            config.redactor.replace_json(&mut keyed, &|secret| {
                format!("<sensitive sha256:{}>", hex::encode(Sha256::digest(secret)))
            });
            let digest = digest_json(&serde_json::json!({"config": keyed, "files": files}));
            let mut shown = resolved.clone();
            config.redactor.redact_json(&mut shown);
            inputs.push(StepInput {
                digest,
                uncacheable: source.uncacheable.clone(),
            });
            records.push(StepRecord {
                provisioner: provisioner.describe(),
                key: None,
                config: shown,
                files,
                uncacheable: source.uncacheable.clone(),
            });
        }
        Ok(BuildSteps { inputs, records })
    }

    pub fn cache(&self, enabled: bool, settings: &crate::config::CacheSettings) -> StepCache {
        let shared_from_env = std::env::var("IMGBUILD_CACHE_SHARED")
            .ok()
            .filter(|location| !location.is_empty());
        StepCache {
            steps: self.inputs.clone(),
            enabled,
            store_root: settings.dir.clone(),
            shared: settings.shared.clone().or(shared_from_env),
        }
    }

    /// The records with each step's key, for a build of `kind` whose disk
    /// is shaped by `settings` (`None`: no step cache) and starts from
    /// `source`.
    pub fn keyed(
        &self,
        kind: &str,
        settings: Option<&serde_json::Value>,
        source: &SourceIdentity,
    ) -> Vec<StepRecord> {
        let keys = match settings {
            Some(settings) => chain(&base_key(kind, settings, source), &self.inputs),
            None => vec![None; self.inputs.len()],
        };
        self.records
            .iter()
            .zip(keys)
            .map(|(record, key)| StepRecord {
                key,
                ..record.clone()
            })
            .collect()
    }
}

/// Each file below `paths` (directories recursively), named relative to
/// the config, with its SHA-256.
pub fn hash_files(
    paths: &[std::path::PathBuf],
    config_dir: &Path,
) -> std::io::Result<BTreeMap<String, String>> {
    let mut hashes = BTreeMap::new();
    for path in paths {
        for entry in walkdir::WalkDir::new(path).sort_by_file_name() {
            let entry = entry.map_err(std::io::Error::other)?;
            if entry.file_type().is_file() {
                let digest = sha256_file(entry.path())?.1;
                let name = entry
                    .path()
                    .strip_prefix(config_dir)
                    .unwrap_or(entry.path());
                hashes.insert(name.display().to_string(), digest);
            }
        }
    }
    Ok(hashes)
}

/// The build's inputs with its version masked wherever it appears in the
/// resolved config, so that two versions built from the same inputs hash
/// equal: what `--skip-unchanged` compares. This run's `run_id`,
/// `timestamp` and `isotime` are masked too (they differ on every run, as
/// `uuid()` does, which cannot be masked). File contents are taken as
/// they are.
pub fn unversioned_inputs(
    description: &serde_json::Value,
    version: &str,
    run_values: &[String],
) -> serde_json::Value {
    fn mask(value: &mut serde_json::Value, replacements: &[(&str, &str)]) {
        match value {
            serde_json::Value::String(text) => {
                for (from, to) in replacements {
                    if !from.is_empty() && text.contains(from) {
                        *text = text.replace(from, to);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| mask(v, replacements)),
            serde_json::Value::Object(map) => map.values_mut().for_each(|v| mask(v, replacements)),
            _ => {}
        }
    }
    let mut replacements: Vec<(&str, &str)> = run_values
        .iter()
        .map(|value| (value.as_str(), "{{ per-run value }}"))
        .collect();
    replacements.push((version, "{{ image.version }}"));
    // Longest first, so a value containing another is masked whole.
    replacements.sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
    let mut masked = description.clone();
    mask(&mut masked, &replacements);
    masked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_masked_wherever_it_appears_and_nothing_else_is() {
        let description = serde_json::json!({
            "image": {"version": "1.2.3"},
            "provisioners": [{"inline": ["echo 1.2.3 > /etc/v", "echo 1.2.30"]}],
            "builder": {"memory": 123},
        });
        let masked = unversioned_inputs(&description, "1.2.3", &["run-a".to_owned()]);
        assert_eq!(masked["image"]["version"], "{{ image.version }}");
        assert_eq!(
            masked["provisioners"][0]["inline"][0],
            "echo {{ image.version }} > /etc/v"
        );
        assert_eq!(masked["builder"]["memory"], 123);
        let other = serde_json::json!({
            "image": {"version": "1.2.4"},
            "provisioners": [{"inline": ["echo 1.2.4 > /etc/v", "echo 1.2.40"]}],
            "builder": {"memory": 123},
        });
        assert_eq!(
            masked,
            unversioned_inputs(&other, "1.2.4", &["run-b".to_owned()])
        );
        let with_run = serde_json::json!({"inline": ["echo run-a"]});
        let next_run = serde_json::json!({"inline": ["echo run-b"]});
        assert_eq!(
            unversioned_inputs(&with_run, "1", &["run-a".to_owned()]),
            unversioned_inputs(&next_run, "1", &["run-b".to_owned()])
        );
    }
}
