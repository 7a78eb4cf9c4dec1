//! What the EC2 steps ask of EC2, behind a trait so their logic can be
//! tested without EC2 (or moto); [`SdkEc2`] calls the real API for one
//! region. Calls answer in imgbuild's terms and fail with [`AwsError`], so
//! the steps keep deciding what an error code means (a key pair already
//! gone, a group still in use).

use super::client::{
    AwsError, AwsResultExt, CLIENT_TOKEN_TAG, Ec2Clients, RUN_ID_TAG, filter, tag_spec, tags,
};
use async_trait::async_trait;
use aws_sdk_ec2::Client;
use aws_sdk_ec2::primitives::Blob;
use aws_sdk_ec2::types::{
    BlockDeviceMapping, DeviceType, EbsBlockDevice, IamInstanceProfileSpecification, Image,
    Instance, InstanceNetworkInterfaceSpecification, InstanceType, IpPermission, IpRange,
    Ipv6Range, LaunchPermission, LaunchPermissionModifications, PermissionGroup, ResourceType,
    VolumeType, VpcCidrBlockStateCode,
};
use imgbuild_core::Cidr;
use std::collections::BTreeMap;
use std::sync::Arc;

/// An AMI this account owns, as DescribeImages lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnImage {
    pub image_id: String,
    pub state: String,
}

/// A VPC and its associated IPv4 ranges (the primary one when EC2 lists
/// no associations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VpcRanges {
    pub vpc_id: String,
    pub cidrs: Vec<String>,
}

/// An AMI a build may start from, as DescribeImages lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceImage {
    pub image_id: String,
    pub name: Option<String>,
    pub owner: Option<String>,
    /// ISO 8601; one format, so these sort as strings.
    pub creation_date: Option<String>,
    pub root_device_name: Option<String>,
    pub state: Option<String>,
    pub instance_store: bool,
}

/// What DescribeImages says about one AMI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageDescription {
    pub state: String,
    /// EC2's "code: message" for a failed AMI.
    pub reason: Option<String>,
    /// The EBS snapshots behind it.
    pub snapshot_ids: Vec<String>,
}

/// A CopyImage into the region of the [`Ec2Api`] it is handed to.
#[derive(Debug, Clone)]
pub struct NewCopy<'a> {
    pub source_image_id: &'a str,
    pub source_region: &'a str,
    pub name: &'a str,
    pub description: Option<String>,
    /// The same on every retry, so a retried call never makes two copies.
    pub client_token: String,
    /// Encrypted with this KMS key (the account default when `None`).
    pub encrypt_with: Option<Option<String>>,
    pub tags: BTreeMap<String, String>,
}

/// What DescribeInstances says about one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceDescription {
    pub state: String,
    /// Why it is in that state, as EC2 explains it.
    pub reason: Option<String>,
    pub public_ip: Option<String>,
    pub private_ip: Option<String>,
    pub public_dns: Option<String>,
    pub private_dns: Option<String>,
    pub availability_zone: Option<String>,
}

/// The root volume of a new instance, when anything about it is set.
#[derive(Debug, Clone)]
pub struct RootVolume {
    pub device_name: String,
    pub size_gib: Option<i32>,
    pub volume_type: Option<String>,
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
}

/// One RunInstances of a single instance.
#[derive(Debug, Clone, Default)]
pub struct NewInstance {
    pub image_id: String,
    pub instance_type: String,
    /// The same on every retry, so a retried call never launches two.
    pub client_token: String,
    pub key_name: Option<String>,
    /// Base64, as EC2 wants it.
    pub user_data: Option<String>,
    pub root_volume: Option<RootVolume>,
    pub instance_tags: BTreeMap<String, String>,
    pub volume_tags: BTreeMap<String, String>,
    /// A name, or an ARN.
    pub iam_instance_profile: Option<String>,
    pub associate_public_ip: Option<bool>,
    pub subnet_id: Option<String>,
    pub security_group_ids: Vec<String>,
}

/// One temporary security group to make.
#[derive(Debug, Clone)]
pub struct NewSecurityGroup<'a> {
    pub name: &'a str,
    pub description: String,
    pub vpc_id: Option<String>,
    pub tags: BTreeMap<String, String>,
}

/// The EC2 calls of the steps, in one region.
#[async_trait]
pub trait Ec2Api: Send + Sync {
    fn region(&self) -> &str;

    /// Any AMI this account may see, by id; `None` when there is none.
    async fn source_image(&self, image_id: &str) -> Result<Option<SourceImage>, AwsError>;

    /// Every available AMI owned by one of `owners` that matches all of
    /// `filters` (DescribeImages filters, by name), all pages.
    async fn available_images(
        &self,
        owners: &[String],
        filters: &BTreeMap<String, String>,
    ) -> Result<Vec<SourceImage>, AwsError>;

    /// AMIs this account owns named exactly `name`.
    async fn own_images_named(&self, name: &str) -> Result<Vec<OwnImage>, AwsError>;

    /// Fails with `InvalidKeyPair.NotFound` when there is no such key pair.
    async fn describe_key_pair(&self, name: &str) -> Result<(), AwsError>;

