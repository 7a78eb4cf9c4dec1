//! A user's registry credentials, found as the docker CLI finds them: in
//! `$DOCKER_CONFIG/config.json` (else `~/.docker/config.json`), from
//! `auths` (`auth`, `username`/`password`, `identitytoken`), a per-registry
//! `credHelpers` entry or the default `credsStore`, whose
//! `docker-credential-<name> get` is run with the registry on stdin.
//!
//! Reading `auths` is the `docker_credential` crate's; this module picks
//! the file, runs helpers itself (the crate reports a helper that exits
//! before reading its stdin as "not installed"), runs it all off the async
//! threads, tells "no credentials" (pushed anonymously) from a broken setup,
//! and keeps secrets out of `Debug` and of every message.

use base64::Engine as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use thiserror::Error;

/// What a registry is sent. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// No entry for the registry: requests go without credentials.
    Anonymous,
    Basic {
        username: String,
        password: String,
    },
    /// An OAuth refresh token (`identitytoken`, or a helper's `<token>`).
    IdentityToken(String),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Anonymous => f.write_str("Anonymous"),
            Credential::Basic { username, .. } => {
                write!(f, "Basic {{ username: {username:?}, password: <hidden> }}")
            }
            Credential::IdentityToken(_) => f.write_str("IdentityToken(<hidden>)"),
        }
    }
}

impl Credential {
    /// The values that must never be shown, for the log's redactor.
    pub fn secrets(&self) -> Vec<String> {
        match self {
            Credential::Anonymous => Vec::new(),
            Credential::Basic { username, password } => vec![
                password.clone(),
                base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}")),
            ],
            Credential::IdentityToken(token) => vec![token.clone()],
        }
    }

    /// The engine's `X-Registry-Auth` for `server` (bollard encodes it).
    pub fn for_engine(&self, server: &str) -> bollard::auth::DockerCredentials {
        let mut credentials = bollard::auth::DockerCredentials {
            serveraddress: Some(server.to_owned()),
            ..Default::default()
        };
        match self {
            Credential::Anonymous => {}
            Credential::Basic { username, password } => {
                credentials.username = Some(username.clone());
                credentials.password = Some(password.clone());
            }
            Credential::IdentityToken(token) => credentials.identitytoken = Some(token.clone()),
        }
        credentials
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Credential::Anonymous => "no credentials",
            Credential::Basic { .. } => "a username and password",
            Credential::IdentityToken(_) => "an identity token",
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error(
        "cannot read the docker config {path}: {reason}; fix the file (it is JSON), or point DOCKER_CONFIG at a directory with a valid config.json"
    )]
    Config { path: PathBuf, reason: String },
    #[error(
        "cannot run the credential helper docker-credential-{helper} (named in {path} for {server}): it is not installed or not on PATH; install it, or remove it from the config and `docker login {server}`"
    )]
    HelperMissing {
        helper: String,
        server: String,
        path: PathBuf,
    },
    #[error(
        "the credential helper docker-credential-{helper} failed for {server}: {message}; check that it works with `echo {server} | docker-credential-{helper} get`"
    )]
    HelperFailed {
        helper: String,
        server: String,
        message: String,
    },
    #[error(
        "the credential helper docker-credential-{helper} answered `get` for {server} with something other than {{\"Username\": ..., \"Secret\": ...}}"
    )]
    HelperMalformed { helper: String, server: String },
    #[error(
        "the credentials for {server} in {path} cannot be read: {reason}; log in again with `docker login {server}`"
    )]
    BadEntry {
        server: String,
        path: PathBuf,
        reason: &'static str,
    },
}

/// The directory the docker CLI reads `config.json` from.
pub fn config_dir() -> Option<PathBuf> {
    std::env::var_os("DOCKER_CONFIG")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker")))
}

/// The key a registry's credentials are filed under: Docker Hub's is its
/// historic index URL, every other registry's its `host[:port]`.
pub fn server_key(registry: &str) -> String {
    match registry {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => {
            "https://index.docker.io/v1/".to_owned()
        }
        other => other.to_owned(),
    }
}

/// The credential for `registry` (`host[:port]`, `docker.io` for Docker
/// Hub). Runs helpers, so it blocks: call it through [`lookup_async`].
pub fn lookup(registry: &str) -> Result<Credential, CredentialError> {
    let Some(dir) = config_dir() else {
        return Ok(Credential::Anonymous);
    };
    lookup_in(&dir.join("config.json"), registry)
}

