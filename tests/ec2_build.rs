//! `imgbuild build templates/ec2-debian.toml` end to end against moto (a
//! local EC2 API): the AMI and its copy are made, tagged and shared, its
//! `[[test]]`s run on a new instance of the AMI, the build's and the test
//! run's instances, key pairs and security groups are gone afterwards, and
//! `imgbuild output` hands the AMI id on.
//!
//! moto's instances have no SSH, so the build's SSH goes to an sshd
//! container (tests/fixtures/sshd-target) through `ssh.host`/`ssh.port`, and
//! the test plays cloud-init: once the build has imported its temporary key
//! pair into moto, the container trusts that key. The same container plays
//! the instance the tests run on, which gets a key pair of its own.
//!
//! What cannot be tested here: moto's AMIs hold no data (an AMI is only its
//! metadata), so the AMI's name, tags, sharing and copy are checked in moto,
//! and what the AMI would contain is checked on the sshd container that
//! played the instance: the provisioners' files, and the build key no longer
//! trusted.
#![cfg(feature = "ec2")]

use aws_sdk_ec2::types::Filter;
use imgbuild_test_support::docker::SshTarget;
use imgbuild_test_support::ec2::{ec2, moto, trust_imported_key, trust_imported_key_named};
use imgbuild_test_support::{cli::*, common::*};
use std::time::Duration;

const HOME_REGION: &str = "eu-west-1";
const COPY_REGION: &str = "eu-central-1";
/// Canonical's account: moto ships Ubuntu AMIs owned by it, where real EC2
/// would find Debian's.
const SOURCE_OWNER: &str = "099720109477";

fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

/// A running build of the template against moto, with SSH going to
/// `target`, which trusts the build's key once it is imported.
struct Ec2Build {
    version: String,
    run_id: String,
    runtime: tokio::runtime::Runtime,
    home: aws_sdk_ec2::Client,
}

impl Ec2Build {
    /// Starts the build; `extra` is appended to the template.
    fn start(workspace: &Workspace, target: &SshTarget, extra: &str) -> (Ec2Build, Running) {
        let endpoint = moto();
        let version = unique_version();

        // The main change to the template: SSH goes to the container instead
        // of the instance's address, as it would through a bastion's port
        // forward.
        let template = workspace.read("ec2-debian.toml");
        let patched = template.replacen(
            "username = \"admin\"",
            &format!(
                "username = \"admin\"\nhost = \"{}\"\nport = {}",
                target.host, target.port
            ),
            1,
        );
        assert_ne!(patched, template, "the template's [builders.ami.ssh] moved");
        // Through a port forward the instance cannot tell who connects, so
        // the temporary group needs to be told (a build is refused without).
        let with_cidrs = patched.replacen(
            "run_tags = { purpose = \"image-build\" }",
            "run_tags = { purpose = \"image-build\" }\nssh_cidrs = [\"127.0.0.1/32\"]",
            1,
        );
        assert_ne!(with_cidrs, patched, "the template's run_tags line moved");
        let patched = with_cidrs;
        workspace.write("ec2-debian.toml", &format!("{patched}{extra}"));

        let command = workspace.imgbuild().args([
            "build",
            "ec2-debian.toml",
            "--var",
            &format!("version={version}"),
            "--var",
            "source_ami_name=ubuntu/images/hvm-ssd/ubuntu-*-amd64-server-*",
            "--var",
            &format!("source_ami_owner={SOURCE_OWNER}"),
        ]);
        let mut running = command
            .env("AWS_ENDPOINT_URL_EC2", &endpoint)
            .env("GITHUB_OUTPUT", workspace.join("github-output"))
            .spawn(&workspace.join("build.log"));

        running.wait_for_output("imgbuild run ", Duration::from_secs(60));
        let run_id = run_id_in(&running.log());
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let home = runtime.block_on(ec2(HOME_REGION));

        // Cloud-init's part: trust the key pair the instance was launched
        // with.
        let public_key = runtime
            .block_on(async { trust_imported_key(HOME_REGION, &run_id, target).await })
            .unwrap()
            .unwrap_or_else(|| panic!("no key pair tagged with run {run_id} appeared in moto"));
        assert!(public_key.starts_with("ssh-ed25519 "), "{public_key}");
        let build = Ec2Build {
            version,
            run_id,
            runtime,
            home,
        };
        (build, running)
    }

