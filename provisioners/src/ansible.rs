//! `type = "ansible"`: runs `ansible-playbook` on the build host against the
//! machine, connecting the way the build itself does (its SSH address and
//! credential, or the Docker container), with no proxy in between. Each run
//! gets its own private directory holding the inventory, the key and the
//! extra vars, so parallel builds never see each other's machine.
//!
//! What `ansible-local` shares with it (playbook checks, extra vars, reading
//! a play's output) lives here too.

use crate::communicator::{Communicator, Endpoint, LineSplitter, OutputSink};
use crate::provisioner::{LoggingSink, Provision, ProvisionContext, ProvisionError, Provisioner};
use crate::registry::{self, ParseError, ParseInput, Parsed, ProvisionerKind};
use crate::ssh::SshAuth;
use async_trait::async_trait;
use imgbuild_core::{ConfigProblem, Stream};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// How many output lines a failure message quotes.
const TAIL_LINES: usize = 25;
/// How long ansible-playbook may take to stop after SIGTERM before its
/// whole process group is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// What an Ansible run failed on, beyond the generic provisioner errors.
#[derive(Debug, Error)]
pub enum AnsibleError {
    #[error(
        "task `{task}` {} on host `{host}` ({playbook}){}",
        if *.unreachable { "could not reach the machine" } else { "failed" },
        tail_text(.tail)
    )]
    TaskFailed {
        playbook: String,
        task: String,
        host: String,
        unreachable: bool,
        tail: Vec<String>,
    },
    #[error("{program} {what} failed with {status}{}", tail_text(.tail))]
    Failed {
        program: String,
        what: String,
        status: String,
        tail: Vec<String>,
    },
    #[error("cannot start {program}: {source}; {help}")]
    Spawn {
        program: String,
        help: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the ansible provisioner cannot reach {target} directly: this builder offers no SSH address or container to connect to"
    )]
    NoEndpoint { target: String },
    #[error(
        "the build logs in to {target} with a password, which Ansible can only pass on with `sshpass`, and it is not installed on the build host; install it (`apt-get install sshpass`) or let the build use a key"
    )]
    SshpassMissing { target: String },
    #[error(
        "ansible-playbook is not installed on the machine {target}; install it in an earlier shell provisioner (`apt-get install -y ansible`, or `pipx install ansible-core`), or use `type = \"ansible\"`, which runs Ansible on the build host"
    )]
    NotOnMachine { target: String },
    #[error("cannot prepare the Ansible run: {what} {}: {source}", .path.display())]
    Prepare {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        return String::new();
    }
    format!("; last output lines:\n    {}", tail.join("\n    "))
}

/// The `[[provision]] type = "ansible"` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnsibleConfig {
    /// Relative to the config's directory.
    pub playbook_file: PathBuf,
    /// Passed to ansible-playbook after imgbuild's own arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_arguments: Vec<String>,
    /// Reach the play through a 0600 vars file (`-e @file`), never the
    /// command line, where every local user could read them.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra_vars: serde_json::Map<String, serde_json::Value>,
    /// Inventory groups the machine is put in, besides `all`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// The machine's name in the inventory; the build's name by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_alias: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ansible_env_vars: BTreeMap<String, String>,
    /// A requirements file whose roles and collections are installed into
    /// this run's private directory before the play.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub galaxy_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roles_path: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collections_path: Option<PathBuf>,
    /// Tasks run with `--become` (sudo on the machine).
    #[serde(default, alias = "use_sudo")]
    pub r#become: bool,
    #[serde(
        default,
        with = "imgbuild_core::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
}

/// `type = "ansible"`.
pub struct AnsibleKind;

