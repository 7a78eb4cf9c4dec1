//! The inputs hash: one SHA-256 over everything that determines a build's
//! result, so two manifest entries with equal hashes came from equal inputs.

use crate::config::{Build, Config};
use imgbuild_builders::SourceIdentity;
use imgbuild_core::Redactor;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub struct Inputs {
    pub description: serde_json::Value,
    pub files: Vec<PathBuf>,
}

/// Hashes the resolved build description (sensitive values masked: a hash of
/// a short password can be brute-forced), the content of each input file
/// (directories recursively) and the base's identity.
pub fn hash(
    inputs: &Inputs,
    source: &SourceIdentity,
    config_dir: &Path,
    redactor: &Redactor,
) -> std::io::Result<String> {
    let mut description = inputs.description.clone();
    redactor.redact_json(&mut description);
    let file_hashes = super::keys::hash_files(&inputs.files, config_dir)?;
    let document = serde_json::json!({
        "build": description,
        "files": file_hashes,
        "source": source,
    });
    let bytes = serde_json::to_vec(&document).expect("json values serialize");
    Ok(hex::encode(Sha256::digest(&bytes)))
}

/// The build as resolved: what, besides its files and its base, makes its
/// result what it is.
pub fn description(config: &Config, build: &Build) -> serde_json::Value {
    let mut description = serde_json::json!({
        "image": {
            "name": config.image.name,
            "version": config.image.version,
            "description": config.image.description,
            "labels": config.image.labels,
        },
        "build": build.name,
        "type": build.builder.kind(),
        "builder": build.builder.resolved_config(),
        "provisioners": build.provisioner_configs,
    });
    // Only when there are tests, so a config without any keeps the hash it
    // had before tests existed.
    if !build.test_configs.is_empty() {
        description["tests"] = serde_json::json!(build.test_configs);
    }
    description
}

/// The build's inputs hash from `source`, exactly and with the version
/// masked (what `--skip-unchanged` compares).
pub async fn hashes(
    config: &Config,
    build: &Build,
    source: &SourceIdentity,
) -> std::io::Result<(String, String)> {
    let description = description(config, build);
    let unversioned = Inputs {
        description: super::keys::unversioned_inputs(
            &description,
            &config.image.version,
            &config.run_values,
        ),
        files: build.input_files.clone(),
    };
    let exact = Inputs {
        description,
        files: build.input_files.clone(),
    };
    let (source, dir, redactor) = (source.clone(), config.dir.clone(), config.redactor.clone());
    tokio::task::spawn_blocking(move || {
        Ok((
            hash(&exact, &source, &dir, &redactor)?,
            hash(&unversioned, &source, &dir, &redactor)?,
        ))
    })
    .await
    .map_err(std::io::Error::other)?
}
