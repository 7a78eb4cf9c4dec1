//! Commands and tar transfers over session channels.
//!
//! One rule shapes all of this: a russh session stops reading its socket
//! while any channel's message queue is full, which stalls every channel and
//! the keepalives with it. So every open channel always has someone draining
//! it, and uploads read the channel while they write to it.

use super::connect::Connection;
use crate::communicator::{ByteStream, CommError, ExitStatus, LineSplitter, OutputSink};
use bytes::{Bytes, BytesMut};
use imgbuild_core::Stream;
use russh::client::Msg;
use russh::{ChannelMsg, ChannelReadHalf, ChannelWriteHalf, Sig};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

/// SSH's extended-data type for stderr.
const STDERR: u32 = 1;
/// How much of an archive is read before handing it to the channel. russh
/// cuts it into packets without copying; bigger reads mean fewer wakeups.
const UPLOAD_CHUNK: usize = 256 * 1024;
/// Enough of a failing tar's stderr to show the cause, bounded so that a
/// tar complaining about every file of a huge tree cannot exhaust memory.
const STDERR_LIMIT: usize = 16 * 1024;

/// Where an operation runs, for messages.
pub(super) struct OpContext<'a> {
    pub(super) connection: &'a Arc<Connection>,
    pub(super) target: &'a str,
}

impl OpContext<'_> {
    fn disconnected(&self) -> CommError {
        CommError::Disconnected {
            target: self.target.to_owned(),
            reason: self.connection.loss_reason(),
        }
    }

    fn failed(&self, operation: &str, reason: String) -> CommError {
        CommError::Operation {
            operation: operation.to_owned(),
            target: self.target.to_owned(),
            reason,
        }
    }

    /// A russh error from opening or starting a channel: a dead connection is
    /// reported as such, so that callers expecting a reboot can tell.
    fn channel_error(&self, operation: &str, err: russh::Error) -> CommError {
        if self.connection.is_closed() {
            self.disconnected()
        } else {
            self.failed(operation, err.to_string())
        }
    }

    async fn start(
        &self,
        operation: &str,
        command: &str,
    ) -> Result<russh::Channel<Msg>, CommError> {
        let channel = self
            .connection
            .handle
            .channel_open_session()
            .await
            .map_err(|err| self.channel_error(operation, err))?;
        channel
            .exec(true, command)
            .await
            .map_err(|err| self.channel_error(operation, err))?;
        Ok(channel)
    }
}

/// What the remote side reported about a finished channel.
#[derive(Default)]
struct Outcome {
    status: Option<ExitStatus>,
    /// The server refused to run the command at all.
    refused: bool,
    stderr: BoundedText,
}

impl Outcome {
    /// Records control messages; returns false once the channel is closed.
    fn observe(&mut self, message: &ChannelMsg) -> bool {
        match message {
            ChannelMsg::ExitStatus { exit_status } => {
                self.status = Some(ExitStatus::Code(*exit_status));
            }
            ChannelMsg::ExitSignal { signal_name, .. } => {
                self.status = Some(ExitStatus::Signal(signal_text(signal_name)));
            }
            ChannelMsg::Failure => self.refused = true,
            ChannelMsg::Close => return false,
            _ => {}
        }
        true
    }
}

fn signal_text(signal: &Sig) -> String {
    match signal {
        Sig::Custom(name) => name.clone(),
        // The named variants print as their bare names ("TERM", "KILL").
        other => format!("{other:?}"),
    }
}

/// The first [`STDERR_LIMIT`] bytes of a stream.
#[derive(Default)]
struct BoundedText {
    bytes: Vec<u8>,
    truncated: bool,
}

impl BoundedText {
    fn push(&mut self, data: &[u8]) {
        let room = STDERR_LIMIT.saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(&data[..room.min(data.len())]);
        self.truncated |= data.len() > room;
    }

    fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        let text = text.trim();
        match (text.is_empty(), self.truncated) {
            (true, _) => "no error output".to_owned(),
            (false, false) => text.to_owned(),
            (false, true) => format!("{text} [...]"),
        }
    }
}

/// Closes a channel abandoned before it finished (an exec whose future was
/// dropped on cancellation, a download dropped half-read, an upload cut
/// short), so that the machine stops producing output nobody reads, and a
/// remote tar waiting for more input sees the end of it.
struct CloseOnDrop {
    channel: Arc<ChannelWriteHalf<Msg>>,
    armed: bool,
}

impl CloseOnDrop {
    fn new(channel: ChannelWriteHalf<Msg>) -> Self {
        CloseOnDrop {
            channel: Arc::new(channel),
            armed: true,
        }
    }

