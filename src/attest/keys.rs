//! The signing key pair: minisign's own key files, so one pair signs both
//! the DSSE envelope (ed25519 over its PAE) and the checksum file (a
//! `.minisig` the `minisign` tool checks).
//!
//! minisign's secret key holds the ed25519 seed followed by the public key
//! (libsodium's layout); the DSSE signature is made with that seed through
//! ed25519-dalek, and the public key is checked to be the one the seed
//! derives, so a key file that is not what it claims is refused.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use thiserror::Error;

pub const SECRET_KEY_FILE: &str = "imgbuild.key";
pub const PUBLIC_KEY_FILE: &str = "imgbuild.pub";
/// The password of an encrypted secret key, for runs without a terminal.
pub const PASSWORD_ENV: &str = "IMGBUILD_SIGNING_KEY_PASSWORD";

// minisign's serialized secret key: algorithm (2), KDF (2), checksum
// algorithm (2), salt (32), opslimit (8), memlimit (8), then the key id (8),
// the secret key (64: seed and public key) and its checksum (32).
const SK_KEYNUM: std::ops::Range<usize> = 54..62;
const SK_SECRET: std::ops::Range<usize> = 62..126;
// The public key: algorithm (2), key id (8), public key (32).
const PK_KEYNUM: std::ops::Range<usize> = 2..10;
const PK_PUBLIC: std::ops::Range<usize> = 10..42;

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("cannot read the {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{source_name} is not a minisign {what} ({reason}); make a key pair with `imgbuild keygen`"
    )]
    Malformed {
        source_name: String,
        what: &'static str,
        reason: String,
    },
    #[error(
        "the signing key {source_name} is encrypted and no password was given: set {PASSWORD_ENV}, or run in a terminal to be asked"
    )]
    NoPassword { source_name: String },
    #[error("cannot decrypt the signing key {source_name}: {reason}; check {PASSWORD_ENV}")]
    Decrypt { source_name: String, reason: String },
    #[error("{path} already exists; keygen never overwrites a key: choose another --out directory")]
    Exists { path: PathBuf },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot generate a key pair: {0}")]
    Generate(String),
}

/// A loaded secret key. Its `Debug` shows only the key id.
pub struct SigningKey {
    key_id: String,
    ed25519: ed25519_dalek::SigningKey,
    minisign_secret: minisign::SecretKey,
    minisign_public: minisign::PublicKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.key_id)
    }
}

/// A loaded public key.
#[derive(Clone)]
pub struct PublicKey {
    key_id: String,
    ed25519: ed25519_dalek::VerifyingKey,
    minisign: minisign::PublicKey,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id)
    }
}

/// minisign's key id: its 8 bytes as a little-endian number in upper-case
/// hex, the way `minisign` prints it.
fn key_id(keynum: &[u8]) -> String {
    let bytes: [u8; 8] = keynum.try_into().expect("a key id is 8 bytes");
    format!("{:016X}", u64::from_le_bytes(bytes))
}