    async fn import_key_pair(
        &self,
        name: &str,
        public_openssh: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<(), AwsError>;

    async fn delete_key_pair(&self, name: &str) -> Result<(), AwsError>;

    /// The VPC of `subnet_id`; `None` when EC2 lists no such subnet.
    async fn subnet_vpc(&self, subnet_id: &str) -> Result<Option<String>, AwsError>;

    /// `vpc_id`, or the default VPC when `None`; `None` when there is none.
    async fn vpc_ranges(&self, vpc_id: Option<&str>) -> Result<Option<VpcRanges>, AwsError>;

    /// The id of the group named exactly `name`, if any.
    async fn security_group_id(&self, name: &str) -> Result<Option<String>, AwsError>;

    /// Makes the group and returns its id.
    async fn create_security_group(&self, group: NewSecurityGroup<'_>) -> Result<String, AwsError>;

    /// Admits TCP on `port` from `cidrs` (IPv4 and IPv6), each rule
    /// described with `description`.
    async fn authorize_tcp_ingress(
        &self,
        group_id: &str,
        port: u16,
        cidrs: &[Cidr],
        description: &str,
    ) -> Result<(), AwsError>;

    async fn delete_security_group(&self, group_id: &str) -> Result<(), AwsError>;

    /// `None` when EC2 does not (yet, or any more) know the AMI.
    async fn describe_image(&self, image_id: &str) -> Result<Option<ImageDescription>, AwsError>;

    /// Ids of the AMIs named `name` that imgbuild made: tagged with
    /// `run_id` when given, with any run id otherwise.
    async fn own_images_of_run(
        &self,
        name: &str,
        run_id: Option<&str>,
    ) -> Result<Vec<String>, AwsError>;

    /// Snapshots the instance into an AMI; returns its id.
    async fn create_image(
        &self,
        instance_id: &str,
        name: &str,
        description: Option<String>,
        tags: &BTreeMap<String, String>,
    ) -> Result<String, AwsError>;

    /// Starts a copy into this region; returns the copy's id.
    async fn copy_image(&self, copy: NewCopy<'_>) -> Result<String, AwsError>;

    async fn create_tags(
        &self,
        resources: &[String],
        tags: &BTreeMap<String, String>,
    ) -> Result<(), AwsError>;

    async fn deregister_image(&self, image_id: &str) -> Result<(), AwsError>;

    /// Snapshots this account owns whose description names `image_id`.
    async fn snapshots_described_for(&self, image_id: &str) -> Result<Vec<String>, AwsError>;

    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), AwsError>;

    /// Launches one instance; returns its id.
    async fn run_instance(&self, instance: NewInstance) -> Result<String, AwsError>;

    /// `None` when EC2 does not know the instance.
    async fn describe_instance(
        &self,
        instance_id: &str,
    ) -> Result<Option<InstanceDescription>, AwsError>;

    /// Instances tagged with `run_id` and `client_token`, terminated ones
    /// included, as (id, state).
    async fn instances_launched_with(
        &self,
        run_id: &str,
        client_token: &str,
    ) -> Result<Vec<(String, String)>, AwsError>;

    async fn stop_instance(&self, instance_id: &str) -> Result<(), AwsError>;

    async fn terminate_instances(&self, instance_ids: &[String]) -> Result<(), AwsError>;

    /// Lets the accounts `users` and the groups `groups` (`all`) launch
    /// `image_id`.
    async fn add_launch_permissions(
        &self,
        image_id: &str,
        users: &[String],
        groups: &[String],
    ) -> Result<(), AwsError>;
}

fn source_image(image: &Image) -> SourceImage {
    SourceImage {
        image_id: image.image_id().unwrap_or_default().to_owned(),
        name: image.name().map(str::to_owned),
        owner: image.owner_id().map(str::to_owned),
        creation_date: image.creation_date().map(str::to_owned),
        root_device_name: image.root_device_name().map(str::to_owned),
        state: image.state().map(|state| state.as_str().to_owned()),
        instance_store: image.root_device_type() == Some(&DeviceType::InstanceStore),
    }
}

fn instance_state(instance: &Instance) -> &str {
    instance
        .state()
        .and_then(|s| s.name())
        .map(|n| n.as_str())
        .unwrap_or("unknown")
}

/// Hands out an [`Ec2Api`] per region.
pub trait Ec2Apis: Send + Sync {
    fn in_region(&self, region: &str) -> Arc<dyn Ec2Api>;
}

impl Ec2Apis for Ec2Clients {
    fn in_region(&self, region: &str) -> Arc<dyn Ec2Api> {
        Arc::new(SdkEc2::new(self.get(region), region))
    }
}

/// The real EC2 (or whatever `endpoint_url` points at) in one region.
pub struct SdkEc2 {
    client: Client,
    region: String,
}

impl SdkEc2 {
    pub fn new(client: Client, region: &str) -> Self {
        SdkEc2 {
            client,
            region: region.to_owned(),
        }
    }

    /// A successful answer without the id of what was made: something
    /// may have been made, so this is no refusal.
    fn no_id(&self, operation: &'static str, what: &str) -> AwsError {
        AwsError {
            operation,
            region: self.region.clone(),
            code: None,
            message: format!("the answer holds no {what} id"),
            request_id: None,
            status: Some(200),
        }
    }
}

#[async_trait]
impl Ec2Api for SdkEc2 {
    fn region(&self) -> &str {
        &self.region
    }

    async fn source_image(&self, image_id: &str) -> Result<Option<SourceImage>, AwsError> {
        let result = self
            .client
            .describe_images()
            .image_ids(image_id)
            .send()
            .await
            .aws("DescribeImages", &self.region);
        match result {
            Ok(output) => Ok(output.images().first().map(source_image)),
            Err(err) if err.is("InvalidAMIID.NotFound") => Ok(None),
            Err(err) => Err(err),
        }
    }

    async fn available_images(
        &self,
        owners: &[String],
        filters: &BTreeMap<String, String>,
    ) -> Result<Vec<SourceImage>, AwsError> {
        let mut images = Vec::new();
        let mut next_token: Option<String> = None;
        loop {
            let mut request = self
                .client
                .describe_images()
                .set_owners(Some(owners.to_vec()))
                .filters(filter("state", "available"))
                .set_next_token(next_token.take());
            for (name, value) in filters {
                request = request.filters(filter(name, value));
            }
            let output = request.send().await.aws("DescribeImages", &self.region)?;
            images.extend(output.images().iter().map(source_image));
            match output.next_token() {
                Some(token) if !token.is_empty() => next_token = Some(token.to_owned()),
                _ => break,
            }
        }
        Ok(images)
    }

    async fn own_images_named(&self, name: &str) -> Result<Vec<OwnImage>, AwsError> {
        let output = self
            .client
            .describe_images()
            .owners("self")
            .filters(filter("name", name))
            .send()
            .await
            .aws("DescribeImages", &self.region)?;
        Ok(output
            .images()
            .iter()
            // The name filter is a wildcard pattern; `*` and `?` are not
            // allowed in AMI names, but compare exactly all the same.
            .filter(|image| image.name() == Some(name))
            .filter_map(|image| {
                Some(OwnImage {
                    image_id: image.image_id()?.to_owned(),
                    state: image
                        .state()
                        .map(|s| s.as_str().to_owned())
                        .unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn describe_key_pair(&self, name: &str) -> Result<(), AwsError> {
        self.client
            .describe_key_pairs()
            .key_names(name)
            .send()
            .await
            .aws("DescribeKeyPairs", &self.region)
            .map(|_| ())
    }

    async fn import_key_pair(
        &self,
        name: &str,
        public_openssh: &str,
        tags: &BTreeMap<String, String>,
    ) -> Result<(), AwsError> {
        self.client
            .import_key_pair()
            .key_name(name)
            .public_key_material(Blob::new(public_openssh.as_bytes()))
            .tag_specifications(tag_spec(ResourceType::KeyPair, tags))
            .send()
            .await
            .aws("ImportKeyPair", &self.region)
            .map(|_| ())
    }

    async fn delete_key_pair(&self, name: &str) -> Result<(), AwsError> {
        self.client
            .delete_key_pair()
            .key_name(name)
            .send()
            .await
            .aws("DeleteKeyPair", &self.region)
            .map(|_| ())
    }

    async fn subnet_vpc(&self, subnet_id: &str) -> Result<Option<String>, AwsError> {
        let output = self
            .client
            .describe_subnets()
            .subnet_ids(subnet_id)
            .send()
            .await
            .aws("DescribeSubnets", &self.region)?;
        Ok(output
            .subnets()
            .first()
            .and_then(|s| s.vpc_id())
            .map(str::to_owned))
    }

    async fn vpc_ranges(&self, vpc_id: Option<&str>) -> Result<Option<VpcRanges>, AwsError> {
        let request = self.client.describe_vpcs();
        let request = match vpc_id {
            Some(vpc) => request.vpc_ids(vpc),
            None => request.filters(filter("is-default", "true")),
        };
        let output = request.send().await.aws("DescribeVpcs", &self.region)?;
        let Some(vpc) = output.vpcs().first() else {
            return Ok(None);
        };
        let mut cidrs: Vec<String> = vpc
            .cidr_block_association_set()
            .iter()
            .filter(|block| {
                block.cidr_block_state().and_then(|state| state.state())
                    == Some(&VpcCidrBlockStateCode::Associated)
            })
            .filter_map(|block| block.cidr_block())
            .map(str::to_owned)
            .collect();
        if cidrs.is_empty() {
            cidrs.extend(vpc.cidr_block().map(str::to_owned));
        }
        Ok(Some(VpcRanges {
            vpc_id: vpc.vpc_id().unwrap_or("(no id)").to_owned(),
            cidrs,
        }))
    }

    async fn security_group_id(&self, name: &str) -> Result<Option<String>, AwsError> {
        let output = self
            .client
            .describe_security_groups()
            .filters(filter("group-name", name))
            .send()
            .await
            .aws("DescribeSecurityGroups", &self.region)?;
        Ok(output
            .security_groups()
            .iter()
            .find(|group| group.group_name() == Some(name))
            .and_then(|group| group.group_id().map(str::to_owned)))
    }

    async fn create_security_group(&self, group: NewSecurityGroup<'_>) -> Result<String, AwsError> {
        let output = self
            .client
            .create_security_group()
            .group_name(group.name)
            .description(group.description)
            .set_vpc_id(group.vpc_id)
            .tag_specifications(tag_spec(ResourceType::SecurityGroup, &group.tags))
            .send()
            .await
            .aws("CreateSecurityGroup", &self.region)?;
        output
            .group_id()
            .map(str::to_owned)
            .ok_or_else(|| AwsError {
                operation: "CreateSecurityGroup",
                region: self.region.clone(),
                code: None,
                message: "the answer holds no group id".to_owned(),
                request_id: None,
                status: None,
            })
    }

    async fn authorize_tcp_ingress(
        &self,
        group_id: &str,
        port: u16,
        cidrs: &[Cidr],
        description: &str,
    ) -> Result<(), AwsError> {
        let mut permission = IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(i32::from(port))
            .to_port(i32::from(port));
        for cidr in cidrs {
            permission = if cidr.address().is_ipv4() {
                permission.ip_ranges(
                    IpRange::builder()
                        .cidr_ip(cidr.as_str())
                        .description(description)
                        .build(),
                )
            } else {
                permission.ipv6_ranges(
                    Ipv6Range::builder()
                        .cidr_ipv6(cidr.as_str())
                        .description(description)
                        .build(),
                )
            };
        }
        self.client
            .authorize_security_group_ingress()
            .group_id(group_id)
            .ip_permissions(permission.build())
            .send()
            .await
            .aws("AuthorizeSecurityGroupIngress", &self.region)
            .map(|_| ())
    }

    async fn delete_security_group(&self, group_id: &str) -> Result<(), AwsError> {
        self.client
            .delete_security_group()
            .group_id(group_id)
            .send()
            .await
            .aws("DeleteSecurityGroup", &self.region)
            .map(|_| ())
    }

    async fn describe_image(&self, image_id: &str) -> Result<Option<ImageDescription>, AwsError> {
        let result = self
            .client
            .describe_images()
            .image_ids(image_id)
            .send()
            .await
            .aws("DescribeImages", &self.region);
        let output = match result {
            Ok(output) => output,
            Err(err) if err.is("InvalidAMIID.NotFound") || err.is("InvalidAMIID.Unavailable") => {
                return Ok(None);
            }
            Err(err) => return Err(err),
        };
        Ok(output.images().first().map(|image| ImageDescription {
            state: image
                .state()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_else(|| "unknown".to_owned()),
            reason: image.state_reason().map(|reason| {
                format!(
                    "{}: {}",
                    reason.code().unwrap_or("no code"),
                    reason.message().unwrap_or("no message")
                )
            }),
            snapshot_ids: image
                .block_device_mappings()
                .iter()
                .filter_map(|mapping| mapping.ebs().and_then(|ebs| ebs.snapshot_id()))
                .map(str::to_owned)
                .collect(),
        }))
    }

    async fn own_images_of_run(
        &self,
        name: &str,
        run_id: Option<&str>,
    ) -> Result<Vec<String>, AwsError> {
        let tag_filter = match run_id {
            Some(run_id) => filter(&format!("tag:{RUN_ID_TAG}"), run_id),
            None => filter("tag-key", RUN_ID_TAG),
        };
        let output = self
            .client
            .describe_images()
            .owners("self")
            .filters(filter("name", name))
            .filters(tag_filter)
            .send()
            .await
            .aws("DescribeImages", &self.region)?;
        Ok(output
            .images()
            .iter()
            .filter(|image| image.name() == Some(name))
            .filter_map(|image| image.image_id().map(str::to_owned))
            .collect())
    }

    async fn create_image(
        &self,
        instance_id: &str,
        name: &str,
        description: Option<String>,
        tags: &BTreeMap<String, String>,
    ) -> Result<String, AwsError> {
        let output = self
            .client
            .create_image()
            .instance_id(instance_id)
            .name(name)
            .set_description(description)
            .tag_specifications(tag_spec(ResourceType::Image, tags))
            .send()
            .await
            .aws("CreateImage", &self.region)?;
        output
            .image_id()
            .map(str::to_owned)
            .ok_or_else(|| self.no_id("CreateImage", "image"))
    }

    async fn copy_image(&self, copy: NewCopy<'_>) -> Result<String, AwsError> {
        let mut request = self
            .client
            .copy_image()
            .source_image_id(copy.source_image_id)
            .source_region(copy.source_region)
            .name(copy.name)
            .set_description(copy.description)
            .client_token(copy.client_token)
            .tag_specifications(tag_spec(ResourceType::Image, &copy.tags));
        if let Some(kms_key) = copy.encrypt_with {
            request = request.encrypted(true).set_kms_key_id(kms_key);
        }
        let output = request.send().await.aws("CopyImage", &self.region)?;
        output
            .image_id()
            .map(str::to_owned)
            .ok_or_else(|| self.no_id("CopyImage", "image"))
    }

    async fn create_tags(
        &self,
        resources: &[String],
        values: &BTreeMap<String, String>,
    ) -> Result<(), AwsError> {
        self.client
            .create_tags()
            .set_resources(Some(resources.to_vec()))
            .set_tags(Some(tags(values)))
            .send()
            .await
            .aws("CreateTags", &self.region)
            .map(|_| ())
    }

    async fn deregister_image(&self, image_id: &str) -> Result<(), AwsError> {
        self.client
            .deregister_image()
            .image_id(image_id)
            .send()
            .await
            .aws("DeregisterImage", &self.region)
            .map(|_| ())
    }

    async fn snapshots_described_for(&self, image_id: &str) -> Result<Vec<String>, AwsError> {
        let output = self
            .client
            .describe_snapshots()
            .owner_ids("self")
            .filters(filter("description", format!("*{image_id}*")))
            .send()
            .await
            .aws("DescribeSnapshots", &self.region)?;
        Ok(output
            .snapshots()
            .iter()
            .filter_map(|s| s.snapshot_id().map(str::to_owned))
            .collect())
    }

    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), AwsError> {
        self.client
            .delete_snapshot()
            .snapshot_id(snapshot_id)
            .send()
            .await
            .aws("DeleteSnapshot", &self.region)
            .map(|_| ())
    }

    async fn run_instance(&self, new: NewInstance) -> Result<String, AwsError> {
        let root_volume = new.root_volume.map(|root| {
            let ebs = EbsBlockDevice::builder()
                .delete_on_termination(true)
                .set_volume_size(root.size_gib)
                .set_volume_type(root.volume_type.as_deref().map(VolumeType::from))
                .set_encrypted(root.encrypted.then_some(true))
                .set_kms_key_id(root.kms_key_id)
                .build();
            BlockDeviceMapping::builder()
                .device_name(root.device_name)
                .ebs(ebs)
                .build()
        });
        let mut request = self
            .client
            .run_instances()
            .image_id(new.image_id)
            .instance_type(InstanceType::from(new.instance_type.as_str()))
            .min_count(1)
            .max_count(1)
            .client_token(new.client_token)
            .set_key_name(new.key_name)
            .set_user_data(new.user_data)
            .set_block_device_mappings(root_volume.map(|mapping| vec![mapping]))
            .tag_specifications(tag_spec(ResourceType::Instance, &new.instance_tags))
            .tag_specifications(tag_spec(ResourceType::Volume, &new.volume_tags));
        if let Some(profile) = &new.iam_instance_profile {
            let spec = IamInstanceProfileSpecification::builder();
            let spec = if profile.starts_with("arn:") {
                spec.arn(profile)
            } else {
                spec.name(profile)
            };
            request = request.iam_instance_profile(spec.build());
        }
        request = match new.associate_public_ip {
            // A public IP choice can only be made on a network interface,
            // which then carries the subnet and groups too.
            Some(public) => request.network_interfaces(
                InstanceNetworkInterfaceSpecification::builder()
                    .device_index(0)
                    .associate_public_ip_address(public)
                    .delete_on_termination(true)
                    .set_subnet_id(new.subnet_id)
                    .set_groups(Some(new.security_group_ids))
                    .build(),
            ),
            None => request
                .set_subnet_id(new.subnet_id)
                .set_security_group_ids(Some(new.security_group_ids)),
        };
        let output = request.send().await.aws("RunInstances", &self.region)?;
        output
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .map(str::to_owned)
            .ok_or_else(|| self.no_id("RunInstances", "instance"))
    }

    async fn describe_instance(
        &self,
        instance_id: &str,
    ) -> Result<Option<InstanceDescription>, AwsError> {
        let result = self
            .client
            .describe_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .aws("DescribeInstances", &self.region);
        let output = match result {
            Ok(output) => output,
            Err(err) if err.is("InvalidInstanceID.NotFound") => return Ok(None),
            Err(err) => return Err(err),
        };
        let nonempty = |text: Option<&str>| text.filter(|t| !t.is_empty()).map(str::to_owned);
        Ok(output
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .find(|i| i.instance_id() == Some(instance_id))
            .map(|instance| InstanceDescription {
                state: instance_state(instance).to_owned(),
                reason: instance.state_reason().map(|reason| {
                    reason
                        .message()
                        .or(reason.code())
                        .unwrap_or("no reason given")
                        .to_owned()
                }),
                public_ip: instance.public_ip_address().map(str::to_owned),
                private_ip: instance.private_ip_address().map(str::to_owned),
                public_dns: nonempty(instance.public_dns_name()),
                private_dns: nonempty(instance.private_dns_name()),
                availability_zone: nonempty(
                    instance.placement().and_then(|p| p.availability_zone()),
                ),
            }))
    }

    async fn instances_launched_with(
        &self,
        run_id: &str,
        client_token: &str,
    ) -> Result<Vec<(String, String)>, AwsError> {
        let output = self
            .client
            .describe_instances()
            .filters(filter(&format!("tag:{CLIENT_TOKEN_TAG}"), client_token))
            .filters(filter(&format!("tag:{RUN_ID_TAG}"), run_id))
            .send()
            .await
            .aws("DescribeInstances", &self.region)?;
        Ok(output
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| Some((i.instance_id()?.to_owned(), instance_state(i).to_owned())))
            .collect())
    }

    async fn stop_instance(&self, instance_id: &str) -> Result<(), AwsError> {
        self.client
            .stop_instances()
            .instance_ids(instance_id)
            .send()
            .await
            .aws("StopInstances", &self.region)
            .map(|_| ())
    }

    async fn terminate_instances(&self, instance_ids: &[String]) -> Result<(), AwsError> {
        self.client
            .terminate_instances()
            .set_instance_ids(Some(instance_ids.to_vec()))
            .send()
            .await
            .aws("TerminateInstances", &self.region)
            .map(|_| ())
    }

    async fn add_launch_permissions(
        &self,
        image_id: &str,
        users: &[String],
        groups: &[String],
    ) -> Result<(), AwsError> {
        let users = users
            .iter()
            .map(|user| LaunchPermission::builder().user_id(user).build());
        let groups = groups.iter().map(|group| {
            LaunchPermission::builder()
                .group(PermissionGroup::from(group.as_str()))
                .build()
        });
        let add: Vec<LaunchPermission> = users.chain(groups).collect();
        self.client
            .modify_image_attribute()
            .image_id(image_id)
            .launch_permission(
                LaunchPermissionModifications::builder()
                    .set_add(Some(add))
                    .build(),
            )
            .send()
            .await
            .aws("ModifyImageAttribute", &self.region)
            .map(|_| ())
    }
}

/// A stand-in for EC2 across regions: every call recorded as
/// "`region` `Operation` `details`", AMIs and groups kept in memory, and
/// failures scripted per operation.
#[cfg(test)]
pub mod fake {
    use super::*;
    use crate::ImageInfo;
    use crate::ec2::Plan;
    use crate::ec2::config::Ec2Config;
    use crate::ec2::step_security_group::SshSources;
    use std::collections::VecDeque;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct World {
        pub calls: Vec<String>,
        /// (region, image id) → the AMI.
        pub amis: BTreeMap<(String, String), FakeAmi>,
        /// (region, snapshot id) → the AMI it was made for.
        pub snapshots: BTreeMap<(String, String), String>,
        /// (region, group id) → name.
        pub groups: BTreeMap<(String, String), String>,
        /// (region, key name).
        pub key_pairs: Vec<(String, String)>,
        /// (region, group id) → (port, cidrs).
        pub ingress: BTreeMap<(String, String), (u16, Vec<String>)>,
        /// (region, image id) → accounts and groups allowed.
        pub launch_permissions: BTreeMap<(String, String), Vec<String>>,
        /// (region, instance id) → the instance.
        pub instances: BTreeMap<(String, String), FakeInstance>,
        /// (region, operation) → errors the next calls fail with, in order.
        failures: BTreeMap<(String, &'static str), VecDeque<AwsError>>,
        next_id: u32,
    }

    #[derive(Debug, Clone)]
    pub struct FakeInstance {
        pub state: String,
        pub launch: NewInstance,
    }

    #[derive(Debug, Clone)]
    pub struct FakeAmi {
        pub name: String,
        pub state: String,
        pub snapshot_ids: Vec<String>,
        pub tags: BTreeMap<String, String>,
    }

    /// A plan for image `app` 1.0 (AMI `app-1.0`) built in `eu-west-1`
    /// by run `unit0123` (the run of [`TestContext`]), with the builder
    /// settings `config` over `instance_type` alone, talking to `fake`.
    ///
    /// [`TestContext`]: crate::common::testing::TestContext
    pub fn plan(config: serde_json::Value, fake: &FakeEc2) -> Arc<Plan> {
        let mut value = serde_json::json!({"instance_type": "t3.micro"});
        for (key, v) in config.as_object().expect("settings are a table") {
            value[key] = v.clone();
        }
        let config: Ec2Config = serde_json::from_value(value).expect("valid EC2 settings");
        let region = "eu-west-1".to_owned();
        let ssh_sources = config.security_group_ids.is_empty().then(|| SshSources {
            cidrs: if config.ssh_cidrs.is_empty() {
                vec![Cidr::parse("203.0.113.7/32").unwrap()]
            } else {
                config.ssh_cidrs.clone()
            },
            origin: "the test".to_owned(),
        });
        Arc::new(Plan {
            copy_regions: config.copy_regions(&region),
            region,
            endpoint_url: None,
            ami_name: "app-1.0".to_owned(),
            ami_description: None,
            image: ImageInfo {
                name: "app".to_owned(),
                version: "1.0".to_owned(),
                description: None,
                labels: BTreeMap::new(),
                revision: None,
                created: "2026-01-01T00:00:00Z".to_owned(),
            },
            build_name: "app".to_owned(),
            run_id: "unit0123".to_owned(),
            config_dir: std::path::PathBuf::from("."),
            apis: Arc::new(fake.clone()),
            ssh_sources,
            lookup_timeout: std::time::Duration::from_secs(5),
            config,
        })
    }

    #[derive(Clone, Default)]
    pub struct FakeEc2 {
        pub world: Arc<Mutex<World>>,
        region: String,
    }

    impl FakeEc2 {
        pub fn new(region: &str) -> FakeEc2 {
            FakeEc2 {
                world: Arc::default(),
                region: region.to_owned(),
            }
        }

        /// The same EC2, seen from `region`.
        pub fn at(&self, region: &str) -> FakeEc2 {
            FakeEc2 {
                world: self.world.clone(),
                region: region.to_owned(),
            }
        }

        pub fn calls(&self) -> Vec<String> {
            self.world.lock().unwrap().calls.clone()
        }

        /// An available AMI `name` in `region`, made by someone else.
        pub fn with_image(self, region: &str, name: &str, image_id: &str) -> Self {
            self.world.lock().unwrap().amis.insert(
                (region.to_owned(), image_id.to_owned()),
                FakeAmi {
                    name: name.to_owned(),
                    state: "available".to_owned(),
                    snapshot_ids: Vec::new(),
                    tags: BTreeMap::new(),
                },
            );
            self
        }

        /// An available AMI `name` in `region` made by imgbuild run
        /// `run_id`, with one snapshot; returns its id.
        pub fn with_own_image(&self, region: &str, name: &str, run_id: &str) -> String {
            let tags = BTreeMap::from([(RUN_ID_TAG.to_owned(), run_id.to_owned())]);
            self.at(region).make_ami(name, &tags)
        }

        /// A running instance `id` in `region`, tagged with `tags`.
        pub fn with_instance(&self, region: &str, id: &str, tags: BTreeMap<String, String>) {
            self.world.lock().unwrap().instances.insert(
                (region.to_owned(), id.to_owned()),
                FakeInstance {
                    state: "running".to_owned(),
                    launch: NewInstance {
                        instance_tags: tags,
                        ..NewInstance::default()
                    },
                },
            );
        }

        /// The state of instance `id` in `region`, if it exists.
        pub fn instance_state(&self, region: &str, id: &str) -> Option<String> {
            let world = self.world.lock().unwrap();
            world
                .instances
                .get(&(region.to_owned(), id.to_owned()))
                .map(|instance| instance.state.clone())
        }

        /// The AMIs in `region`, as (id, name).
        pub fn amis_in(&self, region: &str) -> Vec<(String, String)> {
            let world = self.world.lock().unwrap();
            world
                .amis
                .iter()
                .filter(|((r, _), _)| r == region)
                .map(|((_, id), ami)| (id.clone(), ami.name.clone()))
                .collect()
        }

        /// Makes an available AMI with one snapshot; returns its id.
        fn make_ami(&self, name: &str, tags: &BTreeMap<String, String>) -> String {
            let mut world = self.world.lock().unwrap();
            world.next_id += 1;
            let n = world.next_id;
            let (image_id, snapshot_id) = (format!("ami-{n}"), format!("snap-{n}"));
            world
                .snapshots
                .insert(self.key(&snapshot_id), image_id.clone());
            world.amis.insert(
                self.key(&image_id),
                FakeAmi {
                    name: name.to_owned(),
                    state: "available".to_owned(),
                    snapshot_ids: vec![snapshot_id],
                    tags: tags.clone(),
                },
            );
            image_id
        }

        /// The next call of `operation` in this fake's region fails with
        /// `code` (`None`: no answer at all) and HTTP `status`.
        pub fn fail_next(&self, operation: &'static str, code: Option<&str>, status: Option<u16>) {
            let err = AwsError {
                operation,
                region: self.region.clone(),
                code: code.map(str::to_owned),
                message: "scripted failure".to_owned(),
                request_id: None,
                status,
            };
            self.world
                .lock()
                .unwrap()
                .failures
                .entry((self.region.clone(), operation))
                .or_default()
                .push_back(err);
        }

        /// Records the call, then fails it if a failure was scripted.
        fn call(&self, operation: &'static str, details: String) -> Result<(), AwsError> {
            let mut world = self.world.lock().unwrap();
            world
                .calls
                .push(format!("{} {operation} {details}", self.region));
            let key = (self.region.clone(), operation);
            match world.failures.get_mut(&key).and_then(VecDeque::pop_front) {
                Some(err) => Err(err),
                None => Ok(()),
            }
        }

        fn key(&self, name: &str) -> (String, String) {
            (self.region.clone(), name.to_owned())
        }

        fn not_found(&self, operation: &'static str, code: &str) -> AwsError {
            AwsError {
                operation,
                region: self.region.clone(),
                code: Some(code.to_owned()),
                message: "not found".to_owned(),
                request_id: None,
                status: Some(400),
            }
        }
    }

    impl Ec2Apis for FakeEc2 {
        fn in_region(&self, region: &str) -> Arc<dyn Ec2Api> {
            Arc::new(self.at(region))
        }
    }

    #[async_trait]
    impl Ec2Api for FakeEc2 {
        fn region(&self) -> &str {
            &self.region
        }

        async fn source_image(&self, image_id: &str) -> Result<Option<SourceImage>, AwsError> {
            self.call("DescribeImages", image_id.to_owned())?;
            let world = self.world.lock().unwrap();
            Ok(world.amis.get(&self.key(image_id)).map(|ami| SourceImage {
                image_id: image_id.to_owned(),
                name: Some(ami.name.clone()),
                state: Some(ami.state.clone()),
                root_device_name: Some("/dev/xvda".to_owned()),
                ..SourceImage::default()
            }))
        }

        async fn available_images(
            &self,
            owners: &[String],
            _filters: &BTreeMap<String, String>,
        ) -> Result<Vec<SourceImage>, AwsError> {
            self.call("DescribeImages", format!("owned by {}", owners.join(",")))?;
            Ok(Vec::new())
        }

        async fn own_images_named(&self, name: &str) -> Result<Vec<OwnImage>, AwsError> {
            self.call("DescribeImages", name.to_owned())?;
            let world = self.world.lock().unwrap();
            Ok(world
                .amis
                .iter()
                .filter(|((region, _), ami)| *region == self.region && ami.name == name)
                .map(|((_, id), ami)| OwnImage {
                    image_id: id.clone(),
                    state: ami.state.clone(),
                })
                .collect())
        }

        async fn describe_image(
            &self,
            image_id: &str,
        ) -> Result<Option<ImageDescription>, AwsError> {
            self.call("DescribeImages", image_id.to_owned())?;
            let world = self.world.lock().unwrap();
            Ok(world
                .amis
                .get(&self.key(image_id))
                .map(|ami| ImageDescription {
                    state: ami.state.clone(),
                    reason: None,
                    snapshot_ids: ami.snapshot_ids.clone(),
                }))
        }

        async fn own_images_of_run(
            &self,
            name: &str,
            run_id: Option<&str>,
        ) -> Result<Vec<String>, AwsError> {
            self.call("DescribeImages", format!("{name} of run {run_id:?}"))?;
            let world = self.world.lock().unwrap();
            Ok(world
                .amis
                .iter()
                .filter(|((region, _), ami)| {
                    *region == self.region
                        && ami.name == name
                        && match run_id {
                            Some(run) => ami.tags.get(RUN_ID_TAG).map(String::as_str) == Some(run),
                            None => ami.tags.contains_key(RUN_ID_TAG),
                        }
                })
                .map(|((_, id), _)| id.clone())
                .collect())
        }

        async fn create_image(
            &self,
            instance_id: &str,
            name: &str,
            _description: Option<String>,
            tags: &BTreeMap<String, String>,
        ) -> Result<String, AwsError> {
            self.call("CreateImage", format!("{name} from {instance_id}"))?;
            Ok(self.make_ami(name, tags))
        }

        async fn copy_image(&self, copy: NewCopy<'_>) -> Result<String, AwsError> {
            self.call(
                "CopyImage",
                format!(
                    "{} from {}:{}",
                    copy.name, copy.source_region, copy.source_image_id
                ),
            )?;
            Ok(self.make_ami(copy.name, &copy.tags))
        }

        async fn create_tags(
            &self,
            resources: &[String],
            _tags: &BTreeMap<String, String>,
        ) -> Result<(), AwsError> {
            self.call("CreateTags", resources.join(","))
        }

        async fn deregister_image(&self, image_id: &str) -> Result<(), AwsError> {
            self.call("DeregisterImage", image_id.to_owned())?;
            let mut world = self.world.lock().unwrap();
            match world.amis.remove(&self.key(image_id)) {
                Some(_) => Ok(()),
                None => Err(self.not_found("DeregisterImage", "InvalidAMIID.NotFound")),
            }
        }

        async fn snapshots_described_for(&self, image_id: &str) -> Result<Vec<String>, AwsError> {
            self.call("DescribeSnapshots", image_id.to_owned())?;
            let world = self.world.lock().unwrap();
            Ok(world
                .snapshots
                .iter()
                .filter(|((region, _), ami)| *region == self.region && *ami == image_id)
                .map(|((_, id), _)| id.clone())
                .collect())
        }

        async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), AwsError> {
            self.call("DeleteSnapshot", snapshot_id.to_owned())?;
            let mut world = self.world.lock().unwrap();
            match world.snapshots.remove(&self.key(snapshot_id)) {
                Some(_) => Ok(()),
                None => Err(self.not_found("DeleteSnapshot", "InvalidSnapshot.NotFound")),
            }
        }

        async fn describe_key_pair(&self, name: &str) -> Result<(), AwsError> {
            self.call("DescribeKeyPairs", name.to_owned())?;
            let world = self.world.lock().unwrap();
            if world.key_pairs.contains(&self.key(name)) {
                Ok(())
            } else {
                Err(self.not_found("DescribeKeyPairs", "InvalidKeyPair.NotFound"))
            }
        }

        async fn import_key_pair(
            &self,
            name: &str,
            public_openssh: &str,
            _tags: &BTreeMap<String, String>,
        ) -> Result<(), AwsError> {
            let kind = public_openssh.split(' ').next().unwrap_or("");
            self.call("ImportKeyPair", format!("{name} {kind}"))?;
            self.world.lock().unwrap().key_pairs.push(self.key(name));
            Ok(())
        }

        async fn delete_key_pair(&self, name: &str) -> Result<(), AwsError> {
            self.call("DeleteKeyPair", name.to_owned())?;
            let key = self.key(name);
            let mut world = self.world.lock().unwrap();
            let before = world.key_pairs.len();
            world.key_pairs.retain(|k| *k != key);
            if world.key_pairs.len() == before {
                return Err(self.not_found("DeleteKeyPair", "InvalidKeyPair.NotFound"));
            }
            Ok(())
        }

        async fn subnet_vpc(&self, subnet_id: &str) -> Result<Option<String>, AwsError> {
            self.call("DescribeSubnets", subnet_id.to_owned())?;
            Ok(Some(format!("vpc-of-{subnet_id}")))
        }

        async fn vpc_ranges(&self, vpc_id: Option<&str>) -> Result<Option<VpcRanges>, AwsError> {
            self.call("DescribeVpcs", vpc_id.unwrap_or("default").to_owned())?;
            Ok(Some(VpcRanges {
                vpc_id: vpc_id.unwrap_or("vpc-default").to_owned(),
                cidrs: vec!["172.31.0.0/16".to_owned()],
            }))
        }

        async fn security_group_id(&self, name: &str) -> Result<Option<String>, AwsError> {
            self.call("DescribeSecurityGroups", name.to_owned())?;
            let world = self.world.lock().unwrap();
            Ok(world
                .groups
                .iter()
                .find(|((region, _), n)| *region == self.region && *n == name)
                .map(|((_, id), _)| id.clone()))
        }

        async fn create_security_group(
            &self,
            group: NewSecurityGroup<'_>,
        ) -> Result<String, AwsError> {
            self.call(
                "CreateSecurityGroup",
                format!(
                    "{} in {}",
                    group.name,
                    group.vpc_id.as_deref().unwrap_or("the default VPC")
                ),
            )?;
            let mut world = self.world.lock().unwrap();
            world.next_id += 1;
            let id = format!("sg-{}", world.next_id);
            world
                .groups
                .insert((self.region.clone(), id.clone()), group.name.to_owned());
            Ok(id)
        }

        async fn authorize_tcp_ingress(
            &self,
            group_id: &str,
            port: u16,
            cidrs: &[Cidr],
            _description: &str,
        ) -> Result<(), AwsError> {
            let cidrs: Vec<String> = cidrs.iter().map(|c| c.as_str().to_owned()).collect();
            self.call(
                "AuthorizeSecurityGroupIngress",
                format!("{group_id} tcp/{port} {}", cidrs.join(",")),
            )?;
            self.world
                .lock()
                .unwrap()
                .ingress
                .insert(self.key(group_id), (port, cidrs));
            Ok(())
        }

        async fn delete_security_group(&self, group_id: &str) -> Result<(), AwsError> {
            self.call("DeleteSecurityGroup", group_id.to_owned())?;
            let mut world = self.world.lock().unwrap();
            match world.groups.remove(&self.key(group_id)) {
                Some(_) => Ok(()),
                None => Err(self.not_found("DeleteSecurityGroup", "InvalidGroup.NotFound")),
            }
        }

        async fn run_instance(&self, new: NewInstance) -> Result<String, AwsError> {
            self.call(
                "RunInstances",
                format!("{} {}", new.image_id, new.instance_type),
            )?;
            let mut world = self.world.lock().unwrap();
            world.next_id += 1;
            let id = format!("i-{}", world.next_id);
            world.instances.insert(
                self.key(&id),
                FakeInstance {
                    state: "running".to_owned(),
                    launch: new,
                },
            );
            Ok(id)
        }

        async fn describe_instance(
            &self,
            instance_id: &str,
        ) -> Result<Option<InstanceDescription>, AwsError> {
            self.call("DescribeInstances", instance_id.to_owned())?;
            let world = self.world.lock().unwrap();
            Ok(world
                .instances
                .get(&self.key(instance_id))
                .map(|instance| InstanceDescription {
                    state: instance.state.clone(),
                    private_ip: Some("10.0.0.5".to_owned()),
                    ..InstanceDescription::default()
                }))
        }

        async fn instances_launched_with(
            &self,
            run_id: &str,
            client_token: &str,
        ) -> Result<Vec<(String, String)>, AwsError> {
            self.call(
                "DescribeInstances",
                format!("with client token {client_token}"),
            )?;
            let world = self.world.lock().unwrap();
            Ok(world
                .instances
                .iter()
                .filter(|((region, _), instance)| {
                    let tags = &instance.launch.instance_tags;
                    *region == self.region
                        && tags.get(RUN_ID_TAG).map(String::as_str) == Some(run_id)
                        && tags.get(CLIENT_TOKEN_TAG).map(String::as_str) == Some(client_token)
                })
                .map(|((_, id), instance)| (id.clone(), instance.state.clone()))
                .collect())
        }

        async fn stop_instance(&self, instance_id: &str) -> Result<(), AwsError> {
            self.call("StopInstances", instance_id.to_owned())?;
            let mut world = self.world.lock().unwrap();
            match world.instances.get_mut(&self.key(instance_id)) {
                Some(instance) => {
                    instance.state = "stopped".to_owned();
                    Ok(())
                }
                None => Err(self.not_found("StopInstances", "InvalidInstanceID.NotFound")),
            }
        }

        async fn terminate_instances(&self, instance_ids: &[String]) -> Result<(), AwsError> {
            self.call("TerminateInstances", instance_ids.join(","))?;
            let mut world = self.world.lock().unwrap();
            for id in instance_ids {
                match world.instances.get_mut(&self.key(id)) {
                    Some(instance) => instance.state = "terminated".to_owned(),
                    None => {
                        return Err(
                            self.not_found("TerminateInstances", "InvalidInstanceID.NotFound")
                        );
                    }
                }
            }
            Ok(())
        }

        async fn add_launch_permissions(
            &self,
            image_id: &str,
            users: &[String],
            groups: &[String],
        ) -> Result<(), AwsError> {
            let whom: Vec<String> = users.iter().chain(groups).cloned().collect();
            self.call(
                "ModifyImageAttribute",
                format!("{image_id} +{}", whom.join(",")),
            )?;
            self.world
                .lock()
                .unwrap()
                .launch_permissions
                .entry(self.key(image_id))
                .or_default()
                .extend(whom);
            Ok(())
        }
    }
}