pub async fn lookup_async(registry: &str) -> Result<Credential, CredentialError> {
    let registry = registry.to_owned();
    tokio::task::spawn_blocking(move || lookup(&registry))
        .await
        .unwrap_or_else(|join| {
            Err(CredentialError::Config {
                path: PathBuf::from("config.json"),
                reason: format!("the lookup crashed: {join}"),
            })
        })
}

/// As [`lookup`], with the config file given.
pub fn lookup_in(path: &Path, registry: &str) -> Result<Credential, CredentialError> {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    let server = server_key(registry);
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Credential::Anonymous);
        }
        Err(err) => {
            return Err(CredentialError::Config {
                path: path.to_owned(),
                reason: err.to_string(),
            });
        }
    };
    // Read here first: the crate says only "unable to read config" for a
    // malformed file, and the helper's name is needed for messages.
    let config: serde_json::Value =
        serde_json::from_slice(&text).map_err(|err| CredentialError::Config {
            path: path.to_owned(),
            reason: err.to_string(),
        })?;
    let helper = config["credHelpers"][&server]
        .as_str()
        .or_else(|| config["credHelpers"][registry].as_str())
        .filter(|name| !name.is_empty())
        .or_else(|| {
            config["credsStore"]
                .as_str()
                .filter(|name| !name.is_empty())
        })
        .unwrap_or_default()
        .to_owned();
    if !helper.is_empty() {
        return run_helper(&helper, &server, path);
    }
    let bad_entry = |reason| CredentialError::BadEntry {
        server: server.clone(),
        path: path.to_owned(),
        reason,
    };
    match docker_credential::get_credential_from_reader(text.as_slice(), &server) {
        Ok(DockerCredential::UsernamePassword(username, password)) => {
            Ok(Credential::Basic { username, password })
        }
        Ok(DockerCredential::IdentityToken(token)) => Ok(Credential::IdentityToken(token)),
        Err(E::NoCredentialConfigured) => Ok(Credential::Anonymous),
        // Only helpers fail these ways, and helpers are run above.
        Err(E::HelperFailure { .. } | E::HelperCommunicationError | E::MalformedHelperResponse) => {
            Err(CredentialError::HelperMissing {
                helper,
                server,
                path: path.to_owned(),
            })
        }
        Err(E::CredentialDecodingError) => Err(bad_entry(
            "its `auth` is not the base64 of `username:password`",
        )),
        Err(E::CredentialMismatchError) => Err(bad_entry(
            "its `auth` and its `username`/`password` disagree",
        )),
        Err(E::ConfigNotFound | E::ConfigReadError) => Err(CredentialError::Config {
            path: path.to_owned(),
            reason: "not a docker config".to_owned(),
        }),
    }
}

