//! The security group the instance runs in. Existing groups
//! (`security_group_ids`) are used as they are; otherwise a temporary group
//! is made that lets in SSH only, only from the sources decided up front
//! ([`ssh_sources`]), and is deleted on cleanup, which may have to wait
//! until the instance using it is gone.

use super::api::{Ec2Api, NewSecurityGroup};
use super::config::Ec2Config;
use super::kind::Ec2Resource;
use super::poll::{Backoff, Poller};
use super::{Ec2State, Plan};
use crate::common::tracked::{record, release};
use async_trait::async_trait;
use imgbuild_core::{BuildLog, Cidr, CleanupOutcome, ResourceId, Step, StepContext, StepError};
use std::sync::Arc;
use std::time::Duration;

/// Where AWS tells callers their public address; used only against real
/// AWS (no other endpoint) and when SSH goes to a public address.
pub(super) const CHECKIP_URL: &str = "https://checkip.amazonaws.com";

/// Deletes a security group, retrying while EC2 says it is still in use
/// (an instance using it takes a while to let go after terminating).
/// A group that is already gone counts as deleted.
pub async fn delete_group(
    api: &dyn Ec2Api,
    group_id: Option<&str>,
    name: &str,
    timeout: Duration,
    log: Option<&BuildLog>,
) -> Result<(), StepError> {
    let group_id = match group_id {
        Some(id) => id.to_owned(),
        None => match api.security_group_id(name).await? {
            Some(id) => id,
            None => return Ok(()),
        },
    };
    let region = api.region();
    let backoff = Backoff::new(Duration::from_secs(2), Duration::from_secs(10));
    let mut poller = Poller::new(
        format!("deleting security group {group_id} ({name}) in {region}"),
        timeout,
        backoff,
        log,
    );
    loop {
        match api.delete_security_group(&group_id).await {
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

/// The caller's public IPv4 address as `a.b.c.d/32`, as `url` tells it,
/// or why it could not be learned within a few seconds.
async fn public_address_cidr(url: &str) -> Result<Cidr, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(4))
        .build()
        .map_err(|err| err.to_string())?;
    let text = client
        .get(url)
        .send()
        .await
        .and_then(|response| response.error_for_status())
        .map_err(|err| err.to_string())?
        .text()
        .await
        .map_err(|err| err.to_string())?;
    let address: std::net::Ipv4Addr = text
        .trim()
        .parse()
        .map_err(|_| format!("the answer {:?} is not an IPv4 address", text.trim()))?;
    Cidr::parse(&format!("{address}/32"))
}

/// The VPC the instance runs in, when it is not the default one: `vpc_id`,
/// else the subnet's.
async fn configured_vpc(config: &Ec2Config, api: &dyn Ec2Api) -> Result<Option<String>, StepError> {
    if let Some(vpc) = &config.vpc_id {
        return Ok(Some(vpc.clone()));
    }
    let Some(subnet) = &config.subnet_id else {
        return Ok(None);
    };
    let vpc = api.subnet_vpc(subnet).await?;
    vpc.map(Some).ok_or_else(|| {
        StepError::failed(format!(
            "subnet {subnet} does not exist in {}",
            api.region()
        ))
    })
}

/// The IPv4 ranges of the instance's VPC (the default VPC's when no subnet
/// or VPC is configured), for SSH that comes from inside it.
async fn vpc_cidrs(config: &Ec2Config, api: &dyn Ec2Api) -> Result<SshSources, StepError> {
    let region = api.region();
    let vpc = configured_vpc(config, api).await?;
    let vpc = api.vpc_ranges(vpc.as_deref()).await?.ok_or_else(|| {
        StepError::failed(format!(
            "{region} has no default VPC to take the SSH address range from; set `subnet_id` or `vpc_id`"
        ))
    })?;
    let vpc_id = &vpc.vpc_id;
    if vpc.cidrs.is_empty() {
        return Err(StepError::failed(format!(
            "VPC {vpc_id} in {region} reports no IPv4 range"
        )));
    }
    let cidrs = vpc
        .cidrs
        .iter()
        .map(|cidr| Cidr::parse(cidr))
        .collect::<Result<_, _>>()
        .map_err(|err| StepError::failed(format!("VPC {vpc_id} in {region}: {err}")))?;
    Ok(SshSources {
        cidrs,
        origin: format!("the address range of VPC {vpc_id}"),
    })
}

/// Who the temporary security group lets reach SSH, and why them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSources {
    pub cidrs: Vec<Cidr>,
    /// Where the ranges came from, for the log.
    pub origin: String,
}

