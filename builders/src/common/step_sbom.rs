//! Reads the machine's package database at the end of provisioning, while
//! it still runs, and writes the SBOM documents (SPDX 2.3, CycloneDX 1.5)
//! beside the artifact.
//!
//! The documents get their final names at once (never replacing a file),
//! journalled like every output until the build succeeds: a failed or
//! cancelled build removes them, `--on-error abort` leaves them to
//! `imgbuild clean`. On success, cleanup names them in the artifact that a
//! later step (export, commit, create image) made: its `files` (size,
//! SHA-256) and `details.sbom`.
//!
//! A build that boots nothing (QEMU with every step kept) has no machine to
//! read: it uses the package list kept with its last cache entry, and says
//! so (`details.sbom.reused_from`); without one, the SBOM is recorded as
//! missing rather than invented.
//!
//! Uses the communicator, `HasSbom::kept_packages`. Hands the list read to
//! `HasSbom::packages_read` (the QEMU step cache keeps it with the final
//! layer); the artifact gets the files and `details.sbom` at cleanup.

use crate::common::artifact::{Artifact, ArtifactFile, sha256_file_async};
use crate::common::step_provision::HasCommunicator;
use crate::common::tracked::TrackedPath;
use async_trait::async_trait;
use imgbuild_core::fsutil::write_atomic;
use imgbuild_core::{CleanupOutcome, Step, StepContext, StepError};
use imgbuild_provisioners::sbom::{self, DocumentInfo, PackageList, SbomFormats};
use std::path::PathBuf;

/// A package list kept from an earlier build, and which one.
pub struct KeptPackages {
    pub packages: PackageList,
    /// Where it came from, for the record: "step cache entry <key>".
    pub from: String,
}

/// Builder state the SBOM step reads the machine through and records into.
#[async_trait]
pub trait HasSbom: HasCommunicator + Send {
    /// Takes the package list read from the machine, for later steps (the
    /// QEMU step cache keeps it with the final layer). Nothing by default.
    fn packages_read(&mut self, packages: &PackageList) {
        let _ = packages;
    }

    /// Takes the documents of a successful build for its artifact (which a
    /// later step made). Gives the record back when there is no artifact
    /// to name them in.
    fn sbom_finished(&mut self, record: SbomRecord) -> Result<(), SbomRecord>;

    /// The package list kept with the step cache's last entry, for a build
    /// whose machine never ran. None by default.
    async fn kept_packages(&mut self, cx: &StepContext) -> Option<KeptPackages> {
        let _ = cx;
        None
    }
}

/// What the SBOM step wrote: the documents, and `details.sbom`.
#[derive(Debug, Clone)]
pub struct SbomRecord {
    pub files: Vec<ArtifactFile>,
    pub details: serde_json::Value,
}

impl SbomRecord {
    /// Lists the documents in the artifact's `files` and sets
    /// `details.sbom`.
    pub fn attach_to(self, artifact: &mut Artifact) {
        artifact.files.extend(self.files);
        if !artifact.details.is_object() {
            artifact.details = serde_json::json!({});
        }
        artifact.details["sbom"] = self.details;
    }
}

/// Implements [`HasSbom`] for a builder state whose steps leave the
/// artifact in an `artifact: Option<Artifact>` field, for a builder that
/// keeps no package lists.
macro_rules! has_sbom {
    ($state:ty) => {
        impl $crate::common::step_sbom::HasSbom for $state {
            fn sbom_finished(
                &mut self,
                record: $crate::common::step_sbom::SbomRecord,
            ) -> Result<(), $crate::common::step_sbom::SbomRecord> {
                match self.artifact.as_mut() {
                    Some(artifact) => {
                        record.attach_to(artifact);
                        Ok(())
                    }
                    None => Err(record),
                }
            }
        }
    };
}
pub(crate) use has_sbom;

/// Where a build's SBOM documents go: `<dir>/<stem>.spdx.json` and
/// `<dir>/<stem>.cdx.json`.
#[derive(Debug, Clone)]
pub struct SbomTarget {
    pub dir: PathBuf,
    pub stem: String,
}

