//! `imgbuild validate` and `build` reject bad configs before anything is
//! launched, naming the file, line, column and field, and saying what is
//! expected. Exit code 2.

use imgbuild_test_support::cli::*;

/// A valid config around `builder_extra` and `provision`, with a real local
/// base image file so only the part under test can be wrong.
fn config(builder_extra: &str, provision: &str) -> String {
    format!(
        r#"[image]
name = "web"
version = "1.2.3"

[variables]
password = {{ default = "hunter2-secret", sensitive = true }}
mirror = "http://deb.debian.org/debian"

[builders.vm]
type = "qemu"
base_image = "base.qcow2"
cloud_init = false
{builder_extra}
[builders.vm.ssh]
username = "admin"
password = "{{{{ var.password }}}}"

{provision}
"#
    )
}

fn workspace_with(config_text: &str) -> Workspace {
    let workspace = Workspace::new();
    workspace.write("base.qcow2", "not really a disk, but a file");
    workspace.write("image.toml", config_text);
    workspace
}

fn validate(workspace: &Workspace) -> Outcome {
    workspace.imgbuild().args(["validate", "image.toml"]).run()
}

#[test]
fn a_valid_config_validates() {
    let workspace = workspace_with(&config(
        "",
        "[[provision]]\ntype = \"shell\"\ninline = [\"true\"]\n",
    ));
    validate(&workspace)
        .exits_with(EXIT_OK)
        .stdout_has("image.toml is valid: image web 1.2.3, builds: vm");
}

#[test]
fn bad_toml_points_at_the_line() {
    let workspace = workspace_with("[image]\nname = \"web\nversion = \"1\"\n");
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("invalid TOML")
        .stderr_has("image.toml:2:");
}

#[test]
fn unknown_fields_are_rejected_with_a_suggestion() {
    let workspace = workspace_with(&config("memroy = 2048\n", ""));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("builders.vm.memroy: unknown field `memroy`")
        .stderr_has("image.toml:13:1")
        .stderr_has("memroy = 2048")
        .stderr_has("did you mean `memory`?");
}

#[test]
fn wrong_types_name_the_field_and_the_expected_type() {
    let workspace = workspace_with(&config("memory = \"lots\"\n", ""));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("builders.vm.memory")
        .stderr_has("image.toml:13:10")
        .stderr_has("expected u32");
}

#[test]
fn missing_required_fields_are_named() {
    let text = config("", "").replace("base_image = \"base.qcow2\"\n", "");
    let workspace = workspace_with(&text);
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("missing field `base_image`")
        .stderr_has("builders.vm");
}

#[test]
fn a_missing_image_version_is_named() {
    let text = config("", "").replace("version = \"1.2.3\"\n", "");
    let workspace = workspace_with(&text);
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("missing field `version`")
        .stderr_has("image.toml:1:");
}

#[test]
fn unknown_builder_types_are_rejected_with_the_known_ones() {
    let text = config("", "").replace("type = \"qemu\"", "type = \"qemo\"");
    let workspace = workspace_with(&text);
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("unknown builder type `qemo`")
        .stderr_has("image.toml:10:8")
        .stderr_has("did you mean `qemu`?");
}

#[test]
fn unknown_variables_in_templates_point_at_the_reference() {
    let workspace = workspace_with(&config(
        "",
        "[[provision]]\ntype = \"shell\"\ninline = [\"echo {{ var.mirorr }}\"]\n",
    ));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("`var.mirorr` is not defined")
        .stderr_has("image.toml:20:20")
        .stderr_has("provision[0].inline[0]");
}

#[test]
fn unknown_template_functions_are_errors() {
    let workspace = workspace_with(&config(
        "",
        "[[provision]]\ntype = \"shell\"\ninline = [\"echo {{ nosuch() }}\"]\n",
    ));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("unknown function");
}

#[test]
fn values_given_for_unknown_variables_are_rejected() {
    let workspace = workspace_with(&config("", ""));
    workspace
        .imgbuild()
        .args(["validate", "image.toml", "--var", "mirorr=x"])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("`mirorr` is not a variable")
        .stderr_has("did you mean `mirror`?");
}

