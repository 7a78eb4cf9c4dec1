//! The shell provisioner against a real OpenSSH server on loopback: what a
//! `[[provision]] type = "shell"` table does on a machine.

use imgbuild_core::events::MemorySink;
use imgbuild_core::{Event, Level, Stream};
use imgbuild_provisioners::shell::{Script, ShellConfig, ShellProvisioner};
use imgbuild_provisioners::{
    Communicator, ExitStatus, ProvisionContext, ProvisionError, Provisioner,
};
use imgbuild_test_support::common::{provision_context, wait_until};
use imgbuild_test_support::sshd::{Machine, is_sleeping, tracked_pid, tracked_sleep};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A bound that only catches a hang: far beyond what any step here needs
/// even on a loaded machine.
const HANG: Duration = Duration::from_secs(60);
/// How long the scripts that must be stopped would otherwise run: well
/// beyond `HANG`, so that a script left running cannot end in time.
const LONG_SLEEP: u32 = 600;

/// Shell provisioners for a [`Machine`] (a type of the support crate).
trait Shell {
    fn shell(&self, config: serde_json::Value) -> Provisioner;
    fn shell_with_scripts(&self, config: serde_json::Value, scripts: Vec<Script>) -> Provisioner;
}

impl Shell for Machine {
    /// Like [`shell_in_tmp`], but scripts go to this test's own folder
    /// unless the config names one: a script whose run fails is left
    /// behind, and this "machine" is the host the tests run on.
    fn shell(&self, config: serde_json::Value) -> Provisioner {
        self.shell_with_scripts(config, Vec::new())
    }

    fn shell_with_scripts(
        &self,
        mut config: serde_json::Value,
        scripts: Vec<Script>,
    ) -> Provisioner {
        config
            .as_object_mut()
            .expect("a config table")
            .entry("remote_folder")
            .or_insert_with(|| json!(self.path("scripts")));
        shell_with_scripts_in_tmp(config, scripts)
    }
}

/// A provision run's context and the events it logged.
struct Run {
    cx: ProvisionContext,
    sink: Arc<MemorySink>,
}

impl Run {
    fn new() -> Run {
        let (cx, sink) = provision_context();
        Run { cx, sink }
    }

    async fn provision(
        &self,
        machine: &Machine,
        provisioner: &Provisioner,
    ) -> Result<(), ProvisionError> {
        provisioner.run(machine.comm.as_ref(), &self.cx).await
    }

    fn output(&self) -> Vec<(Stream, String)> {
        self.sink
            .events()
            .into_iter()
            .filter_map(|event| match event {
                Event::Output { stream, line, .. } => Some((stream, line)),
                _ => None,
            })
            .collect()
    }

    fn stdout(&self) -> Vec<String> {
        self.output()
            .into_iter()
            .filter(|(stream, _)| *stream == Stream::Stdout)
            .map(|(_, line)| line)
            .collect()
    }

    fn messages(&self, wanted: Level) -> Vec<String> {
        self.sink
            .events()
            .into_iter()
            .filter_map(|event| match event {
                Event::Message { level, message, .. } if level == wanted => Some(message),
                _ => None,
            })
            .collect()
    }

    /// Waits until the remote side printed `line` on stdout, so a test
    /// knows the script is running.
    async fn wait_for_output(&self, line: &str) {
        self.wait_for_line(Stream::Stdout, line).await;
    }

    /// Waits until `line` has reached the log on `stream`.
    async fn wait_for_line(&self, stream: Stream, line: &str) {
        let wanted = (stream, line.to_owned());
        wait_until(&format!("{wanted:?} is logged"), HANG, || {
            self.output().contains(&wanted)
        })
        .await;
    }
}

/// A shell provisioner from its config table (as JSON), the scripts read
/// by the caller as the config loader does. Scripts go to the default
/// `remote_folder`, /tmp, unless the config says otherwise.
fn shell_with_scripts_in_tmp(config: serde_json::Value, scripts: Vec<Script>) -> Provisioner {
    let config: ShellConfig = serde_json::from_value(config).unwrap();
    let problems = config.problems();
    assert!(
        problems.is_empty(),
        "the test's config is invalid: {problems:?}"
    );
    Provisioner::new(ShellProvisioner::new(
        config,
        scripts,
        json!({"build": {"name": "test-vm"}}),
    ))
}