impl SbomTarget {
    /// Beside a file artifact: `out/web-1.0.qcow2` gives `out/web-1.0`.
    pub fn beside(artifact: &std::path::Path, stem: Option<&str>) -> SbomTarget {
        let stem = stem.map(str::to_owned).unwrap_or_else(|| {
            artifact
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        SbomTarget {
            dir: imgbuild_core::fsutil::parent_dir(artifact).to_path_buf(),
            stem,
        }
    }

    /// For an artifact that is no file (an image tag, an AMI): the config
    /// directory's `output/`, named by image, version and build, since
    /// several builds of one version may share it.
    pub fn in_output_dir(request: &crate::BuildRequest) -> SbomTarget {
        SbomTarget {
            dir: request.config_dir.join("output"),
            stem: format!("{}.{}", request.image.artifact_stem(), request.build_name),
        }
    }

    pub fn spdx(&self) -> PathBuf {
        self.dir.join(format!("{}.spdx.json", self.stem))
    }

    pub fn cyclonedx(&self) -> PathBuf {
        self.dir.join(format!("{}.cdx.json", self.stem))
    }
}

struct Written {
    format: &'static str,
    tracked: TrackedPath,
    size: u64,
    sha256: String,
}

pub struct StepSbom {
    formats: SbomFormats,
    target: SbomTarget,
    info: DocumentInfo,
    written: Vec<Written>,
    /// What `details.sbom` records besides the paths.
    record: serde_json::Map<String, serde_json::Value>,
}

impl StepSbom {
    /// The step for `request`'s `sbom` setting, `None` for `sbom = "none"`.
    /// `builder` is the builder type. The documents' creation time is the
    /// build's start, or `SOURCE_DATE_EPOCH` when that is set.
    pub fn for_request<S: HasSbom + 'static>(
        request: &crate::BuildRequest,
        builder: &str,
        target: SbomTarget,
    ) -> Option<Box<dyn Step<S>>> {
        if !request.sbom.any() {
            return None;
        }
        let epoch = std::env::var("SOURCE_DATE_EPOCH").ok();
        Some(Box::new(StepSbom {
            formats: request.sbom,
            target,
            info: DocumentInfo {
                image_name: request.image.name.clone(),
                image_version: request.image.version.clone(),
                build_name: request.build_name.clone(),
                builder: builder.to_owned(),
                // Known once the step runs.
                run_id: String::new(),
                created: sbom::creation_time(&request.image.created, epoch.as_deref()),
                tool_version: env!("CARGO_PKG_VERSION").to_owned(),
            },
            written: Vec::new(),
            record: serde_json::Map::new(),
        }))
    }

    async fn write(
        &mut self,
        format: &'static str,
        path: PathBuf,
        contents: Vec<u8>,
        cx: &StepContext,
    ) -> Result<(), StepError> {
        if path.exists() {
            return Err(StepError::failed(format!(
                "{} already exists and is never overwritten: it belongs to an earlier build of this version; remove it if that build is gone, or bump `image.version`",
                path.display()
            )));
        }
        // Journalled before it exists, so a killed run leaves it to
        // `imgbuild clean`.
        let tracked = TrackedPath::file(cx, path.clone())?;
        let written = write_atomic(&path, &contents).map_err(|err| {
            StepError::failed(format!("cannot write the SBOM {}: {err}", path.display()))
        });
        let hashed = match written {
            Ok(()) => sha256_file_async(path.clone())
                .await
                .map_err(|err| StepError::failed(format!("cannot hash {}: {err}", path.display()))),
            Err(err) => Err(err),
        };
        match hashed {
            Ok((size, sha256)) => {
                self.written.push(Written {
                    format,
                    tracked,
                    size,
                    sha256,
                });
                Ok(())
            }
            Err(err) => {
                let _ = tracked.remove(cx).await;
                Err(err)
            }
        }
    }
}

#[async_trait]
impl<S: HasSbom> Step<S> for StepSbom {
    fn name(&self) -> &'static str {
        "sbom"
    }