impl ProvisionerKind for AnsibleKind {
    fn name(&self) -> &'static str {
        "ansible"
    }

    fn summary(&self) -> &'static str {
        "runs an Ansible playbook from the build host against the machine"
    }

    fn parse(&self, input: ParseInput<'_>) -> Result<Parsed, ParseError> {
        let config: AnsibleConfig = registry::deserialize(&input)?;
        let dir = input.config_dir;
        let mut problems = Vec::new();
        if find_program("ansible-playbook").is_none() {
            problems.push(
                ConfigProblem::new(
                    "type",
                    "ansible-playbook is not installed on the build host (not found on PATH)",
                )
                .help("install Ansible: `apt-get install ansible` or `pipx install ansible-core`"),
            );
        }
        let playbook = dir.join(&config.playbook_file);
        problems.extend(check_playbook(&playbook, "playbook_file").err());
        let galaxy = config.galaxy_file.as_ref().map(|path| dir.join(path));
        let mut galaxy_parts = GalaxyParts::default();
        if let Some(galaxy) = &galaxy {
            match check_galaxy_file(galaxy) {
                Ok(parts) => galaxy_parts = parts,
                Err(problem) => problems.push(problem),
            }
        }
        let roles_path = config.roles_path.as_ref().map(|path| dir.join(path));
        let collections_path = config.collections_path.as_ref().map(|path| dir.join(path));
        for (field, path) in [
            ("roles_path", &roles_path),
            ("collections_path", &collections_path),
        ] {
            if let Some(path) = path
                && !path.is_dir()
            {
                problems.push(
                    ConfigProblem::new(field, format!("{} is not a directory", path.display()))
                        .help("paths are relative to the directory of the config file"),
                );
            }
        }
        let host_alias = config.host_alias.clone().unwrap_or_else(|| {
            input.template_context["build"]["name"]
                .as_str()
                .unwrap_or("default")
                .to_owned()
        });
        if !is_inventory_name(&host_alias) {
            problems.push(ConfigProblem::new(
                "host_alias",
                format!("`{host_alias}` cannot name an inventory host: use letters, digits, `.`, `_` and `-`"),
            ));
        }
        for group in &config.groups {
            // Ansible warns about, and may rewrite, group names that are
            // not identifiers.
            let identifier = group.chars().next().is_some_and(|c| !c.is_ascii_digit())
                && group.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !identifier || group == "all" || group == "ungrouped" {
                problems.push(ConfigProblem::new(
                    "groups",
                    format!("`{group}` cannot name an inventory group: use letters, digits and `_` (not first a digit), and not `all` or `ungrouped`, which Ansible defines itself"),
                ));
            }
        }
        problems.extend(env_problems(&config.ansible_env_vars, "ansible_env_vars"));
        problems.extend(timeout_problem(config.timeout));
        registry::refuse(problems)?;

        let mut input_files = play_inputs(&playbook);
        if let Some(roles) = &roles_path {
            input_files.extend(files_under(roles));
        }
        input_files.extend(galaxy.clone());
        let resolved = serde_json::to_value(&config).unwrap_or_default();
        let provisioner = AnsibleProvisioner {
            playbook,
            galaxy: galaxy.map(|file| (file, galaxy_parts)),
            roles_path,
            collections_path,
            host_alias,
            config,
        };
        Ok(Parsed {
            provisioner: Provisioner::new(provisioner),
            resolved,
            input_files,
        })
    }
}

/// Which sections of a galaxy requirements file need installing.
#[derive(Debug, Clone, Copy, Default)]
struct GalaxyParts {
    roles: bool,
    collections: bool,
}

#[derive(Debug)]
pub struct AnsibleProvisioner {
    config: AnsibleConfig,
    /// Resolved against the config's directory.
    playbook: PathBuf,
    galaxy: Option<(PathBuf, GalaxyParts)>,
    roles_path: Option<PathBuf>,
    collections_path: Option<PathBuf>,
    host_alias: String,
}

#[async_trait]
impl Provision for AnsibleProvisioner {
    fn describe(&self) -> String {
        format!("ansible ({})", self.config.playbook_file.display())
    }

