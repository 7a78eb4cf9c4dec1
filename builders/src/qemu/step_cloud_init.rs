//! Writes a cloud-init NoCloud seed: a small FAT volume labelled `cidata`
//! that tells an ordinary cloud image which user to create and which key to
//! trust, so images from any distribution build without baked credentials.
//!
//! Uses `state.work_dir`. Produces `state.ssh_key` (when no credential is
//! configured) and `state.seed` (with `cloud_init = true`).

use super::QemuState;
use super::plan::Plan;
use async_trait::async_trait;
use imgbuild_core::{Step, StepContext, StepError};
use imgbuild_provisioners::shell::shell_quote;
use imgbuild_provisioners::ssh::TemporaryKey;
use std::io::{Cursor, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

const SEED_SIZE: usize = 1 << 20;

pub struct StepCloudInit {
    plan: Arc<Plan>,
}

impl StepCloudInit {
    pub fn new(plan: Arc<Plan>) -> Self {
        StepCloudInit { plan }
    }
}

#[async_trait]
impl Step<QemuState> for StepCloudInit {
    fn name(&self) -> &'static str {
        "cloud_init_seed"
    }

    async fn run(&mut self, state: &mut QemuState, cx: &StepContext) -> Result<(), StepError> {
        let ssh = &self.plan.config.ssh;
        // The build logs in with the configured credentials if there are
        // any, and with a key made for this build alone otherwise.
        if ssh.password.is_none() && ssh.private_key_file.is_none() {
            let key = TemporaryKey::generate()
                .map_err(|err| StepError::failed(format!("cannot generate an SSH key: {err}")))?;
            state.ssh_key = Some(Arc::new(key));
        }
        if !self.plan.config.cloud_init {
            return Ok(());
        }
        let work_dir = state
            .work_dir
            .clone()
            .ok_or_else(|| StepError::failed("no working directory"))?;
        let public_key = state.ssh_key.as_ref().map(|key| key.public_openssh());
        let user_data = user_data(&ssh.username, public_key, ssh.password.as_deref());
        let meta_data = format!(
            "instance-id: {}\nlocal-hostname: {}\n",
            self.plan.instance_id,
            hostname(cx.build_name())
        );
        let image = fat_volume(&[
            ("user-data", user_data.as_bytes()),
            ("meta-data", meta_data.as_bytes()),
        ])
        .map_err(|err| StepError::failed(format!("cannot build the cloud-init seed: {err}")))?;
        // Inside the working directory, which the disk step removes.
        let seed = work_dir.join("seed.img");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&seed)
            .and_then(|mut file| file.write_all(&image))
            .map_err(|err| StepError::failed(format!("cannot write {}: {err}", seed.display())))?;
        state.seed = Some(seed);
        Ok(())
    }
}

/// Where the seed's first boot notes what it is about to add, so that the
/// build can take exactly that back before the image is saved.
const MARKERS: &str = "/var/lib/imgbuild-seed";
const SUDOERS_FILE: &str = "/etc/sudoers.d/90-cloud-init-users";
/// Where cloud-init 23.1 and later turn on password logins (`ssh_pwauth`);
/// older releases (Debian 12's 22.4) edit `SSHD_CONFIG` itself.
const SSHD_PWAUTH_FILE: &str = "/etc/ssh/sshd_config.d/50-cloud-init.conf";
const SSHD_CONFIG: &str = "/etc/ssh/sshd_config";

/// Runs before cloud-init's users and SSH modules (bootcmd comes first in
/// every distribution's module order), and notes what does not exist yet:
/// the build user, cloud-init's sudoers file, its sshd drop-in.
fn marker_command(username: &str) -> String {
    format!(
        "mkdir -p {MARKERS} && chmod 700 {MARKERS}; \
         [ -e {MARKERS}/seen ] && exit 0; touch {MARKERS}/seen; \
         id -u {user} >/dev/null 2>&1 || touch {MARKERS}/created-user; \
         [ -e {SUDOERS_FILE} ] || touch {MARKERS}/new-sudoers; \
         [ -e {SSHD_PWAUTH_FILE} ] || touch {MARKERS}/new-sshd-config; \
         [ -f {SSHD_CONFIG} ] && cp -p {SSHD_CONFIG} {MARKERS}/sshd_config.before",
        user = shell_quote(username)
    )
}

