//! The Docker builder: starts a container from a base image, provisions it
//! through the Engine API (exec and archive calls; no SSH server needed) and
//! commits it as `<repository>:<version>`, or exports its filesystem as a tar
//! file, or discards it.
//!
//! Steps, in order: check that the version tag is free, make sure the base
//! image is present (pulling it), create and start the container, connect,
//! provision, then commit, export or discard.
//!
//! The engine is whatever `DOCKER_HOST` names (the local socket by
//! default); the docker CLI is never run.

pub mod communicator;
pub mod config;
mod engine;
mod step_check_tag;
mod step_commit;
mod step_connect;
mod step_create_container;
mod step_discard;
mod step_export;
mod step_pull;

pub use communicator::DockerCommunicator;
pub use config::DockerConfig;

use crate::common::outcome::steps_result;
use crate::common::step_provision::{HasCommunicator, StepProvision};
use crate::{
    Artifact, BuildError, BuildRequest, Builder, ConfigProblem, ImageInfo, PlannedArtifact,
};
use async_trait::async_trait;
use bollard::query_parameters::{
    InspectContainerOptions, RemoveContainerOptions, RemoveImageOptions,
};
use config::{Output, PullPolicy};
use engine::Engine;
use imgbuild_core::{Resource, Step, StepContext, StepError, run_steps};
use imgbuild_provisioners::Communicator;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Label on every build container: the run that started it.
///
/// The commit API merges the container's labels into the image, so images
/// built here carry it too (it names the run that built them), and so do
/// containers later started from those images. Leftovers are therefore
/// never selected by this label alone: a container is removed by its
/// deterministic name, and only when it also carries the run's id here.
pub const RUN_ID_LABEL: &str = "org.imgbuild.run-id";
/// Label on every build container: the build (within the run) it belongs to.
pub const BUILD_LABEL: &str = "org.imgbuild.build";

pub struct DockerBuilder {
    config: DockerConfig,
}

impl DockerBuilder {
    pub fn new(config: DockerConfig) -> Self {
        DockerBuilder { config }
    }

    fn checksum_path(path: &Path) -> PathBuf {
        PathBuf::from(format!("{}.sha256", path.display()))
    }
}

/// What the steps hand each other.
pub struct DockerState {
    pub engine: Engine,
    pub base: Option<step_pull::BaseImage>,
    pub container: Option<step_create_container::BuildContainer>,
    pub communicator: Option<Arc<dyn Communicator>>,
    pub artifact: Option<Artifact>,
}

impl HasCommunicator for DockerState {
    fn communicator(&self) -> Option<Arc<dyn Communicator>> {
        self.communicator.clone()
    }
}

