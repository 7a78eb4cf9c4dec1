//! Shared setup for the Docker builder tests: a running engine, the fixture
//! base image, a step context with a real journal, and helpers that look at
//! the engine directly (through bollard, as the builder does).

#![allow(dead_code)]

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, ListImagesOptions, LogsOptions,
    RemoveContainerOptions, RemoveImageOptions, WaitContainerOptions,
};
use futures_util::StreamExt;
use imgbuild_builders::{BuildRequest, Builder, ImageInfo};
use imgbuild_core::events::{Event, MemorySink};
use imgbuild_core::{BuildLog, CancellationToken, Journal, OnError, Redactor, StepContext};
use imgbuild_provisioners::Provisioner;
use imgbuild_provisioners::file::{Direction, FileConfig, FileProvisioner};
use imgbuild_provisioners::shell::{ShellConfig, ShellProvisioner};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

pub const RUN_ID_LABEL: &str = "org.imgbuild.run-id";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the builders crate lives in the workspace")
        .to_path_buf()
}

fn run_script(relative: &str) -> Result<String, String> {
    let script = workspace_root().join(relative);
    let output = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|err| format!("cannot run {}: {err}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed ({}):\n{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Starts dockerd if needed and builds (or finds) the fixture image, once
/// per test binary; both scripts are idempotent and serialise themselves.
/// Returns the base image reference.
pub fn base_image() -> String {
    static BASE: OnceLock<Result<String, String>> = OnceLock::new();
    BASE.get_or_init(|| {
        run_script(".ci/start-dockerd.sh")?;
        let reference = run_script("tests/fixtures/docker-base-image.sh")?;
        let reference = reference
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_owned();
        if reference.is_empty() {
            return Err(
                "tests/fixtures/docker-base-image.sh printed no image reference".to_owned(),
            );
        }
        Ok(reference)
    })
    .clone()
    .unwrap_or_else(|err| panic!("no Docker engine or fixture image for the tests: {err}"))
}

pub fn docker() -> Docker {
    Docker::connect_with_defaults().expect("DOCKER_HOST names a usable engine")
}

/// A fresh repository name, so tests never see each other's images.
pub fn unique_repository() -> String {
    format!(
        "imgbuild-test/docker-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

pub fn image_info(name: &str, version: &str) -> ImageInfo {
    let created = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    ImageInfo {
        name: name.to_owned(),
        version: version.to_owned(),
        description: Some("imgbuild docker builder test image".to_owned()),
        labels: BTreeMap::from([("org.example.owner".to_owned(), "infra-team".to_owned())]),
        revision: Some("0123456789abcdef".to_owned()),
        created,
    }
}

/// One build's context, with a real journal in its own state directory.
pub struct Harness {
    pub state_dir: tempfile::TempDir,
    pub config_dir: tempfile::TempDir,
    pub journal: Arc<Journal>,
    pub sink: Arc<MemorySink>,
    pub cx: StepContext,
}

impl Harness {
    pub fn new(build: &str) -> Harness {
        let state_dir = tempfile::tempdir().unwrap();
        let config_dir = tempfile::tempdir().unwrap();
        let run_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
        let journal =
            Arc::new(Journal::create(state_dir.path(), &run_id, Path::new("image.toml")).unwrap());
        let sink = Arc::new(MemorySink::default());
        let log = BuildLog::root(sink.clone(), Redactor::new()).for_build(build);
        let cx = StepContext {
            log,
            journal: journal.clone(),
            cancel: CancellationToken::new(),
            run_id,
        };
        Harness {
            state_dir,
            config_dir,
            journal,
            sink,
            cx,
        }
    }

    pub fn run_id(&self) -> &str {
        &self.cx.run_id
    }

    pub fn request(&self, image: ImageInfo, provisioners: Vec<Provisioner>) -> BuildRequest {
        BuildRequest {
            image,
            build_name: self.cx.build_name().to_owned(),
            provisioners,
            on_error: OnError::Cleanup,
            config_dir: self.config_dir.path().to_path_buf(),
        }
    }

    /// Output lines the provisioners streamed.
    pub fn output_lines(&self) -> Vec<String> {
        self.sink
            .events()
            .into_iter()
            .filter_map(|event| match event {
                Event::Output { line, .. } => Some(line),
                _ => None,
            })
            .collect()
    }

    /// "step 1.2s, ..." from the step events, for timing reports.
    pub fn step_timings(&self) -> String {
        self.sink
            .events()
            .into_iter()
            .filter_map(|event| match event {
                Event::StepFinished {
                    step, duration_ms, ..
                } => Some(format!("{step} {:.1}s", duration_ms as f64 / 1000.0)),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn assert_journal_empty(&self) {
        let outstanding = self.journal.outstanding();
        assert!(
            outstanding.is_empty(),
            "the journal still lists {outstanding:?}"
        );
    }
}

pub fn builder(config: serde_json::Value) -> Box<dyn Builder> {
    let config = serde_json::from_value(config).expect("a valid docker builder config");
    Box::new(imgbuild_builders::docker::DockerBuilder::new(config))
}

pub fn shell(inline: &[&str]) -> Provisioner {
    let config: ShellConfig =
        serde_json::from_value(serde_json::json!({ "inline": inline })).unwrap();
    Provisioner::new(ShellProvisioner::new(
        config,
        Vec::new(),
        serde_json::json!({}),
    ))
}

pub fn upload(source: &str, destination: &str, base_dir: &Path) -> Provisioner {
    file(Some(source), None, destination, Direction::Upload, base_dir)
}

pub fn upload_content(content: &str, destination: &str, base_dir: &Path) -> Provisioner {
    file(
        None,
        Some(content),
        destination,
        Direction::Upload,
        base_dir,
    )
}

pub fn download(source: &str, destination: &str, base_dir: &Path) -> Provisioner {
    file(
        Some(source),
        None,
        destination,
        Direction::Download,
        base_dir,
    )
}

fn file(
    source: Option<&str>,
    content: Option<&str>,
    destination: &str,
    direction: Direction,
    base_dir: &Path,
) -> Provisioner {
    let config = FileConfig {
        source: source.map(str::to_owned),
        content: content.map(str::to_owned),
        destination: destination.to_owned(),
        direction,
    };
    Provisioner::new(FileProvisioner::new(config, base_dir))
}

/// Names of containers, running or not, labelled with `run_id`.
pub async fn containers_of_run(docker: &Docker, run_id: &str) -> Vec<String> {
    let filters = HashMap::from([("label".to_owned(), vec![format!("{RUN_ID_LABEL}={run_id}")])]);
    let options = ListContainersOptions {
        all: true,
        filters: Some(filters),
        ..Default::default()
    };
    docker
        .list_containers(Some(options))
        .await
        .unwrap()
        .into_iter()
        .flat_map(|container| container.names.unwrap_or_default())
        .collect()
}

pub async fn image_exists(docker: &Docker, reference: &str) -> bool {
    match docker.inspect_image(reference).await {
        Ok(_) => true,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => false,
        Err(err) => panic!("cannot inspect {reference}: {err}"),
    }
}

/// Runs `image` with `cmd` (its own CMD when `None`) to completion and
/// returns the exit code and everything it printed; the container is removed.
pub async fn run_image(docker: &Docker, image: &str, cmd: Option<Vec<&str>>) -> (i64, String) {
    let name = format!(
        "imgbuild-test-run-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        cmd: cmd.map(|cmd| cmd.into_iter().map(str::to_owned).collect()),
        ..Default::default()
    };
    let options = CreateContainerOptions {
        name: Some(name.clone()),
        ..Default::default()
    };
    docker.create_container(Some(options), body).await.unwrap();
    docker.start_container(&name, None).await.unwrap();
    let mut exit_code = 0;
    let mut wait = docker.wait_container(&name, None::<WaitContainerOptions>);
    while let Some(result) = wait.next().await {
        match result {
            Ok(response) => exit_code = response.status_code,
            Err(bollard::errors::Error::DockerContainerWaitError { code, .. }) => exit_code = code,
            Err(err) => panic!("waiting for {name}: {err}"),
        }
    }
    let options = LogsOptions {
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    let mut logs = docker.logs(&name, Some(options));
    let mut text = String::new();
    while let Some(Ok(chunk)) = logs.next().await {
        if let LogOutput::StdOut { message }
        | LogOutput::StdErr { message }
        | LogOutput::Console { message } = chunk
        {
            text.push_str(&String::from_utf8_lossy(&message));
        }
    }
    let options = RemoveContainerOptions {
        force: true,
        v: true,
        ..Default::default()
    };
    docker.remove_container(&name, Some(options)).await.unwrap();
    (exit_code, text)
}

/// Runs `argv` in a running container; returns the exit code and output.
pub async fn docker_exec(docker: &Docker, container: &str, argv: &[&str]) -> (i64, String) {
    let options = bollard::exec::CreateExecOptions {
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        cmd: Some(argv.iter().map(|a| a.to_string()).collect()),
        ..Default::default()
    };
    let exec = docker.create_exec(container, options).await.unwrap();
    let mut text = String::new();
    if let bollard::exec::StartExecResults::Attached { mut output, .. } =
        docker.start_exec(&exec.id, None).await.unwrap()
    {
        while let Some(Ok(chunk)) = output.next().await {
            text.push_str(&chunk.to_string());
        }
    }
    let code = docker
        .inspect_exec(&exec.id)
        .await
        .unwrap()
        .exit_code
        .unwrap_or(-1);
    (code, text)
}

/// Starts a container from `image` that just sleeps; returns its name.
pub async fn start_sleeper(
    docker: &Docker,
    image: &str,
    labels: HashMap<String, String>,
) -> String {
    let name = format!(
        "imgbuild-test-sleeper-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        entrypoint: Some(vec!["sleep".to_owned(), "600".to_owned()]),
        labels: Some(labels),
        ..Default::default()
    };
    let options = CreateContainerOptions {
        name: Some(name.clone()),
        ..Default::default()
    };
    docker.create_container(Some(options), body).await.unwrap();
    docker.start_container(&name, None).await.unwrap();
    name
}

/// Force-removes the listed containers when dropped.
#[derive(Default)]
pub struct ContainerCleanup(pub Vec<String>);

impl Drop for ContainerCleanup {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let docker = docker();
                for name in names {
                    let options = RemoveContainerOptions {
                        force: true,
                        v: true,
                        ..Default::default()
                    };
                    let _ = docker.remove_container(&name, Some(options)).await;
                }
            });
        })
        .join();
    }
}

/// Every tag in `repository` (`1.0.0`, `latest`, a run's temporary tag),
/// sorted: what a build left in the engine under that name.
pub async fn repository_tags(docker: &Docker, repository: &str) -> Vec<String> {
    let filters = HashMap::from([("reference".to_owned(), vec![repository.to_owned()])]);
    let options = ListImagesOptions {
        filters: Some(filters),
        ..Default::default()
    };
    let prefix = format!("{repository}:");
    let mut tags: Vec<String> = docker
        .list_images(Some(options))
        .await
        .unwrap_or_else(|err| panic!("cannot list the images of {repository}: {err}"))
        .into_iter()
        .flat_map(|image| image.repo_tags)
        .filter_map(|reference| reference.strip_prefix(&prefix).map(str::to_owned))
        .collect();
    tags.sort();
    tags
}

/// Removes, when dropped (even when the test panicked half-way), the
/// listed image references and every tag in the listed repositories: a
/// build may have set tags (`latest`, a temporary one) the test never
/// learned of.
#[derive(Default)]
pub struct ImageCleanup {
    references: Vec<String>,
    repositories: Vec<String>,
}

impl ImageCleanup {
    /// Cleans up every tag in `repository`.
    pub fn repository(repository: &str) -> ImageCleanup {
        ImageCleanup {
            references: Vec::new(),
            repositories: vec![repository.to_owned()],
        }
    }

    /// Also removes `reference` (an image id or `name:tag`).
    pub fn add(&mut self, reference: impl Into<String>) {
        self.references.push(reference.into());
    }
}

impl Drop for ImageCleanup {
    fn drop(&mut self) {
        let mut references = std::mem::take(&mut self.references);
        let repositories = std::mem::take(&mut self.repositories);
        // A fresh runtime on its own thread: a test's runtime may be the one
        // unwinding.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let docker = docker();
                for repository in repositories {
                    for tag in repository_tags(&docker, &repository).await {
                        references.push(format!("{repository}:{tag}"));
                    }
                }
                for reference in references {
                    let options = RemoveImageOptions {
                        force: true,
                        ..Default::default()
                    };
                    let _ = docker.remove_image(&reference, Some(options), None).await;
                }
            });
        })
        .join();
    }
}
