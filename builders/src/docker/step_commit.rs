//! Commits the provisioned container as `<repository>:<version>` (plus the
//! extra tags), with the base image's configuration changed only by
//! `changes` and the labels.
//!
//! The commit first lands under a tag unique to this run and build, so the
//! journal can name it before it exists without ever naming another run's
//! image; once the engine returns the image id, the journal records the id.
//! Only then are the real tags applied. A build that does not succeed takes
//! all of it back: tags moved from older images are returned, the new image
//! is removed, and nothing dangling is left.
//!
//! Uses `state.container` and `state.base`. Produces `state.artifact`.

use super::engine::{self, ImageApi};
use super::kind::DockerResource;
use super::plan::Plan;
use super::step_check_tag::Target;
use super::step_pull::BaseImage;
use super::{BUILD_LABEL, DockerState, RUN_ID_LABEL, remove_image, stop_container};
use crate::Artifact;
use crate::common::name_lock::NameLock;
use crate::common::tracked::{record, release};
use async_trait::async_trait;
use bollard::models::ContainerConfig;
use bollard::query_parameters::{CommitContainerOptions, TagImageOptions};
use imgbuild_core::{CleanupOutcome, ResourceId, Step, StepContext, StepError};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::task::JoinHandle;

/// An extra tag pointed at the new image, and the image it pointed at
/// before, if any: extra tags (`latest`) move, and move back on failure.
struct MovedTag {
    tag: String,
    previous: Option<String>,
}

pub struct StepCommit {
    plan: Arc<Plan>,
    target: Target,
    /// The journal entry for the new image: its temporary tag, then its id.
    journal_id: Option<ResourceId>,
    temporary: Option<String>,
    /// Committing runs as its own task: cancelled meanwhile, the engine
    /// finishes the commit anyway, and cleanup needs the id it produced.
    in_flight: Option<JoinHandle<Result<String, String>>>,
    image_id: Option<String>,
    moved: Vec<MovedTag>,
}

impl StepCommit {
    /// `target` is the plan's commit target.
    pub fn new(plan: Arc<Plan>, target: Target) -> Self {
        StepCommit {
            plan,
            target,
            journal_id: None,
            temporary: None,
            in_flight: None,
            image_id: None,
            moved: Vec::new(),
        }
    }

    /// `org.opencontainers.image.*` describing this version, then the
    /// `[image]` labels, over the base image's labels. `LABEL` changes are
    /// applied over all of these by the engine.
    fn labels(&self, base: &BaseImage, cx: &StepContext) -> HashMap<String, String> {
        let mut labels = base.config.labels.clone().unwrap_or_default();
        let mut set = |key: &str, value: &str| {
            labels.insert(key.to_owned(), value.to_owned());
        };
        set("org.opencontainers.image.title", &self.plan.image.name);
        set("org.opencontainers.image.version", &self.plan.image.version);
        set("org.opencontainers.image.created", &self.plan.image.created);
        if let Some(revision) = &self.plan.image.revision {
            set("org.opencontainers.image.revision", revision);
        }
        if let Some(description) = &self.plan.image.description {
            set("org.opencontainers.image.description", description);
        }
        set("org.opencontainers.image.base.name", &base.reference);
        if let Some((_, digest)) = base.digest.as_deref().and_then(|d| d.split_once('@')) {
            set("org.opencontainers.image.base.digest", digest);
        }
        // The engine would copy these from the container anyway (see
        // RUN_ID_LABEL); set here so the image says so in one place.
        set(RUN_ID_LABEL, &cx.run_id);
        set(BUILD_LABEL, cx.build_name());
        for (key, value) in &self.plan.image.labels {
            labels.insert(key.clone(), value.clone());
        }
        labels
    }

    async fn tag(&self, engine: &dyn ImageApi, image_id: &str, tag: &str) -> Result<(), StepError> {
        let options = TagImageOptions {
            repo: Some(self.target.repository.clone()),
            tag: Some(tag.to_owned()),
        };
        engine.tag_image(image_id, options).await.map_err(|err| {
            StepError::failed(format!(
                "cannot tag the new image {image_id} as {}: {}",
                self.target.reference_for(tag),
                engine::describe(&err)
            ))
        })
    }

