//! `build --check-reproducible`: a version is built twice from the same
//! inputs and the two results compared. The first build's artifact is
//! deleted once what is compared is kept from it, so the second, which is
//! tested, delivered and recorded as usual, may take the same names.
//!
//! Compared: the artifacts' digests, and listings of the two machines' files
//! taken at the end of each build (see `file_listing`). Not compared: what a
//! machine changes after that (the QEMU guest's shutdown), and whatever a
//! listing leaves out (other mounts, `/tmp`, `/var/tmp`).

use imgbuild_builders::common::file_listing::{self, ListingComparison};
use imgbuild_builders::{Artifact, BuildError, BuildRequest, Builder};
use imgbuild_core::StepContext;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// What the manifest records of the comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reproducibility {
    /// What was compared, in words.
    pub method: String,
    /// The two artifacts are the same bytes (every file's sha256; for an
    /// image without files, its id).
    pub artifact_identical: bool,
    /// How the artifacts differ, when they do.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifact_differences: Vec<String>,
    /// The two machines held the same files with the same content, type,
    /// mode, owner and link targets (modification times aside).
    pub files_identical: bool,
    pub files: ListingComparison,
    /// Directories no listing covers.
    pub not_listed: Vec<String>,
}

const FIRST_LISTING: &str = "first.json";

/// The first of the two builds, its artifact gone.
pub struct FirstBuild {
    dir: tempfile::TempDir,
    artifact: Artifact,
}

impl FirstBuild {
    /// Where the second build lists its machine's files.
    pub fn second_listing(&self) -> PathBuf {
        self.dir.path().join("second.json")
    }

    fn first_listing(&self) -> PathBuf {
        self.dir.path().join(FIRST_LISTING)
    }
}

/// Builds once with `request` (which must take nothing from the step cache,
/// write no SBOM and deliver nothing), keeps its file listing and artifact
/// digests, and deletes the artifact.
pub async fn first_build(
    builder: &dyn Builder,
    mut request: BuildRequest,
    cx: &StepContext,
) -> Result<FirstBuild, BuildError> {
    let dir = tempfile::tempdir().map_err(|err| BuildError::Failed {
        step: "check-reproducible".into(),
        message: format!("cannot make a directory for the file listings: {err}"),
    })?;
    request.list_files = Some(dir.path().join(FIRST_LISTING));
    cx.log.info(
        "--check-reproducible: the first of two builds; its artifact is compared with the second's, then deleted",
    );
    let artifact = builder.build(&request, cx).await?;
    builder
        .delete_artifact(&artifact, cx)
        .await
        .map_err(|err| BuildError::Failed {
            step: "check-reproducible".into(),
            message: format!(
                "the first build's artifact {} could not be deleted, so the second cannot take its name: {err}",
                artifact.id
            ),
        })?;
    cx.log.info(format!(
        "--check-reproducible: deleted the first build's artifact {}; the second build follows",
        artifact.id
    ));
    Ok(FirstBuild { dir, artifact })
}

/// Compares the first build with the second, whose artifact is `second`.
pub fn compare(first: &FirstBuild, second: &Artifact) -> Result<Reproducibility, String> {
    let listings = file_listing::read(&first.first_listing())
        .and_then(|a| file_listing::read(&first.second_listing()).map(|b| (a, b)))
        .map_err(|err| err.to_string())?;
    let files = file_listing::compare(&listings.0, &listings.1);
    let artifact_differences = artifact_differences(&first.artifact, second);
    Ok(Reproducibility {
        method: "built twice from the same inputs, without the step cache; compared the artifacts' digests, and the files of the two machines (content, type, mode, owner, link target; modification times counted apart) listed at the end of each build".into(),
        artifact_identical: artifact_differences.is_empty(),
        artifact_differences,
        files_identical: files.identical(),
        files,
        not_listed: listings.1.not_listed.clone(),
    })
}

fn artifact_differences(first: &Artifact, second: &Artifact) -> Vec<String> {
    let mut differences = Vec::new();
    if first.files.is_empty() && first.id != second.id {
        differences.push(format!("id {} → {}", first.id, second.id));
    }
    let name = |file: &imgbuild_builders::ArtifactFile| {
        file.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    // The first build wrote no SBOM; its files are the ones to compare.
    for file in &first.files {
        match second.files.iter().find(|f| name(f) == name(file)) {
            Some(after) if after.sha256 != file.sha256 => differences.push(format!(
                "{}: sha256 {} → {}",
                name(file),
                file.sha256,
                after.sha256
            )),
            Some(_) => {}
            None => differences.push(format!("{}: only in the first build", name(file))),
        }
    }
    differences
}

/// The comparison in a few lines, for the build log.
pub fn summary(report: &Reproducibility) -> String {
    let files = &report.files;
    let mut text = format!(
        "--check-reproducible: artifacts {}; machine files {} ({} paths compared, {} differ, {} differ only in modification time)",
        if report.artifact_identical {
            "identical"
        } else {
            "differ"
        },
        if report.files_identical {
            "identical"
        } else {
            "differ"
        },
        files.compared,
        files.differing,
        files.timestamps_only,
    );
    for difference in report.artifact_differences.iter().take(5) {
        text.push_str(&format!("\n  artifact {difference}"));
    }
    for difference in files.differences.iter().take(20) {
        text.push_str(&format!(
            "\n  {}: {}",
            difference.path,
            difference.differs.join(", ")
        ));
    }
    if files.differing > 20 {
        text.push_str(&format!(
            "\n  ... and {} more (the manifest entry names up to {})",
            files.differing - 20,
            file_listing::MAX_NAMED_DIFFERENCES
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgbuild_builders::ArtifactFile;

    fn artifact(files: &[(&str, &str)], id: &str) -> Artifact {
        Artifact {
            builder: "qemu".into(),
            id: id.into(),
            files: files
                .iter()
                .map(|(path, sha256)| ArtifactFile {
                    path: PathBuf::from(path),
                    size: 1,
                    sha256: (*sha256).into(),
                })
                .collect(),
            source: imgbuild_builders::SourceIdentity {
                kind: "file".into(),
                reference: "base.qcow2".into(),
                sha256: None,
            },
            details: serde_json::Value::Null,
        }
    }

    #[test]
    fn artifacts_compare_by_file_digest_or_by_id_when_they_have_no_files() {
        let a = artifact(
            &[("/out/a.qcow2", "11"), ("/out/a.qcow2.sha256", "22")],
            "x",
        );
        assert!(artifact_differences(&a, &a.clone()).is_empty());
        let mut with_sbom = a.clone();
        with_sbom.files.push(ArtifactFile {
            path: "/out/a.spdx.json".into(),
            size: 1,
            sha256: "44".into(),
        });
        assert!(artifact_differences(&a, &with_sbom).is_empty());
        let b = artifact(
            &[("/out/a.qcow2", "33"), ("/out/a.qcow2.sha256", "22")],
            "x",
        );
        assert_eq!(artifact_differences(&a, &b), ["a.qcow2: sha256 11 → 33"]);
        let image = |id: &str| artifact(&[], id);
        assert!(artifact_differences(&image("sha256:1"), &image("sha256:1")).is_empty());
        assert_eq!(
            artifact_differences(&image("sha256:1"), &image("sha256:2")),
            ["id sha256:1 → sha256:2"]
        );
    }
}
