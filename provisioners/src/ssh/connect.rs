//! Waiting for a machine's SSH server to come up, and logging in to it.

use super::{Liveness, SshAuth, SshTarget, WaitOptions, human_duration};
use crate::communicator::CommError;
use imgbuild_core::{BuildLog, CancellationToken};
use russh::client::{self, AuthResult, DisconnectReason};
use russh::keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{Disconnect, Names};
use std::borrow::Cow;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// The first retry comes quickly: on a local VM sshd often starts a few
/// hundred milliseconds after the port was first refused.
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(150);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);
/// How long a fresh connection may stay silent before the attempt is
/// retried. QEMU's user-mode networking accepts a forwarded connection at
/// once and then keeps retrying the guest with TCP backoff (1 s, 2 s, 4 s...),
/// so a connection opened while the guest boots greets many seconds after
/// sshd is up; a new connection gets a new, immediate try. The wait grows
/// after each silent attempt, for servers that are merely slow to greet.
const FIRST_GREETING_WAIT: Duration = Duration::from_secs(2);
/// How often `liveness` is asked whether the machine still exists.
const LIVENESS_POLL: Duration = Duration::from_millis(250);
/// Unanswered keepalives tolerated before a connection counts as lost.
const KEEPALIVE_MAX: usize = 3;

/// What the session task learns about a connection that the handle cannot
/// tell: which cipher was agreed, and why the connection ended.
#[derive(Default)]
pub(super) struct ConnectionState {
    cipher: Mutex<Option<String>>,
    lost: Mutex<Option<String>>,
}

/// The russh event handler for our side of a connection.
pub(super) struct Client {
    state: Arc<ConnectionState>,
}

impl client::Handler for Client {
    type Error = russh::Error;

    // Every host key is accepted. imgbuild connects to machines it has just
    // created, whose host keys are generated on their first boot, so there
    // is nothing to compare them with. This is what Packer does too; the
    // exposure is a man-in-the-middle on the path to a brand-new build VM.
    async fn check_server_key(
        &mut self,
        _server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }

    async fn kex_done(
        &mut self,
        _shared_secret: Option<&[u8]>,
        names: &Names,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        if let Ok(mut cipher) = self.state.cipher.lock() {
            *cipher = Some(names.cipher.as_ref().to_owned());
        }
        Ok(())
    }

    async fn disconnected(
        &mut self,
        reason: DisconnectReason<Self::Error>,
    ) -> Result<(), Self::Error> {
        let text = match &reason {
            DisconnectReason::ReceivedDisconnect(info) if info.message.is_empty() => {
                format!("the server closed the connection ({:?})", info.reason_code)
            }
            DisconnectReason::ReceivedDisconnect(info) => {
                format!("the server closed the connection: {}", info.message)
            }
            DisconnectReason::Error(err) => describe_session_error(err),
        };
        if let Ok(mut lost) = self.state.lost.lock() {
            lost.get_or_insert(text);
        }
        match reason {
            DisconnectReason::ReceivedDisconnect(_) => Ok(()),
            DisconnectReason::Error(err) => Err(err),
        }
    }
}

fn describe_session_error(err: &russh::Error) -> String {
    match err {
        russh::Error::KeepaliveTimeout => {
            "the machine stopped answering keepalives (it may have been reset or its network is down)"
                .to_owned()
        }
        russh::Error::IO(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
            "the connection was closed".to_owned()
        }
        russh::Error::IO(io) => format!("the connection failed: {io}"),
        russh::Error::Disconnect | russh::Error::HUP => "the connection was closed".to_owned(),
        other => other.to_string(),
    }
}

/// One logged-in SSH connection.
pub(super) struct Connection {
    pub(super) handle: client::Handle<Client>,
    state: Arc<ConnectionState>,
}

impl Connection {
    pub(super) fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Why the connection ended, as well as we know.
    pub(super) fn loss_reason(&self) -> String {
        self.state
            .lost
            .lock()
            .ok()
            .and_then(|lost| lost.clone())
            .unwrap_or_else(|| "the connection was closed".to_owned())
    }

