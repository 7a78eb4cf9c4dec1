//! The EC2 builder (what Packer calls amazon-ebs): launches an instance
//! from a source AMI, provisions it over SSH, stops it, and snapshots it
//! into a new EBS-backed AMI, copied to other regions and shared as asked.
//!
//! Steps, in order: check that the AMI name is free, resolve the source
//! AMI, key pair, security group, run the instance, connect over SSH,
//! provision, stop the instance, create the AMI, copy it to other regions,
//! set launch permissions. Everything made along the way is recorded in the
//! run journal before the call that makes it; cleanup terminates the
//! instance and deletes the temporary key pair and security group always,
//! and the AMIs (with their snapshots) unless the build succeeded.

mod api;
mod client;
pub mod config;
mod delete;
pub mod kind;
mod poll;
mod ssm;
mod step_check_ami;
mod step_connect;
mod step_copy_regions;
mod step_create_image;
mod step_key_pair;
mod step_launch_permissions;
mod step_run_instance;
mod step_security_group;
mod step_source_ami;
mod step_stop_instance;
mod test_run;

pub use config::{Ec2Config, SourceAmiFilter, SshInterface};

use crate::common::orphans::Removal;
use crate::common::outcome::steps_result;
use crate::common::step_provision::{HasCommunicator, StepProvision};
use crate::common::step_sbom::{SbomTarget, StepSbom};
use crate::{
    Artifact, BuildError, BuildRequest, Builder, ConfigProblem, ImageInfo, PlannedArtifact,
    SourceIdentity,
};
use api::{Ec2Api, Ec2Apis};
use async_trait::async_trait;
use client::{Ec2Clients, RUN_ID_TAG};
use imgbuild_core::{Resource, Step, StepContext, StepError, run_steps};
use imgbuild_provisioners::Communicator;
use imgbuild_provisioners::image_test::{ImageTest, TestResult};
use imgbuild_provisioners::ssh::TemporaryKey;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub struct Ec2Builder {
    config: Ec2Config,
    lookup_timeout: Duration,
}

impl Ec2Builder {
    pub fn new(config: Ec2Config) -> Self {
        Ec2Builder {
            config,
            lookup_timeout: LOOKUP_TIMEOUT,
        }
    }

    /// How long cleanup looks for an instance or AMI whose id the build
    /// never learned ([`LOOKUP_TIMEOUT`] unless changed).
    pub fn with_lookup_timeout(mut self, timeout: Duration) -> Self {
        self.lookup_timeout = timeout;
        self
    }

    fn ami_name(&self, image: &ImageInfo) -> String {
        self.config
            .ami_name
            .clone()
            .unwrap_or_else(|| image.artifact_stem())
    }

    /// Everything the steps share, once the region is known.
    async fn plan(&self, request: &BuildRequest, cx: &StepContext) -> Result<Plan, BuildError> {
        let clients = Ec2Clients::load(
            self.config.region.as_deref(),
            self.config.endpoint_url.as_deref(),
        )
        .await;
        let region = clients.default_region().ok_or_else(|| {
            BuildError::Refused(format!(
                "build {}: no AWS region: set `region` in the builder, or AWS_REGION, or a region in the AWS profile",
                request.build_name
            ))
        })?;
        if let Some(message) = config::region_problem(&region) {
            return Err(BuildError::Refused(format!(
                "the AWS region from the environment: {message}"
            )));
        }
        let ami_name = self.ami_name(&request.image);
        if let Some(message) = config::ami_name_problem(&ami_name) {
            let hint = if self.config.ami_name.is_none() {
                "; the default is `<image name>-<image version>`: set `ami_name` to a name EC2 accepts"
            } else {
                ""
            };
            return Err(BuildError::Refused(format!("{message}{hint}")));
        }
        // Decided before anything is made, so a build that cannot say who
        // may reach SSH makes nothing at all.
        let api = clients.in_region(&region);
        let endpoint = clients.custom_endpoint();
        let sources = cx.cancellable(async {
            step_security_group::ssh_sources(
                &self.config,
                api.as_ref(),
                endpoint.as_deref(),
                step_security_group::CHECKIP_URL,
            )
            .await
            .map_err(StepError::Failed)
        });
        let ssh_sources = match sources.await {
            Ok(sources) => sources,
            Err(StepError::Cancelled) => return Err(BuildError::Cancelled),
            Err(StepError::Failed(message)) => {
                return Err(BuildError::Refused(format!(
                    "build {}: {message}",
                    request.build_name
                )));
            }
        };
        Ok(Plan {
            config: self.config.clone(),
            copy_regions: self.config.copy_regions(&region),
            region,
            endpoint_url: self.config.endpoint_url.clone(),
            // EC2 takes 255 characters; the image's description may be longer.
            ami_description: self.config.ami_description.clone().or_else(|| {
                request
                    .image
                    .description
                    .as_ref()
                    .map(|d| d.chars().take(255).collect())
            }),
            ami_name,
            image: request.image.clone(),
            build_name: request.build_name.clone(),
            run_id: cx.run_id.clone(),
            config_dir: request.config_dir.clone(),
            apis: Arc::new(clients),
            ssh_sources,
            lookup_timeout: self.lookup_timeout,
        })
    }

