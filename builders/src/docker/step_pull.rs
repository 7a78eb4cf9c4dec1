//! Makes sure the base image is in the engine, pulling it (with progress)
//! unless `pull = false`, and records exactly which image the build starts
//! from: its id, which the container is then created from, so a tag moved
//! meanwhile cannot change the base under the build.
//!
//! Uses nothing from the state. Produces `state.base`.

use super::DockerState;
use super::config::{PullPolicy, split_reference};
use super::engine::{self, Engine};
use super::plan::Plan;
use crate::common::artifact::SourceIdentity;
use async_trait::async_trait;
use bollard::models::{ImageConfig, ImageInspect};
use bollard::query_parameters::CreateImageOptions;
use futures_util::StreamExt;
use imgbuild_core::{Step, StepContext, StepError};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// The image the build starts from.
#[derive(Debug, Clone)]
pub struct BaseImage {
    /// As the config names it.
    pub reference: String,
    /// `sha256:...`
    pub id: String,
    /// `name@sha256:...` when the image came from a registry.
    pub digest: Option<String>,
    pub config: ImageConfig,
}

impl BaseImage {
    pub(super) fn from_inspect(
        reference: &str,
        inspected: ImageInspect,
    ) -> Result<BaseImage, String> {
        let id = inspected
            .id
            .ok_or_else(|| format!("the engine reported no id for image {reference}"))?;
        Ok(BaseImage {
            reference: reference.to_owned(),
            id,
            digest: inspected
                .repo_digests
                .and_then(|digests| digests.into_iter().next()),
            config: inspected.config.unwrap_or_default(),
        })
    }

    pub fn identity(&self) -> SourceIdentity {
        SourceIdentity {
            kind: "docker-image".to_owned(),
            reference: self.reference.clone(),
            sha256: Some(self.id.trim_start_matches("sha256:").to_owned()),
        }
    }

    pub fn details(&self) -> serde_json::Value {
        serde_json::json!({
            "reference": self.reference,
            "id": self.id,
            "digest": self.digest,
        })
    }
}

/// The base image as the engine has it. `after_pull` only changes the
/// message when it is missing.
pub async fn inspect_local(
    engine: &Engine,
    reference: &str,
    after_pull: bool,
) -> Result<BaseImage, String> {
    match engine.quick().inspect_image(reference).await {
        Ok(inspected) => BaseImage::from_inspect(reference, inspected),
        Err(err) if engine::is_not_found(&err) && after_pull => Err(format!(
            "the base image {reference} is still missing after pulling it: {}",
            engine::describe(&err)
        )),
        Err(err) if engine::is_not_found(&err) => Err(format!(
            "the base image {reference} is not in the Docker engine at {}, and `pull = false` forbids pulling it; run `docker pull {reference}` (or build it) first, or set `pull = true`",
            engine.host()
        )),
        Err(err) => Err(format!(
            "cannot inspect the base image {reference}: {}",
            engine::describe(&err)
        )),
    }
}

pub struct StepPull {
    plan: Arc<Plan>,
}

impl StepPull {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepPull { plan }
    }

    async fn pull(&self, engine: &Engine, cx: &StepContext) -> Result<(), StepError> {
        let reference = &self.plan.config.image;
        let (name, tag) = split_reference(reference);
        cx.log.info(format!("pulling {reference}"));
        let options = CreateImageOptions {
            from_image: Some(name),
            tag: Some(tag),
            platform: self.plan.config.platform.clone().unwrap_or_default(),
            ..Default::default()
        };
        let mut stream = engine.quick().create_image(Some(options), None, None);
        let task = format!("pull {reference}");
        let mut layers = LayerProgress::default();
        let mut last_report = Instant::now();
        while let Some(message) = stream.next().await {
            let message = message.map_err(|err| {
                StepError::failed(format!(
                    "cannot pull {reference}: {}; check the name and the registry (for a private registry, `docker login` and `docker pull {reference}` first, then set `pull = false`)",
                    engine::describe(&err)
                ))
            })?;
            let status = message.status.unwrap_or_default();
            match message.id {
                Some(layer) => {
                    let detail = message.progress_detail.unwrap_or_default();
                    layers.update(&layer, &status, detail.current, detail.total);
                    if last_report.elapsed() >= PROGRESS_EVERY {
                        let (done, total) = layers.totals();
                        cx.log.progress(&task, done, total);
                        last_report = Instant::now();
                    }
                }
                // Messages without a layer are the pull's own news ("Digest:",
                // "Status: Downloaded newer image ...").
                None if !status.is_empty() => cx.log.info(status),
                None => {}
            }
        }
        let (done, total) = layers.totals();
        cx.log
            .progress(&task, total.unwrap_or(done), total.or(Some(done)));
        Ok(())
    }
}

