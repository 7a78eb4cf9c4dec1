//! The Docker builder with an `ansible` provisioner: ansible-playbook on
//! this machine reaches the build container through Ansible's docker
//! connection, and what the role installed is in the committed image.

use imgbuild_test_support::docker::{
    ImageCleanup, builder, containers_of_run, docker, sshd_image, unique_repository,
};
use imgbuild_test_support::harness::{Harness, ansible, image_info};
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ansible_role_is_applied_through_the_docker_connection_and_committed() {
    let base = sshd_image();
    let repository = unique_repository();
    let mut cleanup = ImageCleanup::repository(&repository);
    let harness = Harness::new("app");
    let builder = builder(serde_json::json!({
        "image": base,
        "pull": false,
        "repository": repository,
    }));
    let provisioners = vec![ansible(
        "playbook_file = \"site.yml\"\nextra_vars = { greeting = \"from docker\" }\n",
        "app",
    )];
    let request = harness.request(image_info("app", "1.0.0"), provisioners);
    builder.preflight(&request, &harness.cx).await.unwrap();
    let artifact = builder
        .build(&request, &harness.cx)
        .await
        .unwrap_or_else(|err| panic!("{err}\n{}", harness.output_lines().join("\n")));
    cleanup.add(artifact.id.clone());

    let output = Command::new("docker")
        .args(["run", "--rm", "--entrypoint", "cat"])
        .arg(format!("{repository}:1.0.0"))
        .args([
            "/etc/imgbuild-demo/role-file.txt",
            "/etc/imgbuild-demo/greeting",
            "/etc/imgbuild-demo/handler-ran",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "installed by the imgbuild ansible demo role\n\
         greeting=from docker\nhost=app\ntoken=none\n\
         handler ran for app\n"
    );
    assert!(
        harness
            .output_lines()
            .iter()
            .any(|line| line.starts_with("TASK [demo : render the greeting]")),
        "the play's output is in the build log"
    );
    assert_eq!(
        containers_of_run(&docker(), harness.run_id()).await,
        Vec::<String>::new()
    );
    harness.assert_journal_empty();
}