    fn steps(&self, plan: &Arc<Plan>, request: &BuildRequest) -> Vec<Box<dyn Step<Ec2State>>> {
        let mut steps: Vec<Box<dyn Step<Ec2State>>> = vec![
            Box::new(step_check_ami::StepCheckAmi::new(plan.clone())),
            Box::new(step_source_ami::StepSourceAmi::new(plan.clone())),
            Box::new(step_key_pair::StepKeyPair::new(plan.clone())),
            Box::new(step_security_group::StepSecurityGroup::new(plan.clone())),
            Box::new(step_run_instance::StepRunInstance::new(plan.clone())),
            Box::new(step_connect::StepConnect::new(plan.clone())),
            Box::new(StepProvision::new(request.provisioners.clone())),
        ];
        steps.extend(StepSbom::for_request(
            request,
            "ec2",
            SbomTarget::in_output_dir(request),
        ));
        steps.extend([
            Box::new(step_stop_instance::StepStopInstance::new(plan.clone()))
                as Box<dyn Step<Ec2State>>,
            Box::new(step_create_image::StepCreateImage::new(plan.clone())),
            Box::new(step_copy_regions::StepCopyRegions::new(plan.clone())),
            Box::new(step_launch_permissions::StepLaunchPermissions::new(
                plan.clone(),
            )),
        ]);
        steps
    }
}

/// The build's settings, resolved: region, AMI name, EC2 per region.
pub(crate) struct Plan {
    pub config: Ec2Config,
    pub region: String,
    pub endpoint_url: Option<String>,
    /// `ami_regions` without the build region.
    pub copy_regions: Vec<String>,
    pub ami_name: String,
    pub ami_description: Option<String>,
    pub image: ImageInfo,
    pub build_name: String,
    pub run_id: String,
    pub config_dir: PathBuf,
    /// EC2 as the steps see it, per region.
    pub apis: Arc<dyn Ec2Apis>,
    /// Who the temporary security group admits; `None` with
    /// `security_group_ids`.
    pub ssh_sources: Option<step_security_group::SshSources>,
    /// How long cleanup looks for what was made but whose id was never
    /// learned.
    pub lookup_timeout: Duration,
}

impl Plan {
    /// EC2 in the build region.
    pub fn api(&self) -> Arc<dyn Ec2Api> {
        self.apis.in_region(&self.region)
    }

    /// EC2 in `region`.
    pub fn api_in(&self, region: &str) -> Arc<dyn Ec2Api> {
        self.apis.in_region(region)
    }

