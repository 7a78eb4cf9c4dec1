//! The shell provisioner: inline commands or script files, uploaded and run
//! with an `execute_command`, environment variables quoted safely.

use crate::communicator::{CommError, Communicator, ExitStatus};
use crate::provisioner::{LoggingSink, Provision, ProvisionContext, ProvisionError, Provisioner};
use crate::registry::{self, ParseError, ParseInput, Parsed, ProvisionerKind};
use crate::transfer;
use async_trait::async_trait;
use imgbuild_core::{ConfigProblem, template};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The `[[provision]] type = "shell"` table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShellConfig {
    /// Commands run in order as one script (so `cd` and variables carry over).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inline: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scripts: Vec<PathBuf>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// How the uploaded script is run; `{{ path }}` is the script, `{{ vars }}`
    /// the quoted `NAME='value'` assignments from `env`.
    #[serde(default = "default_execute_command")]
    pub execute_command: String,
    #[serde(default = "default_inline_shebang")]
    pub inline_shebang: String,
    /// Where scripts are uploaded on the machine.
    #[serde(default = "default_remote_folder")]
    pub remote_folder: String,
    #[serde(default = "default_valid_exit_codes")]
    pub valid_exit_codes: Vec<u32>,
    /// The script reboots or shuts the machine down: a lost connection is
    /// success, and the next provisioner waits for the machine to return.
    #[serde(default)]
    pub expect_disconnect: bool,
    #[serde(
        default,
        with = "imgbuild_core::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
    #[serde(default)]
    pub max_retries: u32,
    #[serde(
        default,
        with = "imgbuild_core::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub pause_before: Option<Duration>,
}

pub const DEFAULT_EXECUTE_COMMAND: &str = "chmod +x {{ path }} && {{ vars }} {{ path }}";

fn default_execute_command() -> String {
    DEFAULT_EXECUTE_COMMAND.to_owned()
}
fn default_inline_shebang() -> String {
    "/bin/sh -e".to_owned()
}
fn default_remote_folder() -> String {
    "/tmp".to_owned()
}
fn default_valid_exit_codes() -> Vec<u32> {
    vec![0]
}

impl ShellConfig {
    /// Problems a config can have on its own, as (field, message).
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        let given = [
            !self.inline.is_empty(),
            self.script.is_some(),
            !self.scripts.is_empty(),
        ]
        .iter()
        .filter(|set| **set)
        .count();
        if given != 1 {
            problems.push(ConfigProblem::new(
                "inline",
                "a shell provisioner needs exactly one of `inline`, `script` or `scripts`"
                    .to_owned(),
            ));
        }
        for name in self.env.keys() {
            if !is_env_name(name) {
                problems.push(ConfigProblem::new(
                    "env",
                    format!("`{name}` is not a valid environment variable name (letters, digits and _, not starting with a digit)"),
                ));
            }
        }
        if self.valid_exit_codes.is_empty() {
            problems.push(ConfigProblem::new(
                "valid_exit_codes",
                "must list at least one exit code".to_owned(),
            ));
        }
        if let Some(code) = self.valid_exit_codes.iter().find(|code| **code > 255) {
            problems.push(ConfigProblem::new(
                "valid_exit_codes",
                format!("{code} is not an exit code: a process exits with 0 to 255"),
            ));
        }
        if self.timeout.is_some_and(|timeout| timeout.is_zero()) {
            problems.push(ConfigProblem::new(
                "timeout",
                "must be longer than 0s (leave it out for no limit)".to_owned(),
            ));
        }
        if self.remote_folder.trim().is_empty() {
            problems.push(ConfigProblem::new(
                "remote_folder",
                "must not be empty".to_owned(),
            ));
        }
        problems
    }

    /// The script files this provisioner reads, relative to the config.
    pub fn script_paths(&self) -> Vec<PathBuf> {
        self.script
            .iter()
            .chain(self.scripts.iter())
            .cloned()
            .collect()
    }
}

/// `type = "shell"`.
pub struct ShellKind;

