//! Delivers the committed image (`push`): tags it into each repository it
//! goes to, then pushes through the Engine API with the user's credentials
//! in `X-Registry-Auth`, layer progress as events, transient failures
//! (connection refused or reset, timeouts, 5xx) retried with backoff. Runs
//! after the `[[test]]`s (through `Builder::deliver`), so only an image
//! that passed them leaves the machine.
//!
//! The moving tags go first and the version tags last: a push that fails
//! part way leaves no version tag in a registry unless every push before it
//! succeeded, so building the version again is not refused by the
//! registry check.
//!
//! Uses `state.artifact` (the committed image). Produces
//! `details.pushed`: `[{repository, tag, digest, reference}]`, where
//! `reference` is `repository@digest`, what a deployment pins. On failure
//! its cleanup removes the tags it made and the image the build committed:
//! nothing is recorded for it, and it would block the version locally.

use super::DockerState;
use super::credentials::Credential;
use super::engine;
use super::remote::{self, CERTS_DIR, RemoteRepository};
use super::step_check_tag::Target;
use async_trait::async_trait;
use bollard::query_parameters::{PushImageOptions, TagImageOptions};
use futures_util::StreamExt;
use imgbuild_core::step::CleanupOutcome;
use imgbuild_core::{Step, StepContext, StepError};
use serde::Serialize;
use std::time::Duration;

/// Attempts per tag for transient failures, and the wait before each retry.
const RETRY_DELAYS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(3),
    Duration::from_secs(6),
];

/// One tag in a registry, as pushed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pushed {
    pub repository: String,
    pub tag: String,
    pub digest: String,
    /// `repository@digest`.
    pub reference: String,
}

pub struct StepPush {
    target: Target,
    /// Local tags made for other repositories, taken back on failure.
    tagged: Vec<String>,
}

impl StepPush {
    pub fn new(target: Target) -> Self {
        StepPush {
            target,
            tagged: Vec::new(),
        }
    }
}

/// Why one push attempt failed, sorted by what helps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Worth another attempt: the registry or the way to it had a moment.
    Transient,
    Auth,
    Tls,
    Other,
}

fn classify(message: &str) -> Failure {
    let lower = message.to_ascii_lowercase();
    let any = |needles: &[&str]| needles.iter().any(|needle| lower.contains(needle));
    if any(&[
        "unauthorized",
        "authentication required",
        "no basic auth credentials",
        "denied",
        "forbidden",
        "incorrect username or password",
    ]) {
        Failure::Auth
    } else if any(&["x509", "certificate", "tls: "]) && !any(&["handshake timeout"]) {
        Failure::Tls
    } else if any(&[
        "connection refused",
        "connection reset",
        "broken pipe",
        "timeout",
        "timed out",
        "eof",
        "no such host",
        "temporary failure",
        "500 internal server error",
        "502 bad gateway",
        "503 service unavailable",
        "504 gateway",
        "status: 50",
        "status code 50",
    ]) {
        Failure::Transient
    } else {
        Failure::Other
    }
}

/// The digest in the engine's last push message, `<tag>: digest: sha256:…
/// size: N`.
fn digest_in(status: &str) -> Option<String> {
    let (_, rest) = status.split_once("digest: ")?;
    let digest = rest.split_whitespace().next()?;
    (digest.contains(':')).then(|| digest.to_owned())
}

impl StepPush {
    async fn push_tag(
        &self,
        state: &DockerState,
        repository: &RemoteRepository,
        tag: &str,
        credential: &Credential,
        layers: u64,
        cx: &StepContext,
    ) -> Result<String, StepError> {
        let reference = format!("{}:{tag}", repository.name);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .push_once(state, repository, tag, credential, layers, cx)
                .await
            {
                Ok(digest) => return Ok(digest),
                Err(message) => {
                    let kind = classify(&message);
                    if kind == Failure::Transient && attempt <= RETRY_DELAYS.len() {
                        let delay = RETRY_DELAYS[attempt - 1];
                        cx.log.warn(format!(
                            "pushing {reference} failed ({message}); retrying in {}s (attempt {} of {})",
                            delay.as_secs(),
                            attempt + 1,
                            RETRY_DELAYS.len() + 1
                        ));
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    return Err(StepError::failed(failure_message(
                        &reference,
                        repository,
                        credential,
                        &message,
                        kind,
                        attempt,
                        state.engine.host(),
                    )));
                }
            }
        }
    }

