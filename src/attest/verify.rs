//! `imgbuild verify`: is a recorded version what its signed attestation
//! says, and is its artifact still that version?

use super::dsse::{Envelope, IN_TOTO_PAYLOAD_TYPE};
use super::statement::{self, PREDICATE_TYPE, STATEMENT_TYPE};
use super::{PublicKey, checksum_file};
use crate::manifest::Entry;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Why a verification failed; each has its own remedy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The entry records no attestation (built before imgbuild made them).
    NotAttested,
    /// The recorded attestation file is gone or unreadable.
    AttestationMissing,
    /// The envelope carries no signature (built without a signing key).
    Unsigned,
    /// Signed, but not by the given key.
    WrongKey,
    /// The envelope was changed after it was signed, or is not the one
    /// recorded.
    EnvelopeEdited,
    /// The payload is not an in-toto statement with a SLSA provenance
    /// predicate.
    NotProvenance,
    /// The attestation names other artifacts than the entry.
    SubjectMismatch,
    /// The attestation's build definition or run details are not the
    /// entry's.
    StatementMismatch,
    /// An artifact file's bytes are not the recorded ones.
    ArtifactModified,
    ArtifactMissing,
    /// The checksum file or its minisign signature does not hold.
    ChecksumSignature,
}

impl Failure {
    pub fn summary(self) -> &'static str {
        match self {
            Failure::NotAttested => "the version has no attestation",
            Failure::AttestationMissing => "the attestation file is missing",
            Failure::Unsigned => "the attestation is unsigned",
            Failure::WrongKey => "the attestation was signed by another key",
            Failure::EnvelopeEdited => "the attestation was changed after it was signed",
            Failure::NotProvenance => "the attestation is not SLSA provenance",
            Failure::SubjectMismatch => "the attestation is about another artifact",
            Failure::StatementMismatch => "the attestation does not describe this build",
            Failure::ArtifactModified => "the artifact was modified",
            Failure::ArtifactMissing => "the artifact is missing",
            Failure::ChecksumSignature => "the checksum file's signature does not hold",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub check: &'static str,
    pub ok: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub image: String,
    pub version: String,
    pub build: String,
    pub verified: bool,
    pub key_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attestation: Option<std::path::PathBuf>,
    pub failures: Vec<Failure>,
    pub checks: Vec<Check>,
}

impl Report {
    fn pass(&mut self, check: &'static str, detail: impl Into<String>) {
        self.checks.push(Check {
            check,
            ok: true,
            detail: detail.into(),
            failure: None,
        });
    }