    pub(super) fn cipher(&self) -> Option<String> {
        self.state.cipher.lock().ok().and_then(|c| c.clone())
    }

    /// Says goodbye politely, without waiting long for a machine that may
    /// already be gone.
    pub(super) async fn close(&self) {
        let goodbye = self
            .handle
            .disconnect(Disconnect::ByApplication, "imgbuild is done", "en");
        let _ = tokio::time::timeout(Duration::from_secs(1), goodbye).await;
    }
}

/// Why one connection attempt failed.
enum AttemptError {
    Refused,
    /// The connection opened but the server said nothing in time.
    Silent(Duration),
    Network(io::Error),
    TimedOut(Duration),
    /// The port answered, but not with a completed SSH handshake: typical
    /// while a VM boots behind a port forward that accepts and then closes.
    Handshake(String),
    /// The server answered and refused our credentials.
    Rejected {
        accepts: Vec<&'static str>,
    },
    /// Retrying cannot help.
    Fatal(String),
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Refused => f.write_str("connection refused (nothing is listening yet)"),
            AttemptError::Silent(wait) => write!(
                f,
                "the port accepted the connection but sent no SSH greeting within {} (sshd is not up yet)",
                human_duration(*wait)
            ),
            AttemptError::Network(err) => write!(f, "cannot open a TCP connection: {err}"),
            AttemptError::TimedOut(limit) => {
                write!(f, "no SSH login within {}", human_duration(*limit))
            }
            AttemptError::Handshake(reason) => f.write_str(reason),
            AttemptError::Rejected { accepts } => write!(
                f,
                "authentication failed (the server accepts: {})",
                if accepts.is_empty() {
                    "nothing more".to_owned()
                } else {
                    accepts.join(", ")
                }
            ),
            AttemptError::Fatal(reason) => f.write_str(reason),
        }
    }
}

fn handshake_error(err: russh::Error) -> AttemptError {
    const CLOSED_EARLY: &str = "the port accepted the connection but closed it before the SSH \
                                handshake finished (sshd may not be up yet)";
    match err {
        russh::Error::NoCommonAlgo { .. } => AttemptError::Fatal(format!(
            "the SSH server and imgbuild have no algorithm in common: {err}"
        )),
        russh::Error::Disconnect | russh::Error::HUP => {
            AttemptError::Handshake(CLOSED_EARLY.to_owned())
        }
        russh::Error::IO(io)
            if matches!(
                io.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
            ) =>
        {
            AttemptError::Handshake(CLOSED_EARLY.to_owned())
        }
        russh::Error::Version => {
            AttemptError::Handshake("the port did not answer with an SSH greeting".to_owned())
        }
        other => AttemptError::Handshake(format!("the SSH handshake failed: {other}")),
    }
}

/// The russh settings for every connection.
pub(super) fn client_config(options: &WaitOptions) -> client::Config {
    client::Config {
        // russh only sends keepalives when the server has been silent for
        // this long, so a long, quiet command (a package install) keeps
        // the connection open and a vanished machine is noticed after
        // about KEEPALIVE_MAX intervals instead of never.
        keepalive_interval: (!options.keepalive_interval.is_zero())
            .then_some(options.keepalive_interval),
        keepalive_max: KEEPALIVE_MAX,
        inactivity_timeout: None,
        // Downloads are paced by the window we grant the server. A larger
        // window than russh's 2 MiB keeps the pipe full on high-latency
        // links; memory stays bounded by `channel_buffer_size` packets,
        // because russh stops reading the socket when a channel's queue is
        // full.
        window_size: 8 * 1024 * 1024,
        maximum_packet_size: 32 * 1024,
        nodelay: true,
        preferred: russh::Preferred {
            cipher: Cow::Borrowed(super::PREFERRED_CIPHERS),
            ..russh::Preferred::default()
        },
        ..client::Config::default()
    }
}