    /// The name of a temporary key pair or security group:
    /// `imgbuild-<build>-<run id>`, in the characters both accept.
    pub fn temporary_name(&self) -> String {
        let raw = format!("imgbuild-{}-{}", self.build_name, self.run_id);
        raw.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '-'
                }
            })
            .take(200)
            .collect()
    }

    /// On everything temporary: the run and build it belongs to.
    pub fn base_tags(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (RUN_ID_TAG.to_owned(), self.run_id.clone()),
            ("imgbuild:build".to_owned(), self.build_name.clone()),
        ])
    }

    /// On the instance and its volumes: `run_tags` plus a `Name` (unless
    /// given) and the base tags; the client token goes on separately.
    pub fn run_tags(&self) -> BTreeMap<String, String> {
        let mut tags = BTreeMap::from([(
            "Name".to_owned(),
            format!("imgbuild {} ({})", self.build_name, self.ami_name),
        )]);
        tags.extend(self.config.run_tags.clone());
        tags.extend(self.base_tags());
        tags
    }

    /// On the AMI and every copy; on the snapshots with `snapshot_tags`.
    /// Exactly `config::DEFAULT_AMI_TAG_COUNT` tags of imgbuild's own.
    pub fn artifact_tags(
        &self,
        user: &BTreeMap<String, String>,
        source: &SourceAmi,
    ) -> BTreeMap<String, String> {
        let mut tags = user.clone();
        tags.extend(self.base_tags());
        tags.insert("imgbuild:image".to_owned(), self.image.name.clone());
        tags.insert("imgbuild:version".to_owned(), self.image.version.clone());
        tags.insert(
            "imgbuild:source-ami".to_owned(),
            format!("{}:{}", self.region, source.id),
        );
        tags
    }

    pub fn journal_image(&self, region: &str, image_id: Option<String>) -> Resource {
        kind::Ec2Resource::Image {
            region: region.to_owned(),
            endpoint_url: self.endpoint_url.clone(),
            name: self.ami_name.clone(),
            image_id,
        }
        .into()
    }

    /// The KMS key copies into `region` are encrypted with, if any.
    pub fn copy_kms_key(&self, region: &str) -> Option<String> {
        self.config.region_kms_key_ids.get(region).cloned()
    }

    pub fn instance_timeout(&self) -> Duration {
        self.config.instance_timeout
    }
}

/// The AMI the build starts from.
#[derive(Debug, Clone)]
pub struct SourceAmi {
    pub id: String,
    pub name: Option<String>,
    pub owner: Option<String>,
    pub creation_date: Option<String>,
    pub root_device_name: Option<String>,
}

/// The build instance, as it was when it reached `running`.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    pub id: String,
    pub public_ip: Option<String>,
    pub private_ip: Option<String>,
    pub public_dns: Option<String>,
    pub private_dns: Option<String>,
}

/// One finished AMI.
#[derive(Debug, Clone)]
pub struct AmiInfo {
    pub image_id: String,
    pub snapshot_ids: Vec<String>,
}

/// What the steps hand each other.
#[derive(Default)]
pub struct Ec2State {
    pub source: Option<SourceAmi>,
    /// The key pair the instance is launched with, if any.
    pub key_pair_name: Option<String>,
    pub temporary_key: Option<Arc<TemporaryKey>>,
    pub security_group_ids: Vec<String>,
    pub instance: Option<InstanceInfo>,
    pub communicator: Option<Arc<dyn Communicator>>,
    /// Finished AMIs by region, the build region first to be added.
    pub amis: BTreeMap<String, AmiInfo>,
    /// What a test run's tests found.
    pub test_results: Option<Vec<TestResult>>,
    /// The SBOM documents, for the artifact made after the steps.
    pub sbom: Option<crate::common::step_sbom::SbomRecord>,
}

impl crate::common::step_sbom::HasSbom for Ec2State {
    fn sbom_finished(
        &mut self,
        record: crate::common::step_sbom::SbomRecord,
    ) -> Result<(), crate::common::step_sbom::SbomRecord> {
        self.sbom = Some(record);
        Ok(())
    }
}

// An AMI per step would cost minutes and money: EC2 keeps no steps.
impl crate::common::step_provision::KeepsSteps for Ec2State {}

impl HasCommunicator for Ec2State {
    fn communicator(&self) -> Option<Arc<dyn Communicator>> {
        self.communicator.clone()
    }
}

/// An AMI id is immutable: it names the source exactly.
fn source_identity(plan: &Plan, source: &SourceAmi) -> SourceIdentity {
    SourceIdentity {
        kind: "ami".to_owned(),
        reference: format!("{}:{}", plan.region, source.id),
        sha256: None,
    }
}