    fn fail(&mut self, check: &'static str, failure: Failure, detail: impl Into<String>) {
        if !self.failures.contains(&failure) {
            self.failures.push(failure);
        }
        self.checks.push(Check {
            check,
            ok: false,
            detail: detail.into(),
            failure: Some(failure),
        });
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Runs every check that can run and reports each. Blocking (hashes the
/// artifact files).
pub fn verify(entry: &Entry, key: &PublicKey) -> Report {
    let mut report = Report {
        image: entry.image.name.clone(),
        version: entry.image.version.clone(),
        build: entry.build.name.clone(),
        verified: false,
        key_id: key.key_id().to_owned(),
        attestation: entry.attestation.as_ref().map(|a| a.path.clone()),
        failures: Vec::new(),
        checks: Vec::new(),
    };
    check_attestation(entry, key, &mut report);
    check_files(entry, &mut report);
    check_checksum(entry, key, &mut report);
    report.verified = report.failures.is_empty();
    report
}

/// The envelope's signature, and then, when its payload can be trusted,
/// that it is provenance for exactly this entry.
fn check_attestation(entry: &Entry, key: &PublicKey, report: &mut Report) {
    let Some(record) = &entry.attestation else {
        report.fail(
            "attestation",
            Failure::NotAttested,
            "the manifest entry records no attestation: it was built by an imgbuild that made none, or recorded without one",
        );
        return;
    };
    let text = match std::fs::read(&record.path) {
        Ok(text) => text,
        Err(err) => {
            report.fail(
                "attestation",
                Failure::AttestationMissing,
                format!("cannot read {}: {err}", record.path.display()),
            );
            return;
        }
    };
    let envelope: Envelope = match serde_json::from_slice(&text) {
        Ok(envelope) => envelope,
        Err(err) => {
            report.fail(
                "signature",
                Failure::EnvelopeEdited,
                format!(
                    "{} is no longer a DSSE envelope: {err}",
                    record.path.display()
                ),
            );
            return;
        }
    };
    if envelope.signatures.is_empty() {
        report.fail(
            "signature",
            Failure::Unsigned,
            format!(
                "{} carries no signature: the build ran without --sign-key / IMGBUILD_SIGNING_KEY",
                record.path.display()
            ),
        );
    } else if envelope
        .signatures
        .iter()
        .any(|s| envelope.verifies(s, key.ed25519()))
    {
        report.pass(
            "signature",
            format!("the envelope is signed by key {}", key.key_id()),
        );
    } else if envelope
        .signatures
        .iter()
        .any(|s| s.keyid.eq_ignore_ascii_case(key.key_id()))
    {
        report.fail(
            "signature",
            Failure::EnvelopeEdited,
            format!(
                "the signature of key {} does not match {}: the envelope was changed after it was signed",
                key.key_id(),
                record.path.display()
            ),
        );
        return;
    } else {
        let signers: Vec<&str> = envelope
            .signatures
            .iter()
            .map(|s| {
                if s.keyid.is_empty() {
                    "(no key id)"
                } else {
                    s.keyid.as_str()
                }
            })
            .collect();
        report.fail(
            "signature",
            Failure::WrongKey,
            format!(
                "the envelope is signed by key {}, not by the given key {}: pass the public key of the key that signed the build",
                signers.join(", "),
                key.key_id()
            ),
        );
        return;
    }

    let recorded = sha256_hex(&text);
    if recorded != record.sha256 {
        report.fail(
            "attestation",
            Failure::EnvelopeEdited,
            format!(
                "{} is not the attestation the manifest recorded (sha256 {recorded}, recorded {})",
                record.path.display(),
                record.sha256
            ),
        );
    }
    let payload: serde_json::Value = match envelope
        .payload_bytes()
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
    {
        Some(payload) if envelope.payload_type == IN_TOTO_PAYLOAD_TYPE => payload,
        _ => {
            report.fail(
                "statement",
                Failure::NotProvenance,
                format!(
                    "the payload is not an in-toto statement in JSON (payloadType {})",
                    envelope.payload_type
                ),
            );
            return;
        }
    };
    if payload["_type"] != STATEMENT_TYPE || payload["predicateType"] != PREDICATE_TYPE {
        report.fail(
            "statement",
            Failure::NotProvenance,
            format!(
                "the statement is of type {} with predicate {}, not {STATEMENT_TYPE} with {PREDICATE_TYPE}",
                payload["_type"], payload["predicateType"]
            ),
        );
        return;
    }
    let expected = statement::subjects(entry);
    if payload["subject"].as_array() != Some(&expected) {
        report.fail(
            "subjects",
            Failure::SubjectMismatch,
            format!(
                "the attestation names {}, the manifest entry {}",
                payload["subject"],
                serde_json::Value::from(expected)
            ),
        );
    } else {
        let names: Vec<&str> = expected.iter().filter_map(|s| s["name"].as_str()).collect();
        report.pass(
            "subjects",
            format!("the attestation is about {}", names.join(", ")),
        );
    }
    let Some(inputs) = statement::external_inputs(&payload) else {
        report.fail(
            "statement",
            Failure::NotProvenance,
            "the statement records no config file and variables in its external parameters",
        );
        return;
    };
    let remade = statement::statement(entry, &inputs);
    match first_difference(&remade["predicate"], &payload["predicate"], "predicate") {
        None => report.pass(
            "statement",
            "the build definition and run details are the entry's",
        ),
        Some(path) => report.fail(
            "statement",
            Failure::StatementMismatch,
            format!("the attestation's {path} differs from what the manifest entry records"),
        ),
    }
}

/// The path of the first place where `a` and `b` differ.
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, at: &str) -> Option<String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys()) {
                let (left, right) = (&x.get(key), &y.get(key));
                match (left, right) {
                    (Some(l), Some(r)) => {
                        if let Some(path) = first_difference(l, r, &format!("{at}.{key}")) {
                            return Some(path);
                        }
                    }
                    _ => return Some(format!("{at}.{key}")),
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (l, r))| first_difference(l, r, &format!("{at}[{i}]"))),
        _ if a == b => None,
        _ => Some(at.to_owned()),
    }
}

