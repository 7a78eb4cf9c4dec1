//! What a run reports. Builders and provisioners only ever talk to a
//! [`BuildLog`]; the CLI decides whether events become coloured terminal lines
//! or one JSON object per line.

use crate::redact::Redactor;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// What a progress event counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProgressUnit {
    Bytes,
    Percent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildStatus {
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RunStarted {
        run_id: String,
        builds: Vec<String>,
    },
    BuildStarted {
        build: String,
        builder: String,
    },
    StepStarted {
        build: String,
        step: String,
    },
    StepFinished {
        build: String,
        step: String,
        duration_ms: u64,
    },
    Message {
        #[serde(skip_serializing_if = "Option::is_none")]
        build: Option<String>,
        level: Level,
        message: String,
    },
    Output {
        build: String,
        stream: Stream,
        line: String,
    },
    Progress {
        build: String,
        task: String,
        done: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        total: Option<u64>,
        /// What `done` and `total` count.
        unit: ProgressUnit,
    },
    CleanupFailed {
        build: String,
        step: String,
        error: String,
    },
    /// A `[[test]]` begins on the machine started from the artifact.
    TestStarted {
        build: String,
        name: String,
        /// 1-based position in the build's tests, out of `total`.
        index: usize,
        total: usize,
    },
    /// A `[[test]]` ended; a failure carries what the user needs to see
    /// why without scrolling back: the command's exit code and last lines.
    TestFinished {
        build: String,
        name: String,
        passed: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        exit_code: Option<u32>,
        duration_ms: u64,
        attempts: u32,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        output_tail: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Provisioners whose result was taken from the step cache instead of
    /// run: the first `steps` of the build's provisioners.
    StepsCached {
        build: String,
        steps: usize,
        key: String,
    },
    /// How a QEMU build's machine came up, with warm starts on: restored
    /// from a saved state, or booted; and how long after QEMU started it
    /// answered SSH.
    MachineReady {
        build: String,
        restored: bool,
        millis: u64,
    },
    /// `--skip-unchanged`: the build's inputs equal those of a recorded
    /// version, which stands instead of a new one.
    BuildSkipped {
        build: String,
        version: String,
        artifact_id: String,
    },
    Artifact {
        build: String,
        artifact: serde_json::Value,
    },
    BuildFinished {
        build: String,
        status: BuildStatus,
        duration_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    RunFinished {
        run_id: String,
        exit_code: i32,
        artifacts: Vec<serde_json::Value>,
    },
}

impl Event {
    pub fn build(&self) -> Option<&str> {
        match self {
            Event::RunStarted { .. } | Event::RunFinished { .. } => None,
            Event::Message { build, .. } => build.as_deref(),
            Event::BuildStarted { build, .. }
            | Event::StepStarted { build, .. }
            | Event::StepFinished { build, .. }
            | Event::Output { build, .. }
            | Event::Progress { build, .. }
            | Event::CleanupFailed { build, .. }
            | Event::TestStarted { build, .. }
            | Event::TestFinished { build, .. }
            | Event::Artifact { build, .. }
            | Event::StepsCached { build, .. }
            | Event::MachineReady { build, .. }
            | Event::BuildSkipped { build, .. }
            | Event::BuildFinished { build, .. } => Some(build),
        }
    }

    /// Masks sensitive values in every free text the event carries. Build
    /// and step names come from the config's structure, not from values;
    /// artifacts are manifest entries, whose free text the pipeline masked
    /// and whose identities (paths, ids, tags) must reach tools unchanged.
    fn redacted(self, redactor: &Redactor) -> Event {
        if redactor.is_empty() {
            return self;
        }
        let mask = |text: String| redactor.redact(&text).into_owned();
        match self {
            Event::Message {
                build,
                level,
                message,
            } => Event::Message {
                build,
                level,
                message: mask(message),
            },
            Event::Output {
                build,
                stream,
                line,
            } => Event::Output {
                build,
                stream,
                line: mask(line),
            },
            Event::Progress {
                build,
                task,
                done,
                total,
                unit,
            } => Event::Progress {
                build,
                task: mask(task),
                done,
                total,
                unit,
            },
            Event::CleanupFailed { build, step, error } => Event::CleanupFailed {
                build,
                step,
                error: mask(error),
            },
            Event::BuildFinished {
                build,
                status,
                duration_ms,
                error,
            } => Event::BuildFinished {
                build,
                status,
                duration_ms,
                error: error.map(mask),
            },
            // Test names come from the config's structure, like step names;
            // the output and the error are what the machine said.
            Event::TestFinished {
                build,
                name,
                passed,
                exit_code,
                duration_ms,
                attempts,
                output_tail,
                error,
            } => Event::TestFinished {
                build,
                name,
                passed,
                exit_code,
                duration_ms,
                attempts,
                output_tail: output_tail.into_iter().map(mask).collect(),
                error: error.map(mask),
            },
            other @ (Event::RunStarted { .. }
            | Event::TestStarted { .. }
            | Event::Artifact { .. }
            | Event::StepsCached { .. }
            | Event::MachineReady { .. }
            | Event::BuildSkipped { .. }
            | Event::RunFinished { .. }
            | Event::BuildStarted { .. }
            | Event::StepStarted { .. }
            | Event::StepFinished { .. }) => other,
        }
    }
}

/// Receives every event of a run. Implementations must be cheap and must not
/// block for long: builds call them from their own tasks.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: &Event);
}

/// Redacts, then forwards.
struct RedactingSink {
    redactor: Redactor,
    inner: Arc<dyn EventSink>,
}

impl EventSink for RedactingSink {
    fn emit(&self, event: &Event) {
        let event = event.clone().redacted(&self.redactor);
        self.inner.emit(&event);
    }
}

/// The handle through which one build (or the run itself) reports.
#[derive(Clone)]
pub struct BuildLog {
    build: Arc<str>,
    sink: Arc<dyn EventSink>,
    redactor: Redactor,
}

impl BuildLog {
    /// A root log for the whole run; all logs derived from it redact with
    /// `redactor`.
    pub fn root(sink: Arc<dyn EventSink>, redactor: Redactor) -> Self {
        let sink: Arc<dyn EventSink> = Arc::new(RedactingSink {
            redactor: redactor.clone(),
            inner: sink,
        });
        BuildLog {
            build: Arc::from(""),
            sink,
            redactor,
        }
    }

    pub fn for_build(&self, build: &str) -> Self {
        BuildLog {
            build: Arc::from(build),
            sink: self.sink.clone(),
            redactor: self.redactor.clone(),
        }
    }

    pub fn build_name(&self) -> &str {
        &self.build
    }

    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    pub fn emit(&self, event: Event) {
        self.sink.emit(&event);
    }

    fn message(&self, level: Level, message: String) {
        let build = (!self.build.is_empty()).then(|| self.build.to_string());
        self.emit(Event::Message {
            build,
            level,
            message,
        });
    }

    pub fn info(&self, message: impl Into<String>) {
        self.message(Level::Info, message.into());
    }

    pub fn warn(&self, message: impl Into<String>) {
        self.message(Level::Warn, message.into());
    }

    pub fn error(&self, message: impl Into<String>) {
        self.message(Level::Error, message.into());
    }

    pub fn output(&self, stream: Stream, line: &str) {
        self.emit(Event::Output {
            build: self.build.to_string(),
            stream,
            line: line.to_owned(),
        });
    }

    /// Progress of a transfer, in bytes.
    pub fn progress(&self, task: &str, done: u64, total: Option<u64>) {
        self.emit(Event::Progress {
            build: self.build.to_string(),
            task: task.to_owned(),
            done,
            total,
            unit: ProgressUnit::Bytes,
        });
    }

    /// Progress of work that only reports how far along it is.
    pub fn progress_percent(&self, task: &str, percent: u64) {
        self.emit(Event::Progress {
            build: self.build.to_string(),
            task: task.to_owned(),
            done: percent.min(100),
            total: Some(100),
            unit: ProgressUnit::Percent,
        });
    }

    pub fn step_started(&self, step: &str) {
        self.emit(Event::StepStarted {
            build: self.build.to_string(),
            step: step.to_owned(),
        });
    }

    pub fn step_finished(&self, step: &str, elapsed: Duration) {
        self.emit(Event::StepFinished {
            build: self.build.to_string(),
            step: step.to_owned(),
            duration_ms: elapsed.as_millis() as u64,
        });
    }

    pub fn cleanup_failed(&self, step: &str, error: &str) {
        self.emit(Event::CleanupFailed {
            build: self.build.to_string(),
            step: step.to_owned(),
            error: error.to_owned(),
        });
    }
}

/// Collects events in memory; for tests and for callers that post-process.
#[derive(Default)]
pub struct MemorySink {
    events: std::sync::Mutex<Vec<Event>>,
}

impl MemorySink {
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().expect("sink lock poisoned").clone()
    }
}

impl EventSink for MemorySink {
    fn emit(&self, event: &Event) {
        self.events
            .lock()
            .expect("sink lock poisoned")
            .push(event.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_before_reaching_the_sink() {
        let sink = Arc::new(MemorySink::default());
        let redactor = Redactor::new();
        redactor.add("tops3cret");
        let log = BuildLog::root(sink.clone(), redactor).for_build("vm");
        log.output(Stream::Stdout, "password is tops3cret");
        log.info("using tops3cret");
        log.cleanup_failed("launch", "tops3cret leaked?");
        log.emit(Event::TestFinished {
            build: "vm".into(),
            name: "login".into(),
            passed: false,
            exit_code: Some(1),
            duration_ms: 5,
            attempts: 1,
            output_tail: vec!["token tops3cret rejected".into()],
            error: Some("`check tops3cret` failed".into()),
        });
        let json = serde_json::to_string(&sink.events()).unwrap();
        assert!(!json.contains("tops3cret"), "{json}");
        assert_eq!(json.matches("<sensitive>").count(), 5, "{json}");
    }
}