fn shell_in_tmp(config: serde_json::Value) -> Provisioner {
    shell_with_scripts_in_tmp(config, Vec::new())
}

/// Writes script files into `dir` and reads them back as the config loader
/// would: the `script`/`scripts` paths, and the scripts to upload.
fn script_files(dir: &Path, files: &[(&str, &str)]) -> (Vec<String>, Vec<Script>) {
    let mut paths = Vec::new();
    let mut scripts = Vec::new();
    for (name, body) in files {
        let path = dir.join(name);
        std::fs::write(&path, body).unwrap();
        scripts.push(Script {
            name: path.display().to_string(),
            content: std::fs::read(&path).unwrap(),
        });
        paths.push(path.display().to_string());
    }
    (paths, scripts)
}

/// A shell line that kills the SSH session process the script runs under
/// (its nearest sshd ancestor), dropping the connection as a reboot would.
const DROP_OWN_CONNECTION: &str = r#"pid=$$
while :; do
  pid=$(sed 's/.*) //' /proc/$pid/stat | cut -d' ' -f2)
  if [ "$pid" -le 1 ]; then echo 'no sshd ancestor' >&2; exit 99; fi
  case "$(cat /proc/$pid/comm)" in sshd*) break ;; esac
done
kill -9 "$pid"
sleep 5"#;

#[tokio::test]
async fn inline_commands_run_as_one_script_so_cd_and_variables_carry_over() {
    let machine = Machine::start().await;
    machine
        .sh(&format!("mkdir -p {}/sub", machine.dir.display()))
        .await;
    let run = Run::new();
    let provisioner = machine.shell(json!({"inline": [
        format!("cd {}", machine.dir.display()),
        "GREETING=hello",
        "cd sub",
        r#"echo "$GREETING from $(pwd)""#,
    ]}));
    run.provision(&machine, &provisioner).await.unwrap();
    assert_eq!(
        run.stdout(),
        [format!("hello from {}/sub", machine.dir.display())]
    );
    assert!(
        run.messages(Level::Info)
            .contains(&"running inline commands".to_owned()),
        "{:?}",
        run.messages(Level::Info)
    );
}