impl SigningKey {
    /// Loads the secret key named by `--sign-key` / `IMGBUILD_SIGNING_KEY`:
    /// a file, or the file's text itself (a CI secret), which starts with
    /// minisign's `untrusted comment:` line. An encrypted key is decrypted
    /// with `IMGBUILD_SIGNING_KEY_PASSWORD`, or a password asked on the
    /// terminal.
    pub fn load(spec: &str) -> Result<SigningKey, KeyError> {
        let (text, source_name) = if spec.trim_start().starts_with("untrusted comment:") {
            (
                spec.to_owned(),
                "the key given in IMGBUILD_SIGNING_KEY".to_owned(),
            )
        } else {
            let path = Path::new(spec);
            let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
                what: "signing key",
                path: path.to_path_buf(),
                source,
            })?;
            (text, path.display().to_string())
        };
        let password = std::env::var(PASSWORD_ENV).ok().filter(|p| !p.is_empty());
        Self::parse(&text, &source_name, password)
    }

    /// Parses a minisign secret key file's text; `password` decrypts an
    /// encrypted one (else it is asked on the terminal, if there is one).
    pub fn parse(
        text: &str,
        source_name: &str,
        password: Option<String>,
    ) -> Result<SigningKey, KeyError> {
        let malformed = |reason: String| KeyError::Malformed {
            source_name: source_name.to_owned(),
            what: "secret key",
            reason,
        };
        let encoded = text
            .lines()
            .nth(1)
            .map(str::trim)
            .ok_or_else(|| malformed("no key line after the comment".into()))?;
        let raw = STANDARD
            .decode(encoded)
            .map_err(|err| malformed(format!("the key line is not base64: {err}")))?;
        let parsed =
            minisign::SecretKey::from_bytes(&raw).map_err(|err| malformed(format!("{err}")))?;
        let boxed =
            minisign::SecretKeyBox::from_string(text).map_err(|err| malformed(format!("{err}")))?;
        let secret = if parsed.is_encrypted() {
            let password = match password {
                Some(password) => password,
                None if std::io::IsTerminal::is_terminal(&std::io::stdin()) => {
                    rpassword::prompt_password(format!("Password for {source_name}: ")).map_err(
                        |_| KeyError::NoPassword {
                            source_name: source_name.to_owned(),
                        },
                    )?
                }
                None => {
                    return Err(KeyError::NoPassword {
                        source_name: source_name.to_owned(),
                    });
                }
            };
            minisign::SecretKey::from_box(boxed, Some(password)).map_err(|err| {
                KeyError::Decrypt {
                    source_name: source_name.to_owned(),
                    reason: err.to_string(),
                }
            })?
        } else {
            minisign::SecretKey::from_unencrypted_box(boxed)
                .map_err(|err| malformed(format!("{err}")))?
        };
        Self::from_minisign(secret).map_err(malformed)
    }

    fn from_minisign(secret: minisign::SecretKey) -> Result<SigningKey, String> {
        let bytes = secret.to_bytes();
        if bytes.len() < SK_SECRET.end {
            return Err("the key is too short".into());
        }
        let seed: [u8; 32] = bytes[SK_SECRET.start..SK_SECRET.start + 32]
            .try_into()
            .expect("32 bytes");
        let ed25519 = ed25519_dalek::SigningKey::from_bytes(&seed);
        if ed25519.verifying_key().as_bytes()[..] != bytes[SK_SECRET.start + 32..SK_SECRET.end] {
            return Err("its public half does not belong to its secret half".into());
        }
        let minisign_public =
            minisign::PublicKey::from_secret_key(&secret).map_err(|err| err.to_string())?;
        Ok(SigningKey {
            key_id: key_id(&bytes[SK_KEYNUM]),
            ed25519,
            minisign_secret: secret,
            minisign_public,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn ed25519(&self) -> &ed25519_dalek::SigningKey {
        &self.ed25519
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey::from_minisign(self.minisign_public.clone())
            .expect("a loaded secret key's public half is valid")
    }

    /// A minisign signature (prehashed, as `minisign -S` makes by default)
    /// of `data`, with `trusted_comment` signed along with it.
    pub fn minisign(&self, data: &[u8], trusted_comment: &str) -> Result<String, String> {
        minisign::sign(
            Some(&self.minisign_public),
            &self.minisign_secret,
            std::io::Cursor::new(data),
            Some(trusted_comment),
            Some(&format!("signature from imgbuild key {}", self.key_id)),
        )
        .map(|signature| signature.into_string())
        .map_err(|err| err.to_string())
    }
}

impl PublicKey {
    /// Reads a minisign public key file, or takes the key's base64 line
    /// itself (`RW...`, what `minisign -P` takes).
    pub fn load(spec: &str) -> Result<PublicKey, KeyError> {
        let path = Path::new(spec);
        let (text, source_name) = if spec.starts_with("RW") && !path.exists() {
            (spec.to_owned(), "the given public key".to_owned())
        } else {
            let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
                what: "public key",
                path: path.to_path_buf(),
                source,
            })?;
            (text, path.display().to_string())
        };
        Self::parse(&text, &source_name)
    }

    pub fn parse(text: &str, source_name: &str) -> Result<PublicKey, KeyError> {
        let malformed = |reason: String| KeyError::Malformed {
            source_name: source_name.to_owned(),
            what: "public key",
            reason,
        };
        // The key line: the only one that is not a comment.
        let line = text
            .lines()
            .map(str::trim)
            .find(|line| !line.is_empty() && !line.starts_with("untrusted comment:"))
            .ok_or_else(|| malformed("no key line".into()))?;
        let key =
            minisign::PublicKey::from_base64(line).map_err(|err| malformed(err.to_string()))?;
        Self::from_minisign(key).map_err(malformed)
    }

    fn from_minisign(key: minisign::PublicKey) -> Result<PublicKey, String> {
        let bytes = key.to_bytes();
        if bytes.len() < PK_PUBLIC.end {
            return Err("the key is too short".into());
        }
        let raw: [u8; 32] = bytes[PK_PUBLIC].try_into().expect("32 bytes");
        let ed25519 = ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|_| "not an ed25519 public key".to_owned())?;
        Ok(PublicKey {
            key_id: key_id(&bytes[PK_KEYNUM]),
            ed25519,
            minisign: key,
        })
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn ed25519(&self) -> &ed25519_dalek::VerifyingKey {
        &self.ed25519
    }

    /// Checks a `.minisig` over `data`; the error says why it fails.
    pub fn verify_minisig(&self, data: &[u8], signature: &str) -> Result<(), String> {
        let signature =
            minisign::SignatureBox::from_string(signature).map_err(|err| err.to_string())?;
        if signature.keynum() != self.minisign.keynum() {
            return Err(format!(
                "it was made by key {}, not by {}",
                key_id(signature.keynum()),
                self.key_id
            ));
        }
        minisign::verify(
            &self.minisign,
            &signature,
            std::io::Cursor::new(data),
            true,
            false,
            false,
        )
        .map_err(|err| err.to_string())
    }

    /// The key file's text, as `minisign -G` writes it.
    pub fn to_file_text(&self) -> String {
        self.minisign
            .to_box()
            .expect("a public key always boxes")
            .into_string()
    }
}

