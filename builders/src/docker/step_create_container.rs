//! Creates and starts the build container from the base image's id, named
//! after the run and the build so `imgbuild clean` can find it by name.
//! Cleanup force-removes it (with its anonymous volumes) whatever happened.
//! The `[[test]]` run starts its test container from the committed image
//! the same way (`state.base` is then that image).
//!
//! Uses `state.engine` and `state.base`. Produces `state.container`.

use super::engine::{self, Engine};
use super::kind::DockerResource;
use super::plan::Plan;
use super::{BUILD_LABEL, DockerState, RUN_ID_LABEL, Removal, remove_run_container};
use crate::common::tracked::{record, release};
use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{CreateContainerOptions, InspectContainerOptions, LogsOptions};
use futures_util::StreamExt;
use imgbuild_core::{CleanupOutcome, Journal, ResourceId, Step, StepContext, StepError};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::task::JoinHandle;

/// How many lines of a container's own output explain why it stopped.
const LOG_LINES_SHOWN: &str = "20";

/// The running build container.
#[derive(Debug, Clone)]
pub struct BuildContainer {
    pub id: String,
    pub name: String,
    /// Where commands start: the image's WORKDIR, `/` when it has none.
    pub working_dir: String,
    /// Whom commands run as: the image's USER, empty for root.
    pub user: String,
}

