//! `discard = true`: the provisioned container is thrown away (the
//! create-container step's cleanup removes it); the build only proves that
//! provisioning works.
//!
//! Uses `state.container` and `state.base`. Produces `state.artifact`.

use super::DockerState;
use crate::Artifact;
use async_trait::async_trait;
use imgbuild_core::{Step, StepContext, StepError};

/// What the manifest records as the artifact id of a discarded build.
pub const DISCARDED_ID: &str = "discarded";

pub struct StepDiscard;

#[async_trait]
impl Step<DockerState> for StepDiscard {
    fn name(&self) -> &'static str {
        "discard"
    }

    async fn run(&mut self, state: &mut DockerState, cx: &StepContext) -> Result<(), StepError> {
        let base = state
            .base
            .as_ref()
            .ok_or_else(|| StepError::failed("no base image"))?;
        let container = state
            .container
            .as_ref()
            .ok_or_else(|| StepError::failed("the build container is not running"))?;
        cx.log.info(format!(
            "provisioning succeeded; discarding the build container {} (discard = true), nothing is kept",
            container.name
        ));
        state.artifact = Some(Artifact {
            builder: "docker".to_owned(),
            id: DISCARDED_ID.to_owned(),
            files: Vec::new(),
            source: base.identity(),
            details: serde_json::json!({
                "discarded": true,
                "container": container.name,
                "base_image": base.details(),
            }),
        });
        Ok(())
    }
}
