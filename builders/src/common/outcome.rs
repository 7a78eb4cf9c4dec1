//! What a run of a builder's steps means for the build.

use crate::BuildError;
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
