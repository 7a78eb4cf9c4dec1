//! The Docker Engine the Docker builder tests, the CLI's Docker builds and
//! the sshd targets run on: started on demand (`.ci/start-dockerd.sh`), the
//! fixture images, helpers that look at the engine directly (through
//! bollard, as the builder does), and cleanup of what tests made there.

use crate::common::{fixture, run_script, try_run_script, unique};
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::ContainerCreateBody;
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, ListImagesOptions, LogsOptions,
    RemoveContainerOptions, RemoveImageOptions, WaitContainerOptions,
};
use futures_util::StreamExt;
use std::collections::HashMap;
use std::process::Command;
use std::sync::OnceLock;

/// The label the Docker builder puts its run id in.
pub const RUN_ID_LABEL: &str = "org.imgbuild.run-id";

/// Makes sure a Docker engine answers, starting dockerd as CI does; once
/// per test binary (the script is idempotent and serialises itself).
pub fn docker_ready() {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| try_run_script(".ci/start-dockerd.sh", &[]).map(drop))
        .clone()
        .unwrap_or_else(|err| panic!("no Docker engine for the tests: {err}"))
}

/// The Debian base image for Docker builds, imported from a debootstrap
/// rootfs (no registry is needed).
pub fn base_image() -> String {
    docker_ready();
    fixture("IMGBUILD_TEST_DOCKER_IMAGE", "docker-base-image.sh", &[])
}

/// The base image with sshd, sudo and python3: what plays a remote machine.
pub fn sshd_image() -> String {
    docker_ready();
    fixture(
        "IMGBUILD_TEST_SSHD_IMAGE",
        "docker-base-image.sh",
        &["--with-sshd"],
    )
}

/// A client for the engine `DOCKER_HOST` names (or the local one).
pub fn docker() -> Docker {
    Docker::connect_with_defaults().expect("DOCKER_HOST names a usable engine")
}

/// A Docker builder with `config` (its `[[build]]` table as JSON).
pub fn builder(config: serde_json::Value) -> Box<dyn imgbuild_builders::Builder> {
    let config = serde_json::from_value(config).expect("a valid docker builder config");
    Box::new(imgbuild_builders::docker::DockerBuilder::new(config))
}

/// A fresh repository name, so tests never see each other's images.
pub fn unique_repository() -> String {
    unique("imgbuild-test/docker")
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
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        cmd: cmd.map(|cmd| cmd.into_iter().map(str::to_owned).collect()),
        ..Default::default()
    };
    let name = create_and_start(docker, "imgbuild-test-run", body).await;
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
    try_docker_exec(docker, container, argv)
        .await
        .unwrap_or_else(|e| panic!("exec {argv:?} in {container}: {e}"))
}

/// As `docker_exec`, for pollers: a container listed but not yet started
/// (or already stopping) answers the exec with an error, which is "not
/// yet", not a failed test.
pub async fn try_docker_exec(
    docker: &Docker,
    container: &str,
    argv: &[&str],
) -> Result<(i64, String), bollard::errors::Error> {
    let options = bollard::exec::CreateExecOptions {
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        cmd: Some(argv.iter().map(|a| a.to_string()).collect()),
        ..Default::default()
    };
    let exec = docker.create_exec(container, options).await?;
    let mut text = String::new();
    if let bollard::exec::StartExecResults::Attached { mut output, .. } =
        docker.start_exec(&exec.id, None).await?
    {
        while let Some(Ok(chunk)) = output.next().await {
            text.push_str(&chunk.to_string());
        }
    }
    let code = docker.inspect_exec(&exec.id).await?.exit_code.unwrap_or(-1);
    Ok((code, text))
}

/// Starts a container from `image` that just sleeps; returns its name.
pub async fn start_sleeper(
    docker: &Docker,
    image: &str,
    labels: HashMap<String, String>,
) -> String {
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        entrypoint: Some(vec!["sleep".to_owned(), "600".to_owned()]),
        labels: Some(labels),
        ..Default::default()
    };
    create_and_start(docker, "imgbuild-test-sleeper", body).await
}

/// Creates and starts a container from `body` under a fresh name starting
/// with `prefix`; returns the name.
async fn create_and_start(docker: &Docker, prefix: &str, body: ContainerCreateBody) -> String {
    let name = unique(prefix);
    let options = CreateContainerOptions {
        name: Some(name.clone()),
        ..Default::default()
    };
    docker.create_container(Some(options), body).await.unwrap();
    docker.start_container(&name, None).await.unwrap();
    name
}

/// Runs a cleanup on a fresh runtime on its own thread, from a `Drop`: the
/// test's runtime may be the one unwinding, and a plain test has none.
fn block_on_own_thread<F: std::future::Future<Output = ()> + Send + 'static>(work: F) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(work);
    })
    .join();
}

/// Force-removes the listed containers when dropped.
#[derive(Default)]
pub struct ContainerCleanup(pub Vec<String>);

