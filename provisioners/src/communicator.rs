use async_trait::async_trait;
use imgbuild_core::Stream;
use thiserror::Error;
use tokio::io::AsyncRead;

#[derive(Debug, Error)]
pub enum CommError {
    /// The connection went away while a command ran, as it does on a reboot.
    #[error("the connection to {target} was lost: {reason}")]
    Disconnected { target: String, reason: String },
    #[error("cannot connect to {target}: {reason}")]
    Connect { target: String, reason: String },
    /// The server answered but refused the credentials for as long as they
    /// were given.
    #[error("cannot connect to {target}: {reason}")]
    Rejected { target: String, reason: String },
    #[error("{operation} on {target} failed: {reason}")]
    Operation {
        operation: String,
        target: String,
        reason: String,
    },
    #[error("reading or writing local data failed: {0}")]
    Io(#[from] std::io::Error),
}

/// How a remote command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatus {
    Code(u32),
    /// Killed by a signal (name as the remote side reported it).
    Signal(String),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal(signal) => write!(f, "signal {signal}"),
        }
    }
}

/// Receives a remote command's output, one complete line at a time (the final
/// line may lack its newline). Lines are not guaranteed valid UTF-8 on the
/// wire; they arrive lossily decoded.
pub trait OutputSink: Send + Sync {
    fn line(&self, stream: Stream, line: &str);
}

/// How a program on the build host reaches the machine itself, with the
/// build's own address and credentials: Ansible connects this way, with no
/// proxy between it and the machine, and each build hands out only its own
/// machine, so parallel builds never cross.
#[derive(Clone)]
pub enum Endpoint {
    Ssh {
        host: String,
        port: u16,
        username: String,
        auth: crate::ssh::SshAuth,
    },
    DockerContainer {
        container_id: String,
        /// The engine's address when it is not the default socket.
        docker_host: Option<String>,
        /// `NAME=value` entries every command in the container gets.
        env: Vec<String>,
    },
}

/// A byte stream in one direction of a transfer.
pub type ByteStream = Box<dyn AsyncRead + Send + Unpin>;

/// Runs commands on, and moves files to and from, one machine.
///
/// Files travel as tar streams: a tar archive is what both `tar -x` over SSH
/// and the Docker archive API take, so modes, directories and symlinks are
/// carried the same way on every builder.
#[async_trait]
pub trait Communicator: Send + Sync {
    /// Runs `command` with the remote user's shell (`sh -c` semantics),
    /// streaming output to `output` as it arrives.
    async fn exec(&self, command: &str, output: &dyn OutputSink) -> Result<ExitStatus, CommError>;

    /// Extracts the tar archive `archive` into the existing-or-created
    /// directory `dest_dir` on the machine.
    async fn upload_tar(&self, dest_dir: &str, archive: ByteStream) -> Result<(), CommError>;

    /// A tar archive of `path` (a file or a directory) on the machine, with
    /// entries named relative to `path`'s parent directory.
    async fn download_tar(&self, path: &str) -> Result<ByteStream, CommError>;

    /// Brings the communicator back after the machine disconnected on
    /// purpose (a reboot), waiting for it as on first connect.
    async fn reconnect(&self) -> Result<(), CommError>;

    /// Where commands run, for messages: "imgbuild@127.0.0.1:2222".
    fn target(&self) -> String;

    /// How a tool on the build host can connect to the machine directly;
    /// `None` when it cannot (a communicator with no such address).
    fn endpoint(&self) -> Option<Endpoint> {
        None
    }
}

/// Passes a remote command's output on to the build log.
pub struct LogLines<'a>(pub &'a imgbuild_core::BuildLog);

impl OutputSink for LogLines<'_> {
    fn line(&self, stream: Stream, line: &str) {
        self.0.output(stream, line);
    }
}

/// Keeps a command's standard output, line by line, for the caller to
/// read; passes its standard error on to `errors`, when given (a build log
/// that shows it), or drops it.
pub struct StdoutLines<'a> {
    lines: std::sync::Mutex<Vec<String>>,
    errors: Option<&'a dyn OutputSink>,
}