/// Takes back, as root, what the seed set up for the build alone: the
/// passwordless sudo rule, password logins over SSH, the password, the
/// build user when the seed created it, and cloud-init's own record of the
/// seed (which holds the password in clear). cloud-init runs afresh on the
/// image's first real boot. Ends with `then`, run as root, which powers the
/// machine off: once the build user is gone its own `sudo` no longer works.
///
/// On a slow machine cloud-init's last stages can still be running when
/// provisioning ends, and would write their record back after a `clean`;
/// so the script first waits (bounded) for cloud-init to finish.
pub fn cleanup_script(username: &str, password_was_set: bool, then: &str) -> String {
    let user = shell_quote(username);
    let unset_password = if password_was_set {
        format!("passwd -l {user} >/dev/null")
    } else {
        "true".to_owned()
    };
    format!(
        "pa='^[[:space:]]*PasswordAuthentication[[:space:]]'; \
         if [ -d {MARKERS} ]; then \
           if [ -e {MARKERS}/new-sudoers ]; then rm -f {SUDOERS_FILE}; \
           elif [ -f {SUDOERS_FILE} ]; then sed -i \"/^{sed_user}[[:space:]]/d\" {SUDOERS_FILE}; fi; \
           [ -e {MARKERS}/new-sshd-config ] && rm -f {SSHD_PWAUTH_FILE}; \
           if [ -f {MARKERS}/sshd_config.before ] && ! cmp -s {MARKERS}/sshd_config.before {SSHD_CONFIG}; then \
             grep -vi \"$pa\" {MARKERS}/sshd_config.before > {MARKERS}/before.rest; \
             grep -vi \"$pa\" {SSHD_CONFIG} > {MARKERS}/now.rest; \
             if cmp -s {MARKERS}/before.rest {MARKERS}/now.rest; then cat {MARKERS}/sshd_config.before > {SSHD_CONFIG}; \
             else echo \"imgbuild: {SSHD_CONFIG} was changed during the build; check its PasswordAuthentication setting\" >&2; fi; \
           fi; \
           created=no; [ -e {MARKERS}/created-user ] && created=yes; \
           rm -rf {MARKERS}; \
           if command -v cloud-init >/dev/null; then timeout 300 cloud-init status --wait >/dev/null 2>&1; cloud-init clean --logs >/dev/null 2>&1; fi; \
           if [ $created = yes ]; then userdel -f -r {user} 2>/dev/null || userdel -f {user}; \
           else {unset_password}; fi; \
           sync; \
         fi; {then}",
        sed_user = username.replace(['/', '\\', '.', '[', '*', '^', '$'], "."),
    )
}

fn user_data(username: &str, public_key: Option<&str>, password: Option<&str>) -> String {
    let mut text = String::from("#cloud-config\n");
    text.push_str("bootcmd:\n");
    text.push_str(&format!(
        "  - [sh, -c, {}]\n",
        yaml_string(&marker_command(username))
    ));
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

    /// cloud-init reads the user-data as YAML, so the test does too: a
    /// value that broke out of its quotes would show up as a different
    /// structure, not merely as different text.
    #[test]
    fn user_data_quotes_values() {
        use serde_yaml_ng::Value;
        // Characters that mean something to YAML: a quote, `: `, ` #`, a
        // newline that starts another list item, and a leading `&`.
        let password = "p\"w: x #y\n- z";
        let text = user_data("build er", Some("&ssh-ed25519 AAAA x"), Some(password));
        assert!(text.starts_with("#cloud-config\n"), "{text}");
        let doc: Value = serde_yaml_ng::from_str(&text).unwrap();
        let user = &doc["users"][0];
        assert_eq!(doc["users"].as_sequence().map(Vec::len), Some(1), "{text}");
        assert_eq!(user["name"].as_str(), Some("build er"), "{text}");
        assert_eq!(
            user["ssh_authorized_keys"],
            Value::Sequence(vec![Value::from("&ssh-ed25519 AAAA x")]),
            "{text}"
        );
        assert_eq!(user["plain_text_passwd"].as_str(), Some(password), "{text}");
        assert_eq!(user["lock_passwd"].as_bool(), Some(false), "{text}");
        assert_eq!(user["sudo"].as_str(), Some("ALL=(ALL) NOPASSWD:ALL"));
        assert_eq!(doc["ssh_pwauth"].as_bool(), Some(true), "{text}");
        // The marker command runs before the users module, as one argv.
        assert_eq!(
            doc["bootcmd"],
            Value::Sequence(vec![Value::Sequence(vec![
                Value::from("sh"),
                Value::from("-c"),
                Value::from(marker_command("build er")),
            ])]),
            "{text}"
        );
        assert_eq!(doc.get("disable_root"), None, "{text}");

        // Without a password: locked, and password logins stay off.
        let text = user_data("root", Some("ssh-ed25519 AAAA x"), None);
        let doc: Value = serde_yaml_ng::from_str(&text).unwrap();
        let user = &doc["users"][0];
        assert_eq!(user["name"].as_str(), Some("root"));
        assert_eq!(user["lock_passwd"].as_bool(), Some(true), "{text}");
        assert_eq!(user.get("plain_text_passwd"), None, "{text}");
        assert_eq!(doc.get("ssh_pwauth"), None, "{text}");
        assert_eq!(doc["disable_root"].as_bool(), Some(false), "{text}");
    }

    #[test]
    fn hostnames_are_dns_safe() {
        assert_eq!(hostname("Debian_12.x"), "debian-12-x");
        assert_eq!(hostname("__"), "imgbuild");
    }
}