#[test]
fn required_variables_must_be_given() {
    let text = config("", "").replace(
        "mirror = \"http://deb.debian.org/debian\"",
        "mirror = { description = \"apt mirror\" }",
    );
    let workspace = workspace_with(&text);
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("variable `mirror` has no default")
        .stderr_has("IMGBUILD_VAR_mirror");
    workspace
        .imgbuild()
        .args(["validate", "image.toml"])
        .env("IMGBUILD_VAR_mirror", "http://mirror")
        .run()
        .exits_with(EXIT_OK);
}

#[test]
fn an_only_naming_no_builder_is_rejected() {
    let workspace = workspace_with(&config(
        "",
        "[[provision]]\ntype = \"shell\"\ninline = [\"true\"]\nonly = [\"mv\"]\n",
    ));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("`mv` is not a builder in this config")
        .stderr_has("provision[0].only")
        .stderr_has("did you mean `vm`?");
}

#[test]
fn an_unreadable_script_path_is_rejected() {
    let workspace = workspace_with(&config(
        "",
        "[[provision]]\ntype = \"shell\"\nscript = \"scripts/missing.sh\"\n",
    ));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("cannot read script")
        .stderr_has("scripts/missing.sh")
        .stderr_has("image.toml:20:10")
        .stderr_has("provision[0].script");
}

#[test]
fn a_missing_upload_source_is_rejected() {
    let workspace = workspace_with(&config(
        "",
        "[[provision]]\ntype = \"file\"\nsource = \"files/nope\"\ndestination = \"/tmp/x\"\n",
    ));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("provision[0].source")
        .stderr_has("files/nope");
}

#[test]
fn unknown_provisioner_types_and_sections_are_rejected() {
    let workspace = workspace_with(&format!(
        "{}\n[imgae]\nx = 1\n",
        config("", "[[provision]]\ntype = \"shel\"\ninline = [\"true\"]\n")
    ));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("unknown provisioner type `shel`")
        .stderr_has("did you mean `shell`?")
        .stderr_has("unknown section `imgae`")
        .stderr_has("did you mean `image`?");
}

#[test]
fn builder_level_checks_name_their_field() {
    let workspace = workspace_with(&config("disk_size = \"8X\"\n", ""));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("builders.vm.disk_size: unknown size unit `X`")
        .stderr_has("image.toml:13:13");
}

#[test]
fn a_missing_base_image_file_is_reported_before_anything_runs() {
    let workspace = workspace_with(&config("", ""));
    std::fs::remove_file(workspace.join("base.qcow2")).unwrap();
    workspace
        .imgbuild()
        .args(["build", "image.toml"])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("builders.vm.base_image")
        .stderr_has("does not exist");
    assert!(workspace.journals().is_empty(), "no run may have started");
    assert!(
        !workspace.join("output").exists(),
        "nothing may have been created"
    );
}

#[test]
fn all_problems_are_reported_at_once() {
    let workspace = workspace_with(&config(
        "memroy = 1\n",
        "[[provision]]\ntype = \"shell\"\nscript = \"nope.sh\"\n",
    ));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("unknown field `memroy`")
        .stderr_has("cannot read script")
        .stderr_has("2 problems in the configuration");
}

#[test]
fn json_output_lists_problems_with_locations() {
    let workspace = workspace_with(&config("memroy = 1\n", ""));
    let outcome = workspace
        .imgbuild()
        .args(["--output", "json", "validate", "image.toml"])
        .run()
        .exits_with(EXIT_USAGE);
    let events = outcome.events();
    assert_eq!(events[0]["event"], "config_invalid");
    let problem = &events[0]["problems"][0];
    assert_eq!(problem["line"], 13);
    assert_eq!(problem["column"], 1);
    assert_eq!(problem["field"], "builders.vm.memroy");
}