/// Runs `docker-credential-<helper> get` with `server` on stdin, as the
/// docker CLI does. A helper may exit without reading its stdin (a locked
/// keychain fails at once), so a closed pipe is not an error: the exit status
/// and output say what happened.
fn run_helper(helper: &str, server: &str, path: &Path) -> Result<Credential, CredentialError> {
    let failed = |message: String| CredentialError::HelperFailed {
        helper: helper.to_owned(),
        server: server.to_owned(),
        message,
    };
    let mut child = match Command::new(format!("docker-credential-{helper}"))
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(err)
            if matches!(
                err.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            ) =>
        {
            return Err(CredentialError::HelperMissing {
                helper: helper.to_owned(),
                server: server.to_owned(),
                path: path.to_owned(),
            });
        }
        Err(err) => return Err(failed(format!("it cannot be started: {err}"))),
    };
    if let Some(mut stdin) = child.stdin.take() {
        match stdin.write_all(server.as_bytes()) {
            Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(format!("it cannot be sent the server: {err}")));
            }
            // Dropping stdin closes it: the helper reads to the end.
            _ => {}
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|err| failed(format!("its output cannot be read: {err}")))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // The protocol's "nothing stored for this server".
        if stdout.contains("credentials not found") {
            return Ok(Credential::Anonymous);
        }
        // The protocol puts the error on stdout; some helpers use stderr.
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message = [stdout.trim(), stderr.trim()]
            .into_iter()
            .find(|text| !text.is_empty())
            .unwrap_or("it exited unsuccessfully without a message");
        let mut message: String = message.lines().next().unwrap_or_default().to_owned();
        if message.len() > 200 {
            message.truncate(message.floor_char_boundary(200));
            message.push('…');
        }
        return Err(failed(message));
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Answer {
        username: String,
        secret: String,
    }
    let answer: Answer =
        serde_json::from_slice(&output.stdout).map_err(|_| CredentialError::HelperMalformed {
            helper: helper.to_owned(),
            server: server.to_owned(),
        })?;
    Ok(if answer.username == "<token>" {
        Credential::IdentityToken(answer.secret)
    } else {
        Credential::Basic {
            username: answer.username,
            password: answer.secret,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn config(dir: &Path, json: serde_json::Value) -> PathBuf {
        let path = dir.join("config.json");
        std::fs::write(&path, json.to_string()).unwrap();
        path
    }

    fn basic(username: &str, password: &str) -> Credential {
        Credential::Basic {
            username: username.into(),
            password: password.into(),
        }
    }

    #[test]
    fn auths_give_basic_credentials_or_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let encoded = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
        let path = config(
            dir.path(),
            serde_json::json!({"auths": {
                "registry.example.com:5000": {"auth": encoded},
                "plain.example.com": {"username": "bob", "password": "pw"},
                "https://index.docker.io/v1/": {"identitytoken": "tok"},
            }}),
        );
        assert_eq!(
            lookup_in(&path, "registry.example.com:5000").unwrap(),
            basic("alice", "s3cret")
        );
        assert_eq!(
            lookup_in(&path, "plain.example.com").unwrap(),
            basic("bob", "pw")
        );
        assert_eq!(
            lookup_in(&path, "docker.io").unwrap(),
            Credential::IdentityToken("tok".into())
        );
        assert_eq!(
            lookup_in(&path, "other.example.com").unwrap(),
            Credential::Anonymous
        );
    }

    #[test]
    fn a_missing_file_is_anonymous_and_a_broken_one_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("config.json");
        assert_eq!(
            lookup_in(&missing, "r.example.com").unwrap(),
            Credential::Anonymous
        );
        std::fs::write(&missing, "{not json").unwrap();
        let err = lookup_in(&missing, "r.example.com")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read the docker config"), "{err}");
        let path = config(
            dir.path(),
            serde_json::json!({"auths": {"r.example.com": {"auth": "!!!"}}}),
        );
        let err = lookup_in(&path, "r.example.com").unwrap_err().to_string();
        assert!(err.contains("not the base64"), "{err}");
    }

    /// A helper speaking the real protocol, on a PATH of its own. Only this
    /// test changes PATH in this binary's process; the helpers' names are
    /// unique to it.
    #[test]
    fn helpers_are_run_with_the_server_on_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let write_helper = |name: &str, body: &str| {
            let path = bin.join(format!("docker-credential-{name}"));
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        write_helper(
            "imgbuildunit",
            r#"[ "$1" = get ] || exit 2
read server
case "$server" in
  r.example.com) echo '{"ServerURL":"r.example.com","Username":"carol","Secret":"from-helper"}' ;;
  tok.example.com) echo '{"ServerURL":"tok.example.com","Username":"<token>","Secret":"refresh"}' ;;
  *) echo "credentials not found in native keychain"; exit 1 ;;
esac"#,
        );
        write_helper("imgbuildbroken", "echo 'the keychain is locked'; exit 1");
        let old_path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![bin.clone()];
        paths.extend(std::env::split_paths(&old_path));
        // SAFETY: no other test of this crate reads or writes PATH while it
        // runs helpers; the only other helper runs are in this test.
        unsafe { std::env::set_var("PATH", std::env::join_paths(paths).unwrap()) };
        let path = config(
            dir.path(),
            serde_json::json!({
                "credsStore": "imgbuildunit",
                "credHelpers": {"broken.example.com": "imgbuildbroken", "gone.example.com": "imgbuildnothere"},
            }),
        );
        assert_eq!(
            lookup_in(&path, "r.example.com").unwrap(),
            basic("carol", "from-helper")
        );
        assert_eq!(
            lookup_in(&path, "tok.example.com").unwrap(),
            Credential::IdentityToken("refresh".into())
        );
        assert_eq!(
            lookup_in(&path, "unknown.example.com").unwrap(),
            Credential::Anonymous
        );
        // The broken helper exits without reading the server it is sent; it
        // often does so before the server is written. Each of these runs
        // must still report what it said, never that it is missing.
        for _ in 0..200 {
            let err = lookup_in(&path, "broken.example.com")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("docker-credential-imgbuildbroken failed for broken.example.com: the keychain is locked"),
                "{err}"
            );
        }
        let err = lookup_in(&path, "gone.example.com")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("docker-credential-imgbuildnothere") && err.contains("not on PATH"),
            "{err}"
        );
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let credential = basic("alice", "s3cret");
        let shown = format!("{credential:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(credential.secrets().contains(&"s3cret".to_owned()));
        assert!(!format!("{:?}", Credential::IdentityToken("tok-123".into())).contains("tok-123"));
    }
}
