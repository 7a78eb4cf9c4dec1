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