    async fn push_once(
        &self,
        state: &DockerState,
        repository: &RemoteRepository,
        tag: &str,
        credential: &Credential,
        layers: u64,
        cx: &StepContext,
    ) -> Result<String, String> {
        let options = PushImageOptions {
            tag: Some(tag.to_owned()),
            platform: None,
        };
        let server = super::credentials::server_key(&repository.registry);
        let mut stream = state.engine.slow().push_image(
            &repository.name,
            Some(options),
            Some(credential.for_engine(&server)),
        );
        let task = format!("push {}:{tag}", repository.name);
        let mut done = 0u64;
        let mut digest = None;
        // The engine's push messages do not say which layer they are about,
        // so bytes cannot be summed: progress is finished layers, in percent.
        cx.log.progress_percent(&task, 0);
        while let Some(message) = stream.next().await {
            let message = message.map_err(|err| engine::describe(&err))?;
            let status = message.status.unwrap_or_default();
            if status == "Pushed"
                || status == "Layer already exists"
                || status.starts_with("Mounted from")
            {
                done += 1;
                cx.log
                    .progress_percent(&task, done.min(layers) * 100 / layers);
            } else if let Some(found) = digest_in(&status) {
                digest = Some(found);
            }
        }
        cx.log.progress_percent(&task, 100);
        match digest {
            Some(digest) => Ok(digest),
            // Older engines may word the last message differently; the
            // engine also files the digest with the image.
            None => self.recorded_digest(state, &repository.name).await,
        }
    }

    async fn recorded_digest(
        &self,
        state: &DockerState,
        repository: &str,
    ) -> Result<String, String> {
        let image = state
            .artifact
            .as_ref()
            .map(|artifact| artifact.id.clone())
            .unwrap_or_default();
        let inspected = state
            .images
            .inspect_image(&image)
            .await
            .map_err(|err| engine::describe(&err))?;
        let prefix = format!("{repository}@");
        inspected
            .repo_digests
            .unwrap_or_default()
            .into_iter()
            .find_map(|digest| digest.strip_prefix(&prefix).map(str::to_owned))
            .ok_or_else(|| {
                format!("the engine finished the push without reporting the digest of {repository}")
            })
    }
}

fn failure_message(
    reference: &str,
    repository: &RemoteRepository,
    credential: &Credential,
    message: &str,
    kind: Failure,
    attempts: usize,
    engine_host: &str,
) -> String {
    let registry = &repository.registry;
    let what = format!("cannot push {reference} to the registry {registry}: {message}");
    let hint = match kind {
        Failure::Auth if *credential == Credential::Anonymous => format!(
            "no credentials are configured for {registry}: log in with `docker login {registry}` (or set DOCKER_CONFIG to a directory whose config.json has them)"
        ),
        Failure::Auth => format!(
            "the registry refused {} from the docker config: check them with `docker login {registry}`, and that the account may push to {}",
            credential.describe(),
            repository.name
        ),
        Failure::Tls => format!(
            "the Docker engine does not trust the registry's certificate: put its CA in {CERTS_DIR}/{registry}/ca.crt on the engine's machine"
        ),
        Failure::Transient => format!(
            "gave up after {attempts} attempts; is the registry running and reachable from the Docker engine at {engine_host}?"
        ),
        Failure::Other => "check the registry's logs".to_owned(),
    };
    format!("{what}; {hint}")
}

