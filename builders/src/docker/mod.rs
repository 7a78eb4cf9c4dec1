//! The Docker builder: starts a container from a base image, provisions it
//! through the Engine API (exec and archive calls; no SSH server needed) and
//! commits it as `<repository>:<version>`, or exports its filesystem as a tar
//! file, or discards it.
//!
//! Steps, in order: check that the version tag is free (locally and in
//! the registries it is pushed to), make sure the base image is present
//! (pulling it), create and start the container, connect, provision, read
//! the SBOM, then commit, export or discard.
//!
//! `[[test]]`s run on a fresh container started from the committed image
//! (test_run.rs); then delivery (`deliver`) pushes it when `push` is set
//! (step_push.rs); `delete` takes back the tags or files a build kept.
//!
//! The engine is whatever `DOCKER_HOST` names (the local socket by
//! default); the docker CLI is never run.

pub mod communicator;
pub mod config;
pub mod credentials;
mod delete;
mod engine;
mod kept;
pub mod kind;
mod plan;
pub mod remote;
pub mod step_cache;
mod step_check_tag;
mod step_commit;
mod step_connect;
mod step_create_container;
mod step_discard;
mod step_export;
mod step_pull;
mod step_push;
mod test_run;

pub use communicator::DockerCommunicator;
pub use config::DockerConfig;

use crate::common::artifact::checksum_path;
use crate::common::file_listing::StepListFiles;
use crate::common::outcome::{LeftRunning, debugging_hint, finish};
use crate::common::step_provision::{StepProvision, has_communicator};
use crate::common::step_sbom::{SbomTarget, StepSbom, has_sbom};
use crate::{
    Artifact, BuildError, BuildRequest, Builder, ConfigProblem, ImageInfo, PlannedArtifact,
    SourceIdentity,
};
use async_trait::async_trait;
use bollard::query_parameters::{
    InspectContainerOptions, RemoveContainerOptions, RemoveImageOptions,
};
use config::{Output, PullPolicy};
use engine::{Engine, ImageApi};
use imgbuild_core::{Resource, Step, StepContext, StepError, run_steps};
use imgbuild_provisioners::Communicator;
use imgbuild_provisioners::image_test::{ImageTest, TestResult};
use plan::{Plan, Produce};
use std::path::Path;
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
}

/// What the steps hand each other.
pub struct DockerState {
    pub engine: Engine,
    /// The image calls of `engine` (check, commit, tag, remove), as the
    /// steps that make them see it.
    pub images: Arc<dyn ImageApi>,
    pub base: Option<step_pull::BaseImage>,
    pub container: Option<step_create_container::BuildContainer>,
    pub communicator: Option<Arc<dyn Communicator>>,
    pub artifact: Option<Artifact>,
    /// What the `[[test]]`s on a test container came to.
    pub test_results: Option<Vec<TestResult>>,
    /// The step cache for this build, once the base is known.
    pub cache: Option<step_cache::CachePlan>,
}

has_communicator!(DockerState);
has_sbom!(DockerState);

impl DockerState {
    /// A fresh state on the engine `DOCKER_HOST` names: the start of a
    /// build and of a test run.
    pub(crate) async fn connect() -> Result<DockerState, BuildError> {
        let engine = Engine::connect()
            .await
            .map_err(|message| BuildError::Failed {
                step: "connect to the engine".to_owned(),
                message,
            })?;
        Ok(DockerState {
            images: Arc::new(engine.clone()),
            engine,
            base: None,
            container: None,
            communicator: None,
            artifact: None,
            test_results: None,
            cache: None,
        })
    }
}

