//! The `[builders.NAME] type = "qemu"` table.

use crate::ConfigProblem;
use imgbuild_core::{ByteSize, Sha256Digest};
use imgbuild_provisioners::ssh::SshConfig;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// KVM when it works, TCG (software emulation) with a warning otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl std::fmt::Display for Accelerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accelerator::Auto => "auto",
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Qcow2,
    Raw,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Zstd,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuConfig {
    /// A local path (relative to the config) or an http(s) URL.
    pub base_image: String,
    /// `sha256:<hex>`; required for URLs, verified for local files when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_checksum: Option<Sha256Digest>,
    /// Detected with `qemu-img info` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_format: Option<DiskFormat>,
    #[serde(default = "default_output_dir")]
    pub output_dir: PathBuf,
    #[serde(default)]
    pub format: DiskFormat,
    #[serde(default)]
    pub compression: Compression,
    /// Grow the disk to this size ("8G", "20480M"); the base size otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size: Option<ByteSize>,
    /// MiB.
    #[serde(default = "default_memory")]
    pub memory: u32,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_machine")]
    pub machine: String,
    #[serde(default)]
    pub accelerator: Accelerator,
    #[serde(default)]
    pub firmware: Firmware,
    /// OVMF code image for `firmware = "uefi"`.
    #[serde(default = "default_ovmf_code")]
    pub ovmf_code: PathBuf,
    /// OVMF variables template, copied per build.
    #[serde(default = "default_ovmf_vars")]
    pub ovmf_vars: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_args: Option<String>,
    /// Extra arguments appended to the QEMU command line.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub qemu_args: Vec<String>,
    #[serde(default = "default_qemu_binary")]
    pub qemu_binary: String,
    /// Attach a NoCloud `cidata` seed that creates the SSH user with the
    /// build's temporary key. Turn off for images with baked credentials.
    #[serde(default = "default_true")]
    pub cloud_init: bool,
    /// Before the image is saved, take back what the seed set up for the
    /// build (the build user if the seed created it, its password and
    /// passwordless sudo rule, password logins over SSH, cloud-init's
    /// record of the seed). `false` keeps them in the image.
    #[serde(default = "default_true")]
    pub cloud_init_cleanup: bool,
    /// Runs over SSH to power the machine off; `sudo shutdown -P now` by
    /// default (`shutdown -P now` for root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_command: Option<String>,
    #[serde(default = "default_shutdown_timeout", with = "imgbuild_core::duration")]
    pub shutdown_timeout: Duration,
    /// Save the machine right after the first SSH login, and restore such
    /// a state instead of booting when a later build has the same base and
    /// machine (see `warm_start`). Off with `--no-cache` too.
    #[serde(default = "default_true")]
    pub warm_start: bool,
    /// Where downloaded base images are cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    #[serde(default)]
    pub ssh: SshConfig,
    /// `s3://bucket/` or `s3://bucket/prefix/`: once the image passed its
    /// tests, it and its checksum file are uploaded there as
    /// `<prefix><file name>` and `<prefix><file name>.sha256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadLocation>,
}

/// Where `upload` puts the image, checked when the config is read: an S3
/// bucket name as S3 accepts it, and a prefix that is empty or ends in `/`
/// and could not climb out of itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UploadLocation {
    bucket: String,
    /// Empty, or ending in `/`.
    prefix: String,
}

