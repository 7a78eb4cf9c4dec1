//! Writes a cloud-init NoCloud seed: a small FAT volume labelled `cidata`
//! that tells an ordinary cloud image which user to create and which key to
//! trust, so images from any distribution build without baked credentials.

use super::QemuState;
use super::config::QemuConfig;
use async_trait::async_trait;
use imgbuild_core::{Step, StepContext, StepError};
use imgbuild_provisioners::ssh::TemporaryKey;
use std::io::{Cursor, Write};
use std::sync::Arc;

const SEED_SIZE: usize = 1 << 20;

pub struct StepCloudInit {
    config: Arc<QemuConfig>,
}

impl StepCloudInit {
    pub fn new(config: Arc<QemuConfig>) -> Self {
        StepCloudInit { config }
    }
}

#[async_trait]
impl Step<QemuState> for StepCloudInit {
    fn name(&self) -> &'static str {
        "cloud_init_seed"
    }

    async fn run(&mut self, state: &mut QemuState, cx: &StepContext) -> Result<(), StepError> {
        let ssh = &self.config.ssh;
        // The build logs in with the configured credentials if there are
        // any, and with a key made for this build alone otherwise.
        if ssh.password.is_none() && ssh.private_key_file.is_none() {
            let key = TemporaryKey::generate()
                .map_err(|err| StepError::failed(format!("cannot generate an SSH key: {err}")))?;
            state.ssh_key = Some(Arc::new(key));
        }
        if !self.config.cloud_init {
            return Ok(());
        }
        let work_dir = state
            .work_dir
            .clone()
            .ok_or_else(|| StepError::failed("no working directory"))?;
        let public_key = state.ssh_key.as_ref().map(|key| key.public_openssh());
        let user_data = user_data(&ssh.username, public_key, ssh.password.as_deref());
        let meta_data = format!(
            "instance-id: imgbuild-{}\nlocal-hostname: {}\n",
            cx.run_id,
            hostname(cx.build_name())
        );
        let image = fat_volume(&[
            ("user-data", user_data.as_bytes()),
            ("meta-data", meta_data.as_bytes()),
        ])
        .map_err(|err| StepError::failed(format!("cannot build the cloud-init seed: {err}")))?;
        // Inside the working directory, which the disk step removes.
        let seed = work_dir.join("seed.img");
        std::fs::write(&seed, image)
            .map_err(|err| StepError::failed(format!("cannot write {}: {err}", seed.display())))?;
        state.seed = Some(seed);
        Ok(())
    }
}

fn user_data(username: &str, public_key: Option<&str>, password: Option<&str>) -> String {
    let mut text = String::from("#cloud-config\n");
    if username == "root" {
        text.push_str("disable_root: false\n");
    }
    text.push_str("users:\n");
    text.push_str(&format!("  - name: {}\n", yaml_string(username)));
    text.push_str("    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n");
    text.push_str("    shell: /bin/sh\n");
    if let Some(key) = public_key {
        text.push_str("    ssh_authorized_keys:\n");
        text.push_str(&format!("      - {}\n", yaml_string(key)));
    }
    match password {
        Some(password) => {
            text.push_str("    lock_passwd: false\n");
            text.push_str(&format!(
                "    plain_text_passwd: {}\n",
                yaml_string(password)
            ));
            text.push_str("ssh_pwauth: true\n");
        }
        None => text.push_str("    lock_passwd: true\n"),
    }
    text
}

/// Double-quoted YAML scalar: safe for any user name, key or password.
fn yaml_string(text: &str) -> String {
    serde_json::to_string(text).expect("strings serialize")
}

fn hostname(build: &str) -> String {
    let cleaned: String = build
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = cleaned.trim_matches('-');
    if trimmed.is_empty() {
        "imgbuild".into()
    } else {
        trimmed.chars().take(63).collect()
    }
}

fn fat_volume(files: &[(&str, &[u8])]) -> std::io::Result<Vec<u8>> {
    let mut storage = Cursor::new(vec![0u8; SEED_SIZE]);
    fatfs::format_volume(
        &mut storage,
        fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     "),
    )?;
    storage.set_position(0);
    {
        let fs = fatfs::FileSystem::new(&mut storage, fatfs::FsOptions::new())?;
        {
            let root = fs.root_dir();
            for (name, content) in files {
                let mut file = root.create_file(name)?;
                file.truncate()?;
                file.write_all(content)?;
                file.flush()?;
            }
        }
        fs.unmount()?;
    }
    Ok(storage.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn seed_volume_is_labelled_cidata_and_holds_both_files() {
        let image = fat_volume(&[
            ("user-data", b"#cloud-config\n"),
            ("meta-data", b"instance-id: x\n"),
        ])
        .unwrap();
        let fs = fatfs::FileSystem::new(Cursor::new(image), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim(), "CIDATA");
        let mut content = String::new();
        fs.root_dir()
            .open_file("user-data")
            .unwrap()
            .read_to_string(&mut content)
            .unwrap();
        assert_eq!(content, "#cloud-config\n");
    }

    #[test]
    fn user_data_quotes_values() {
        let text = user_data("build er", Some("ssh-ed25519 AAAA x"), Some("p\"w"));
        assert!(text.contains("- name: \"build er\""));
        assert!(text.contains("- \"ssh-ed25519 AAAA x\""));
        assert!(text.contains("plain_text_passwd: \"p\\\"w\""));
        assert!(text.contains("ssh_pwauth: true"));
    }

    #[test]
    fn hostnames_are_dns_safe() {
        assert_eq!(hostname("Debian_12.x"), "debian-12-x");
        assert_eq!(hostname("__"), "imgbuild");
    }
}