    async fn run(&mut self, state: &mut S, cx: &StepContext) -> Result<(), StepError> {
        self.info.run_id = cx.run_id.clone();
        let packages = match state.communicator() {
            Some(comm) => {
                let packages = sbom::read_packages(comm.as_ref())
                    .await
                    .map_err(|err| StepError::failed(err.to_string()))?;
                state.packages_read(&packages);
                packages
            }
            None => match state.kept_packages(cx).await {
                Some(kept) => {
                    cx.log.info(format!(
                        "no machine ran: the SBOM lists the packages kept with {}",
                        kept.from
                    ));
                    self.record
                        .insert("reused_from".to_owned(), kept.from.into());
                    kept.packages
                }
                None => {
                    let why = "no machine ran (every step came from the step cache) and no package list was kept with the cache entry; build with --no-cache to get one";
                    cx.log.warn(format!("the SBOM is missing: {why}"));
                    self.record.insert("missing".to_owned(), why.into());
                    return Ok(());
                }
            },
        };
        if packages.databases.is_empty() {
            cx.log.warn(
                "no package database found on the machine (dpkg, rpm, apk): the SBOM lists no packages",
            );
            self.record.insert(
                "note".to_owned(),
                "no package database found on the machine".into(),
            );
        } else {
            cx.log.info(format!(
                "SBOM: {} package(s) from the {} database",
                packages.packages.len(),
                packages.database_names()
            ));
        }
        if packages.skipped > 0 {
            cx.log.warn(format!(
                "the package database held {} entr(y/ies) that are no package (no name or version, or odd fields); the SBOM leaves them out",
                packages.skipped
            ));
            self.record
                .insert("skipped".to_owned(), packages.skipped.into());
        }
        self.record
            .insert("packages".to_owned(), packages.packages.len().into());
        self.record
            .insert("database".to_owned(), packages.database_names().into());
        if let Some(distro) = &packages.distro {
            self.record.insert(
                "distro".to_owned(),
                serde_json::to_value(distro).unwrap_or_default(),
            );
        }
        std::fs::create_dir_all(&self.target.dir).map_err(|err| {
            StepError::failed(format!(
                "cannot create {} for the SBOM: {err}",
                self.target.dir.display()
            ))
        })?;
        if self.formats.spdx() {
            let document = sbom::spdx::document(&packages, &self.info)
                .map_err(|err| StepError::failed(err.to_string()))?;
            self.write("spdx", self.target.spdx(), document, cx).await?;
        }
        if self.formats.cyclonedx() {
            let document = sbom::cyclonedx::document(&packages, &self.info)
                .map_err(|err| StepError::failed(err.to_string()))?;
            self.write("cyclonedx", self.target.cyclonedx(), document, cx)
                .await?;
        }
        Ok(())
    }

