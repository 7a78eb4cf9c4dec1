//! How imgbuild gets a machine and snapshots it.
//!
//! Every builder reads as a list of steps (one file per step, each owning its
//! run and its cleanup), run by [`imgbuild_core::run_steps`]. The builder
//! kinds are listed in [`registry::BUILDERS`].

pub mod common;
pub mod docker;
#[cfg(feature = "ec2")]
pub mod ec2;
/// Without the `ec2` feature only the EC2 kind is compiled, so that
/// `type = "ec2"` still says how to get it and `imgbuild clean` and
/// `imgbuild output` still name EC2 records.
#[cfg(not(feature = "ec2"))]
pub mod ec2 {
    pub mod kind;
}
pub mod qemu;
pub mod registry;

use async_trait::async_trait;
use imgbuild_core::{OnError, StepContext};
use imgbuild_provisioners::Provisioner;
use imgbuild_provisioners::image_test::{ImageTest, TestResult};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

pub use common::artifact::{Artifact, ArtifactFile, SourceIdentity};
pub use imgbuild_core::ConfigProblem;
pub use imgbuild_provisioners::sbom::SbomFormats;

/// The image every build of a config produces a version of.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The git commit of the repository holding the config, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// When the run started (RFC 3339), the image's creation time.
    pub created: String,
}

impl ImageInfo {
    /// `<name>-<version>`, the stem of every artifact name.
    pub fn artifact_stem(&self) -> String {
        format!("{}-{}", self.name, self.version)
    }
}

/// Everything one build needs besides its builder's config.
pub struct BuildRequest {
    pub image: ImageInfo,
    pub build_name: String,
    pub provisioners: Vec<Provisioner>,
    pub on_error: OnError,
    /// Relative paths in the config are relative to this directory.
    pub config_dir: PathBuf,
    /// The provisioners' step inputs, and whether kept states may be used.
    pub cache: common::cache::StepCache,
    /// Which SBOM documents to write beside the artifact (`[image] sbom`).
    pub sbom: SbomFormats,
    /// `build --check-reproducible`: where to write the listing of the
    /// machine's files at the end of the build (see `file_listing`).
    pub list_files: Option<PathBuf>,
}

impl BuildRequest {
    /// Each provisioner in a few words, as the step cache's records name
    /// the steps.
    pub fn step_descriptions(&self) -> Vec<String> {
        self.provisioners
            .iter()
            .map(|provisioner| provisioner.describe())
            .collect()
    }
}

#[derive(Debug, Error)]
pub enum BuildError {
    #[error("cancelled")]
    Cancelled,
    #[error("step {step} failed: {message}")]
    Failed { step: String, message: String },
    /// Refused before anything was created (immutability, preflight).
    #[error("{0}")]
    Refused(String),
}

/// What a build will produce, for `inspect` and for the version check.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedArtifact {
    pub description: String,
    /// Files that must not exist yet.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<PathBuf>,
}

#[async_trait]
pub trait Builder: Send + Sync {
    /// The `type` in the config: "qemu", "docker", "ec2".
    fn kind(&self) -> &'static str;

    /// Checks that need no machine: files exist, options fit together.
    fn validate(&self, config_dir: &Path) -> Vec<ConfigProblem>;

    /// The config as resolved, for `inspect` and the inputs hash.
    fn resolved_config(&self) -> serde_json::Value;

    fn planned_artifact(&self, image: &ImageInfo, config_dir: &Path) -> PlannedArtifact;

    /// What this build takes for itself and no other build of the config
    /// may also take: output files, image tags, AMI names. Two builds
    /// claiming one name would race for it, so such a config is refused
    /// before anything runs.
    fn claims(&self, image: &ImageInfo, config_dir: &Path) -> Vec<String> {
        self.planned_artifact(image, config_dir)
            .files
            .iter()
            .map(|path| {
                format!(
                    "the file {}",
                    common::artifact::lexical_path(path).display()
                )
            })
            .collect()
    }

    /// Secret values written in the builder's own table (an SSH password),
    /// masked everywhere like sensitive variables.
    fn secrets(&self) -> Vec<String> {
        Vec::new()
    }

    /// Why no `[[test]]` could run on what this build keeps, seen from its
    /// config alone: the loader refuses tests on such a build before
    /// anything runs, at the field this problem names.
    fn untestable(&self, config_dir: &Path) -> Option<ConfigProblem> {
        let _ = config_dir;
        None
    }

    /// The settings that shape the machine's disk before any provisioner
    /// runs (not memory, CPUs or timeouts), part of the first step key.
    /// `None`: this builder keeps no per-step states.
    fn cache_settings(&self) -> Option<serde_json::Value> {
        None
    }

    /// Which base the build would start from now, resolved fresh (a file's
    /// SHA-256, a URL's pinned checksum, an image's id after the pull
    /// policy, the AMI a filter selects), without creating anything: for
    /// `plan` and for skipping unchanged builds.
    async fn resolve_source(
        &self,
        request: &BuildRequest,
        cx: &StepContext,
    ) -> Result<SourceIdentity, BuildError>;

    /// Checks made before anything is created, such as refusing a version
    /// that already exists. May read remote state, never change it.
    async fn preflight(&self, request: &BuildRequest, cx: &StepContext) -> Result<(), BuildError>;

    async fn build(&self, request: &BuildRequest, cx: &StepContext)
    -> Result<Artifact, BuildError>;

    /// Starts a fresh machine from `artifact` (never writing the artifact
    /// itself: a throwaway overlay, a new container, a new instance), runs
    /// `tests` on it through its communicator with
    /// [`imgbuild_provisioners::image_test::run_all`], and removes the
    /// machine. What it creates is journalled and cleaned like a build's.
    async fn test_artifact(
        &self,
        request: &BuildRequest,
        artifact: &Artifact,
        tests: &[ImageTest],
        cx: &StepContext,
    ) -> Result<Vec<TestResult>, BuildError> {
        let _ = (request, artifact, tests, cx);
        Err(BuildError::Refused(format!(
            "the {} builder cannot run [[test]] on its artifacts yet; leave this build out of the tests with `except`, or pass --skip-tests",
            self.kind()
        )))
    }

    /// Hands an artifact that passed its `[[test]]`s (or whose tests were
    /// skipped) on to where deployments read it: a registry push, an
    /// upload. Called after the tests and before the version is recorded,
    /// so a failed delivery records nothing; returns the artifact with what
    /// was delivered added to its `details`. Nothing to deliver by default.
    async fn deliver(
        &self,
        request: &BuildRequest,
        artifact: Artifact,
        cx: &StepContext,
    ) -> Result<Artifact, BuildError> {
        let _ = (request, cx);
        Ok(artifact)
    }

    /// What removes `artifact` if the run dies after the build and before
    /// the manifest records it (while it is tested or delivered), as run
    /// journal records `imgbuild clean` acts on alone. By default its files
    /// and their checksum files.
    fn unrecorded(&self, artifact: &Artifact) -> Vec<imgbuild_core::Resource> {
        common::artifact::file_resources(artifact)
    }

    /// Removes what `build` produced (`on_test_failure = "delete"`): the
    /// files, the tags, the AMIs with their snapshots.
    async fn delete_artifact(
        &self,
        artifact: &Artifact,
        cx: &StepContext,
    ) -> Result<(), BuildError> {
        let _ = (artifact, cx);
        Err(BuildError::Refused(format!(
            "the {} builder cannot delete its artifacts yet; remove it by hand",
            self.kind()
        )))
    }
}
