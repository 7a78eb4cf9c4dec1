//! Waits for SSH on the instance and logs in, while watching that the
//! instance is still alive: one that stops or terminates while SSH is
//! awaited (a bad AMI, a kernel panic, a spot reclaim) fails the build at
//! once instead of after the whole SSH timeout.

use super::config::SshInterface;
use super::poll::instance_reason;
use super::{Ec2State, InstanceInfo, Plan};
use crate::common::ssh;
use async_trait::async_trait;
use imgbuild_core::{CleanupOutcome, Step, StepContext, StepError};
use imgbuild_provisioners::ssh::{Liveness, SshTarget};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the instance's state is checked while SSH is awaited.
const LIVENESS_INTERVAL: Duration = Duration::from_secs(5);

/// The address SSH goes to, per `ssh_interface`.
pub(super) fn address(
    instance: &InstanceInfo,
    interface: Option<SshInterface>,
) -> Result<String, String> {
    let (interface, found) = match interface {
        Some(SshInterface::PublicIp) => (SshInterface::PublicIp, instance.public_ip.clone()),
        Some(SshInterface::PrivateIp) => (SshInterface::PrivateIp, instance.private_ip.clone()),
        Some(SshInterface::PublicDns) => (SshInterface::PublicDns, instance.public_dns.clone()),
        Some(SshInterface::PrivateDns) => (SshInterface::PrivateDns, instance.private_dns.clone()),
        None => match &instance.public_ip {
            Some(ip) => return Ok(ip.clone()),
            None => (SshInterface::PrivateIp, instance.private_ip.clone()),
        },
    };
    found.ok_or_else(|| {
        let advice = if interface.is_public() {
            "launch it in a subnet that assigns public IPs, set `associate_public_ip = true`, or use `ssh_interface = \"private_ip\"` from inside the VPC"
        } else {
            "set `ssh_interface` to an address the instance has"
        };
        format!(
            "instance {} has no {} address to connect to; {advice}",
            instance.id,
            interface.as_str()
        )
    })
}

/// Aborts the watcher task when connecting ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub struct StepConnect {
    plan: Arc<Plan>,
}

impl StepConnect {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepConnect { plan }
    }

    /// Starts polling the instance's state; the returned liveness check
    /// reports it gone once it is stopping, stopped or terminated.
    fn watch(&self, instance_id: &str) -> (Liveness, AbortOnDrop) {
        let verdict: Arc<Mutex<Option<String>>> = Arc::default();
        let api = self.plan.api();
        let id = instance_id.to_owned();
        let writer = verdict.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(LIVENESS_INTERVAL).await;
                // A failed look is no verdict: the SSH wait has its own limit.
                let dead = match api.describe_instance(&id).await {
                    Ok(Some(instance)) => match instance.state.as_str() {
                        state @ ("shutting-down" | "terminated" | "stopping" | "stopped") => {
                            Some(format!(
                                "instance {id} is {state}{}; check its system log (`aws ec2 get-console-output --instance-id {id}`)",
                                instance_reason(&instance)
                            ))
                        }
                        _ => None,
                    },
                    Ok(None) => Some(format!("instance {id} no longer exists")),
                    Err(_) => None,
                };
                if dead.is_some() {
                    *writer.lock().expect("liveness lock poisoned") = dead;
                    return;
                }
            }
        });
        let liveness: Liveness =
            Arc::new(move || verdict.lock().expect("liveness lock poisoned").clone());
        (liveness, AbortOnDrop(task))
    }
}

#[async_trait]
impl Step<Ec2State> for StepConnect {
    fn name(&self) -> &'static str {
        "connect"
    }

    async fn run(&mut self, state: &mut Ec2State, cx: &StepContext) -> Result<(), StepError> {
        let instance = state
            .instance
            .clone()
            .ok_or_else(|| StepError::failed("the instance is not running"))?;
        let config = &self.plan.config;
        let host = match &config.ssh.host {
            // The override wins; the instance's own address is not needed.
            Some(host) => host.clone(),
            None => address(&instance, config.ssh_interface).map_err(StepError::failed)?,
        };
        let target = SshTarget { host, port: 22 };
        let (liveness, _watcher) = self.watch(&instance.id);
        let started = Instant::now();
        let communicator = ssh::connect(
            &config.ssh,
            &self.plan.config_dir,
            target,
            state.temporary_key.as_deref(),
            config.ssh.wait_options(),
            cx,
            Some(liveness),
        )
        .await?;
        cx.log.info(format!(
            "connected over SSH to {} {:.1}s after the instance was running",
            imgbuild_provisioners::Communicator::target(&communicator),
            started.elapsed().as_secs_f64()
        ));
        state.communicator = Some(Arc::new(communicator));
        Ok(())
    }

    async fn cleanup(
        &mut self,
        state: &mut Ec2State,
        _cx: &StepContext,
        _outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        state.communicator = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(public: bool) -> InstanceInfo {
        InstanceInfo {
            id: "i-0123456789abcdef0".into(),
            public_ip: public.then(|| "203.0.113.9".into()),
            private_ip: Some("10.0.1.5".into()),
            public_dns: None,
            private_dns: Some("ip-10-0-1-5.ec2.internal".into()),
        }
    }

    #[test]
    fn the_default_interface_prefers_the_public_ip() {
        assert_eq!(address(&instance(true), None).unwrap(), "203.0.113.9");
        assert_eq!(address(&instance(false), None).unwrap(), "10.0.1.5");
        assert_eq!(
            address(&instance(true), Some(SshInterface::PrivateDns)).unwrap(),
            "ip-10-0-1-5.ec2.internal"
        );
    }

    #[test]
    fn a_missing_address_says_what_to_change() {
        let err = address(&instance(false), Some(SshInterface::PublicIp)).unwrap_err();
        assert!(err.contains("no public_ip address"), "{err}");
        assert!(err.contains("associate_public_ip"), "{err}");
    }
}
