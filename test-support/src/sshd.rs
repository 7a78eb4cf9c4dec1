//! A real OpenSSH server for integration tests.
//!
//! [`SshServer`] runs `/usr/sbin/sshd -D -e` on a loopback port with its own
//! host key, `authorized_keys` file and scratch "home" directory, all in a
//! temporary directory. Logins are as the user running the tests (sshd
//! started by an unprivileged user can only log that user in). Dropping the
//! server kills sshd and every session it started. [`Machine`] is such a
//! server with a connection to it, to provision.

use crate::common::test_log;
use imgbuild_core::{CancellationToken, Stream};
use imgbuild_provisioners::communicator::CommError;
use imgbuild_provisioners::ssh::{SshAuth, SshCommunicator, SshTarget, TemporaryKey, WaitOptions};
use imgbuild_provisioners::{Communicator, ExitStatus, OutputSink};
use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

pub const SSHD: &str = "/usr/sbin/sshd";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub password_authentication: bool,
    /// sshd's `LogLevel`; DEBUG1 shows the negotiated algorithms.
    pub log_level: String,
    /// Extra sshd_config lines, e.g. `Ciphers aes128-gcm@openssh.com`.
    pub extra_config: Vec<String>,
    /// Keeps the login user's ~/.bashrc out of the sessions (see
    /// `write_config`), so tests see only their own commands' output and do
    /// not depend on, or disturb, the host user's shell setup.
    pub skip_shell_rc: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            password_authentication: false,
            log_level: "INFO".to_owned(),
            extra_config: Vec::new(),
            skip_shell_rc: true,
        }
    }
}

pub struct SshServer {
    dir: tempfile::TempDir,
    port: u16,
    /// Whether the port was chosen here and may be changed if it is taken.
    port_is_ours: bool,
    options: ServerOptions,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl SshServer {
    /// A configured server on a free port, started.
    pub fn started() -> io::Result<SshServer> {
        Self::started_with(ServerOptions::default())
    }

    pub fn started_with(options: ServerOptions) -> io::Result<SshServer> {
        let mut server = Self::new(options)?;
        server.start()?;
        Ok(server)
    }

    /// A configured server that is not running yet, its port chosen, so a
    /// test can start connecting before sshd listens.
    pub fn new(options: ServerOptions) -> io::Result<SshServer> {
        let dir = tempfile::Builder::new()
            .prefix("imgbuild-sshd-")
            .tempdir()?;
        std::fs::create_dir(dir.path().join("home"))?;
        std::fs::File::create(dir.path().join("authorized_keys"))?;
        let host_key = dir.path().join("ssh_host_ed25519_key");
        let status = Command::new("ssh-keygen")
            .args([
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "imgbuild-test-host",
                "-f",
            ])
            .arg(&host_key)
            .stdin(Stdio::null())
            .status()?;
        if !status.success() {
            return Err(io::Error::other(format!("ssh-keygen failed: {status}")));
        }
        Ok(SshServer {
            dir,
            port: free_port()?,
            port_is_ours: true,
            options,
            child: None,
            log: Arc::default(),
        })
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn target(&self) -> SshTarget {
        SshTarget {
            host: self.host().to_owned(),
            port: self.port,
        }
    }

    /// The user logins are made as.
    pub fn username(&self) -> String {
        current_username()
    }

    /// A scratch directory for the test's files on the "machine" (the
    /// user's real home is left alone; commands still start there).
    pub fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Appends a public key line (`ssh-ed25519 AAAA... comment`) to the
    /// server's authorized_keys file. Takes effect for the next login.
    pub fn authorize_key(&self, public_openssh: &str) -> io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("authorized_keys"))?;
        writeln!(file, "{}", public_openssh.trim())
    }

    /// A fresh temporary key that this server accepts.
    pub fn authorized_key(&self) -> io::Result<TemporaryKey> {
        let key = TemporaryKey::generate().map_err(io::Error::other)?;
        self.authorize_key(key.public_openssh())?;
        Ok(key)
    }

