//! A build is a list of steps. Each step owns what it creates: `run` makes it,
//! `cleanup` removes it. The runner runs steps in order until one fails or the
//! build is cancelled, then cleans up every step that started, in reverse
//! order, carrying on past individual cleanup failures.

use crate::events::BuildLog;
use crate::journal::Journal;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Instant;
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// Why a step did not complete.
#[derive(Debug, Error)]
pub enum StepError {
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Failed(String),
}

impl StepError {
    pub fn failed(message: impl std::fmt::Display) -> Self {
        StepError::Failed(message.to_string())
    }

    /// Prefixes the message with what was being attempted.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        match self {
            StepError::Cancelled => StepError::Cancelled,
            StepError::Failed(message) => StepError::Failed(format!("{what}: {message}")),
        }
    }
}

/// What happens to a failed build's machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnError {
    /// Clean up everything (the default).
    #[default]
    Cleanup,
    /// Leave everything as it is for debugging; the journal keeps the list.
    Abort,
}

/// How the steps ended, as seen by cleanup: a step that produces an artifact
/// keeps it on success and removes it otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CleanupOutcome {
    Succeeded,
    Failed,
    Cancelled,
}

/// Everything a step may need besides the builder's own state.
#[derive(Clone)]
pub struct StepContext {
    pub log: BuildLog,
    pub journal: Arc<Journal>,
    /// Cancelled on Ctrl-C; steps should return [`StepError::Cancelled`]
    /// promptly. Cleanup never observes it.
    pub cancel: CancellationToken,
    pub run_id: String,
}

impl StepContext {
    pub fn build_name(&self) -> &str {
        self.log.build_name()
    }

    /// Runs `future` unless the build is cancelled first.
    pub async fn cancellable<T>(
        &self,
        future: impl std::future::Future<Output = Result<T, StepError>>,
    ) -> Result<T, StepError> {
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err(StepError::Cancelled),
            result = future => result,
        }
    }
}

#[async_trait]
pub trait Step<S: Send>: Send {
    fn name(&self) -> &'static str;

    /// True when what earlier steps found makes this one unnecessary (a
    /// build whose every step is cached boots no machine): the runner passes
    /// over it without a start event, and its cleanup finds nothing to undo.
    fn skipped(&self, _state: &S) -> bool {
        false
    }

    async fn run(&mut self, state: &mut S, cx: &StepContext) -> Result<(), StepError>;

    /// Undoes what `run` did, as far as it got. Called once for every step
    /// whose `run` was entered, whether it returned or not.
    async fn cleanup(
        &mut self,
        _state: &mut S,
        _cx: &StepContext,
        _outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        Ok(())
    }
}

/// The result of running a build's steps.
#[derive(Debug)]
pub struct StepsReport {
    pub outcome: CleanupOutcome,
    /// The step that failed and why.
    pub failure: Option<(String, StepError)>,
    /// Cleanup errors, by step; the build carried on past each.
    pub cleanup_failures: Vec<(String, String)>,
    /// True when cleanup was skipped for `--on-error abort`.
    pub left_for_debugging: bool,
    /// How many steps were entered; with `left_for_debugging`, the ones
    /// [`cleanup_steps`] would still have to clean.
    pub started: usize,
}

pub async fn run_steps<S: Send>(
    steps: &mut [Box<dyn Step<S>>],
    state: &mut S,
    cx: &StepContext,
    on_error: OnError,
) -> StepsReport {
    let mut started = 0;
    let mut failure = None;
    for step in steps.iter_mut() {
        if cx.cancel.is_cancelled() {
            failure = Some((step.name().to_owned(), StepError::Cancelled));
            break;
        }
        started += 1;
        if step.skipped(state) {
            continue;
        }
        cx.log.step_started(step.name());
        let began = Instant::now();
        let result = cx.cancellable(step.run(state, cx)).await;
        match result {
            Ok(()) => cx.log.step_finished(step.name(), began.elapsed()),
            Err(err) => {
                failure = Some((step.name().to_owned(), err));
                break;
            }
        }
    }

    let outcome = match &failure {
        None => CleanupOutcome::Succeeded,
        Some((_, StepError::Cancelled)) => CleanupOutcome::Cancelled,
        Some((_, StepError::Failed(_))) => CleanupOutcome::Failed,
    };

    if outcome == CleanupOutcome::Failed && on_error == OnError::Abort {
        return StepsReport {
            outcome,
            failure,
            cleanup_failures: Vec::new(),
            left_for_debugging: true,
            started,
        };
    }

    let cleanup_failures = cleanup_steps(&mut steps[..started], state, cx, outcome).await;
    StepsReport {
        outcome,
        failure,
        cleanup_failures,
        left_for_debugging: false,
        started,
    }
}

