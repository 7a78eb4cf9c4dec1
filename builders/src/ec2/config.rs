//! The `[builders.NAME] type = "ec2"` table, and the checks it can pass or
//! fail without talking to AWS.

use crate::ConfigProblem;
use imgbuild_core::Cidr;
use imgbuild_provisioners::ssh::SshConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which of the instance's addresses SSH connects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SshInterface {
    PublicIp,
    PrivateIp,
    PublicDns,
    PrivateDns,
}

impl SshInterface {
    pub fn as_str(self) -> &'static str {
        match self {
            SshInterface::PublicIp => "public_ip",
            SshInterface::PrivateIp => "private_ip",
            SshInterface::PublicDns => "public_dns",
            SshInterface::PrivateDns => "private_dns",
        }
    }

    pub fn is_public(self) -> bool {
        matches!(self, SshInterface::PublicIp | SshInterface::PublicDns)
    }
}

/// Picks the source AMI at build time, like `aws ec2 describe-images
/// --owners ... --filters ...`; the AMI picked is recorded in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceAmiFilter {
    /// DescribeImages filters: `name = "debian-12-amd64-*"`,
    /// `"virtualization-type" = "hvm"`, ...
    pub filters: BTreeMap<String, String>,
    /// Account ids or aliases (`amazon`, `self`) allowed to own the AMI.
    /// Required: a name filter alone would accept anyone's public AMI.
    pub owners: Vec<String>,
    /// With several matches, take the newest; otherwise several matches fail
    /// the build.
    #[serde(default)]
    pub most_recent: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2Config {
    /// The region the AMI is built in; the standard AWS chain (`AWS_REGION`,
    /// the profile) when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Another EC2 endpoint (a VPC endpoint, LocalStack, moto).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_url: Option<String>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ami: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ami_filter: Option<SourceAmiFilter>,

    pub instance_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    /// Where the temporary security group is made; the subnet's VPC, else
    /// the default VPC, when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vpc_id: Option<String>,
    /// Overrides the subnet's "auto-assign public IP" setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub associate_public_ip: Option<bool>,
    /// An instance profile name or ARN, for provisioners that need AWS access.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iam_instance_profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_file: Option<PathBuf>,
    /// GiB; the source AMI's size when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume_size: Option<i32>,
    /// gp3, gp2, io1, io2, st1, sc1 or standard; the source AMI's when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_volume_type: Option<String>,
    /// Tags on the build instance and its volumes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub run_tags: BTreeMap<String, String>,

    /// `<image name>-<image version>` when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ami_name: Option<String>,
    /// The image's description when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ami_description: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ami_tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub snapshot_tags: BTreeMap<String, String>,
    /// Other regions the finished AMI is copied to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ami_regions: Vec<String>,
    /// Accounts allowed to launch the AMI (and its copies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ami_users: Vec<String>,
    /// `["all"]` makes the AMI public.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ami_groups: Vec<String>,
    /// Encrypt the root volume at launch, so the AMI's snapshot is encrypted.
    #[serde(default)]
    pub encrypt_boot: bool,
    /// The KMS key for `encrypt_boot` in `region`; the account's default EBS
    /// key when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
    /// KMS keys for the copies, by region (a key belongs to one region).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub region_kms_key_ids: BTreeMap<String, String>,

    /// An existing key pair the source AMI trusts; needs
    /// `ssh.private_key_file`. A temporary ed25519 key pair otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_pair_name: Option<String>,
    /// Existing groups; a temporary group allowing SSH only from `ssh_cidrs`
    /// otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_group_ids: Vec<String>,
    /// Who may reach SSH through the temporary security group. When not
    /// set: this machine's public address, or the VPC's ranges with a
    /// private `ssh_interface`; a build that cannot tell is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_cidrs: Vec<Cidr>,
    /// The public IP when the instance has one, the private IP otherwise,
    /// when not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_interface: Option<SshInterface>,

    /// How long an AMI (and each copy) may take to become available.
    #[serde(default = "default_ami_timeout", with = "imgbuild_core::duration")]
    pub ami_timeout: Duration,
    /// How long the instance may take to start, stop or terminate.
    #[serde(default = "default_instance_timeout", with = "imgbuild_core::duration")]
    pub instance_timeout: Duration,

    /// How to log in. Most AMIs refuse `root`: set `username` to the image's
    /// default user (`ec2-user`, `ubuntu`, `admin`, ...). `host`/`port`
    /// override the address the instance reports.
    #[serde(default)]
    pub ssh: SshConfig,
}

