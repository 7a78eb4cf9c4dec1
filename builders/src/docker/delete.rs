//! `on_test_failure = "delete"`: takes back what a build kept. A committed
//! image loses the tags this build set, but only those that still name it
//! (an extra tag such as `latest` may have moved to a newer image since),
//! and goes itself once no tag names it. An exported tar and its checksum
//! file go only while they still hold what the build wrote.

use super::engine::{self, Engine, ImageApi};
use super::kept::Kept;
use super::{Removal, remove_image_reference};
use crate::common::artifact::{remove_recorded_files, sha256_file_async};
use crate::common::tracked::remove_path;
use crate::{Artifact, BuildError};
use bollard::query_parameters::RemoveImageOptions;
use imgbuild_core::{BuildLog, StepContext};
use std::io;
use std::path::Path;

pub async fn delete(artifact: &Artifact, cx: &StepContext) -> Result<(), BuildError> {
    let failed = |message: String| BuildError::Failed {
        step: "delete".to_owned(),
        message,
    };
    match Kept::of(artifact).map_err(BuildError::Refused)? {
        Kept::Nothing => {
            cx.log
                .info("the build kept nothing (discard = true); nothing to delete");
            Ok(())
        }
        Kept::Image {
            id,
            repository,
            tags,
        } => {
            let engine = Engine::connect().await.map_err(failed)?;
            delete_image(&engine, &id, &repository, &tags, &cx.log)
                .await
                .map_err(failed)?;
            remove_documents(artifact, &cx.log).await.map_err(failed)
        }
        Kept::Tar {
            path,
            sha256,
            checksum_file,
        } => {
            delete_tar(&path, &sha256, &checksum_file, &cx.log)
                .await
                .map_err(failed)?;
            remove_documents(artifact, &cx.log).await.map_err(failed)
        }
    }
}

/// The SBOM documents written for the image, which describe nothing once
/// it is gone.
async fn remove_documents(artifact: &Artifact, log: &BuildLog) -> Result<(), String> {
    for path in remove_recorded_files(&artifact.files).await? {
        log.info(format!("removed {path}"));
    }
    Ok(())
}