#[tokio::test]
async fn inline_commands_run_under_the_default_shebang_which_stops_at_the_first_failure() {
    let machine = Machine::start().await;
    let run = Run::new();
    let provisioner =
        machine.shell(json!({"inline": ["echo before", "false", "echo not reached"]}));
    let err = run.provision(&machine, &provisioner).await.unwrap_err();
    assert!(
        matches!(
            err,
            ProvisionError::CommandFailed {
                status: ExitStatus::Code(1),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(run.stdout(), ["before"]);
}

#[tokio::test]
async fn inline_shebang_chooses_the_interpreter() {
    let machine = Machine::start().await;
    let run = Run::new();
    // `[[ ]]` and BASH_VERSION exist in bash, not in a POSIX sh like dash.
    let provisioner = machine.shell(json!({
        "inline_shebang": "/bin/bash -e",
        "inline": [r#"[[ -n "$BASH_VERSION" ]] && echo "bash it is""#],
    }));
    run.provision(&machine, &provisioner).await.unwrap();
    assert_eq!(run.stdout(), ["bash it is"]);
}

#[tokio::test]
async fn env_values_arrive_verbatim_however_shell_like_they_are() {
    let machine = Machine::start().await;
    // Would be created if a value were ever run instead of passed on.
    let canary = machine.dir.join("pwned");
    let backticks = format!("`touch {}` `id`", canary.display());
    let tricky = [
        ("QUOTES", r#"it's "quoted" and 'single'"#),
        ("DOLLAR", "$HOME ${PATH} $(id -u) $$"),
        ("BACKTICKS", &backticks),
        ("AMPERSAND", "a && b & c; d | e > f"),
        ("NEWLINES", "line one\nline two\n\nline four"),
        ("BACKSLASH", r"C:\temp\new \' \\"),
        ("EMPTY", ""),
    ];
    let env: serde_json::Map<String, serde_json::Value> = tricky
        .iter()
        .map(|(name, value)| ((*name).to_owned(), json!(value)))
        .collect();
    let dump: Vec<String> = tricky
        .iter()
        .map(|(name, _)| format!(r#"printf '%s' "${name}" > {}"#, machine.path(name)))
        .collect();
    let mut inline = vec![format!("mkdir -p {}", machine.dir.display())];
    inline.extend(dump);
    let run = Run::new();
    run.provision(
        &machine,
        &machine.shell(json!({"env": env, "inline": inline})),
    )
    .await
    .unwrap();
    for (name, value) in tricky {
        let arrived = std::fs::read_to_string(machine.dir.join(name)).unwrap();
        assert_eq!(arrived, value, "{name} changed on the way");
    }
    assert!(!canary.exists(), "a backtick ran");
}

#[tokio::test]
async fn a_script_file_is_uploaded_and_run() {
    let machine = Machine::start().await;
    let local = tempfile::tempdir().unwrap();
    let (paths, scripts) = script_files(
        local.path(),
        &[("setup.sh", "#!/bin/sh\necho \"setup ran as $(id -un)\"\n")],
    );
    let run = Run::new();
    run.provision(
        &machine,
        &machine.shell_with_scripts(json!({"script": paths[0]}), scripts),
    )
    .await
    .unwrap();
    assert_eq!(
        run.stdout(),
        [format!("setup ran as {}", machine.server.username())]
    );
    assert!(
        run.messages(Level::Info)
            .contains(&format!("running {}", paths[0])),
        "{:?}",
        run.messages(Level::Info)
    );
}

#[tokio::test]
async fn scripts_run_in_the_order_given() {
    let machine = Machine::start().await;
    let log = machine.path("order.log");
    let local = tempfile::tempdir().unwrap();
    // Names that sort the other way round, so order is not alphabetical.
    let (paths, scripts) = script_files(
        local.path(),
        &[
            (
                "c-first.sh",
                &format!("#!/bin/sh\necho first >> {log}\necho first\n"),
            ),
            (
                "b-second.sh",
                &format!("#!/bin/sh\necho second >> {log}\necho second\n"),
            ),
            (
                "a-third.sh",
                &format!("#!/bin/sh\necho third >> {log}\necho third\n"),
            ),
        ],
    );
    machine
        .sh(&format!("mkdir -p {}", machine.dir.display()))
        .await;
    let run = Run::new();
    run.provision(
        &machine,
        &machine.shell_with_scripts(json!({"scripts": paths}), scripts),
    )
    .await
    .unwrap();
    assert_eq!(run.stdout(), ["first", "second", "third"]);
    assert_eq!(
        machine.sh(&format!("cat {log}")).await,
        ["first", "second", "third"]
    );
}

#[tokio::test]
async fn the_default_execute_command_runs_the_script_itself_with_env_set() {
    let machine = Machine::start().await;
    let run = Run::new();
    // Run directly, the script's own shebang applies: bash, not sh.
    let local = tempfile::tempdir().unwrap();
    let (paths, scripts) = script_files(
        local.path(),
        &[(
            "bash.sh",
            "#!/bin/bash\necho \"${BASH_VERSION:+bash} $NAME\"\n",
        )],
    );
    run.provision(
        &machine,
        &machine.shell_with_scripts(
            json!({"script": paths[0], "env": {"NAME": "value"}}),
            scripts,
        ),
    )
    .await
    .unwrap();
    assert_eq!(run.stdout(), ["bash value"]);
}

#[tokio::test]
async fn a_custom_execute_command_wraps_the_script_with_path_vars_and_config_values() {
    let machine = Machine::start().await;
    let run = Run::new();
    let provisioner = machine.shell(json!({
        "inline": [r#"echo "$PREFIX $NAME $0""#],
        "env": {"NAME": "it's me"},
        "execute_command":
            "echo 'wrapped for {{ build.name }}' && PREFIX=from-command {{ vars }} sh {{ path }}",
    }));
    run.provision(&machine, &provisioner).await.unwrap();
    let stdout = run.stdout();
    assert_eq!(stdout.len(), 2, "{stdout:?}");
    assert_eq!(stdout[0], "wrapped for test-vm");
    assert!(
        stdout[1].starts_with(&format!(
            "from-command it's me {}/imgbuild-shell-",
            machine.path("scripts")
        )) && stdout[1].ends_with(".sh"),
        "{stdout:?}"
    );
}

#[tokio::test]
async fn stdout_and_stderr_lines_arrive_as_output_events_in_order_on_their_streams() {
    let machine = Machine::start().await;
    machine
        .sh(&format!("mkdir -p {}", machine.dir.display()))
        .await;
    // The streams travel separately, so only the order within one is
    // guaranteed; the script switches streams only once the test has seen
    // the previous lines logged, which also shows that lines reach the log
    // while the script still runs.
    let seen = [machine.path("out-seen"), machine.path("err-seen")];
    let wait_for = |flag: &str| format!("until [ -e {flag} ]; do sleep 0.05; done");
    let provisioner = machine.shell(json!({"inline": [
        "echo out 1",
        "echo out 2",
        wait_for(&seen[0]),
        "echo err 1 >&2",
        "printf 'err 2\\n' >&2",
        wait_for(&seen[1]),
        "echo out 3",
        "printf 'no newline at the end'",
    ]}));
    let run = Arc::new(Run::new());
    let running = {
        let (comm, run) = (machine.comm.clone(), run.clone());
        tokio::spawn(async move { provisioner.run(comm.as_ref(), &run.cx).await })
    };
    run.wait_for_line(Stream::Stdout, "out 2").await;
    machine.sh(&format!("touch {}", seen[0])).await;
    run.wait_for_line(Stream::Stderr, "err 2").await;
    machine.sh(&format!("touch {}", seen[1])).await;
    tokio::time::timeout(HANG, running)
        .await
        .expect("the script did not finish")
        .unwrap()
        .unwrap();
    assert_eq!(
        run.output(),
        [
            (Stream::Stdout, "out 1".to_owned()),
            (Stream::Stdout, "out 2".to_owned()),
            (Stream::Stderr, "err 1".to_owned()),
            (Stream::Stderr, "err 2".to_owned()),
            (Stream::Stdout, "out 3".to_owned()),
            (Stream::Stdout, "no newline at the end".to_owned()),
        ]
    );
}

#[tokio::test]
async fn a_failing_script_reports_its_name_the_exit_code_and_the_last_output_lines() {
    let machine = Machine::start().await;
    let local = tempfile::tempdir().unwrap();
    let (paths, scripts) = script_files(
        local.path(),
        &[(
            "install.sh",
            "#!/bin/sh\nfor i in $(seq 1 30); do echo \"step $i\"; done\necho 'E: Unable to locate package nope' >&2\nexit 7\n",
        )],
    );
    let run = Run::new();
    let err = run
        .provision(
            &machine,
            &machine.shell_with_scripts(json!({"script": paths[0]}), scripts),
        )
        .await
        .unwrap_err();
    let text = err.to_string();
    eprintln!("{text}");
    assert!(text.contains(&paths[0]), "names the script: {text}");
    assert!(
        text.contains(&format!("{}/imgbuild-shell-", machine.path("scripts"))),
        "names the command: {text}"
    );
    assert!(text.contains("exit code 7"), "{text}");
    assert!(text.contains("(accepted: 0)"), "{text}");
    assert!(text.contains("last output lines"), "{text}");
    assert!(text.contains("E: Unable to locate package nope"), "{text}");
    let ProvisionError::CommandFailed { status, tail, .. } = err else {
        panic!("not a command failure: {text}");
    };
    assert_eq!(status, ExitStatus::Code(7));
    // The last 20 lines, stderr included, in the order they came.
    let mut expected: Vec<String> = (12..=30).map(|i| format!("step {i}")).collect();
    expected.push("E: Unable to locate package nope".to_owned());
    assert_eq!(tail, expected);
    // Everything still reached the log.
    assert_eq!(run.output().len(), 31);
}

#[tokio::test]
async fn valid_exit_codes_accept_the_listed_codes_and_only_those() {
    let machine = Machine::start().await;
    let run = Run::new();
    let accepted =
        machine.shell(json!({"inline": ["echo partial", "exit 3"], "valid_exit_codes": [0, 3]}));
    run.provision(&machine, &accepted).await.unwrap();
    assert_eq!(run.stdout(), ["partial"]);

    let rejected = machine.shell(json!({"inline": ["exit 4"], "valid_exit_codes": [0, 3]}));
    let err = Run::new().provision(&machine, &rejected).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("exit code 4"), "{text}");
    assert!(text.contains("(accepted: 0, 3)"), "{text}");
}

#[tokio::test]
async fn the_uploaded_script_is_removed_from_tmp_after_the_run() {
    let machine = Machine::start().await;
    let run = Run::new();
    run.provision(&machine, &shell_in_tmp(json!({"inline": ["echo \"$0\""]})))
        .await
        .unwrap();
    let stdout = run.stdout();
    let script = &stdout[0];
    assert!(script.starts_with("/tmp/imgbuild-shell-"), "{stdout:?}");
    assert_eq!(
        machine
            .sh(&format!("test -e {script} && echo left || echo gone"))
            .await,
        ["gone"]
    );
}

#[tokio::test]
async fn scripts_go_to_a_custom_remote_folder_and_are_removed_from_it() {
    let machine = Machine::start().await;
    // Not there yet, and in need of quoting.
    let folder = machine.path("script folder/it's here");
    let run = Run::new();
    let provisioner = machine.shell(json!({
        "inline": [r#"echo "$0""#, r#"ls -A "$(dirname "$0")""#],
        "remote_folder": format!("{folder}/"),
    }));
    run.provision(&machine, &provisioner).await.unwrap();
    let stdout = run.stdout();
    assert_eq!(stdout.len(), 3, "{stdout:?}");
    let script = stdout[0]
        .strip_prefix(&format!("{folder}/"))
        .unwrap_or_else(|| panic!("not uploaded into {folder}: {stdout:?}"));
    assert!(
        script.starts_with("imgbuild-shell-") && script.ends_with(".sh"),
        "{stdout:?}"
    );
    // While it runs, the script has only the note of its process group
    // (for stopping it on a timeout or cancel) beside it.
    assert_eq!(
        stdout[1..],
        [script.to_owned(), format!("{script}.pgid")],
        "the script is alone in the folder while it runs"
    );
    let left: Vec<_> = std::fs::read_dir(&folder).unwrap().collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[tokio::test]
async fn a_timeout_stops_a_script_that_runs_too_long() {
    let machine = Machine::start().await;
    machine
        .sh(&format!("mkdir -p {}", machine.dir.display()))
        .await;
    let pid_file = machine.dir.join("sleep.pid");
    let run = Run::new();
    // Long enough for the script to reach its sleep on a loaded machine.
    let limit = Duration::from_secs(5);
    let provisioner = machine.shell(json!({
        "inline": [
            "echo started",
            tracked_sleep(&machine.path("sleep.pid"), LONG_SLEEP),
            "echo finished",
        ],
        "timeout": "5s",
    }));
    let started = Instant::now();
    let err = tokio::time::timeout(HANG, run.provision(&machine, &provisioner))
        .await
        .expect("the timeout did not end the run")
        .unwrap_err();
    let elapsed = started.elapsed();
    eprintln!("{err} (after {elapsed:?})");
    assert!(
        matches!(&err, ProvisionError::Timeout { after, .. } if *after == limit),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("inline commands"), "{text}");
    assert!(text.contains("timed out after 5s"), "{text}");
    assert!(elapsed >= limit, "{elapsed:?}");
    assert_eq!(run.stdout(), ["started"]);
    // Stopped on the machine too, not just no longer waited for.
    let pid = tracked_pid(&pid_file).expect("the script never got to its sleep");
    wait_until("the timed-out script's sleep is killed", HANG, || {
        !is_sleeping(pid)
    })
    .await;
    // The connection is still usable afterwards.
    assert_eq!(machine.sh("echo fine").await, ["fine"]);
}

#[tokio::test]
async fn max_retries_runs_a_failing_script_again_until_it_succeeds() {
    let machine = Machine::start().await;
    machine
        .sh(&format!("mkdir -p {}", machine.dir.display()))
        .await;
    let marker = machine.path("tried-once");
    let run = Run::new();
    let provisioner = machine.shell(json!({
        "inline": [
            format!("if [ -e {marker} ]; then echo 'second attempt'; exit 0; fi"),
            format!("touch {marker}"),
            "echo 'first attempt fails' >&2",
            "exit 1",
        ],
        "max_retries": 2,
    }));
    run.provision(&machine, &provisioner).await.unwrap();
    assert_eq!(
        run.output(),
        [
            (Stream::Stderr, "first attempt fails".to_owned()),
            (Stream::Stdout, "second attempt".to_owned()),
        ]
    );
    let warnings = run.messages(Level::Warn);
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("retry 1 of 2"), "{warnings:?}");
    assert!(warnings[0].contains("exit code 1"), "{warnings:?}");
}

#[tokio::test]
async fn without_retries_a_failing_script_fails_the_first_time() {
    let machine = Machine::start().await;
    machine
        .sh(&format!("mkdir -p {}", machine.dir.display()))
        .await;
    let counter = machine.path("attempts");
    let run = Run::new();
    let provisioner = machine.shell(json!({"inline": [format!("echo x >> {counter}"), "exit 1"]}));
    run.provision(&machine, &provisioner).await.unwrap_err();
    assert_eq!(machine.sh(&format!("cat {counter}")).await, ["x"]);
    assert!(run.messages(Level::Warn).is_empty());
}

#[tokio::test]
async fn pause_before_waits_before_running_the_script() {
    let machine = Machine::start().await;
    let run = Run::new();
    // The script says when it started, by the clock this test reads too
    // (the "machine" is this host): the pause must come before it, not
    // merely somewhere in the run.
    let provisioner = machine.shell(json!({"inline": ["date +%s%N"], "pause_before": "400ms"}));
    let started = std::time::SystemTime::now();
    run.provision(&machine, &provisioner).await.unwrap();
    let stdout = run.stdout();
    let script_started = stdout
        .first()
        .and_then(|nanos| nanos.parse::<u64>().ok())
        .map(|nanos| std::time::UNIX_EPOCH + Duration::from_nanos(nanos))
        .unwrap_or_else(|| panic!("no start time printed: {stdout:?}"));
    let paused = script_started.duration_since(started).unwrap_or_default();
    assert!(
        paused >= Duration::from_millis(400),
        "the script started {paused:?} after the run"
    );
    assert!(
        run.messages(Level::Info)
            .iter()
            .any(|m| m.contains("pausing 400ms")),
        "{:?}",
        run.messages(Level::Info)
    );
}

#[tokio::test]
async fn with_expect_disconnect_a_dropped_connection_succeeds_and_the_next_provisioner_reconnects()
{
    let machine = Machine::start().await;
    // Outside /tmp, which a real reboot might have cleared.
    let folder = machine.path("scripts");
    let run = Run::new();
    let rebooting = machine.shell(json!({
        "inline": ["echo going down", DROP_OWN_CONNECTION],
        "expect_disconnect": true,
        "remote_folder": folder,
    }));
    let started = Instant::now();
    run.provision(&machine, &rebooting).await.unwrap();
    eprintln!("disconnect and reconnect took {:?}", started.elapsed());
    assert_eq!(run.stdout(), ["going down"]);
    assert!(
        run.messages(Level::Info)
            .iter()
            .any(|m| m.contains("disconnected as expected")),
        "{:?}",
        run.messages(Level::Info)
    );

    let next = Run::new();
    next.provision(
        &machine,
        &machine.shell(json!({"inline": ["echo back again"]})),
    )
    .await
    .unwrap();
    assert_eq!(next.stdout(), ["back again"]);
    // Once back, the script was removed like any other.
    assert_eq!(
        machine.sh(&format!("ls -A {folder}")).await,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn with_expect_disconnect_a_script_that_exits_normally_also_succeeds_and_is_removed() {
    let machine = Machine::start().await;
    let run = Run::new();
    let provisioner = shell_in_tmp(json!({
        "inline": ["echo no reboot after all", r#"echo "$0""#],
        "expect_disconnect": true,
    }));
    run.provision(&machine, &provisioner).await.unwrap();
    let stdout = run.stdout();
    assert_eq!(stdout[0], "no reboot after all");
    let script = &stdout[1];
    assert!(script.starts_with("/tmp/imgbuild-shell-"), "{stdout:?}");
    assert_eq!(
        machine
            .sh(&format!("test -e {script} && echo left || echo gone"))
            .await,
        ["gone"],
        "nothing rebooted, so nothing else would remove it"
    );
    assert_eq!(
        machine.sh("echo still connected").await,
        ["still connected"]
    );
}

#[tokio::test]
async fn an_unexpected_disconnect_fails_and_says_to_set_expect_disconnect() {
    let machine = Machine::start().await;
    let run = Run::new();
    let rebooting = machine.shell(json!({"inline": ["echo going down", DROP_OWN_CONNECTION]}));
    let started = Instant::now();
    let err = tokio::time::timeout(HANG, run.provision(&machine, &rebooting))
        .await
        .expect("the disconnect was never noticed")
        .unwrap_err();
    let text = err.to_string();
    eprintln!("{text} (after {:?})", started.elapsed());
    assert!(
        matches!(err, ProvisionError::UnexpectedDisconnect(_)),
        "{text}"
    );
    assert!(text.contains("set `expect_disconnect = true`"), "{text}");
    assert!(text.contains(&machine.comm.target()), "{text}");
    // Noticed from the connection closing, not from keepalives going
    // unanswered long after.
    assert!(text.contains("the connection was closed"), "{text}");
}

#[tokio::test]
async fn a_disconnect_caused_from_outside_is_also_survived_with_expect_disconnect() {
    let mut machine = Machine::start().await;
    let run = Arc::new(Run::new());
    let provisioner = machine.shell(json!({
        "inline": ["echo waiting to be cut off", "sleep 30"],
        "expect_disconnect": true,
    }));
    let running = {
        let (comm, run) = (machine.comm.clone(), run.clone());
        tokio::spawn(async move { provisioner.run(comm.as_ref(), &run.cx).await })
    };
    run.wait_for_output("waiting to be cut off").await;
    machine.server.kill_sessions();
    tokio::time::timeout(HANG, running)
        .await
        .expect("the provisioner did not notice the disconnect")
        .unwrap()
        .unwrap();
    assert!(
        run.messages(Level::Info)
            .iter()
            .any(|m| m.contains("disconnected as expected")),
        "{:?}",
        run.messages(Level::Info)
    );
    assert_eq!(machine.sh("echo reconnected").await, ["reconnected"]);
}

#[tokio::test]
async fn cancelling_the_build_stops_the_running_script_on_the_machine() {
    let machine = Machine::start().await;
    machine
        .sh(&format!("mkdir -p {}", machine.dir.display()))
        .await;
    let pid_file = machine.dir.join("sleep.pid");
    let run = Arc::new(Run::new());
    let provisioner = machine.shell(json!({"inline": [
        "echo working",
        tracked_sleep(&machine.path("sleep.pid"), LONG_SLEEP),
        "echo finished",
    ]}));
    let running = {
        let (comm, run) = (machine.comm.clone(), run.clone());
        tokio::spawn(async move { provisioner.run(comm.as_ref(), &run.cx).await })
    };
    run.wait_for_output("working").await;
    wait_until("the script sleeps", HANG, || {
        tracked_pid(&pid_file).is_some()
    })
    .await;
    let pid = tracked_pid(&pid_file).unwrap();
    run.cx.cancel.cancel();
    let result = tokio::time::timeout(HANG, running)
        .await
        .expect("cancellation did not end the run")
        .unwrap();
    assert!(
        matches!(result, Err(ProvisionError::Cancelled)),
        "{result:?}"
    );
    // The machine must not go on provisioning behind the build's back
    // (and into the image being saved).
    wait_until("the cancelled script's sleep is killed", HANG, || {
        !is_sleeping(pid)
    })
    .await;
    assert_eq!(run.stdout(), ["working"]);
    assert_eq!(machine.sh("echo usable").await, ["usable"]);
}

#[tokio::test]
async fn cancelling_during_pause_before_returns_cancelled_without_running() {
    let machine = Machine::start().await;
    let run = Arc::new(Run::new());
    // Far beyond `HANG`: only cancellation can end the pause in time.
    let provisioner = machine.shell(json!({"inline": ["echo ran"], "pause_before": "1h"}));
    let running = {
        let (comm, run) = (machine.comm.clone(), run.clone());
        tokio::spawn(async move { provisioner.run(comm.as_ref(), &run.cx).await })
    };
    // Cancelled during the pause, not before the run starts.
    wait_until("the pause starts", HANG, || {
        run.messages(Level::Info)
            .iter()
            .any(|m| m.starts_with("pausing 1h"))
    })
    .await;
    run.cx.cancel.cancel();
    let result = tokio::time::timeout(HANG, running)
        .await
        .expect("cancellation did not end the pause")
        .unwrap();
    assert!(
        matches!(result, Err(ProvisionError::Cancelled)),
        "{result:?}"
    );
    assert!(run.stdout().is_empty());
}

#[tokio::test]
async fn output_without_newlines_reaches_the_log_in_bounded_lines() {
    use imgbuild_provisioners::communicator::MAX_LINE_BYTES;
    let machine = Machine::start().await;
    let run = Run::new();
    // 8 MiB with no newline, and a `\r` progress bar: what `cat` of a binary
    // file or a download tool prints.
    let provisioner = machine.shell(json!({"inline": [
        "head -c 8388608 /dev/zero | tr '\\0' x",
        "for i in $(seq 1 20000); do printf '\\r%05d%%' $i; done",
        "echo",
        "echo done",
    ]}));
    run.provision(&machine, &provisioner).await.unwrap();
    let stdout = run.stdout();
    let longest = stdout.iter().map(String::len).max().unwrap();
    assert!(
        longest <= MAX_LINE_BYTES,
        "a line of {longest} bytes reached the log"
    );
    let total: usize = stdout.iter().map(String::len).sum();
    assert!(total >= 8 << 20, "output was lost: {total} bytes");
    assert_eq!(stdout.last().map(String::as_str), Some("done"));
}

#[tokio::test]
async fn a_secret_in_env_stays_masked_in_its_shell_quoted_form() {
    let machine = Machine::start().await;
    let run = Run::new();
    let secret = "it's-a-s3cret \"value\"";
    run.cx.log.redactor().add(secret);
    let provisioner = machine.shell(json!({
        "env": {"PW": secret},
        "execute_command": "{{ vars }} sh {{ path }}",
        "inline": ["echo \"$PW\"", "exit 3"],
    }));
    let err = run.provision(&machine, &provisioner).await.unwrap_err();
    // The failure names the command, where the value is quoted for the
    // shell: PW='it'\''s-a-s3cret "value"'. The build reports it through
    // the log, as the pipeline does.
    run.cx.log.error(err.to_string());
    let events = serde_json::to_string(&run.sink.events()).unwrap();
    assert!(events.contains("PW='<sensitive>'"), "{events}");
    assert!(!events.contains("s3cret"), "{events}");
}
