//! Versions stay immutable when builds race for them: the Docker engine's
//! tag call overwrites, so the last check that a version is free and the tag
//! that takes it happen under one lock.

use bollard::query_parameters::TagImageOptions;
use imgbuild_builders::BuildError;
use imgbuild_builders::common::name_lock::NameLock;
use imgbuild_test_support::{docker::*, harness::*};
use std::time::Duration;

#[tokio::test]
async fn a_version_taken_while_the_build_waits_to_tag_is_not_moved() {
    let base = base_image();
    let docker = docker();
    let repository = unique_repository();
    let reference = format!("{repository}:7.0.0");
    let _cleanup = ImageCleanup::repository(&repository);
    let harness = Harness::new("app");
    let builder =
        builder(serde_json::json!({"image": base, "pull": false, "repository": repository}));
    let request = harness.request(image_info("raced", "7.0.0"), Vec::new());
    builder.preflight(&request, &harness.cx).await.unwrap();

    // Another build holds the version's lock: it has checked the tag free
    // and is about to set it.
    let other_build = NameLock::acquire(
        &format!(
            "docker-tag {} {reference}",
            std::env::var("DOCKER_HOST").unwrap_or_default()
        ),
        &harness.cx.log,
    )
    .await
    .unwrap();
    let sink = harness.sink.clone();
    let build = tokio::spawn(async move { builder.build(&request, &harness.cx).await });
    // Bounded wait until the build, its image committed, waits for the
    // version's lock, or (without a lock) has finished.
    let waits_for_the_lock = || {
        sink.events().iter().any(|event| {
            matches!(event, imgbuild_core::Event::Message { message, .. } if message.starts_with("waiting for another build that holds"))
        })
    };
    for _ in 0..6000 {
        if waits_for_the_lock() || build.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        waits_for_the_lock() || build.is_finished(),
        "the build neither waited for the lock nor finished"
    );
    // The other build takes the version, then lets go.
    let base_id = docker
        .inspect_image(&base)
        .await
        .unwrap()
        .id
        .expect("images have ids");
    docker
        .tag_image(
            &base_id,
            Some(TagImageOptions {
                repo: Some(repository.clone()),
                tag: Some("7.0.0".to_owned()),
            }),
        )
        .await
        .unwrap();
    drop(other_build);

    let result = tokio::time::timeout(Duration::from_secs(120), build)
        .await
        .expect("the build finishes")
        .unwrap();
    let Err(BuildError::Failed { message, .. }) = &result else {
        panic!("the build must fail: {result:?}");
    };
    assert!(message.contains("already exists"), "{message}");
    let now = docker.inspect_image(&reference).await.unwrap().id;
    assert_eq!(
        now.as_deref(),
        Some(base_id.as_str()),
        "the tag was moved off the image the other build recorded"
    );
    // Nor did the failed build leave its temporary tag.
    assert_eq!(repository_tags(&docker, &repository).await, ["7.0.0"]);
}
