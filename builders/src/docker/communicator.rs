//! A [`Communicator`] for a running container, through the Engine API: the
//! exec API runs commands, the archive API moves tar streams. No SSH server
//! is needed in the image.
//!
//! It behaves like the SSH communicator as the provisioners see it: a
//! command that fails is an exit status, not an error; an upload into a
//! directory that does not exist yet creates it; relative paths start where
//! commands start (the container's working directory).

use super::engine::{self, Engine};
use async_trait::async_trait;
use bollard::container::LogOutput;
use bollard::errors::Error;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::query_parameters::{
    ContainerArchiveInfoOptions, DownloadFromContainerOptions, InspectContainerOptions,
    UploadToContainerOptions,
};
use futures_util::{StreamExt, TryStreamExt};
use imgbuild_core::Stream;
use imgbuild_provisioners::communicator::{ByteStream, LineSplitter};
use imgbuild_provisioners::{CommError, Communicator, ExitStatus, OutputSink};
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio_util::io::{ReaderStream, StreamReader};

/// Go's `os.ModeDir` and `os.ModeSymlink`, as the archive API reports modes.
const GO_MODE_DIR: u32 = 1 << 31;
const GO_MODE_SYMLINK: u32 = 1 << 27;

/// How long an exec may still count as running after its output ended: the
/// engine closes the stream a moment before it records the exit code.
const EXIT_CODE_WAIT: Duration = Duration::from_secs(10);

pub struct DockerCommunicator {
    engine: Engine,
    container_id: String,
    label: String,
    env: Vec<String>,
    /// Where commands start; relative paths in transfers resolve against it.
    working_dir: String,
    /// The container's `USER` when it is not root. Uploads then go through
    /// `tar -x` run as that user, as over SSH, so the user owns what it
    /// was sent (the shell provisioner's `chmod +x` needs that): the
    /// archive API extracts as root, and its `copyUIDGID` looks the user up
    /// on the engine's host rather than in the container.
    upload_user: Option<String>,
}

/// `USER` values that mean root, for which the archive API's ownership is
/// already right.
fn runs_as_root(user: &str) -> bool {
    let name = user.split(':').next().unwrap_or_default();
    name.is_empty() || name == "root" || name == "0"
}

impl DockerCommunicator {
    /// Attaches to a running container (by name or id) on the engine
    /// `DOCKER_HOST` names; every command gets `env` (`NAME=value` entries).
    pub async fn connect(container: &str, env: Vec<String>) -> Result<Self, CommError> {
        let failed = |reason: String| CommError::Connect {
            target: format!("container {container}"),
            reason,
        };
        let engine = Engine::connect().await.map_err(failed)?;
        let inspected = engine
            .quick()
            .inspect_container(container, None::<InspectContainerOptions>)
            .await
            .map_err(|err| failed(engine::describe(&err)))?;
        let id = inspected
            .id
            .ok_or_else(|| failed("the engine reported no container id".to_owned()))?;
        let name = inspected
            .name
            .map(|name| name.trim_start_matches('/').to_owned())
            .unwrap_or_else(|| container.to_owned());
        let config = inspected.config.unwrap_or_default();
        let working_dir = config.working_dir.unwrap_or_default();
        let user = config.user.unwrap_or_default();
        let communicator = DockerCommunicator::new(engine, id, &name, env, working_dir, &user);
        communicator.reconnect().await?;
        Ok(communicator)
    }

    pub(crate) fn new(
        engine: Engine,
        container_id: String,
        container_name: &str,
        env: Vec<String>,
        working_dir: String,
        user: &str,
    ) -> Self {
        let working_dir = if working_dir.starts_with('/') {
            working_dir
        } else {
            "/".to_owned()
        };
        DockerCommunicator {
            engine,
            container_id,
            label: format!("container {container_name}"),
            env,
            working_dir,
            upload_user: (!runs_as_root(user)).then(|| user.to_owned()),
        }
    }