#[test]
fn inspect_masks_sensitive_values_and_shows_outputs() {
    let workspace = workspace_with(&config(
        "",
        "[[provision]]\ntype = \"shell\"\ninline = [\"echo {{ var.password }} > /root/pw\"]\n",
    ));
    let outcome = workspace
        .imgbuild()
        .args(["inspect", "image.toml"])
        .run()
        .exits_with(EXIT_OK);
    let outcome = outcome
        .stdout_lacks("hunter2-secret")
        .stdout_has("<sensitive>")
        .stdout_has("build vm (qemu)")
        .stdout_has("web-1.2.3.qcow2");
    assert!(!outcome.stderr.contains("hunter2-secret"));

    let outcome = workspace
        .imgbuild()
        .args(["--output", "json", "inspect", "image.toml"])
        .run()
        .exits_with(EXIT_OK)
        .stdout_lacks("hunter2-secret");
    let document = &outcome.events()[0];
    assert_eq!(document["builds"][0]["name"], "vm");
    let password = document["variables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "password")
        .unwrap();
    assert_eq!(password["value"], "<sensitive>");
}

#[test]
fn only_and_except_must_name_builders() {
    let workspace = workspace_with(&config("", ""));
    workspace
        .imgbuild()
        .args(["validate", "image.toml", "--only", "vn"])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("--only names `vn`")
        .stderr_has("did you mean `vm`?");
}

#[test]
fn usage_errors_exit_2() {
    let workspace = Workspace::new();
    workspace
        .imgbuild()
        .args(["build"])
        .run()
        .exits_with(EXIT_USAGE);
    workspace
        .imgbuild()
        .args(["frobnicate"])
        .run()
        .exits_with(EXIT_USAGE);
    workspace
        .imgbuild()
        .args(["validate", "missing.toml"])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("cannot read the config");
}

#[test]
fn a_var_file_sets_values_and_its_errors_name_the_var_file() {
    let workspace = workspace_with(&config("", ""));
    workspace.write("prod.toml", "mirror = \"http://prod\"\nmirorr = \"x\"\n");
    workspace
        .imgbuild()
        .args(["validate", "image.toml", "--var-file", "prod.toml"])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("prod.toml:2:1")
        .stderr_has("`mirorr` is not a declared variable");
}

#[test]
fn templates_see_variables_environment_names_and_the_git_commit() {
    let workspace = workspace_with(&config(
        "",
        "[[provision]]\ntype = \"shell\"\ninline = [\"{{ var.mirror }} {{ env('IMGBUILD_TEST_VALUE') }} {{ image.name }}-{{ image.version }} {{ build.name }}/{{ build.type }} {{ git_sha }} a&b\"]\n",
    ));
    let git = |args: &[&str]| {
        let status = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .current_dir(workspace.path())
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "git {args:?}");
    };
    git(&["init", "-q"]);
    git(&["add", "image.toml"]);
    git(&["commit", "-qm", "config"]);
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(workspace.path())
        .output()
        .unwrap();
    let head = String::from_utf8(head.stdout).unwrap().trim().to_owned();

    let outcome = workspace
        .imgbuild()
        .args(["--output", "json", "inspect", "image.toml"])
        .env("IMGBUILD_TEST_VALUE", "from-env")
        .run()
        .exits_with(EXIT_OK);
    let document = &outcome.events()[0];
    assert_eq!(
        document["builds"][0]["provisioners"][0]["inline"][0],
        format!("http://deb.debian.org/debian from-env web-1.2.3 vm/qemu {head} a&b")
    );
    assert_eq!(document["image"]["revision"], head);
}

#[test]
fn inspect_masks_a_password_written_in_the_config_itself() {
    let text = config("", "").replace(
        "password = \"{{ var.password }}\"",
        "password = \"literal-pw-4471\"",
    );
    let workspace = workspace_with(&text);
    for args in [
        &["inspect", "image.toml"][..],
        &["--output", "json", "inspect", "image.toml"],
    ] {
        let outcome = workspace
            .imgbuild()
            .args(args)
            .run()
            .exits_with(EXIT_OK)
            .stdout_lacks("literal-pw-4471")
            .stdout_has("<sensitive>");
        assert!(!outcome.stderr.contains("literal-pw-4471"));
    }
}