impl crate::common::step_run_tests::HasTestResults for DockerState {
    fn set_test_results(&mut self, results: Vec<TestResult>) {
        self.test_results = Some(results);
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

    fn untestable(&self, config_dir: &Path) -> Option<ConfigProblem> {
        match self.config.output(config_dir) {
            Output::Commit => None,
            Output::Export(path) => Some(
                ConfigProblem::new(
                    "export_path",
                    format!(
                        "the build exports its filesystem to {}, a tar without the image's configuration: no container can start from it to run tests in",
                        path.display()
                    ),
                )
                .help("drop `export_path` to commit an image, which can be tested"),
            ),
            Output::Discard => Some(
                ConfigProblem::new(
                    "discard",
                    "the build discards its container (`discard = true`): nothing is left to run tests in",
                )
                .help("drop `discard` to commit an image, which can be tested"),
            ),
        }
    }

    fn claims(&self, image: &ImageInfo, config_dir: &Path) -> Vec<String> {
        match self.config.output(config_dir) {
            Output::Commit => {
                let repository = self.config.repository(&image.name);
                let mut claims: Vec<String> = std::iter::once(image.version.as_str())
                    .chain(self.config.tags.iter().map(String::as_str))
                    .map(|tag| format!("the docker tag {repository}:{tag}"))
                    .collect();
                // Another repository pushed to is tagged locally too.
                for other in self.config.push.repositories(&repository) {
                    if other != repository {
                        claims.push(format!("the docker tag {other}:{}", image.version));
                    }
                }
                claims
            }
            Output::Export(path) => [checksum_path(&path), path]
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
                let pushed = self.config.push.repositories(&repository);
                if !pushed.is_empty() {
                    description.push_str(&format!(", pushed to {}", pushed.join(", ")));
                }
                PlannedArtifact {
                    description,
                    files: Vec::new(),
                }
            }
            Output::Export(path) => PlannedArtifact {
                description: format!("tar of the container filesystem {}", path.display()),
                files: vec![checksum_path(&path), path],
            },
            Output::Discard => PlannedArtifact {
                description: "nothing: the container is discarded after provisioning".to_owned(),
                files: Vec::new(),
            },
        }
    }

    fn cache_settings(&self) -> Option<serde_json::Value> {
        step_cache::cache_settings(&self.config)
    }

    async fn resolve_source(
        &self,
        request: &BuildRequest,
        cx: &StepContext,
    ) -> Result<SourceIdentity, BuildError> {
        let plan = Plan::new(&self.config, request, &cx.run_id, cx.build_name())
            .map_err(BuildError::Refused)?;
        let engine = Engine::connect().await.map_err(BuildError::Refused)?;
        let base = step_pull::StepPull::new(Arc::new(plan))
            .resolve(&engine, cx)
            .await
            .map_err(|err| match err {
                StepError::Cancelled => BuildError::Cancelled,
                StepError::Failed(message) => BuildError::Refused(message),
            })?;
        Ok(base.identity())
    }

    async fn preflight(&self, request: &BuildRequest, cx: &StepContext) -> Result<(), BuildError> {
        let plan = Plan::new(&self.config, request, &cx.run_id, cx.build_name())
            .map_err(BuildError::Refused)?;
        if let Produce::Export { path, .. } = &plan.produce {
            step_export::ensure_absent(path, &request.image).map_err(BuildError::Refused)?;
        }
        let engine = Engine::connect().await.map_err(BuildError::Refused)?;
        if let Produce::Commit(target) = &plan.produce {
            target
                .ensure_free(&engine)
                .await
                .map_err(BuildError::Refused)?;
            target
                .ensure_free_in_registries(&engine, &cx.log)
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
        let plan = Plan::new(&self.config, request, &cx.run_id, cx.build_name())
            .map_err(BuildError::Refused)?;
        let plan = Arc::new(plan);
        let mut state = DockerState::connect().await?;
        let mut steps = Self::steps(&plan, request);
        let mut report = run_steps(&mut steps, &mut state, cx, request.on_error).await;
        if report.left_for_debugging {
            warn_left_running(&state, "build container", cx);
        }
        finish(&mut report, state.artifact.take(), "commit")
    }

    async fn test_artifact(
        &self,
        request: &BuildRequest,
        artifact: &Artifact,
        tests: &[ImageTest],
        cx: &StepContext,
    ) -> Result<Vec<TestResult>, BuildError> {
        test_run::test_image(&self.config, request, artifact, tests, cx).await
    }

    async fn deliver(
        &self,
        request: &BuildRequest,
        artifact: Artifact,
        cx: &StepContext,
    ) -> Result<Artifact, BuildError> {
        let plan = Plan::new(&self.config, request, &cx.run_id, cx.build_name())
            .map_err(BuildError::Refused)?;
        let mut steps = Self::delivery_steps(&plan);
        if steps.is_empty() {
            return Ok(artifact);
        }
        let mut state = DockerState::connect().await?;
        state.artifact = Some(artifact);
        let mut report = run_steps(&mut steps, &mut state, cx, request.on_error).await;
        finish(&mut report, state.artifact.take(), "push")
    }

    /// The exported tar, or the committed image by id (which removes it
    /// with every tag the build set).
    fn unrecorded(&self, artifact: &Artifact) -> Vec<imgbuild_core::Resource> {
        let mut resources = crate::common::artifact::file_resources(artifact);
        if let Ok(kept::Kept::Image { id, .. }) = kept::Kept::of(artifact) {
            resources.push(kind::DockerResource::Image { reference: id }.into());
        }
        resources
    }

    async fn delete_artifact(
        &self,
        artifact: &Artifact,
        cx: &StepContext,
    ) -> Result<(), BuildError> {
        delete::delete(artifact, cx).await
    }
}

/// Says how to reach and remove the container `--on-error abort` left.
fn warn_left_running(state: &DockerState, role: &str, cx: &StepContext) {
    if let Some(container) = &state.container {
        let name = &container.name;
        let left = LeftRunning {
            what: format!("the {role} {name} (on-error = abort)"),
            reach: format!("docker exec -it {name} sh"),
        };
        let clean = format!("`docker rm -f {name}` or `imgbuild clean` removes it");
        cx.log.warn(debugging_hint(Some(left), &clean));
    }
}

impl DockerBuilder {
    fn steps(plan: &Arc<Plan>, request: &BuildRequest) -> Vec<Box<dyn Step<DockerState>>> {
        let mut steps: Vec<Box<dyn Step<DockerState>>> = Vec::new();
        if let Produce::Commit(target) = &plan.produce {
            steps.push(Box::new(step_check_tag::StepCheckTag::new(target.clone())));
        }
        steps.push(Box::new(step_pull::StepPull::new(plan.clone())));
        if request.cache.enabled && !request.provisioners.is_empty() {
            steps.push(Box::new(step_cache::StepFindCached::new(
                plan.clone(),
                request.cache.clone(),
                request.image.name.clone(),
                request.step_descriptions(),
            )));
        }
        steps.push(Box::new(step_create_container::StepCreateContainer::new(
            plan.clone(),
        )));
        steps.push(Box::new(step_connect::StepConnect::new(plan.clone())));
        steps.push(Box::new(StepProvision::new(request.provisioners.clone())));
        steps.extend(StepListFiles::for_request(request, &ENGINE_PROVIDED));
        let sbom_target = match &plan.produce {
            Produce::Commit(_) => Some(SbomTarget::in_output_dir(request)),
            Produce::Export { path, .. } => Some(SbomTarget::beside(path, None)),
            // Nothing is kept for an SBOM to describe.
            Produce::Discard => None,
        };
        steps.extend(
            sbom_target.and_then(|target| StepSbom::for_request(request, "docker", target)),
        );
        steps.push(match &plan.produce {
            Produce::Commit(target) => {
                Box::new(step_commit::StepCommit::new(plan.clone(), target.clone()))
            }
            Produce::Export {
                path,
                checksum_file,
            } => Box::new(step_export::StepExport::new(
                plan.clone(),
                path.clone(),
                checksum_file.clone(),
            )),
            Produce::Discard => Box::new(step_discard::StepDiscard),
        });
        steps
    }