/// Cleans up `steps` (the ones that were entered) in reverse order,
/// carrying on past failures, which are reported and returned.
pub async fn cleanup_steps<S: Send>(
    steps: &mut [Box<dyn Step<S>>],
    state: &mut S,
    cx: &StepContext,
    outcome: CleanupOutcome,
) -> Vec<(String, String)> {
    let mut failures = Vec::new();
    for step in steps.iter_mut().rev() {
        if let Err(err) = step.cleanup(state, cx, outcome).await {
            let message = err.to_string();
            cx.log.cleanup_failed(step.name(), &message);
            failures.push((step.name().to_owned(), message));
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Event, MemorySink};
    use crate::redact::Redactor;
    use std::sync::Mutex;

    type Trace = Arc<Mutex<Vec<String>>>;

    struct Probe {
        name: &'static str,
        fail_run: bool,
        fail_cleanup: bool,
        hang: bool,
        trace: Trace,
    }

    #[async_trait]
    impl Step<()> for Probe {
        fn name(&self) -> &'static str {
            self.name
        }
        async fn run(&mut self, _: &mut (), _: &StepContext) -> Result<(), StepError> {
            self.trace
                .lock()
                .unwrap()
                .push(format!("run {}", self.name));
            if self.hang {
                std::future::pending::<()>().await;
            }
            if self.fail_run {
                return Err(StepError::failed("boom"));
            }
            Ok(())
        }
        async fn cleanup(
            &mut self,
            _: &mut (),
            _: &StepContext,
            outcome: CleanupOutcome,
        ) -> Result<(), StepError> {
            self.trace
                .lock()
                .unwrap()
                .push(format!("cleanup {} {outcome:?}", self.name));
            if self.fail_cleanup {
                return Err(StepError::failed("cleanup broke"));
            }
            Ok(())
        }
    }

    fn probe(name: &'static str, trace: &Trace) -> Box<dyn Step<()>> {
        Box::new(Probe {
            name,
            fail_run: false,
            fail_cleanup: false,
            hang: false,
            trace: trace.clone(),
        })
    }

    fn context(state: &tempfile::TempDir) -> (StepContext, Arc<MemorySink>) {
        let sink = Arc::new(MemorySink::default());
        let log = BuildLog::root(sink.clone(), Redactor::new()).for_build("b");
        let journal = Arc::new(Journal::create(state.path(), "r1", "x.toml".as_ref()).unwrap());
        let cx = StepContext {
            log,
            journal,
            cancel: CancellationToken::new(),
            run_id: "r1".into(),
        };
        (cx, sink)
    }

    #[tokio::test]
    async fn failure_stops_the_run_and_cleans_started_steps_in_reverse_past_failures() {
        let dir = tempfile::tempdir().unwrap();
        let (cx, sink) = context(&dir);
        let trace = Trace::default();
        let mut steps = vec![
            probe("one", &trace),
            Box::new(Probe {
                name: "two",
                fail_run: false,
                fail_cleanup: true,
                hang: false,
                trace: trace.clone(),
            }),
            Box::new(Probe {
                name: "three",
                fail_run: true,
                fail_cleanup: false,
                hang: false,
                trace: trace.clone(),
            }),
            probe("four", &trace),
        ];
        let report = run_steps(&mut steps, &mut (), &cx, OnError::Cleanup).await;
        assert_eq!(report.outcome, CleanupOutcome::Failed);
        assert_eq!(report.failure.as_ref().unwrap().0, "three");
        assert_eq!(
            *trace.lock().unwrap(),
            vec![
                "run one",
                "run two",
                "run three",
                "cleanup three Failed",
                "cleanup two Failed",
                "cleanup one Failed"
            ]
        );
        assert_eq!(
            report.cleanup_failures,
            vec![("two".into(), "cleanup broke".into())]
        );
        assert!(
            sink.events()
                .iter()
                .any(|e| matches!(e, Event::CleanupFailed { step, .. } if step == "two"))
        );
    }

    /// A step that passes itself over when the state says so.
    struct SkippedWhen(Box<dyn Step<bool>>);

    #[async_trait]
    impl Step<bool> for SkippedWhen {
        fn name(&self) -> &'static str {
            "maybe"
        }
        fn skipped(&self, skip: &bool) -> bool {
            *skip
        }
        async fn run(&mut self, state: &mut bool, cx: &StepContext) -> Result<(), StepError> {
            self.0.run(state, cx).await
        }
    }

    struct Ran(Trace);

    #[async_trait]
    impl Step<bool> for Ran {
        fn name(&self) -> &'static str {
            "ran"
        }
        async fn run(&mut self, _: &mut bool, _: &StepContext) -> Result<(), StepError> {
            self.0.lock().unwrap().push("run".into());
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_skipped_step_neither_runs_nor_announces_itself() {
        for skip in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let (cx, sink) = context(&dir);
            let trace = Trace::default();
            let mut steps: Vec<Box<dyn Step<bool>>> =
                vec![Box::new(SkippedWhen(Box::new(Ran(trace.clone()))))];
            let report = run_steps(&mut steps, &mut skip.clone(), &cx, OnError::Cleanup).await;
            assert!(report.failure.is_none());
            assert_eq!(trace.lock().unwrap().is_empty(), skip);
            let announced = sink
                .events()
                .iter()
                .any(|e| matches!(e, Event::StepStarted { step, .. } if step == "maybe"));
            assert_eq!(announced, !skip);
        }
    }

    #[tokio::test]
    async fn cancellation_interrupts_a_running_step_and_still_cleans_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cx, _) = context(&dir);
        let trace = Trace::default();
        let mut steps = vec![
            probe("one", &trace),
            Box::new(Probe {
                name: "hangs",
                fail_run: false,
                fail_cleanup: false,
                hang: true,
                trace: trace.clone(),
            }) as Box<dyn Step<()>>,
            probe("never", &trace),
        ];
        let cancel = cx.cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            cancel.cancel();
        });
        let report = run_steps(&mut steps, &mut (), &cx, OnError::Cleanup).await;
        assert_eq!(report.outcome, CleanupOutcome::Cancelled);
        assert_eq!(
            *trace.lock().unwrap(),
            vec![
                "run one",
                "run hangs",
                "cleanup hangs Cancelled",
                "cleanup one Cancelled"
            ]
        );
    }

    #[tokio::test]
    async fn abort_on_error_skips_cleanup_but_success_always_cleans() {
        let dir = tempfile::tempdir().unwrap();
        let (cx, _) = context(&dir);
        let trace = Trace::default();
        let mut steps = vec![
            probe("one", &trace),
            Box::new(Probe {
                name: "fails",
                fail_run: true,
                fail_cleanup: false,
                hang: false,
                trace: trace.clone(),
            }) as Box<dyn Step<()>>,
        ];
        let report = run_steps(&mut steps, &mut (), &cx, OnError::Abort).await;
        assert!(report.left_for_debugging);
        assert_eq!(*trace.lock().unwrap(), vec!["run one", "run fails"]);

        let trace = Trace::default();
        let mut steps = vec![probe("one", &trace)];
        let report = run_steps(&mut steps, &mut (), &cx, OnError::Abort).await;
        assert_eq!(report.outcome, CleanupOutcome::Succeeded);
        assert_eq!(
            *trace.lock().unwrap(),
            vec!["run one", "cleanup one Succeeded"]
        );
    }
}
