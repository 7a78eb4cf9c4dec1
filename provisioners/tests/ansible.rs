//! The ansible and ansible-local provisioners with Debian's real
//! ansible-playbook, against sshd containers from the test fixture image
//! (tests/fixtures/sshd-target): what a `[[provision]] type = "ansible"`
//! table does to a machine, what it leaves behind, and how it fails.

use imgbuild_core::events::MemorySink;
use imgbuild_core::{CancellationToken, Event};
use imgbuild_provisioners::registry::{self, ParseError, ParseInput};
use imgbuild_provisioners::ssh::{SshAuth, SshCommunicator, SshTarget, TemporaryKey};
use imgbuild_provisioners::{ProvisionContext, ProvisionError, Provisioner};
use imgbuild_test_support::common::{
    processes_mentioning, provision_context, test_log, wait_until,
};
use imgbuild_test_support::docker::SshTarget as Container;
use imgbuild_test_support::harness::{ansible, ansible_fixtures};
use imgbuild_test_support::sshd::{
    self, Machine, PasswordUser, ServerOptions, SshServer, test_wait_options,
};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// Only catches a hang: far beyond what any play here needs on a loaded
/// machine.
const HANG: Duration = Duration::from_secs(300);

/// An sshd container logged in to as `admin` (passwordless sudo) with a
/// key of its own, and the communicator a builder would hand over.
struct Target {
    container: Container,
    comm: Arc<SshCommunicator>,
}

impl Target {
    async fn start() -> Target {
        let key = TemporaryKey::generate().unwrap();
        let container = Container::start("admin", Some(key.public_openssh()));
        let comm = SshCommunicator::connect(
            SshTarget {
                host: container.host.clone(),
                port: container.port,
            },
            "admin".to_owned(),
            key.auth(),
            test_wait_options(Duration::from_secs(60)),
            CancellationToken::new(),
            test_log().0,
            None,
        )
        .await
        .unwrap();
        Target {
            container,
            comm: Arc::new(comm),
        }
    }

    /// What `command` printed in the container; panics when it fails.
    fn exec(&self, command: &str) -> String {
        self.container.exec(command)
    }
}