    async fn cleanup(
        &mut self,
        state: &mut S,
        cx: &StepContext,
        outcome: CleanupOutcome,
    ) -> Result<(), StepError> {
        let written = std::mem::take(&mut self.written);
        if outcome != CleanupOutcome::Succeeded {
            let mut first_error = None;
            for file in written.into_iter().rev() {
                if let Err(err) = file.tracked.remove(cx).await {
                    first_error.get_or_insert(err);
                }
            }
            return first_error.map_or(Ok(()), Err);
        }
        let mut details = std::mem::take(&mut self.record);
        let mut files = Vec::new();
        for file in &written {
            let path = std::fs::canonicalize(&file.tracked.path)
                .unwrap_or_else(|_| file.tracked.path.clone());
            details.insert(file.format.to_owned(), path.display().to_string().into());
            files.push(ArtifactFile {
                path,
                size: file.size,
                sha256: file.sha256.clone(),
            });
        }
        let record = SbomRecord {
            files,
            details: serde_json::Value::Object(details),
        };
        if state.sbom_finished(record).is_err() {
            // Files no record names would be orphans.
            for file in written {
                file.tracked.remove(cx).await?;
            }
            return Err(StepError::failed(
                "the build made no artifact to name the SBOM in; its documents were removed",
            ));
        }
        for file in written {
            file.tracked.keep(cx)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use imgbuild_core::Stream;
    use imgbuild_provisioners::communicator::ByteStream;
    use imgbuild_provisioners::{CommError, Communicator, ExitStatus, OutputSink};
    use std::sync::Arc;

    /// A machine with a Debian dpkg database of two packages, answering
    /// the SBOM's commands by what they read.
    struct DebianMachine;

    #[async_trait]
    impl Communicator for DebianMachine {
        async fn exec(
            &self,
            command: &str,
            output: &dyn OutputSink,
        ) -> Result<ExitStatus, CommError> {
            let text = if command.contains("os-release") {
                "ID=debian\nVERSION_ID=\"12\"\n"
            } else if command.contains("command -v rpm") {
                "dpkg\n"
            } else if command.contains("/var/lib/dpkg/status") {
                "Package: bash\nStatus: install ok installed\nVersion: 5.2.15-2+b2\nArchitecture: amd64\n\nPackage: zlib1g\nStatus: install ok installed\nVersion: 1:1.2.13.dfsg-1\nArchitecture: amd64\n"
            } else {
                return Ok(ExitStatus::Code(127));
            };
            for line in text.lines() {
                output.line(Stream::Stdout, line);
            }
            Ok(ExitStatus::Code(0))
        }

        async fn upload_tar(&self, _dest: &str, _archive: ByteStream) -> Result<(), CommError> {
            unreachable!("the SBOM uploads nothing")
        }

        async fn download_tar(&self, _path: &str) -> Result<ByteStream, CommError> {
            unreachable!("the SBOM reads through commands")
        }

        async fn reconnect(&self) -> Result<(), CommError> {
            Ok(())
        }

        fn target(&self) -> String {
            "debian-machine".to_owned()
        }
    }

    #[derive(Default)]
    struct State {
        communicator: Option<Arc<dyn Communicator>>,
        artifact: Option<Artifact>,
    }
    crate::common::step_provision::has_communicator!(State);
    has_sbom!(State);

    fn request(config_dir: &std::path::Path) -> crate::BuildRequest {
        crate::BuildRequest {
            image: crate::ImageInfo {
                name: "web".into(),
                version: "1.2".into(),
                description: None,
                labels: Default::default(),
                revision: None,
                created: "2026-01-01T00:00:00.5Z".into(),
            },
            build_name: "vm".into(),
            provisioners: Vec::new(),
            on_error: imgbuild_core::OnError::Cleanup,
            config_dir: config_dir.to_path_buf(),
            cache: Default::default(),
            sbom: SbomFormats::Both,
            list_files: None,
        }
    }

    fn artifact() -> Artifact {
        Artifact {
            builder: "qemu".into(),
            id: "out/web-1.2.qcow2".into(),
            files: Vec::new(),
            source: crate::SourceIdentity {
                kind: "file".into(),
                reference: "base.img".into(),
                sha256: None,
            },
            details: serde_json::json!({"format": "qcow2"}),
        }
    }

    #[tokio::test]
    async fn a_successful_build_names_both_documents_in_its_artifact() {
        let t = TestContext::new("vm");
        let dir = tempfile::tempdir().unwrap();
        let request = request(dir.path());
        let target = SbomTarget::beside(&dir.path().join("out/web-1.2.qcow2"), Some("web-1.2"));
        let mut step = StepSbom::for_request::<State>(&request, "qemu", target).unwrap();
        let mut state = State {
            communicator: Some(Arc::new(DebianMachine)),
            ..State::default()
        };
        step.run(&mut state, &t.cx).await.unwrap();
        // The export makes the artifact after this step.
        state.artifact = Some(artifact());
        step.cleanup(&mut state, &t.cx, CleanupOutcome::Succeeded)
            .await
            .unwrap();

        let artifact = state.artifact.unwrap();
        let spdx = dir
            .path()
            .join("out/web-1.2.spdx.json")
            .canonicalize()
            .unwrap();
        let cdx = dir
            .path()
            .join("out/web-1.2.cdx.json")
            .canonicalize()
            .unwrap();
        let paths: Vec<&std::path::Path> =
            artifact.files.iter().map(|f| f.path.as_path()).collect();
        assert_eq!(paths, vec![spdx.as_path(), cdx.as_path()]);
        for file in &artifact.files {
            let (size, sha256) = crate::common::artifact::sha256_file(&file.path).unwrap();
            assert_eq!((file.size, &file.sha256), (size, &sha256));
        }
        let sbom = &artifact.details["sbom"];
        assert_eq!(sbom["packages"], 2);
        assert_eq!(sbom["database"], "dpkg");
        assert_eq!(sbom["spdx"], spdx.display().to_string());
        assert_eq!(sbom["cyclonedx"], cdx.display().to_string());
        assert_eq!(artifact.details["format"], "qcow2");
        let document: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&cdx).unwrap()).unwrap();
        assert_eq!(
            document["components"][1]["purl"],
            "pkg:deb/debian/zlib1g@1:1.2.13.dfsg-1?arch=amd64&distro=debian-12"
        );
        assert!(t.cx.journal.outstanding().is_empty());
    }