fn default_ami_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}

fn default_instance_timeout() -> Duration {
    Duration::from_secs(15 * 60)
}

/// EC2 refuses user data larger than this, before base64.
const USER_DATA_LIMIT: usize = 16 * 1024;
/// EC2 allows 50 tags per resource.
const TAG_LIMIT: usize = 50;
/// Tags imgbuild adds to every AMI and snapshot (see `Plan::ami_tags`).
pub const DEFAULT_AMI_TAG_COUNT: usize = 5;
/// Tags imgbuild adds to the instance and its volumes (see `Plan::run_tags`).
pub const DEFAULT_RUN_TAG_COUNT: usize = 4;
const VOLUME_TYPES: &[&str] = &["gp3", "gp2", "io1", "io2", "st1", "sc1", "standard"];

/// Why `name` is not an AWS region name, if it is not. Checks the shape
/// only (`us-east-1`, `eu-central-2`, `us-gov-west-1`): regions are added
/// every year, and one the account cannot use fails with AWS's own message.
pub fn region_problem(name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split('-').collect();
    let shaped = parts.len() >= 3
        && parts[0].len() == 2
        && parts.iter().all(|part| !part.is_empty())
        && parts[..parts.len() - 1]
            .iter()
            .all(|part| part.chars().all(|c| c.is_ascii_lowercase()))
        && parts[parts.len() - 1].chars().all(|c| c.is_ascii_digit());
    if shaped {
        return None;
    }
    // "us-east-1a" is an availability zone; say which region it is in.
    if let Some(region) = name.strip_suffix(|c: char| c.is_ascii_lowercase())
        && region_problem(region).is_none()
    {
        return Some(format!(
            "`{name}` is an availability zone, not a region; the region is `{region}`"
        ));
    }
    Some(format!(
        "`{name}` is not an AWS region name; write it like \"us-east-1\" or \"eu-central-1\""
    ))
}

/// Why `name` cannot name an AMI, if it cannot: EC2 takes 3 to 128
/// letters, digits and `( ) [ ] . / - ' @ _` and spaces.
pub fn ami_name_problem(name: &str) -> Option<String> {
    if !(3..=128).contains(&name.chars().count()) {
        return Some(format!(
            "AMI name `{name}` must be 3 to 128 characters long"
        ));
    }
    let mut bad: Vec<char> = name
        .chars()
        .filter(|c| !(c.is_ascii_alphanumeric() || "()[]./-'@_ ".contains(*c)))
        .collect();
    bad.dedup();
    if !bad.is_empty() {
        let shown: Vec<String> = bad.iter().map(|c| format!("`{c}`")).collect();
        return Some(format!(
            "AMI name `{name}` contains {}, which EC2 does not allow; AMI names take letters, digits, spaces and ( ) [ ] . / - ' @ _ only",
            shown.join(" ")
        ));
    }
    None
}

/// `prefix-` followed by 8 or 17 lowercase hex digits, as EC2 ids are.
fn id_problem(value: &str, prefix: &str) -> Option<String> {
    let ok = value
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| {
            (hex.len() == 8 || hex.len() == 17) && hex.chars().all(|c| c.is_ascii_hexdigit())
        });
    (!ok).then(|| format!("`{value}` is not an EC2 id of the form {prefix}-<8 or 17 hex digits>"))
}

