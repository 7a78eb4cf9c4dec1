//! The security group the instance runs in. Existing groups
//! (`security_group_ids`) are used as they are; otherwise a temporary group
//! is made that lets in SSH only, only from `ssh_cidrs`, and is deleted on
//! cleanup, which may have to wait until the instance using it is gone.

use super::client::{AwsResultExt, filter, tag_spec};
use super::config::parse_cidr;
use super::poll::{Backoff, Poller};
use super::{Ec2State, Plan};
use crate::common::tracked::{record, release};
use async_trait::async_trait;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{IpPermission, IpRange, Ipv6Range, ResourceType};
use imgbuild_core::{BuildLog, CleanupOutcome, Resource, ResourceId, Step, StepContext, StepError};
use std::sync::Arc;
use std::time::Duration;

/// Where AWS tells callers their public address; used only against real
/// AWS (no `endpoint_url`) and when SSH goes to a public address.
const CHECKIP_URL: &str = "https://checkip.amazonaws.com";

/// Finds a group by name, for a run that died before learning its id.
async fn group_id_by_name(
    client: &Client,
    region: &str,
    name: &str,
) -> Result<Option<String>, StepError> {
    let output = client
        .describe_security_groups()
        .filters(filter("group-name", name))
        .send()
        .await
        .aws("DescribeSecurityGroups", region)?;
    Ok(output
        .security_groups()
        .iter()
        .find(|group| group.group_name() == Some(name))
        .and_then(|group| group.group_id().map(str::to_owned)))
}

/// Deletes a security group, retrying while EC2 says it is still in use
/// (an instance using it takes a while to let go after terminating).
/// A group that is already gone counts as deleted.
pub async fn delete_group(
    client: &Client,
    region: &str,
    group_id: Option<&str>,
    name: &str,
    timeout: Duration,
    log: Option<&BuildLog>,
) -> Result<(), StepError> {
    let group_id = match group_id {
        Some(id) => id.to_owned(),
        None => match group_id_by_name(client, region, name).await? {
            Some(id) => id,
            None => return Ok(()),
        },
    };
    let backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(10));
    let mut poller = Poller::new(
        format!("deleting security group {group_id} ({name}) in {region}"),
        timeout,
        backoff,
        log,
    );
    loop {
        match client
            .delete_security_group()
            .group_id(&group_id)
            .send()
            .await
            .aws("DeleteSecurityGroup", region)
        {
            Ok(_) => return Ok(()),
            Err(err) if err.is("InvalidGroup.NotFound") => return Ok(()),
            // The instance using it has not let go yet.
            Err(err) if err.is("DependencyViolation") => {
                poller.pending("still in use, waiting").await?
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// The caller's public IPv4 address as `a.b.c.d/32`, or `None` when it
/// cannot be learned within a few seconds.
async fn public_address_cidr() -> Option<String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(4))
        .build()
        .ok()?;
    let text = client
        .get(CHECKIP_URL)
        .send()
        .await
        .ok()?
        .error_for_status()
        .ok()?
        .text()
        .await
        .ok()?;
    let address: std::net::Ipv4Addr = text.trim().parse().ok()?;
    Some(format!("{address}/32"))
}

pub struct StepSecurityGroup {
    plan: Arc<Plan>,
    /// The temporary group, once recorded: journal id, name, id once known.
    created: Option<(ResourceId, String, Option<String>)>,
}

impl StepSecurityGroup {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepSecurityGroup {
            plan,
            created: None,
        }
    }

    /// The CIDRs allowed to reach SSH, and whether they came from config.
    async fn source_cidrs(&self, cx: &StepContext) -> Vec<String> {
        let config = &self.plan.config;
        if !config.ssh_cidrs.is_empty() {
            return config.ssh_cidrs.clone();
        }
        let public_ssh = config.ssh_interface.is_none_or(|i| i.is_public());
        // Against another endpoint (moto, LocalStack) or through an SSH
        // host override (a bastion, a port forward) the address AWS would
        // see is not the one that connects; do not guess.
        if self.plan.endpoint_url.is_none()
            && config.ssh.host.is_none()
            && public_ssh
            && let Some(cidr) = public_address_cidr().await
        {
            cx.log.info(format!(
                "the temporary security group admits SSH from this machine's public address {cidr} only"
            ));
            return vec![cidr];
        }
        cx.log.warn(
            "the temporary security group admits SSH from anywhere (0.0.0.0/0): this machine's public address is unknown; set `ssh_cidrs` to narrow it",
        );
        vec!["0.0.0.0/0".to_owned()]
    }

    /// The VPC to make the group in: `vpc_id`, else the subnet's; `None`
    /// leaves it to EC2 (the default VPC).
    async fn vpc_id(&self) -> Result<Option<String>, StepError> {
        let config = &self.plan.config;
        if let Some(vpc) = &config.vpc_id {
            return Ok(Some(vpc.clone()));
        }
        let Some(subnet) = &config.subnet_id else {
            return Ok(None);
        };
        let region = &self.plan.region;
        let output = self
            .plan
            .client()
            .describe_subnets()
            .subnet_ids(subnet)
            .send()
            .await
            .aws("DescribeSubnets", region)?;
        let vpc = output
            .subnets()
            .first()
            .and_then(|s| s.vpc_id())
            .map(str::to_owned);
        vpc.map(Some)
            .ok_or_else(|| StepError::failed(format!("subnet {subnet} does not exist in {region}")))
    }
}

