//! The EC2 builder against moto (a fake EC2 API) with an sshd container
//! standing in for the instance's SSH server.
//!
//! Needs moto (`.ci/start-moto.sh`, started on demand) and a Docker engine
//! (`.ci/start-dockerd.sh`, likewise). Tests share one moto server and run
//! in parallel, so every test uses its own image name and run id and looks
//! only at what carries them; moto is never reset.
//!
//! What cannot be tested here: moto's AMIs hold no data (an AMI is only its
//! metadata), so an AMI's contents are checked on the sshd container that
//! played the instance (what the provisioners left, which keys are still
//! trusted), and moto is asked only about the AMI's metadata.

#![cfg(feature = "ec2")]

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::{Filter, ImageAttributeName, ResourceType, Tag, TagSpecification};
use imgbuild_builders::common::orphans::{Removal, creation_grace};
use imgbuild_builders::docker::kind::DockerResource;
use imgbuild_builders::ec2::kind::Ec2Resource;
use imgbuild_builders::ec2::{Ec2Builder, Ec2Config, clean_orphan, clean_orphan_within};
use imgbuild_builders::registry::JournalResource;
use imgbuild_builders::{BuildError, Builder};
use imgbuild_core::Resource;
use imgbuild_provisioners::ssh::TemporaryKey;
use imgbuild_test_support::{
    common::*,
    docker::{PLACEHOLDER_KEY_LINE, SshTarget},
    ec2::*,
    harness::*,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const REGION: &str = "us-east-1";
/// An AMI moto has in every region.
const MOTO_AMI: &str = "ami-785db401";
const RUN_ID_TAG: &str = "imgbuild:run-id";
/// A bound on a whole build that only catches a hang: far above what any
/// build here takes on a loaded machine, and far below the remote sleeps
/// and SSH timeouts the tests make sure a build does not wait out.
const HANG: Duration = Duration::from_secs(600);

fn tag_filter(key: &str, value: &str) -> Filter {
    Filter::builder()
        .name(format!("tag:{key}"))
        .values(value)
        .build()
}

fn name_filter(name: &str) -> Filter {
    Filter::builder().name("name").values(name).build()
}

/// A builder config pointing at `endpoint`, logging in to `target`. SSH
/// goes from this machine to a port forward, so the temporary group admits
/// this machine only.
fn config(endpoint: &str, target: Option<&SshTarget>, extra: Value) -> Ec2Config {
    let (host, port) = match target {
        Some(target) => (target.host.clone(), target.port),
        None => ("127.0.0.1".to_owned(), 1),
    };
    let mut value = json!({
        "region": REGION,
        "endpoint_url": endpoint,
        "source_ami": MOTO_AMI,
        "instance_type": "t3.micro",
        "ami_timeout": "2m",
        "instance_timeout": "2m",
        "ssh_cidrs": ["127.0.0.1/32"],
        "ssh": {"username": "packer", "host": host, "port": port, "timeout": "90s", "connect_timeout": "5s"},
    });
    for (key, extra_value) in extra.as_object().unwrap() {
        if key == "ssh" {
            for (k, v) in extra_value.as_object().unwrap() {
                if v.is_null() {
                    value["ssh"].as_object_mut().unwrap().remove(k);
                } else {
                    value["ssh"][k] = v.clone();
                }
            }
        } else if extra_value.is_null() {
            value.as_object_mut().unwrap().remove(key);
        } else {
            value[key] = extra_value.clone();
        }
    }
    serde_json::from_value(value).unwrap()
}

fn tags_of(tags: &[Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .map(|t| {
            (
                t.key().unwrap_or("").to_owned(),
                t.value().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

async fn images_named(client: &Client, name: &str) -> Vec<String> {
    client
        .describe_images()
        .owners("self")
        .filters(name_filter(name))
        .send()
        .await
        .unwrap()
        .images()
        .iter()
        .filter_map(|i| i.image_id().map(str::to_owned))
        .collect()
}

/// (id, state) of every instance the run launched.
async fn instances_of_run(client: &Client, run_id: &str) -> Vec<(String, String)> {
    client
        .describe_instances()
        .filters(tag_filter(RUN_ID_TAG, run_id))
        .send()
        .await
        .unwrap()
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            (
                i.instance_id().unwrap_or("").to_owned(),
                i.state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_owned())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

async fn key_pairs_of_run(client: &Client, run_id: &str) -> Vec<String> {
    client
        .describe_key_pairs()
        .filters(tag_filter(RUN_ID_TAG, run_id))
        .send()
        .await
        .unwrap()
        .key_pairs()
        .iter()
        .filter_map(|k| k.key_name().map(str::to_owned))
        .collect()
}

async fn security_groups_of_run(client: &Client, run_id: &str) -> Vec<String> {
    client
        .describe_security_groups()
        .filters(tag_filter(RUN_ID_TAG, run_id))
        .send()
        .await
        .unwrap()
        .security_groups()
        .iter()
        .filter_map(|g| g.group_id().map(str::to_owned))
        .collect()
}

async fn snapshots_of_run(client: &Client, run_id: &str) -> Vec<String> {
    client
        .describe_snapshots()
        .owner_ids("self")
        .filters(tag_filter(RUN_ID_TAG, run_id))
        .send()
        .await
        .unwrap()
        .snapshots()
        .iter()
        .filter_map(|s| s.snapshot_id().map(str::to_owned))
        .collect()
}

async fn snapshots_described_for(client: &Client, image_id: &str) -> Vec<String> {
    client
        .describe_snapshots()
        .owner_ids("self")
        .filters(
            Filter::builder()
                .name("description")
                .values(format!("*{image_id}*"))
                .build(),
        )
        .send()
        .await
        .unwrap()
        .snapshots()
        .iter()
        .filter_map(|s| s.snapshot_id().map(str::to_owned))
        .collect()
}

/// The run's volumes as soon as they exist: moto deletes them with the
/// instance, so they must be looked at while the build runs.
fn watch_volumes(run_id: &str) -> tokio::task::JoinHandle<Vec<aws_sdk_ec2::types::Volume>> {
    let run_id = run_id.to_owned();
    tokio::spawn(async move {
        let client = ec2(REGION).await;
        for _ in 0..600 {
            let volumes = client
                .describe_volumes()
                .filters(tag_filter(RUN_ID_TAG, &run_id))
                .send()
                .await
                .unwrap();
            if !volumes.volumes().is_empty() {
                return volumes.volumes().to_vec();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Vec::new()
    })
}

/// AMI ids the build's log mentions, other than the source.
fn amis_in_log(transcript: &str) -> Vec<String> {
    let mut ids: Vec<String> = transcript
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|word| word.starts_with("ami-") && *word != MOTO_AMI)
        .map(str::to_owned)
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// Nothing of the run may be left: no instance but terminated ones, no
/// key pair, no security group, no AMI under the name in any region, no
/// snapshot of any AMI the log mentions, nothing in the journal.
async fn assert_nothing_left(h: &Harness, ami_name: &str, regions: &[&str]) {
    let run_id = &h.cx.run_id;
    let home = ec2(REGION).await;
    let instances = instances_of_run(&home, run_id).await;
    assert!(
        !instances.is_empty(),
        "the run launched no instance?\n{}",
        h.transcript()
    );
    assert!(
        instances.iter().all(|(_, state)| state == "terminated"),
        "instances left: {instances:?}"
    );
    assert_eq!(
        key_pairs_of_run(&home, run_id).await,
        Vec::<String>::new(),
        "key pair left"
    );
    assert_eq!(
        security_groups_of_run(&home, run_id).await,
        Vec::<String>::new(),
        "security group left"
    );
    let logged = amis_in_log(&h.transcript());
    for region in regions {
        let client = ec2(region).await;
        assert_eq!(
            images_named(&client, ami_name).await,
            Vec::<String>::new(),
            "AMI left in {region}"
        );
        assert_eq!(
            snapshots_of_run(&client, run_id).await,
            Vec::<String>::new(),
            "tagged snapshot left in {region}"
        );
        for image_id in &logged {
            assert_eq!(
                snapshots_described_for(&client, image_id).await,
                Vec::<String>::new(),
                "snapshot of {image_id} left in {region}"
            );
        }
    }
    assert_eq!(
        h.outstanding(),
        Vec::<String>::new(),
        "the journal still lists resources"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_makes_tagged_shared_amis_in_every_region_and_leaves_nothing_else() {
    let h = Harness::new("aws");
    let target = SshTarget::start("packer", None);
    let image = unique("ec2-ok");
    let ami_name = format!("{image}-1.0.0");
    let builder = Ec2Builder::new(config(
        &moto(),
        Some(&target),
        json!({
            "source_ami": null,
            "source_ami_filter": {
                "filters": {"name": "ubuntu/images/hvm-ssd/ubuntu-*-16.04-amd64-server-*"},
                "owners": ["099720109477"],
                "most_recent": true
            },
            "ami_regions": ["us-west-2", "eu-west-1"],
            "ami_users": ["123456789012"],
            "ami_groups": ["all"],
            "ami_tags": {"team": "infra"},
            "snapshot_tags": {"purpose": "test"},
            "run_tags": {"cost-center": "ci"},
        }),
    ));
    assert_eq!(builder.validate(h.config_dir.path()), vec![]);
    let request = h.request(
        &image,
        vec![shell(&["echo provisioned > /tmp/imgbuild-proof", "id -un"])],
    );
    let cloud_init = trust_imported_key(REGION, &h.cx.run_id, &target);

    let started = Instant::now();
    builder.preflight(&request, &h.cx).await.unwrap();
    let volumes = watch_volumes(&h.cx.run_id);
    let artifact = builder
        .build(&request, &h.cx)
        .await
        .unwrap_or_else(|err| panic!("{err}\n{}", h.transcript()));
    eprintln!(
        "successful build with 2 copies took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let build_key = cloud_init
        .await
        .unwrap()
        .expect("the build never imported its key pair");
    // The image must not keep trusting the build's key.
    let key_body = build_key.split_whitespace().nth(1).unwrap();
    let left = target.authorized_keys();
    assert!(
        !left.contains(key_body),
        "the build key is still trusted: {left}"
    );
    // Taken out of the file, not the file emptied or removed.
    assert_eq!(
        left.lines().collect::<Vec<_>>(),
        vec![PLACEHOLDER_KEY_LINE],
        "what else the machine trusted must stay"
    );
    assert_eq!(target.exec("cat /tmp/imgbuild-proof").trim(), "provisioned");

    // The artifact names every AMI and where the build started from.
    assert_eq!(artifact.builder, "ec2");
    assert_eq!(artifact.source.kind, "ami");
    assert!(
        artifact.source.reference.starts_with("us-east-1:ami-"),
        "{:?}",
        artifact.source
    );
    let details = &artifact.details;
    assert_eq!(details["ami_name"], ami_name);
    assert_eq!(details["source_ami"]["owner"], "099720109477");
    assert!(
        details["source_ami"]["name"]
            .as_str()
            .unwrap()
            .contains("16.04")
    );
    let amis: BTreeMap<String, String> = serde_json::from_value(details["amis"].clone()).unwrap();
    assert_eq!(
        amis.keys().collect::<Vec<_>>(),
        vec!["eu-west-1", "us-east-1", "us-west-2"]
    );
    assert_eq!(artifact.id, format!("us-east-1:{}", amis["us-east-1"]));

    for (region, image_id) in &amis {
        let client = ec2(region).await;
        let described = client
            .describe_images()
            .image_ids(image_id)
            .send()
            .await
            .unwrap();
        let ami = &described.images()[0];
        assert_eq!(ami.name(), Some(ami_name.as_str()), "{region}");
        let tags = tags_of(ami.tags());
        assert_eq!(
            tags.get("team").map(String::as_str),
            Some("infra"),
            "{region}: {tags:?}"
        );
        assert_eq!(
            tags.get("imgbuild:version").map(String::as_str),
            Some("1.0.0"),
            "{region}"
        );
        assert_eq!(tags.get(RUN_ID_TAG), Some(&h.cx.run_id), "{region}");
        assert!(
            tags["imgbuild:source-ami"].starts_with("us-east-1:ami-"),
            "{region}"
        );

        let permissions = client
            .describe_image_attribute()
            .image_id(image_id)
            .attribute(ImageAttributeName::LaunchPermission)
            .send()
            .await
            .unwrap();
        let users: Vec<_> = permissions
            .launch_permissions()
            .iter()
            .filter_map(|p| p.user_id())
            .collect();
        let groups: Vec<_> = permissions
            .launch_permissions()
            .iter()
            .filter_map(|p| p.group().map(|g| g.as_str()))
            .collect();
        assert_eq!(users, vec!["123456789012"], "{region}");
        assert_eq!(groups, vec!["all"], "{region}");

        let snapshot_ids: Vec<String> = ami
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_owned))
            .collect();
        assert!(!snapshot_ids.is_empty(), "{region}");
        assert_eq!(
            serde_json::from_value::<Vec<String>>(details["snapshots"][region].clone()).unwrap(),
            snapshot_ids
        );
        let snapshots = client
            .describe_snapshots()
            .set_snapshot_ids(Some(snapshot_ids))
            .send()
            .await
            .unwrap();
        for snapshot in snapshots.snapshots() {
            let tags = tags_of(snapshot.tags());
            assert_eq!(
                tags.get("purpose").map(String::as_str),
                Some("test"),
                "{region}: {tags:?}"
            );
            assert_eq!(tags.get(RUN_ID_TAG), Some(&h.cx.run_id), "{region}");
        }
    }

    // Only the AMIs remain.
    let home = ec2(REGION).await;
    let instances = instances_of_run(&home, &h.cx.run_id).await;
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].1, "terminated");
    let volumes = volumes.await.unwrap();
    assert!(
        !volumes.is_empty(),
        "the instance's volumes were not tagged"
    );
    for volume in &volumes {
        let tags = tags_of(volume.tags());
        assert_eq!(
            tags.get("cost-center").map(String::as_str),
            Some("ci"),
            "{tags:?}"
        );
    }
    assert_eq!(
        key_pairs_of_run(&home, &h.cx.run_id).await,
        Vec::<String>::new()
    );
    assert_eq!(
        security_groups_of_run(&home, &h.cx.run_id).await,
        Vec::<String>::new()
    );
    assert_eq!(h.outstanding(), Vec::<String>::new());
    assert!(
        h.transcript()
            .contains("admitting tcp/22 from 127.0.0.1/32 (`ssh_cidrs`)"),
        "{}",
        h.transcript()
    );

    // Versions are immutable: the same name again is refused before
    // anything is made, naming every AMI in the way.
    let again = Harness::new("aws");
    let refused = builder
        .preflight(&again.request(&image, vec![]), &again.cx)
        .await;
    let Err(BuildError::Refused(message)) = refused else {
        panic!("a second build of {ami_name} was not refused: {refused:?}");
    };
    for image_id in amis.values() {
        assert!(message.contains(image_id.as_str()), "{message}");
    }
    assert!(message.contains("bump `image.version`"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_eventual_consistency_are_waited_out_with_an_existing_key_pair_and_group() {
    let h = Harness::new("aws");
    let home = ec2(REGION).await;
    let (key, key_name, group_id) = existing_key_pair_and_group(&h, &home).await;
    let target = SshTarget::start("packer", Some(key.public_openssh()));

    let proxy = FaultProxy::start(vec![
        Rule::error(
            "DescribeImages",
            "RequestLimitExceeded",
            "Request limit exceeded.",
        )
        .status(503)
        .times(2),
        // Right after CreateImage, EC2 may not know the new id yet ...
        Rule::error(
            "DescribeImages",
            "InvalidAMIID.NotFound",
            "The image id does not exist",
        )
        .when_body_contains("ImageId.1=")
        .times(2),
        // ... and then report it pending for a while.
        Rule {
            action: "DescribeImages".into(),
            region: None,
            body_contains: Some("ImageId.1=".into()),
            times: 2,
            fault: Fault::Rewrite {
                from: "<imageState>available</imageState>".into(),
                to: "<imageState>pending</imageState>".into(),
            },
        },
        Rule::error("CreateTags", "Throttling", "Rate exceeded").times(1),
    ])
    .await;
    let image = unique("ec2-flaky");
    let builder = Ec2Builder::new(config(
        &proxy.url,
        Some(&target),
        json!({
            "source_ami": null,
            "source_ami_filter": {
                "filters": {"name": "ubuntu/images/hvm-ssd/ubuntu-*-16.04-amd64-server-*"},
                "owners": ["099720109477"],
                "most_recent": true
            },
            "key_pair_name": key_name,
            "security_group_ids": [group_id],
            "ssh_cidrs": null,
            "ssh": {"private_key_file": "id_ed25519"},
            "root_volume_size": 12,
            "root_volume_type": "gp3",
            "encrypt_boot": true,
            "kms_key_id": "alias/imgbuild-test",
        }),
    ));
    assert_eq!(builder.validate(h.config_dir.path()), vec![]);
    let request = h.request(&image, vec![shell(&["true"])]);
    let volumes = watch_volumes(&h.cx.run_id);
    let artifact = builder
        .build(&request, &h.cx)
        .await
        .unwrap_or_else(|err| panic!("{err}\n{}", h.transcript()));

    let injected = proxy.injected();
    for (action, what) in [
        ("DescribeImages", "RequestLimitExceeded"),
        ("DescribeImages", "InvalidAMIID.NotFound"),
        ("DescribeImages", "rewrite"),
        ("CreateTags", "Throttling"),
    ] {
        assert!(
            injected
                .iter()
                .any(|(a, w)| a == action && w.starts_with(what)),
            "{action} {what} was never injected: {injected:?}"
        );
    }
    let transcript = h.transcript();
    assert!(transcript.contains("not visible yet"), "{transcript}");
    assert!(transcript.contains(": pending"), "{transcript}");
    assert!(transcript.contains("available, confirming"), "{transcript}");

    let image_id = artifact.id.split(':').nth(1).unwrap();
    assert_eq!(
        images_named(&home, &format!("{image}-1.0.0")).await,
        vec![image_id.to_owned()]
    );
    // What the config named is used, and kept.
    let launched = home
        .describe_instances()
        .filters(tag_filter(RUN_ID_TAG, &h.cx.run_id))
        .send()
        .await
        .unwrap();
    let instance = &launched.reservations()[0].instances()[0];
    assert_eq!(instance.key_name(), Some(key_name.as_str()));
    assert_eq!(
        instance.security_groups()[0].group_id(),
        Some(group_id.as_str())
    );
    // The root volume was launched as configured, encrypted.
    let volumes = volumes.await.unwrap();
    let root = volumes.first().expect("the instance's volume is tagged");
    assert_eq!(root.size(), Some(12));
    assert_eq!(root.volume_type().map(|t| t.as_str()), Some("gp3"));
    assert_eq!(root.encrypted(), Some(true));
    assert_eq!(root.kms_key_id(), Some("alias/imgbuild-test"));
    assert!(
        home.describe_key_pairs()
            .key_names(&key_name)
            .send()
            .await
            .is_ok()
    );
    assert!(
        home.describe_security_groups()
            .group_ids(&group_id)
            .send()
            .await
            .is_ok()
    );
    assert_eq!(h.outstanding(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_provisioner_leaves_nothing_behind() {
    let h = Harness::new("aws");
    let target = SshTarget::start("packer", None);
    let image = unique("ec2-fail");
    let builder = Ec2Builder::new(config(&moto(), Some(&target), json!({})));
    let request = h.request(&image, vec![shell(&["echo about to fail", "exit 3"])]);
    let cloud_init = trust_imported_key(REGION, &h.cx.run_id, &target);
    let result = builder.build(&request, &h.cx).await;
    cloud_init.abort();
    match result {
        Err(BuildError::Failed { step, message }) => {
            assert_eq!(step, "provision", "{message}\n{}", h.transcript());
            assert!(message.contains("exit code 3"), "{message}");
        }
        other => panic!(
            "expected a provisioning failure, got {other:?}\n{}",
            h.transcript()
        ),
    }
    assert_nothing_left(&h, &format!("{image}-1.0.0"), &[REGION]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_during_provisioning_leaves_nothing_behind() {
    let h = Harness::with_cancel_on("aws", Some("imgbuild-test-sleeping"));
    let target = SshTarget::start("packer", None);
    let image = unique("ec2-cancel");
    let builder = Ec2Builder::new(config(&moto(), Some(&target), json!({})));
    // Far longer than HANG: a build that waits for it instead of stopping
    // is caught by the bound, whatever the machine's load.
    let request = h.request(
        &image,
        vec![shell(&["echo imgbuild-test-sleeping", "sleep 3600"])],
    );
    let cloud_init = trust_imported_key(REGION, &h.cx.run_id, &target);
    let result = tokio::time::timeout(HANG, builder.build(&request, &h.cx))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the build still ran {HANG:?} after it started: the cancel did not cut the remote `sleep 3600` short\n{}",
                h.transcript()
            )
        });
    cloud_init.abort();
    assert!(
        matches!(result, Err(BuildError::Cancelled)),
        "{result:?}\n{}",
        h.transcript()
    );
    assert_nothing_left(&h, &format!("{image}-1.0.0"), &[REGION]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ec2_error_while_copying_removes_every_ami_made_so_far() {
    let h = Harness::new("aws");
    let target = SshTarget::start("packer", None);
    let proxy = FaultProxy::start(vec![
        Rule::error(
            "CopyImage",
            "InvalidRequest",
            "Snapshot copy to this region is not supported for this account.",
        )
        .in_region("eu-west-1"),
    ])
    .await;
    let image = unique("ec2-copyfail");
    let builder = Ec2Builder::new(config(
        &proxy.url,
        Some(&target),
        json!({"ami_regions": ["us-west-2", "eu-west-1"], "snapshot_tags": {"purpose": "test"}}),
    ));
    let request = h.request(&image, vec![shell(&["true"])]);
    let cloud_init = trust_imported_key(REGION, &h.cx.run_id, &target);
    let result = builder.build(&request, &h.cx).await;
    cloud_init.abort();
    match result {
        Err(BuildError::Failed { step, message }) => {
            assert_eq!(step, "copy_regions", "{message}");
            for part in [
                "copy to eu-west-1",
                "EC2 CopyImage in eu-west-1 failed",
                "InvalidRequest",
                "not supported for this account",
            ] {
                assert!(message.contains(part), "`{part}` missing from: {message}");
            }
        }
        other => panic!("expected a copy failure, got {other:?}\n{}", h.transcript()),
    }
    assert!(
        amis_in_log(&h.transcript()).len() >= 2,
        "the home AMI and the us-west-2 copy should have been made first:\n{}",
        h.transcript()
    );
    assert_nothing_left(
        &h,
        &format!("{image}-1.0.0"),
        &[REGION, "us-west-2", "eu-west-1"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_taken_in_a_copy_region_is_refused_before_anything_is_made() {
    let h = Harness::new("aws");
    let image = unique("ec2-taken");
    let ami_name = format!("{image}-1.0.0");
    // Someone made an AMI with the name in eu-west-1.
    let europe = ec2("eu-west-1").await;
    let instance = europe
        .run_instances()
        .image_id(MOTO_AMI)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    let instance_id = instance.instances()[0].instance_id().unwrap();
    let existing = europe
        .create_image()
        .instance_id(instance_id)
        .name(&ami_name)
        .send()
        .await
        .unwrap();
    let existing = existing.image_id().unwrap();
    europe
        .terminate_instances()
        .instance_ids(instance_id)
        .send()
        .await
        .unwrap();

    let builder = Ec2Builder::new(config(&moto(), None, json!({"ami_regions": ["eu-west-1"]})));
    let request = h.request(&image, vec![]);
    match builder.preflight(&request, &h.cx).await {
        Err(BuildError::Refused(message)) => {
            assert!(message.contains(existing), "{message}");
            assert!(message.contains("eu-west-1"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // The build re-checks first and makes nothing either.
    match builder.build(&request, &h.cx).await {
        Err(BuildError::Failed { step, .. }) => assert_eq!(step, "check_ami"),
        other => panic!("expected the name check to fail, got {other:?}"),
    }
    let home = ec2(REGION).await;
    assert_eq!(instances_of_run(&home, &h.cx.run_id).await, vec![]);
    assert_eq!(
        key_pairs_of_run(&home, &h.cx.run_id).await,
        Vec::<String>::new()
    );
    assert_eq!(h.outstanding(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_dies_while_ssh_is_awaited_fails_the_build_at_once() {
    let h = Harness::new("aws");
    // Nothing listens there: SSH would be retried until its timeout.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let image = unique("ec2-dies");
    // Far longer than HANG: only noticing the dead instance ends the wait
    // in time, however slow the machine.
    let mut config = config(
        &moto(),
        None,
        json!({"ssh": {"port": closed_port, "timeout": "60m"}}),
    );
    config.ssh.host = Some("127.0.0.1".into());
    let builder = Ec2Builder::new(config);
    let request = h.request(&image, vec![]);
    let run_id = h.cx.run_id.clone();
    let events = h.sink.clone();
    let cancel = h.cx.cancel.clone();
    let killer = tokio::spawn(async move {
        let client = ec2(REGION).await;
        let deadline = Instant::now() + HANG / 2;
        while Instant::now() < deadline {
            // Only once SSH is awaited: killed earlier, the instance fails
            // the wait for `running` instead.
            let connecting = events.events().iter().any(|event| {
                matches!(event, imgbuild_core::events::Event::StepStarted { step, .. } if step == "connect")
            });
            if !connecting {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let running: Vec<String> = instances_of_run(&client, &run_id)
                .await
                .into_iter()
                .filter(|(_, state)| state == "running")
                .map(|(id, _)| id)
                .collect();
            if let Some(id) = running.first() {
                client
                    .terminate_instances()
                    .instance_ids(id)
                    .send()
                    .await
                    .unwrap();
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Otherwise the build would wait out the SSH timeout.
        cancel.cancel();
        false
    });
    let result = tokio::time::timeout(HANG, builder.build(&request, &h.cx))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the build still waited for SSH {HANG:?} after it started, with its instance terminated\n{}",
                h.transcript()
            )
        });
    assert!(
        killer.await.unwrap(),
        "the instance never ran, or SSH was never awaited\n{}",
        h.transcript()
    );
    match result {
        Err(BuildError::Failed { step, message }) => {
            assert_eq!(step, "connect", "{message}");
            assert!(message.contains("terminated"), "{message}");
        }
        other => panic!(
            "expected the connect step to fail, got {other:?}\n{}",
            h.transcript()
        ),
    }
    assert_nothing_left(&h, &format!("{image}-1.0.0"), &[REGION]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_orphan_removes_each_kind_of_ec2_leftover() {
    init_env();
    let endpoint = Some(moto());
    let client = ec2(REGION).await;
    let tagged = |resource: ResourceType, key: &str, value: &str| {
        TagSpecification::builder()
            .resource_type(resource)
            .tags(Tag::builder().key(key).value(value).build())
            .build()
    };
    let launch = async |token: &str| {
        client
            .run_instances()
            .image_id(MOTO_AMI)
            .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
            .min_count(1)
            .max_count(1)
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Instance)
                    .tags(
                        Tag::builder()
                            .key("imgbuild:client-token")
                            .value(token)
                            .build(),
                    )
                    .tags(Tag::builder().key(RUN_ID_TAG).value("dead-run").build())
                    .build(),
            )
            .send()
            .await
            .unwrap()
            .instances()[0]
            .instance_id()
            .unwrap()
            .to_owned()
    };
    let state_of = async |id: &str| {
        client
            .describe_instances()
            .instance_ids(id)
            .send()
            .await
            .unwrap()
            .reservations()[0]
            .instances()[0]
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_owned())
            .unwrap()
    };

    // Instances: by id, and by client token when the id was never learned.
    let known = launch(&unique("token")).await;
    let token = unique("token");
    let unknown = launch(&token).await;
    for resource in [
        Resource::from(Ec2Resource::Instance {
            region: REGION.into(),
            endpoint_url: endpoint.clone(),
            client_token: unique("unused"),
            instance_id: Some(known.clone()),
        }),
        Resource::from(Ec2Resource::Instance {
            region: REGION.into(),
            endpoint_url: endpoint.clone(),
            client_token: token.clone(),
            instance_id: None,
        }),
    ] {
        clean_orphan(&resource, "dead-run").await.unwrap();
        // Already gone is fine.
        clean_orphan(&resource, "dead-run").await.unwrap();
    }
    assert_eq!(state_of(&known).await, "terminated");
    assert_eq!(state_of(&unknown).await, "terminated");

    // Key pairs.
    let key_name = unique("orphan-key");
    let key = TemporaryKey::generate().unwrap();
    client
        .import_key_pair()
        .key_name(&key_name)
        .public_key_material(aws_sdk_ec2::primitives::Blob::new(
            key.public_openssh().as_bytes(),
        ))
        .send()
        .await
        .unwrap();
    let resource = Resource::from(Ec2Resource::KeyPair {
        region: REGION.into(),
        endpoint_url: endpoint.clone(),
        name: key_name.clone(),
    });
    clean_orphan(&resource, "dead-run").await.unwrap();
    clean_orphan(&resource, "dead-run").await.unwrap();
    assert!(
        client
            .describe_key_pairs()
            .key_names(&key_name)
            .send()
            .await
            .is_err()
    );

    // Security groups: by id, and by name.
    for by_id in [true, false] {
        let name = unique("orphan-sg");
        let id = client
            .create_security_group()
            .group_name(&name)
            .description("orphan")
            .send()
            .await
            .unwrap()
            .group_id()
            .unwrap()
            .to_owned();
        let resource = Resource::from(Ec2Resource::SecurityGroup {
            region: REGION.into(),
            endpoint_url: endpoint.clone(),
            name,
            group_id: by_id.then(|| id.clone()),
        });
        clean_orphan(&resource, "dead-run").await.unwrap();
        clean_orphan(&resource, "dead-run").await.unwrap();
        assert!(
            client
                .describe_security_groups()
                .group_ids(&id)
                .send()
                .await
                .is_err()
        );
    }

    // AMIs with their snapshots: by id, and by name when the id was never
    // learned, where only an AMI imgbuild tagged may be touched.
    let source = launch(&unique("token")).await;
    // An AMI of `source` named `name`, tagged with a run id when given.
    let image_of = async |name: &str, run_id: Option<&str>| {
        let mut request = client.create_image().instance_id(&source).name(name);
        if let Some(run_id) = run_id {
            request = request.tag_specifications(tagged(ResourceType::Image, RUN_ID_TAG, run_id));
        }
        request.send().await.unwrap().image_id().unwrap().to_owned()
    };
    let name = unique("orphan-ami");
    let by_id = image_of(&name, None).await;
    let by_id_snapshots = snapshots_described_for(&client, &by_id).await;
    assert!(!by_id_snapshots.is_empty());
    clean_orphan(
        &Resource::from(Ec2Resource::Image {
            region: REGION.into(),
            endpoint_url: endpoint.clone(),
            name: name.clone(),
            image_id: Some(by_id.clone()),
        }),
        "dead-run",
    )
    .await
    .unwrap();
    assert_eq!(images_named(&client, &name).await, Vec::<String>::new());
    assert_eq!(
        snapshots_described_for(&client, &by_id).await,
        Vec::<String>::new()
    );

    let name = unique("orphan-ami");
    let ours = image_of(&name, Some("dead-run")).await;
    let foreign = image_of(&name, None).await;
    // A later run may have made an AMI of that name once the dead run's
    // never came to be; it is not the dead run's to remove.
    let later_run = image_of(&name, Some("later-run")).await;
    let resource = Resource::from(Ec2Resource::Image {
        region: REGION.into(),
        endpoint_url: endpoint.clone(),
        name: name.clone(),
        image_id: None,
    });
    assert_eq!(
        clean_orphan(&resource, "dead-run").await.unwrap(),
        Removal::Removed
    );
    // Once it is gone, nothing of the run's is found: absent (whether the
    // record then goes is the journal's grace period's call).
    assert_eq!(
        clean_orphan_within(&resource, "dead-run", Duration::from_secs(1))
            .await
            .unwrap(),
        Removal::Absent
    );
    let mut survivors = vec![foreign.clone(), later_run.clone()];
    survivors.sort();
    let mut left = images_named(&client, &name).await;
    left.sort();
    assert_eq!(left, survivors);
    assert_eq!(
        snapshots_described_for(&client, &ours).await,
        Vec::<String>::new()
    );
    client
        .terminate_instances()
        .instance_ids(&source)
        .send()
        .await
        .unwrap();

    let err = clean_orphan(
        &Resource::from(DockerResource::Image {
            reference: "x".into(),
        }),
        "dead-run",
    )
    .await
    .unwrap_err();
    assert!(err.contains("not an EC2 resource"), "{err}");
}

/// Everything the run's journal still lists, removed as `imgbuild clean`
/// would, for tests that leave the build's resources on purpose.
async fn clean_journal(h: &Harness) {
    for item in h.cx.journal.outstanding() {
        imgbuild_builders::common::orphans::clean_orphan(&item.resource, &h.cx.run_id)
            .await
            .unwrap_or_else(|err| panic!("cleaning {}: {err}", item.resource.describe()));
        h.cx.journal.release(item.id).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_ssh_cidrs_ssh_from_an_unknown_place_is_refused_before_anything_is_made() {
    // Through `ssh.host` (a bastion, a port forward), and straight to the
    // instance but through another EC2 endpoint: either way this machine's
    // public address is not who connects.
    for (case, extra) in [
        ("ssh.host", json!({"ssh_cidrs": null})),
        (
            "endpoint",
            json!({"ssh_cidrs": null, "ssh": {"host": null, "port": null, "timeout": "5s"}}),
        ),
    ] {
        let h = Harness::new("aws");
        let image = unique("ec2-nocidrs");
        let builder = Ec2Builder::new(config(&moto(), None, extra));
        // `imgbuild validate` says so ...
        let problems = builder.validate(h.config_dir.path());
        assert_eq!(
            problems
                .iter()
                .map(|p| p.field.as_str())
                .collect::<Vec<_>>(),
            vec!["ssh_cidrs"],
            "{case}: {problems:?}"
        );
        // ... and a build that skips validation is refused all the same.
        let request = h.request(&image, vec![]);
        match builder.preflight(&request, &h.cx).await {
            Err(BuildError::Refused(message)) => {
                assert!(message.contains("`ssh_cidrs`"), "{case}: {message}");
                assert!(!message.contains("0.0.0.0/0 with"), "{case}: {message}");
            }
            other => panic!(
                "{case}: expected a refusal, got {other:?}\n{}",
                h.transcript()
            ),
        }
        // A build started anyway makes nothing either.
        match builder.build(&request, &h.cx).await {
            Err(BuildError::Refused(message)) => {
                assert!(message.contains("`ssh_cidrs`"), "{case}: {message}")
            }
            other => panic!(
                "{case}: expected a refusal, got {other:?}\n{}",
                h.transcript()
            ),
        }
        let home = ec2(REGION).await;
        assert_eq!(
            instances_of_run(&home, &h.cx.run_id).await,
            vec![],
            "{case}"
        );
        assert_eq!(
            key_pairs_of_run(&home, &h.cx.run_id).await,
            Vec::<String>::new(),
            "{case}"
        );
        assert_eq!(
            security_groups_of_run(&home, &h.cx.run_id).await,
            Vec::<String>::new(),
            "{case}"
        );
        assert_eq!(h.outstanding(), Vec::<String>::new(), "{case}");
    }
}

/// The IPv4 ranges the run's temporary security group admits on any port.
async fn admitted_by_run_group(client: &Client, run_id: &str) -> Vec<String> {
    let groups = client
        .describe_security_groups()
        .filters(tag_filter(RUN_ID_TAG, run_id))
        .send()
        .await
        .unwrap();
    let mut cidrs: Vec<String> = groups
        .security_groups()
        .iter()
        .flat_map(|g| g.ip_permissions())
        .flat_map(|p| p.ip_ranges())
        .filter_map(|r| r.cidr_ip().map(str::to_owned))
        .collect();
    cidrs.sort();
    cidrs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_private_ssh_interface_the_group_admits_the_vpc_only() {
    let home = ec2(REGION).await;
    // A VPC of the test's own, with a range nothing else uses.
    let second = u8::from_str_radix(&unique("x")[2..4], 16).unwrap();
    let vpc_cidr = format!("10.{second}.0.0/16");
    let vpc = home
        .create_vpc()
        .cidr_block(&vpc_cidr)
        .send()
        .await
        .unwrap()
        .vpc()
        .and_then(|v| v.vpc_id())
        .unwrap()
        .to_owned();
    let subnet = home
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block(format!("10.{second}.1.0/24"))
        .send()
        .await
        .unwrap()
        .subnet()
        .and_then(|s| s.subnet_id())
        .unwrap()
        .to_owned();
    let default_vpc = home
        .describe_vpcs()
        .filters(Filter::builder().name("is-default").values("true").build())
        .send()
        .await
        .unwrap();
    let default_cidr = default_vpc.vpcs()[0].cidr_block().unwrap().to_owned();

    // RunInstances is refused, so the build stops right after the group is
    // made; `abort` leaves the group to look at.
    let proxy = FaultProxy::start(vec![Rule::error(
        "RunInstances",
        "Unsupported",
        "The requested configuration is currently not supported.",
    )])
    .await;
    for (subnet_id, expected) in [
        (Some(subnet.clone()), vpc_cidr.clone()),
        (None, default_cidr),
    ] {
        let h = Harness::new("aws");
        let builder = Ec2Builder::new(config(
            &proxy.url,
            None,
            json!({
                "ssh_cidrs": null,
                "ssh_interface": "private_ip",
                "subnet_id": subnet_id,
                "ssh": {"host": null, "port": null},
            }),
        ));
        let mut request = h.request(&unique("ec2-private"), vec![]);
        request.on_error = imgbuild_core::OnError::Abort;
        builder.preflight(&request, &h.cx).await.unwrap();
        match builder.build(&request, &h.cx).await {
            Err(BuildError::Failed { step, .. }) => {
                assert_eq!(step, "run_instance", "{}", h.transcript())
            }
            other => panic!(
                "expected RunInstances to fail, got {other:?}\n{}",
                h.transcript()
            ),
        }
        let admitted = admitted_by_run_group(&home, &h.cx.run_id).await;
        clean_journal(&h).await;
        assert_eq!(admitted, vec![expected], "{}", h.transcript());
    }
    home.delete_subnet()
        .subnet_id(&subnet)
        .send()
        .await
        .unwrap();
    home.delete_vpc().vpc_id(&vpc).send().await.unwrap();
}

/// Launches an instance as the build would have: tagged with its run and
/// client token.
async fn launch_tagged(client: &Client, run_id: &str, token: &str) -> String {
    client
        .run_instances()
        .image_id(MOTO_AMI)
        .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
        .min_count(1)
        .max_count(1)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(Tag::builder().key(RUN_ID_TAG).value(run_id).build())
                .tags(
                    Tag::builder()
                        .key("imgbuild:client-token")
                        .value(token)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap()
        .instances()[0]
        .instance_id()
        .unwrap()
        .to_owned()
}

async fn instance_state(client: &Client, id: &str) -> String {
    client
        .describe_instances()
        .instance_ids(id)
        .send()
        .await
        .unwrap()
        .reservations()[0]
        .instances()[0]
        .state()
        .and_then(|s| s.name())
        .map(|n| n.as_str().to_owned())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_keeps_an_instance_record_until_the_instance_shows_up() {
    init_env();
    let client = ec2(REGION).await;
    let run_id = unique("dead-run");
    let token = unique("token");
    // The run died during RunInstances: the journal has the token only.
    let record = Resource::from(Ec2Resource::Instance {
        region: REGION.into(),
        endpoint_url: Some(moto()),
        client_token: token.clone(),
        instance_id: None,
    });
    assert_record_kept_while_absent(&record, &run_id).await;

    // EC2 shows the instance late; the next clean finds and terminates it.
    let late = launch_tagged(&client, &run_id, &token).await;
    clean_orphan_within(&record, &run_id, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(instance_state(&client, &late).await, "terminated");

    // One that shows up while clean is still looking is found too.
    let token = unique("token");
    let record = Resource::from(Ec2Resource::Instance {
        region: REGION.into(),
        endpoint_url: Some(moto()),
        client_token: token.clone(),
        instance_id: None,
    });
    let cleaning = tokio::spawn({
        let run_id = run_id.clone();
        async move { clean_orphan(&record, &run_id).await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !cleaning.is_finished(),
        "clean gave up before the instance showed up"
    );
    let later = launch_tagged(&client, &run_id, &token).await;
    cleaning.await.unwrap().unwrap();
    assert_eq!(instance_state(&client, &later).await, "terminated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_keeps_an_ami_record_until_the_ami_shows_up() {
    init_env();
    let client = ec2(REGION).await;
    let run_id = unique("dead-run");
    let name = unique("late-ami");
    // The run died during CreateImage: the journal has the name only.
    let record = Resource::from(Ec2Resource::Image {
        region: REGION.into(),
        endpoint_url: Some(moto()),
        name: name.clone(),
        image_id: None,
    });
    assert_record_kept_while_absent(&record, &run_id).await;

    // The AMI appears late, tagged with the run as the build tags it.
    let source = launch_tagged(&client, &run_id, &unique("token")).await;
    let image_id = client
        .create_image()
        .instance_id(&source)
        .name(&name)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Image)
                .tags(Tag::builder().key(RUN_ID_TAG).value(&run_id).build())
                .build(),
        )
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_owned();
    assert!(!snapshots_described_for(&client, &image_id).await.is_empty());
    clean_orphan_within(&record, &run_id, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(images_named(&client, &name).await, Vec::<String>::new());
    assert_eq!(
        snapshots_described_for(&client, &image_id).await,
        Vec::<String>::new()
    );
    client
        .terminate_instances()
        .instance_ids(&source)
        .send()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_launched_after_a_cancelled_run_instances_stays_recorded_until_cleaned() {
    let h = Harness::new("aws");
    let home = ec2(REGION).await;
    // An existing key pair and group, so the late launch needs nothing the
    // build's cleanup removes.
    let (_key, key_name, group_id) = existing_key_pair_and_group(&h, &home).await;
    // RunInstances reaches EC2 only well after the build gave up on it,
    // and after its cleanup stopped looking.
    let proxy = FaultProxy::start(vec![Rule::hold("RunInstances", Duration::from_secs(6))]).await;
    let builder = Ec2Builder::new(config(
        &proxy.url,
        None,
        json!({
            "key_pair_name": key_name,
            "security_group_ids": [group_id],
            "ssh_cidrs": null,
            "ssh": {"private_key_file": "id_ed25519"},
        }),
    ))
    .with_lookup_timeout(Duration::from_secs(2));
    let request = h.request(&unique("ec2-late-instance"), vec![]);
    let cancelled = proxy.cancel_once_held(&h, "RunInstances");
    let result = builder.build(&request, &h.cx).await;
    assert!(cancelled.await.unwrap(), "RunInstances never reached EC2");
    assert!(
        matches!(result, Err(BuildError::Cancelled)),
        "{result:?}\n{}",
        h.transcript()
    );
    // Nothing was found in time: the record stays for `imgbuild clean`.
    let kept: Vec<_> =
        h.cx.journal
            .outstanding()
            .into_iter()
            .filter(|o| {
                matches!(
                    Ec2Resource::from_resource(&o.resource),
                    Some(Ok(Ec2Resource::Instance { .. }))
                )
            })
            .collect();
    assert_eq!(kept.len(), 1, "{}", h.transcript());
    assert!(
        h.transcript().contains("the record is kept"),
        "{}",
        h.transcript()
    );

    // Then EC2 carries the launch out.
    assert!(
        held_request_done(&proxy, "RunInstances").await,
        "the held RunInstances never reached EC2"
    );
    let run_id = h.cx.run_id.clone();
    let launched = instances_of_run(&home, &run_id).await;
    assert_eq!(launched.len(), 1, "{launched:?}");
    assert_ne!(launched[0].1, "terminated");
    clean_journal(&h).await;
    assert_eq!(
        instances_of_run(&home, &run_id).await,
        vec![(launched[0].0.clone(), "terminated".to_owned())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ami_made_after_a_cancelled_create_image_is_found_and_removed() {
    let h = Harness::new("aws");
    let target = SshTarget::start("packer", None);
    // CreateImage reaches EC2 only after the build gave up on it.
    let proxy = FaultProxy::start(vec![Rule::hold("CreateImage", Duration::from_secs(3))]).await;
    let image = unique("ec2-late-ami");
    let builder = Ec2Builder::new(config(&proxy.url, Some(&target), json!({})));
    let request = h.request(&image, vec![shell(&["true"])]);
    let cloud_init = trust_imported_key(REGION, &h.cx.run_id, &target);
    let cancelled = proxy.cancel_once_held(&h, "CreateImage");
    let result = builder.build(&request, &h.cx).await;
    cloud_init.abort();
    assert!(cancelled.await.unwrap(), "CreateImage never reached EC2");
    assert!(
        matches!(result, Err(BuildError::Cancelled)),
        "{result:?}\n{}",
        h.transcript()
    );
    // EC2 carried the CreateImage out; by then cleanup must have waited
    // for its AMI and removed it.
    assert!(
        held_request_done(&proxy, "CreateImage").await,
        "the held CreateImage never reached EC2"
    );
    assert_nothing_left(&h, &format!("{image}-1.0.0"), &[REGION]).await;
    assert!(
        !amis_in_log(&h.transcript()).is_empty(),
        "{}",
        h.transcript()
    );
}

/// Nothing is found for a record whose id was never learned: that is
/// "absent", not "removed", and a record that young is kept: its create may
/// still complete (`imgbuild clean` releases it only after the grace).
async fn assert_record_kept_while_absent(record: &Resource, run_id: &str) {
    assert_eq!(
        clean_orphan_within(record, run_id, Duration::from_secs(2))
            .await
            .unwrap(),
        Removal::Absent
    );
    assert!(creation_grace(record) >= Duration::from_secs(60));
}

/// A key pair and a security group made beforehand, as a user's own: the
/// key's private half is saved as `id_ed25519` in the config directory.
async fn existing_key_pair_and_group(
    h: &Harness,
    home: &aws_sdk_ec2::Client,
) -> (TemporaryKey, String, String) {
    let key = TemporaryKey::generate().unwrap();
    key.write_private_openssh(&h.config_dir.path().join("id_ed25519"))
        .unwrap();
    let key_name = unique("existing-key");
    home.import_key_pair()
        .key_name(&key_name)
        .public_key_material(aws_sdk_ec2::primitives::Blob::new(
            key.public_openssh().as_bytes(),
        ))
        .send()
        .await
        .unwrap();
    let group_id = home
        .create_security_group()
        .group_name(unique("existing-sg"))
        .description("made by the test")
        .send()
        .await
        .unwrap()
        .group_id()
        .unwrap()
        .to_owned();
    (key, key_name, group_id)
}