    /// Connects as [`Self::username`] with short timeouts suited to tests.
    pub async fn connect(&self, auth: SshAuth) -> Result<SshCommunicator, CommError> {
        SshCommunicator::connect(
            self.target(),
            self.username(),
            auth,
            test_wait_options(Duration::from_secs(20)),
            CancellationToken::new(),
            test_log().0,
            None,
        )
        .await
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Starts sshd (again, after [`Self::stop`]) and returns once it listens.
    pub fn start(&mut self) -> io::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        ensure_privsep_dir()?;
        let mut last_error = None;
        for _ in 0..5 {
            match self.launch() {
                Ok(()) => return Ok(()),
                // Another process took the port between choosing and binding.
                Err(err) if err.kind() == io::ErrorKind::AddrInUse && self.port_is_ours => {
                    self.port = free_port()?;
                    last_error = Some(err);
                }
                Err(err) => return Err(err),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("sshd did not start")))
    }

    /// Pins the port, so that a restarted server comes back where clients
    /// expect it instead of moving when the port is briefly taken.
    pub fn keep_port(&mut self) {
        self.port_is_ours = false;
    }

    fn write_config(&self) -> io::Result<PathBuf> {
        let dir = self.dir.path();
        let mut config = format!(
            "Port {port}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {dir}/ssh_host_ed25519_key\n\
             PidFile none\n\
             UsePAM no\n\
             StrictModes no\n\
             AuthorizedKeysFile {dir}/authorized_keys\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication {password}\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin yes\n\
             PermitEmptyPasswords no\n\
             UseDNS no\n\
             LogLevel {level}\n\
             MaxStartups 100\n\
             MaxSessions 100\n\
             Subsystem sftp internal-sftp\n",
            port = self.port,
            dir = dir.display(),
            password = if self.options.password_authentication {
                "yes"
            } else {
                "no"
            },
            level = self.options.log_level,
        );
        if self.options.skip_shell_rc {
            // Debian's bash sources ~/.bashrc for commands run by sshd, but
            // only in a top-level shell; SHLVL=1 makes it count as nested.
            // (The tests run as the real user, e.g. root, whose .bashrc may
            // do slow or noisy things such as `pyenv rehash`.)
            config.push_str("SetEnv SHLVL=1\n");
        }
        for line in &self.options.extra_config {
            config.push_str(line);
            config.push('\n');
        }
        let path = dir.join("sshd_config");
        std::fs::write(&path, config)?;
        Ok(path)
    }

    fn launch(&mut self) -> io::Result<()> {
        let config = self.write_config()?;
        let mut child = {
            use std::os::unix::process::CommandExt;
            Command::new(SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                // Its own process group, so a Ctrl-C of the test run does
                // not reach it before Drop does.
                .process_group(0)
                .spawn()?
        };
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| io::Error::other("sshd stderr is not piped"))?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            // Keeps draining after startup so sshd never blocks on a full pipe.
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("Server listening on") {
                    let _ = ready_tx.send(Ok(()));
                } else if line.contains("Address already in use") {
                    let _ = ready_tx.send(Err(io::ErrorKind::AddrInUse));
                }
                if let Ok(mut log) = log.lock() {
                    log.push(line);
                }
            }
            let _ = ready_tx.send(Err(io::ErrorKind::BrokenPipe));
        });
        let outcome = ready_rx.recv_timeout(STARTUP_TIMEOUT);
        match outcome {
            Ok(Ok(())) => {
                self.child = Some(child);
                Ok(())
            }
            other => {
                let _ = child.kill();
                let _ = child.wait();
                let kind = match other {
                    Ok(Err(kind)) => kind,
                    _ => io::ErrorKind::TimedOut,
                };
                Err(io::Error::new(
                    kind,
                    format!("sshd did not start on port {}:\n{}", self.port, self.log()),
                ))
            }
        }
    }

    /// Kills sshd and every session process it started, as a machine
    /// that resets would. Clients see their connections drop.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        kill_tree(child.id(), true);
        let _ = child.wait();
    }

    /// Kills just the session processes, leaving the listener running, as
    /// when a command takes down its own connection.
    pub fn kill_sessions(&mut self) {
        if let Some(child) = &self.child {
            kill_tree(child.id(), false);
        }
    }

    /// Stops (SIGSTOP) every session process: connections stay open but
    /// nothing answers on them any more, as when a machine hangs or its
    /// network vanishes without a reset. [`Self::stop`] still kills them.
    pub fn freeze_sessions(&mut self) {
        if let Some(child) = &self.child {
            for pid in descendants_of(child.id()) {
                // SAFETY: as in `kill_tree`.
                unsafe {
                    libc::kill(pid as i32, libc::SIGSTOP);
                }
            }
        }
    }

    /// Everything sshd wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback port outside the ephemeral range, so the outgoing connections