fn tag_problems(field: &str, tags: &BTreeMap<String, String>, added: usize) -> Vec<ConfigProblem> {
    let mut problems = Vec::new();
    for (key, value) in tags {
        if key.is_empty() || key.chars().count() > 128 {
            problems.push(ConfigProblem::new(
                field,
                format!("tag key `{key}` must be 1 to 128 characters long"),
            ));
        }
        if value.chars().count() > 256 {
            problems.push(ConfigProblem::new(
                field,
                format!("the value of tag `{key}` is longer than EC2's 256 characters"),
            ));
        }
        if key.to_ascii_lowercase().starts_with("aws:") {
            problems.push(ConfigProblem::new(
                field,
                format!("tag key `{key}`: keys starting with `aws:` are reserved by AWS"),
            ));
        }
        if key.starts_with("imgbuild:") {
            problems.push(ConfigProblem::new(
                field,
                format!(
                    "tag key `{key}`: keys starting with `imgbuild:` are set by imgbuild (run id, image, version) and `imgbuild clean` relies on them"
                ),
            ));
        }
    }
    if tags.len() + added > TAG_LIMIT {
        problems.push(ConfigProblem::new(
            field,
            format!(
                "{} tags plus the {added} imgbuild adds exceed EC2's limit of {TAG_LIMIT} per resource",
                tags.len()
            ),
        ));
    }
    problems
}

impl Ec2Config {
    /// Copy regions, without the build region and without repeats, in the
    /// order given.
    pub fn copy_regions(&self, build_region: &str) -> Vec<String> {
        let mut regions: Vec<String> = Vec::new();
        for region in &self.ami_regions {
            if region != build_region && !regions.contains(region) {
                regions.push(region.clone());
            }
        }
        regions
    }

    /// Whether the build makes (and deletes) its own key pair: no existing
    /// key pair is named and no other credential is configured.
    pub fn uses_temporary_key(&self) -> bool {
        self.key_pair_name.is_none()
            && self.ssh.password.is_none()
            && self.ssh.private_key_file.is_none()
    }

    pub fn problems(&self, config_dir: &Path) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let mut problem =
            |field: &str, message: String| problems.push(ConfigProblem::new(field, message));