#[test]
fn an_ssh_port_of_zero_is_rejected_where_it_is_written() {
    let text = config("", "").replace("username = \"admin\"", "username = \"admin\"\nport = 0");
    validate(&workspace_with(&text))
        .exits_with(EXIT_USAGE)
        .stderr_has("builders.vm.ssh.port")
        .stderr_has("image.toml:16:8")
        .stderr_has("a TCP port from 1 to 65535");
}

#[test]
fn a_provisioner_with_both_only_and_except_is_rejected() {
    let workspace = workspace_with(&config(
        "",
        "[[provision]]\ntype = \"shell\"\ninline = [\"true\"]\nonly = [\"vm\"]\nexcept = [\"vm\"]\n",
    ));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("provision[0].except")
        .stderr_has("`only` and `except` exclude each other")
        .stderr_has("image.toml:22:10");
}

#[test]
fn two_builds_writing_one_output_file_are_refused() {
    let second = "[builders.vm2]\ntype = \"qemu\"\nbase_image = \"base.qcow2\"\ncloud_init = false\noutput_dir = \"./output/../output\"\n[builders.vm2.ssh]\nusername = \"admin\"\npassword = \"x-password\"\n";
    let workspace = workspace_with(&config("", second));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("builds `vm` and `vm2` would both write the file")
        .stderr_has("web-1.2.3.qcow2")
        .stderr_has("builders.vm2");
    // Apart, they are fine.
    let apart = second.replace("./output/../output", "output-2");
    validate(&workspace_with(&config("", &apart))).exits_with(EXIT_OK);
}

#[test]
fn an_unknown_builder_type_lists_the_registered_kinds() {
    let text = config("", "").replace("type = \"qemu\"", "type = \"nimbus\"");
    let known = imgbuild_builders::registry::names();
    assert!(
        known.contains(&"qemu") && known.contains(&"ec2"),
        "{known:?}"
    );
    validate(&workspace_with(&text))
        .exits_with(EXIT_USAGE)
        .stderr_has("unknown builder type `nimbus`")
        .stderr_has("builders.vm.type")
        .stderr_has(&format!("builder types: {}", known.join(", ")));
}

#[test]
fn an_ansible_provisioner_without_a_playbook_names_the_field() {
    let workspace = workspace_with(&config(
        "",
        "[[provision]]\ntype = \"ansible\"\nextra_vars = { a = \"b\" }\n",
    ));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("provision[0]")
        .stderr_has("missing field `playbook_file`");
}

#[test]
fn a_missing_ansible_playbook_is_reported_on_its_field() {
    let workspace = workspace_with(&config(
        "",
        "[[provision]]\ntype = \"ansible\"\nplaybook_file = \"ansible/missing.yml\"\n",
    ));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("provision[0].playbook_file")
        .stderr_has("ansible/missing.yml")
        .stderr_has("image.toml:20:17")
        .stderr_has("relative to the directory of the config file");
}

#[test]
fn a_playbook_that_is_not_yaml_is_reported_on_its_field() {
    let workspace = workspace_with(&config(
        "",
        "[[provision]]\ntype = \"ansible\"\nplaybook_file = \"site.yml\"\n",
    ));
    workspace.write("site.yml", "- hosts: [all\n  tasks: {\n");
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("provision[0].playbook_file")
        .stderr_has("site.yml is not valid YAML");
}

#[test]
fn ansible_playbook_missing_on_the_host_says_how_to_install_it() {
    let workspace = workspace_with(&config(
        "",
        "[[provision]]\ntype = \"ansible\"\nplaybook_file = \"site.yml\"\n",
    ));
    workspace.write("site.yml", "- hosts: all\n  tasks: []\n");
    let empty_path = workspace.join("no-programs-here");
    std::fs::create_dir_all(&empty_path).unwrap();
    validate(&workspace).exits_with(EXIT_OK);
    workspace
        .imgbuild()
        .args(["validate", "image.toml"])
        .env("PATH", &empty_path)
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("provision[0].type")
        .stderr_has("ansible-playbook is not installed on the build host")
        .stderr_has("apt-get install ansible");
}