/// Everything needed to (re)establish the connection.
pub(super) struct Dialer {
    pub(super) target: SshTarget,
    pub(super) username: String,
    pub(super) auth: SshAuth,
    pub(super) options: WaitOptions,
    pub(super) config: Arc<client::Config>,
    pub(super) cancel: CancellationToken,
    pub(super) log: BuildLog,
    pub(super) liveness: Option<Liveness>,
}

impl Dialer {
    fn target_label(&self) -> String {
        super::target_label(&self.username, &self.target)
    }

    fn connect_error(&self, reason: String) -> CommError {
        CommError::Connect {
            target: self.target_label(),
            reason,
        }
    }

    /// Polls until the machine accepts an SSH login, the overall timeout
    /// passes, the build is cancelled or `liveness` reports the machine gone.
    pub(super) async fn wait(&self) -> Result<Connection, CommError> {
        let started = Instant::now();
        let timeout = self.options.timeout;
        self.log.info(format!(
            "Waiting for SSH on {} (timeout {})",
            self.target_label(),
            human_duration(timeout)
        ));
        let mut delay = FIRST_RETRY_DELAY;
        let mut greeting_wait = FIRST_GREETING_WAIT;
        let mut attempts: u32 = 0;
        let mut last_error: Option<AttemptError> = None;
        let mut rejected_since: Option<Instant> = None;
        loop {
            if let Some(reason) = self.machine_gone() {
                return Err(self.gone_error(started, &reason));
            }
            let remaining = timeout.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                return Err(self.timeout_error(started, attempts, last_error, rejected_since));
            }
            let limit = self.options.connect_timeout.min(remaining);
            attempts += 1;
            let attempt = tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(self.cancelled_error(started)),
                reason = self.watch_liveness() => return Err(self.gone_error(started, &reason)),
                result = tokio::time::timeout(limit, self.attempt(greeting_wait.min(limit))) => result,
            };
            let error = match attempt {
                Ok(Ok(connection)) => {
                    self.log.info(format!(
                        "Connected to {} after {}",
                        self.target_label(),
                        human_duration(started.elapsed())
                    ));
                    return Ok(connection);
                }
                Ok(Err(error)) => error,
                Err(_) => AttemptError::TimedOut(limit),
            };
            match &error {
                AttemptError::Fatal(reason) => return Err(self.connect_error(reason.clone())),
                AttemptError::Silent(_) => {
                    greeting_wait = (greeting_wait * 3 / 2).min(self.options.connect_timeout);
                }
                AttemptError::Rejected { .. } => {
                    let limit = self.options.rejection_limit;
                    let since = *rejected_since.get_or_insert_with(|| {
                        if limit.is_zero() {
                            return Instant::now();
                        }
                        self.log.info(format!(
                            "{} answered but rejected the {} for user {}; retrying for up to {} in case the machine has not installed it yet",
                            self.target,
                            self.auth.describe(),
                            self.username,
                            human_duration(limit)
                        ));
                        Instant::now()
                    });
                    if since.elapsed() >= limit {
                        return Err(CommError::Rejected {
                            target: self.target_label(),
                            reason: self.rejected_message(&error, since),
                        });
                    }
                }
                _ => rejected_since = None,
            }
            last_error = Some(error);

