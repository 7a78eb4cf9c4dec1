//! Runs the build's provisioners, in config order, over the communicator an
//! earlier step connected.

use async_trait::async_trait;
use imgbuild_core::{Step, StepContext, StepError};
use imgbuild_provisioners::{Communicator, ProvisionContext, ProvisionError, Provisioner};
use std::sync::Arc;
use std::time::Instant;

/// Builder state that holds a connected communicator.
pub trait HasCommunicator {
    fn communicator(&self) -> Option<Arc<dyn Communicator>>;
}

/// Implements [`HasCommunicator`] for a builder state whose connect step
/// leaves the connection in a `communicator: Option<Arc<dyn Communicator>>`
/// field, as every builder's does.
macro_rules! has_communicator {
    ($state:ty) => {
        impl $crate::common::step_provision::HasCommunicator for $state {
            fn communicator(
                &self,
            ) -> Option<std::sync::Arc<dyn imgbuild_provisioners::Communicator>> {
                self.communicator.clone()
            }
        }
    };
}
pub(crate) use has_communicator;

/// Builder state that can keep the machine's state after a provisioner
/// (the step cache) and start from a kept one. The defaults keep nothing.
#[async_trait]
pub trait KeepsSteps: Send {
    /// How many leading provisioners the machine already went through,
    /// because it started from a kept state.
    fn steps_done(&self) -> usize {
        0
    }

    /// The key to keep the state after provisioner `index` under; `None`
    /// keeps nothing.
    fn key_after(&self, index: usize) -> Option<String> {
        let _ = index;
        None
    }

    /// Keeps the machine's state under `key`. A failure here costs only a
    /// later build's time: it is reported and the build goes on.
    async fn keep(&mut self, key: &str, cx: &StepContext) -> Result<(), String> {
        let _ = (key, cx);
        Ok(())
    }
}

pub struct StepProvision {
    provisioners: Vec<Provisioner>,
}

impl StepProvision {
    pub fn new(provisioners: Vec<Provisioner>) -> Self {
        StepProvision { provisioners }
    }
}

#[async_trait]
impl<S: HasCommunicator + KeepsSteps + Send> Step<S> for StepProvision {
    fn name(&self) -> &'static str {
        "provision"
    }

    async fn run(&mut self, state: &mut S, cx: &StepContext) -> Result<(), StepError> {
        if self.provisioners.is_empty() {
            cx.log.info("no provisioners for this build");
            return Ok(());
        }
        let comm = state
            .communicator()
            .ok_or_else(|| StepError::failed("no connection to the machine"))?;
        let pcx = ProvisionContext {
            log: cx.log.clone(),
            cancel: cx.cancel.clone(),
        };
        let count = self.provisioners.len();
        let done = state.steps_done().min(count);
        for (index, provisioner) in self.provisioners.iter().enumerate().skip(done) {
            let label = format!(
                "provisioner {} of {count}: {}",
                index + 1,
                provisioner.describe()
            );
            cx.log.info(label.clone());
            let started = Instant::now();
            match provisioner.run(comm.as_ref(), &pcx).await {
                Ok(()) => cx.log.info(format!(
                    "{label} done in {:.1}s",
                    started.elapsed().as_secs_f64()
                )),
                Err(ProvisionError::Cancelled) => return Err(StepError::Cancelled),
                Err(err) => return Err(StepError::failed(format!("{label}: {err}"))),
            }
            if let Some(key) = state.key_after(index) {
                let keeping = Instant::now();
                match state.keep(&key, cx).await {
                    Ok(()) => cx.log.info(format!(
                        "kept the state after provisioner {} in the step cache ({:.1}s)",
                        index + 1,
                        keeping.elapsed().as_secs_f64()
                    )),
                    Err(message) => cx.log.warn(format!(
                        "cannot keep the state after provisioner {} in the step cache ({message}); the build goes on, a later one redoes this step",
                        index + 1
                    )),
                }
            }
        }
        Ok(())
    }
}
