//! Versions stay immutable when builds race for them: the Docker engine's
//! tag call overwrites, so the last check that a version is free and the tag
//! that takes it happen under one lock.

mod support;

use bollard::query_parameters::TagImageOptions;
use imgbuild_builders::BuildError;
use imgbuild_builders::common::name_lock::NameLock;
use std::time::Duration;
use support::*;

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
    let other_build = NameLock::acquire(&format!(
        "docker-tag {} {reference}",
        std::env::var("DOCKER_HOST").unwrap_or_default()
    ))
    .await
    .unwrap();
    let journal = harness.journal.clone();
    let build = tokio::spawn(async move { builder.build(&request, &harness.cx).await });
    // Bounded wait until the commit is done (the journal names the new
    // image by id); from there the build only checks the tag and sets it.
    let mut committed = false;
    for _ in 0..2400 {
        committed = journal.outstanding().iter().any(|item| {
            matches!(&item.resource, imgbuild_core::Resource::DockerImage { reference } if reference.starts_with("sha256:"))
        });
        if committed || build.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        committed || build.is_finished(),
        "the build never committed"
    );
    // Without the lock the build would tag right away; give it the chance.
    for _ in 0..60 {
        if build.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