fn artifact(plan: &Plan, state: &Ec2State) -> Result<Artifact, String> {
    let source = state.source.as_ref().ok_or("no source AMI was resolved")?;
    let home = state
        .amis
        .get(&plan.region)
        .ok_or_else(|| format!("no AMI was made in {}", plan.region))?;
    let amis: BTreeMap<&str, &str> = state
        .amis
        .iter()
        .map(|(region, ami)| (region.as_str(), ami.image_id.as_str()))
        .collect();
    let snapshots: BTreeMap<&str, &Vec<String>> = state
        .amis
        .iter()
        .map(|(region, ami)| (region.as_str(), &ami.snapshot_ids))
        .collect();
    let mut artifact = Artifact {
        builder: "ec2".to_owned(),
        id: format!("{}:{}", plan.region, home.image_id),
        files: Vec::new(),
        source: source_identity(plan, source),
        details: serde_json::json!({
            "region": plan.region,
            "ami_name": plan.ami_name,
            "amis": amis,
            "snapshots": snapshots,
            "source_ami": {
                "id": source.id,
                "name": source.name,
                "owner": source.owner,
                "creation_date": source.creation_date,
            },
            "instance_type": plan.config.instance_type,
            "encrypted": plan.config.encrypt_boot,
        }),
    };
    if let Some(sbom) = &state.sbom {
        sbom.clone().attach_to(&mut artifact);
    }
    Ok(artifact)
}

/// How to reach an instance left running by `--on-error abort`, and how to
/// get rid of it afterwards. A temporary key is saved next to the run
/// journal, recorded in it, so `imgbuild clean` removes it too.
fn debugging_hint(plan: &Plan, state: &Ec2State, cx: &StepContext) -> String {
    let clean = format!(
        "`imgbuild clean --run {}` terminates it and removes everything else the run made",
        cx.run_id
    );
    let Some(instance) = &state.instance else {
        return format!("what the build made is left for debugging; {clean}");
    };
    let ssh = &plan.config.ssh;
    let host = ssh
        .host
        .clone()
        .or_else(|| step_connect::address(instance, plan.config.ssh_interface).ok())
        .unwrap_or_else(|| "<its address>".to_owned());
    let port = ssh.port.unwrap_or(22);
    let options = "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null";
    let login = match &state.temporary_key {
        Some(key) => {
            let dir = cx.journal.path().parent().unwrap_or(Path::new("."));
            let key_file = dir.join(format!("{}-{}.ssh-key", cx.run_id, plan.build_name));
            let saved =
                crate::common::tracked::TrackedPath::file(cx, key_file.clone()).and_then(|_| {
                    key.write_private_openssh(&key_file)
                        .map_err(StepError::failed)
                });
            match saved {
                Ok(()) => format!(
                    "ssh -i {} -p {port} {options} {}@{host}",
                    key_file.display(),
                    ssh.username
                ),
                Err(err) => format!("(the build's temporary key could not be saved: {err})"),
            }
        }
        None => format!(
            "ssh -p {port} {options} {}@{host} (with the configured credentials)",
            ssh.username
        ),
    };
    format!(
        "instance {} in {} is left as it was for debugging:\n  {login}\n{clean}",
        instance.id, plan.region
    )
}