    async fn run(
        &self,
        comm: &dyn Communicator,
        cx: &ProvisionContext,
    ) -> Result<(), ProvisionError> {
        let endpoint = comm.endpoint().ok_or_else(|| AnsibleError::NoEndpoint {
            target: comm.target(),
        })?;
        let mut run = HostRun::create()?;
        let result = match self.config.timeout {
            Some(limit) => {
                match tokio::time::timeout(limit, self.play(&endpoint, &mut run, cx)).await {
                    Ok(result) => result,
                    Err(_) => Err(ProvisionError::Timeout {
                        what: format!("ansible-playbook {}", self.playbook.display()),
                        after: limit,
                    }),
                }
            }
            None => self.play(&endpoint, &mut run, cx).await,
        };
        // Also reached after a timeout, with the play still running; a
        // cancelled build drops `run` instead, which stops it the same way.
        run.finish().await;
        result
    }
}

impl AnsibleProvisioner {
    async fn play(
        &self,
        endpoint: &Endpoint,
        run: &mut HostRun,
        cx: &ProvisionContext,
    ) -> Result<(), ProvisionError> {
        let inventory = self.write_inventory(endpoint, run)?;
        let vars = run.write_private("extra-vars.json", &vars_file(&self.config.extra_vars))?;
        let mut env = vec![
            ("ANSIBLE_FORCE_COLOR", "0".to_owned()),
            ("ANSIBLE_NOCOLOR", "1".to_owned()),
            ("PYTHONUNBUFFERED", "1".to_owned()),
            // Fewer round trips per task; sudo without a tty is the norm.
            ("ANSIBLE_PIPELINING", "True".to_owned()),
            (
                "ANSIBLE_LOCAL_TEMP",
                run.dir().join("tmp").display().to_string(),
            ),
            // The connection multiplexer lives in the run's directory and
            // is stopped with it, instead of lingering in ~/.ansible/cp.
            (
                "ANSIBLE_SSH_CONTROL_PATH",
                run.control_path().display().to_string(),
            ),
        ];
        if let Endpoint::DockerContainer {
            docker_host: Some(host),
            ..
        } = endpoint
        {
            env.push(("DOCKER_HOST", host.clone()));
        }
        if let Some((file, parts)) = &self.galaxy {
            self.install_galaxy(file, *parts, run, &env, cx).await?;
        }
        if let Some(roles) = self.search_path(
            run.dir().join("roles"),
            self.roles_path.as_deref(),
            &[
                "~/.ansible/roles",
                "/usr/share/ansible/roles",
                "/etc/ansible/roles",
            ],
        ) {
            env.push(("ANSIBLE_ROLES_PATH", roles));
        }
        if let Some(collections) = self.search_path(
            run.dir().join("collections"),
            self.collections_path.as_deref(),
            &["~/.ansible/collections", "/usr/share/ansible/collections"],
        ) {
            env.push(("ANSIBLE_COLLECTIONS_PATH", collections));
        }
        let mut args: Vec<String> = vec![
            "-i".into(),
            inventory.display().to_string(),
            "-e".into(),
            format!("@{}", vars.display()),
        ];
        if self.config.r#become {
            args.push("--become".into());
        }
        args.extend(self.config.extra_arguments.iter().cloned());
        args.push(self.playbook.display().to_string());
        for (name, value) in &self.config.ansible_env_vars {
            env.push((name.as_str(), value.clone()));
        }
        let workdir = imgbuild_core::fsutil::parent_dir(&self.playbook);
        let sink = PlaySink::new(cx, &self.playbook);
        let status = run
            .run_program("ansible-playbook", &args, &env, workdir, &sink, cx)
            .await?;
        if status.success() {
            return Ok(());
        }
        sink.outcome(status, "ansible-playbook", "playbook")
    }

    /// The inventory: this machine alone, under its alias, with how to
    /// reach it. Host key checks are off for this throwaway machine only.
    fn write_inventory(
        &self,
        endpoint: &Endpoint,
        run: &HostRun,
    ) -> Result<PathBuf, ProvisionError> {
        let mut host = serde_json::Map::new();
        match endpoint {
            Endpoint::Ssh {
                host: address,
                port,
                username,
                auth,
            } => {
                host.insert("ansible_connection".into(), "ssh".into());
                host.insert("ansible_host".into(), address.as_str().into());
                host.insert("ansible_port".into(), (*port).into());
                host.insert("ansible_user".into(), username.as_str().into());
                host.insert("ansible_host_key_checking".into(), false.into());
                host.insert(
                    "ansible_ssh_common_args".into(),
                    "-o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no -o IdentitiesOnly=yes -o LogLevel=ERROR".into(),
                );
                match auth {
                    SshAuth::Key(key) => {
                        let text = key
                            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
                            .map_err(|err| AnsibleError::Prepare {
                                what: "writing the build's SSH key to".into(),
                                path: run.dir().join("key"),
                                source: io::Error::other(err.to_string()),
                            })?;
                        let path = run.write_private("key", text.as_bytes())?;
                        host.insert(
                            "ansible_ssh_private_key_file".into(),
                            path.display().to_string().into(),
                        );
                    }
                    SshAuth::Password(password) => {
                        if find_program("sshpass").is_none() {
                            return Err(AnsibleError::SshpassMissing {
                                target: format!("{username}@{address}:{port}"),
                            }
                            .into());
                        }
                        host.insert("ansible_password".into(), password.as_str().into());
                        host.insert("ansible_become_password".into(), password.as_str().into());
                    }
                }
            }
            Endpoint::DockerContainer { container_id, .. } => {
                if find_program("docker").is_none() {
                    return Err(AnsibleError::Spawn {
                        program: "docker".into(),
                        help: "Ansible's docker connection needs the docker client on the build host (`apt-get install docker.io`)".into(),
                        source: io::ErrorKind::NotFound.into(),
                    }
                    .into());
                }
                host.insert(
                    "ansible_connection".into(),
                    "community.docker.docker".into(),
                );
                host.insert("ansible_host".into(), container_id.as_str().into());
            }
        }
        let alias = self.host_alias.as_str();
        let member = serde_json::json!({ alias: {} });
        let children: serde_json::Map<String, serde_json::Value> = self
            .config
            .groups
            .iter()
            .map(|group| (group.clone(), serde_json::json!({ "hosts": member })))
            .collect();
        let inventory = serde_json::json!({
            "all": {
                "hosts": { alias: host },
                "children": children,
            }
        });
        // JSON is YAML, which Ansible's yaml inventory plugin reads.
        let text = serde_json::to_vec_pretty(&inventory).unwrap_or_default();
        Ok(run.write_private("inventory.yml", &text)?)
    }

    async fn install_galaxy(
        &self,
        file: &Path,
        parts: GalaxyParts,
        run: &mut HostRun,
        env: &[(&str, String)],
        cx: &ProvisionContext,
    ) -> Result<(), ProvisionError> {
        let installs = [
            (parts.roles, "role", run.dir().join("roles")),
            (
                parts.collections,
                "collection",
                run.dir().join("collections"),
            ),
        ];
        for (wanted, kind, into) in installs {
            if !wanted {
                continue;
            }
            let args: Vec<String> = vec![
                kind.into(),
                "install".into(),
                "-r".into(),
                file.display().to_string(),
                "-p".into(),
                into.display().to_string(),
            ];
            let sink = PlaySink::new(cx, file);
            let workdir = imgbuild_core::fsutil::parent_dir(file);
            let status = run
                .run_program("ansible-galaxy", &args, env, workdir, &sink, cx)
                .await?;
            if !status.success() {
                return Err(AnsibleError::Failed {
                    program: "ansible-galaxy".into(),
                    what: format!("{kind} install -r {}", file.display()),
                    status: status.to_string(),
                    tail: sink.lines.tail(),
                }
                .into());
            }
        }
        Ok(())
    }

    /// A `:`-separated search path with this run's galaxy installs and the
    /// configured path first, or `None` to keep Ansible's default.
    fn search_path(
        &self,
        installed: PathBuf,
        configured: Option<&Path>,
        defaults: &[&str],
    ) -> Option<String> {
        if self.galaxy.is_none() && configured.is_none() {
            return None;
        }
        let mut parts = vec![installed.display().to_string()];
        parts.extend(configured.map(|path| path.display().to_string()));
        parts.extend(defaults.iter().map(|path| path.to_string()));
        Some(parts.join(":"))
    }
}

