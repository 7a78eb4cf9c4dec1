//! The `[builders.NAME] type = "qemu"` table.

use crate::ConfigProblem;
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
    pub base_checksum: Option<String>,
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
    pub disk_size: Option<String>,
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
    /// Where downloaded base images are cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_dir: Option<PathBuf>,
    #[serde(default)]
    pub ssh: SshConfig,
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

/// The hex digest of a `sha256:<hex>` (or bare hex) checksum.
pub fn parse_checksum(text: &str) -> Result<String, String> {
    let hex = text
        .strip_prefix("sha256:")
        .unwrap_or(text)
        .to_ascii_lowercase();
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(format!(
            "`{text}` is not a SHA-256 checksum; write it as \"sha256:<64 hex digits>\""
        ))
    }
}

/// Parses "8G", "512M", "20480" (bytes) into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size; write it like \"8G\" or \"512M\""))?;
    let factor: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{text}`; use K, M, G or T"
            ));
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("`{text}` is too large"))
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
            match &self.base_checksum {
                None => problems.push(ConfigProblem::new(
                    "base_checksum",
                    "a base image URL needs `base_checksum = \"sha256:...\"`, so a changed download is never built into an image",
                )),
                Some(sum) => {
                    if let Err(message) = parse_checksum(sum) {
                        problems.push(ConfigProblem::new("base_checksum", message));
                    }
                }
            }
        } else {
            let path = self.resolve(config_dir, Path::new(&self.base_image));
            if !path.is_file() {
                problems.push(ConfigProblem::new(
                    "base_image",
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
            if let Some(Err(message)) = self.base_checksum.as_deref().map(parse_checksum) {
                problems.push(ConfigProblem::new("base_checksum", message));
            }
        }
        match self.disk_size.as_deref().map(parse_size) {
            Some(Err(message)) => problems.push(ConfigProblem::new("disk_size", message)),
            Some(Ok(0)) => problems.push(ConfigProblem::new("disk_size", "must be larger than 0")),
            _ => {}
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

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("8X").unwrap_err().contains("unknown size unit"));
        assert!(parse_size("big").is_err());
    }

    #[test]
    fn checksums_need_64_hex_digits() {
        let hex = "a".repeat(64);
        assert_eq!(parse_checksum(&format!("sha256:{hex}")).unwrap(), hex);
        assert!(parse_checksum("sha256:abc").is_err());
    }
}
