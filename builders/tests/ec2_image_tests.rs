//! `[[test]]` on what the EC2 builder produced, and deleting it, against
//! moto with an sshd container playing both the build instance and the
//! instance the tests run on (moto's instances run nothing). The test run
//! imports a key pair of its own, which the container trusts once it
//! appears, as cloud-init on a fresh instance would.
//!
//! What cannot be tested here: moto's AMIs hold no data, so that the tests
//! ran on an instance of the new AMI is checked by the image id moto
//! launched it from, and what they read is what the build left on the
//! container.

#![cfg(feature = "ec2")]

use aws_sdk_ec2::Client;
use aws_sdk_ec2::types::Filter;
use imgbuild_builders::Builder;
use imgbuild_builders::ec2::Ec2Builder;
use imgbuild_provisioners::image_test::ImageTest;
use imgbuild_test_support::common::unique;
use imgbuild_test_support::docker::SshTarget;
use imgbuild_test_support::ec2::{ec2, moto, trust_imported_key, trust_imported_key_named};
use imgbuild_test_support::harness::{Harness, shell};
use std::collections::BTreeMap;
use std::time::Duration;

const REGION: &str = "us-east-1";
const COPY_REGION: &str = "us-west-2";
/// An AMI moto has in every region.
const MOTO_AMI: &str = "ami-785db401";
/// Only catches a hang.
const HANG: Duration = Duration::from_secs(600);

fn run_filter(run_id: &str) -> Filter {
    Filter::builder()
        .name("tag:imgbuild:run-id")
        .values(run_id)
        .build()
}

/// A `[[test]]` running `inline` once.
fn image_test(name: &str, inline: &[&str]) -> ImageTest {
    ImageTest {
        name: name.to_owned(),
        shell: shell(inline),
        retries: 0,
        retry_delay: Duration::ZERO,
    }
}

/// (image id, state) of every instance the run launched.
async fn instances_of_run(client: &Client, run_id: &str) -> Vec<(String, String)> {
    client
        .describe_instances()
        .filters(run_filter(run_id))
        .send()
        .await
        .unwrap()
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .map(|i| {
            (
                i.image_id().unwrap_or_default().to_owned(),
                i.state()
                    .and_then(|s| s.name())
                    .map(|n| n.as_str().to_owned())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

/// Key pairs and security groups the run still has.
async fn temporaries_of_run(client: &Client, run_id: &str) -> Vec<String> {
    let keys = client
        .describe_key_pairs()
        .filters(run_filter(run_id))
        .send()
        .await
        .unwrap();
    let groups = client
        .describe_security_groups()
        .filters(run_filter(run_id))
        .send()
        .await
        .unwrap();
    keys.key_pairs()
        .iter()
        .filter_map(|k| k.key_name().map(str::to_owned))
        .chain(
            groups
                .security_groups()
                .iter()
                .filter_map(|g| g.group_id().map(str::to_owned)),
        )
        .collect()
}

async fn amis_named(client: &Client, name: &str) -> Vec<String> {
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

async fn own_snapshots(client: &Client) -> Vec<String> {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tests_run_on_an_instance_of_the_new_ami_and_delete_takes_it_from_every_region() {
    let h = Harness::new("aws");
    let target = SshTarget::start("packer", None);
    let image = unique("ec2-tested");
    let config = serde_json::from_value(serde_json::json!({
        "region": REGION,
        "endpoint_url": moto(),
        "source_ami": MOTO_AMI,
        "instance_type": "t3.micro",
        "ami_regions": [COPY_REGION],
        "ami_timeout": "2m",
        "instance_timeout": "2m",
        "ssh_cidrs": ["127.0.0.1/32"],
        "ssh": {"username": "packer", "host": target.host, "port": target.port, "timeout": "90s", "connect_timeout": "5s"},
    }))
    .unwrap();
    let builder = Ec2Builder::new(config);
    let request = h.request(
        &image,
        vec![shell(&["echo provisioned > /tmp/imgbuild-provisioned"])],
    );
    let run_id = h.run_id().to_owned();
    let build_key = trust_imported_key(REGION, &run_id, &target);
    let artifact = tokio::time::timeout(HANG, builder.build(&request, &h.cx))
        .await
        .expect("the build hung")
        .unwrap_or_else(|err| panic!("the build failed: {err}\n{}", h.transcript()));
    let build_key = build_key.await.unwrap().expect("the build imported no key");
    let amis: BTreeMap<String, String> =
        serde_json::from_value(artifact.details["amis"].clone()).unwrap();

    let test_key = trust_imported_key_named(
        REGION,
        &run_id,
        &format!("imgbuild-aws-test-{run_id}"),
        &target,
    );
    let tests = [
        image_test(
            "the provisioner's file",
            &["grep -qx provisioned /tmp/imgbuild-provisioned"],
        ),
        image_test(
            "a failing check",
            &["echo imgbuild-said-$((40+2))", "exit 3"],
        ),
        image_test("runs after the failure", &["true"]),
    ];
    let results = tokio::time::timeout(
        HANG,
        builder.test_artifact(&request, &artifact, &tests, &h.cx),
    )
    .await
    .expect("the test run hung")
    .unwrap_or_else(|err| panic!("the test run failed: {err}\n{}", h.transcript()));
    let test_key = test_key
        .await
        .unwrap()
        .expect("the test run imported no key");
    assert_ne!(test_key, build_key, "the test run has a key of its own");

    let summary: Vec<(&str, bool)> = results
        .iter()
        .map(|result| (result.name.as_str(), result.passed))
        .collect();
    assert_eq!(
        summary,
        [
            ("the provisioner's file", true),
            ("a failing check", false),
            ("runs after the failure", true),
        ],
        "{results:#?}\n{}",
        h.transcript()
    );
    assert_eq!(results[1].exit_code, Some(3), "{results:#?}");
    // What the machine printed, not the command.
    assert!(
        results[1]
            .output_tail
            .contains(&"imgbuild-said-42".to_owned()),
        "{results:#?}"
    );

    // Two instances, the build's from the source AMI and the test run's
    // from the new one, both terminated; no key pair or group left.
    let home = ec2(REGION).await;
    let mut launched = instances_of_run(&home, &run_id).await;
    launched.sort();
    let mut expected = vec![
        (amis[REGION].clone(), "terminated".to_owned()),
        (MOTO_AMI.to_owned(), "terminated".to_owned()),
    ];
    expected.sort();
    assert_eq!(launched, expected);
    assert_eq!(
        temporaries_of_run(&home, &run_id).await,
        Vec::<String>::new()
    );
    h.assert_journal_empty();

    // The AMI and its snapshots go in every region; once more is no error.
    let snapshots: BTreeMap<String, Vec<String>> =
        serde_json::from_value(artifact.details["snapshots"].clone()).unwrap();
    assert!(!snapshots[REGION].is_empty(), "{snapshots:?}");
    let ami_name = artifact.details["ami_name"].as_str().unwrap();
    for _ in 0..2 {
        builder
            .delete_artifact(&artifact, &h.cx)
            .await
            .unwrap_or_else(|err| panic!("the delete failed: {err}\n{}", h.transcript()));
        for region in [REGION, COPY_REGION] {
            let client = ec2(region).await;
            assert_eq!(
                amis_named(&client, ami_name).await,
                Vec::<String>::new(),
                "AMI left in {region}"
            );
            let left = own_snapshots(&client).await;
            for snapshot in &snapshots[region] {
                assert!(!left.contains(snapshot), "{snapshot} left in {region}");
            }
        }
        h.assert_journal_empty();
    }
}