/// Removes `repository:tag` for each of `tags` that still names `id`, then
/// `id` itself when no tag (of any repository) names it any more.
async fn delete_image(
    images: &dyn ImageApi,
    id: &str,
    repository: &str,
    tags: &[String],
    log: &BuildLog,
) -> Result<(), String> {
    let mut errors = Vec::new();
    for tag in tags {
        let reference = format!("{repository}:{tag}");
        match images.inspect_image(&reference).await {
            Ok(found) if found.id.as_deref() == Some(id) => {
                match remove_image_reference(images, &reference).await {
                    Ok(Removal::Removed) => log.info(format!("removed the tag {reference}")),
                    Ok(_) => {}
                    Err(message) => errors.push(message),
                }
            }
            Ok(found) => log.warn(format!(
                "{reference} names another image now ({}), not {id}; it was left alone",
                found.id.as_deref().unwrap_or("unknown id")
            )),
            Err(err) if engine::is_not_found(&err) => {}
            Err(err) => errors.push(format!(
                "cannot check which image {reference} names: {}; it was left alone",
                engine::describe(&err)
            )),
        }
    }
    // The engine deletes an image with its last tag; it is still here when
    // a tag was kept, or when none of this build's tags named it any more.
    match images.inspect_image(id).await {
        Ok(found) => {
            let other_tags = found.repo_tags.unwrap_or_default();
            if other_tags.is_empty() {
                remove_untagged(images, id, log).await?;
            } else {
                log.info(format!(
                    "the image {id} stays: {} still name it",
                    other_tags.join(", ")
                ));
            }
        }
        Err(err) if engine::is_not_found(&err) => {}
        Err(err) => errors.push(format!(
            "cannot check whether the image {id} is gone: {}",
            engine::describe(&err)
        )),
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Not forced: an image a container still uses stays, and says so.
async fn remove_untagged(images: &dyn ImageApi, id: &str, log: &BuildLog) -> Result<(), String> {
    let options = RemoveImageOptions {
        force: false,
        noprune: false,
        platforms: None,
    };
    match images.remove_image(id, options).await {
        Ok(()) => {
            log.info(format!("removed the image {id}"));
            Ok(())
        }
        Err(err) if engine::is_not_found(&err) => Ok(()),
        Err(err) => Err(format!(
            "cannot remove the image {id}: {}; remove what uses it, then run `docker image rm {id}`",
            engine::describe(&err)
        )),
    }
}

/// Removes the tar when it still hashes as recorded, then its checksum
/// file when it still holds that hash.
async fn delete_tar(
    path: &Path,
    sha256: &str,
    checksum_file: &Path,
    log: &BuildLog,
) -> Result<(), String> {
    match sha256_file_async(path.to_path_buf()).await {
        Ok((_, actual)) if actual == sha256 => {
            remove_path(path, false)
                .await
                .map_err(|err| format!("cannot remove {}: {err}", path.display()))?;
            log.info(format!("removed {}", path.display()));
        }
        Ok((_, actual)) => {
            return Err(format!(
                "{} is not the file this build exported (its sha256 is {actual}, the build wrote {sha256}); it and {} were left alone: remove them by hand if they must go",
                path.display(),
                checksum_file.display()
            ));
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(format!(
                "cannot read {} to check it is the exported file: {err}",
                path.display()
            ));
        }
    }
    match tokio::fs::read_to_string(checksum_file).await {
        Ok(line) if line.split_whitespace().next() == Some(sha256) => {
            remove_path(checksum_file, false)
                .await
                .map_err(|err| format!("cannot remove {}: {err}", checksum_file.display()))?;
            log.info(format!("removed {}", checksum_file.display()));
            Ok(())
        }
        Ok(_) => Err(format!(
            "{} does not hold the checksum this build wrote ({sha256}); it was left alone: remove it by hand if it must go",
            checksum_file.display()
        )),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(format!("cannot read {}: {err}", checksum_file.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::artifact::{checksum_line, sha256_file};
    use crate::common::testing::TestContext;
    use crate::docker::engine::fake::FakeImages;

    const OURS: &str = "sha256:00000000000000000000000000000000000000000000000000000000000000aa";
    const NEWER: &str = "sha256:00000000000000000000000000000000000000000000000000000000000000bb";

    fn tags(tags: &[&str]) -> Vec<String> {
        tags.iter().map(|tag| (*tag).to_owned()).collect()
    }

    #[tokio::test]
    async fn only_tags_that_still_name_the_image_are_removed_then_the_image() {
        let images = FakeImages::with(&[
            ("web:1.2", OURS),
            ("web:stable", OURS),
            ("web:latest", NEWER),
            ("web:1.3", NEWER),
        ]);
        let t = TestContext::new("app");
        delete_image(
            &images,
            OURS,
            "web",
            &tags(&["1.2", "latest", "stable", "gone"]),
            &t.cx.log,
        )
        .await
        .unwrap();
        assert_eq!(images.image("web:1.2"), None);
        assert_eq!(images.image("web:stable"), None);
        assert_eq!(images.image("web:latest").as_deref(), Some(NEWER));
        assert_eq!(images.image("web:1.3").as_deref(), Some(NEWER));
        let calls = images.calls();
        assert!(
            !calls.contains(&"remove web:latest".to_owned()),
            "{calls:?}"
        );
    }

    #[tokio::test]
    async fn an_image_another_repository_tags_loses_only_this_builds_tags() {
        let images = FakeImages::with(&[("web:1.2", OURS), ("mirror/web:1.2", OURS)]);
        let t = TestContext::new("app");
        delete_image(&images, OURS, "web", &tags(&["1.2"]), &t.cx.log)
            .await
            .unwrap();
        assert_eq!(images.image("web:1.2"), None);
        assert_eq!(images.image("mirror/web:1.2").as_deref(), Some(OURS));
        assert!(
            !images.calls().contains(&format!("remove {OURS}")),
            "{:?}",
            images.calls()
        );
    }

    #[tokio::test]
    async fn an_image_left_untagged_is_removed_by_id() {
        // Every tag of the build moved away: the image dangles, by its id.
        let images = FakeImages::with(&[("web:latest", NEWER), (OURS, OURS)]);
        let t = TestContext::new("app");
        delete_image(&images, OURS, "web", &tags(&["1.2", "latest"]), &t.cx.log)
            .await
            .unwrap();
        assert_eq!(images.image(OURS), None);
        assert_eq!(images.image("web:latest").as_deref(), Some(NEWER));
    }

    #[tokio::test]
    async fn the_tar_and_checksum_go_only_while_they_hold_what_the_build_wrote() {
        let t = TestContext::new("app");
        let dir = tempfile::tempdir().unwrap();
        let tar = dir.path().join("web.tar");
        let checksum = dir.path().join("web.tar.sha256");
        std::fs::write(&tar, b"filesystem").unwrap();
        let (_, sha256) = sha256_file(&tar).unwrap();
        std::fs::write(&checksum, checksum_line(&sha256, &tar)).unwrap();

        // Replaced since: the build's hash no longer matches.
        std::fs::write(&tar, b"someone else's").unwrap();
        let err = delete_tar(&tar, &sha256, &checksum, &t.cx.log)
            .await
            .unwrap_err();
        assert!(err.contains("is not the file this build exported"), "{err}");
        assert!(tar.exists() && checksum.exists());

        std::fs::write(&tar, b"filesystem").unwrap();
        delete_tar(&tar, &sha256, &checksum, &t.cx.log)
            .await
            .unwrap();
        assert!(!tar.exists() && !checksum.exists());
        // Already gone is fine: a second delete finds nothing to do.
        delete_tar(&tar, &sha256, &checksum, &t.cx.log)
            .await
            .unwrap();
    }
}
