//! Runs `[[test]]` on a machine started from an artifact, over the
//! communicator an earlier step connected: the last step of every
//! builder's test run.
//!
//! Uses `state.communicator()`. Produces the state's test results.

use super::step_provision::HasCommunicator;
use async_trait::async_trait;
use imgbuild_core::{Step, StepContext, StepError};
use imgbuild_provisioners::image_test::{ImageTest, TestResult, run_all};
use imgbuild_provisioners::{ProvisionContext, ProvisionError};

/// Builder state that receives the results of a test run.
pub trait HasTestResults {
    fn set_test_results(&mut self, results: Vec<TestResult>);
}

/// Every test, in order; a failed test is a result, not a failed step.
/// Only cancellation stops it.
pub struct StepRunTests {
    tests: Vec<ImageTest>,
}

impl StepRunTests {
    pub fn new(tests: Vec<ImageTest>) -> Self {
        StepRunTests { tests }
    }
}

#[async_trait]
impl<S: HasCommunicator + HasTestResults + Send> Step<S> for StepRunTests {
    fn name(&self) -> &'static str {
        "test"
    }

    async fn run(&mut self, state: &mut S, cx: &StepContext) -> Result<(), StepError> {
        let comm = state
            .communicator()
            .ok_or_else(|| StepError::failed("no connection to the machine under test"))?;
        let pcx = ProvisionContext {
            log: cx.log.clone(),
            cancel: cx.cancel.clone(),
        };
        match run_all(&self.tests, comm.as_ref(), &pcx).await {
            Ok(results) => {
                state.set_test_results(results);
                Ok(())
            }
            Err(ProvisionError::Cancelled) => Err(StepError::Cancelled),
            Err(err) => Err(StepError::failed(format!("running the tests: {err}"))),
        }
    }
}