    /// What runs after the `[[test]]`s passed (or were skipped): the push.
    fn delivery_steps(plan: &Plan) -> Vec<Box<dyn Step<DockerState>>> {
        let mut steps: Vec<Box<dyn Step<DockerState>>> = Vec::new();
        if let Produce::Commit(target) = &plan.produce
            && !target.push.is_empty()
        {
            steps.push(Box::new(step_push::StepPush::new(target.clone())));
        }
        steps
    }
}

/// Files the engine mounts into every container and never commits.
const ENGINE_PROVIDED: [&str; 4] = [
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/.dockerenv",
];

/// Stops a container before it is snapshotted, so no process changes files
/// while they are saved. The default run command exits on SIGTERM; others
/// get SIGKILL after this many seconds.
const STOP_GRACE_SECONDS: i32 = 10;

async fn stop_container(engine: &dyn ImageApi, container: &str) -> Result<(), StepError> {
    let options = bollard::query_parameters::StopContainerOptions {
        signal: None,
        t: Some(STOP_GRACE_SECONDS),
    };
    match engine.stop_container(container, options).await {
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
async fn remove_image(engine: &dyn ImageApi, reference: &str) -> Result<(), String> {
    remove_image_reference(engine, reference).await.map(|_| ())
}

async fn remove_image_reference(engine: &dyn ImageApi, reference: &str) -> Result<Removal, String> {
    let by_id = reference.starts_with("sha256:");
    let options = RemoveImageOptions {
        force: by_id,
        noprune: false,
        platforms: None,
    };
    match engine.remove_image(reference, options).await {
        Ok(()) => Ok(Removal::Removed),
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
    use crate::registry::JournalResource;
    use kind::DockerResource;
    let Some(resource) = DockerResource::from_resource(resource) else {
        return Err(format!("{} is not a Docker resource", resource.describe()));
    };
    let engine = Engine::connect().await?;
    match resource? {
        DockerResource::Container { name } => remove_run_container(&engine, &name, run_id).await,
        DockerResource::Image { reference } => remove_image_reference(&engine, &reference).await,
    }
}