/// What `imgbuild keygen` wrote.
#[derive(Debug)]
pub struct Generated {
    pub secret: PathBuf,
    pub public: PathBuf,
    pub key_id: String,
    pub encrypted: bool,
}

/// Makes a key pair and writes `imgbuild.key` (0600) and `imgbuild.pub`
/// into `dir`, never over an existing file. `password` encrypts the
/// secret key (scrypt, as minisign does).
pub fn generate(dir: &Path, password: Option<String>) -> Result<Generated, KeyError> {
    let secret_path = dir.join(SECRET_KEY_FILE);
    let public_path = dir.join(PUBLIC_KEY_FILE);
    for path in [&secret_path, &public_path] {
        if path.symlink_metadata().is_ok() {
            return Err(KeyError::Exists { path: path.clone() });
        }
    }
    let encrypted = password.is_some();
    let pair = match password {
        Some(password) => minisign::KeyPair::generate_encrypted_keypair(Some(password)),
        None => minisign::KeyPair::generate_unencrypted_keypair(),
    }
    .map_err(|err| KeyError::Generate(err.to_string()))?;
    let key_id = key_id(pair.pk.keynum());
    let comment = if encrypted {
        format!("imgbuild secret key {key_id} (encrypted)")
    } else {
        format!("imgbuild secret key {key_id} (not encrypted)")
    };
    let secret_text = pair
        .sk
        .to_box(Some(&comment))
        .map_err(|err| KeyError::Generate(err.to_string()))?
        .into_string();
    let public_text = pair
        .pk
        .to_box()
        .map_err(|err| KeyError::Generate(err.to_string()))?
        .into_string();
    std::fs::create_dir_all(dir).map_err(|source| KeyError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    write_new(&secret_path, secret_text.as_bytes(), 0o600)?;
    if let Err(err) = write_new(&public_path, public_text.as_bytes(), 0o644) {
        // A secret key without its public half is of no use, and would make
        // the next keygen refuse.
        let _ = std::fs::remove_file(&secret_path);
        return Err(err);
    }
    Ok(Generated {
        secret: secret_path,
        public: public_path,
        key_id,
        encrypted,
    })
}

/// Creates `path` with `mode` from the start (no moment at which the
/// secret key is readable by others), failing if it exists.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| KeyError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                io(source)
            }
        })?;
    let written = file.write_all(data).and_then(|()| file.sync_all());
    if let Err(source) = written {
        drop(file);
        let _ = std::fs::remove_file(path);
        return Err(io(source));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_a_pair_that_signs_and_verifies_both_ways_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let generated = generate(dir.path(), None).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&generated.secret)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let secret = SigningKey::load(generated.secret.to_str().unwrap()).unwrap();
        let public = PublicKey::load(generated.public.to_str().unwrap()).unwrap();
        assert_eq!(secret.key_id(), generated.key_id);
        assert_eq!(public.key_id(), generated.key_id);
        assert_eq!(
            secret.ed25519().verifying_key(),
            *public.ed25519(),
            "the DSSE key is the minisign key"
        );
        assert!(!format!("{secret:?}").contains(&hex::encode(secret.ed25519().to_bytes())));

        let signature = secret.minisign(b"data\n", "file:x").unwrap();
        public.verify_minisig(b"data\n", &signature).unwrap();
        assert!(public.verify_minisig(b"Data\n", &signature).is_err());

        // The key file's text itself is accepted, as from a CI secret.
        let text = std::fs::read_to_string(&generated.secret).unwrap();
        assert_eq!(SigningKey::load(&text).unwrap().key_id(), generated.key_id);

        let again = generate(dir.path(), None).unwrap_err();
        assert!(matches!(again, KeyError::Exists { .. }), "{again}");
        assert_eq!(std::fs::read_to_string(&generated.secret).unwrap(), text);
    }

    #[test]
    fn an_encrypted_key_needs_its_password() {
        let dir = tempfile::tempdir().unwrap();
        let generated = generate(dir.path(), Some("correct horse".into())).unwrap();
        let text = std::fs::read_to_string(&generated.secret).unwrap();
        let key = SigningKey::parse(&text, "k", Some("correct horse".into())).unwrap();
        assert_eq!(key.key_id(), generated.key_id);
        let wrong = SigningKey::parse(&text, "k", Some("wrong".into())).unwrap_err();
        assert!(matches!(wrong, KeyError::Decrypt { .. }), "{wrong}");
        // Tests run without a terminal on stdin: no prompt, a clear error.
        let none = SigningKey::parse(&text, "k", None).unwrap_err();
        assert!(none.to_string().contains(PASSWORD_ENV), "{none}");
    }

    #[test]
    fn a_public_key_file_is_not_a_secret_key() {
        let dir = tempfile::tempdir().unwrap();
        let generated = generate(dir.path(), None).unwrap();
        let public = std::fs::read_to_string(&generated.public).unwrap();
        let err = SigningKey::parse(&public, "imgbuild.pub", None).unwrap_err();
        assert!(err.to_string().contains("imgbuild keygen"), "{err}");
    }
}
