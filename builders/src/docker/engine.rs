//! The connection to the Docker Engine API, and how its errors read.

use bollard::Docker;
use bollard::errors::Error;
use std::time::Duration;

/// Where the engine is when `DOCKER_HOST` is not set.
const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// bollard's request timeout covers the wait for the response headers. Calls
/// that copy whole filesystems only answer once they are done: creating a
/// container on the vfs storage driver copies the image, commit and upload
/// write every file, removal deletes them. Those get this long before the
/// engine counts as hung; Ctrl-C still interrupts them at once.
const SLOW_CALL_TIMEOUT: Duration = Duration::from_secs(2 * 60 * 60);

/// An engine client: `quick` for calls that answer at once, `slow` for those
/// that work through a filesystem first.
#[derive(Clone)]
pub struct Engine {
    quick: Docker,
    slow: Docker,
    host: String,
}

impl Engine {
    /// Connects to `DOCKER_HOST` (the local socket by default) and agrees on
    /// an API version the engine speaks.
    pub async fn connect() -> Result<Engine, String> {
        let host = std::env::var("DOCKER_HOST")
            .ok()
            .filter(|host| !host.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_HOST.to_owned());
        let docker = Docker::connect_with_host(&host).map_err(|err| match err {
            Error::SocketNotFoundError(_) => unreachable_engine(&host, &err),
            _ => format!(
                "cannot use DOCKER_HOST={host}: {}; use unix:///path/to/docker.sock or tcp://host:port",
                describe(&err)
            ),
        })?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|err| unreachable_engine(&host, &err))?;
        let slow = docker.clone().with_timeout(SLOW_CALL_TIMEOUT);
        Ok(Engine {
            quick: docker,
            slow,
            host,
        })
    }

    pub fn quick(&self) -> &Docker {
        &self.quick
    }

    pub fn slow(&self) -> &Docker {
        &self.slow
    }

    /// The engine's address, for messages.
    pub fn host(&self) -> &str {
        &self.host
    }
}

fn unreachable_engine(host: &str, err: &Error) -> String {
    format!(
        "cannot reach the Docker engine at {host}: {}; start dockerd (or Docker Desktop), or point DOCKER_HOST at a running engine",
        describe(err)
    )
}

/// The engine's own message when it gave one, the cause chain otherwise.
pub fn describe(err: &Error) -> String {
    match err {
        Error::DockerResponseServerError {
            status_code,
            message,
        } => {
            let message = message.trim();
            if message.is_empty() {
                format!("the engine answered HTTP {status_code}")
            } else {
                message.to_owned()
            }
        }
        Error::DockerStreamError { error } => error.trim().to_owned(),
        Error::RequestTimeoutError => "the engine did not answer in time".to_owned(),
        // Its own text ("error in the hyper legacy client") says nothing;
        // the causes say what was refused.
        Error::HyperLegacyError { err } => chain(err),
        other => chain(other),
    }
}

fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

pub fn is_not_found(err: &Error) -> bool {
    matches!(
        err,
        Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// The container is stopped or paused: exec and archive calls answer 409.
pub fn is_conflict(err: &Error) -> bool {
    matches!(
        err,
        Error::DockerResponseServerError {
            status_code: 409,
            ..
        }
    )
}

/// A connection-level failure rather than an answer from the engine.
pub fn is_transport(err: &Error) -> bool {
    matches!(
        err,
        Error::HyperLegacyError { .. }
            | Error::HyperResponseError { .. }
            | Error::IOError { .. }
            | Error::SocketNotFoundError(_)
    )
}