impl UploadLocation {
    pub fn parse(text: &str) -> Result<UploadLocation, String> {
        let Some(rest) = text.strip_prefix("s3://") else {
            return Err(format!(
                "`{text}` is not an S3 location; write it as \"s3://bucket/\" or \"s3://bucket/prefix/\""
            ));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if let Err(reason) = check_bucket_name(bucket) {
            return Err(format!(
                "`{text}`: `{bucket}` is not a valid S3 bucket name ({reason})"
            ));
        }
        if !prefix.is_empty() {
            let Some(trimmed) = prefix.strip_suffix('/') else {
                return Err(format!(
                    "`{text}`: the prefix must end with `/`, since the image is stored as `<prefix><file name>`; write \"s3://{bucket}/{prefix}/\""
                ));
            };
            if crate::common::object_store::check_key(trimmed).is_err() {
                return Err(format!(
                    "`{text}`: the prefix `{prefix}` has an empty segment (`//`), a segment starting with `.`, or a control character"
                ));
            }
        }
        Ok(UploadLocation {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Empty, or ending in `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `s3://bucket/<prefix><name>`.
    pub fn url_of(&self, name: &str) -> String {
        format!("s3://{}/{}{name}", self.bucket, self.prefix)
    }
}

/// S3's rules for new bucket names (3 to 63 lowercase letters, digits, `.`
/// and `-`, starting and ending with a letter or digit, no `..`, not an IP
/// address), so a typo is caught before the build instead of after it.
fn check_bucket_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if !(3..=63).contains(&name.len()) {
        return Err("it must be 3 to 63 characters long");
    }
    if name.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("bucket names are lowercase");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
    {
        return Err("only lowercase letters, digits, `.` and `-` are allowed");
    }
    let alphanumeric = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alphanumeric(name.chars().next()) || !alphanumeric(name.chars().last()) {
        return Err("it must start and end with a letter or digit");
    }
    if name.contains("..") {
        return Err("it may not contain `..`");
    }
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return Err("it may not be an IP address");
    }
    Ok(())
}

impl TryFrom<String> for UploadLocation {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        UploadLocation::parse(&text)
    }
}

impl From<UploadLocation> for String {
    fn from(location: UploadLocation) -> String {
        location.to_string()
    }
}

impl std::fmt::Display for UploadLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

fn default_output_dir() -> PathBuf {
    PathBuf::from("output")
}
fn default_memory() -> u32 {
    1024
}
fn default_cpus() -> u32 {
    2
}
fn default_machine() -> String {
    "pc".to_owned()
}
fn default_ovmf_code() -> PathBuf {
    PathBuf::from("/usr/share/OVMF/OVMF_CODE.fd")
}
fn default_ovmf_vars() -> PathBuf {
    PathBuf::from("/usr/share/OVMF/OVMF_VARS.fd")
}
fn default_qemu_binary() -> String {
    "qemu-system-x86_64".to_owned()
}
fn default_true() -> bool {
    true
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(300)
}

pub fn is_url(text: &str) -> bool {
    text.starts_with("http://") || text.starts_with("https://")
}

impl QemuConfig {
    pub fn shutdown_command(&self) -> String {
        match &self.shutdown_command {
            Some(command) => command.clone(),
            None if self.ssh.username == "root" => "shutdown -P now".to_owned(),
            None => "sudo shutdown -P now".to_owned(),
        }
    }

    pub fn resolve(&self, config_dir: &Path, path: &Path) -> PathBuf {
        config_dir.join(path)
    }