    fn channel(&self) -> &ChannelWriteHalf<Msg> {
        &self.channel
    }

    /// The channel has ended; there is nothing left to close.
    fn finished(&mut self) {
        self.armed = false;
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        // Drop cannot wait for the close to be sent. Without a runtime the
        // process is exiting, and the connection goes away with it.
        if self.armed
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let channel = self.channel.clone();
            runtime.spawn(async move {
                let _ = channel.close().await;
            });
        }
    }
}

pub(super) async fn exec(
    cx: &OpContext<'_>,
    command: &str,
    output: &dyn OutputSink,
) -> Result<ExitStatus, CommError> {
    let operation = "running a command";
    let (mut read, write) = cx.start(operation, command).await?.split();
    let mut guard = CloseOnDrop::new(write);
    let mut stdout = LineSplitter::new(Stream::Stdout);
    let mut stderr = LineSplitter::new(Stream::Stderr);
    let mut outcome = Outcome::default();
    // The exit status can arrive before the last output, so read until the
    // server closes the channel (or the connection goes away), not just
    // until the status.
    while let Some(message) = read.wait().await {
        match &message {
            ChannelMsg::Data { data } => stdout.push(data, output),
            ChannelMsg::ExtendedData { data, ext } if *ext == STDERR => stderr.push(data, output),
            _ => {}
        }
        if !outcome.observe(&message) {
            break;
        }
    }
    guard.finished();
    stdout.finish(output);
    stderr.finish(output);
    match outcome.status {
        Some(status) => Ok(status),
        None if outcome.refused => Err(cx.failed(
            operation,
            "the SSH server refused to run the command".to_owned(),
        )),
        None if cx.connection.is_closed() => Err(cx.disconnected()),
        None => Err(cx.failed(
            operation,
            "the SSH server closed the channel without reporting an exit status".to_owned(),
        )),
    }
}

/// Why feeding the archive into the channel stopped.
enum FeedError {
    /// Reading the local archive failed: our problem, reported as is.
    Local(io::Error),
    /// The channel stopped taking data; the remote side's account of why
    /// (tar's exit status and stderr) is the useful error.
    Remote,
}

async fn feed_archive(
    write: &ChannelWriteHalf<Msg>,
    mut archive: ByteStream,
) -> Result<(), FeedError> {
    let mut buffer = BytesMut::new();
    loop {
        // `split` hands the filled part to russh and keeps the spare
        // capacity; `reserve` reuses the allocation once russh has sent it.
        buffer.reserve(UPLOAD_CHUNK);
        let read = archive
            .read_buf(&mut buffer)
            .await
            .map_err(FeedError::Local)?;
        if read == 0 {
            break;
        }
        write
            .data_bytes(buffer.split().freeze())
            .await
            .map_err(|_| FeedError::Remote)?;
    }
    write.eof().await.map_err(|_| FeedError::Remote)
}

/// Reads a channel to its end, keeping only stderr and the exit status.
async fn collect(mut read: ChannelReadHalf) -> Outcome {
    let mut outcome = Outcome::default();
    while let Some(message) = read.wait().await {
        if let ChannelMsg::ExtendedData { data, ext } = &message
            && *ext == STDERR
        {
            outcome.stderr.push(data);
        }
        if !outcome.observe(&message) {
            break;
        }
    }
    outcome
}

pub(super) async fn upload_tar(
    cx: &OpContext<'_>,
    dest_dir: &str,
    archive: ByteStream,
) -> Result<(), CommError> {
    let operation = format!("extracting files into {dest_dir}");
    let dest = shell_escape::unix::escape(dest_dir.into());
    let command = format!("mkdir -p {dest} && tar -x -f - -C {dest}");
    let (read, write) = cx.start(&operation, &command).await?.split();
    // On a local read error (and if this future is dropped) the guard
    // closes the channel, so the remote tar stops on a truncated archive
    // instead of waiting for more.
    let mut guard = CloseOnDrop::new(write);
    let (outcome, fed) = {
        let feed = feed_archive(guard.channel(), archive);
        tokio::pin!(feed);
        let collect = collect(read);
        tokio::pin!(collect);
        let mut fed = false;
        loop {
            tokio::select! {
                result = &mut feed, if !fed => match result {
                    Ok(()) | Err(FeedError::Remote) => fed = true,
                    Err(FeedError::Local(err)) => return Err(CommError::Io(err)),
                },
                // The channel can end before the archive does, when tar
                // fails early; then the feed would wait forever for window
                // space.
                outcome = &mut collect => break (outcome, fed),
            }
        }
    };
    guard.finished();
    match outcome.status {
        Some(ExitStatus::Code(0)) if fed => Ok(()),
        Some(ExitStatus::Code(0)) => Err(cx.failed(
            &operation,
            "tar exited before it had read the whole archive".to_owned(),
        )),
        Some(status) => Err(cx.failed(
            &operation,
            format!("tar failed with {status}: {}", outcome.stderr.text()),
        )),
        None if outcome.refused => {
            Err(cx.failed(&operation, "the SSH server refused to run tar".to_owned()))
        }
        None if cx.connection.is_closed() => Err(cx.disconnected()),
        None => Err(cx.failed(
            &operation,
            format!(
                "the SSH server closed the channel without an exit status: {}",
                outcome.stderr.text()
            ),
        )),
    }
}