/// Download bytes per layer, from the engine's progress messages.
#[derive(Default)]
struct LayerProgress {
    layers: BTreeMap<String, (u64, Option<u64>)>,
}

impl LayerProgress {
    fn update(&mut self, layer: &str, status: &str, current: Option<i64>, total: Option<i64>) {
        let entry = self.layers.entry(layer.to_owned()).or_insert((0, None));
        let as_u64 = |value: Option<i64>| value.and_then(|v| u64::try_from(v).ok());
        if status.starts_with("Downloading") {
            if let Some(total) = as_u64(total).filter(|t| *t > 0) {
                entry.1 = Some(total);
            }
            if let Some(current) = as_u64(current) {
                entry.0 = current;
            }
        } else if matches!(
            status,
            "Download complete" | "Pull complete" | "Already exists"
        ) && let Some(total) = entry.1
        {
            entry.0 = total;
        }
    }

    /// Bytes done and, once every layer being downloaded has announced its
    /// size, the total.
    fn totals(&self) -> (u64, Option<u64>) {
        let done = self.layers.values().map(|(done, _)| done).sum();
        let sized: Vec<u64> = self
            .layers
            .values()
            .filter_map(|(_, total)| *total)
            .collect();
        let total = (!sized.is_empty()).then(|| sized.iter().sum());
        (done, total)
    }
}

#[async_trait]
impl Step<DockerState> for StepPull {
    fn name(&self) -> &'static str {
        "pull"
    }

    async fn run(&mut self, state: &mut DockerState, cx: &StepContext) -> Result<(), StepError> {
        let base = self.resolve(&state.engine, cx).await?;
        cx.log.info(format!(
            "base image {} ({}{})",
            base.reference,
            base.id,
            base.digest
                .as_ref()
                .map(|d| format!(", {d}"))
                .unwrap_or_default()
        ));
        state.base = Some(base);
        Ok(())
    }
}

impl StepPull {
    /// Applies the pull policy and returns the image the engine then has:
    /// what a build starts from, and what `plan` compares.
    pub async fn resolve(&self, engine: &Engine, cx: &StepContext) -> Result<BaseImage, StepError> {
        let pull = match self.plan.config.pull {
            PullPolicy::Always => true,
            PullPolicy::Never => false,
            PullPolicy::Missing => inspect_local(engine, &self.plan.config.image, false)
                .await
                .is_err(),
        };
        if pull {
            self.pull(engine, cx).await?;
        }
        inspect_local(engine, &self.plan.config.image, pull)
            .await
            .map_err(StepError::failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_progress_adds_up_downloads() {
        let mut progress = LayerProgress::default();
        progress.update("a", "Pulling fs layer", None, None);
        progress.update("a", "Downloading", Some(10), Some(100));
        progress.update("b", "Downloading", Some(5), Some(50));
        assert_eq!(progress.totals(), (15, Some(150)));
        progress.update("a", "Download complete", None, None);
        assert_eq!(progress.totals(), (105, Some(150)));
        progress.update("c", "Already exists", None, None);
        assert_eq!(progress.totals(), (105, Some(150)));
    }
}