impl<'a> StdoutLines<'a> {
    pub fn new(errors: Option<&'a dyn OutputSink>) -> Self {
        StdoutLines {
            lines: Default::default(),
            errors,
        }
    }

    pub fn into_lines(self) -> Vec<String> {
        self.lines.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

impl OutputSink for StdoutLines<'_> {
    fn line(&self, stream: Stream, line: &str) {
        match stream {
            Stream::Stdout => self
                .lines
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(line.to_owned()),
            Stream::Stderr => {
                if let Some(errors) = self.errors {
                    errors.line(stream, line);
                }
            }
        }
    }
}

/// The longest line passed on whole. A guest that prints a binary file or
/// a `\r` progress bar without a newline would otherwise grow one line
/// without bound; past this it is passed on in pieces of this size.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Splits a byte stream into lines for an [`OutputSink`].
pub struct LineSplitter {
    stream: Stream,
    pending: Vec<u8>,
}

impl LineSplitter {
    pub fn new(stream: Stream) -> Self {
        LineSplitter {
            stream,
            pending: Vec::new(),
        }
    }

    /// Each byte of `data` is looked at once: only the new data is searched
    /// for line ends, and what is pending never exceeds [`MAX_LINE_BYTES`].
    pub fn push(&mut self, mut data: &[u8], sink: &dyn OutputSink) {
        while !data.is_empty() {
            let room = MAX_LINE_BYTES - self.pending.len();
            let window = &data[..data.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(newline) => {
                    self.pending.extend_from_slice(&window[..newline]);
                    self.emit(sink);
                    data = &data[newline + 1..];
                }
                None => {
                    self.pending.extend_from_slice(window);
                    data = &data[window.len()..];
                    if self.pending.len() == MAX_LINE_BYTES {
                        self.emit(sink);
                    }
                }
            }
        }
    }

    pub fn finish(&mut self, sink: &dyn OutputSink) {
        if !self.pending.is_empty() {
            self.emit(sink);
        }
    }

    fn emit(&mut self, sink: &dyn OutputSink) {
        let text = String::from_utf8_lossy(&self.pending);
        sink.line(self.stream, text.trim_end_matches('\r'));
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Lines(Mutex<Vec<(Stream, String)>>);
    impl OutputSink for Lines {
        fn line(&self, stream: Stream, line: &str) {
            self.0.lock().unwrap().push((stream, line.to_owned()));
        }
    }

    #[test]
    fn splits_lines_across_chunks_and_flushes_the_tail() {
        let lines = Lines::default();
        let mut splitter = LineSplitter::new(Stream::Stdout);
        splitter.push(b"hel", &lines);
        splitter.push(b"lo\r\nwor", &lines);
        splitter.push(b"ld\n\nlast", &lines);
        splitter.finish(&lines);
        let got: Vec<String> = lines
            .0
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|(_, l)| l)
            .collect();
        assert_eq!(got, vec!["hello", "world", "", "last"]);
    }

    #[test]
    fn an_endless_line_is_passed_on_in_bounded_pieces() {
        let lines = Lines::default();
        let mut splitter = LineSplitter::new(Stream::Stdout);
        let chunk = vec![b'x'; 10_000];
        for _ in 0..20 {
            splitter.push(&chunk, &lines);
            assert!(splitter.pending.len() < MAX_LINE_BYTES);
        }
        splitter.push(b"\nend\n", &lines);
        let got = lines.0.into_inner().unwrap();
        let lengths: Vec<usize> = got.iter().map(|(_, l)| l.len()).collect();
        assert_eq!(
            lengths,
            vec![
                MAX_LINE_BYTES,
                MAX_LINE_BYTES,
                MAX_LINE_BYTES,
                200_000 - 3 * MAX_LINE_BYTES,
                3
            ]
        );
    }
}