    /// `mkdir -p` and `tar -x` as the container's user, as over SSH.
    async fn upload_as_user(
        &self,
        dest: &str,
        user: &str,
        archive: ByteStream,
    ) -> Result<(), CommError> {
        let collected = Collected::default();
        let argv = [
            "sh",
            "-c",
            "mkdir -p -- \"$0\" && tar -x -f - -C \"$0\"",
            dest,
        ]
        .map(String::from)
        .to_vec();
        match self.exec_attached(argv, Some(archive), &collected).await? {
            ExitStatus::Code(0) => Ok(()),
            status => Err(CommError::Operation {
                operation: format!("extracting files into {dest}"),
                target: self.label.clone(),
                reason: format!(
                    "`tar -x` as the container's user {user} failed with {status}: {}; the image needs `tar`, and {user} must be allowed to write there",
                    collected.text()
                ),
            }),
        }
    }

    fn resolve(&self, path: &str) -> String {
        resolve_path(&self.working_dir, path)
    }

    /// An engine error as the provisioners understand it: a container that
    /// is gone or stopped, or an engine that went away, is a lost
    /// connection; anything else is a failed operation.
    fn error(&self, operation: &str, err: &Error) -> CommError {
        if engine::is_conflict(err) || engine::is_transport(err) {
            return CommError::Disconnected {
                target: self.label.clone(),
                reason: engine::describe(err),
            };
        }
        CommError::Operation {
            operation: operation.to_owned(),
            target: self.label.clone(),
            reason: engine::describe(err),
        }
    }

    /// Runs `argv` (no shell involved) and streams its output to `output`.
    pub async fn run(
        &self,
        argv: Vec<String>,
        output: &dyn OutputSink,
    ) -> Result<ExitStatus, CommError> {
        self.exec_attached(argv, None, output).await
    }

    /// Runs `argv` with `stdin` (closed once sent) as its standard input.
    async fn exec_attached(
        &self,
        argv: Vec<String>,
        stdin: Option<ByteStream>,
        output: &dyn OutputSink,
    ) -> Result<ExitStatus, CommError> {
        let operation = "running a command";
        let options = CreateExecOptions {
            attach_stdin: Some(stdin.is_some()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            env: Some(self.env.clone()),
            cmd: Some(argv),
            ..Default::default()
        };
        let docker = self.engine.quick();
        let created = docker
            .create_exec(&self.container_id, options)
            .await
            .map_err(|err| {
                if engine::is_not_found(&err) {
                    CommError::Disconnected {
                        target: self.label.clone(),
                        reason: "the container no longer exists".to_owned(),
                    }
                } else {
                    self.error(operation, &err)
                }
            })?;
        let start = StartExecOptions {
            detach: false,
            tty: false,
            output_capacity: None,
        };
        let started = docker
            .start_exec(&created.id, Some(start))
            .await
            .map_err(|err| self.error(operation, &err))?;
        let StartExecResults::Attached {
            output: mut stream,
            mut input,
        } = started
        else {
            return Err(CommError::Operation {
                operation: operation.to_owned(),
                target: self.label.clone(),
                reason: "the engine started the command detached".to_owned(),
            });
        };
        // Without stdin the input half is still held until the output ends:
        // the connection must stay whole meanwhile.
        let feeding = async {
            let Some(mut stdin) = stdin else {
                return Ok(());
            };
            let sent = tokio::io::copy(&mut stdin, &mut input).await.map(drop);
            // End of input: the command sees EOF once the engine sees this.
            let closed = input.shutdown().await;
            sent.and(closed)
        };
        let draining = async {
            let mut stdout = LineSplitter::new(Stream::Stdout);
            let mut stderr = LineSplitter::new(Stream::Stderr);
            let mut broken = None;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => {
                        stdout.push(&message, output)
                    }
                    Ok(LogOutput::StdErr { message }) => stderr.push(&message, output),
                    Ok(LogOutput::StdIn { .. }) => {}
                    Err(err) => {
                        broken = Some(err);
                        break;
                    }
                }
            }
            stdout.finish(output);
            stderr.finish(output);
            broken
        };
        let (fed, broken) = tokio::join!(feeding, draining);
        if let Some(err) = broken {
            return Err(CommError::Disconnected {
                target: self.label.clone(),
                reason: format!(
                    "the command's output stream broke off: {}",
                    engine::describe(&err)
                ),
            });
        }
        // Only now is the exit code final; asking earlier races the engine.
        let deadline = tokio::time::Instant::now() + EXIT_CODE_WAIT;
        loop {
            let inspected = docker
                .inspect_exec(&created.id)
                .await
                .map_err(|err| self.error(operation, &err))?;
            match (inspected.running, inspected.exit_code) {
                (Some(false) | None, Some(code)) => {
                    // A command that exits without reading all its input
                    // breaks the pipe: its exit code says why, unless it
                    // claims success.
                    if code == 0
                        && let Err(err) = &fed
                    {
                        return Err(CommError::Operation {
                            operation: operation.to_owned(),
                            target: self.label.clone(),
                            reason: format!("the command's input could not be sent: {err}"),
                        });
                    }
                    return Ok(ExitStatus::Code(code.clamp(0, u32::MAX as i64) as u32));
                }
                _ if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => {
                    return Err(CommError::Operation {
                        operation: operation.to_owned(),
                        target: self.label.clone(),
                        reason: format!(
                            "the command's output ended but the engine reported no exit code within {}s",
                            EXIT_CODE_WAIT.as_secs()
                        ),
                    });
                }
            }
        }
    }

    /// `mkdir -p` for an upload destination, as `tar -x -C` over SSH does.
    async fn ensure_directory(&self, path: &str) -> Result<(), CommError> {
        let operation = format!("preparing {path} for an upload");
        let options = ContainerArchiveInfoOptions {
            path: path.to_owned(),
        };
        match self
            .engine
            .quick()
            .get_container_archive_info(&self.container_id, Some(options))
            .await
        {
            Ok(stat) if stat.file_mode & (GO_MODE_DIR | GO_MODE_SYMLINK) != 0 => return Ok(()),
            Ok(_) => {
                return Err(CommError::Operation {
                    operation,
                    target: self.label.clone(),
                    reason: format!("{path} exists and is not a directory"),
                });
            }
            Err(err) if engine::is_not_found(&err) => {}
            Err(err) => return Err(self.error(&operation, &err)),
        }
        let collected = Collected::default();
        let argv = ["mkdir", "-p", "--", path].map(String::from).to_vec();
        match self.run(argv, &collected).await? {
            ExitStatus::Code(0) => Ok(()),
            status => Err(CommError::Operation {
                operation,
                target: self.label.clone(),
                reason: format!(
                    "`mkdir -p {path}` failed with {status}: {}",
                    collected.text()
                ),
            }),
        }
    }
}