    #[tokio::test]
    async fn a_failed_build_leaves_no_document_and_nothing_journalled() {
        let t = TestContext::new("vm");
        let dir = tempfile::tempdir().unwrap();
        let request = request(dir.path());
        let target = SbomTarget::in_output_dir(&request);
        let mut step = StepSbom::for_request::<State>(&request, "docker", target).unwrap();
        let mut state = State {
            communicator: Some(Arc::new(DebianMachine)),
            ..State::default()
        };
        step.run(&mut state, &t.cx).await.unwrap();
        let written = dir.path().join("output/web-1.2.vm.spdx.json");
        assert!(written.exists());
        // A killed run would leave them to `imgbuild clean`.
        assert_eq!(t.cx.journal.outstanding().len(), 2);
        step.cleanup(&mut state, &t.cx, CleanupOutcome::Failed)
            .await
            .unwrap();
        assert!(!written.exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("output"))
                .unwrap()
                .count(),
            0
        );
        assert!(t.cx.journal.outstanding().is_empty());
    }

    #[tokio::test]
    async fn an_existing_document_is_never_overwritten() {
        let t = TestContext::new("vm");
        let dir = tempfile::tempdir().unwrap();
        let request = request(dir.path());
        let target = SbomTarget::in_output_dir(&request);
        std::fs::create_dir_all(&target.dir).unwrap();
        std::fs::write(target.cyclonedx(), b"an earlier build's").unwrap();
        let mut step = StepSbom::for_request::<State>(&request, "docker", target.clone()).unwrap();
        let mut state = State {
            communicator: Some(Arc::new(DebianMachine)),
            ..State::default()
        };
        let err = step.run(&mut state, &t.cx).await.unwrap_err().to_string();
        assert!(err.contains("never overwritten"), "{err}");
        step.cleanup(&mut state, &t.cx, CleanupOutcome::Failed)
            .await
            .unwrap();
        assert_eq!(
            std::fs::read(target.cyclonedx()).unwrap(),
            b"an earlier build's"
        );
        assert!(!target.spdx().exists());
    }

    #[tokio::test]
    async fn with_no_machine_and_nothing_kept_the_sbom_is_recorded_missing() {
        let t = TestContext::new("vm");
        let dir = tempfile::tempdir().unwrap();
        let request = request(dir.path());
        let target = SbomTarget::in_output_dir(&request);
        let mut step = StepSbom::for_request::<State>(&request, "qemu", target).unwrap();
        let mut state = State::default();
        step.run(&mut state, &t.cx).await.unwrap();
        state.artifact = Some(artifact());
        step.cleanup(&mut state, &t.cx, CleanupOutcome::Succeeded)
            .await
            .unwrap();
        let artifact = state.artifact.unwrap();
        assert!(artifact.files.is_empty());
        assert!(
            artifact.details["sbom"]["missing"]
                .as_str()
                .unwrap()
                .contains("--no-cache")
        );
    }

    #[test]
    fn sbom_none_adds_no_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut request = request(dir.path());
        request.sbom = SbomFormats::None;
        let target = SbomTarget::in_output_dir(&request);
        assert!(StepSbom::for_request::<State>(&request, "qemu", target).is_none());
    }
}