impl Drop for ContainerCleanup {
    fn drop(&mut self) {
        let names = std::mem::take(&mut self.0);
        block_on_own_thread(async move {
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
/// listed image references, and every tag in the listed repositories: a
/// build may have set tags (`latest`, a temporary one) the test never
/// learned of. A reference's repository loses its `latest` tag too when
/// that tag names the same image; a `latest` that names another image
/// belongs to someone else and stays. So tests leave the engine as they
/// found it.
#[derive(Default)]
pub struct ImageCleanup {
    references: Vec<String>,
    repositories: Vec<String>,
}

impl ImageCleanup {
    /// Cleans up these references (`repository:tag` or image ids).
    pub fn references(references: impl IntoIterator<Item = impl Into<String>>) -> ImageCleanup {
        ImageCleanup {
            references: references.into_iter().map(Into::into).collect(),
            repositories: Vec::new(),
        }
    }

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
        let references = std::mem::take(&mut self.references);
        let repositories = std::mem::take(&mut self.repositories);
        block_on_own_thread(async move {
            let docker = docker();
            let mut doomed = Vec::new();
            for reference in references {
                if let Some(latest) = same_image_latest(&docker, &reference).await {
                    doomed.push(latest);
                }
                doomed.push(reference);
            }
            for repository in repositories {
                for tag in repository_tags(&docker, &repository).await {
                    doomed.push(format!("{repository}:{tag}"));
                }
            }
            for reference in doomed {
                let options = RemoveImageOptions {
                    force: true,
                    ..Default::default()
                };
                let _ = docker.remove_image(&reference, Some(options), None).await;
            }
        });
    }
}

/// `repository:latest` of `reference`, when it names the same image.
async fn same_image_latest(docker: &Docker, reference: &str) -> Option<String> {
    // The tag is after the last colon, unless that colon is a registry's
    // port ("localhost:5000/app").
    let repository = match reference.rsplit_once(':') {
        Some((repository, tag)) if !tag.contains('/') => repository,
        _ => reference,
    };
    let latest = format!("{repository}:latest");
    if latest == reference {
        return None;
    }
    let id = docker.inspect_image(reference).await.ok()?.id?;
    let latest_id = docker.inspect_image(&latest).await.ok()?.id?;
    (id == latest_id).then_some(latest)
}

/// What a target started without a key has in `authorized_keys` before the
/// build adds its own: a line the build must leave in place.
pub const PLACEHOLDER_KEY_LINE: &str = "# filled in by the test";

/// An sshd container (tests/fixtures/sshd-target) standing in for a remote
/// machine; keys are added to the login user's `~/.ssh/authorized_keys` as
/// cloud-init does on EC2. Removed when dropped.
pub struct SshTarget {
    pub cid: String,
    pub user: String,
    pub host: String,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl SshTarget {
    /// A target whose `user` trusts `initial_key` (or, without one, no key:
    /// [`PLACEHOLDER_KEY_LINE`]).
    pub fn start(user: &str, initial_key: Option<&str>) -> SshTarget {
        let image = sshd_image();
        let dir = tempfile::tempdir().unwrap();
        let authorized_keys = dir.path().join("authorized_keys");
        std::fs::write(
            &authorized_keys,
            format!("{}\n", initial_key.unwrap_or(PLACEHOLDER_KEY_LINE)),
        )
        .unwrap();
        // sshd reads the file as the login user.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&authorized_keys, std::fs::Permissions::from_mode(0o644))
                .unwrap();
        }
        let out = run_script(
            "tests/fixtures/sshd-target/start.sh",
            &[user, authorized_keys.to_str().unwrap(), &image],
        );
        let mut fields = out.split_whitespace();
        let cid = fields.next().expect("container id").to_owned();
        let host = fields.next().expect("host").to_owned();
        let port = fields.next().expect("port").parse().expect("port number");
        SshTarget {
            cid,
            user: user.to_owned(),
            host,
            port,
            _dir: dir,
        }
    }

    /// The login user's `authorized_keys`.
    pub fn authorized_keys(&self) -> String {
        self.exec(&format!("cat ~{}/.ssh/authorized_keys", self.user))
    }

    /// What `command` printed. Panics when it fails: an empty output from
    /// a failed `cat` would otherwise read as "the file holds nothing".
    pub fn exec(&self, command: &str) -> String {
        let output = Command::new("docker")
            .args(["exec", &self.cid, "sh", "-c", command])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "`{command}` failed in the target container {} ({}): {}",
            self.cid,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for SshTarget {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.cid])
            .output();
    }
}

/// What cloud-init does with an instance's key pair: `user` in container
/// `cid` trusts `public_key` from now on.
pub fn append_authorized_key(cid: &str, user: &str, public_key: &str) {
    let output = Command::new("docker")
        .args(["exec", "-u", user, cid, "sh", "-c"])
        .arg(format!(
            "printf '%s\\n' \"$0\" >> ~{user}/.ssh/authorized_keys"
        ))
        .arg(public_key)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "cannot add a key in {cid}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