#[async_trait]
impl Builder for Ec2Builder {
    fn kind(&self) -> &'static str {
        "ec2"
    }

    fn validate(&self, config_dir: &Path) -> Vec<ConfigProblem> {
        self.config.problems(config_dir)
    }

    fn resolved_config(&self) -> serde_json::Value {
        serde_json::to_value(&self.config).unwrap_or_default()
    }

    fn claims(&self, image: &ImageInfo, _config_dir: &Path) -> Vec<String> {
        // Without a region in the config the build region comes from the
        // AWS chain, the same for every build of the config.
        let region = self
            .config
            .region
            .as_deref()
            .unwrap_or("the default region");
        let name = self.ami_name(image);
        std::iter::once(region.to_owned())
            .chain(self.config.copy_regions(region))
            .map(|region| match &self.config.endpoint_url {
                Some(endpoint) => format!("the AMI name {name} in {region} at {endpoint}"),
                None => format!("the AMI name {name} in {region}"),
            })
            .collect()
    }

    fn secrets(&self) -> Vec<String> {
        self.config.ssh.password.iter().cloned().collect()
    }

    fn planned_artifact(&self, image: &ImageInfo, _config_dir: &Path) -> PlannedArtifact {
        let region = self
            .config
            .region
            .as_deref()
            .unwrap_or("the default region");
        let mut description = format!("AMI {} in {region}", self.ami_name(image));
        let copies = self.config.copy_regions(region);
        if !copies.is_empty() {
            description.push_str(&format!(", copied to {}", copies.join(", ")));
        }
        PlannedArtifact {
            description,
            files: Vec::new(),
        }
    }

    async fn resolve_source(
        &self,
        request: &BuildRequest,
        cx: &StepContext,
    ) -> Result<SourceIdentity, BuildError> {
        let plan = Arc::new(self.plan(request, cx).await?);
        let resolving = step_source_ami::StepSourceAmi::new(plan.clone());
        match cx.cancellable(resolving.resolve()).await {
            Ok(source) => Ok(source_identity(&plan, &source)),
            Err(StepError::Cancelled) => Err(BuildError::Cancelled),
            Err(StepError::Failed(message)) => Err(BuildError::Refused(message)),
        }
    }

    async fn preflight(&self, request: &BuildRequest, cx: &StepContext) -> Result<(), BuildError> {
        let plan = self.plan(request, cx).await?;
        let check = cx.cancellable(async { step_check_ami::refuse_existing(&plan).await });
        match check.await {
            Ok(()) => Ok(()),
            Err(StepError::Cancelled) => Err(BuildError::Cancelled),
            Err(StepError::Failed(message)) => Err(BuildError::Refused(message)),
        }
    }

    async fn build(
        &self,
        request: &BuildRequest,
        cx: &StepContext,
    ) -> Result<Artifact, BuildError> {
        let plan = Arc::new(self.plan(request, cx).await?);
        let mut state = Ec2State::default();
        let mut steps = self.steps(&plan, request);
        let mut report = run_steps(&mut steps, &mut state, cx, request.on_error).await;
        if report.left_for_debugging {
            cx.log.warn(debugging_hint(&plan, &state, cx));
        }
        steps_result(&mut report)?;
        artifact(&plan, &state).map_err(|message| BuildError::Failed {
            step: "create_image".into(),
            message,
        })
    }

    async fn test_artifact(
        &self,
        request: &BuildRequest,
        artifact: &Artifact,
        tests: &[ImageTest],
        cx: &StepContext,
    ) -> Result<Vec<TestResult>, BuildError> {
        let amis = test_run::RecordedAmis::of(artifact)?;
        if tests.is_empty() {
            return Ok(Vec::new());
        }
        let plan = Arc::new(test_run::test_plan(self.plan(request, cx).await?, &amis));
        test_run::run(&plan, &amis, tests, request.on_error, cx).await
    }

    /// Every region's AMI (deregistered with its snapshots), and the SBOM
    /// documents.
    fn unrecorded(&self, artifact: &Artifact) -> Vec<Resource> {
        let mut resources = crate::common::artifact::file_resources(artifact);
        if let Ok(amis) = test_run::RecordedAmis::of(artifact) {
            resources.extend(amis.amis.iter().map(|(region, image_id)| {
                Resource::from(kind::Ec2Resource::Image {
                    region: region.clone(),
                    endpoint_url: self.config.endpoint_url.clone(),
                    name: amis.ami_name.clone(),
                    image_id: Some(image_id.clone()),
                })
            }));
        }
        resources
    }

    async fn delete_artifact(
        &self,
        artifact: &Artifact,
        cx: &StepContext,
    ) -> Result<(), BuildError> {
        let amis = test_run::RecordedAmis::of(artifact)?;
        let endpoint_url = self.config.endpoint_url.as_deref();
        let clients = Ec2Clients::load(Some(&amis.region), endpoint_url).await;
        delete::delete(&clients, &amis, endpoint_url, self.lookup_timeout, cx).await?;
        remove_documents(artifact, cx)
            .await
            .map_err(|message| BuildError::Failed {
                step: "delete".to_owned(),
                message,
            })?;
        Ok(())
    }
}