/// The leader of the play's process group: `sh -c SUPERVISOR sh DIR
/// PROGRAM ARGS...`. The kernel sends it SIGHUP when imgbuild dies (even by
/// SIGKILL, see `run_program`); it then stops the whole group, not just
/// ansible-playbook (whose forked workers the kernel would not signal), and
/// removes the run's directory with the key and the extra vars. imgbuild's
/// own SIGTERM to the group (timeout, cancel) ends it like the rest.
const SUPERVISOR: &str = r#"dir=$1; shift
trap 'trap "" HUP TERM; kill -TERM 0; sleep 2; ssh -o ControlPath="$dir/cp" -O exit imgbuild-ansible >/dev/null 2>&1; rm -rf "$dir"; kill -KILL 0' HUP
"$@" &
wait $!
"#;

/// One provisioner run's private directory (0700; its files 0600) and the
/// ansible process group working in it. Dropped before `finish` (a
/// cancelled build), it stops the group and removes the directory on a
/// thread of its own, since a drop cannot wait.
struct HostRun {
    dir: Option<tempfile::TempDir>,
    group: Option<libc::pid_t>,
}

impl HostRun {
    fn create() -> Result<HostRun, AnsibleError> {
        let dir = tempfile::Builder::new()
            .prefix("imgbuild-ansible-")
            .tempdir()
            .map_err(|source| AnsibleError::Prepare {
                what: "creating a private directory in".into(),
                path: std::env::temp_dir(),
                source,
            })?;
        // tempfile makes it 0700 already; a changed default must not widen it.
        set_mode(dir.path(), 0o700).map_err(|source| AnsibleError::Prepare {
            what: "restricting".into(),
            path: dir.path().to_owned(),
            source,
        })?;
        Ok(HostRun {
            dir: Some(dir),
            group: None,
        })
    }