        if let Some(region) = &self.region
            && let Some(message) = region_problem(region)
        {
            problem("region", message);
        }
        for region in &self.ami_regions {
            if let Some(message) = region_problem(region) {
                problem("ami_regions", message);
            }
        }
        for region in self.region_kms_key_ids.keys() {
            if let Some(message) = region_problem(region) {
                problem("region_kms_key_ids", message);
            } else if !self.ami_regions.contains(region) {
                problem(
                    "region_kms_key_ids",
                    format!(
                        "`{region}` is not one of `ami_regions`; `kms_key_id` sets the key of the build region"
                    ),
                );
            }
        }
        if let Some(url) = &self.endpoint_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            problem(
                "endpoint_url",
                format!(
                    "`{url}` is not an http(s) URL; write it like \"https://ec2.us-east-1.amazonaws.com\""
                ),
            );
        }

        match (&self.source_ami, &self.source_ami_filter) {
            (Some(_), Some(_)) => problem(
                "source_ami",
                "give either `source_ami` or `source_ami_filter`, not both".to_owned(),
            ),
            (None, None) => problem(
                "source_ami",
                "say which AMI to start from: `source_ami = \"ami-...\"` or a `source_ami_filter` table".to_owned(),
            ),
            (Some(ami), None) => {
                if let Some(message) = id_problem(ami, "ami") {
                    problem("source_ami", message);
                }
            }
            (None, Some(filter)) => {
                if filter.filters.is_empty() {
                    problem(
                        "source_ami_filter.filters",
                        "give at least one filter, such as `name = \"debian-12-amd64-*\"`".to_owned(),
                    );
                }
                if filter.owners.is_empty() || filter.owners.iter().any(|o| o.is_empty()) {
                    problem(
                        "source_ami_filter.owners",
                        "list the accounts (or `amazon`, `self`) whose AMIs may match; without owners anyone's public AMI could be picked".to_owned(),
                    );
                }
            }
        }

        if self.instance_type.trim().is_empty() || !self.instance_type.contains('.') {
            problem(
                "instance_type",
                format!(
                    "`{}` is not an instance type; write it like \"t3.micro\"",
                    self.instance_type
                ),
            );
        }
        if let Some(subnet) = &self.subnet_id
            && let Some(message) = id_problem(subnet, "subnet")
        {
            problem("subnet_id", message);
        }
        if let Some(vpc) = &self.vpc_id
            && let Some(message) = id_problem(vpc, "vpc")
        {
            problem("vpc_id", message);
        }
        for group in &self.security_group_ids {
            if let Some(message) = id_problem(group, "sg") {
                problem("security_group_ids", message);
            }
        }
        if !self.security_group_ids.is_empty() && !self.ssh_cidrs.is_empty() {
            problem(
                "ssh_cidrs",
                "`ssh_cidrs` shapes the temporary security group, which is not made when `security_group_ids` is set".to_owned(),
            );
        }
        // What the build would refuse anyway once it starts, said up front:
        // the temporary group cannot tell who SSH comes from.
        if self.security_group_ids.is_empty() && self.ssh_cidrs.is_empty() {
            let why = match (&self.ssh.host, &self.endpoint_url) {
                (Some(host), _) => Some(format!(
                    "SSH goes through `ssh.host` ({host}), so the instance sees whatever connects from there"
                )),
                (None, Some(url)) if self.ssh_interface.is_none_or(|i| i.is_public()) => {
                    Some(format!(
                        "EC2 is reached through `endpoint_url` ({url}), so this machine's public address says nothing about who connects"
                    ))
                }
                _ => None,
            };
            if let Some(why) = why {
                problem(
                    "ssh_cidrs",
                    format!(
                        "{why}; list the address ranges SSH comes from in `ssh_cidrs` (`[\"0.0.0.0/0\"]` admits anyone)"
                    ),
                );
            }
        }

        match (&self.user_data, &self.user_data_file) {
            (Some(_), Some(_)) => problem(
                "user_data",
                "give either `user_data` or `user_data_file`, not both".to_owned(),
            ),
            (Some(data), None) if data.len() > USER_DATA_LIMIT => problem(
                "user_data",
                format!("{} bytes is more than EC2's 16 KiB limit", data.len()),
            ),
            (None, Some(path)) => {
                let path = config_dir.join(path);
                match std::fs::metadata(&path) {
                    Err(err) => problem(
                        "user_data_file",
                        format!("cannot read {}: {err}", path.display()),
                    ),
                    Ok(meta) if meta.len() as usize > USER_DATA_LIMIT => problem(
                        "user_data_file",
                        format!(
                            "{} is {} bytes, more than EC2's 16 KiB limit",
                            path.display(),
                            meta.len()
                        ),
                    ),
                    Ok(_) => {}
                }
            }
            _ => {}
        }

        if let Some(size) = self.root_volume_size
            && !(1..=65536).contains(&size)
        {
            problem(
                "root_volume_size",
                format!("{size} GiB is outside EC2's 1 to 65536 GiB"),
            );
        }
        if let Some(kind) = &self.root_volume_type
            && !VOLUME_TYPES.contains(&kind.as_str())
        {
            problem(
                "root_volume_type",
                format!(
                    "`{kind}` is not an EBS volume type; use one of {}",
                    VOLUME_TYPES.join(", ")
                ),
            );
        }
        if self.kms_key_id.is_some() && !self.encrypt_boot {
            problem(
                "kms_key_id",
                "`kms_key_id` needs `encrypt_boot = true`".to_owned(),
            );
        }
        if !self.region_kms_key_ids.is_empty() && !self.encrypt_boot {
            problem(
                "region_kms_key_ids",
                "`region_kms_key_ids` needs `encrypt_boot = true`".to_owned(),
            );
        }

        if let Some(name) = &self.ami_name
            && let Some(message) = ami_name_problem(name)
        {
            problem("ami_name", message);
        }
        if let Some(description) = &self.ami_description
            && description.chars().count() > 255
        {
            problem(
                "ami_description",
                "EC2 takes at most 255 characters".to_owned(),
            );
        }
        for user in &self.ami_users {
            if user.len() != 12 || !user.chars().all(|c| c.is_ascii_digit()) {
                problem(
                    "ami_users",
                    format!("`{user}` is not an AWS account id (12 digits)"),
                );
            }
        }
        for group in &self.ami_groups {
            if group != "all" {
                problem(
                    "ami_groups",
                    format!(
                        "`{group}` is not a launch permission group; EC2 knows only \"all\" (public)"
                    ),
                );
            }
        }

        if let Some(name) = &self.key_pair_name {
            if name.is_empty() || name.len() > 255 {
                problem(
                    "key_pair_name",
                    "must be 1 to 255 characters long".to_owned(),
                );
            }
            if self.ssh.private_key_file.is_none() {
                problem(
                    "ssh.private_key_file",
                    format!(
                        "`key_pair_name = \"{name}\"` needs the key pair's private key in `ssh.private_key_file`"
                    ),
                );
            }
        }

        problems.extend(tag_problems(
            "run_tags",
            &self.run_tags,
            DEFAULT_RUN_TAG_COUNT,
        ));
        problems.extend(tag_problems(
            "ami_tags",
            &self.ami_tags,
            DEFAULT_AMI_TAG_COUNT,
        ));
        problems.extend(tag_problems(
            "snapshot_tags",
            &self.snapshot_tags,
            DEFAULT_AMI_TAG_COUNT,
        ));

        for (name, limit) in [
            ("ami_timeout", self.ami_timeout),
            ("instance_timeout", self.instance_timeout),
        ] {
            if limit < Duration::from_secs(10) {
                problems.push(ConfigProblem::new(name, "must be at least 10s"));
            }
        }
        problems.extend(
            crate::common::ssh::ssh_problems(&self.ssh, config_dir)
                .into_iter()
                .map(|(field, message)| ConfigProblem::new(format!("ssh.{field}"), message)),
        );
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Ec2Config {
        let text = format!("instance_type = \"t3.micro\"\n{extra}");
        from_lines(&text)
    }

    /// A config from `key = <JSON value>` lines: TOML-looking, without a
    /// TOML dependency in this crate.
    fn from_lines(text: &str) -> Ec2Config {
        let mut object = serde_json::Map::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (key, value) = line.split_once(" = ").expect("key = value");
            object.insert(
                key.trim().to_owned(),
                serde_json::from_str(value.trim()).expect(value),
            );
        }
        serde_json::from_value(serde_json::Value::Object(object)).unwrap()
    }

    fn fields(config: &Ec2Config) -> Vec<String> {
        config
            .problems(Path::new("/nonexistent"))
            .into_iter()
            .map(|p| p.field)
            .collect()
    }

    #[test]
    fn a_minimal_config_is_valid_and_has_the_documented_defaults() {
        let config = config(r#"source_ami = "ami-0123456789abcdef0""#);
        assert!(
            fields(&config).is_empty(),
            "{:?}",
            config.problems(Path::new("/"))
        );
        assert_eq!(config.ami_timeout, Duration::from_secs(1800));
        assert!(config.uses_temporary_key());
        assert_eq!(config.ssh_interface, None);
    }

    #[test]
    fn source_must_be_exactly_one_of_ami_and_filter() {
        assert_eq!(fields(&config("")), vec!["source_ami"]);
        let both = config(
            r#"source_ami = "ami-12345678"
source_ami_filter = {"filters": {"name": "x"}, "owners": ["amazon"]}"#,
        );
        assert_eq!(fields(&both), vec!["source_ami"]);
        let no_owners = config(r#"source_ami_filter = {"filters": {"name": "x"}, "owners": []}"#);
        assert_eq!(fields(&no_owners), vec!["source_ami_filter.owners"]);
        assert_eq!(
            fields(&config(r#"source_ami = "ubuntu""#)),
            vec!["source_ami"]
        );
    }

    #[test]
    fn regions_are_checked_by_shape_and_zones_are_explained() {
        assert_eq!(region_problem("us-east-1"), None);
        assert_eq!(region_problem("us-gov-west-1"), None);
        assert_eq!(region_problem("ap-southeast-7"), None);
        assert!(
            region_problem("us-east-1a")
                .unwrap()
                .contains("the region is `us-east-1`")
        );
        assert!(region_problem("useast1").is_some());
        assert!(region_problem("US-EAST-1").is_some());
        let config = config(
            r#"source_ami = "ami-12345678"
region = "virginia"
ami_regions = ["eu-west-1", "moon-1"]"#,
        );
        assert_eq!(fields(&config), vec!["region", "ami_regions"]);
    }

    #[test]
    fn user_data_is_one_or_the_other() {
        let config = config(
            r##"source_ami = "ami-12345678"
user_data = "#!/bin/sh"
user_data_file = "boot.sh""##,
        );
        assert_eq!(fields(&config), vec!["user_data"]);
    }

    #[test]
    fn ssh_interface_values_are_closed() {
        let err = serde_json::from_value::<Ec2Config>(serde_json::json!({
            "instance_type": "t3.micro",
            "source_ami": "ami-12345678",
            "ssh_interface": "elastic_ip",
        }))
        .unwrap_err();
        assert!(err.to_string().contains("public_ip"), "{err}");
    }

    #[test]
    fn sharing_encryption_and_tags_are_checked() {
        let config = config(
            r#"source_ami = "ami-12345678"
ami_users = ["123456789012", "1234"]
ami_groups = ["everyone"]
kms_key_id = "alias/x"
ami_tags = {"aws:owner": "x", "imgbuild:run-id": "y", "team": "infra"}
root_volume_type = "ssd"
ami_name = "my image+1""#,
        );
        let mut got = fields(&config);
        got.sort();
        assert_eq!(
            got,
            vec![
                "ami_groups",
                "ami_name",
                "ami_tags",
                "ami_tags",
                "ami_users",
                "kms_key_id",
                "root_volume_type",
            ]
        );
    }

    #[test]
    fn an_existing_key_pair_needs_its_private_key() {
        let config = config(
            r#"source_ami = "ami-12345678"
key_pair_name = "ci""#,
        );
        assert_eq!(fields(&config), vec!["ssh.private_key_file"]);
        assert!(!config.uses_temporary_key());
    }

    #[test]
    fn copy_regions_skip_the_build_region_and_repeats() {
        let config = config(
            r#"source_ami = "ami-12345678"
ami_regions = ["eu-west-1", "us-east-1", "eu-west-1", "ap-south-1"]"#,
        );
        assert_eq!(
            config.copy_regions("us-east-1"),
            vec!["eu-west-1", "ap-south-1"]
        );
    }

    #[test]
    fn ami_names_follow_ec2_rules() {
        assert_eq!(ami_name_problem("web-1.2.3"), None);
        assert_eq!(ami_name_problem("web (2024) [x] o'k @ a/b_c"), None);
        assert!(ami_name_problem("ab").is_some());
        assert!(
            ami_name_problem("web-1.2.3+build5")
                .unwrap()
                .contains("contains `+`,")
        );
        assert!(ami_name_problem(&"x".repeat(129)).is_some());
    }

    #[test]
    fn ssh_from_an_unknowable_place_needs_ssh_cidrs() {
        let base = r#"source_ami = "ami-0123456789abcdef0""#;
        let through_host = config(&format!(
            "{base}\nssh = {{\"username\": \"admin\", \"host\": \"bastion.example\"}}"
        ));
        assert_eq!(fields(&through_host), vec!["ssh_cidrs"]);
        let problems = through_host.problems(Path::new("/"));
        assert!(
            problems[0].message.contains("bastion.example"),
            "{problems:?}"
        );
        let other_endpoint = config(&format!("{base}\nendpoint_url = \"http://127.0.0.1:5055\""));
        assert_eq!(fields(&other_endpoint), vec!["ssh_cidrs"]);

        // Told who, or SSH from inside the VPC, or no temporary group: fine.
        for fine in [
            "ssh_cidrs = [\"0.0.0.0/0\"]\nssh = {\"username\": \"admin\", \"host\": \"bastion.example\"}",
            "endpoint_url = \"http://127.0.0.1:5055\"\nssh_interface = \"private_ip\"",
            "endpoint_url = \"http://127.0.0.1:5055\"\nsecurity_group_ids = [\"sg-0123456789abcdef0\"]",
        ] {
            assert_eq!(
                fields(&config(&format!("{base}\n{fine}"))),
                Vec::<String>::new(),
                "{fine}"
            );
        }
    }

    #[test]
    fn ssh_cidrs_are_checked_when_read() {
        let cidrs = |value: serde_json::Value| {
            serde_json::from_value::<Ec2Config>(serde_json::json!({
                "instance_type": "t3.micro",
                "source_ami": "ami-12345678",
                "ssh_cidrs": value,
            }))
            .map(|config| config.ssh_cidrs)
        };
        let good = cidrs(serde_json::json!(["203.0.113.7/32", "2001:db8::/32"])).unwrap();
        assert!(good[0].address().is_ipv4() && good[1].address().is_ipv6());
        for bad in ["203.0.113.7", "10.0.0.0/33"] {
            let err = cidrs(serde_json::json!([bad])).unwrap_err().to_string();
            assert!(err.contains("is not a CIDR block"), "{bad}: {err}");
        }
    }
}