/// `imgbuild-<run id>-<build>`, with characters Docker does not allow in
/// names replaced.
pub fn container_name(run_id: &str, build: &str) -> String {
    format!("imgbuild-{run_id}-{build}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect()
}

type Started = Result<(String, Vec<String>), String>;

pub struct StepCreateContainer {
    plan: Arc<Plan>,
    created: Option<(ResourceId, String)>,
    /// Creating and starting run as their own task: when the build is
    /// cancelled meanwhile, the engine finishes the call anyway, and cleanup
    /// waits for it so the container it makes is removed, not leaked.
    in_flight: Option<JoinHandle<Started>>,
}

impl StepCreateContainer {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepCreateContainer {
            plan,
            created: None,
            in_flight: None,
        }
    }

    fn body(&self, image_id: &str, cx: &StepContext) -> ContainerCreateBody {
        let labels = HashMap::from([
            (RUN_ID_LABEL.to_owned(), cx.run_id.clone()),
            (BUILD_LABEL.to_owned(), cx.build_name().to_owned()),
        ]);
        let binds = self.plan.binds.clone();
        ContainerCreateBody {
            image: Some(image_id.to_owned()),
            // As the entrypoint, so the image's CMD is not appended to it.
            entrypoint: Some(self.plan.config.run_command.clone()),
            labels: Some(labels),
            attach_stdin: Some(false),
            attach_stdout: Some(false),
            attach_stderr: Some(false),
            tty: Some(false),
            open_stdin: Some(false),
            host_config: Some(HostConfig {
                binds: (!binds.is_empty()).then_some(binds),
                privileged: Some(self.plan.config.privileged),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

async fn create_and_start(
    engine: Engine,
    role: &'static str,
    name: String,
    body: ContainerCreateBody,
    platform: String,
    run_command: Vec<String>,
    journal: (Arc<Journal>, ResourceId),
) -> Started {
    let options = CreateContainerOptions {
        name: Some(name.clone()),
        platform,
    };
    let created = engine
        .slow()
        .create_container(Some(options), body)
        .await
        .map_err(|err| {
            if engine::is_conflict(&err) {
                format!(
                    "a container named {name} already exists: {}; another build with this run id is running, or a dead run left it (`imgbuild clean` removes it)",
                    engine::describe(&err)
                )
            } else {
                format!("cannot create the {role} {name}: {}", engine::describe(&err))
            }
        })?;
    // Until this is written, a dead run's journal cannot tell a container
    // that is gone from one the engine is still creating.
    let (journal, id) = journal;
    journal.confirm(id).map_err(|err| err.to_string())?;
    engine
        .slow()
        .start_container(&created.id, None)
        .await
        .map_err(|err| {
            format!(
                "cannot start the {role} {name} running {run_command:?}: {}; the image must contain the program `run_command` names (set `run_command` for an image without /bin/sh)",
                engine::describe(&err)
            )
        })?;
    Ok((created.id, created.warnings))
}

/// The last lines a stopped container printed, for the error message.
async fn output_tail(engine: &Engine, container: &str) -> String {
    let options = LogsOptions {
        stdout: true,
        stderr: true,
        tail: LOG_LINES_SHOWN.to_owned(),
        ..Default::default()
    };
    let mut logs = engine.quick().logs(container, Some(options));
    let mut text = String::new();
    while let Some(Ok(chunk)) = logs.next().await {
        match chunk {
            LogOutput::StdOut { message }
            | LogOutput::StdErr { message }
            | LogOutput::Console { message } => {
                text.push_str(&String::from_utf8_lossy(&message));
            }
            LogOutput::StdIn { .. } => {}
        }
    }
    let text = text.trim();
    if text.is_empty() {
        "it printed nothing".to_owned()
    } else {
        format!(
            "its last output:\n    {}",
            text.lines().collect::<Vec<_>>().join("\n    ")
        )
    }
}

#[async_trait]
impl Step<DockerState> for StepCreateContainer {
    fn name(&self) -> &'static str {
        "create_container"
    }

    async fn run(&mut self, state: &mut DockerState, cx: &StepContext) -> Result<(), StepError> {
        let base = state
            .base
            .as_ref()
            .ok_or_else(|| StepError::failed("no base image"))?;
        let name = self.plan.container_name.clone();
        // From the longest cached prefix of the build's steps, if any.
        let start_image = state
            .cache
            .as_ref()
            .and_then(|cache| cache.start_image.clone())
            .unwrap_or_else(|| base.id.clone());
        let body = self.body(&start_image, cx);
        let id = record(cx, DockerResource::Container { name: name.clone() }.into())?;
        self.created = Some((id, name.clone()));
        let task = tokio::spawn(create_and_start(
            state.engine.clone(),
            self.plan.container_role,
            name.clone(),
            body,
            self.plan.config.platform.clone().unwrap_or_default(),
            self.plan.config.run_command.clone(),
            (cx.journal.clone(), id),
        ));
        let in_flight = self.in_flight.insert(task);
        let started = in_flight.await.map_err(|err| {
            StepError::failed(format!("creating the {}: {err}", self.plan.container_role))
        })?;
        self.in_flight = None;
        let (container_id, warnings) = started.map_err(StepError::failed)?;
        for warning in warnings {
            cx.log.warn(format!(
                "the engine warns about the {}: {warning}",
                self.plan.container_role
            ));
        }

        let inspected = state
            .engine
            .quick()
            .inspect_container(&container_id, None::<InspectContainerOptions>)
            .await
            .map_err(|err| {
                StepError::failed(format!(
                    "cannot inspect the {} {name}: {}",
                    self.plan.container_role,
                    engine::describe(&err)
                ))
            })?;
        let running = inspected
            .state
            .as_ref()
            .and_then(|s| s.running)
            .unwrap_or(false);
        if !running {
            let exit_code = inspected
                .state
                .as_ref()
                .and_then(|s| s.exit_code)
                .unwrap_or_default();
            return Err(StepError::failed(format!(
                "the {} {name} stopped right after starting (exit code {exit_code}): `run_command` {:?} must keep running until the container is no longer needed; {}",
                self.plan.container_role,
                self.plan.config.run_command,
                output_tail(&state.engine, &container_id).await
            )));
        }
        let config = inspected.config.unwrap_or_default();
        let working_dir = config
            .working_dir
            .filter(|dir| !dir.is_empty())
            .unwrap_or_else(|| "/".to_owned());
        let user = config.user.unwrap_or_default();
        cx.log.info(format!(
            "started {} {name} ({}) from {}",
            self.plan.container_role,
            &container_id[..container_id.len().min(12)],
            base.reference
        ));
        state.container = Some(BuildContainer {
            id: container_id,
            name,
            working_dir,
            user,
        });
        Ok(())
    }

    async fn cleanup(
        &mut self,
        state: &mut DockerState,
        cx: &StepContext,
        _outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        if let Some(task) = self.in_flight.take() {
            // Whatever it returns, the container (if any) is removed by name.
            let _ = task.await;
        }
        state.container = None;
        let Some((id, name)) = self.created.take() else {
            return Ok(());
        };
        match remove_run_container(&state.engine, &name, &cx.run_id).await {
            Ok(Removal::Removed) => cx
                .log
                .info(format!("removed {} {name}", self.plan.container_role)),
            Ok(Removal::Absent) => {}
            // The name was taken before this run's create, which then failed.
            Ok(Removal::NotOurs(message)) => cx.log.warn(message),
            Err(message) => {
                self.created = Some((id, name));
                return Err(StepError::failed(message));
            }
        }
        release(cx, id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_names_are_valid_docker_names() {
        assert_eq!(
            container_name("0193a1b2c3d4e5f6", "debian"),
            "imgbuild-0193a1b2c3d4e5f6-debian"
        );
        assert_eq!(container_name("r1", "web app/x"), "imgbuild-r1-web-app-x");
    }
}
