//! A step context for unit tests of step logic: a real journal in its own
//! state directory, events kept in memory.

use imgbuild_core::events::MemorySink;
use imgbuild_core::{BuildLog, CancellationToken, Journal, Redactor, StepContext};
use std::path::Path;
use std::sync::Arc;

pub struct TestContext {
    pub cx: StepContext,
    pub sink: Arc<MemorySink>,
    _state_dir: tempfile::TempDir,
}

impl TestContext {
    pub fn new(build: &str) -> TestContext {
        let state_dir = tempfile::tempdir().unwrap();
        let run_id = "unit0123".to_owned();
        let journal =
            Arc::new(Journal::create(state_dir.path(), &run_id, Path::new("image.toml")).unwrap());
        let sink = Arc::new(MemorySink::default());
        let log = BuildLog::root(sink.clone(), Redactor::new()).for_build(build);
        TestContext {
            cx: StepContext {
                log,
                journal,
                cancel: CancellationToken::new(),
                run_id,
            },
            sink,
            _state_dir: state_dir,
        }
    }
}

/// A Docker build's artifact record, as a finished build or the manifest
/// hands it to a test run or a delete.
pub fn docker_artifact(
    id: &str,
    files: Vec<crate::ArtifactFile>,
    details: serde_json::Value,
) -> crate::Artifact {
    crate::Artifact {
        builder: "docker".into(),
        id: id.into(),
        files,
        source: crate::SourceIdentity {
            kind: "docker-image".into(),
            reference: "debian".into(),
            sha256: None,
        },
        details,
    }
}