/// Parses a `[[provision]]` table (without `type`) as the config loader
/// does, for build `build`.
fn parse(kind: &str, table: &str, build: &str) -> Result<Provisioner, ParseError> {
    let document = toml::de::DeTable::parse(table).unwrap();
    let span = document.span();
    let value = toml::Spanned::new(span, toml::de::DeValue::Table(document.into_inner()));
    let context = serde_json::json!({ "build": { "name": build, "type": "docker" } });
    registry::find(kind)
        .unwrap_or_else(|| panic!("no provisioner kind `{kind}`"))
        .parse(ParseInput {
            table: &value,
            config_dir: &ansible_fixtures(),
            template_context: &context,
        })
        .map(|parsed| parsed.provisioner)
}

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
        target: &Target,
        provisioner: &Provisioner,
    ) -> Result<(), ProvisionError> {
        tokio::time::timeout(HANG, provisioner.run(target.comm.as_ref(), &self.cx))
            .await
            .expect("the play hung")
    }

    /// Every message and output line, as a transcript.
    fn transcript(&self) -> String {
        self.sink
            .events()
            .into_iter()
            .filter_map(|event| match event {
                Event::Message { message, .. } => Some(message),
                Event::Output { line, .. } => Some(format!("  | {line}")),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The run's private directory, read from the logged command line.
    fn work_dir(&self) -> Option<PathBuf> {
        self.sink
            .events()
            .into_iter()
            .find_map(|event| match event {
                Event::Message { message, .. }
                    if message.starts_with("running ansible-playbook") =>
                {
                    let inventory = message
                        .split_whitespace()
                        .skip_while(|arg| *arg != "-i")
                        .nth(1)?;
                    Path::new(inventory).parent().map(Path::to_path_buf)
                }
                _ => None,
            })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_installs_a_file_a_template_and_runs_its_handler_without_logging_secrets() {
    let target = Target::start().await;
    let secret = "s3cret-token-7f9c2b";
    let provisioner = ansible(
        &format!(
            "playbook_file = \"site.yml\"\nextra_vars = {{ greeting = \"hello from imgbuild\", secret_token = \"{secret}\" }}\n"
        ),
        "web",
    );
    let run = Run::new();
    let result = run.provision(&target, &provisioner).await;
    assert!(result.is_ok(), "{result:?}\n{}", run.transcript());

    assert_eq!(
        target.exec("cat /etc/imgbuild-demo/role-file.txt"),
        "installed by the imgbuild ansible demo role\n"
    );
    // The alias defaults to the build's name; the vars came through the file.
    assert_eq!(
        target.exec("cat /etc/imgbuild-demo/greeting"),
        format!("greeting=hello from imgbuild\nhost=web\ntoken={secret}\n")
    );
    assert_eq!(
        target.exec("cat /etc/imgbuild-demo/handler-ran"),
        "handler ran for web\n"
    );
    let transcript = run.transcript();
    assert!(
        transcript.contains("RUNNING HANDLER [demo : record the handler]"),
        "the play's output is streamed into the build log:\n{transcript}"
    );
    assert!(
        !transcript.contains(secret),
        "the secret reached the log:\n{transcript}"
    );
    let dir = run.work_dir().expect("the command line was logged");
    assert!(!dir.exists(), "{} was left behind", dir.display());
    // Not even the SSH connection multiplexer, which leaves the process
    // group and would otherwise linger for a minute.
    let left = processes_mentioning(&dir.display().to_string());
    assert!(left.is_empty(), "still running: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_fails_the_step_naming_the_task_and_host() {
    let target = Target::start().await;
    let provisioner = ansible(
        "playbook_file = \"fail.yml\"\nhost_alias = \"vm-under-test\"\n",
        "web",
    );
    let run = Run::new();
    let err = run
        .provision(&target, &provisioner)
        .await
        .expect_err("the play has a failing task");
    let message = err.to_string();
    assert!(
        message.starts_with("task `break on purpose` failed on host `vm-under-test`"),
        "{message}"
    );
    assert!(
        message.contains("fatal: [vm-under-test]: FAILED!"),
        "{message}"
    );
    let dir = run.work_dir().expect("the command line was logged");
    assert!(!dir.exists(), "{} was left behind", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_mid_play_stops_ansible_and_removes_its_directory_and_no_secret_is_on_a_command_line()
 {
    let target = Target::start().await;
    let secret = "cmdline-secret-51e0";
    let provisioner = ansible(
        &format!("playbook_file = \"wait.yml\"\nextra_vars = {{ password = \"{secret}\" }}\n"),
        "web",
    );
    let run = Run::new();
    let cancel = run.cx.cancel.clone();
    let task = {
        let cx = run.cx.clone();
        let comm = target.comm.clone();
        let provisioner = provisioner.clone();
        tokio::spawn(async move { provisioner.run(comm.as_ref(), &cx).await })
    };
    wait_until("the play waits for the release", HANG, || {
        run.transcript()
            .contains("TASK [wait for the test to release the play]")
    })
    .await;
    let dir = run.work_dir().expect("the command line was logged");
    let dir_text = dir.display().to_string();
    // The module runs on the machine while ansible-playbook and its ssh
    // connection run here, each with the run's directory in its arguments.
    wait_until("ssh to the machine is running", HANG, || {
        processes_mentioning(&dir_text)
            .iter()
            .any(|cmdline| cmdline.starts_with("ssh "))
    })
    .await;
    let running = processes_mentioning(&dir_text);
    assert!(
        running
            .iter()
            .any(|cmdline| cmdline.contains("ansible-playbook")),
        "{running:?}"
    );
    for cmdline in &running {
        assert!(
            !cmdline.contains(secret),
            "a command line holds the secret: {cmdline}"
        );
    }
    let vars = std::fs::read_to_string(dir.join("extra-vars.json")).unwrap();
    assert!(vars.contains(secret), "the vars file holds the extra vars");
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [
        (dir.clone(), 0o700),
        (dir.join("extra-vars.json"), 0o600),
        (dir.join("inventory.yml"), 0o600),
        (dir.join("key"), 0o600),
    ] {
        let actual = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(actual, mode, "{}", path.display());
    }

    cancel.cancel();
    let result = tokio::time::timeout(HANG, task)
        .await
        .expect("cancel hung")
        .unwrap();
    assert!(
        matches!(result, Err(ProvisionError::Cancelled)),
        "{result:?}"
    );
    wait_until("no process of the run is left", HANG, || {
        processes_mentioning(&dir_text).is_empty()
    })
    .await;
    wait_until("the run's directory is removed", HANG, || !dir.exists()).await;
    assert!(
        !run.transcript().contains(secret),
        "the secret reached the log:\n{}",
        run.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_in_parallel_each_change_only_their_own_machine() {
    let (first, second) = tokio::join!(Target::start(), Target::start());
    let config = |greeting: &str| {
        format!(
            "playbook_file = \"site.yml\"\nextra_vars = {{ greeting = \"{greeting}\" }}\ngroups = [\"webservers\"]\n"
        )
    };
    let (one, two) = (
        ansible(&config("one"), "alpha"),
        ansible(&config("two"), "beta"),
    );
    let (run_one, run_two) = (Run::new(), Run::new());
    let (a, b) = tokio::join!(
        run_one.provision(&first, &one),
        run_two.provision(&second, &two)
    );
    assert!(a.is_ok(), "{a:?}\n{}", run_one.transcript());
    assert!(b.is_ok(), "{b:?}\n{}", run_two.transcript());
    assert_eq!(
        first.exec("cat /etc/imgbuild-demo/greeting"),
        "greeting=one\nhost=alpha\ntoken=none\n"
    );
    assert_eq!(
        second.exec("cat /etc/imgbuild-demo/greeting"),
        "greeting=two\nhost=beta\ntoken=none\n"
    );
    // Each play saw one host: the other build's never appears in its output.
    assert!(
        !run_one.transcript().contains("[beta]"),
        "{}",
        run_one.transcript()
    );
    assert!(
        !run_two.transcript().contains("[alpha]"),
        "{}",
        run_two.transcript()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ansible_local_on_a_machine_without_ansible_says_how_to_install_it() {
    let target = Target::start().await;
    let provisioner = parse("ansible-local", "playbook_file = \"site.yml\"\n", "web")
        .unwrap_or_else(|err| panic!("{err:?}"));
    let run = Run::new();
    let err = run
        .provision(&target, &provisioner)
        .await
        .expect_err("the fixture has no Ansible");
    let message = err.to_string();
    assert!(
        message.starts_with("ansible-playbook is not installed on the machine admin@127.0.0.1:"),
        "{message}"
    );
    assert!(
        message.contains("install it in an earlier shell provisioner"),
        "{message}"
    );
    // Nothing was uploaded to a machine that cannot use it.
    assert_eq!(
        target.exec("ls /tmp | grep -c imgbuild-ansible || true"),
        "0\n"
    );
}

fn problems(kind: &str, table: &str) -> Vec<(String, String)> {
    match parse(kind, table, "web") {
        Err(ParseError::Problems(problems)) => problems
            .into_iter()
            .map(|problem| (problem.field, problem.message))
            .collect(),
        other => panic!("expected config problems, got {other:?}"),
    }
}

#[test]
fn missing_broken_or_non_playbook_files_are_config_problems_on_their_field() {
    for kind in ["ansible", "ansible-local"] {
        let missing = problems(kind, "playbook_file = \"nope.yml\"\n");
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert_eq!(missing[0].0, "playbook_file");
        assert!(missing[0].1.contains("nope.yml"), "{missing:?}");

        let broken = problems(kind, "playbook_file = \"broken.yml\"\n");
        assert_eq!(broken[0].0, "playbook_file");
        assert!(broken[0].1.contains("is not valid YAML"), "{broken:?}");

        // A role's task list is YAML but not a playbook.
        let not_a_play = problems(kind, "playbook_file = \"roles/demo/files/role-file.txt\"\n");
        assert_eq!(not_a_play[0].0, "playbook_file");
        assert!(
            not_a_play[0].1.contains("is not a playbook"),
            "{not_a_play:?}"
        );
    }
    let names = problems(
        "ansible",
        "playbook_file = \"site.yml\"\ngroups = [\"web-servers\", \"all\"]\nhost_alias = \"two words\"\nansible_env_vars = { \"1BAD\" = \"x\" }\ntimeout = \"0s\"\n",
    );
    let fields: Vec<&str> = names.iter().map(|(field, _)| field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "host_alias",
            "groups",
            "groups",
            "ansible_env_vars",
            "timeout"
        ],
        "{names:?}"
    );
    let galaxy = problems(
        "ansible",
        "playbook_file = \"site.yml\"\ngalaxy_file = \"missing-requirements.yml\"\n",
    );
    assert_eq!(galaxy[0].0, "galaxy_file");
    match parse("ansible", "extra_vars = { a = \"b\" }\n", "web") {
        Err(ParseError::Invalid(err)) => {
            assert!(err.to_string().contains("playbook_file"), "{err}")
        }
        other => panic!("a table without playbook_file is invalid: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_play_is_stopped_and_its_directory_removed_before_the_error_returns() {
    let target = Target::start().await;
    let provisioner = ansible("playbook_file = \"wait.yml\"\ntimeout = \"3s\"\n", "web");
    let run = Run::new();
    let err = run
        .provision(&target, &provisioner)
        .await
        .expect_err("the play waits longer than its timeout");
    assert!(
        matches!(&err, ProvisionError::Timeout { after, .. } if *after == Duration::from_secs(3)),
        "{err}"
    );
    let dir = run.work_dir().expect("the command line was logged");
    let left = processes_mentioning(&dir.display().to_string());
    assert!(left.is_empty(), "still running: {left:?}");
    assert!(!dir.exists(), "{} was left behind", dir.display());
}

/// ansible-local's success path needs a machine with Ansible: the local
/// sshd of the other provisioner tests, whose "machine" is this host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ansible_local_runs_the_role_on_the_machine_and_removes_what_it_uploaded() {
    let machine = Machine::start().await;
    let staging = machine.path("staging");
    let demo = machine.path("demo");
    let secret = "local-secret-93d1";
    let provisioner = parse(
        "ansible-local",
        &format!(
            "playbook_file = \"local.yml\"\nstaging_directory = \"{staging}\"\n\
             extra_vars = {{ demo_dir = \"{demo}\", greeting = \"hi\", secret_token = \"{secret}\" }}\n"
        ),
        "web",
    )
    .unwrap_or_else(|err| panic!("{err:?}"));
    let run = Run::new();
    let result = tokio::time::timeout(HANG, provisioner.run(machine.comm.as_ref(), &run.cx))
        .await
        .expect("the play hung");
    assert!(result.is_ok(), "{result:?}\n{}", run.transcript());
    let read = |name: &str| std::fs::read_to_string(Path::new(&demo).join(name)).unwrap();
    assert_eq!(
        read("role-file.txt"),
        "installed by the imgbuild ansible demo role\n"
    );
    assert_eq!(
        read("greeting"),
        format!("greeting=hi\nhost=localhost\ntoken={secret}\n")
    );
    assert_eq!(read("handler-ran"), "handler ran for localhost\n");
    assert!(
        !Path::new(&staging).exists(),
        "the staging directory is left"
    );
    let transcript = run.transcript();
    assert!(
        transcript.contains("TASK [demo : render the greeting]"),
        "{transcript}"
    );
    assert!(!transcript.contains(secret), "{transcript}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ansible_local_names_the_failing_task_and_removes_what_it_uploaded() {
    let machine = Machine::start().await;
    let staging = machine.path("staging");
    let provisioner = parse(
        "ansible-local",
        &format!("playbook_file = \"fail.yml\"\nstaging_directory = \"{staging}\"\n"),
        "web",
    )
    .unwrap_or_else(|err| panic!("{err:?}"));
    let run = Run::new();
    let err = tokio::time::timeout(HANG, provisioner.run(machine.comm.as_ref(), &run.cx))
        .await
        .expect("the play hung")
        .expect_err("the play has a failing task");
    let message = err.to_string();
    assert!(
        message.starts_with("task `break on purpose` failed on host `localhost`"),
        "{message}"
    );
    assert!(
        !Path::new(&staging).exists(),
        "the staging directory is left"
    );
}

/// Runs `program` with `args` in `dir`, expecting success.
fn run_in(dir: &Path, program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn galaxy_roles_and_collections_are_installed_for_this_run_only() {
    // A role tarball and a collection tarball, made here, so the
    // requirements file needs no network.
    let sources = tempfile::tempdir().unwrap();
    let src = sources.path();
    write(
        &src.join("role/greeter/tasks/main.yml"),
        "- name: greet from the galaxy role\n  ansible.builtin.copy:\n    content: \"greeter\\n\"\n    dest: /tmp/from-galaxy-role\n",
    );
    write(
        &src.join("role/greeter/meta/main.yml"),
        "galaxy_info:\n  author: imgbuild\n  description: test role\n  license: MIT\n  min_ansible_version: \"2.9\"\n  platforms: []\ndependencies: []\n",
    );
    run_in(
        &src.join("role"),
        "tar",
        &["-czf", "../greeter.tar.gz", "greeter"],
    );
    run_in(
        src,
        "ansible-galaxy",
        &[
            "collection",
            "init",
            "imgbuild_test.demo",
            "--init-path",
            "collection",
        ],
    );
    write(
        &src.join("collection/imgbuild_test/demo/roles/marker/tasks/main.yml"),
        "- name: mark from the collection\n  ansible.builtin.copy:\n    content: \"collection\\n\"\n    dest: /tmp/from-galaxy-collection\n",
    );
    run_in(
        src,
        "ansible-galaxy",
        &[
            "collection",
            "build",
            "collection/imgbuild_test/demo",
            "--output-path",
            ".",
        ],
    );
    let requirements = src.join("requirements.yml");
    write(
        &requirements,
        &format!(
            "roles:\n  - src: file://{dir}/greeter.tar.gz\n    name: greeter\ncollections:\n  - name: {dir}/imgbuild_test-demo-1.0.0.tar.gz\n    type: file\n",
            dir = src.display()
        ),
    );

    let target = Target::start().await;
    let provisioner = ansible(
        &format!(
            "playbook_file = \"galaxy.yml\"\ngalaxy_file = \"{}\"\n",
            requirements.display()
        ),
        "web",
    );
    let run = Run::new();
    let result = run.provision(&target, &provisioner).await;
    assert!(result.is_ok(), "{result:?}\n{}", run.transcript());
    assert_eq!(target.exec("cat /tmp/from-galaxy-role"), "greeter\n");
    assert_eq!(
        target.exec("cat /tmp/from-galaxy-collection"),
        "collection\n"
    );
    // Installed into the run's own directory, which is gone: not into the
    // user's ~/.ansible, where other builds would pick them up.
    let dir = run.work_dir().expect("the command line was logged");
    assert!(!dir.exists(), "{} was left behind", dir.display());
    let home = PathBuf::from(std::env::var("HOME").unwrap());
    assert!(!home.join(".ansible/roles/greeter").exists());
    assert!(
        !home
            .join(".ansible/collections/ansible_collections/imgbuild_test")
            .exists()
    );
}

/// A build that logs in with a password (no key): Ansible gets the password
/// through sshpass from the 0600 inventory, never on a command line, and it
/// stays out of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_login_reaches_the_machine_through_sshpass() {
    assert!(
        sshd::is_root(),
        "password logins need a local user with a password, and creating one needs root: \
         run the provisioners tests as root, as CI does"
    );
    let user = PasswordUser::create().expect("a local user with a password");
    let server = SshServer::started_with(ServerOptions {
        password_authentication: true,
        ..ServerOptions::default()
    })
    .unwrap();
    let (log, _) = test_log();
    let comm = SshCommunicator::connect(
        server.target(),
        user.name.clone(),
        SshAuth::Password(user.password.clone()),
        test_wait_options(Duration::from_secs(60)),
        CancellationToken::new(),
        log,
        None,
    )
    .await
    .unwrap();
    let demo = format!("/home/{}/demo-{}", user.name, std::process::id());
    let provisioner = ansible(
        &format!(
            "playbook_file = \"local.yml\"\nextra_vars = {{ demo_dir = \"{demo}\", greeting = \"by password\" }}\n"
        ),
        "web",
    );
    let run = Run::new();
    run.cx.log.redactor().add(user.password.as_str());
    let result = tokio::time::timeout(HANG, provisioner.run(&comm, &run.cx))
        .await
        .expect("the play hung");
    assert!(result.is_ok(), "{result:?}\n{}", run.transcript());
    assert_eq!(
        std::fs::read_to_string(Path::new(&demo).join("greeting")).unwrap(),
        "greeting=by password\nhost=web\ntoken=none\n"
    );
    let owner = Command::new("stat")
        .args(["-c", "%U", &demo])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&owner.stdout).trim(),
        user.name,
        "the play ran as the password user"
    );
    let transcript = run.transcript();
    assert!(!transcript.contains(&user.password), "{transcript}");
    let dir = run.work_dir().expect("the command line was logged");
    assert!(!dir.exists(), "{} was left behind", dir.display());
}
