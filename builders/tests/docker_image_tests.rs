//! `[[test]]` on what the Docker builder produced, and deleting it, against
//! the real engine on this machine (`.ci/start-dockerd.sh` starts one if
//! needed; the base image is the fixture from
//! `tests/fixtures/docker-base-image.sh`). Every test uses its own
//! repository and run ids, and removes the images it makes.

use bollard::query_parameters::TagImageOptions;
use imgbuild_builders::{Artifact, BuildError, Builder};
use imgbuild_provisioners::image_test::ImageTest;
use imgbuild_test_support::{docker::*, harness::*};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A bound that only catches a hang: far above what a test run here takes
/// on a loaded machine, far below the remote sleep a cancelled run must
/// not wait out.
const HANG: Duration = Duration::from_secs(300);

/// A `[[test]]` running `inline` once.
fn image_test(name: &str, inline: &[&str]) -> ImageTest {
    ImageTest {
        name: name.to_owned(),
        shell: shell(inline),
        retries: 0,
        retry_delay: Duration::ZERO,
    }
}

/// Builds `config` with `provisioners` as version 1.0.0 of `name`.
async fn build(
    harness: &Harness,
    builder: &dyn Builder,
    name: &str,
    provisioners: Vec<imgbuild_provisioners::Provisioner>,
) -> Artifact {
    let request = harness.request(image_info(name, "1.0.0"), provisioners);
    builder.preflight(&request, &harness.cx).await.unwrap();
    builder
        .build(&request, &harness.cx)
        .await
        .unwrap_or_else(|err| panic!("the build failed: {err}\n{}", harness.transcript()))
}

#[tokio::test]
async fn tests_run_on_a_fresh_container_of_the_image_as_its_user_in_its_workdir() {
    let base = base_image();
    let docker = docker();
    let repository = unique_repository();
    let _cleanup = ImageCleanup::repository(&repository);
    let harness = Harness::new("app");
    let builder = builder(serde_json::json!({
        "image": base,
        "pull": false,
        "repository": repository,
        "env": {"BUILD_ONLY": "set-for-provisioners"},
        "changes": [
            "USER app",
            "WORKDIR /srv/app",
            // A test container that ran the image's own entrypoint would
            // stop at once; it must run the keep-alive command instead.
            "ENTRYPOINT [\"/bin/false\"]",
        ],
    }));
    let provisioners = vec![shell(&[
        "echo 'app:x:4321:4321::/srv/app:/bin/sh' >> /etc/passwd",
        "echo 'app:x:4321:' >> /etc/group",
        "mkdir -p /srv/app && chown app:app /srv/app",
        "echo provisioned > /etc/imgbuild-provisioned",
    ])];
    let artifact = build(&harness, builder.as_ref(), "tested", provisioners).await;

    let tests = [
        image_test(
            "the provisioner's file",
            &["grep -qx provisioned /etc/imgbuild-provisioned"],
        ),
        image_test(
            "user and workdir of the image",
            &[
                "id -un",
                "pwd",
                "test \"$(id -un)\" = app",
                "test \"$(pwd)\" = /srv/app",
                // The builder's exec env is for provisioning only.
                "test -z \"${BUILD_ONLY:-}\"",
                "touch marker-from-test",
            ],
        ),
        image_test(
            "a failing check",
            &["echo first-line", "echo to-stderr >&2", "exit 3"],
        ),
        image_test(
            "runs after the failure, in the same container",
            &["test -e /srv/app/marker-from-test"],
        ),
    ];
    let request = harness.request(image_info("tested", "1.0.0"), Vec::new());
    let results = tokio::time::timeout(
        HANG,
        builder.test_artifact(&request, &artifact, &tests, &harness.cx),
    )
    .await
    .expect("the test run hung")
    .unwrap_or_else(|err| panic!("the test run failed: {err}\n{}", harness.transcript()));

    let summary: Vec<(&str, bool)> = results
        .iter()
        .map(|result| (result.name.as_str(), result.passed))
        .collect();
    assert_eq!(
        summary,
        [
            ("the provisioner's file", true),
            ("user and workdir of the image", true),
            ("a failing check", false),
            ("runs after the failure, in the same container", true),
        ],
        "{results:#?}\n{}",
        harness.transcript()
    );
    let failed = &results[2];
    assert_eq!(failed.exit_code, Some(3), "{failed:?}");
    assert_eq!(failed.attempts, 1);
    assert!(
        failed.output_tail.contains(&"first-line".to_owned())
            && failed.output_tail.contains(&"to-stderr".to_owned()),
        "{failed:?}"
    );
    assert!(failed.error.is_some(), "{failed:?}");
    assert_eq!(results[0].exit_code, Some(0));

    // The container is gone, and what a test wrote stayed in it: the image
    // is as the build committed it.
    assert!(
        containers_of_run(&docker, harness.run_id())
            .await
            .is_empty()
    );
    harness.assert_journal_empty();
    let mut containers = ContainerCleanup::default();
    let probe = start_sleeper(&docker, &artifact.id, HashMap::new()).await;
    containers.0.push(probe.clone());
    let (code, output) = docker_exec(
        &docker,
        &probe,
        &[
            "sh",
            "-c",
            "ls -A /srv/app; test ! -e /srv/app/marker-from-test",
        ],
    )
    .await;
    assert_eq!(code, 0, "a test's file is in the image: {output}");
    assert_eq!(
        repository_tags(&docker, &repository).await,
        ["1.0.0"],
        "testing keeps the artifact"
    );
}

