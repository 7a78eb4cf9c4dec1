//! The inputs hash: one SHA-256 over everything that determines a build's
//! result, so two manifest entries with equal hashes came from equal inputs.

use imgbuild_builders::SourceIdentity;
use imgbuild_core::Redactor;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
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
    let mut file_hashes = BTreeMap::new();
    for path in &inputs.files {
        for entry in walk(path) {
            let entry = entry?;
            if entry.file_type().is_file() {
                let digest = imgbuild_builders::common::artifact::sha256_file(entry.path())?.1;
                let name = entry
                    .path()
                    .strip_prefix(config_dir)
                    .unwrap_or(entry.path());
                file_hashes.insert(name.display().to_string(), digest);
            }
        }
    }
    let document = serde_json::json!({
        "build": description,
        "files": file_hashes,
        "source": source,
    });
    let bytes = serde_json::to_vec(&document).expect("json values serialize");
    Ok(hex::encode(Sha256::digest(&bytes)))
}

fn walk(path: &Path) -> impl Iterator<Item = std::io::Result<walkdir::DirEntry>> {
    walkdir::WalkDir::new(path)
        .sort_by_file_name()
        .into_iter()
        .map(|entry| entry.map_err(std::io::Error::other))
}
