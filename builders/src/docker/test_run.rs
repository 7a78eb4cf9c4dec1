//! `[[test]]` on a committed image: a fresh test container is started from
//! the image (by id, so a tag moved since cannot swap it), with the build
//! container's steps: created with its own `ENTRYPOINT`/`CMD` replaced by
//! `run_command`, labelled and journalled before it exists, connected
//! through the exec API. Commands run as the image's `USER` in its
//! `WORKDIR`, as the image will run. The tests run in order, and the
//! create step's cleanup removes the container on success, failure and
//! cancel.
//!
//! Export and discard builds keep no image to start a container from:
//! their tests are refused.
//!
//! Steps, in order: find the image, create and start the container,
//! connect, run the tests. The last produces `state.test_results`.

use super::engine::{self, ImageApi};
use super::kept::Kept;
use super::plan::Plan;
use super::step_connect::StepConnect;
use super::step_create_container::StepCreateContainer;
use super::step_pull::BaseImage;
use super::{DockerConfig, DockerState, warn_left_running};
use crate::common::outcome::steps_result;
use crate::common::step_run_tests::StepRunTests;
use crate::{Artifact, BuildError, BuildRequest};
use async_trait::async_trait;
use imgbuild_core::{Step, StepContext, StepError, run_steps};
use imgbuild_provisioners::image_test::{ImageTest, TestResult};
use std::sync::Arc;

/// Runs `tests` on a fresh container started from the image `artifact`
/// records, then removes the container.
pub async fn test_image(
    config: &DockerConfig,
    request: &BuildRequest,
    artifact: &Artifact,
    tests: &[ImageTest],
    cx: &StepContext,
) -> Result<Vec<TestResult>, BuildError> {
    let (image_id, reference) = image_to_test(artifact, cx.build_name())?;
    if tests.is_empty() {
        return Ok(Vec::new());
    }
    let plan = Plan::new(config, request, &cx.run_id, cx.build_name())
        .map_err(BuildError::Refused)?
        .for_test_container(&cx.run_id, cx.build_name());
    let plan = Arc::new(plan);
    let mut state = DockerState::connect().await?;
    let mut steps: Vec<Box<dyn Step<DockerState>>> = vec![
        Box::new(StepFindImage {
            image_id,
            reference,
        }),
        Box::new(StepCreateContainer::new(plan.clone())),
        Box::new(StepConnect::new(plan)),
        Box::new(StepRunTests::new(tests.to_vec())),
    ];
    let mut report = run_steps(&mut steps, &mut state, cx, request.on_error).await;
    if report.left_for_debugging {
        warn_left_running(&state, "test container", cx);
    }
    steps_result(&mut report)?;
    state.test_results.take().ok_or_else(|| BuildError::Failed {
        step: "test".to_owned(),
        message: "the tests finished without results".to_owned(),
    })
}

/// The committed image's id and its version reference (for messages), or
/// why there is no image to test.
fn image_to_test(artifact: &Artifact, build: &str) -> Result<(String, String), BuildError> {
    match Kept::of(artifact).map_err(BuildError::Refused)? {
        Kept::Image {
            id,
            repository,
            tags,
        } => {
            let reference = format!("{repository}:{}", tags[0]);
            Ok((id, reference))
        }
        Kept::Tar { path, .. } => Err(BuildError::Refused(format!(
            "tests need a committed image: build `{build}` exported its filesystem to {} (`export_path`), a tar without the image's configuration to start a container from; drop `export_path` to commit an image that can be tested, or leave this build out of the tests with `except = [\"{build}\"]`",
            path.display()
        ))),
        Kept::Nothing => Err(BuildError::Refused(format!(
            "tests need a committed image: build `{build}` discards its container (`discard = true`), so nothing is left to test; leave it out of the tests with `except = [\"{build}\"]`"
        ))),
    }
}

