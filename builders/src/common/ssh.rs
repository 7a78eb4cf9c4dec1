//! Connecting over SSH the way every SSH-based builder does.

use imgbuild_core::{StepContext, StepError};
use imgbuild_provisioners::CommError;
use imgbuild_provisioners::ssh::{
    Liveness, SshAuth, SshCommunicator, SshConfig, SshTarget, TemporaryKey, WaitOptions,
};
use std::path::Path;

/// Problems with an `ssh` table, as (field, message).
pub fn ssh_problems(ssh: &SshConfig, config_dir: &Path) -> Vec<(&'static str, String)> {
    let mut problems = Vec::new();
    if ssh.username.is_empty() {
        problems.push(("username", "must not be empty".to_owned()));
    }
    if let Some(path) = &ssh.private_key_file {
        let path = config_dir.join(path);
        if let Err(err) = std::fs::metadata(&path) {
            problems.push((
                "private_key_file",
                format!("cannot read {}: {err}", path.display()),
            ));
        }
    }
    for (field, value) in [
        ("timeout", ssh.timeout),
        ("connect_timeout", ssh.connect_timeout),
    ] {
        if value.is_zero() {
            problems.push((field, "must be longer than 0s".to_owned()));
        }
    }
    if ssh.password.is_some() && ssh.private_key_file.is_some() {
        problems.push((
            "password",
            "give either `password` or `private_key_file`, not both".to_owned(),
        ));
    }
    problems
}

/// Waits for SSH on `default_target` (unless the config overrides host or
/// port) and logs in with the configured credential or `temporary_key`,
/// as patiently as `wait` says.
pub async fn connect(
    ssh: &SshConfig,
    config_dir: &Path,
    default_target: SshTarget,
    temporary_key: Option<&TemporaryKey>,
    wait: WaitOptions,
    cx: &StepContext,
    liveness: Option<Liveness>,
) -> Result<SshCommunicator, LoginError> {
    let mut resolved = ssh.clone();
    resolved.private_key_file = ssh
        .private_key_file
        .as_ref()
        .map(|path| config_dir.join(path));
    let auth = match resolved
        .auth()
        .map_err(|err| LoginError::Failed(err.to_string()))?
    {
        Some(auth) => auth,
        None => match temporary_key {
            Some(key) => key.auth(),
            None => {
                return Err(LoginError::Failed(
                    "no SSH credential: set `ssh.password` or `ssh.private_key_file`".to_owned(),
                ));
            }
        },
    };
    let target = resolved.target(&default_target.host, default_target.port);
    let communicator = SshCommunicator::connect(
        target,
        resolved.username.clone(),
        auth,
        wait,
        cx.cancel.clone(),
        cx.log.clone(),
        liveness,
    )
    .await;
    match communicator {
        Ok(communicator) => Ok(communicator),
        Err(_) if cx.cancel.is_cancelled() => Err(LoginError::Cancelled),
        Err(err @ CommError::Rejected { .. }) => Err(LoginError::Rejected(err.to_string())),
        Err(err) => Err(LoginError::Failed(err.to_string())),
    }
}

/// Why a login failed.
#[derive(Debug)]
pub enum LoginError {
    Cancelled,
    /// The server answered and refused the credentials for as long as they
    /// were given.
    Rejected(String),
    Failed(String),
}

impl From<LoginError> for StepError {
    fn from(err: LoginError) -> StepError {
        match err {
            LoginError::Cancelled => StepError::Cancelled,
            LoginError::Rejected(message) | LoginError::Failed(message) => {
                StepError::Failed(message)
            }
        }
    }
}

pub fn describe_auth(auth: &SshAuth) -> String {
    auth.describe()
}
