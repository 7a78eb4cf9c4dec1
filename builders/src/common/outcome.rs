//! What a run of a builder's steps means for the build.

use crate::{Artifact, BuildError};
use imgbuild_core::step::{CleanupOutcome, StepError, StepsReport};

/// `Ok` when every step succeeded, else the build's error: cancellation, or
/// the step that failed and why. Takes the failure out of the report; the
/// rest (`left_for_debugging`, `started`) stays for the caller.
pub fn steps_result(report: &mut StepsReport) -> Result<(), BuildError> {
    match report.outcome {
        CleanupOutcome::Succeeded => Ok(()),
        CleanupOutcome::Cancelled => Err(BuildError::Cancelled),
        CleanupOutcome::Failed => match report.failure.take() {
            Some((step, StepError::Failed(message))) => Err(BuildError::Failed { step, message }),
            Some((_, StepError::Cancelled)) => Err(BuildError::Cancelled),
            None => Err(BuildError::Failed {
                step: "unknown".to_owned(),
                message: "the build failed without naming a step".to_owned(),
            }),
        },
    }
}

/// The end of every builder's `build()`: the steps' result, then the
/// artifact the last step left, which a successful run must have produced.
pub fn finish(
    report: &mut StepsReport,
    artifact: Option<Artifact>,
    last_step: &str,
) -> Result<Artifact, BuildError> {
    steps_result(report)?;
    artifact.ok_or_else(|| BuildError::Failed {
        step: last_step.to_owned(),
        message: "the steps finished without producing an artifact".to_owned(),
    })
}

/// A machine `--on-error abort` left running, and how to get into it.
pub struct LeftRunning {
    /// What it is, with the details to find it ("the VM (QEMU pid 42, …)").
    pub what: String,
    /// The command that gets a shell in it.
    pub reach: String,
}

/// What a build left for debugging, said the same way by every builder:
/// the machine and how to reach it when one is still running, then how to
/// remove everything (`clean`, a complete sentence part).
pub fn debugging_hint(left: Option<LeftRunning>, clean: &str) -> String {
    match left {
        Some(LeftRunning { what, reach }) => {
            format!("{what} is left running for debugging:\n  {reach}\n{clean}")
        }
        None => format!("the build's files are left for debugging; {clean}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgbuild_core::step::StepsReport;

    fn report(outcome: CleanupOutcome, failure: Option<(String, StepError)>) -> StepsReport {
        StepsReport {
            outcome,
            failure,
            cleanup_failures: Vec::new(),
            left_for_debugging: false,
            started: 0,
        }
    }

    #[test]
    fn finish_needs_success_and_an_artifact() {
        let artifact = Artifact {
            builder: "qemu".into(),
            id: "x".into(),
            files: Vec::new(),
            source: crate::SourceIdentity {
                kind: "file".into(),
                reference: "b".into(),
                sha256: None,
            },
            details: serde_json::Value::Null,
        };
        let ok = finish(
            &mut report(CleanupOutcome::Succeeded, None),
            Some(artifact),
            "export",
        );
        assert_eq!(ok.unwrap().id, "x");
        match finish(&mut report(CleanupOutcome::Succeeded, None), None, "export") {
            Err(BuildError::Failed { step, message }) => {
                assert_eq!(step, "export");
                assert!(
                    message.contains("without producing an artifact"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        let failed = report(
            CleanupOutcome::Failed,
            Some(("launch".into(), StepError::failed("no qemu"))),
        );
        match finish(&mut { failed }, None, "export") {
            Err(BuildError::Failed { step, message }) => {
                assert_eq!((step.as_str(), message.as_str()), ("launch", "no qemu"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            finish(&mut report(CleanupOutcome::Cancelled, None), None, "export"),
            Err(BuildError::Cancelled)
        ));
    }

    #[test]
    fn hints_say_what_is_running_and_how_to_clean() {
        let hint = debugging_hint(
            Some(LeftRunning {
                what: "the VM (QEMU pid 7)".into(),
                reach: "ssh -p 2222 root@127.0.0.1".into(),
            }),
            "remove it with `imgbuild clean --run r1`",
        );
        assert_eq!(
            hint,
            "the VM (QEMU pid 7) is left running for debugging:\n  ssh -p 2222 root@127.0.0.1\nremove it with `imgbuild clean --run r1`"
        );
        assert_eq!(
            debugging_hint(None, "run `imgbuild clean`"),
            "the build's files are left for debugging; run `imgbuild clean`"
        );
    }
}