#[async_trait]
impl Builder for DockerBuilder {
    fn kind(&self) -> &'static str {
        "docker"
    }

    fn validate(&self, config_dir: &Path) -> Vec<ConfigProblem> {
        self.config.problems(config_dir)
    }

    fn resolved_config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn claims(&self, image: &ImageInfo, config_dir: &Path) -> Vec<String> {
        match self.config.output(config_dir) {
            Output::Commit => {
                let repository = self.config.repository(&image.name);
                std::iter::once(image.version.as_str())
                    .chain(self.config.tags.iter().map(String::as_str))
                    .map(|tag| format!("the docker tag {repository}:{tag}"))
                    .collect()
            }
            Output::Export(path) => [Self::checksum_path(&path), path]
                .iter()
                .map(|path| {
                    format!(
                        "the file {}",
                        crate::common::artifact::lexical_path(path).display()
                    )
                })
                .collect(),
            Output::Discard => Vec::new(),
        }
    }

    fn planned_artifact(&self, image: &ImageInfo, config_dir: &Path) -> PlannedArtifact {
        match self.config.output(config_dir) {
            Output::Commit => {
                let repository = self.config.repository(&image.name);
                let mut description = format!("docker image {repository}:{}", image.version);
                if !self.config.tags.is_empty() {
                    description
                        .push_str(&format!(" (also tagged {})", self.config.tags.join(", ")));
                }
                PlannedArtifact {
                    description,
                    files: Vec::new(),
                }
            }
            Output::Export(path) => PlannedArtifact {
                description: format!("tar of the container filesystem {}", path.display()),
                files: vec![Self::checksum_path(&path), path],
            },
            Output::Discard => PlannedArtifact {
                description: "nothing: the container is discarded after provisioning".to_owned(),
                files: Vec::new(),
            },
        }
    }

    async fn preflight(&self, request: &BuildRequest, _cx: &StepContext) -> Result<(), BuildError> {
        let output = self.config.output(&request.config_dir);
        if let Output::Export(path) = &output {
            step_export::ensure_absent(path, &request.image).map_err(BuildError::Refused)?;
        }
        let engine = Engine::connect().await.map_err(BuildError::Refused)?;
        if output == Output::Commit {
            let target = step_check_tag::Target::new(&self.config, &request.image)
                .map_err(BuildError::Refused)?;
            target
                .ensure_free(&engine)
                .await
                .map_err(BuildError::Refused)?;
        }
        if self.config.pull == PullPolicy::Never {
            step_pull::inspect_local(&engine, &self.config.image, false)
                .await
                .map_err(BuildError::Refused)?;
        }
        Ok(())
    }

    async fn build(
        &self,
        request: &BuildRequest,
        cx: &StepContext,
    ) -> Result<Artifact, BuildError> {
        let engine = Engine::connect()
            .await
            .map_err(|message| BuildError::Failed {
                step: "connect to the engine".to_owned(),
                message,
            })?;
        let mut state = DockerState {
            engine,
            base: None,
            container: None,
            communicator: None,
            artifact: None,
        };
        let mut steps = self.steps(request)?;
        let mut report = run_steps(&mut steps, &mut state, cx, request.on_error).await;
        if report.left_for_debugging
            && let Some(container) = &state.container
        {
            cx.log.warn(format!(
                "the build container {name} is left running for debugging (on-error = abort): `docker exec -it {name} sh` to look inside; `docker rm -f {name}` or `imgbuild clean` removes it",
                name = container.name
            ));
        }
        steps_result(&mut report)?;
        state.artifact.ok_or_else(|| BuildError::Failed {
            step: "commit".to_owned(),
            message: "the steps finished without producing an artifact".to_owned(),
        })
    }
}

impl DockerBuilder {
    fn steps(&self, request: &BuildRequest) -> Result<Vec<Box<dyn Step<DockerState>>>, BuildError> {
        let config = Arc::new(self.config.clone());
        let output = config.output(&request.config_dir);
        let mut steps: Vec<Box<dyn Step<DockerState>>> = Vec::new();
        let target = match output {
            Output::Commit => {
                let target = step_check_tag::Target::new(&config, &request.image)
                    .map_err(BuildError::Refused)?;
                steps.push(Box::new(step_check_tag::StepCheckTag::new(target.clone())));
                Some(target)
            }
            _ => None,
        };
        steps.push(Box::new(step_pull::StepPull::new(config.clone())));
        steps.push(Box::new(step_create_container::StepCreateContainer::new(
            config.clone(),
            request.config_dir.clone(),
        )));
        steps.push(Box::new(step_connect::StepConnect::new(config.clone())));
        steps.push(Box::new(StepProvision::new(request.provisioners.clone())));
        match (output, target) {
            (Output::Commit, Some(target)) => steps.push(Box::new(step_commit::StepCommit::new(
                config.clone(),
                target,
                request.image.clone(),
            ))),
            (Output::Export(path), _) => steps.push(Box::new(step_export::StepExport::new(
                path.clone(),
                Self::checksum_path(&path),
                request.image.clone(),
            ))),
            _ => steps.push(Box::new(step_discard::StepDiscard)),
        }
        Ok(steps)
    }
}

/// Stops a container before it is snapshotted, so no process changes files
/// while they are saved. The default run command exits on SIGTERM; others
/// get SIGKILL after this many seconds.
const STOP_GRACE_SECONDS: i32 = 10;