/// Splits a remote path into the directory tar changes into and the name
/// it archives, so entries are named relative to the parent.
pub(super) fn split_remote_path(path: &str) -> (String, String) {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        // "/" itself (or an empty path, which tar would reject anyway).
        return ("/".to_owned(), ".".to_owned());
    }
    let (parent, name) = match trimmed.rfind('/') {
        Some(0) => ("/", &trimmed[1..]),
        Some(slash) => (&trimmed[..slash], &trimmed[slash + 1..]),
        None => (".", trimmed),
    };
    // A name starting with '-' would be read as a tar option.
    let name = if name.starts_with('-') {
        format!("./{name}")
    } else {
        name.to_owned()
    };
    (parent.to_owned(), name)
}

pub(super) async fn download_tar(cx: &OpContext<'_>, path: &str) -> Result<ByteStream, CommError> {
    let operation = format!("archiving {path}");
    let (parent, name) = split_remote_path(path);
    let command = format!(
        "tar -c -f - -C {} {}",
        shell_escape::unix::escape(parent.into()),
        shell_escape::unix::escape(name.into())
    );
    let (read, write) = cx.start(&operation, &command).await?.split();
    Ok(Box::new(TarDownload {
        state: ReadState::Idle(read),
        pending: Bytes::new(),
        outcome: Outcome::default(),
        guard: CloseOnDrop::new(write),
        connection: cx.connection.clone(),
        describe: format!("tar -c of {path} on {}", cx.target),
    }))
}

type WaitFuture =
    Pin<Box<dyn Future<Output = (ChannelReadHalf, Option<ChannelMsg>)> + Send + 'static>>;

enum ReadState {
    Idle(ChannelReadHalf),
    Waiting(WaitFuture),
    Done,
}

/// Remote tar's stdout as an [`AsyncRead`]. The exit status is only known
/// once the channel closes, so a failing tar turns into an error at the end
/// of the stream, after whatever partial archive it wrote.
///
/// The reader applies backpressure: a caller that stops reading stalls the
/// whole SSH connection, so read it to the end or drop it.
struct TarDownload {
    state: ReadState,
    pending: Bytes,
    outcome: Outcome,
    guard: CloseOnDrop,
    connection: Arc<Connection>,
    describe: String,
}

impl TarDownload {
    fn end(&self) -> io::Result<()> {
        match &self.outcome.status {
            Some(ExitStatus::Code(0)) => Ok(()),
            Some(status) => Err(io::Error::other(format!(
                "{} failed with {status}: {}",
                self.describe,
                self.outcome.stderr.text()
            ))),
            None if self.outcome.refused => Err(io::Error::other(format!(
                "{}: the SSH server refused to run tar",
                self.describe
            ))),
            None => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!(
                    "{} did not finish: {}",
                    self.describe,
                    self.connection.loss_reason()
                ),
            )),
        }
    }
}

impl AsyncRead for TarDownload {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            let mut future = match std::mem::replace(&mut this.state, ReadState::Done) {
                ReadState::Done => return Poll::Ready(this.end()),
                ReadState::Idle(mut read) => Box::pin(async move {
                    let message = read.wait().await;
                    (read, message)
                }) as WaitFuture,
                ReadState::Waiting(future) => future,
            };
            let Poll::Ready((read, message)) = future.as_mut().poll(cx) else {
                this.state = ReadState::Waiting(future);
                return Poll::Pending;
            };
            this.state = ReadState::Idle(read);
            let Some(message) = message else {
                this.state = ReadState::Done;
                this.guard.finished();
                continue;
            };
            match &message {
                ChannelMsg::Data { data } => this.pending = data.clone(),
                ChannelMsg::ExtendedData { data, ext } if *ext == STDERR => {
                    this.outcome.stderr.push(data)
                }
                _ => {}
            }
            if !this.outcome.observe(&message) {
                this.state = ReadState::Done;
                this.guard.finished();
            }
        }
    }
}
