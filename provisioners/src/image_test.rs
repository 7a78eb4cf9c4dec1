//! `[[test]]`: shell checks run on the produced artifact (a fresh VM,
//! container or instance started from it), every one of them even after a
//! failure, each with its own result.

use crate::communicator::{Communicator, ExitStatus};
use crate::provisioner::{ProvisionContext, ProvisionError, Provisioner};
use imgbuild_core::Event;
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// One `[[test]]` table, resolved for one build.
#[derive(Debug, Clone)]
pub struct ImageTest {
    pub name: String,
    /// The commands, run as a shell provisioner runs them (`inline`,
    /// `script`, `env`, `valid_exit_codes`, `timeout`).
    pub shell: Provisioner,
    /// Further attempts after a failure, for services that start slowly.
    pub retries: u32,
    pub retry_delay: Duration,
}

/// How one test went, as the manifest records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    pub name: String,
    pub passed: bool,
    /// The exit code of the last attempt, when the command ran to an exit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<u32>,
    pub duration_secs: f64,
    pub attempts: u32,
    /// The last output lines of a failed attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_tail: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Runs every test in order, each even after an earlier one failed. Only a
/// cancelled build stops it early (`Err(Cancelled)`).
pub async fn run_all(
    tests: &[ImageTest],
    comm: &dyn Communicator,
    cx: &ProvisionContext,
) -> Result<Vec<TestResult>, ProvisionError> {
    let mut results = Vec::with_capacity(tests.len());
    let build = cx.log.build_name().to_owned();
    for (index, test) in tests.iter().enumerate() {
        // Events rather than messages, so the terminal and `--output json`
        // show tests the way they show steps.
        cx.log.emit(Event::TestStarted {
            build: build.clone(),
            name: test.name.clone(),
            index: index + 1,
            total: tests.len(),
        });
        let result = run_one(test, comm, cx).await?;
        cx.log.emit(Event::TestFinished {
            build: build.clone(),
            name: result.name.clone(),
            passed: result.passed,
            exit_code: result.exit_code,
            duration_ms: (result.duration_secs * 1000.0) as u64,
            attempts: result.attempts,
            output_tail: result.output_tail.clone(),
            error: result.error.clone(),
        });
        results.push(result);
    }
    Ok(results)
}

async fn run_one(
    test: &ImageTest,
    comm: &dyn Communicator,
    cx: &ProvisionContext,
) -> Result<TestResult, ProvisionError> {
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let err = match test.shell.run(comm, cx).await {
            Ok(()) => {
                return Ok(TestResult {
                    name: test.name.clone(),
                    passed: true,
                    exit_code: Some(0),
                    duration_secs: seconds(started),
                    attempts,
                    output_tail: Vec::new(),
                    error: None,
                });
            }
            Err(ProvisionError::Cancelled) => return Err(ProvisionError::Cancelled),
            Err(err) => err,
        };
        if attempts > test.retries {
            let (exit_code, output_tail) = match &err {
                ProvisionError::CommandFailed { status, tail, .. } => (
                    match status {
                        ExitStatus::Code(code) => Some(*code),
                        ExitStatus::Signal(_) => None,
                    },
                    tail.clone(),
                ),
                _ => (None, Vec::new()),
            };
            return Ok(TestResult {
                name: test.name.clone(),
                passed: false,
                exit_code,
                duration_secs: seconds(started),
                attempts,
                output_tail,
                error: Some(err.to_string()),
            });
        }
        // The output was just shown; the status is what says why.
        let why = match &err {
            ProvisionError::CommandFailed { status, .. } => status.to_string(),
            other => other.to_string(),
        };
        cx.log.warn(format!(
            "test `{}` failed ({why}); attempt {} of {} in {}",
            test.name,
            attempts + 1,
            test.retries + 1,
            humantime::format_duration(test.retry_delay)
        ));
        tokio::select! {
            _ = cx.cancel.cancelled() => return Err(ProvisionError::Cancelled),
            _ = tokio::time::sleep(test.retry_delay) => {}
        }
    }
}

fn seconds(since: Instant) -> f64 {
    (since.elapsed().as_secs_f64() * 10.0).round() / 10.0
}