impl ProvisionerKind for ShellKind {
    fn name(&self) -> &'static str {
        "shell"
    }

    fn summary(&self) -> &'static str {
        "runs inline commands or local scripts on the machine"
    }

    fn parse(&self, input: ParseInput<'_>) -> Result<Parsed, ParseError> {
        let mut config: ShellConfig = registry::deserialize(&input)?;
        // Passed on, so that what the scripts stamp can be reproducible too;
        // part of the resolved config, so a new epoch is a new step key.
        if let Ok(Some(_)) = imgbuild_core::reproducible::source_date_epoch() {
            let value =
                std::env::var(imgbuild_core::reproducible::SOURCE_DATE_EPOCH).unwrap_or_default();
            config
                .env
                .entry(imgbuild_core::reproducible::SOURCE_DATE_EPOCH.to_owned())
                .or_insert(value);
        }
        let mut problems = config.problems();
        // Checked now, with a stand-in path, so a typo fails before launch.
        if let Err(message) = render_execute_command(
            &config.execute_command,
            input.template_context,
            "/tmp/script.sh",
            &config.env,
        ) {
            problems.push(
                ConfigProblem::new("execute_command", format!("template error: {message}")).help(
                    "templates can use var.NAME, env(\"NAME\"), timestamp, isotime, uuid(), run_id, git_sha, image.name, image.version, build.name and build.type, and here also path and vars",
                ),
            );
        }
        let mut scripts = Vec::new();
        let mut input_files = Vec::new();
        let field = if config.script.is_some() {
            "script".to_owned()
        } else {
            "scripts".to_owned()
        };
        for (position, path) in config.script_paths().iter().enumerate() {
            let absolute = input.config_dir.join(path);
            match std::fs::read(&absolute) {
                Ok(content) => {
                    scripts.push(Script {
                        name: path.display().to_string(),
                        content,
                    });
                    input_files.push(absolute);
                }
                Err(err) => {
                    let field = if config.script.is_some() {
                        field.clone()
                    } else {
                        format!("scripts[{position}]")
                    };
                    problems.push(
                        ConfigProblem::new(
                            field,
                            format!("cannot read script {}: {err}", absolute.display()),
                        )
                        .help("script paths are relative to the directory of the config file"),
                    );
                }
            }
        }
        registry::refuse(problems)?;
        let resolved = serde_json::to_value(&config).unwrap_or_default();
        let shell = ShellProvisioner::new(config, scripts, input.template_context.clone());
        Ok(Parsed {
            provisioner: Provisioner::new(shell),
            resolved,
            input_files,
        })
    }
}

fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A script to upload: its name for messages, and its bytes.
#[derive(Debug, Clone)]
pub struct Script {
    pub name: String,
    pub content: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct ShellProvisioner {
    pub config: ShellConfig,
    pub scripts: Vec<Script>,
    /// The values `execute_command` may reference besides `path` and `vars`.
    pub template_context: serde_json::Value,
}

impl ShellProvisioner {
    /// `script_contents` holds the content of each of `config.script_paths()`,
    /// read by the caller (which knows where the config lives).
    pub fn new(
        config: ShellConfig,
        script_contents: Vec<Script>,
        template_context: serde_json::Value,
    ) -> Self {
        let scripts = if config.inline.is_empty() {
            script_contents
        } else {
            let mut body = format!("#!{}\n", config.inline_shebang);
            for command in &config.inline {
                body.push_str(command);
                body.push('\n');
            }
            vec![Script {
                name: "inline commands".to_owned(),
                content: body.into_bytes(),
            }]
        };
        ShellProvisioner {
            config,
            scripts,
            template_context,
        }
    }

    /// Where scripts are uploaded, without a trailing slash (`/` itself
    /// stays).
    pub fn remote_folder(&self) -> &str {
        match self.config.remote_folder.trim_end_matches('/') {
            "" => "/",
            dir => dir,
        }
    }

    /// The command that runs the script at `path`.
    pub fn execute_command(&self, path: &str) -> Result<String, ProvisionError> {
        render_execute_command(
            &self.config.execute_command,
            &self.template_context,
            path,
            &self.config.env,
        )
        .map_err(ProvisionError::Template)
    }

