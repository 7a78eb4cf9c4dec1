//! The EC2 builder (against moto) with an `ansible` provisioner: Ansible
//! logs in over SSH with the build's temporary key, straight to the
//! address the build uses (here the sshd container playing the instance).

#![cfg(feature = "ec2")]

use imgbuild_builders::Builder;
use imgbuild_builders::ec2::Ec2Builder;
use imgbuild_test_support::common::unique;
use imgbuild_test_support::docker::SshTarget;
use imgbuild_test_support::ec2::{moto, trust_imported_key};
use imgbuild_test_support::harness::{Harness, ansible};
use std::time::Duration;

const REGION: &str = "us-east-1";
/// An AMI moto has in every region.
const MOTO_AMI: &str = "ami-785db401";
/// Only catches a hang.
const HANG: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ansible_role_provisions_the_instance_over_the_builds_ssh_connection() {
    let h = Harness::new("aws");
    let target = SshTarget::start("packer", None);
    let image = unique("ec2-ansible");
    let config = serde_json::from_value(serde_json::json!({
        "region": REGION,
        "endpoint_url": moto(),
        "source_ami": MOTO_AMI,
        "instance_type": "t3.micro",
        "ami_timeout": "2m",
        "instance_timeout": "2m",
        "ssh_cidrs": ["127.0.0.1/32"],
        "ssh": {"username": "packer", "host": target.host, "port": target.port, "timeout": "90s", "connect_timeout": "5s"},
    }))
    .unwrap();
    let builder = Ec2Builder::new(config);
    let request = h.request(
        &image,
        vec![ansible(
            "playbook_file = \"site.yml\"\nhost_alias = \"instance\"\nextra_vars = { greeting = \"from ec2\" }\n",
            "aws",
        )],
    );
    let cloud_init = trust_imported_key(REGION, &h.cx.run_id, &target);
    let result = tokio::time::timeout(HANG, builder.build(&request, &h.cx))
        .await
        .expect("the build hung");
    cloud_init.abort();
    let artifact = result.unwrap_or_else(|err| panic!("{err}\n{}", h.transcript()));
    assert_eq!(artifact.builder, "ec2");
    assert_eq!(
        target.exec("cat /etc/imgbuild-demo/role-file.txt /etc/imgbuild-demo/greeting /etc/imgbuild-demo/handler-ran"),
        "installed by the imgbuild ansible demo role\n\
         greeting=from ec2\nhost=instance\ntoken=none\n\
         handler ran for instance\n"
    );
    assert!(
        h.transcript()
            .contains("TASK [demo : install the role's file]"),
        "{}",
        h.transcript()
    );
    assert_eq!(h.outstanding(), Vec::<String>::new());
}