    pub fn problems(&self, config_dir: &Path) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if is_url(&self.base_image) {
            if self.base_checksum.is_none() {
                problems.push(ConfigProblem::new(
                    "base_checksum",
                    "a base image URL needs `base_checksum = \"sha256:...\"`, so a changed download is never built into an image",
                ));
            }
        } else {
            let path = self.resolve(config_dir, Path::new(&self.base_image));
            if !path.is_file() {
                problems.push(ConfigProblem::new(
                    "base_image",
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
        }
        if self
            .disk_size
            .as_ref()
            .is_some_and(|size| size.bytes() == 0)
        {
            problems.push(ConfigProblem::new("disk_size", "must be larger than 0"));
        }
        if self.shutdown_timeout.is_zero() {
            problems.push(ConfigProblem::new(
                "shutdown_timeout",
                "must be longer than 0s",
            ));
        }
        if self.memory < 128 {
            problems.push(ConfigProblem::new(
                "memory",
                "at least 128 (MiB) is needed to boot",
            ));
        }
        if self.cpus == 0 {
            problems.push(ConfigProblem::new("cpus", "must be at least 1"));
        }
        if self.firmware == Firmware::Uefi {
            for (field, path) in [
                ("ovmf_code", &self.ovmf_code),
                ("ovmf_vars", &self.ovmf_vars),
            ] {
                if !path.is_file() {
                    problems.push(ConfigProblem::new(
                        field,
                        format!(
                            "{} does not exist; install Debian's `ovmf` package or point `{field}` at your OVMF file",
                            path.display()
                        ),
                    ));
                }
            }
        }
        for (field, path) in [("kernel", &self.kernel), ("initrd", &self.initrd)] {
            if let Some(path) = path {
                let path = self.resolve(config_dir, path);
                if !path.is_file() {
                    problems.push(ConfigProblem::new(
                        field,
                        format!("{} does not exist", path.display()),
                    ));
                }
            }
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            problems.push(ConfigProblem::new("initrd", "`initrd` needs `kernel`"));
        }
        if self.kernel_args.is_some() && self.kernel.is_none() {
            problems.push(ConfigProblem::new(
                "kernel_args",
                "`kernel_args` needs `kernel`",
            ));
        }
        if self.compression == Compression::Zstd && self.format == DiskFormat::Qcow2 {
            // Allowed: a zstd-compressed qcow2 is a valid transport format.
        }
        problems.extend(
            crate::common::ssh::ssh_problems(&self.ssh, config_dir)
                .into_iter()
                .map(|(field, message)| ConfigProblem::new(format!("ssh.{field}"), message)),
        );
        if !self.cloud_init && self.ssh.password.is_none() && self.ssh.private_key_file.is_none() {
            problems.push(ConfigProblem::new(
                "cloud_init",
                "with `cloud_init = false` the image must already accept a login: set `ssh.password` or `ssh.private_key_file`",
            ));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> Result<QemuConfig, serde_json::Error> {
        serde_json::from_value(json)
    }

    #[test]
    fn sizes_and_checksums_are_checked_when_read() {
        let hex = "a".repeat(64);
        let good = config(serde_json::json!({
            "base_image": "https://example.com/base.qcow2",
            "base_checksum": format!("sha256:{hex}"),
            "disk_size": "8G",
        }))
        .unwrap();
        assert_eq!(good.disk_size.as_ref().unwrap().bytes(), 8 << 30);
        assert_eq!(good.base_checksum.as_ref().unwrap().hex(), hex);
        assert!(good.problems(Path::new("/")).is_empty());

        let size = config(serde_json::json!({"base_image": "b", "disk_size": "8X"})).unwrap_err();
        assert!(size.to_string().contains("unknown size unit `X`"), "{size}");
        let sum = config(serde_json::json!({"base_image": "b", "base_checksum": "sha256:abc"}))
            .unwrap_err();
        assert!(
            sum.to_string().contains("is not a SHA-256 checksum"),
            "{sum}"
        );

        let zero = config(serde_json::json!({
            "base_image": "https://example.com/base.qcow2",
            "base_checksum": hex,
            "disk_size": "0G",
        }))
        .unwrap();
        let fields: Vec<_> = zero
            .problems(Path::new("/"))
            .into_iter()
            .map(|p| p.field)
            .collect();
        assert_eq!(fields, vec!["disk_size"]);
    }

    #[test]
    fn upload_locations_are_checked_when_read() {
        let read = |upload: &str| {
            config(serde_json::json!({"base_image": "b", "upload": upload}))
                .map(|c| c.upload.unwrap())
                .map_err(|err| err.to_string())
        };
        let bare = read("s3://images").unwrap();
        assert_eq!((bare.bucket(), bare.prefix()), ("images", ""));
        assert_eq!(bare.url_of("web-1.0.qcow2"), "s3://images/web-1.0.qcow2");
        let nested = read("s3://my.images-1/team/vm/").unwrap();
        assert_eq!(
            (nested.bucket(), nested.prefix()),
            ("my.images-1", "team/vm/")
        );
        assert_eq!(nested.to_string(), "s3://my.images-1/team/vm/");
        assert_eq!(
            serde_json::to_value(
                config(serde_json::json!({"base_image": "b", "upload": "s3://images/"})).unwrap()
            )
            .unwrap()["upload"],
            "s3://images/"
        );

        for (bad, says) in [
            ("images/vm/", "is not an S3 location"),
            ("https://images.s3.amazonaws.com/", "is not an S3 location"),
            ("s3://", "is empty"),
            ("s3:///vm/", "is empty"),
            ("s3://Images/", "lowercase"),
            ("s3://im_ages/", "only lowercase letters"),
            ("s3://ab/", "3 to 63"),
            ("s3://-images/", "start and end"),
            ("s3://im..ages/", "`..`"),
            ("s3://192.168.1.1/", "IP address"),
            ("s3://images/vm", "write \"s3://images/vm/\""),
            ("s3://images/a//b/", "empty segment"),
            ("s3://images/../b/", "starting with `.`"),
        ] {
            let err = read(bad).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