/// An absolute path in the container for `path` as a provisioner gave it.
fn resolve_path(working_dir: &str, path: &str) -> String {
    if path.starts_with('/') {
        return path.to_owned();
    }
    let relative = path.trim_start_matches("./");
    let relative = if relative == "." { "" } else { relative };
    let base = working_dir.trim_end_matches('/');
    match (base.is_empty(), relative.is_empty()) {
        (true, true) => "/".to_owned(),
        (false, true) => base.to_owned(),
        (_, false) => format!("{base}/{relative}"),
    }
}

/// Keeps a helper command's output for its error message.
#[derive(Default)]
struct Collected(Mutex<Vec<String>>);

impl Collected {
    fn text(&self) -> String {
        let lines = self
            .0
            .lock()
            .map(|lines| lines.join("; "))
            .unwrap_or_default();
        if lines.trim().is_empty() {
            "no output".to_owned()
        } else {
            lines
        }
    }
}

impl OutputSink for Collected {
    fn line(&self, _stream: Stream, line: &str) {
        if let Ok(mut lines) = self.0.lock()
            && lines.len() < 20
        {
            lines.push(line.to_owned());
        }
    }
}

#[async_trait]
impl Communicator for DockerCommunicator {
    async fn exec(&self, command: &str, output: &dyn OutputSink) -> Result<ExitStatus, CommError> {
        self.run(
            vec!["sh".to_owned(), "-c".to_owned(), command.to_owned()],
            output,
        )
        .await
    }