/// Every artifact file, hashed again.
fn check_files(entry: &Entry, report: &mut Report) {
    if entry.deleted {
        report.fail(
            "artifact",
            Failure::ArtifactMissing,
            "the artifact was deleted (on_test_failure = \"delete\")",
        );
        return;
    }
    for file in &entry.files {
        match imgbuild_builders::common::artifact::sha256_file(&file.path) {
            Ok((_, sha256)) if sha256 == file.sha256 => report.pass(
                "artifact",
                format!("{} has sha256 {sha256}", file.path.display()),
            ),
            Ok((_, sha256)) => report.fail(
                "artifact",
                Failure::ArtifactModified,
                format!(
                    "{} was modified: its sha256 is now {sha256}, recorded and attested {}",
                    file.path.display(),
                    file.sha256
                ),
            ),
            Err(err) => report.fail(
                "artifact",
                Failure::ArtifactMissing,
                format!("cannot read {}: {err}", file.path.display()),
            ),
        }
    }
}

/// The checksum file names the recorded digest, and its `.minisig` is the
/// key's.
fn check_checksum(entry: &Entry, key: &PublicKey, report: &mut Report) {
    let Some(checksum) = checksum_file(entry) else {
        return;
    };
    let data = match std::fs::read(&checksum) {
        Ok(data) => data,
        Err(err) => {
            report.fail(
                "checksum",
                Failure::ChecksumSignature,
                format!("cannot read {}: {err}", checksum.display()),
            );
            return;
        }
    };
    let text = String::from_utf8_lossy(&data);
    let named = text.split_whitespace().next().unwrap_or_default();
    if !entry.files.iter().any(|f| f.sha256 == named) {
        report.fail(
            "checksum",
            Failure::ChecksumSignature,
            format!(
                "{} names sha256 {named}, not the recorded artifact's",
                checksum.display()
            ),
        );
    }
    let signature_path = entry
        .attestation
        .as_ref()
        .and_then(|a| a.checksum_signature.clone());
    let Some(signature_path) = signature_path else {
        if entry
            .attestation
            .as_ref()
            .is_some_and(|a| a.key_id.is_some())
        {
            report.fail(
                "checksum signature",
                Failure::ChecksumSignature,
                format!("no signature of {} is recorded", checksum.display()),
            );
        }
        return;
    };
    let checked = std::fs::read_to_string(&signature_path)
        .map_err(|err| format!("cannot read {}: {err}", signature_path.display()))
        .and_then(|signature| key.verify_minisig(&data, &signature));
    match checked {
        Ok(()) => report.pass(
            "checksum signature",
            format!("{} is signed by key {}", checksum.display(), key.key_id()),
        ),
        Err(err) => report.fail(
            "checksum signature",
            Failure::ChecksumSignature,
            format!(
                "{} does not verify {}: {err}",
                signature_path.display(),
                checksum.display()
            ),
        ),
    }
}