/// of tests running in parallel cannot be holding it.
pub fn free_port() -> io::Result<u16> {
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let calls = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut state =
        (nanos ^ (u64::from(std::process::id()) << 32) ^ calls.wrapping_mul(0x9e37_79b9)) | 1;
    for _ in 0..200 {
        // xorshift: enough to spread parallel tests over the range.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let port = 20_000 + (state % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free loopback port between 20000 and 32000",
    ))
}

/// sshd refuses to start without its privilege separation directory, which
/// only exists on machines where the sshd service has run.
fn ensure_privsep_dir() -> io::Result<()> {
    if is_root() && !Path::new("/run/sshd").exists() {
        std::fs::create_dir_all("/run/sshd")?;
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn current_username() -> String {
    if is_root() {
        return "root".to_owned();
    }
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            let out = Command::new("id").arg("-un").output().ok()?;
            Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        })
        .unwrap_or_else(|| "root".to_owned())
}

/// SIGKILLs every descendant of `root` (and `root` itself if asked).
///
/// Killing a parent reparents its children at once, and sshd's session
/// processes call setsid (so a process-group kill misses them); so the
/// whole tree is frozen with SIGSTOP first, which also stops it from
/// forking, and only then killed.
fn kill_tree(root: u32, include_root: bool) {
    let signal = |pid: u32, sig: i32| {
        // SAFETY: kill(2) on a pid read from /proc; if it has exited in the
        // meantime the call fails with ESRCH and does nothing.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    };
    if include_root {
        signal(root, libc::SIGSTOP);
    }
    let mut frozen: Vec<u32> = Vec::new();
    for _ in 0..10 {
        let tree = descendants_of(root);
        let fresh: Vec<u32> = tree.into_iter().filter(|p| !frozen.contains(p)).collect();
        if fresh.is_empty() {
            break;
        }
        for &pid in &fresh {
            signal(pid, libc::SIGSTOP);
        }
        frozen.extend(fresh);
    }
    for &pid in &frozen {
        signal(pid, libc::SIGKILL);
    }
    if include_root {
        signal(root, libc::SIGKILL);
    }
}

/// All processes descending from `root`, read from /proc.
fn descendants_of(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // The command name is parenthesised and may contain spaces; the
            // parent pid is the second field after it.
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                parents.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut index = 0;
    while index < found.len() {
        let parent = found[index];
        found.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        index += 1;
    }
    found.remove(0);
    found
}

/// Whether a process whose command line contains `pattern` is running.
pub fn process_running(pattern: &str) -> bool {
    Command::new("pgrep")
        .arg("-f")
        .arg("--")
        .arg(pattern)
        .output()
        .map(|out| out.status.success())
        .unwrap_or(false)
}

/// A shell line for a script on the [`Machine`]: sleeps `seconds` in the
/// foreground, as the process whose pid it writes to `pid_file` first, so
/// a test can tell whether that very process outlives the script's run.
pub fn tracked_sleep(pid_file: &str, seconds: u32) -> String {
    format!(
        "sh -c 'echo $$ > \"$1\"; exec sleep {seconds}' sh {}",
        shell_escape::unix::escape(pid_file.into())
    )
}

/// The pid [`tracked_sleep`] wrote to `pid_file`, once it has.
pub fn tracked_pid(pid_file: &Path) -> Option<u32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()
}