    async fn upload_tar(&self, dest_dir: &str, archive: ByteStream) -> Result<(), CommError> {
        let dest = self.resolve(dest_dir);
        if let Some(user) = &self.upload_user {
            return self.upload_as_user(&dest, user, archive).await;
        }
        self.ensure_directory(&dest).await?;
        let options = UploadToContainerOptions {
            path: dest.clone(),
            // Never let an archive entry replace a directory with a file or
            // the reverse; tar over SSH refuses that too.
            no_overwrite_dir_non_dir: Some("true".to_owned()),
            copy_uidgid: None,
        };
        let body = bollard::body_try_stream(ReaderStream::with_capacity(archive, 256 * 1024));
        self.engine
            .slow()
            .upload_to_container(&self.container_id, Some(options), body)
            .await
            .map_err(|err| self.error(&format!("extracting files into {dest}"), &err))
    }

    async fn download_tar(&self, path: &str) -> Result<ByteStream, CommError> {
        let resolved = self.resolve(path);
        let trimmed = resolved.trim_end_matches('/');
        let resolved = if trimmed.is_empty() {
            "/".to_owned()
        } else {
            trimmed.to_owned()
        };
        let operation = format!("archiving {resolved}");
        let options = DownloadFromContainerOptions {
            path: resolved.clone(),
        };
        let mut stream = self
            .engine
            .slow()
            .download_from_container(&self.container_id, Some(options));
        // The engine reports a missing path as the response status, which
        // the stream only yields on first read; read it here so the caller
        // gets a clear error rather than a broken archive.
        let first = match stream.next().await {
            Some(Ok(bytes)) => bytes,
            Some(Err(err)) if engine::is_not_found(&err) => {
                return Err(CommError::Operation {
                    operation,
                    target: self.label.clone(),
                    reason: format!("{resolved} does not exist"),
                });
            }
            Some(Err(err)) => return Err(self.error(&operation, &err)),
            None => bytes::Bytes::new(),
        };
        let label = self.label.clone();
        let rest = stream.map_err(move |err| {
            std::io::Error::other(format!(
                "download of {resolved} from {label} broke off: {}",
                engine::describe(&err)
            ))
        });
        let whole = futures_util::stream::once(async move { Ok(first) }).chain(rest);
        Ok(Box::new(StreamReader::new(Box::pin(whole))))
    }

    async fn reconnect(&self) -> Result<(), CommError> {
        let inspected = self
            .engine
            .quick()
            .inspect_container(&self.container_id, None::<InspectContainerOptions>)
            .await
            .map_err(|err| CommError::Connect {
                target: self.label.clone(),
                reason: engine::describe(&err),
            })?;
        let state = inspected.state.unwrap_or_default();
        if state.running == Some(true) && state.paused != Some(true) {
            return Ok(());
        }
        Err(CommError::Connect {
            target: self.label.clone(),
            reason: format!(
                "the container is not running (status {}, exit code {}); a container cannot reboot, so provisioners must not stop it",
                state
                    .status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "unknown".to_owned()),
                state.exit_code.unwrap_or_default()
            ),
        })
    }

    fn target(&self) -> String {
        self.label.clone()
    }

    fn endpoint(&self) -> Option<imgbuild_provisioners::Endpoint> {
        Some(imgbuild_provisioners::Endpoint::DockerContainer {
            container_id: self.container_id.clone(),
            docker_host: std::env::var("DOCKER_HOST").ok(),
            env: self.env.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_non_root_user_changes_how_files_are_uploaded() {
        for root in ["", "root", "0", "root:root", "0:0"] {
            assert!(runs_as_root(root), "{root}");
        }
        for user in ["app", "app:app", "1000", "1000:0"] {
            assert!(!runs_as_root(user), "{user}");
        }
    }

    #[test]
    fn relative_paths_start_in_the_working_directory() {
        assert_eq!(resolve_path("/", "."), "/");
        assert_eq!(resolve_path("/", "x/y"), "/x/y");
        assert_eq!(resolve_path("/srv/app", "./conf"), "/srv/app/conf");
        assert_eq!(resolve_path("/srv/app/", "."), "/srv/app");
        assert_eq!(resolve_path("/srv", "/etc/hosts"), "/etc/hosts");
    }
}