#[test]
fn an_unknown_provisioner_type_lists_every_registered_kind() {
    let workspace = workspace_with(&config(
        "",
        "[[provision]]\ntype = \"puppet\"\nmanifest = \"site.pp\"\n",
    ));
    let kinds = imgbuild_provisioners::registry::names();
    assert!(
        kinds.contains(&"ansible") && kinds.contains(&"ansible-local"),
        "{kinds:?}"
    );
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("unknown provisioner type `puppet`")
        .stderr_has(&format!("provisioner types: {}", kinds.join(", ")));
}

/// `[[test]]` tables after a valid shell provisioner.
fn config_with_tests(tests: &str) -> String {
    config(
        "",
        &format!("[[provision]]\ntype = \"shell\"\ninline = [\"true\"]\n\n{tests}"),
    )
}

#[test]
fn a_test_without_a_name_is_rejected() {
    // Line 22: the `[[test]]` header, after the provisioner (18-20) and a
    // blank line.
    let workspace = workspace_with(&config_with_tests("[[test]]\ninline = [\"true\"]\n"));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("test[0]: missing field `name`")
        .stderr_has("image.toml:22:");
}

#[test]
fn two_tests_with_one_name_are_rejected_at_the_second() {
    let workspace = workspace_with(&config_with_tests(
        "[[test]]\nname = \"boots\"\ninline = [\"true\"]\n\n[[test]]\nname = \"boots\"\ninline = [\"false\"]\n",
    ));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("test[1].name: test[0] is already named `boots`")
        .stderr_has("image.toml:27:8")
        .stderr_has("give each test its own name");
}

#[test]
fn an_unknown_field_in_a_test_is_rejected_with_a_suggestion() {
    let workspace = workspace_with(&config_with_tests(
        "[[test]]\nname = \"boots\"\ninline = [\"true\"]\nretires = 3\n\n[[test]]\nname = \"other\"\ninline = [\"true\"]\nmax_retries = 2\n",
    ));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("test[0].retires: unknown field `retires` in a test")
        .stderr_has("image.toml:25:1")
        .stderr_has("did you mean `retries`?")
        // A shell provisioner field that makes no sense for a test says
        // what to use instead.
        .stderr_has("test[1].max_retries: unknown field `max_retries`")
        .stderr_has("a test retries with `retries`");
}

#[test]
fn a_test_naming_no_builder_in_only_is_rejected() {
    let workspace = workspace_with(&config_with_tests(
        "[[test]]\nname = \"boots\"\ninline = [\"true\"]\nonly = [\"mv\"]\n",
    ));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("test[0].only: `mv` is not a builder in this config")
        .stderr_has("image.toml:25:8")
        .stderr_has("did you mean `vm`?");
}

#[test]
fn a_test_with_an_unreadable_script_or_no_command_is_rejected() {
    let workspace = workspace_with(&config_with_tests(
        "[[test]]\nname = \"release\"\nscript = \"tests/missing.sh\"\n\n[[test]]\nname = \"nothing\"\nretry_delay = \"soon\"\n",
    ));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("test[0].script: cannot read script")
        .stderr_has("tests/missing.sh")
        .stderr_has("image.toml:24:10")
        .stderr_has("test[1].retry_delay: invalid duration `soon`");
}

#[test]
fn a_test_needs_a_command() {
    let workspace = workspace_with(&config_with_tests("[[test]]\nname = \"nothing\"\n"));
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("test[0].inline")
        .stderr_has("exactly one of `inline`, `script` or `scripts`");
}

