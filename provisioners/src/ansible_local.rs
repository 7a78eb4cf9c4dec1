//! `type = "ansible-local"`: uploads the playbook's directory to the machine
//! and runs `ansible-playbook -c local` there, for machines that carry
//! Ansible themselves (or images that should run it again at boot).

use crate::ansible::{self, AnsibleError, PlaySink};
use crate::communicator::{Communicator, ExitStatus, OutputSink};
use crate::provisioner::{Provision, ProvisionContext, ProvisionError, Provisioner};
use crate::registry::{self, ParseError, ParseInput, Parsed, ProvisionerKind};
use crate::shell::shell_quote;
use crate::transfer::{self, PackEntry};
use async_trait::async_trait;
use imgbuild_core::ConfigProblem;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// The `[[provision]] type = "ansible-local"` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnsibleLocalConfig {
    /// Relative to the config's directory; inside `playbook_dir` when that
    /// is given.
    pub playbook_file: PathBuf,
    /// The directory uploaded (roles, templates, vars); the playbook's own
    /// directory by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub playbook_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_arguments: Vec<String>,
    /// Uploaded as a 0600 file and passed as `-e @file`.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra_vars: serde_json::Map<String, serde_json::Value>,
    /// Runs ansible-playbook through `sudo -n`.
    #[serde(default, alias = "use_sudo")]
    pub r#become: bool,
    /// Where the directory is uploaded; removed after the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging_directory: Option<String>,
    #[serde(
        default,
        with = "imgbuild_core::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
}

/// `type = "ansible-local"`.
pub struct AnsibleLocalKind;

impl ProvisionerKind for AnsibleLocalKind {
    fn name(&self) -> &'static str {
        "ansible-local"
    }

    fn summary(&self) -> &'static str {
        "uploads a playbook's directory and runs it with Ansible on the machine itself"
    }

    fn parse(&self, input: ParseInput<'_>) -> Result<Parsed, ParseError> {
        let config: AnsibleLocalConfig = registry::deserialize(&input)?;
        let playbook = input.config_dir.join(&config.playbook_file);
        let mut problems = Vec::new();
        problems.extend(ansible::check_playbook(&playbook, "playbook_file").err());
        let upload_dir = match &config.playbook_dir {
            Some(dir) => input.config_dir.join(dir),
            None => imgbuild_core::fsutil::parent_dir(&playbook).to_owned(),
        };
        let in_dir = playbook.strip_prefix(&upload_dir).map(PathBuf::from);
        match (&in_dir, upload_dir.is_dir()) {
            (_, false) => problems.push(
                ConfigProblem::new(
                    "playbook_dir",
                    format!("{} is not a directory", upload_dir.display()),
                )
                .help("paths are relative to the directory of the config file"),
            ),
            (Err(_), true) => problems.push(ConfigProblem::new(
                "playbook_file",
                format!(
                    "{} is not inside playbook_dir {}",
                    playbook.display(),
                    upload_dir.display()
                ),
            )),
            _ => {}
        }
        if config
            .staging_directory
            .as_deref()
            .is_some_and(|dir| !dir.starts_with('/') || dir.trim_end_matches('/').is_empty())
        {
            problems.push(ConfigProblem::new(
                "staging_directory",
                "must be an absolute path other than `/` (it is removed after the run)",
            ));
        }
        problems.extend(ansible::timeout_problem(config.timeout));
        registry::refuse(problems)?;
        let staging = config
            .staging_directory
            .as_deref()
            .map(|dir| dir.trim_end_matches('/').to_owned())
            .unwrap_or_else(|| {
                format!(
                    "/tmp/imgbuild-ansible-local-{}",
                    &uuid::Uuid::new_v4().simple().to_string()[..12]
                )
            });
        let resolved = serde_json::to_value(&config).unwrap_or_default();
        let input_files = ansible::files_under(&upload_dir);
        let provisioner = AnsibleLocalProvisioner {
            upload_dir,
            playbook_in_dir: in_dir.unwrap_or_default(),
            staging,
            config,
        };
        Ok(Parsed {
            provisioner: Provisioner::new(provisioner),
            resolved,
            input_files,
        })
    }
}

#[derive(Debug)]
pub struct AnsibleLocalProvisioner {
    config: AnsibleLocalConfig,
    upload_dir: PathBuf,
    /// The playbook relative to `upload_dir`.
    playbook_in_dir: PathBuf,
    /// Where `upload_dir` goes on the machine.
    staging: String,
}

/// Beside the uploaded tree: the pid of the shell leading the play's
/// process group, so a cancelled build can stop it (see `stop_after_cancel`).
const GROUP_FILE: &str = ".imgbuild-ansible.pgid";