    fn dir(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the directory lives until finish")
            .path()
    }

    fn control_path(&self) -> PathBuf {
        self.dir().join("cp")
    }

    fn write_private(&self, name: &str, contents: &[u8]) -> Result<PathBuf, AnsibleError> {
        let path = self.dir().join(name);
        write_private(&path, contents).map_err(|source| AnsibleError::Prepare {
            what: "writing".into(),
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Runs `program` in its own process group, streaming its output to
    /// `sink` line by line.
    async fn run_program(
        &mut self,
        program: &str,
        args: &[String],
        env: &[(&str, String)],
        workdir: &Path,
        sink: &PlaySink<'_>,
        cx: &ProvisionContext,
    ) -> Result<std::process::ExitStatus, ProvisionError> {
        let shown: Vec<String> = std::iter::once(program.to_owned())
            .chain(args.iter().cloned())
            .map(|arg| crate::shell::shell_quote(&arg))
            .collect();
        if find_program(program).is_none() {
            return Err(AnsibleError::Spawn {
                program: program.to_owned(),
                help: "install Ansible on the build host: `apt-get install ansible` or `pipx install ansible-core`".into(),
                source: io::ErrorKind::NotFound.into(),
            }
            .into());
        }
        cx.log.info(format!("running {}", shown.join(" ")));
        let mut command = tokio::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(SUPERVISOR)
            .arg("imgbuild-ansible")
            .arg(self.dir())
            .arg(program)
            .args(args)
            .envs(env.iter().map(|(name, value)| (name, value)))
            .current_dir(workdir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0);
        let parent = std::process::id();
        // SAFETY: only async-signal-safe calls (prctl, getppid, _exit)
        // between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // An imgbuild killed outright (SIGKILL) cannot stop the play
                // itself: the kernel tells the supervisor, which does. (The
                // signal follows the forking thread; tokio's workers live
                // as long as the runtime.)
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGHUP);
                if libc::getppid() as u32 != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| AnsibleError::Spawn {
            program: "/bin/sh".to_owned(),
            help: format!("it runs {program}"),
            source,
        })?;
        self.group = child.id().map(|pid| pid as libc::pid_t);
        let stdout = pump(child.stdout.take(), Stream::Stdout, sink);
        let stderr = pump(child.stderr.take(), Stream::Stderr, sink);
        let mut pumps = std::pin::pin!(async { tokio::join!(stdout, stderr) });
        let mut drained = false;
        let status = tokio::select! {
            status = child.wait() => status,
            _ = &mut pumps => {
                drained = true;
                child.wait().await
            }
        };
        if !drained {
            // A process the play left behind may hold the pipes open.
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut pumps).await;
        }
        // The group's leader is reaped: its id may be reused from now on.
        self.group = None;
        status.map_err(|source| {
            AnsibleError::Spawn {
                program: program.to_owned(),
                help: "waiting for it failed".into(),
                source,
            }
            .into()
        })
    }

