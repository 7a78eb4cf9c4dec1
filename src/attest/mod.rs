//! Provenance: every recorded version gets an in-toto statement with a
//! SLSA provenance predicate, in a DSSE envelope written beside the
//! artifact as `<stem>.intoto.json`. With a signing key (`imgbuild keygen`)
//! the envelope carries an ed25519 signature, and the checksum file a
//! minisign signature `<file>.sha256.minisig`. Without one the envelope has
//! no signatures: the same file, read the same way, which `imgbuild verify`
//! reports as unsigned.

pub mod dsse;
pub mod keys;
pub mod statement;
pub mod verify;

use crate::manifest::Entry;
use imgbuild_core::fsutil::write_atomic;
pub use keys::{PublicKey, SigningKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
pub use statement::{ConfigFile, ExternalInputs};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Where a version's attestation is, as its manifest entry records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationRecord {
    /// The DSSE envelope.
    pub path: PathBuf,
    pub sha256: String,
    /// The id of the key that signed it (minisign's, 16 hex digits);
    /// absent when the attestation is unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// `<checksum file>.minisig`, when the artifact has a checksum file
    /// and a key signed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum_signature: Option<PathBuf>,
}

#[derive(Debug, Error)]
pub enum AttestError {
    #[error("cannot read the config file {path} to record its digest: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the checksum file {path} to sign it: {source}")]
    ReadChecksum {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot sign the checksum file {path}: {reason}")]
    SignChecksum { path: PathBuf, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ExternalInputs {
    /// The config file's path and digest and its non-sensitive variables.
    /// A non-sensitive value that happens to contain a sensitive one is
    /// masked all the same.
    pub fn of(config: &crate::config::Config) -> Result<ExternalInputs, AttestError> {
        let (_, sha256) =
            imgbuild_builders::common::artifact::sha256_file(&config.path).map_err(|source| {
                AttestError::Config {
                    path: config.path.clone(),
                    source,
                }
            })?;
        let path = std::fs::canonicalize(&config.path).unwrap_or_else(|_| config.path.clone());
        Ok(ExternalInputs {
            config: ConfigFile {
                path: path.display().to_string(),
                sha256,
            },
            variables: config
                .variables
                .iter()
                .filter(|variable| !variable.sensitive)
                .map(|variable| {
                    (
                        variable.name.clone(),
                        config.redactor.redact(&variable.value).into_owned(),
                    )
                })
                .collect(),
        })
    }
}

/// Extensions dropped from an artifact's file name to make the
/// attestation's: `web-1.0.qcow2.zst` attests as `web-1.0.intoto.json`.
/// Others are kept (`web-1.0` must not become `web-1.intoto.json`).
const COMPRESSIONS: &[&str] = &["zst", "gz", "xz", "bz2"];
const FORMATS: &[&str] = &["qcow2", "raw", "img", "tar", "vmdk", "vdi", "iso", "ova"];

/// `<artifact stem>.intoto.json` beside a file artifact; for an artifact
/// that is not a file (a Docker image, AMIs),
/// `<image>-<version>.<build>.intoto.json` beside its other outputs (an
/// SBOM), or in `fallback_dir` when it has none.
pub fn attestation_path(entry: &Entry, fallback_dir: &Path) -> PathBuf {
    let artifact = entry
        .files
        .iter()
        .find(|f| f.path.as_os_str() == entry.artifact_id.as_str());
    let Some(file) = artifact else {
        let dir = entry
            .files
            .first()
            .and_then(|f| f.path.parent())
            .unwrap_or(fallback_dir);
        return dir.join(format!(
            "{}-{}.{}.intoto.json",
            entry.image.name, entry.image.version, entry.build.name
        ));
    };
    let name = file
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut stem = name.as_str();
    let strip = |stem: &mut &str, known: &[&str]| {
        if let Some((head, extension)) = stem.rsplit_once('.')
            && known.contains(&extension)
            && !head.is_empty()
        {
            *stem = head;
        }
    };
    strip(&mut stem, COMPRESSIONS);
    strip(&mut stem, FORMATS);
    file.path.with_file_name(format!("{stem}.intoto.json"))
}

/// The checksum file the builder wrote beside a file artifact, if any.
pub fn checksum_file(entry: &Entry) -> Option<PathBuf> {
    entry.details["checksum_file"].as_str().map(PathBuf::from)
}

/// `<file>.minisig`.
pub fn minisig_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".minisig");
    PathBuf::from(name)
}

/// Whether `entry` names anything to attest: a discarded Docker build or a
/// deleted artifact does not.
pub fn has_subjects(entry: &Entry) -> bool {
    !entry.deleted && !statement::subjects(entry).is_empty()
}

/// The trusted comment of a checksum signature, in `minisign`'s own form,
/// at the build's finish time, so signing is a function of the entry.
fn trusted_comment(entry: &Entry, file: &Path) -> String {
    let timestamp = time::OffsetDateTime::parse(
        &entry.finished_at,
        &time::format_description::well_known::Rfc3339,
    )
    .map(|t| t.unix_timestamp())
    .unwrap_or(0);
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("timestamp:{timestamp}\tfile:{name}\thashed")
}

/// Writes the attestation of `entry` (and, with `key`, the checksum file's
/// signature), each atomically, and returns what the entry records.
/// Everything is made in memory first; a failure leaves no file of this
/// call behind. Blocking: call off the async threads.
pub fn write(
    entry: &Entry,
    inputs: &ExternalInputs,
    key: Option<&SigningKey>,
    fallback_dir: &Path,
) -> Result<AttestationRecord, AttestError> {
    let statement = statement::statement(entry, inputs);
    let payload = serde_json::to_vec(&statement).expect("statements serialize");
    let mut envelope = dsse::Envelope::unsigned(&payload);
    let mut minisig = None;
    if let Some(key) = key {
        envelope.sign(key.ed25519(), key.key_id());
        if let Some(checksum) = checksum_file(entry) {
            let data = std::fs::read(&checksum).map_err(|source| AttestError::ReadChecksum {
                path: checksum.clone(),
                source,
            })?;
            let signature = key
                .minisign(&data, &trusted_comment(entry, &checksum))
                .map_err(|reason| AttestError::SignChecksum {
                    path: checksum.clone(),
                    reason,
                })?;
            minisig = Some((minisig_path(&checksum), signature));
        }
    }
    let mut text = serde_json::to_vec_pretty(&envelope).expect("envelopes serialize");
    text.push(b'\n');
    let path = attestation_path(entry, fallback_dir);

    if let Some((minisig_path, signature)) = &minisig {
        write_atomic(minisig_path, signature.as_bytes()).map_err(|source| AttestError::Write {
            path: minisig_path.clone(),
            source,
        })?;
    }
    if let Err(source) = write_atomic(&path, &text) {
        if let Some((minisig_path, _)) = &minisig {
            let _ = std::fs::remove_file(minisig_path);
        }
        return Err(AttestError::Write { path, source });
    }
    Ok(AttestationRecord {
        path,
        sha256: hex::encode(Sha256::digest(&text)),
        key_id: key.map(|key| key.key_id().to_owned()),
        checksum_signature: minisig.map(|(path, _)| path),
    })
}

/// The pipeline's step: attests `entry` (masked, not yet recorded) and
/// records where in it, or says why not. Nothing is written for an entry
/// with nothing to attest. An error is the build's failure message.
pub async fn attest_entry(
    entry: &mut Entry,
    config: &crate::config::Config,
    key: Option<std::sync::Arc<SigningKey>>,
    cx: &imgbuild_core::StepContext,
) -> Result<(), String> {
    if !has_subjects(entry) {
        return Ok(());
    }
    let inputs = ExternalInputs::of(config);
    // Absolute, so the entry names it wherever verify runs from.
    let fallback_dir = std::fs::canonicalize(&config.dir).unwrap_or_else(|_| config.dir.clone());
    let snapshot = entry.clone();
    let written = tokio::task::spawn_blocking(move || {
        write(&snapshot, &inputs?, key.as_deref(), &fallback_dir)
    })
    .await
    .map_err(|err| format!("the attestation task crashed: {err}"))?;
    match written {
        Ok(record) => {
            cx.log.info(format!(
                "provenance {} (sha256 {}){}",
                record.path.display(),
                record.sha256,
                match (&record.key_id, &record.checksum_signature) {
                    (Some(key), Some(minisig)) => format!(
                        ", signed by key {key}; checksum signature {}",
                        minisig.display()
                    ),
                    (Some(key), None) => format!(", signed by key {key}"),
                    (None, _) => ", unsigned (no --sign-key)".to_owned(),
                }
            ));
            entry.attestation = Some(record);
            Ok(())
        }
        Err(err) => Err(format!(
            "the artifact {} was built but its provenance cannot be written: {err}; version {} is not recorded and the artifact is left as it is",
            entry.artifact_id, entry.image.version
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgbuild_builders::ArtifactFile;

    fn with_file(name: &str) -> Entry {
        let mut entry = crate::manifest::tests::entry("vm", "1.0");
        let path = PathBuf::from("/out").join(name);
        entry.artifact_id = path.display().to_string();
        entry.files = vec![ArtifactFile {
            path,
            size: 1,
            sha256: "a".repeat(64),
        }];
        entry
    }

    #[test]
    fn the_attestation_is_named_after_the_artifact_without_its_format() {
        let at = |name: &str| attestation_path(&with_file(name), Path::new("/cfg"));
        assert_eq!(
            at("web-1.0.qcow2"),
            PathBuf::from("/out/web-1.0.intoto.json")
        );
        assert_eq!(
            at("web-1.0.qcow2.zst"),
            PathBuf::from("/out/web-1.0.intoto.json")
        );
        assert_eq!(at("rootfs.tar"), PathBuf::from("/out/rootfs.intoto.json"));
        // An unknown extension is part of the name: versions stay apart.
        assert_eq!(at("web-1.0"), PathBuf::from("/out/web-1.0.intoto.json"));
        assert_eq!(at("web-1.1"), PathBuf::from("/out/web-1.1.intoto.json"));

        // An image with an SBOM file: beside the SBOM; without: the
        // fallback directory.
        let mut image = with_file("sbom/img-1.0.vm.spdx.json");
        image.artifact_id = format!("sha256:{}", "1".repeat(64));
        assert_eq!(
            attestation_path(&image, Path::new("/cfg")),
            PathBuf::from("/out/sbom/img-1.0.vm.intoto.json")
        );
        image.files.clear();
        assert_eq!(
            attestation_path(&image, Path::new("/cfg")),
            PathBuf::from("/cfg/img-1.0.vm.intoto.json")
        );
    }
}