    async fn run_with_retries(
        &self,
        comm: &dyn Communicator,
        cx: &ProvisionContext,
    ) -> Result<(), ProvisionError> {
        if let Some(pause) = self.config.pause_before {
            cx.log.info(format!(
                "pausing {} before the shell provisioner",
                humantime::format_duration(pause)
            ));
            tokio::time::sleep(pause).await;
        }
        let mut attempt = 0;
        loop {
            match self.run_once(comm, cx).await {
                Ok(()) => return Ok(()),
                Err(err @ ProvisionError::Cancelled) => return Err(err),
                Err(err) if attempt < self.config.max_retries => {
                    attempt += 1;
                    cx.log.warn(format!(
                        "shell provisioner failed ({err}); retry {attempt} of {}",
                        self.config.max_retries
                    ));
                    // A retry usually waits out a transient condition (apt
                    // lock, network); back off a little each time.
                    tokio::time::sleep(Duration::from_secs(2 * attempt as u64)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn run_once(
        &self,
        comm: &dyn Communicator,
        cx: &ProvisionContext,
    ) -> Result<(), ProvisionError> {
        for script in &self.scripts {
            let remote_name = format!("imgbuild-shell-{}.sh", uuid::Uuid::new_v4().simple());
            let remote_dir = self.remote_folder();
            let remote_path = format!("{}/{remote_name}", remote_dir.trim_end_matches('/'));
            let archive = transfer::single_file_archive(&remote_name, &script.content, 0o755)?;
            comm.upload_tar(remote_dir, archive).await?;

            let command = self.execute_command(&shell_quote(&remote_path))?;
            cx.log.info(format!("running {}", script.name));
            let sink = LoggingSink::new(&cx.log, 20);
            // The login shell is the leader of the command's process group
            // (sshd starts each session in a new one): its pid, noted here,
            // lets a timeout or a cancelled build stop the script and every
            // process it started. Closing the channel alone does not: sshd
            // leaves a command without a terminal running.
            let tracked = format!(
                "echo $$ > {}; {command}",
                shell_quote(&format!("{remote_path}{GROUP_SUFFIX}"))
            );
            let execution = comm.exec(&tracked, &sink);
            let result = match self.config.timeout {
                Some(limit) => match tokio::time::timeout(limit, execution).await {
                    Ok(result) => result,
                    Err(_) => {
                        stop_scripts(comm, remote_dir).await;
                        return Err(ProvisionError::Timeout {
                            what: format!("{} ({command})", script.name),
                            after: limit,
                        });
                    }
                },
                None => execution.await,
            };
            match result {
                Ok(status) => {
                    let accepted = matches!(status, ExitStatus::Code(code) if self.config.valid_exit_codes.contains(&code));
                    if !accepted {
                        return Err(ProvisionError::CommandFailed {
                            command: format!("{}: {command}", script.name),
                            status,
                            accepted: codes_text(&self.config.valid_exit_codes),
                            tail: sink.tail(),
                        });
                    }
                    if self.config.expect_disconnect {
                        comm.reconnect().await?;
                    }
                    remove_quietly(comm, &remote_path).await;
                }
                Err(err @ CommError::Disconnected { .. }) => {
                    if !self.config.expect_disconnect {
                        return Err(ProvisionError::UnexpectedDisconnect(err));
                    }
                    cx.log
                        .info("the machine disconnected as expected; waiting for it to come back");
                    comm.reconnect().await?;
                    // Not every reboot clears `remote_folder` (or even /tmp).
                    remove_quietly(comm, &remote_path).await;
                }
                Err(err) => return Err(err.into()),
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Provision for ShellProvisioner {
    fn describe(&self) -> String {
        let names: Vec<&str> = self.scripts.iter().map(|s| s.name.as_str()).collect();
        format!("shell ({})", names.join(", "))
    }

    async fn run(
        &self,
        comm: &dyn Communicator,
        cx: &ProvisionContext,
    ) -> Result<(), ProvisionError> {
        self.run_with_retries(comm, cx).await
    }

    async fn stop_after_cancel(&self, comm: &dyn Communicator) {
        stop_scripts(comm, self.remote_folder()).await;
    }
}

fn codes_text(codes: &[u32]) -> String {
    codes
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Beside each running script: the pid of its process group leader.
const GROUP_SUFFIX: &str = ".pgid";

/// Stops the process groups of the scripts still running from
/// `remote_dir` (a timeout, a cancelled build), first with SIGTERM, then
/// SIGKILL, and removes the scripts. A script run through `sudo` is reached
/// through sudo, which passes the signal on. Best effort, and bounded: the
/// machine may be gone.
pub(crate) async fn stop_scripts(comm: &dyn Communicator, remote_dir: &str) {
    struct Discard;
    impl crate::communicator::OutputSink for Discard {
        fn line(&self, _: imgbuild_core::Stream, _: &str) {}
    }
    let dir = shell_quote(remote_dir.trim_end_matches('/'));
    let command = format!(
        "for f in {dir}/imgbuild-shell-*.sh{GROUP_SUFFIX}; do [ -f \"$f\" ] || continue; \
         g=$(cat \"$f\"); case \"$g\" in ''|*[!0-9]*) continue;; esac; \
         kill -TERM -- -\"$g\" 2>/dev/null || sudo -n kill -TERM -- -\"$g\" 2>/dev/null; \
         sleep 1; kill -KILL -- -\"$g\" 2>/dev/null || sudo -n kill -KILL -- -\"$g\" 2>/dev/null; \
         rm -f \"$f\" \"${{f%{GROUP_SUFFIX}}}\"; done; true"
    );
    let _ = tokio::time::timeout(Duration::from_secs(15), comm.exec(&command, &Discard)).await;
}

/// The script is only useful while it runs; leaving it would leak into the
/// image. Failure to remove it is not worth failing the build over (after a
/// reboot, expect_disconnect, it is usually gone with /tmp already).
async fn remove_quietly(comm: &dyn Communicator, remote_path: &str) {
    struct Discard;
    impl crate::communicator::OutputSink for Discard {
        fn line(&self, _: imgbuild_core::Stream, _: &str) {}
    }
    let group = format!("{remote_path}{GROUP_SUFFIX}");
    let _ = comm
        .exec(
            &format!("rm -f {} {}", shell_quote(remote_path), shell_quote(&group)),
            &Discard,
        )
        .await;
}

pub fn shell_quote(text: &str) -> String {
    shell_escape::unix::escape(text.into()).into_owned()
}

/// `NAME='value' OTHER='x'`: every value single-quoted, so no value is ever
/// interpreted by the remote shell.
pub fn env_assignments(env: &BTreeMap<String, String>) -> String {
    env.iter()
        .map(|(name, value)| format!("{name}={}", single_quote(value)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn single_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

pub fn render_execute_command(
    template_text: &str,
    context: &serde_json::Value,
    path: &str,
    env: &BTreeMap<String, String>,
) -> Result<String, String> {
    let mut context = context.clone();
    if !context.is_object() {
        context = serde_json::json!({});
    }
    let object = context.as_object_mut().expect("made an object above");
    object.insert("path".into(), path.into());
    object.insert("vars".into(), env_assignments(env).into());
    let engine = template::environment();
    let rendered = template::render(
        &engine,
        template_text,
        &minijinja::Value::from_serialize(&context),
    )
    .map_err(|err| err.message)?;
    Ok(rendered.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml_like: serde_json::Value) -> ShellConfig {
        serde_json::from_value(toml_like).unwrap()
    }

    #[test]
    fn env_values_are_quoted_against_the_shell() {
        let mut env = BTreeMap::new();
        env.insert("A".into(), "it's $HOME `x`".into());
        env.insert("B".into(), "plain".into());
        assert_eq!(env_assignments(&env), r"A='it'\''s $HOME `x`' B='plain'");
    }

    #[test]
    fn default_execute_command_renders_path_and_vars() {
        let mut env = BTreeMap::new();
        env.insert("GREETING".into(), "a&b".into());
        let command = render_execute_command(
            DEFAULT_EXECUTE_COMMAND,
            &serde_json::json!({}),
            "/tmp/s.sh",
            &env,
        )
        .unwrap();
        assert_eq!(command, "chmod +x /tmp/s.sh && GREETING='a&b' /tmp/s.sh");
    }

    #[test]
    fn execute_command_may_use_config_values_but_not_unknown_ones() {
        let context = serde_json::json!({"build": {"name": "vm"}});
        let ok = render_execute_command(
            "sudo -E sh {{ path }} # {{ build.name }}",
            &context,
            "/tmp/s.sh",
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(ok, "sudo -E sh /tmp/s.sh # vm");
        let err = render_execute_command("{{ pth }}", &context, "/tmp/s.sh", &BTreeMap::new())
            .unwrap_err();
        assert!(err.contains("pth"), "{err}");
    }

    #[test]
    fn inline_commands_become_one_script_with_the_shebang() {
        let shell = ShellProvisioner::new(
            config(serde_json::json!({"inline": ["cd /etc", "ls"]})),
            Vec::new(),
            serde_json::json!({}),
        );
        assert_eq!(shell.scripts.len(), 1);
        assert_eq!(shell.scripts[0].content, b"#!/bin/sh -e\ncd /etc\nls\n");
    }

    #[test]
    fn exactly_one_source_of_commands() {
        assert!(!config(serde_json::json!({})).problems().is_empty());
        assert!(
            !config(serde_json::json!({"inline": ["x"], "script": "a.sh"}))
                .problems()
                .is_empty()
        );
        assert!(
            config(serde_json::json!({"inline": ["x"]}))
                .problems()
                .is_empty()
        );
        let bad_env = config(serde_json::json!({"inline": ["x"], "env": {"1X": "y"}}));
        assert_eq!(bad_env.problems()[0].field, "env");
    }
}
