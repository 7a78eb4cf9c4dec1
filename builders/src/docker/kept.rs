//! What a Docker build's artifact record says the build kept, as the test
//! run and `delete` read it: they get the record (from this run, or from
//! the manifest for `imgbuild test`), not the build's state.

use super::step_discard::DISCARDED_ID;
use crate::Artifact;
use crate::common::artifact::checksum_path;
use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kept {
    /// A committed image and the tags this build set on it, the version
    /// first.
    Image {
        id: String,
        repository: String,
        tags: Vec<String>,
    },
    /// `export_path`: a filesystem tar and its checksum file.
    Tar {
        path: PathBuf,
        sha256: String,
        checksum_file: PathBuf,
    },
    /// `discard = true`.
    Nothing,
}

impl Kept {
    pub fn of(artifact: &Artifact) -> Result<Kept, String> {
        if artifact.builder != "docker" {
            return Err(format!(
                "{} was made by the {} builder, not the docker builder",
                artifact.id, artifact.builder
            ));
        }
        let details = &artifact.details;
        if artifact.id == DISCARDED_ID || details["discarded"] == true {
            return Ok(Kept::Nothing);
        }
        if details["format"] == "tar" {
            let file = artifact.files.first().ok_or_else(|| {
                format!(
                    "the record of the exported tar {} lists no file",
                    artifact.id
                )
            })?;
            let checksum_file = details["checksum_file"]
                .as_str()
                .map(PathBuf::from)
                .unwrap_or_else(|| checksum_path(&file.path));
            return Ok(Kept::Tar {
                path: file.path.clone(),
                sha256: file.sha256.clone(),
                checksum_file,
            });
        }
        let id = details["image_id"].as_str().unwrap_or(&artifact.id);
        let repository = details["repository"].as_str();
        let tags: Option<Vec<String>> = details["tags"].as_array().map(|tags| {
            tags.iter()
                .filter_map(|tag| tag.as_str().map(str::to_owned))
                .collect()
        });
        match (id.starts_with("sha256:"), repository, tags) {
            (true, Some(repository), Some(tags)) if !tags.is_empty() => Ok(Kept::Image {
                id: id.to_owned(),
                repository: repository.to_owned(),
                tags,
            }),
            _ => Err(format!(
                "the record of docker artifact {} names no committed image with its repository and tags (details: {details})",
                artifact.id
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ArtifactFile;
    use crate::common::testing::docker_artifact as artifact;
    use serde_json::json;

    #[test]
    fn each_output_reads_back_from_its_record() {
        let commit = artifact(
            "sha256:abc",
            Vec::new(),
            json!({"repository": "team/web", "tags": ["1.2", "latest"], "image_id": "sha256:abc"}),
        );
        assert_eq!(
            Kept::of(&commit).unwrap(),
            Kept::Image {
                id: "sha256:abc".into(),
                repository: "team/web".into(),
                tags: vec!["1.2".into(), "latest".into()],
            }
        );
        let file = ArtifactFile {
            path: "/out/web.tar".into(),
            size: 3,
            sha256: "ff".into(),
        };
        let export = artifact(
            "/out/web.tar",
            vec![file],
            json!({"format": "tar", "checksum_file": "/out/web.tar.sha256"}),
        );
        assert_eq!(
            Kept::of(&export).unwrap(),
            Kept::Tar {
                path: "/out/web.tar".into(),
                sha256: "ff".into(),
                checksum_file: "/out/web.tar.sha256".into(),
            }
        );
        let discard = artifact(DISCARDED_ID, Vec::new(), json!({"discarded": true}));
        assert_eq!(Kept::of(&discard).unwrap(), Kept::Nothing);
    }

    #[test]
    fn records_that_name_no_image_are_refused() {
        let bare = artifact("sha256:abc", Vec::new(), json!({}));
        let err = Kept::of(&bare).unwrap_err();
        assert!(err.contains("names no committed image"), "{err}");
        let mut qemu = artifact("/out/disk.qcow2", Vec::new(), json!({}));
        qemu.builder = "qemu".into();
        let err = Kept::of(&qemu).unwrap_err();
        assert!(err.contains("the qemu builder"), "{err}");
    }
}