#[async_trait]
impl Step<Ec2State> for StepSecurityGroup {
    fn name(&self) -> &'static str {
        "security_group"
    }

    async fn run(&mut self, state: &mut Ec2State, cx: &StepContext) -> Result<(), StepError> {
        let plan = self.plan.clone();
        if !plan.config.security_group_ids.is_empty() {
            state.security_group_ids = plan.config.security_group_ids.clone();
            cx.log.info(format!(
                "using security groups {}",
                state.security_group_ids.join(", ")
            ));
            return Ok(());
        }
        let cidrs = self.source_cidrs(cx).await;
        let vpc_id = self.vpc_id().await?;
        let name = plan.temporary_name();
        let region = &plan.region;
        let client = plan.client();

        let id = record(
            cx,
            Resource::Ec2SecurityGroup {
                region: region.clone(),
                endpoint_url: plan.endpoint_url.clone(),
                name: name.clone(),
                group_id: None,
            },
        )?;
        self.created = Some((id, name.clone(), None));
        let output = client
            .create_security_group()
            .group_name(&name)
            .description(format!(
                "imgbuild: SSH to the build instance of run {}",
                plan.run_id
            ))
            .set_vpc_id(vpc_id)
            .tag_specifications(tag_spec(ResourceType::SecurityGroup, &plan.base_tags()))
            .send()
            .await
            .aws("CreateSecurityGroup", region)?;
        let group_id = output
            .group_id()
            .ok_or_else(|| StepError::failed("CreateSecurityGroup returned no group id"))?
            .to_owned();
        self.created = Some((id, name.clone(), Some(group_id.clone())));
        cx.journal
            .update(
                id,
                Resource::Ec2SecurityGroup {
                    region: region.clone(),
                    endpoint_url: plan.endpoint_url.clone(),
                    name: name.clone(),
                    group_id: Some(group_id.clone()),
                },
            )
            .map_err(StepError::failed)?;

        // `ssh.port` alone means sshd listens there; with `ssh.host` too it
        // is the port of whatever stands in between (a bastion's forward),
        // and the instance still takes SSH on 22.
        let ssh = &plan.config.ssh;
        let port = match (&ssh.host, ssh.port) {
            (None, Some(port)) => i32::from(port),
            _ => 22,
        };
        let mut permission = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(port)
            .to_port(port);
        for cidr in &cidrs {
            let (address, _) = parse_cidr(cidr).map_err(StepError::failed)?;
            let description = format!("imgbuild SSH, run {}", plan.run_id);
            permission = if address.is_ipv4() {
                permission.ip_ranges(
                    IpRange::builder()
                        .cidr_ip(cidr)
                        .description(description)
                        .build(),
                )
            } else {
                permission.ipv6_ranges(
                    Ipv6Range::builder()
                        .cidr_ipv6(cidr)
                        .description(description)
                        .build(),
                )
            };
        }
        client
            .authorize_security_group_ingress()
            .group_id(&group_id)
            .ip_permissions(permission.build())
            .send()
            .await
            .aws("AuthorizeSecurityGroupIngress", region)?;
        cx.log.info(format!(
            "created temporary security group {group_id} ({name}) admitting tcp/{port} from {}",
            cidrs.join(", ")
        ));
        state.security_group_ids = vec![group_id];
        Ok(())
    }

    async fn cleanup(
        &mut self,
        _state: &mut Ec2State,
        cx: &StepContext,
        _outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        let Some((id, name, group_id)) = self.created.take() else {
            return Ok(());
        };
        let result = delete_group(
            &self.plan.client(),
            &self.plan.region,
            group_id.as_deref(),
            &name,
            self.plan.instance_timeout(),
            Some(&cx.log),
        )
        .await;
        if let Err(err) = result {
            self.created = Some((id, name, group_id));
            return Err(StepError::failed(format!(
                "{err}; the group stays recorded in the run journal for `imgbuild clean`"
            )));
        }
        cx.log.info(format!(
            "deleted the temporary security group {}",
            group_id.as_deref().unwrap_or(&name)
        ));
        release(cx, id)
    }
}