    /// Stops what still runs (after a timeout) and removes the directory.
    async fn finish(mut self) {
        let group = self.group.take();
        let dir = self.dir.take();
        let _ = tokio::task::spawn_blocking(move || tear_down(group, dir)).await;
    }
}

impl Drop for HostRun {
    fn drop(&mut self) {
        let group = self.group.take();
        let dir = self.dir.take();
        if group.is_some() || dir.is_some() {
            std::thread::spawn(move || tear_down(group, dir));
        }
    }
}

/// SIGTERM to the group, SIGKILL to what is left after [`STOP_GRACE`];
/// then the SSH connection multiplexer (it detaches from the group) is told
/// to exit, and the directory with the inventory and key is removed.
fn tear_down(group: Option<libc::pid_t>, dir: Option<tempfile::TempDir>) {
    if let Some(group) = group {
        signal_group(group, libc::SIGTERM);
        let deadline = std::time::Instant::now() + STOP_GRACE;
        while group_alive(group) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        signal_group(group, libc::SIGKILL);
    }
    if let Some(dir) = dir {
        let control = dir.path().join("cp");
        if control.exists() {
            let _ = std::process::Command::new("ssh")
                .arg("-o")
                .arg(format!("ControlPath={}", control.display()))
                .args(["-O", "exit", "imgbuild-ansible"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        drop(dir);
    }
}

fn signal_group(group: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill(2) with a negative pid signals that process group only;
    // the group is ours (made with process_group(0)).
    unsafe {
        libc::kill(-group, signal);
    }
}

fn group_alive(group: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the group exists.
    unsafe { libc::kill(-group, 0) == 0 }
}

async fn pump(reader: Option<impl AsyncRead + Unpin>, stream: Stream, sink: &dyn OutputSink) {
    let Some(mut reader) = reader else {
        return;
    };
    let mut splitter = LineSplitter::new(stream);
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => splitter.push(&buffer[..read], sink),
        }
    }
    splitter.finish(sink);
}

/// Streams a play's output into the build log, remembering the task it is
/// in and the first host a task failed on.
pub(crate) struct PlaySink<'a> {
    pub(crate) lines: LoggingSink<'a>,
    playbook: String,
    state: Mutex<PlayState>,
}

#[derive(Default)]
struct PlayState {
    task: Option<String>,
    failure: Option<(String, String, bool)>,
}