/// The report as lines for a person.
pub fn render(report: &Report) -> String {
    let mut lines = vec![format!(
        "{} {} (build {}){}",
        report.image,
        report.version,
        report.build,
        report
            .attestation
            .as_deref()
            .map(|p| format!(", attestation {}", p.display()))
            .unwrap_or_default()
    )];
    for check in &report.checks {
        lines.push(format!(
            "  {} {}: {}",
            if check.ok { "ok  " } else { "FAIL" },
            check.check,
            check.detail
        ));
    }
    if report.verified {
        lines.push(format!("verified with key {}", report.key_id));
    } else {
        let reasons: Vec<&str> = report.failures.iter().map(|f| f.summary()).collect();
        lines.push(format!("verification failed: {}", reasons.join("; ")));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attest::{ConfigFile, ExternalInputs, SigningKey, keys, write};
    use imgbuild_builders::ArtifactFile;
    use std::path::Path;

    struct Fixture {
        _dir: tempfile::TempDir,
        entry: Entry,
        key: SigningKey,
        public: PublicKey,
        other: PublicKey,
        artifact: std::path::PathBuf,
    }

    fn inputs() -> ExternalInputs {
        ExternalInputs {
            config: ConfigFile {
                path: "/cfg/image.toml".into(),
                sha256: "f".repeat(64),
            },
            variables: Default::default(),
        }
    }

    /// A file artifact with its checksum file, and two key pairs.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join("keys");
        let other_dir = dir.path().join("other");
        let generated = keys::generate(&keys_dir, None).unwrap();
        keys::generate(&other_dir, None).unwrap();
        let artifact = dir.path().join("disk-1.0.qcow2");
        std::fs::write(&artifact, b"disk bytes").unwrap();
        let (size, sha256) = imgbuild_builders::common::artifact::sha256_file(&artifact).unwrap();
        let checksum = dir.path().join("disk-1.0.qcow2.sha256");
        std::fs::write(&checksum, format!("{sha256}  disk-1.0.qcow2\n")).unwrap();
        let mut entry = crate::manifest::tests::entry("vm", "1.0");
        entry.files = vec![ArtifactFile {
            path: artifact.clone(),
            size,
            sha256,
        }];
        entry.details = serde_json::json!({"checksum_file": checksum});
        Fixture {
            key: SigningKey::load(generated.secret.to_str().unwrap()).unwrap(),
            public: PublicKey::load(generated.public.to_str().unwrap()).unwrap(),
            other: PublicKey::load(other_dir.join("imgbuild.pub").to_str().unwrap()).unwrap(),
            _dir: dir,
            entry,
            artifact,
        }
    }

    fn attested(fixture: &Fixture, signed: bool) -> Entry {
        let mut entry = fixture.entry.clone();
        let key = signed.then_some(&fixture.key);
        entry.attestation = Some(write(&entry, &inputs(), key, Path::new("/unused")).unwrap());
        entry
    }

    #[test]
    fn a_signed_untouched_version_verifies() {
        let fixture = fixture();
        let entry = attested(&fixture, true);
        let report = verify(&entry, &fixture.public);
        assert!(report.verified, "{}", render(&report));
        let checks: Vec<&str> = report.checks.iter().map(|c| c.check).collect();
        assert_eq!(
            checks,
            [
                "signature",
                "subjects",
                "statement",
                "artifact",
                "checksum signature"
            ]
        );
    }

    #[test]
    fn each_way_of_failing_is_named() {
        let fixture = fixture();
        let entry = attested(&fixture, true);
        let failures = |entry: &Entry, key: &PublicKey| verify(entry, key).failures;

        assert_eq!(
            failures(&entry, &fixture.other),
            [Failure::WrongKey, Failure::ChecksumSignature]
        );
        assert_eq!(
            failures(&fixture.entry, &fixture.public),
            [Failure::NotAttested]
        );

        // The manifest entry edited to name another artifact: the signed
        // statement no longer matches it.
        let mut edited = entry.clone();
        edited.files[0].sha256 = "0".repeat(64);
        let report = verify(&edited, &fixture.public);
        assert!(
            report.failures.contains(&Failure::SubjectMismatch),
            "{}",
            render(&report)
        );

        // The entry's run details edited: the subjects still match, the
        // statement does not.
        let mut rerun = entry.clone();
        rerun.run_id = "another-run".into();
        let report = verify(&rerun, &fixture.public);
        assert_eq!(report.failures, [Failure::StatementMismatch]);
        assert!(
            render(&report).contains("predicate.runDetails.metadata.invocationId"),
            "{}",
            render(&report)
        );

        let original = std::fs::read(&fixture.artifact).unwrap();
        std::fs::write(&fixture.artifact, b"disk bytez").unwrap();
        assert_eq!(
            failures(&entry, &fixture.public),
            [Failure::ArtifactModified]
        );
        std::fs::remove_file(&fixture.artifact).unwrap();
        assert_eq!(
            failures(&entry, &fixture.public),
            [Failure::ArtifactMissing]
        );
        std::fs::write(&fixture.artifact, original).unwrap();

        let envelope_path = entry.attestation.as_ref().unwrap().path.clone();
        let text = std::fs::read_to_string(&envelope_path).unwrap();
        let mut envelope: crate::attest::dsse::Envelope = serde_json::from_str(&text).unwrap();
        envelope.payload_type = "application/json".into();
        std::fs::write(&envelope_path, serde_json::to_vec(&envelope).unwrap()).unwrap();
        assert_eq!(failures(&entry, &fixture.public), [Failure::EnvelopeEdited]);
        // Reformatted but with its signature intact: not the recorded file.
        let reformatted: serde_json::Value = serde_json::from_str(&text).unwrap();
        std::fs::write(&envelope_path, serde_json::to_vec(&reformatted).unwrap()).unwrap();
        assert_eq!(failures(&entry, &fixture.public), [Failure::EnvelopeEdited]);
        std::fs::remove_file(&envelope_path).unwrap();
        assert_eq!(
            failures(&entry, &fixture.public),
            [Failure::AttestationMissing]
        );
        std::fs::write(&envelope_path, text).unwrap();
        assert!(verify(&entry, &fixture.public).verified);

        // Attested again without a key (over the same path).
        assert_eq!(
            failures(&attested(&fixture, false), &fixture.public),
            [Failure::Unsigned]
        );
    }
}