/// Decides who the temporary security group admits to SSH, before
/// anything is made; `None` when no temporary group is made. Never opens
/// SSH to everyone unless `ssh_cidrs` says so: when the address SSH will
/// come from cannot be known (through `ssh.host`, against another
/// endpoint, or when this machine's public address cannot be learned), it
/// fails, naming `ssh_cidrs`.
pub(super) async fn ssh_sources(
    config: &Ec2Config,
    api: &dyn Ec2Api,
    custom_endpoint: Option<&str>,
    public_address_url: &str,
) -> Result<Option<SshSources>, String> {
    if !config.security_group_ids.is_empty() {
        return Ok(None);
    }
    if !config.ssh_cidrs.is_empty() {
        return Ok(Some(SshSources {
            cidrs: config.ssh_cidrs.clone(),
            origin: "`ssh_cidrs`".to_owned(),
        }));
    }
    let unknown = |why: String| {
        format!(
            "cannot tell where SSH to the build instance will come from: {why}; set `ssh_cidrs` to the address ranges the temporary security group should admit (`ssh_cidrs = [\"0.0.0.0/0\"]` admits anyone)"
        )
    };
    if let Some(host) = &config.ssh.host {
        return Err(unknown(format!(
            "SSH goes through `ssh.host` ({host}), so the instance sees whatever connects from there (a bastion, a port forward)"
        )));
    }
    if config.ssh_interface.is_some_and(|i| !i.is_public()) {
        return vpc_cidrs(config, api)
            .await
            .map(Some)
            .map_err(|err| unknown(err.to_string()));
    }
    if let Some(endpoint) = custom_endpoint {
        return Err(unknown(format!(
            "EC2 is reached through another endpoint ({endpoint}), so this machine's public address says nothing about who connects"
        )));
    }
    match public_address_cidr(public_address_url).await {
        Ok(cidr) => Ok(Some(SshSources {
            cidrs: vec![cidr],
            origin: "this machine's public address".to_owned(),
        })),
        Err(why) => Err(unknown(format!(
            "this machine's public address could not be learned from {public_address_url} ({why})"
        ))),
    }
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
        let sources = plan.ssh_sources.clone().ok_or_else(|| {
            StepError::failed(
                "who may reach SSH was not decided before the temporary security group",
            )
        })?;
        let cidrs = &sources.cidrs;
        let name = plan.temporary_name();
        let region = &plan.region;
        let api = plan.api();
        let vpc_id = configured_vpc(&plan.config, api.as_ref()).await?;

        let id = record(
            cx,
            Ec2Resource::SecurityGroup {
                region: region.clone(),
                endpoint_url: plan.endpoint_url.clone(),
                name: name.clone(),
                group_id: None,
            }
            .into(),
        )?;
        self.created = Some((id, name.clone(), None));
        let group_id = api
            .create_security_group(NewSecurityGroup {
                name: &name,
                description: format!("imgbuild: SSH to the build instance of run {}", plan.run_id),
                vpc_id,
                tags: plan.base_tags(),
            })
            .await?;
        self.created = Some((id, name.clone(), Some(group_id.clone())));
        cx.journal
            .update(
                id,
                Ec2Resource::SecurityGroup {
                    region: region.clone(),
                    endpoint_url: plan.endpoint_url.clone(),
                    name: name.clone(),
                    group_id: Some(group_id.clone()),
                }
                .into(),
            )
            .map_err(StepError::failed)?;

        // `ssh.port` alone means sshd listens there; with `ssh.host` too it
        // is the port of whatever stands in between (a bastion's forward),
        // and the instance still takes SSH on 22.
        let ssh = &plan.config.ssh;
        let port = match (&ssh.host, ssh.port) {
            (None, Some(port)) => port,
            _ => 22,
        };
        api.authorize_tcp_ingress(
            &group_id,
            port,
            cidrs,
            &format!("imgbuild SSH, run {}", plan.run_id),
        )
        .await?;
        cx.log.info(format!(
            "created temporary security group {group_id} ({name}) admitting tcp/{port} from {} ({})",
            cidrs
                .iter()
                .map(Cidr::as_str)
                .collect::<Vec<_>>()
                .join(", "),
            sources.origin
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
            self.plan.api().as_ref(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::ec2::api::fake::{FakeEc2, plan};
    use crate::registry::JournalResource;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn config(extra: serde_json::Value) -> Ec2Config {
        let mut value = serde_json::json!({"instance_type": "t3.micro"});
        for (key, v) in extra.as_object().unwrap() {
            value[key] = v.clone();
        }
        serde_json::from_value(value).unwrap()
    }

    /// The branches tested here decide without calling EC2.
    fn offline_client() -> FakeEc2 {
        FakeEc2::new("us-east-1")
    }

    /// A checkip stand-in answering every request with `body`.
    async fn answering(body: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        url
    }

    /// A URL where nothing listens.
    fn closed_url() -> String {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        format!("http://127.0.0.1:{port}/")
    }

    #[tokio::test]
    async fn an_unknown_public_address_fails_naming_ssh_cidrs_instead_of_opening_ssh() {
        let client = offline_client();
        let url = closed_url();
        let err = ssh_sources(&config(serde_json::json!({})), &client, None, &url)
            .await
            .unwrap_err();
        assert!(err.contains("`ssh_cidrs`"), "{err}");
        assert!(err.contains(&url), "{err}");

        let garbage = answering("<html>not an address</html>").await;
        let err = ssh_sources(&config(serde_json::json!({})), &client, None, &garbage)
            .await
            .unwrap_err();
        assert!(err.contains("not an IPv4 address"), "{err}");
    }

    #[tokio::test]
    async fn a_known_public_address_is_the_only_source() {
        let url = answering("203.0.113.7\n").await;
        let sources = ssh_sources(
            &config(serde_json::json!({})),
            &offline_client(),
            None,
            &url,
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(sources.cidrs, vec!["203.0.113.7/32"]);
    }

    #[tokio::test]
    async fn ssh_through_a_host_or_another_endpoint_needs_ssh_cidrs() {
        // The address lookup would succeed: it must not be what decides.
        let url = answering("203.0.113.7").await;
        let client = offline_client();
        let through_host =
            config(serde_json::json!({"ssh": {"username": "admin", "host": "bastion.example"}}));
        let err = ssh_sources(&through_host, &client, None, &url)
            .await
            .unwrap_err();
        assert!(
            err.contains("`ssh.host` (bastion.example)") && err.contains("`ssh_cidrs`"),
            "{err}"
        );

        let err = ssh_sources(
            &config(serde_json::json!({})),
            &client,
            Some("http://127.0.0.1:5055"),
            &url,
        )
        .await
        .unwrap_err();
        assert!(
            err.contains("http://127.0.0.1:5055") && err.contains("`ssh_cidrs`"),
            "{err}"
        );

        // Explicit ranges, everyone included, are the user's call.
        let open = config(serde_json::json!({
            "ssh_cidrs": ["0.0.0.0/0"],
            "ssh": {"username": "admin", "host": "bastion.example"},
        }));
        let sources = ssh_sources(&open, &client, Some("http://x"), &url)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(sources.cidrs, vec!["0.0.0.0/0"]);
    }

    fn journalled(test: &TestContext) -> Vec<String> {
        test.cx
            .journal
            .outstanding()
            .iter()
            .map(|o| o.resource.describe())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_temporary_group_admits_only_the_planned_cidrs_on_the_ssh_port_and_is_deleted() {
        let fake = FakeEc2::new("eu-west-1");
        let settings = serde_json::json!({
            "ssh_cidrs": ["198.51.100.0/24", "2001:db8::/32"],
            "ssh": {"username": "admin", "port": 2222},
            "subnet_id": "subnet-1",
        });
        let test = TestContext::new("app");
        let mut step = StepSecurityGroup::new(plan(settings, &fake));
        let mut state = Ec2State::default();
        step.run(&mut state, &test.cx).await.unwrap();
        assert_eq!(state.security_group_ids, ["sg-1"]);
        assert_eq!(
            fake.calls(),
            [
                "eu-west-1 DescribeSubnets subnet-1",
                "eu-west-1 CreateSecurityGroup imgbuild-app-unit0123 in vpc-of-subnet-1",
                "eu-west-1 AuthorizeSecurityGroupIngress sg-1 tcp/2222 198.51.100.0/24,2001:db8::/32",
            ]
        );
        // The journal learns the id as soon as EC2 tells it.
        let recorded = test.cx.journal.outstanding();
        assert_eq!(recorded.len(), 1);
        let resource = Ec2Resource::from_resource(&recorded[0].resource);
        assert!(
            matches!(
                resource,
                Some(Ok(Ec2Resource::SecurityGroup { group_id: Some(ref id), .. })) if id == "sg-1"
            ),
            "{resource:?}"
        );

        // The instance has not let go of it yet: cleanup waits, then deletes.
        fake.fail_next(
            "DeleteSecurityGroup",
            Some("DependencyViolation"),
            Some(400),
        );
        step.cleanup(&mut state, &test.cx, CleanupOutcome::Failed)
            .await
            .unwrap();
        let calls = fake.calls();
        assert_eq!(
            calls[3..],
            [
                "eu-west-1 DeleteSecurityGroup sg-1",
                "eu-west-1 DeleteSecurityGroup sg-1"
            ]
        );
        assert!(fake.world.lock().unwrap().groups.is_empty());
        assert!(journalled(&test).is_empty());
    }

    #[tokio::test]
    async fn ssh_through_a_host_is_admitted_on_port_22() {
        // `ssh.port` with `ssh.host` is the port of the host in between.
        let fake = FakeEc2::new("eu-west-1");
        let settings = serde_json::json!({
            "ssh_cidrs": ["10.0.0.0/8"],
            "ssh": {"username": "admin", "host": "bastion.example", "port": 2222},
        });
        let test = TestContext::new("app");
        let mut step = StepSecurityGroup::new(plan(settings, &fake));
        step.run(&mut Ec2State::default(), &test.cx).await.unwrap();
        assert_eq!(
            fake.world
                .lock()
                .unwrap()
                .ingress
                .values()
                .collect::<Vec<_>>(),
            [&(22, vec!["10.0.0.0/8".to_owned()])]
        );
    }

    #[tokio::test]
    async fn a_group_whose_creation_went_unanswered_is_found_by_name_and_deleted() {
        let fake = FakeEc2::new("eu-west-1");
        let test = TestContext::new("app");
        let mut step = StepSecurityGroup::new(plan(serde_json::json!({}), &fake));
        let mut state = Ec2State::default();
        fake.fail_next("CreateSecurityGroup", None, None);
        step.run(&mut state, &test.cx).await.unwrap_err();
        assert_eq!(journalled(&test).len(), 1);
        // EC2 made it after all; the run never learned its id.
        fake.world.lock().unwrap().groups.insert(
            ("eu-west-1".to_owned(), "sg-late".to_owned()),
            "imgbuild-app-unit0123".to_owned(),
        );
        step.cleanup(&mut state, &test.cx, CleanupOutcome::Failed)
            .await
            .unwrap();
        assert_eq!(
            fake.calls()[1..],
            [
                "eu-west-1 DescribeSecurityGroups imgbuild-app-unit0123",
                "eu-west-1 DeleteSecurityGroup sg-late"
            ]
        );
        assert!(journalled(&test).is_empty());
    }

    #[tokio::test]
    async fn existing_groups_are_used_and_nothing_is_made() {
        let fake = FakeEc2::new("eu-west-1");
        let test = TestContext::new("app");
        let settings = serde_json::json!({"security_group_ids": ["sg-ops"]});
        let mut step = StepSecurityGroup::new(plan(settings, &fake));
        let mut state = Ec2State::default();
        step.run(&mut state, &test.cx).await.unwrap();
        assert_eq!(state.security_group_ids, ["sg-ops"]);
        step.cleanup(&mut state, &test.cx, CleanupOutcome::Failed)
            .await
            .unwrap();
        assert!(fake.calls().is_empty(), "{:?}", fake.calls());
    }
}