async fn stop_container(engine: &Engine, container: &str) -> Result<(), StepError> {
    let options = bollard::query_parameters::StopContainerOptions {
        signal: None,
        t: Some(STOP_GRACE_SECONDS),
    };
    match engine.slow().stop_container(container, Some(options)).await {
        Ok(()) => Ok(()),
        // 304: already stopped.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        Err(err) => Err(StepError::failed(format!(
            "cannot stop the build container {container} before saving it: {}",
            engine::describe(&err)
        ))),
    }
}

pub use crate::common::orphans::Removal;

/// Removes the container `name` and its anonymous volumes, in whatever
/// state it is (running, exited, or only `Created`), but only if it carries
/// `run_id` in its run-id label: a name alone proves nothing, anyone can
/// create a container under any name. The container is removed by the id
/// that was checked, so it cannot be swapped in between.
pub(crate) async fn remove_run_container(
    engine: &Engine,
    name: &str,
    run_id: &str,
) -> Result<Removal, String> {
    let inspected = match engine
        .quick()
        .inspect_container(name, None::<InspectContainerOptions>)
        .await
    {
        Ok(inspected) => inspected,
        Err(err) if engine::is_not_found(&err) => return Ok(Removal::Absent),
        Err(err) => {
            return Err(format!(
                "cannot look up the build container {name}: {}; check that the engine at {} answers (it stays in the run journal for `imgbuild clean`)",
                engine::describe(&err),
                engine.host()
            ));
        }
    };
    let id = inspected.id.unwrap_or_default();
    let label = inspected
        .config
        .and_then(|config| config.labels)
        .and_then(|labels| labels.get(RUN_ID_LABEL).cloned());
    if label.as_deref() != Some(run_id) {
        let carries = match label {
            Some(other) => format!("its {RUN_ID_LABEL} label is {other:?}"),
            None => format!("it has no {RUN_ID_LABEL} label"),
        };
        return Ok(Removal::NotOurs(format!(
            "a container named {name} ({}) exists but {carries}, not {run_id:?}: it is not this run's and was left alone; `docker inspect {name}` shows whose it is",
            &id[..id.len().min(12)]
        )));
    }
    let options = RemoveContainerOptions {
        v: true,
        force: true,
        link: false,
    };
    match engine.slow().remove_container(&id, Some(options)).await {
        Ok(()) => Ok(Removal::Removed),
        Err(err) if engine::is_not_found(&err) => Ok(Removal::Absent),
        Err(err) => Err(format!(
            "cannot remove the build container {name}: {}; remove it with `docker rm -f {name}` (it stays in the run journal for `imgbuild clean`)",
            engine::describe(&err)
        )),
    }
}

/// Removes an image reference: a tag only loses that tag (the image goes
/// when nothing else refers to it); an image id (`sha256:...`, always one
/// this builder committed) goes with every tag on it. Already gone is fine.
async fn remove_image(engine: &Engine, reference: &str) -> Result<(), String> {
    remove_image_reference(engine, reference).await.map(|_| ())
}

async fn remove_image_reference(engine: &Engine, reference: &str) -> Result<Removal, String> {
    let by_id = reference.starts_with("sha256:");
    let options = RemoveImageOptions {
        force: by_id,
        noprune: false,
        platforms: None,
    };
    match engine
        .slow()
        .remove_image(reference, Some(options), None)
        .await
    {
        Ok(_) => Ok(Removal::Removed),
        Err(err) if engine::is_not_found(&err) => Ok(Removal::Absent),
        Err(err) => Err(format!(
            "cannot remove docker image {reference}: {}; remove it with `docker image rm {reference}`",
            engine::describe(&err)
        )),
    }
}

/// Removes a Docker container or image that the run `run_id` left behind,
/// from its journal entry alone, and says what it found.
pub async fn clean_orphan(resource: &Resource, run_id: &str) -> Result<Removal, String> {
    let engine = Engine::connect().await?;
    match resource {
        Resource::DockerContainer { name } => remove_run_container(&engine, name, run_id).await,
        Resource::DockerImage { reference } => remove_image_reference(&engine, reference).await,
        other => Err(format!("{} is not a Docker resource", other.describe())),
    }
}