            let pause = delay.min(timeout.saturating_sub(started.elapsed()));
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => return Err(self.cancelled_error(started)),
                reason = self.watch_liveness() => return Err(self.gone_error(started, &reason)),
                _ = tokio::time::sleep(pause) => {}
            }
            delay = (delay * 3 / 2).min(MAX_RETRY_DELAY);
        }
    }

    /// One TCP connect, SSH handshake and login. The server must start its
    /// greeting within `greeting_wait`.
    async fn attempt(&self, greeting_wait: Duration) -> Result<Connection, AttemptError> {
        let stream = TcpStream::connect((self.target.host.as_str(), self.target.port))
            .await
            .map_err(|err| match err.kind() {
                io::ErrorKind::ConnectionRefused => AttemptError::Refused,
                _ => AttemptError::Network(err),
            })?;
        // Peeking leaves the greeting in place for the handshake to read.
        let mut first_byte = [0u8; 1];
        match tokio::time::timeout(greeting_wait, stream.peek(&mut first_byte)).await {
            Err(_) => return Err(AttemptError::Silent(greeting_wait)),
            Ok(Ok(0)) => return Err(handshake_error(russh::Error::HUP)),
            Ok(Ok(_)) => {}
            Ok(Err(err)) => return Err(AttemptError::Network(err)),
        }
        // Command output and protocol replies are small packets that must
        // not sit in Nagle's buffer; bulk transfers fill packets anyway.
        let _ = stream.set_nodelay(true);
        let state = Arc::new(ConnectionState::default());
        let handler = Client {
            state: state.clone(),
        };
        let mut handle = client::connect_stream(self.config.clone(), stream, handler)
            .await
            .map_err(handshake_error)?;
        let result = match &self.auth {
            SshAuth::Key(key) => {
                // Only RSA keys need the signature hash negotiated; asking
                // costs up to a second of waiting for the server's
                // extension info, so skip it for other keys.
                let hash = if key.algorithm().is_rsa() {
                    handle
                        .best_supported_rsa_hash()
                        .await
                        .map_err(handshake_error)?
                        .flatten()
                } else {
                    None
                };
                handle
                    .authenticate_publickey(
                        self.username.as_str(),
                        PrivateKeyWithHashAlg::new(key.clone(), hash),
                    )
                    .await
            }
            SshAuth::Password(password) => {
                handle
                    .authenticate_password(self.username.as_str(), password.as_str())
                    .await
            }
        }
        .map_err(handshake_error)?;
        match result {
            AuthResult::Success => Ok(Connection { handle, state }),
            AuthResult::Failure {
                remaining_methods, ..
            } => Err(AttemptError::Rejected {
                accepts: remaining_methods.iter().map(<&str>::from).collect(),
            }),
        }
    }

    fn machine_gone(&self) -> Option<String> {
        self.liveness.as_ref().and_then(|alive| alive())
    }

    /// Resolves when `liveness` reports the machine gone; never without one.
    async fn watch_liveness(&self) -> String {
        let Some(liveness) = &self.liveness else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(LIVENESS_POLL).await;
            if let Some(reason) = liveness() {
                return reason;
            }
        }
    }

    fn cancelled_error(&self, started: Instant) -> CommError {
        self.connect_error(format!(
            "cancelled while waiting for SSH (after {})",
            human_duration(started.elapsed())
        ))
    }

    fn gone_error(&self, started: Instant, reason: &str) -> CommError {
        self.connect_error(format!(
            "stopped waiting for SSH after {}: {reason}",
            human_duration(started.elapsed())
        ))
    }

    fn rejected_message(&self, error: &AttemptError, since: Instant) -> String {
        let accepts = match error {
            AttemptError::Rejected { accepts } if !accepts.is_empty() => {
                format!(" (the server accepts: {})", accepts.join(", "))
            }
            _ => String::new(),
        };
        let how_long = match self.options.rejection_limit.is_zero() {
            true => String::new(),
            false => format!(" on every attempt for {}", human_duration(since.elapsed())),
        };
        format!(
            "authentication failed: the SSH server rejected the {} for user {}{how_long}{accepts}; \
             check the ssh username and key or password, and that the machine installs the public key",
            self.auth.describe(),
            self.username,
        )
    }

    fn timeout_error(
        &self,
        started: Instant,
        attempts: u32,
        last_error: Option<AttemptError>,
        rejected_since: Option<Instant>,
    ) -> CommError {
        let waited = human_duration(started.elapsed());
        let reason = match (last_error, rejected_since) {
            (Some(error @ AttemptError::Rejected { .. }), Some(since)) => format!(
                "timed out after {waited}: {}",
                self.rejected_message(&error, since)
            ),
            (Some(error), _) => format!(
                "SSH did not become available within {} (waited {waited}, {attempts} attempts); last error: {error}",
                human_duration(self.options.timeout)
            ),
            (None, _) => format!(
                "SSH did not become available within {} (no attempt was made)",
                human_duration(self.options.timeout)
            ),
        };
        self.connect_error(reason)
    }
}