/// Publishes a recorded AMI (every region's copy) as the SSM parameter
/// `parameter`.
pub(crate) async fn publish_channel(
    artifact: &crate::registry::RecordedArtifact<'_>,
    parameter: &str,
) -> Result<Vec<String>, String> {
    let amis: std::collections::BTreeMap<String, String> = artifact.details["amis"]
        .as_object()
        .map(|amis| {
            amis.iter()
                .filter_map(|(region, ami)| Some((region.clone(), ami.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    if amis.is_empty() {
        return Err(format!(
            "the record of {} lists no AMI (`details.amis`); nothing to publish",
            artifact.artifact_id
        ));
    }
    ssm::publish(&amis, parameter).await
}

/// The recorded AMIs (every region's copy) that are gone or no longer
/// available.
pub(crate) async fn missing(artifact: &Artifact) -> Result<Vec<String>, String> {
    let amis = test_run::RecordedAmis::of(artifact).map_err(|err| err.to_string())?;
    let clients = Ec2Clients::load(Some(&amis.region), None).await;
    missing_in(&clients, &amis).await
}

async fn missing_in(
    apis: &dyn Ec2Apis,
    amis: &test_run::RecordedAmis,
) -> Result<Vec<String>, String> {
    let mut missing = Vec::new();
    for (region, ami) in &amis.amis {
        let found = apis
            .in_region(region)
            .describe_image(ami)
            .await
            .map_err(|err| format!("cannot look for {ami} in {region}: {err}"))?;
        match found {
            Some(image) if image.state == "available" => {}
            Some(image) => missing.push(format!("{region}:{ami} ({})", image.state)),
            None => missing.push(format!("{region}:{ami}")),
        }
    }
    Ok(missing)
}

/// `imgbuild retire` of a recorded AMI: what `on_test_failure = "delete"`
/// does, from the record alone.
pub(crate) async fn retire(artifact: &Artifact, cx: &StepContext) -> Result<Vec<String>, String> {
    let amis = test_run::RecordedAmis::of(artifact).map_err(|err| err.to_string())?;
    let clients = Ec2Clients::load(Some(&amis.region), None).await;
    let endpoint_url = clients.custom_endpoint();
    delete::delete(&clients, &amis, endpoint_url.as_deref(), LOOKUP_TIMEOUT, cx)
        .await
        .map_err(|err| err.to_string())?;
    let documents = remove_documents(artifact, cx).await?;
    Ok(amis
        .amis
        .iter()
        .flat_map(|(region, ami)| {
            let snapshots = amis.snapshots.get(region).cloned().unwrap_or_default();
            std::iter::once(format!("{region}:{ami}"))
                .chain(snapshots.into_iter().map(move |s| format!("{region}:{s}")))
        })
        .chain(documents)
        .collect())
}

/// The SBOM documents written beside the AMIs' record, which describe
/// nothing once the AMIs are gone.
async fn remove_documents(artifact: &Artifact, cx: &StepContext) -> Result<Vec<String>, String> {
    let removed = crate::common::artifact::remove_recorded_files(&artifact.files).await?;
    for path in &removed {
        cx.log.info(format!("removed {path}"));
    }
    Ok(removed)
}

/// How long `imgbuild clean` waits for an instance to terminate or a
/// security group to become deletable.
const ORPHAN_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// How long cleanup looks for an instance or AMI whose id was never
/// learned (the run died or was cancelled during RunInstances, CreateImage
/// or CopyImage) before giving up for now: EC2's tag filters lag behind
/// launches by seconds, rarely by a minute.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Removes an EC2 resource the dead run `run_id` left behind, from its
/// journal entry alone; [`clean_orphan_within`] with [`LOOKUP_TIMEOUT`].
pub async fn clean_orphan(resource: &Resource, run_id: &str) -> Result<Removal, String> {
    clean_orphan_within(resource, run_id, LOOKUP_TIMEOUT).await
}

/// Removes an EC2 resource the dead run `run_id` left behind, from its
/// journal entry alone. Something already gone counts as removed. An
/// instance or AMI whose id was never learned is looked up for up to
/// `lookup` (an instance by its client token, an AMI by name; both only
/// among those tagged with `run_id`, so a later run's are never touched);
/// when none shows up it is [`Removal::Absent`], and the journal's grace
/// period decides whether the record stays for the next `imgbuild clean`
/// (its create may still complete) or is let go.
pub async fn clean_orphan_within(
    resource: &Resource,
    run_id: &str,
    lookup: Duration,
) -> Result<Removal, String> {
    use crate::registry::JournalResource;
    use kind::Ec2Resource;
    let Some(resource) = Ec2Resource::from_resource(resource) else {
        return Err(format!("{} is not an EC2 resource", resource.describe()));
    };
    let resource = resource?;
    let (region, endpoint_url) = resource.place();
    let clients = Ec2Clients::load(Some(region), endpoint_url).await;
    let api = clients.in_region(region);
    let text = |err: StepError| err.to_string();
    match &resource {
        Ec2Resource::Instance {
            client_token,
            instance_id: None,
            ..
        } => {
            let launch = step_run_instance::Launch {
                instance_id: None,
                client_token,
                run_id,
                lookup,
            };
            let Some(ids) = step_run_instance::find_launched(api.as_ref(), &launch)
                .await
                .map_err(text)?
            else {
                return Ok(Removal::Absent);
            };
            for id in &ids {
                let launch = step_run_instance::Launch {
                    instance_id: Some(id),
                    ..launch
                };
                step_run_instance::terminate(api.as_ref(), &launch, ORPHAN_TIMEOUT, None)
                    .await
                    .map_err(text)?;
            }
            return Ok(Removal::Removed);
        }
        Ec2Resource::Image {
            name,
            image_id: None,
            ..
        } => {
            let Some(ids) =
                step_create_image::look_up_own(api.as_ref(), name, Some(run_id), lookup, None)
                    .await
                    .map_err(text)?
            else {
                return Ok(Removal::Absent);
            };
            for id in &ids {
                step_create_image::deregister(
                    api.as_ref(),
                    Some(id),
                    name,
                    Some(run_id),
                    lookup,
                    None,
                )
                .await
                .map_err(text)?;
            }
            return Ok(Removal::Removed);
        }
        _ => {}
    }
    let result = match &resource {
        Ec2Resource::Instance {
            client_token,
            instance_id,
            ..
        } => step_run_instance::terminate(
            api.as_ref(),
            &step_run_instance::Launch {
                instance_id: instance_id.as_deref(),
                client_token,
                run_id,
                lookup,
            },
            ORPHAN_TIMEOUT,
            None,
        )
        .await
        .map(|_| ()),
        Ec2Resource::KeyPair { name, .. } => step_key_pair::delete_key_pair(api.as_ref(), name)
            .await
            .map_err(StepError::from),
        Ec2Resource::SecurityGroup { name, group_id, .. } => {
            step_security_group::delete_group(
                api.as_ref(),
                group_id.as_deref(),
                name,
                ORPHAN_TIMEOUT,
                None,
            )
            .await
        }
        Ec2Resource::Image { name, image_id, .. } => {
            step_create_image::deregister(
                api.as_ref(),
                image_id.as_deref(),
                name,
                Some(run_id),
                lookup,
                None,
            )
            .await
        }
    };
    result.map(|()| Removal::Removed).map_err(text)
}

#[cfg(test)]
mod tests {
    use super::api::fake::FakeEc2;
    use super::*;

    #[tokio::test]
    async fn an_ami_deregistered_or_failed_in_any_region_is_missing() {
        let fake = FakeEc2::new("eu-west-1")
            .with_image("eu-west-1", "app-1.0", "ami-home")
            .with_image("us-east-1", "app-1.0", "ami-copy")
            .with_image("eu-central-1", "app-1.0", "ami-failed");
        fake.world
            .lock()
            .unwrap()
            .amis
            .get_mut(&("eu-central-1".to_owned(), "ami-failed".to_owned()))
            .unwrap()
            .state = "failed".to_owned();
        let recorded = |amis: &[(&str, &str)]| test_run::RecordedAmis {
            region: "eu-west-1".to_owned(),
            ami_name: "app-1.0".to_owned(),
            amis: amis
                .iter()
                .map(|(region, ami)| (region.to_string(), ami.to_string()))
                .collect(),
            snapshots: Default::default(),
        };
        let present = recorded(&[("eu-west-1", "ami-home"), ("us-east-1", "ami-copy")]);
        assert!(missing_in(&fake, &present).await.unwrap().is_empty());
        let partly = recorded(&[
            ("eu-west-1", "ami-home"),
            ("us-east-1", "ami-gone"),
            ("eu-central-1", "ami-failed"),
        ]);
        assert_eq!(
            missing_in(&fake, &partly).await.unwrap(),
            ["eu-central-1:ami-failed (failed)", "us-east-1:ami-gone"]
        );
    }
}