    /// Takes back everything `run` did, as far as it got.
    async fn undo(&mut self, engine: &dyn ImageApi) -> Vec<String> {
        let mut errors = Vec::new();
        for moved in self.moved.drain(..).rev() {
            if let Some(previous) = moved.previous {
                let options = TagImageOptions {
                    repo: Some(self.target.repository.clone()),
                    tag: Some(moved.tag.clone()),
                };
                if let Err(err) = engine.tag_image(&previous, options).await {
                    errors.push(format!(
                        "cannot point {} back at {previous}: {}",
                        self.target.reference_for(&moved.tag),
                        engine::describe(&err)
                    ));
                }
            }
        }
        // By id, every tag still on the new image goes with it.
        let leftover = self.image_id.clone().or_else(|| self.temporary.clone());
        if let Some(reference) = leftover
            && let Err(message) = remove_image(engine, &reference).await
        {
            errors.push(message);
        }
        errors
    }
}

/// A tag no other run or build uses: `imgbuild-<run id>-<build>`.
fn temporary_tag(run_id: &str, build: &str) -> String {
    let tag: String = format!("imgbuild-{run_id}-{build}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    tag.chars().take(128).collect()
}

/// The committed image's configuration: the base image's, in full. The
/// engine fills whatever is left empty from the build container, whose
/// entrypoint is the run command: an explicitly empty entrypoint and command
/// keep it from leaking into the image.
pub(super) fn image_config(base: &BaseImage, labels: HashMap<String, String>) -> ContainerConfig {
    let config = &base.config;
    ContainerConfig {
        user: config.user.clone(),
        exposed_ports: config.exposed_ports.clone(),
        env: config.env.clone(),
        cmd: Some(config.cmd.clone().unwrap_or_default()),
        healthcheck: config.healthcheck.clone(),
        args_escaped: config.args_escaped,
        volumes: config.volumes.clone(),
        working_dir: config.working_dir.clone(),
        entrypoint: Some(config.entrypoint.clone().unwrap_or_default()),
        on_build: config.on_build.clone(),
        labels: Some(labels),
        stop_signal: config.stop_signal.clone(),
        shell: config.shell.clone(),
        ..Default::default()
    }
}

#[async_trait]
impl Step<DockerState> for StepCommit {
    fn name(&self) -> &'static str {
        "commit"
    }

    async fn run(&mut self, state: &mut DockerState, cx: &StepContext) -> Result<(), StepError> {
        let base = state
            .base
            .clone()
            .ok_or_else(|| StepError::failed("no base image"))?;
        let container = state
            .container
            .clone()
            .ok_or_else(|| StepError::failed("the build container is not running"))?;
        let engine = state.images.clone();
        stop_container(engine.as_ref(), &container.id).await?;

        let temporary_tag = temporary_tag(&cx.run_id, cx.build_name());
        let temporary = self.target.reference_for(&temporary_tag);
        self.journal_id = Some(record(
            cx,
            DockerResource::Image {
                reference: temporary.clone(),
            }
            .into(),
        )?);
        self.temporary = Some(temporary.clone());
        let options = CommitContainerOptions {
            container: Some(container.id.clone()),
            repo: Some(self.target.repository.clone()),
            tag: Some(temporary_tag),
            comment: self.plan.config.message.clone(),
            author: self.plan.config.author.clone(),
            // Stopped above; pausing a stopped container is pointless.
            pause: false,
            changes: (!self.plan.config.changes.is_empty())
                .then(|| self.plan.config.changes.join("\n")),
        };
        let body = image_config(&base, self.labels(&base, cx));
        cx.log
            .info(format!("committing the build container {}", container.name));
        let committing = engine.clone();
        let task = tokio::spawn(async move {
            committing
                .commit_container(options, body)
                .await
                .map_err(|err| engine::describe(&err))
        });
        let in_flight = self.in_flight.insert(task);
        let committed = in_flight
            .await
            .map_err(|err| StepError::failed(format!("committing the build container: {err}")))?;
        self.in_flight = None;
        let image_id = committed.map_err(|message| {
            StepError::failed(format!(
                "cannot commit the build container {}: {message}",
                container.name
            ))
        })?;
        self.image_id = Some(image_id.clone());
        if let Some(journal_id) = self.journal_id {
            cx.journal
                .update(
                    journal_id,
                    DockerResource::Image {
                        reference: image_id.clone(),
                    }
                    .into(),
                )
                .map_err(StepError::failed)?;
        }

        // Checked again at the last moment, and under a lock until the tag
        // is set: another build may have taken the version while this one
        // provisioned, and the engine's tag call would silently move it.
        let name_lock = NameLock::acquire(
            &format!(
                "docker-tag {} {}",
                std::env::var("DOCKER_HOST").unwrap_or_default(),
                self.target.reference()
            ),
            &cx.log,
        )
        .await
        .map_err(StepError::failed)?;
        self.target
            .ensure_free(engine.as_ref())
            .await
            .map_err(StepError::failed)?;
        self.tag(engine.as_ref(), &image_id, &self.target.version)
            .await?;
        drop(name_lock);
        let mut tags = vec![self.target.version.clone()];
        for tag in &self.plan.config.tags {
            if tags.contains(tag) {
                continue;
            }
            let reference = self.target.reference_for(tag);
            let previous = match engine.inspect_image(&reference).await {
                Ok(existing) => existing.id.filter(|id| *id != image_id),
                Err(err) if engine::is_not_found(&err) => None,
                Err(err) => {
                    return Err(StepError::failed(format!(
                        "cannot check which image {reference} points at now: {}",
                        engine::describe(&err)
                    )));
                }
            };
            self.tag(engine.as_ref(), &image_id, tag).await?;
            self.moved.push(MovedTag {
                tag: tag.clone(),
                previous,
            });
            tags.push(tag.clone());
        }
        remove_image(engine.as_ref(), &temporary)
            .await
            .map_err(StepError::failed)?;
        self.temporary = None;

        let references: Vec<String> = tags
            .iter()
            .map(|tag| self.target.reference_for(tag))
            .collect();
        let size = engine
            .inspect_image(&image_id)
            .await
            .ok()
            .and_then(|inspected| inspected.size);
        cx.log
            .info(format!("committed {} ({image_id})", references.join(", ")));
        state.artifact = Some(Artifact {
            builder: "docker".to_owned(),
            id: image_id.clone(),
            files: Vec::new(),
            source: base.identity(),
            details: serde_json::json!({
                "repository": self.target.repository,
                "tags": tags,
                "references": references,
                "image_id": image_id,
                "size": size,
                "base_image": base.details(),
            }),
        });
        Ok(())
    }

    async fn cleanup(
        &mut self,
        state: &mut DockerState,
        cx: &StepContext,
        outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        if let Some(task) = self.in_flight.take()
            && let Ok(Ok(image_id)) = task.await
        {
            self.image_id = Some(image_id);
        }
        let Some(journal_id) = self.journal_id.take() else {
            return Ok(());
        };
        if outcome == CleanupOutcome::Succeeded {
            // The image is the artifact now.
            return release(cx, journal_id);
        }
        let errors = self.undo(state.images.as_ref()).await;
        if !errors.is_empty() {
            self.journal_id = Some(journal_id);
            return Err(StepError::failed(errors.join("; ")));
        }
        if let Some(image_id) = self.image_id.take() {
            cx.log
                .info(format!("removed the unfinished image {image_id}"));
        }
        release(cx, journal_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::ImageConfig;

    fn base(entrypoint: Option<Vec<String>>, cmd: Option<Vec<String>>) -> BaseImage {
        BaseImage {
            reference: "debian:bookworm".into(),
            id: "sha256:abc".into(),
            digest: None,
            config: ImageConfig {
                entrypoint,
                cmd,
                env: Some(vec!["PATH=/usr/bin".into()]),
                ..Default::default()
            },
        }
    }

    #[test]
    fn the_run_command_cannot_leak_into_the_image() {
        let config = image_config(&base(None, None), HashMap::new());
        // Serialized as [] rather than left out: the engine fills only
        // missing values from the container.
        let json = serde_json::to_value(&config).unwrap();
        assert_eq!(json["Entrypoint"], serde_json::json!([]));
        assert_eq!(json["Cmd"], serde_json::json!([]));
        let config = image_config(&base(None, Some(vec!["bash".into()])), HashMap::new());
        assert_eq!(config.cmd, Some(vec!["bash".to_owned()]));
        assert_eq!(config.env, Some(vec!["PATH=/usr/bin".to_owned()]));
    }

    #[test]
    fn temporary_tags_are_valid_and_unique_per_build() {
        assert_eq!(
            temporary_tag("0193ab", "web app"),
            "imgbuild-0193ab-web-app"
        );
        assert!(temporary_tag("r", &"x".repeat(300)).len() <= 128);
    }
}

#[cfg(test)]
mod step_tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::docker::engine::Engine;
    use crate::docker::engine::fake::{FakeImages, NEW_IMAGE};
    use crate::docker::plan::Produce;
    use crate::docker::plan::tests::plan;
    use crate::docker::step_create_container::BuildContainer;
    use bollard::models::ImageConfig;
    use serde_json::json;

    fn step(config: serde_json::Value) -> StepCommit {
        let plan = Arc::new(plan(config));
        match plan.produce.clone() {
            Produce::Commit(target) => StepCommit::new(plan, target),
            other => panic!("{other:?}"),
        }
    }

    fn state(images: &Arc<FakeImages>) -> DockerState {
        DockerState {
            engine: Engine::unreachable(),
            images: images.clone(),
            base: Some(BaseImage {
                reference: "debian:bookworm".into(),
                id: "sha256:base".into(),
                digest: Some("debian@sha256:d1".into()),
                config: ImageConfig {
                    labels: Some(HashMap::from([("from.base".into(), "yes".into())])),
                    ..Default::default()
                },
            }),
            container: Some(BuildContainer {
                id: "c0ffee".into(),
                name: "imgbuild-unit-app".into(),
                working_dir: "/".into(),
                user: String::new(),
            }),
            communicator: None,
            artifact: None,
            test_results: None,
            cache: None,
        }
    }

    #[tokio::test]
    async fn commit_applies_the_config_changes_labels_and_tags_and_undoes_them_on_failure() {
        let images = Arc::new(FakeImages::with(&[("web:latest", "sha256:old")]));
        let mut state = state(&images);
        let t = TestContext::new("app");
        let mut step = step(json!({
            "image": "debian:bookworm",
            "changes": ["ENV A=1", "EXPOSE 8080/tcp"],
            "author": "infra",
            "message": "built by imgbuild",
            "tags": ["latest"],
        }));
        step.run(&mut state, &t.cx).await.unwrap();

        assert_eq!(
            images.calls()[0],
            "stop c0ffee",
            "stopped before it is saved"
        );
        let commits = images.commits.lock().unwrap().clone();
        let [(options, body)] = &commits[..] else {
            panic!("{commits:?}")
        };
        assert_eq!(options.container.as_deref(), Some("c0ffee"));
        assert_eq!(options.repo.as_deref(), Some("web"));
        assert_eq!(options.tag.as_deref(), Some("imgbuild-unit0123-app"));
        assert_eq!(options.changes.as_deref(), Some("ENV A=1\nEXPOSE 8080/tcp"));
        assert_eq!(options.author.as_deref(), Some("infra"));
        assert_eq!(options.comment.as_deref(), Some("built by imgbuild"));
        let labels = body.labels.clone().unwrap();
        assert_eq!(labels["from.base"], "yes");
        assert_eq!(labels["org.opencontainers.image.version"], "1.2");
        assert_eq!(labels["org.opencontainers.image.base.digest"], "sha256:d1");
        assert_eq!(labels[RUN_ID_LABEL], "unit0123");

        assert_eq!(images.image("web:1.2").as_deref(), Some(NEW_IMAGE));
        assert_eq!(images.image("web:latest").as_deref(), Some(NEW_IMAGE));
        assert_eq!(images.image("web:imgbuild-unit0123-app"), None);
        let artifact = state.artifact.clone().unwrap();
        assert_eq!(artifact.id, NEW_IMAGE);
        assert_eq!(artifact.details["tags"], json!(["1.2", "latest"]));
        assert_eq!(
            artifact.details["references"],
            json!(["web:1.2", "web:latest"])
        );

        // A later step failed: the moved tag goes back, the image goes.
        step.cleanup(&mut state, &t.cx, CleanupOutcome::Failed)
            .await
            .unwrap();
        assert_eq!(images.image("web:latest").as_deref(), Some("sha256:old"));
        assert_eq!(images.image("web:1.2"), None);
    }

    #[tokio::test]
    async fn a_version_taken_while_provisioning_is_refused_and_the_new_image_removed() {
        let images = Arc::new(FakeImages::with(&[("web:1.2", "sha256:other")]));
        let mut state = state(&images);
        let t = TestContext::new("app");
        let mut step = step(json!({"image": "debian:bookworm"}));
        let err = step.run(&mut state, &t.cx).await.unwrap_err().to_string();
        assert!(err.contains("docker image web:1.2 already exists"), "{err}");
        assert!(
            !images.calls().iter().any(|call| call.starts_with("tag")),
            "{:?}",
            images.calls()
        );
        step.cleanup(&mut state, &t.cx, CleanupOutcome::Failed)
            .await
            .unwrap();
        assert_eq!(images.image("web:1.2").as_deref(), Some("sha256:other"));
        assert_eq!(images.image("web:imgbuild-unit0123-app"), None);
        assert!(state.artifact.is_none());
    }
}
