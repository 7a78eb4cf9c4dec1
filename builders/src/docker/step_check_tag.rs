//! Versions are immutable: `<repository>:<version>` must not exist yet, in
//! the engine nor in any registry the image will be pushed to (nor, for
//! each other repository it is pushed to, in the engine under that name).
//! Checked in preflight, before anything starts, and again as the build's
//! first step, since builds may wait for a slot a while after preflight.
//!
//! Uses `state.engine`. Produces nothing.

use super::DockerState;
use super::config::{DockerConfig, check_repository, check_tag};
use super::engine::{self, Engine, ImageApi};
use super::remote::{self, RemoteRepository};
use crate::ImageInfo;
use async_trait::async_trait;
use imgbuild_core::{Step, StepContext, StepError};

/// The tag a build commits to.
#[derive(Debug, Clone)]
pub struct Target {
    pub repository: String,
    pub version: String,
    image_name: String,
    /// The repositories the image is pushed to (`push`), in order.
    pub push: Vec<String>,
    /// The tags pushed to each: the version, then `tags`.
    pub push_tags: Vec<String>,
}

impl Target {
    /// Fails when the repository or the version cannot be Docker names; the
    /// defaults come from `[image]`, which the config checks cannot see.
    pub fn new(config: &DockerConfig, image: &ImageInfo) -> Result<Target, String> {
        let repository = config.repository(&image.name);
        if let Err(message) = check_repository(&repository) {
            let hint = if config.repository.is_none() {
                format!(
                    " (the repository defaults to the image name `{}`; set `repository` in the docker builder to a valid name)",
                    image.name
                )
            } else {
                String::new()
            };
            return Err(format!("cannot tag the image: {message}{hint}"));
        }
        if let Err(message) = check_tag(&image.version) {
            return Err(format!(
                "image version `{}` cannot be a Docker tag: {message}",
                image.version
            ));
        }
        let mut push_tags = vec![image.version.clone()];
        for tag in &config.tags {
            if !push_tags.contains(tag) {
                push_tags.push(tag.clone());
            }
        }
        Ok(Target {
            push: config.push.repositories(&repository),
            repository,
            version: image.version.clone(),
            image_name: image.name.clone(),
            push_tags,
        })
    }

    pub fn reference(&self) -> String {
        format!("{}:{}", self.repository, self.version)
    }

    pub fn reference_for(&self, tag: &str) -> String {
        format!("{}:{tag}", self.repository)
    }

    /// Refuses when the version tag already exists in the engine, under
    /// the build's repository or another one it is pushed to.
    pub async fn ensure_free(&self, engine: &dyn ImageApi) -> Result<(), String> {
        let mut repositories = vec![self.repository.as_str()];
        repositories.extend(
            self.push
                .iter()
                .map(String::as_str)
                .filter(|r| *r != self.repository),
        );
        for repository in repositories {
            self.ensure_free_as(engine, repository).await?;
        }
        Ok(())
    }

    /// Refuses when a registry the image is pushed to already has the
    /// version tag, or cannot say (unreachable, credentials refused): the
    /// push would fail after the whole build.
    pub async fn ensure_free_in_registries(
        &self,
        engine: &Engine,
        log: &imgbuild_core::BuildLog,
    ) -> Result<(), String> {
        for repository in &self.push {
            let remote = RemoteRepository::parse(repository);
            let credential = remote::credential_for(&remote.registry, log).await?;
            let transport = remote::transport(Some(engine), &remote.registry).await;
            let reference = format!("{repository}:{}", self.version);
            match remote::find_tag(&remote, &self.version, &credential, transport).await {
                Ok(None) => {}
                Ok(Some(digest)) => {
                    return Err(format!(
                        "{reference} already exists in the registry {registry} ({digest}): version {version} of {name} was pushed before, and versions are never overwritten; bump `image.version` to build a new one",
                        registry = remote.registry,
                        version = self.version,
                        name = self.image_name,
                    ));
                }
                Err(err) => {
                    return Err(format!(
                        "cannot check whether {reference} already exists before building: {err}"
                    ));
                }
            }
        }
        Ok(())
    }

    async fn ensure_free_as(&self, engine: &dyn ImageApi, repository: &str) -> Result<(), String> {
        let reference = format!("{repository}:{}", self.version);
        match engine.inspect_image(&reference).await {
            Ok(existing) => {
                let id = existing.id.unwrap_or_else(|| "unknown id".to_owned());
                let created = existing
                    .created
                    .map(|created| format!(", created {created}"))
                    .unwrap_or_default();
                Err(format!(
                    "docker image {reference} already exists ({id}{created}): version {version} of {name} was built before, and versions are never overwritten; bump `image.version` to build a new one (if that image really must be replaced, remove it first with `docker image rm {reference}`)",
                    version = self.version,
                    name = self.image_name,
                ))
            }
            Err(err) if engine::is_not_found(&err) => Ok(()),
            Err(err) => Err(format!(
                "cannot check whether docker image {reference} already exists: {}",
                engine::describe(&err)
            )),
        }
    }
}

pub struct StepCheckTag {
    target: Target,
}

impl StepCheckTag {
    pub fn new(target: Target) -> Self {
        StepCheckTag { target }
    }
}

#[async_trait]
impl Step<DockerState> for StepCheckTag {
    fn name(&self) -> &'static str {
        "check_tag"
    }

    async fn run(&mut self, state: &mut DockerState, cx: &StepContext) -> Result<(), StepError> {
        self.target
            .ensure_free(state.images.as_ref())
            .await
            .map_err(StepError::failed)?;
        self.target
            .ensure_free_in_registries(&state.engine, &cx.log)
            .await
            .map_err(StepError::failed)?;
        cx.log.info(format!(
            "will commit docker image {}",
            self.target.reference()
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::docker::engine::Engine;
    use crate::docker::engine::fake::FakeImages;
    use crate::docker::plan::Produce;
    use crate::docker::plan::tests::plan;
    use std::sync::Arc;

    fn state(images: Arc<FakeImages>) -> DockerState {
        DockerState {
            engine: Engine::unreachable(),
            images,
            base: None,
            container: None,
            communicator: None,
            artifact: None,
            test_results: None,
            cache: None,
        }
    }

    fn step() -> StepCheckTag {
        match plan(serde_json::json!({"image": "debian"})).produce {
            Produce::Commit(target) => StepCheckTag::new(target),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_existing_version_tag_is_refused() {
        let images = Arc::new(FakeImages::with(&[("web:1.2", "sha256:old")]));
        let t = TestContext::new("app");
        let err = step()
            .run(&mut state(images.clone()), &t.cx)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("docker image web:1.2 already exists (sha256:old)"),
            "{err}"
        );
        assert!(err.contains("bump `image.version`"), "{err}");
        assert_eq!(images.calls(), vec!["inspect web:1.2"]);
    }

    #[tokio::test]
    async fn a_free_version_tag_passes_and_other_tags_do_not_matter() {
        let images = Arc::new(FakeImages::with(&[("web:latest", "sha256:old")]));
        let t = TestContext::new("app");
        step().run(&mut state(images), &t.cx).await.unwrap();
    }
}
