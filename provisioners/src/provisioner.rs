//! What every provisioner shares: the context it runs in, its errors, and the
//! handle the builders run without knowing which kind it holds.

use crate::communicator::{CommError, Communicator, ExitStatus, OutputSink};
use async_trait::async_trait;
use imgbuild_core::{BuildLog, CancellationToken, Stream};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ProvisionError {
    #[error(
        "`{command}` failed with {status} (accepted: {accepted}){}",
        tail_text(.tail)
    )]
    CommandFailed {
        command: String,
        status: ExitStatus,
        accepted: String,
        tail: Vec<String>,
    },
    #[error("{what} timed out after {}", humantime::format_duration(*.after))]
    Timeout { what: String, after: Duration },
    #[error(
        "{0}; if this provisioner reboots or shuts down the machine on purpose, set `expect_disconnect = true`"
    )]
    UnexpectedDisconnect(CommError),
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("execute_command template: {0}")]
    Template(String),
    #[error(transparent)]
    Ansible(#[from] crate::ansible::AnsibleError),
    #[error("cancelled")]
    Cancelled,
}

fn tail_text(tail: &[String]) -> String {
    if tail.is_empty() {
        return String::new();
    }
    format!("; last output lines:\n    {}", tail.join("\n    "))
}

/// What a provisioner runs with.
#[derive(Clone)]
pub struct ProvisionContext {
    pub log: BuildLog,
    pub cancel: CancellationToken,
}

/// What every provisioner kind implements: how it describes itself and how
/// it runs against a machine, whatever builder made it.
#[async_trait]
pub trait Provision: Send + Sync + std::fmt::Debug {
    /// For progress lines: "shell (setup.sh)".
    fn describe(&self) -> String;

    async fn run(
        &self,
        comm: &dyn Communicator,
        cx: &ProvisionContext,
    ) -> Result<(), ProvisionError>;

    /// Called after the build was cancelled while this provisioner ran:
    /// dropping a command's channel does not stop it on the machine, so a
    /// kind that starts remote processes stops them here. Best effort.
    async fn stop_after_cancel(&self, _comm: &dyn Communicator) {}
}

/// A configured provisioner, ready to run against any communicator; the
/// builders run it without knowing its kind.
#[derive(Debug, Clone)]
pub struct Provisioner(Arc<dyn Provision>);

impl Provisioner {
    pub fn new(provision: impl Provision + 'static) -> Self {
        Provisioner(Arc::new(provision))
    }

    pub fn describe(&self) -> String {
        self.0.describe()
    }

    pub async fn run(
        &self,
        comm: &dyn Communicator,
        cx: &ProvisionContext,
    ) -> Result<(), ProvisionError> {
        let result = tokio::select! {
            biased;
            _ = cx.cancel.cancelled() => Err(ProvisionError::Cancelled),
            result = self.0.run(comm, cx) => result,
        };
        if let Err(ProvisionError::Cancelled) = &result {
            self.0.stop_after_cancel(comm).await;
        }
        result
    }
}

/// Forwards remote output to the build log and keeps the last lines for the
/// error message when the command fails.
pub(crate) struct LoggingSink<'a> {
    log: &'a BuildLog,
    tail: Mutex<VecDeque<String>>,
    keep: usize,
}

impl<'a> LoggingSink<'a> {
    pub(crate) fn new(log: &'a BuildLog, keep: usize) -> Self {
        LoggingSink {
            log,
            tail: Mutex::new(VecDeque::with_capacity(keep)),
            keep,
        }
    }

    pub(crate) fn tail(&self) -> Vec<String> {
        let tail = self.tail.lock().expect("tail lock poisoned");
        tail.iter()
            .map(|line| self.log.redactor().redact(line).into_owned())
            .collect()
    }
}

impl OutputSink for LoggingSink<'_> {
    fn line(&self, stream: Stream, line: &str) {
        self.log.output(stream, line);
        let mut tail = self.tail.lock().expect("tail lock poisoned");
        if tail.len() == self.keep {
            tail.pop_front();
        }
        tail.push_back(line.to_owned());
    }
}
