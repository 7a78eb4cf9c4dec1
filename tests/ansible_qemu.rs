//! `imgbuild build` with an `ansible` provisioner on a real QEMU VM (the
//! cloud-init fixture, which has python3): ansible-playbook on this machine
//! logs in with the build's temporary key, and the role's changes are in
//! the produced disk; a failing task fails the build, naming the task.

use imgbuild_test_support::cli::*;
use imgbuild_test_support::common::cloud_vm_image;

#[test]
fn the_ansible_template_bakes_the_roles_changes_into_the_disk() {
    let workspace = Workspace::with_templates();
    workspace
        .imgbuild()
        .args(["build", "qemu-ansible.toml", "--var"])
        .arg(format!("base_image={}", cloud_vm_image()))
        .run()
        .exits_with(EXIT_OK)
        .stderr_has("TASK [baseline : record the image release]")
        .stderr_has("RUNNING HANDLER [baseline : note the release in the changelog]");
    assert!(workspace.qemu_processes().is_empty());
    assert!(workspace.journals().is_empty());
    // The template's test booted the produced image and found the role's
    // changes in effect.
    let manifest = workspace.manifest();
    let entry = &manifest["builds"][0];
    assert_eq!(entry["status"], "tested", "{entry}");
    assert_eq!(entry["tests"][0]["name"], "the baseline role is applied");
    assert_eq!(entry["tests"][0]["passed"], true, "{entry}");
    let disk = workspace.join("output/debian-ansible-1.0.0.qcow2");
    let (release, banner, changelog) = with_mounted_disk(&disk, |root| {
        let read = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
        (
            read("etc/image-release"),
            read("etc/issue.net"),
            read("var/log/image-changelog"),
        )
    });
    assert_eq!(release, "NAME=debian-ansible\nVERSION=1.0.0\n");
    assert_eq!(
        banner,
        "Authorized use only. This machine was built by imgbuild.\n"
    );
    assert_eq!(changelog, "debian-ansible 1.0.0 baked\n");
}

#[test]
fn a_failing_task_exits_1_naming_the_task_and_leaves_no_vm() {
    let workspace = Workspace::new();
    workspace.write(
        "image.toml",
        r#"[image]
name = "ansible-fails"
version = "1.0.0"

[variables]
base_image = { description = "the cloud-init fixture" }

[builders.vm]
type = "qemu"
base_image = "{{ var.base_image }}"
memory = 768
cpus = 1

[builders.vm.ssh]
username = "builder"

[[provision]]
type = "ansible"
playbook_file = "play.yml"
"#,
    );
    workspace.write(
        "play.yml",
        "- hosts: all\n  gather_facts: false\n  tasks:\n    - name: refuse to bake this image\n      ansible.builtin.fail:\n        msg: not today\n",
    );
    let outcome = workspace
        .imgbuild()
        .args(["build", "image.toml", "--var"])
        .arg(format!("base_image={}", cloud_vm_image()))
        .run();
    outcome
        .exits_with(EXIT_BUILD_FAILED)
        .stderr_has("task `refuse to bake this image` failed on host `vm`")
        .stderr_has("not today");
    assert!(workspace.qemu_processes().is_empty());
    assert!(workspace.journals().is_empty());
    assert!(workspace.files_in("output").is_empty());
}
