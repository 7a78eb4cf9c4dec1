//! The credentials the SSH communicator logs in with.

use crate::communicator::CommError;
use russh::keys::PrivateKey;
use russh::keys::ssh_key::private::{Ed25519Keypair, KeypairData};
use russh::keys::ssh_key::{HashAlg, LineEnding};
use std::io;
use std::path::Path;
use std::sync::Arc;

/// The comment on temporary public keys, so that a key found later in an
/// `authorized_keys` file or an EC2 key pair list says where it came from.
const TEMPORARY_KEY_COMMENT: &str = "imgbuild-temporary-key";

/// How to prove to the machine who we are.
#[derive(Clone)]
pub enum SshAuth {
    Key(Arc<PrivateKey>),
    Password(String),
}

impl SshAuth {
    /// Reads `private_key_file` for key authentication.
    pub fn from_key_file(path: &Path) -> Result<SshAuth, CommError> {
        load_private_key(path).map(SshAuth::Key)
    }

    /// Says which credential is in use without revealing it, for messages:
    /// "ed25519 key SHA256:..." or "password".
    pub fn describe(&self) -> String {
        match self {
            SshAuth::Key(key) => format!(
                "{} key {}",
                key.algorithm().as_str(),
                key.fingerprint(HashAlg::Sha256)
            ),
            SshAuth::Password(_) => "password".to_owned(),
        }
    }
}

// A derived Debug would print the password into panics and `{:?}` logs.
impl std::fmt::Debug for SshAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SshAuth::Key(_) => write!(f, "SshAuth::Key({})", self.describe()),
            SshAuth::Password(_) => f.write_str("SshAuth::Password(<sensitive>)"),
        }
    }
}

/// Loads an unencrypted private key (OpenSSH, PKCS#8 or PEM RSA format).
///
/// Encrypted keys are refused rather than prompted for: builds run
/// unattended, and a prompt in the middle of a build would hang it.
pub fn load_private_key(path: &Path) -> Result<Arc<PrivateKey>, CommError> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|err| {
        io::Error::new(
            err.kind(),
            format!("cannot read the SSH private key file {shown}: {err}"),
        )
    })?;
    let invalid = |reason: String| {
        CommError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the SSH private key file {shown} {reason}"),
        ))
    };
    let encrypted = || {
        invalid(
            "is protected by a passphrase, which imgbuild cannot ask for during a build; \
             use a key without a passphrase (`ssh-keygen -p -N '' -f FILE` removes it from a copy)"
                .to_owned(),
        )
    };
    // PEM-era RSA keys and PKCS#8 keys say so in their armour; russh does not
    // always report those as encrypted, only as unreadable.
    if text.contains("ENCRYPTED") {
        return Err(encrypted());
    }
    match russh::keys::decode_secret_key(&text, None) {
        Ok(key) if key.is_encrypted() => Err(encrypted()),
        Ok(key) => Ok(Arc::new(key)),
        Err(russh::keys::Error::KeyIsEncrypted) => Err(encrypted()),
        Err(err) => Err(invalid(format!(
            "does not hold a private key imgbuild can read ({err}); \
             expected an OpenSSH, PKCS#8 or PEM private key, not a public key"
        ))),
    }
}

/// A key pair made for one build, so that no long-lived credential has to
/// be baked into the image or handed to a cloud.
pub struct TemporaryKey {
    key: Arc<PrivateKey>,
    public_openssh: String,
    private_openssh: String,
}

impl TemporaryKey {
    pub fn generate() -> Result<TemporaryKey, CommError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|err| {
            io::Error::other(format!(
                "cannot generate a temporary SSH key: the system random number generator failed: {err}"
            ))
        })?;
        let keypair = Ed25519Keypair::from_seed(&seed);
        seed.fill(0);
        let key = PrivateKey::new(KeypairData::Ed25519(keypair), TEMPORARY_KEY_COMMENT)
            .map_err(encoding_error)?;
        let public_openssh = key.public_key().to_openssh().map_err(encoding_error)?;
        let private_openssh = key
            .to_openssh(LineEnding::LF)
            .map_err(encoding_error)?
            .to_string();
        Ok(TemporaryKey {
            key: Arc::new(key),
            public_openssh,
            private_openssh,
        })
    }

    /// A key kept as [`Self::private_openssh`] wrote it: the QEMU builder
    /// keeps one with a saved machine state, to log in to it again.
    pub fn from_private_openssh(text: &str) -> Result<TemporaryKey, CommError> {
        let key = PrivateKey::from_openssh(text).map_err(encoding_error)?;
        let public_openssh = key.public_key().to_openssh().map_err(encoding_error)?;
        Ok(TemporaryKey {
            key: Arc::new(key),
            public_openssh,
            private_openssh: text.to_owned(),
        })
    }

    pub fn private_key(&self) -> Arc<PrivateKey> {
        self.key.clone()
    }

    pub fn auth(&self) -> SshAuth {
        SshAuth::Key(self.key.clone())
    }

    /// The `ssh-ed25519 AAAA... imgbuild-temporary-key` line, for
    /// `authorized_keys`, cloud-init or EC2 ImportKeyPair.
    pub fn public_openssh(&self) -> &str {
        &self.public_openssh
    }

    /// The private key as an OpenSSH PEM file, so someone can `ssh -i` into
    /// a machine left running for debugging.
    pub fn private_openssh(&self) -> &str {
        &self.private_openssh
    }

    /// Writes [`Self::private_openssh`] to `path`, readable by the owner
    /// only (ssh refuses keys that others can read).
    pub fn write_private_openssh(&self, path: &Path) -> io::Result<()> {
        use std::io::Write;
        #[cfg(unix)]
        use std::os::unix::fs::OpenOptionsExt;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        options.mode(0o600);
        let mut file = options.open(path)?;
        file.write_all(self.private_openssh.as_bytes())?;
        file.sync_all()
    }
}

impl std::fmt::Debug for TemporaryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemporaryKey")
            .field("public", &self.public_openssh)
            .finish_non_exhaustive()
    }
}

fn encoding_error(err: russh::keys::ssh_key::Error) -> CommError {
    CommError::Io(io::Error::other(format!(
        "cannot encode the temporary SSH key: {err}"
    )))
}