/// Whether `pid` is still a running `sleep` (not gone, a zombie, or a pid
/// reused by something else).
pub fn is_sleeping(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| cmdline.split(|b| *b == 0).next() == Some(b"sleep"))
        .unwrap_or(false)
}

pub fn test_wait_options(timeout: Duration) -> WaitOptions {
    WaitOptions {
        timeout,
        connect_timeout: Duration::from_secs(5),
        keepalive_interval: Duration::from_secs(5),
        ..WaitOptions::default()
    }
}

/// Collects a command's output lines.
#[derive(Default)]
pub struct Lines(Mutex<Vec<(Stream, String)>>);

impl Lines {
    /// Waits until `line` has arrived, e.g. to know that a command is past
    /// the shell's startup before killing its session.
    pub async fn wait_for(&self, line: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if self.all().iter().any(|(_, l)| l == line) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub fn all(&self) -> Vec<(Stream, String)> {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn of(&self, stream: Stream) -> Vec<String> {
        self.all()
            .into_iter()
            .filter(|(s, _)| *s == stream)
            .map(|(_, l)| l)
            .collect()
    }
}

impl OutputSink for Lines {
    fn line(&self, stream: Stream, line: &str) {
        if let Ok(mut lines) = self.0.lock() {
            lines.push((stream, line.to_owned()));
        }
    }
}

/// A machine to provision: a started sshd, a connection to it, and a
/// directory of the test's own on it.
pub struct Machine {
    pub server: SshServer,
    pub comm: Arc<SshCommunicator>,
    /// Per-test scratch directory on the machine (not created).
    pub dir: PathBuf,
}

impl Machine {
    pub async fn start() -> Machine {
        Self::start_with(ServerOptions::default()).await
    }

    /// A machine whose sshd is configured by `options`.
    pub async fn start_with(options: ServerOptions) -> Machine {
        let server = SshServer::started_with(options).unwrap();
        let comm = server
            .connect(server.authorized_key().unwrap().auth())
            .await
            .unwrap();
        let dir = server.home().join("provisioned");
        Machine {
            server,
            comm: Arc::new(comm),
            dir,
        }
    }

    /// Runs `command` on the machine, expecting success; its stdout lines.
    pub async fn sh(&self, command: &str) -> Vec<String> {
        let lines = Lines::default();
        let status = self.comm.exec(command, &lines).await.unwrap();
        assert_eq!(
            status,
            ExitStatus::Code(0),
            "`{command}` failed: {:?}",
            lines.all()
        );
        lines.of(Stream::Stdout)
    }

    /// A path in the test's directory on the machine, as the shell sees it.
    pub fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// A local user with a password, removed again on drop.
pub struct PasswordUser {
    pub name: String,
    pub password: String,
}

impl PasswordUser {
    /// Creates (or reuses) the user `imgbuild-ssh-test` with a fresh
    /// password; needs root.
    pub fn create() -> io::Result<PasswordUser> {
        let name = "imgbuild-ssh-test".to_owned();
        let exists = Command::new("id").arg(&name).output()?.status.success();
        if !exists {
            let status = Command::new("useradd")
                .args(["-m", "-s", "/bin/sh"])
                .arg(&name)
                .status()?;
            if !status.success() {
                return Err(io::Error::other(format!("useradd failed: {status}")));
            }
        }
        let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
        let mut chpasswd = Command::new("chpasswd")
            .stdin(std::process::Stdio::piped())
            .spawn()?;
        chpasswd
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("no stdin"))?
            .write_all(format!("{name}:{password}\n").as_bytes())?;
        let status = chpasswd.wait()?;
        if !status.success() {
            return Err(io::Error::other(format!("chpasswd failed: {status}")));
        }
        Ok(PasswordUser { name, password })
    }
}

impl Drop for PasswordUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg("-r").arg(&self.name).output();
    }
}