#[tokio::test]
async fn cancelling_during_a_test_removes_the_test_container_and_returns_cancelled() {
    let base = base_image();
    let docker = docker();
    let repository = unique_repository();
    let _cleanup = ImageCleanup::repository(&repository);
    let built = Harness::new("app");
    let builder = builder(serde_json::json!({
        "image": base,
        "pull": false,
        "repository": repository,
    }));
    let artifact = build(&built, builder.as_ref(), "cancelled", Vec::new()).await;

    // A later run, as `imgbuild test` is, cancelled once the test sleeps.
    let testing = Harness::with_cancel_on("app", Some("test-sleeping"));
    let tests = [image_test(
        "sleeps",
        &["echo test-sleeping", "sleep 3000", "echo woke-up"],
    )];
    let request = testing.request(image_info("cancelled", "1.0.0"), Vec::new());
    let started = Instant::now();
    let result = tokio::time::timeout(
        HANG,
        builder.test_artifact(&request, &artifact, &tests, &testing.cx),
    )
    .await
    .unwrap_or_else(|_| {
        panic!("the test run still ran {HANG:?} after it started: the cancel did not cut the remote `sleep 3000` short")
    });
    eprintln!(
        "cancelled test run took {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        matches!(result, Err(BuildError::Cancelled)),
        "{result:?}\n{}",
        testing.transcript()
    );
    let lines = testing.output_lines();
    assert!(lines.contains(&"test-sleeping".to_owned()), "{lines:?}");
    assert!(!lines.contains(&"woke-up".to_owned()), "{lines:?}");
    // Nothing of either run is left: the image carries the build's run id,
    // and a container started from it must not be taken for the build's.
    assert!(
        containers_of_run(&docker, testing.run_id())
            .await
            .is_empty()
    );
    assert!(containers_of_run(&docker, built.run_id()).await.is_empty());
    testing.assert_journal_empty();
    assert!(image_exists(&docker, &format!("{repository}:1.0.0")).await);
}

#[tokio::test]
async fn delete_removes_the_builds_tags_and_image_but_not_a_tag_that_moved_on() {
    let base = base_image();
    let docker = docker();
    let repository = unique_repository();
    let _cleanup = ImageCleanup::repository(&repository);
    let harness = Harness::new("app");
    let builder = builder(serde_json::json!({
        "image": base,
        "pull": false,
        "repository": repository,
        "tags": ["latest", "stable"],
    }));
    let artifact = build(&harness, builder.as_ref(), "deleted", Vec::new()).await;
    assert_eq!(
        repository_tags(&docker, &repository).await,
        ["1.0.0", "latest", "stable"]
    );
    // A newer build took `latest` since.
    let newer = docker.inspect_image(&base).await.unwrap().id.unwrap();
    docker
        .tag_image(
            &newer,
            Some(TagImageOptions {
                repo: Some(repository.clone()),
                tag: Some("latest".to_owned()),
            }),
        )
        .await
        .unwrap();

    builder
        .delete_artifact(&artifact, &harness.cx)
        .await
        .unwrap_or_else(|err| panic!("delete failed: {err}\n{}", harness.transcript()));

    assert_eq!(repository_tags(&docker, &repository).await, ["latest"]);
    let latest = docker
        .inspect_image(&format!("{repository}:latest"))
        .await
        .unwrap();
    assert_eq!(latest.id.as_deref(), Some(newer.as_str()));
    assert!(
        !image_exists(&docker, &artifact.id).await,
        "no tag names the build's image any more; it must be gone"
    );
    assert!(image_exists(&docker, &base).await);
}

#[tokio::test]
async fn an_exported_tar_is_not_tested_and_delete_removes_it_with_its_checksum() {
    let base = base_image();
    let docker = docker();
    let harness = Harness::new("rootfs");
    let builder = builder(serde_json::json!({
        "image": base,
        "pull": false,
        "export_path": "out/rootfs.tar",
    }));
    let artifact = build(&harness, builder.as_ref(), "rootfs", Vec::new()).await;
    let tar = harness.config_dir.path().join("out/rootfs.tar");
    let checksum = harness.config_dir.path().join("out/rootfs.tar.sha256");
    assert!(tar.exists() && checksum.exists());

    let request = harness.request(image_info("rootfs", "1.0.0"), Vec::new());
    let tests = [image_test("anything", &["true"])];
    match builder
        .test_artifact(&request, &artifact, &tests, &harness.cx)
        .await
    {
        Err(BuildError::Refused(message)) => {
            assert!(
                message.starts_with("tests need a committed image"),
                "{message}"
            );
            assert!(message.contains("export_path"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        containers_of_run(&docker, harness.run_id())
            .await
            .is_empty()
    );
    harness.assert_journal_empty();

    builder
        .delete_artifact(&artifact, &harness.cx)
        .await
        .unwrap_or_else(|err| panic!("delete failed: {err}\n{}", harness.transcript()));
    assert!(!tar.exists(), "the tar is still there");
    assert!(!checksum.exists(), "its checksum file is still there");
}
