//! An imgbuild killed outright (SIGKILL) in the middle of an Ansible play
//! leaves no Ansible process and no inventory, key or extra vars behind:
//! the kernel tells the play's supervisor, which stops the whole process
//! group. (The build container is the journal's business: `imgbuild clean`.)

use imgbuild_test_support::cli::*;
use imgbuild_test_support::common::{processes_mentioning, wait_until};
use imgbuild_test_support::docker::sshd_image;
use std::path::PathBuf;
use std::time::Duration;

/// Only catches a hang.
const LIMIT: Duration = Duration::from_secs(300);

#[tokio::test]
async fn a_killed_imgbuild_leaves_no_ansible_process_and_no_credentials() {
    let image = sshd_image();
    let workspace = Workspace::new();
    let repository = format!("imgbuild-test/ansible-killed-{}", std::process::id());
    workspace.write(
        "image.toml",
        &format!(
            r#"[image]
name = "ansible-killed"
version = "1.0.0"

[builders.app]
type = "docker"
image = "{image}"
pull = "never"
repository = "{repository}"

[[provision]]
type = "ansible"
playbook_file = "play/wait.yml"
extra_vars = {{ api_key = "killed-run-secret" }}
"#
        ),
    );
    workspace.write(
        "play/wait.yml",
        "- hosts: all\n  gather_facts: false\n  tasks:\n    - name: wait forever\n      ansible.builtin.wait_for:\n        path: /nonexistent\n        timeout: 3600\n",
    );
    let playbook = workspace.join("play/wait.yml").display().to_string();
    let mut running = workspace
        .imgbuild()
        .args(["build", "image.toml"])
        .spawn(&workspace.join("build.log"));
    running.wait_for_output("TASK [wait forever]", LIMIT);
    let log = running.log();
    let dir: PathBuf = log
        .split_whitespace()
        .find(|word| word.ends_with("/inventory.yml"))
        .map(|inventory| PathBuf::from(inventory).parent().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no inventory path in the log:\n{log}"));
    assert!(dir.join("extra-vars.json").exists());
    assert!(!processes_mentioning(&playbook).is_empty());

    running.signal(libc::SIGKILL);
    let _ = running.wait(LIMIT);
    wait_until("no ansible process of the run is left", LIMIT, || {
        processes_mentioning(&playbook).is_empty()
    })
    .await;
    wait_until("nothing runs from the run's directory", LIMIT, || {
        processes_mentioning(&dir.display().to_string()).is_empty()
    })
    .await;
    wait_until("the run's directory is removed", LIMIT, || !dir.exists()).await;

    workspace
        .imgbuild()
        .args(["clean"])
        .run()
        .exits_with(EXIT_OK);
    let _ = std::process::Command::new("docker")
        .args(["image", "rm", "-f"])
        .arg(format!("{repository}:1.0.0"))
        .output();
}