/// Makes sure the image is still in the engine, and hands it to the
/// create step as the image to start from.
///
/// Uses `state.images`. Produces `state.base`.
struct StepFindImage {
    image_id: String,
    reference: String,
}

impl StepFindImage {
    async fn find(&self, images: &dyn ImageApi, host: &str) -> Result<BaseImage, String> {
        let id = &self.image_id;
        let reference = &self.reference;
        match images.inspect_image(id).await {
            Ok(inspected) => BaseImage::from_inspect(reference, inspected),
            Err(err) if engine::is_not_found(&err) => Err(format!(
                "the image {reference} ({id}) is no longer in the Docker engine at {host}; it was removed after it was built, so there is nothing to test: build a new version"
            )),
            Err(err) => Err(format!(
                "cannot inspect the image {reference} ({id}): {}",
                engine::describe(&err)
            )),
        }
    }
}

#[async_trait]
impl Step<DockerState> for StepFindImage {
    fn name(&self) -> &'static str {
        "find_image"
    }

    async fn run(&mut self, state: &mut DockerState, cx: &StepContext) -> Result<(), StepError> {
        let image = self
            .find(state.images.as_ref(), state.engine.host())
            .await
            .map_err(StepError::failed)?;
        cx.log.info(format!(
            "testing {} ({}) on a fresh container",
            self.reference, self.image_id
        ));
        state.base = Some(image);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ArtifactFile;
    use crate::common::testing::TestContext;
    use crate::common::testing::docker_artifact as artifact;
    use crate::docker::engine::fake::FakeImages;
    use serde_json::json;

    #[test]
    fn the_committed_image_is_tested_by_id_and_the_others_are_refused() {
        let commit = artifact(
            "sha256:abc",
            Vec::new(),
            json!({"repository": "web", "tags": ["1.2", "latest"], "image_id": "sha256:abc"}),
        );
        assert_eq!(
            image_to_test(&commit, "app").unwrap(),
            ("sha256:abc".to_owned(), "web:1.2".to_owned())
        );

        let file = ArtifactFile {
            path: "/out/web.tar".into(),
            size: 3,
            sha256: "ff".into(),
        };
        let export = artifact("/out/web.tar", vec![file], json!({"format": "tar"}));
        match image_to_test(&export, "app") {
            Err(BuildError::Refused(message)) => {
                assert!(
                    message.starts_with("tests need a committed image"),
                    "{message}"
                );
                assert!(message.contains("/out/web.tar"), "{message}");
                assert!(message.contains("except = [\"app\"]"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let discard = artifact("discarded", Vec::new(), json!({"discarded": true}));
        match image_to_test(&discard, "app") {
            Err(BuildError::Refused(message)) => {
                assert!(message.contains("discard = true"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    fn state(images: Arc<FakeImages>) -> DockerState {
        DockerState {
            engine: engine::Engine::unreachable(),
            images,
            base: None,
            container: None,
            communicator: None,
            artifact: None,
            test_results: None,
            cache: None,
        }
    }

    #[tokio::test]
    async fn the_container_starts_from_the_image_id_and_a_removed_image_is_reported() {
        let images = Arc::new(FakeImages::with(&[("web:1.2", "sha256:abc")]));
        let mut state = state(images.clone());
        let t = TestContext::new("app");
        let mut step = StepFindImage {
            image_id: "sha256:abc".into(),
            reference: "web:1.2".into(),
        };
        step.run(&mut state, &t.cx).await.unwrap();
        let base = state.base.clone().unwrap();
        assert_eq!(base.id, "sha256:abc");
        assert_eq!(images.calls(), ["inspect sha256:abc"], "by id, not by tag");

        let mut gone = StepFindImage {
            image_id: "sha256:def".into(),
            reference: "web:1.3".into(),
        };
        let err = gone.run(&mut state, &t.cx).await.unwrap_err().to_string();
        assert!(
            err.contains("web:1.3 (sha256:def) is no longer in the Docker engine"),
            "{err}"
        );
    }
}