    /// Cloud-init's part on the instance the tests run on: once the test run
    /// has started, the target trusts the key pair imported for it. Returns
    /// that key.
    fn trust_test_key(
        &self,
        running: &mut Running,
        target: &SshTarget,
    ) -> tokio::task::JoinHandle<Option<String>> {
        running.wait_for_output("ami | ==> find_ami", Duration::from_secs(600));
        let _runtime = self.runtime.enter();
        let name = format!("imgbuild-ami-test-{}", self.run_id);
        trust_imported_key_named(HOME_REGION, &self.run_id, &name, target)
    }

    /// (instance id, image id) of every instance the run launched.
    fn instances_of_run(&self) -> Vec<(String, String)> {
        let (home, run_id) = (&self.home, &self.run_id);
        self.runtime.block_on(async {
            home.describe_instances()
                .filters(tag_filter("imgbuild:run-id", run_id))
                .send()
                .await
                .unwrap()
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .map(|i| {
                    (
                        i.instance_id().unwrap_or_default().to_owned(),
                        i.image_id().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
    }

    /// Asserts that the build's instance is terminated and its temporary key
    /// pair and security group are gone.
    fn assert_nothing_of_the_run_left(&self) {
        let (home, run_id) = (&self.home, &self.run_id);
        self.runtime.block_on(async {
            let instances = home
                .describe_instances()
                .filters(tag_filter("imgbuild:run-id", run_id))
                .send()
                .await
                .unwrap();
            let states: Vec<_> = instances
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .map(|i| i.state().and_then(|s| s.name()).cloned())
                .collect();
            assert!(!states.is_empty(), "the build's instance is not tagged");
            assert!(
                states
                    .iter()
                    .all(|s| s == &Some(aws_sdk_ec2::types::InstanceStateName::Terminated)),
                "{states:?}"
            );
            let keys = home
                .describe_key_pairs()
                .filters(tag_filter("imgbuild:run-id", run_id))
                .send()
                .await
                .unwrap();
            assert!(keys.key_pairs().is_empty(), "{keys:?}");
            let groups = home
                .describe_security_groups()
                .filters(tag_filter("imgbuild:run-id", run_id))
                .send()
                .await
                .unwrap();
            assert!(groups.security_groups().is_empty(), "{groups:?}");
        });
    }
}

#[test]
fn the_template_makes_a_shared_copied_ami_and_leaves_nothing_else_in_ec2() {
    let target = SshTarget::start("admin", None);
    let workspace = Workspace::with_templates();
    let (build, mut running) = Ec2Build::start(&workspace, &target, "");
    let (version, run_id, home) = (&build.version, &build.run_id, &build.home);
    let github_output = workspace.join("github-output");
    let test_key = build.trust_test_key(&mut running, &target);

    let (status, log) = running.wait(Duration::from_secs(600));
    assert!(status.success(), "the build failed ({status}):\n{log}");
    assert!(log.contains("ami | ==> provision"), "{log}");
    assert!(
        build.runtime.block_on(test_key).unwrap().is_some(),
        "the test run imported no key pair of its own"
    );

    // The provisioners ran on the "instance", as the temporary key's user.
    assert_eq!(
        target.exec("cat /etc/imgbuild-release").trim(),
        format!("web-base {version} built by imgbuild (run {run_id})")
    );
    assert_eq!(
        target
            .exec("dpkg-query -W -f '${Version}' imgbuild-baseline")
            .trim(),
        *version
    );

    // The manifest records both AMIs and the source picked by the filter.
    let manifest = workspace.manifest();
    let entry = manifest["builds"]
        .as_array()
        .expect("builds in the manifest")
        .last()
        .expect("an entry")
        .clone();
    assert_eq!(entry["build"]["type"], "ec2");
    let details = &entry["details"];
    let home_ami = details["amis"][HOME_REGION].as_str().unwrap().to_owned();
    let copy_ami = details["amis"][COPY_REGION].as_str().unwrap().to_owned();
    assert_eq!(entry["artifact_id"], format!("{HOME_REGION}:{home_ami}"));
    // The template's test passed on an instance launched from the new AMI.
    assert_eq!(entry["status"], "tested", "{entry}");
    assert_eq!(entry["tests"][0]["passed"], true, "{entry}");
    let launched_from: Vec<String> = build
        .instances_of_run()
        .into_iter()
        .map(|(_, image)| image)
        .collect();
    assert_eq!(launched_from.len(), 2, "{launched_from:?}");
    assert!(launched_from.contains(&home_ami), "{launched_from:?}");
    assert_eq!(details["source_ami"]["owner"], SOURCE_OWNER);
    assert!(
        details["source_ami"]["name"]
            .as_str()
            .unwrap()
            .starts_with("ubuntu/images/hvm-ssd/ubuntu-"),
        "{details}"
    );

    build.runtime.block_on(async {
        let copy = ec2(COPY_REGION).await;
        for (client, ami) in [(home, &home_ami), (&copy, &copy_ami)] {
            let image = client
                .describe_images()
                .image_ids(ami)
                .send()
                .await
                .unwrap()
                .images()
                .first()
                .cloned()
                .unwrap_or_else(|| panic!("{ami} is not in moto"));
            assert_eq!(image.name(), Some(format!("web-base-{version}").as_str()));
            let tags: Vec<(String, String)> = image
                .tags()
                .iter()
                .map(|t| (t.key().unwrap().to_owned(), t.value().unwrap().to_owned()))
                .collect();
            for expected in [
                ("team", "platform"),
                ("imgbuild:version", version.as_str()),
                ("imgbuild:run-id", run_id.as_str()),
            ] {
                assert!(
                    tags.iter()
                        .any(|(k, v)| (k.as_str(), v.as_str()) == expected),
                    "{ami} lacks the tag {expected:?}: {tags:?}"
                );
            }
            let launch = client
                .describe_image_attribute()
                .image_id(ami)
                .attribute(aws_sdk_ec2::types::ImageAttributeName::LaunchPermission)
                .send()
                .await
                .unwrap();
            assert!(
                launch
                    .launch_permissions()
                    .iter()
                    .any(|p| p.user_id() == Some("123456789012")),
                "{ami} is not shared: {launch:?}"
            );
        }
    });
    build.assert_nothing_of_the_run_left();
    assert!(workspace.journals().is_empty());

    // The next tool gets the id three ways.
    workspace
        .imgbuild()
        .args(["output"])
        .run()
        .exits_with(EXIT_OK)
        .stdout_has(&format!("{home_ami}\n"));
    workspace
        .imgbuild()
        .args(["output", "--region", COPY_REGION])
        .run()
        .exits_with(EXIT_OK)
        .stdout_has(&format!("{copy_ami}\n"));
    let tfvars = workspace
        .imgbuild()
        .args(["output", "--format", "tfvars"])
        .run()
        .exits_with(EXIT_OK)
        .stdout;
    let tfvars: serde_json::Value = serde_json::from_str(&tfvars).unwrap();
    assert_eq!(tfvars["ami_ami_id"], home_ami.as_str());
    assert_eq!(tfvars["ami_ami_ids"][COPY_REGION], copy_ami.as_str());
    assert_eq!(tfvars["ami_version"], version.as_str());
    let steps = std::fs::read_to_string(&github_output).unwrap();
    assert!(
        steps.lines().any(|l| l == format!("ami_ami_id={home_ami}")),
        "{steps}"
    );

    // Retired (no channel hands it out, none is kept): both copies are
    // deregistered with their snapshots, and the catalog says so.
    workspace
        .imgbuild()
        .args([
            "retire",
            entry["image"]["name"].as_str().unwrap(),
            "--keep",
            "0",
        ])
        .env("AWS_ENDPOINT_URL_EC2", moto())
        .run()
        .exits_with(EXIT_OK);
    assert_amis_and_snapshots_gone(&build.runtime, details);
    let retired = workspace.manifest()["builds"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(retired["status"], "retired", "{retired}");
    assert!(workspace.journals().is_empty());
}

#[test]
fn an_interrupt_mid_provisioning_exits_130_and_leaves_nothing_in_ec2() {
    let target = SshTarget::start("admin", None);
    let workspace = Workspace::with_templates();
    let (build, mut running) = Ec2Build::start(
        &workspace,
        &target,
        "\n[[provision]]\ntype = \"shell\"\ninline = [\"echo provisioning-started\", \"sleep 600\"]\n",
    );
    running.wait_for_output("provisioning-started", Duration::from_secs(120));
    running.signal(libc::SIGINT);
    let (status, log) = running.wait(Duration::from_secs(120));
    assert_eq!(status.code(), Some(EXIT_INTERRUPTED), "{log}");

    build.assert_nothing_of_the_run_left();
    let images = build.runtime.block_on(async {
        build
            .home
            .describe_images()
            .filters(tag_filter("imgbuild:run-id", &build.run_id))
            .send()
            .await
            .unwrap()
    });
    assert!(images.images().is_empty(), "{images:?}");
    assert!(workspace.journals().is_empty());
    assert!(!workspace.join("imgbuild-manifest.json").exists());
}

/// Every snapshot this account owns in `client`'s region.
/// Neither region holds the recorded AMI (by its name) or any of its
/// recorded snapshots any more.
fn assert_amis_and_snapshots_gone(runtime: &tokio::runtime::Runtime, details: &serde_json::Value) {
    let ami_name = details["ami_name"].as_str().unwrap();
    let recorded_snapshots = |region: &str| -> Vec<String> {
        serde_json::from_value(details["snapshots"][region].clone()).unwrap()
    };
    assert!(
        !recorded_snapshots(HOME_REGION).is_empty(),
        "the build recorded no snapshot: {details}"
    );
    runtime.block_on(async {
        for region in [HOME_REGION, COPY_REGION] {
            assert!(details["amis"][region].is_string(), "{details}");
            let client = ec2(region).await;
            assert_eq!(
                amis_named(&client, ami_name).await,
                Vec::<String>::new(),
                "AMI left in {region}"
            );
            let left = own_snapshots(&client).await;
            for snapshot in recorded_snapshots(region) {
                assert!(!left.contains(&snapshot), "{snapshot} left in {region}");
            }
        }
    });
}

async fn own_snapshots(client: &aws_sdk_ec2::Client) -> Vec<String> {
    client
        .describe_snapshots()
        .owner_ids("self")
        .send()
        .await
        .unwrap()
        .snapshots()
        .iter()
        .filter_map(|s| s.snapshot_id().map(str::to_owned))
        .collect()
}

/// Ids of the AMIs named `name` in `client`'s region.
async fn amis_named(client: &aws_sdk_ec2::Client, name: &str) -> Vec<String> {
    client
        .describe_images()
        .owners("self")
        .filters(Filter::builder().name("name").values(name).build())
        .send()
        .await
        .unwrap()
        .images()
        .iter()
        .filter_map(|i| i.image_id().map(str::to_owned))
        .collect()
}

#[test]
fn a_failing_test_exits_1_and_on_test_failure_delete_leaves_no_ami_or_snapshot_in_any_region() {
    let target = SshTarget::start("admin", None);
    let workspace = Workspace::with_templates();
    let template = workspace.read("ec2-debian.toml");
    let labels = "labels = { team = \"platform\", os = \"debian-12\" }\n";
    let patched = template.replacen(
        labels,
        &format!("{labels}on_test_failure = \"delete\"\n"),
        1,
    );
    assert_ne!(patched, template, "the template's [image] labels moved");
    workspace.write("ec2-debian.toml", &patched);
    let (build, mut running) = Ec2Build::start(
        &workspace,
        &target,
        "\n[[test]]\nname = \"a check that fails\"\ninline = [\"echo imgbuild-check-ran-$((40+2))\", \"exit 7\"]\n",
    );
    let test_key = build.trust_test_key(&mut running, &target);
    let (status, log) = running.wait(Duration::from_secs(600));
    assert_eq!(status.code(), Some(EXIT_BUILD_FAILED), "{log}");
    test_key.abort();
    // What the machine printed, not the command echoed back.
    assert!(log.contains("imgbuild-check-ran-42"), "{log}");

    let manifest = workspace.manifest();
    let entry = manifest["builds"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(entry["status"], "failed", "{entry}");
    assert_eq!(entry["deleted"], true, "{entry}");
    assert_eq!(entry["tests"][0]["passed"], true, "{entry}");
    assert_eq!(entry["tests"][1]["passed"], false, "{entry}");
    assert_eq!(entry["tests"][1]["exit_code"], 7, "{entry}");

    assert_amis_and_snapshots_gone(&build.runtime, &entry["details"]);
    workspace.assert_recorded_files_gone(&entry);
    build.assert_nothing_of_the_run_left();
    assert!(workspace.journals().is_empty());
    workspace
        .imgbuild()
        .args(["output"])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("was deleted");
}

#[test]
fn an_interrupt_during_the_tests_exits_130_and_leaves_no_instance_key_pair_or_group() {
    let target = SshTarget::start("admin", None);
    let workspace = Workspace::with_templates();
    let (build, mut running) = Ec2Build::start(
        &workspace,
        &target,
        "\n[[test]]\nname = \"a slow check\"\ninline = [\"echo imgbuild-sleeping-$((40+2))\", \"sleep 600\"]\n",
    );
    let test_key = build.trust_test_key(&mut running, &target);
    running.wait_for_output("imgbuild-sleeping-42", Duration::from_secs(300));
    running.signal(libc::SIGINT);
    let (status, log) = running.wait(Duration::from_secs(120));
    assert_eq!(status.code(), Some(EXIT_INTERRUPTED), "{log}");
    assert!(
        build.runtime.block_on(test_key).unwrap().is_some(),
        "the test run imported no key pair"
    );

    // Both instances, the build's and the test run's, are terminated, and
    // both key pairs and groups are gone.
    assert_eq!(build.instances_of_run().len(), 2);
    build.assert_nothing_of_the_run_left();
    assert!(workspace.journals().is_empty());
    let entry = workspace.manifest()["builds"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(entry["status"], "failed", "{entry}");
}

#[test]
fn ssh_through_a_host_without_ssh_cidrs_is_refused_by_validate_and_build() {
    let workspace = Workspace::with_templates();
    let template = workspace.read("ec2-debian.toml");
    let patched = template.replacen(
        "username = \"admin\"",
        "username = \"admin\"\nhost = \"bastion.example\"",
        1,
    );
    assert_ne!(patched, template, "the template's [builders.ami.ssh] moved");
    workspace.write("ec2-debian.toml", &patched);

    let validate = workspace
        .imgbuild()
        .args(["validate", "ec2-debian.toml"])
        .run()
        .exits_with(EXIT_USAGE);
    let said = format!("{}{}", validate.stdout, validate.stderr);
    assert!(said.contains("ssh_cidrs"), "{said}");
    assert!(said.contains("bastion.example"), "{said}");

    // `build` validates first: nothing reaches EC2, nothing is journaled.
    let endpoint = moto();
    let command = workspace.imgbuild().args([
        "build",
        "ec2-debian.toml",
        "--var",
        &format!("version={}", unique_version()),
        "--var",
        &format!("source_ami_owner={SOURCE_OWNER}"),
    ]);
    let build = command
        .env("AWS_ENDPOINT_URL_EC2", &endpoint)
        .run()
        .exits_with(EXIT_USAGE);
    let said = format!("{}{}", build.stdout, build.stderr);
    assert!(said.contains("ssh_cidrs"), "{said}");
    assert!(workspace.journals().is_empty());
}