#[async_trait]
impl Provision for AnsibleLocalProvisioner {
    fn describe(&self) -> String {
        format!("ansible-local ({})", self.config.playbook_file.display())
    }

    async fn run(
        &self,
        comm: &dyn Communicator,
        cx: &ProvisionContext,
    ) -> Result<(), ProvisionError> {
        let quiet = Quiet;
        let found = comm
            .exec("command -v ansible-playbook >/dev/null 2>&1", &quiet)
            .await?;
        if found != ExitStatus::Code(0) {
            return Err(AnsibleError::NotOnMachine {
                target: comm.target(),
            }
            .into());
        }
        let result = match self.config.timeout {
            Some(limit) => match tokio::time::timeout(limit, self.play(comm, cx)).await {
                Ok(result) => result,
                Err(_) => {
                    self.stop(comm).await;
                    Err(ProvisionError::Timeout {
                        what: format!("ansible-playbook {}", self.config.playbook_file.display()),
                        after: limit,
                    })
                }
            },
            None => self.play(comm, cx).await,
        };
        self.remove_staging(comm).await;
        result
    }

    async fn stop_after_cancel(&self, comm: &dyn Communicator) {
        self.stop(comm).await;
        self.remove_staging(comm).await;
    }
}

impl AnsibleLocalProvisioner {
    async fn play(
        &self,
        comm: &dyn Communicator,
        cx: &ProvisionContext,
    ) -> Result<(), ProvisionError> {
        let staging = self.staging.as_str();
        cx.log.info(format!(
            "uploading {} to {staging}",
            self.upload_dir.display()
        ));
        let mut packed = transfer::pack(vec![PackEntry {
            local: self.upload_dir.clone(),
            name_in_archive: PathBuf::new(),
        }]);
        let stream = std::mem::replace(&mut packed.stream, Box::new(tokio::io::empty()));
        let sent = comm.upload_tar(staging, stream).await;
        packed.finish().await?;
        sent?;
        let vars_name = ".imgbuild-extra-vars.json";
        let vars = transfer::single_file_archive(
            vars_name,
            &ansible::vars_file(&self.config.extra_vars),
            0o600,
        )?;
        comm.upload_tar(staging, vars).await?;

        let mut argv = vec![
            "ansible-playbook".to_owned(),
            "-c".into(),
            "local".into(),
            "-i".into(),
            "localhost,".into(),
            "-e".into(),
            format!("@{staging}/{vars_name}"),
        ];
        argv.extend(self.config.extra_arguments.iter().cloned());
        argv.push(self.playbook_in_dir.display().to_string());
        let argv: Vec<String> = argv.iter().map(|arg| shell_quote(arg)).collect();
        let sudo = if self.config.r#become {
            "sudo -n -E "
        } else {
            ""
        };
        let command = format!(
            "cd {dir} && echo $$ > {GROUP_FILE} && ANSIBLE_FORCE_COLOR=0 ANSIBLE_NOCOLOR=1 PYTHONUNBUFFERED=1 {sudo}{}",
            argv.join(" "),
            dir = shell_quote(staging),
        );
        cx.log.info(format!("running {}", argv.join(" ")));
        let sink = PlaySink::new(cx, &self.config.playbook_file);
        let status = comm.exec(&command, &sink).await?;
        if status == ExitStatus::Code(0) {
            return Ok(());
        }
        sink.outcome(status, "ansible-playbook", "playbook")
    }

    /// Stops the play's process group on the machine (through sudo when it
    /// runs as root), first with SIGTERM, then SIGKILL. Best effort and
    /// bounded: the machine may be gone.
    async fn stop(&self, comm: &dyn Communicator) {
        let file = shell_quote(&format!("{}/{GROUP_FILE}", self.staging));
        let command = format!(
            "g=$(cat {file} 2>/dev/null); case \"$g\" in ''|*[!0-9]*) exit 0;; esac; \
             kill -TERM -- -\"$g\" 2>/dev/null || sudo -n kill -TERM -- -\"$g\" 2>/dev/null; \
             sleep 1; kill -KILL -- -\"$g\" 2>/dev/null || sudo -n kill -KILL -- -\"$g\" 2>/dev/null; true"
        );
        let _ = tokio::time::timeout(Duration::from_secs(15), comm.exec(&command, &Quiet)).await;
    }

    /// The uploaded tree holds the extra vars: it must not stay in the image.
    async fn remove_staging(&self, comm: &dyn Communicator) {
        let dir = shell_quote(&self.staging);
        let command = format!("rm -rf {dir} 2>/dev/null || sudo -n rm -rf {dir}");
        let _ = tokio::time::timeout(Duration::from_secs(30), comm.exec(&command, &Quiet)).await;
    }
}

struct Quiet;

impl OutputSink for Quiet {
    fn line(&self, _: imgbuild_core::Stream, _: &str) {}
}