#[test]
fn inspect_shows_each_builds_tests_resolved() {
    let second = "[builders.vm2]\ntype = \"qemu\"\nbase_image = \"base.qcow2\"\ncloud_init = false\noutput_dir = \"output-2\"\n[builders.vm2.ssh]\nusername = \"admin\"\npassword = \"x-password\"\n";
    let text = config(
        "",
        &format!(
            "{second}\n[[test]]\nname = \"release\"\nscript = \"checks/release.sh\"\nenv = {{ EXPECTED = \"{{{{ image.version }}}}-{{{{ build.name }}}}\" }}\nretries = 2\n\n[[test]]\nname = \"vm2 only\"\ninline = [\"true\"]\nexcept = [\"vm\"]\n"
        ),
    )
    .replacen(
        "[image]\nname = \"web\"",
        "[image]\nname = \"web\"\non_test_failure = \"delete\"",
        1,
    );
    let workspace = workspace_with(&text);
    workspace.write(
        "checks/release.sh",
        "test \"$(cat /etc/release)\" = \"$EXPECTED\"\n",
    );
    let outcome = workspace
        .imgbuild()
        .args(["inspect", "image.toml", "--output", "json"])
        .run()
        .exits_with(EXIT_OK);
    let document: serde_json::Value = serde_json::from_str(&outcome.stdout).unwrap();
    assert_eq!(document["on_test_failure"], "delete");
    let builds = document["builds"].as_array().unwrap();
    let vm = &builds[0]["tests"];
    assert_eq!(vm.as_array().unwrap().len(), 1, "{vm}");
    assert_eq!(vm[0]["name"], "release");
    assert_eq!(vm[0]["env"]["EXPECTED"], "1.2.3-vm");
    assert_eq!(vm[0]["retries"], 2);
    assert_eq!(vm[0]["retry_delay"], "5s");
    let vm2 = &builds[1]["tests"];
    let names: Vec<&str> = vm2
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["release", "vm2 only"]);
    assert_eq!(vm2[0]["env"]["EXPECTED"], "1.2.3-vm2");
    assert_eq!(vm2[1]["retries"], 0);

    // Human output lists them under each build.
    workspace
        .imgbuild()
        .args(["inspect", "image.toml"])
        .run()
        .exits_with(EXIT_OK)
        .stdout_has("  test 2: vm2 only: ");
}

#[test]
fn on_test_failure_takes_keep_or_delete() {
    let text = config("", "").replacen(
        "[image]\nname = \"web\"",
        "[image]\nname = \"web\"\non_test_failure = \"drop\"",
        1,
    );
    validate(&workspace_with(&text))
        .exits_with(EXIT_USAGE)
        .stderr_has("image.on_test_failure")
        .stderr_has("`keep`")
        .stderr_has("`delete`");
}

#[test]
fn tests_on_a_docker_build_that_exports_or_discards_are_refused() {
    let docker = |name: &str, extra: &str| {
        format!(
            "[builders.{name}]\ntype = \"docker\"\nimage = \"debian:bookworm\"\npull = \"never\"\n{extra}\n"
        )
    };
    let text = |test_extra: &str| {
        format!(
            "[image]\nname = \"web\"\nversion = \"1.2.3\"\n\n{}{}{}[[test]]\nname = \"release\"\ninline = [\"true\"]\n{test_extra}",
            docker("tar", "export_path = \"out/rootfs.tar\""),
            docker("gone", "discard = true"),
            docker("kept", ""),
        )
    };
    let workspace = workspace_with(&text(""));
    // Line 9 holds `export_path`, line 14 `discard`; each problem points at
    // the field that leaves nothing to test.
    validate(&workspace)
        .exits_with(EXIT_USAGE)
        .stderr_has("builders.tar.export_path: test `release` applies to build `tar`, which keeps nothing to test: the build exports its filesystem to")
        .stderr_has("image.toml:9:15")
        .stderr_has("drop `export_path` to commit an image, which can be tested, or leave `tar` out of the test with `except = [\"tar\"]`")
        .stderr_has("builders.gone.discard: test `release` applies to build `gone`, which keeps nothing to test: the build discards its container")
        .stderr_has("image.toml:14:11")
        .stderr_lacks("builders.kept");

    // `build` refuses it the same way, before anything is created.
    workspace
        .imgbuild()
        .args(["build", "image.toml"])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("builders.tar.export_path: test `release`");
    assert!(!workspace.join("out").exists());
    assert!(!workspace.join("imgbuild-manifest.json").exists());
    assert!(workspace.journals().is_empty());

    // Left out of the test, the same builds are valid.
    workspace.write("image.toml", &text("except = [\"tar\", \"gone\"]\n"));
    validate(&workspace).exits_with(EXIT_OK);
}