impl<'a> PlaySink<'a> {
    pub(crate) fn new(cx: &'a ProvisionContext, playbook: &Path) -> Self {
        PlaySink {
            lines: LoggingSink::new(&cx.log, TAIL_LINES),
            playbook: playbook.display().to_string(),
            state: Mutex::new(PlayState::default()),
        }
    }

    /// The run's result from the program's exit status and what it printed.
    pub(crate) fn outcome(
        &self,
        status: impl std::fmt::Display,
        program: &str,
        what: &str,
    ) -> Result<(), ProvisionError> {
        let failure = self
            .state
            .lock()
            .map(|state| state.failure.clone())
            .unwrap_or_default();
        match failure {
            Some((task, host, unreachable)) => Err(AnsibleError::TaskFailed {
                playbook: self.playbook.clone(),
                task,
                host,
                unreachable,
                tail: self.lines.tail(),
            }
            .into()),
            None => Err(AnsibleError::Failed {
                program: program.to_owned(),
                what: format!("{what} {}", self.playbook),
                status: status.to_string(),
                tail: self.lines.tail(),
            }
            .into()),
        }
    }
}

impl OutputSink for PlaySink<'_> {
    fn line(&self, stream: Stream, line: &str) {
        self.lines.line(stream, line);
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if let Some(task) = bracketed_after(line, &["TASK [", "RUNNING HANDLER ["]) {
            state.task = Some(task.to_owned());
        } else if line == "...ignoring" {
            // `ignore_errors: true`: the failure just printed does not count.
            state.failure = None;
        } else if state.failure.is_none()
            && let Some((host, unreachable)) = failed_host(line)
        {
            let task = state
                .task
                .clone()
                .unwrap_or_else(|| "(before any task)".into());
            state.failure = Some((task, host.to_owned(), unreachable));
        }
    }
}

/// `TASK [role : name] ****` → `role : name`.
fn bracketed_after<'l>(line: &'l str, prefixes: &[&str]) -> Option<&'l str> {
    let rest = prefixes
        .iter()
        .find_map(|prefix| line.strip_prefix(prefix))?;
    let end = rest.rfind(']')?;
    Some(&rest[..end])
}

/// `fatal: [web]: FAILED! => ...`, `fatal: [web]: UNREACHABLE! => ...`,
/// `failed: [web] (item=x) => ...` → the host, and whether it was
/// unreachable.
fn failed_host(line: &str) -> Option<(&str, bool)> {
    let rest = line
        .strip_prefix("fatal: [")
        .or_else(|| line.strip_prefix("failed: ["))?;
    let (host, after) = rest.split_once(']')?;
    Some((host, after.contains("UNREACHABLE!")))
}

/// Extra vars as the JSON document `-e @file` reads.
pub(crate) fn vars_file(vars: &serde_json::Map<String, serde_json::Value>) -> Vec<u8> {
    serde_json::to_vec(vars).unwrap_or_else(|_| b"{}".to_vec())
}

/// Checks that `path` exists and is a playbook: YAML holding a list of
/// plays.
pub(crate) fn check_playbook(path: &Path, field: &str) -> Result<(), ConfigProblem> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigProblem::new(field, format!("cannot read {}: {err}", path.display()))
            .help("playbook paths are relative to the directory of the config file")
    })?;
    match serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text) {
        Ok(serde_yaml_ng::Value::Sequence(_)) => Ok(()),
        Ok(_) => Err(ConfigProblem::new(
            field,
            format!(
                "{} is not a playbook: a playbook is a YAML list of plays",
                path.display()
            ),
        )),
        Err(err) => Err(ConfigProblem::new(
            field,
            format!("{} is not valid YAML: {err}", path.display()),
        )),
    }
}

