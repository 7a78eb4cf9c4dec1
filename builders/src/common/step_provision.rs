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

pub struct StepProvision {
    provisioners: Vec<Provisioner>,
}

impl StepProvision {
    pub fn new(provisioners: Vec<Provisioner>) -> Self {
        StepProvision { provisioners }
    }
}

#[async_trait]
impl<S: HasCommunicator + Send> Step<S> for StepProvision {
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
        for (index, provisioner) in self.provisioners.iter().enumerate() {
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
        }
        Ok(())
    }
}
