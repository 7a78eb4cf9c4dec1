//! The Docker step cache: the container committed after each cacheable
//! provisioner, as `imgbuild-cache:<key>` in the same engine, found again
//! by key. A build starts its container from the longest cached prefix of
//! its steps and runs only the rest.
//!
//! A kept image carries its key as a label; one whose label does not match
//! the tag it was found under (a tag moved by hand, a corrupt store) is
//! reported, untagged and rebuilt, never used. Two builds keeping the same
//! key at once both succeed: the tag ends on one of two images with the
//! same content.
//!
//! Uses `state.base`. Produces `state.cache` (the keys, how many steps the
//! container starts past), which the create-container and provision steps
//! read.

use super::DockerState;
use super::config::DockerConfig;
use super::engine::{self, ImageApi};
use super::plan::Plan;
use super::step_commit::image_config;
use crate::common::cache::StepCache;
use crate::common::step_provision::KeepsSteps;
use async_trait::async_trait;
use bollard::models::ContainerConfig;
use bollard::query_parameters::{CommitContainerOptions, RemoveImageOptions};
use imgbuild_core::{Event, Step, StepContext, StepError};
use std::collections::HashMap;
use std::sync::Arc;

/// The repository kept steps are tagged in.
pub const CACHE_REPOSITORY: &str = "imgbuild-cache";
/// The label a kept image carries its key in.
pub const KEY_LABEL: &str = "org.imgbuild.step-key";

/// The settings of a Docker build that shape what its provisioners do to
/// the container's filesystem; `None` when its steps cannot be kept.
pub fn cache_settings(config: &DockerConfig) -> Option<serde_json::Value> {
    // What a mounted volume holds is part of no key, and a provisioner may
    // copy from it: such builds keep no steps.
    if !config.volumes.is_empty() {
        return None;
    }
    Some(serde_json::json!({
        "platform": config.platform,
        "privileged": config.privileged,
        "env": config.env,
        "run_command": config.run_command,
    }))
}

/// One kept step in the engine, as `imgbuild cache ls` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CachedImage {
    pub key: String,
    pub image_id: String,
    /// The image's size as the engine reports it (layers shared with the
    /// base and other steps included).
    pub size: u64,
    /// Unix seconds.
    pub created: i64,
    /// The run that kept it.
    pub run_id: Option<String>,
    pub build: Option<String>,
}

/// Every kept step in the engine `DOCKER_HOST` names, oldest first.
pub async fn list_cached() -> Result<Vec<CachedImage>, String> {
    let engine = super::engine::Engine::connect().await?;
    let options = bollard::query_parameters::ListImagesOptions {
        filters: Some(HashMap::from([(
            "reference".to_owned(),
            vec![format!("{CACHE_REPOSITORY}:*")],
        )])),
        ..Default::default()
    };
    let images = engine
        .quick()
        .list_images(Some(options))
        .await
        .map_err(|err| format!("cannot list the cached steps: {}", engine::describe(&err)))?;
    let mut cached: Vec<CachedImage> = images
        .into_iter()
        .flat_map(|image| {
            let labels = image.labels.clone();
            image
                .repo_tags
                .iter()
                .filter_map(|tag| tag.strip_prefix(&format!("{CACHE_REPOSITORY}:")))
                .map(|key| CachedImage {
                    key: key.to_owned(),
                    image_id: image.id.clone(),
                    size: u64::try_from(image.size).unwrap_or_default(),
                    created: image.created,
                    run_id: labels.get(super::RUN_ID_LABEL).cloned(),
                    build: labels.get(super::BUILD_LABEL).cloned(),
                })
                .collect::<Vec<_>>()
        })
        .collect();
    cached.sort_by(|a, b| a.created.cmp(&b.created).then(a.key.cmp(&b.key)));
    Ok(cached)
}

/// Untags a kept step (the engine removes the image once no tag or
/// container uses it).
pub async fn remove_cached(key: &str) -> Result<(), String> {
    let engine = super::engine::Engine::connect().await?;
    super::remove_image(&engine, &reference(key)).await
}

fn reference(key: &str) -> String {
    format!("{CACHE_REPOSITORY}:{key}")
}

/// The build's step keys and where its container starts.
#[derive(Debug, Clone)]
pub struct CachePlan {
    pub keys: Vec<Option<String>>,
    /// Provisioners the start image already went through.
    pub done: usize,
    /// The kept image the container starts from, when `done > 0`.
    pub start_image: Option<String>,
    pub config: ContainerConfig,
}