/// Checks a galaxy requirements file: a list of roles (the old format) or
/// a mapping with `roles` and/or `collections`.
fn check_galaxy_file(path: &Path) -> Result<GalaxyParts, ConfigProblem> {
    let field = "galaxy_file";
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigProblem::new(field, format!("cannot read {}: {err}", path.display()))
            .help("paths are relative to the directory of the config file")
    })?;
    let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).map_err(|err| {
        ConfigProblem::new(
            field,
            format!("{} is not valid YAML: {err}", path.display()),
        )
    })?;
    let parts = match &value {
        serde_yaml_ng::Value::Sequence(_) => GalaxyParts {
            roles: true,
            collections: false,
        },
        serde_yaml_ng::Value::Mapping(map) => GalaxyParts {
            roles: map.contains_key("roles"),
            collections: map.contains_key("collections"),
        },
        _ => GalaxyParts::default(),
    };
    if !parts.roles && !parts.collections {
        return Err(ConfigProblem::new(
            field,
            format!(
                "{} lists no roles or collections: expected a list of roles, or `roles:` and/or `collections:`",
                path.display()
            ),
        ));
    }
    Ok(parts)
}

pub(crate) fn env_problems(env: &BTreeMap<String, String>, field: &str) -> Vec<ConfigProblem> {
    env.keys()
        .filter(|name| {
            let mut chars = name.chars();
            !(matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_'))
        })
        .map(|name| {
            ConfigProblem::new(
                field,
                format!("`{name}` is not a valid environment variable name (letters, digits and _, not starting with a digit)"),
            )
        })
        .collect()
}

pub(crate) fn timeout_problem(timeout: Option<Duration>) -> Option<ConfigProblem> {
    timeout.filter(|t| t.is_zero()).map(|_| {
        ConfigProblem::new(
            "timeout",
            "must be longer than 0s (leave it out for no limit)",
        )
    })
}

fn is_inventory_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// What a play may read besides the playbook, for the inputs hash: the
/// playbook directory's YAML files and the directories Ansible looks in
/// beside a playbook. Not the whole directory: a playbook kept beside the
/// config would otherwise pull in the build's own outputs.
fn play_inputs(playbook: &Path) -> Vec<PathBuf> {
    let dir = imgbuild_core::fsutil::parent_dir(playbook);
    let mut files = vec![playbook.to_owned()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut yaml: Vec<PathBuf> = entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                path.is_file()
                    && path != playbook
                    && matches!(
                        path.extension().and_then(|e| e.to_str()),
                        Some("yml" | "yaml" | "cfg" | "j2")
                    )
            })
            .collect();
        yaml.sort();
        files.extend(yaml);
    }
    for sub in [
        "roles",
        "group_vars",
        "host_vars",
        "vars",
        "tasks",
        "handlers",
        "templates",
        "files",
        "library",
        "module_utils",
        "filter_plugins",
        "collections",
    ] {
        files.extend(files_under(&dir.join(sub)));
    }
    files
}

/// Every regular file under `dir`, sorted.
pub(crate) fn files_under(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter()
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_file())
        .map(|entry| entry.into_path())
        .collect()
}

/// `program` on PATH, if it is there and executable.
fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_and_failing_host_are_read_from_the_play_output() {
        assert_eq!(
            bracketed_after("TASK [web : install nginx] *****", &["TASK ["]),
            Some("web : install nginx")
        );
        assert_eq!(
            bracketed_after(
                "RUNNING HANDLER [web : restart] ***",
                &["TASK [", "RUNNING HANDLER ["]
            ),
            Some("web : restart")
        );
        assert_eq!(
            failed_host("fatal: [vm]: FAILED! => {\"changed\": false}"),
            Some(("vm", false))
        );
        assert_eq!(
            failed_host("fatal: [vm]: UNREACHABLE! => {\"msg\": \"x\"}"),
            Some(("vm", true))
        );
        assert_eq!(
            failed_host("failed: [vm] (item=a) => {\"x\": 1}"),
            Some(("vm", false))
        );
        assert_eq!(failed_host("ok: [vm]"), None);
    }
}
