//! The connection to the Docker Engine API, and how its errors read.

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error;
use bollard::models::{ContainerConfig, ImageInspect};
use bollard::query_parameters::{
    CommitContainerOptions, ImportImageOptions, RemoveImageOptions, StopContainerOptions,
    TagImageOptions,
};
use futures_util::StreamExt;
use std::path::Path;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

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

/// The Engine API calls that check, commit, tag and remove images (and stop
/// the container before it is saved), behind a trait so the steps' logic can
/// be tested without an engine; [`Engine`] makes the real calls. Errors are
/// the engine's own, read with [`describe`] and [`is_not_found`].
#[async_trait]
pub trait ImageApi: Send + Sync {
    async fn inspect_image(&self, reference: &str) -> Result<ImageInspect, Error>;

    async fn stop_container(
        &self,
        container: &str,
        options: StopContainerOptions,
    ) -> Result<(), Error>;

    /// Returns the new image's id.
    async fn commit_container(
        &self,
        options: CommitContainerOptions,
        config: ContainerConfig,
    ) -> Result<String, Error>;

    async fn tag_image(&self, image: &str, options: TagImageOptions) -> Result<(), Error>;

    async fn remove_image(&self, reference: &str, options: RemoveImageOptions)
    -> Result<(), Error>;

    /// Writes `reference` as a `docker save` archive to `dest`.
    async fn save_image(&self, reference: &str, dest: &Path) -> Result<(), String>;

    /// Loads a `docker save` archive, with the tags it names.
    async fn load_image(&self, source: &Path) -> Result<(), String>;
}

#[async_trait]
impl ImageApi for Engine {
    async fn inspect_image(&self, reference: &str) -> Result<ImageInspect, Error> {
        self.quick.inspect_image(reference).await
    }

    async fn stop_container(
        &self,
        container: &str,
        options: StopContainerOptions,
    ) -> Result<(), Error> {
        self.slow.stop_container(container, Some(options)).await
    }

    async fn commit_container(
        &self,
        options: CommitContainerOptions,
        config: ContainerConfig,
    ) -> Result<String, Error> {
        self.slow
            .commit_container(options, config)
            .await
            .map(|response| response.id)
    }

    async fn tag_image(&self, image: &str, options: TagImageOptions) -> Result<(), Error> {
        self.quick.tag_image(image, Some(options)).await.map(|_| ())
    }

    async fn remove_image(
        &self,
        reference: &str,
        options: RemoveImageOptions,
    ) -> Result<(), Error> {
        self.slow
            .remove_image(reference, Some(options), None)
            .await
            .map(|_| ())
    }

    async fn save_image(&self, reference: &str, dest: &Path) -> Result<(), String> {
        let write_error = |err: std::io::Error| format!("cannot write {}: {err}", dest.display());
        let mut file = tokio::fs::File::create(dest).await.map_err(write_error)?;
        let mut stream = self.slow.export_image(reference);
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|err| format!("cannot save {reference}: {}", describe(&err)))?;
            file.write_all(&chunk).await.map_err(write_error)?;
        }
        file.sync_all().await.map_err(write_error)
    }

    async fn load_image(&self, source: &Path) -> Result<(), String> {
        let file = tokio::fs::File::open(source)
            .await
            .map_err(|err| format!("cannot read {}: {err}", source.display()))?;
        let options = ImportImageOptions {
            quiet: true,
            ..Default::default()
        };
        let mut progress =
            self.slow
                .import_image_stream(options, tokio_util::io::ReaderStream::new(file), None);
        while let Some(item) = progress.next().await {
            item.map_err(|err| format!("cannot load {}: {}", source.display(), describe(&err)))?;
        }
        Ok(())
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
        Error::HyperLegacyError { err } => error_chain(err),
        other => error_chain(other),
    }
}

/// The error's text followed by each cause that adds something, for
/// messages about engine and registry calls.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
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

#[cfg(test)]
impl Engine {
    /// A client for an address nothing answers at: a step under test that
    /// reaches past its trait to the engine fails instead of touching one.
    pub fn unreachable() -> Engine {
        let docker =
            Docker::connect_with_http("http://127.0.0.1:9", 1, bollard::API_DEFAULT_VERSION)
                .expect("a client needs no connection");
        Engine {
            quick: docker.clone(),
            slow: docker,
            host: "http://127.0.0.1:9".to_owned(),
        }
    }
}