#[async_trait]
impl Step<DockerState> for StepPush {
    fn name(&self) -> &'static str {
        "push"
    }

    async fn run(&mut self, state: &mut DockerState, cx: &StepContext) -> Result<(), StepError> {
        let Some(artifact) = state.artifact.as_ref() else {
            return Err(StepError::failed("no committed image to push"));
        };
        let image_id = artifact.id.clone();
        let layers = state
            .images
            .inspect_image(&image_id)
            .await
            .ok()
            .and_then(|inspected| inspected.root_fs)
            .and_then(|root_fs| root_fs.layers)
            .map_or(1, |layers| layers.len() as u64)
            .max(1);
        let mut repositories = Vec::new();
        for name in &self.target.push {
            let repository = RemoteRepository::parse(name);
            let credential = remote::credential_for(&repository.registry, &cx.log)
                .await
                .map_err(StepError::failed)?;
            if *name != self.target.repository {
                for tag in &self.target.push_tags {
                    let reference = format!("{name}:{tag}");
                    let options = TagImageOptions {
                        repo: Some(name.clone()),
                        tag: Some(tag.clone()),
                    };
                    state
                        .images
                        .tag_image(&image_id, options)
                        .await
                        .map_err(|err| {
                            StepError::failed(format!(
                                "cannot tag the image {image_id} as {reference} to push it: {}",
                                engine::describe(&err)
                            ))
                        })?;
                    self.tagged.push(reference);
                }
            }
            repositories.push((repository, credential));
        }
        // Moving tags first, the version tags last (see the module doc).
        let mut order: Vec<(usize, &str)> = Vec::new();
        for tag in self.target.push_tags.iter().skip(1) {
            order.extend((0..repositories.len()).map(|index| (index, tag.as_str())));
        }
        order.extend((0..repositories.len()).map(|index| (index, self.target.version.as_str())));
        let mut pushed: Vec<Pushed> = Vec::new();
        for (index, tag) in order {
            let (repository, credential) = &repositories[index];
            let reference = format!("{}:{tag}", repository.name);
            cx.log
                .info(format!("pushing {reference} ({})", credential.describe()));
            let digest = self
                .push_tag(state, repository, tag, credential, layers, cx)
                .await
                .map_err(|err| match err {
                    StepError::Failed(message) if !pushed.is_empty() => StepError::Failed(format!(
                        "{message} (already pushed: {})",
                        pushed
                            .iter()
                            .map(|p| format!("{}:{}", p.repository, p.tag))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                    other => other,
                })?;
            cx.log.info(format!(
                "pushed {reference} as {}@{digest}",
                repository.name
            ));
            pushed.push(Pushed {
                repository: repository.name.clone(),
                tag: tag.to_owned(),
                reference: format!("{}@{digest}", repository.name),
                digest,
            });
        }
        // Recorded per repository, the version first, as configured.
        let rank = |p: &Pushed| {
            (
                self.target.push.iter().position(|r| *r == p.repository),
                self.target.push_tags.iter().position(|t| *t == p.tag),
            )
        };
        pushed.sort_by_key(rank);
        let artifact = state.artifact.as_mut().expect("checked above");
        if let Some(details) = artifact.details.as_object_mut() {
            details.insert(
                "pushed".to_owned(),
                serde_json::to_value(&pushed).expect("plain data serializes"),
            );
        }
        Ok(())
    }

    async fn cleanup(
        &mut self,
        state: &mut DockerState,
        cx: &StepContext,
        outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        if outcome == CleanupOutcome::Succeeded {
            return Ok(());
        }
        let mut errors = Vec::new();
        for reference in self.tagged.drain(..) {
            if let Err(message) = super::remove_image(state.images.as_ref(), &reference).await {
                errors.push(message);
            }
        }
        if let Some(artifact) = state.artifact.as_ref() {
            cx.log.info(format!(
                "the push did not finish, so this version is not recorded: removing the committed image {} so that it can be built again",
                artifact.id
            ));
            if let Err(err) = super::delete::delete(artifact, cx).await {
                errors.push(err.to_string());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(StepError::failed(errors.join("; ")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_messages_are_sorted_by_what_helps() {
        for (message, kind) in [
            (
                "Get \"http://127.0.0.1:5999/v2/\": dial tcp 127.0.0.1:5999: connect: connection refused",
                Failure::Transient,
            ),
            (
                "read tcp 127.0.0.1:4->127.0.0.1:5: read: connection reset by peer",
                Failure::Transient,
            ),
            ("net/http: TLS handshake timeout", Failure::Transient),
            (
                "received unexpected HTTP status: 503 Service Unavailable",
                Failure::Transient,
            ),
            ("unauthorized: authentication required", Failure::Auth),
            ("no basic auth credentials", Failure::Auth),
            (
                "denied: requested access to the resource is denied",
                Failure::Auth,
            ),
            (
                "Get \"https://r:5443/v2/\": x509: certificate signed by unknown authority",
                Failure::Tls,
            ),
            ("manifest invalid: manifest invalid", Failure::Other),
        ] {
            assert_eq!(classify(message), kind, "{message}");
        }
    }

    #[test]
    fn the_digest_comes_from_the_last_message() {
        assert_eq!(
            digest_in("1.0.0: digest: sha256:0123abcd size: 528").as_deref(),
            Some("sha256:0123abcd")
        );
        assert_eq!(digest_in("Pushed"), None);
        assert_eq!(digest_in("The push refers to repository [x]"), None);
    }

    #[test]
    fn failures_say_what_to_do_without_secrets() {
        let repository = RemoteRepository::parse("127.0.0.1:5443/team/app");
        let credential = Credential::Basic {
            username: "u".into(),
            password: "hunter2".into(),
        };
        let message = failure_message(
            "127.0.0.1:5443/team/app:1",
            &repository,
            &credential,
            "unauthorized: authentication required",
            Failure::Auth,
            1,
            "unix:///var/run/docker.sock",
        );
        assert!(message.contains("registry 127.0.0.1:5443"), "{message}");
        assert!(message.contains("docker login 127.0.0.1:5443"), "{message}");
        assert!(!message.contains("hunter2"), "{message}");
        let message = failure_message(
            "127.0.0.1:5443/team/app:1",
            &repository,
            &Credential::Anonymous,
            "x509: certificate signed by unknown authority",
            Failure::Tls,
            1,
            "unix:///var/run/docker.sock",
        );
        assert!(
            message.contains("/etc/docker/certs.d/127.0.0.1:5443/ca.crt"),
            "{message}"
        );
    }
}