pub struct StepFindCached {
    plan: Arc<Plan>,
    cache: StepCache,
}

impl StepFindCached {
    pub fn new(plan: Arc<Plan>, cache: StepCache) -> Self {
        StepFindCached { plan, cache }
    }
}

/// The kept image for `key`, if there is a sound one. An image whose label
/// disagrees with its tag is untagged (and reported): it is never used.
async fn kept_image(images: &dyn ImageApi, key: &str, cx: &StepContext) -> Option<String> {
    let reference = reference(key);
    let inspected = match images.inspect_image(&reference).await {
        Ok(inspected) => inspected,
        Err(err) if engine::is_not_found(&err) => return None,
        Err(err) => {
            cx.log.warn(format!(
                "cannot look up the cached step {reference}: {}; building that step again",
                engine::describe(&err)
            ));
            return None;
        }
    };
    let labelled = inspected
        .config
        .as_ref()
        .and_then(|config| config.labels.as_ref())
        .and_then(|labels| labels.get(KEY_LABEL))
        .cloned();
    if labelled.as_deref() == Some(key) {
        return inspected.id;
    }
    cx.log.warn(format!(
        "the cached step {reference} is labelled {}, not its key: discarding it and building that step again",
        labelled.as_deref().unwrap_or("with no key")
    ));
    let options = RemoveImageOptions {
        force: false,
        noprune: false,
        platforms: None,
    };
    if let Err(err) = images.remove_image(&reference, options).await {
        cx.log.warn(format!(
            "cannot remove the unsound cached step {reference}: {}",
            engine::describe(&err)
        ));
    }
    None
}

#[async_trait]
impl Step<DockerState> for StepFindCached {
    fn name(&self) -> &'static str {
        "find_cached_steps"
    }

    async fn run(&mut self, state: &mut DockerState, cx: &StepContext) -> Result<(), StepError> {
        let base = state
            .base
            .as_ref()
            .ok_or_else(|| StepError::failed("no base image"))?;
        let Some(settings) = cache_settings(&self.plan.config) else {
            cx.log
                .info("the step cache is off for builds with `volumes`");
            return Ok(());
        };
        let keys = self.cache.keys("docker", &settings, &base.identity());
        // Longest prefix first: the last key that has a sound kept image.
        let mut start = None;
        for count in (1..=keys.len()).rev() {
            if let Some(key) = &keys[count - 1]
                && let Some(image) = kept_image(state.images.as_ref(), key, cx).await
            {
                start = Some((count, key.clone(), image));
                break;
            }
        }
        let (done, start_image) = match start {
            Some((done, key, image)) => {
                cx.log.info(format!(
                    "the first {done} of {} provisioner(s) are in the step cache: starting from {} ({image})",
                    keys.len(),
                    reference(&key)
                ));
                cx.log.emit(Event::StepsCached {
                    build: cx.build_name().to_owned(),
                    steps: done,
                    key,
                });
                (done, Some(image))
            }
            None => (0, None),
        };
        state.cache = Some(CachePlan {
            keys,
            done,
            start_image,
            config: image_config(base, HashMap::new()),
        });
        Ok(())
    }
}

#[async_trait]
impl KeepsSteps for DockerState {
    fn steps_done(&self) -> usize {
        self.cache.as_ref().map_or(0, |cache| cache.done)
    }

    fn key_after(&self, index: usize) -> Option<String> {
        self.cache.as_ref()?.keys.get(index)?.clone()
    }

    async fn keep(&mut self, key: &str, _cx: &StepContext) -> Result<(), String> {
        let cache = self.cache.as_ref().ok_or("no step cache")?;
        let container = self.container.as_ref().ok_or("no build container")?;
        // The kept image gets the base's own configuration, never the build
        // container's keep-alive command; the final commit sets it again.
        let mut config = cache.config.clone();
        let mut labels = config.labels.take().unwrap_or_default();
        labels.insert(KEY_LABEL.to_owned(), key.to_owned());
        config.labels = Some(labels);
        let options = CommitContainerOptions {
            container: Some(container.id.clone()),
            repo: Some(CACHE_REPOSITORY.to_owned()),
            tag: Some(key.to_owned()),
            comment: Some(format!("imgbuild step cache {key}")),
            author: None,
            // The next provisioner must not see a half-written state
            // committed under it: the container pauses while it is saved.
            pause: true,
            changes: None,
        };
        self.images
            .commit_container(options, config)
            .await
            .map(|_| ())
            .map_err(|err| engine::describe(&err))
    }
}