/// A stand-in for the engine's image store: references mapped to image ids,
/// every call recorded.
#[cfg(test)]
pub mod fake {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    pub const NEW_IMAGE: &str =
        "sha256:0000000000000000000000000000000000000000000000000000000000000001";

    #[derive(Default)]
    pub struct FakeImages {
        /// `repository:tag` (and ids, under themselves) → image id.
        pub images: Mutex<BTreeMap<String, String>>,
        pub commits: Mutex<Vec<(CommitContainerOptions, ContainerConfig)>>,
        pub calls: Mutex<Vec<String>>,
    }

    impl FakeImages {
        pub fn with(images: &[(&str, &str)]) -> FakeImages {
            let fake = FakeImages::default();
            for (reference, id) in images {
                fake.images
                    .lock()
                    .unwrap()
                    .insert((*reference).to_owned(), (*id).to_owned());
            }
            fake
        }

        pub fn image(&self, reference: &str) -> Option<String> {
            self.images.lock().unwrap().get(reference).cloned()
        }

        pub fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }

        fn call(&self, text: String) {
            self.calls.lock().unwrap().push(text);
        }
    }

    fn not_found(reference: &str) -> Error {
        Error::DockerResponseServerError {
            status_code: 404,
            message: format!("No such image: {reference}"),
        }
    }

    #[async_trait]
    impl ImageApi for FakeImages {
        async fn inspect_image(&self, reference: &str) -> Result<ImageInspect, Error> {
            self.call(format!("inspect {reference}"));
            let images = self.images.lock().unwrap();
            let id = images
                .get(reference)
                .or_else(|| images.values().find(|id| *id == reference))
                .ok_or_else(|| not_found(reference))?;
            let repo_tags = images
                .iter()
                .filter(|(name, named)| *named == id && !name.starts_with("sha256:"))
                .map(|(name, _)| name.clone())
                .collect();
            Ok(ImageInspect {
                id: Some(id.clone()),
                repo_tags: Some(repo_tags),
                ..Default::default()
            })
        }

        async fn stop_container(
            &self,
            container: &str,
            _options: StopContainerOptions,
        ) -> Result<(), Error> {
            self.call(format!("stop {container}"));
            Ok(())
        }

        async fn commit_container(
            &self,
            options: CommitContainerOptions,
            config: ContainerConfig,
        ) -> Result<String, Error> {
            self.call("commit".to_owned());
            let reference = format!(
                "{}:{}",
                options.repo.clone().unwrap_or_default(),
                options.tag.clone().unwrap_or_default()
            );
            self.images
                .lock()
                .unwrap()
                .insert(reference, NEW_IMAGE.to_owned());
            self.commits.lock().unwrap().push((options, config));
            Ok(NEW_IMAGE.to_owned())
        }

        async fn tag_image(&self, image: &str, options: TagImageOptions) -> Result<(), Error> {
            let reference = format!(
                "{}:{}",
                options.repo.unwrap_or_default(),
                options.tag.unwrap_or_default()
            );
            self.call(format!("tag {image} {reference}"));
            self.images
                .lock()
                .unwrap()
                .insert(reference, image.to_owned());
            Ok(())
        }

        async fn remove_image(
            &self,
            reference: &str,
            _options: RemoveImageOptions,
        ) -> Result<(), Error> {
            self.call(format!("remove {reference}"));
            let mut images = self.images.lock().unwrap();
            let before = images.len();
            if reference.starts_with("sha256:") {
                images.retain(|_, id| id != reference);
            } else {
                images.remove(reference);
            }
            if images.len() == before {
                return Err(not_found(reference));
            }
            Ok(())
        }

        async fn save_image(&self, reference: &str, dest: &Path) -> Result<(), String> {
            self.call(format!("save {reference}"));
            std::fs::write(dest, reference).map_err(|err| err.to_string())
        }

        async fn load_image(&self, source: &Path) -> Result<(), String> {
            self.call(format!("load {}", source.display()));
            Err("the fake engine loads nothing".to_owned())
        }
    }
}
