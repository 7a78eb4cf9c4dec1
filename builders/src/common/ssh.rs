//! Connecting over SSH the way every SSH-based builder does.

use imgbuild_core::{StepContext, StepError};
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
) -> Result<SshCommunicator, StepError> {
    let mut resolved = ssh.clone();
    resolved.private_key_file = ssh
        .private_key_file
        .as_ref()
        .map(|path| config_dir.join(path));
    let auth = match resolved.auth().map_err(StepError::failed)? {
        Some(auth) => auth,
        None => match temporary_key {
            Some(key) => key.auth(),
            None => {
                return Err(StepError::failed(
                    "no SSH credential: set `ssh.password` or `ssh.private_key_file`",
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
        Err(_) if cx.cancel.is_cancelled() => Err(StepError::Cancelled),
        Err(err) => Err(StepError::failed(err)),
    }
}

pub fn describe_auth(auth: &SshAuth) -> String {
    auth.describe()
}
