//! One build as the builder tests run it: a `StepContext` with a real
//! journal in its own state directory and a log that keeps its events, and
//! provisioners made from a config as the binary makes them.

use crate::common::random_hex;
use imgbuild_builders::{BuildRequest, ImageInfo};
use imgbuild_core::events::{Event, EventSink, MemorySink};
use imgbuild_core::{BuildLog, CancellationToken, Journal, OnError, Redactor, StepContext};
use imgbuild_provisioners::Provisioner;
use imgbuild_provisioners::file::{Direction, FileConfig, FileProvisioner};
use imgbuild_provisioners::shell::{ShellConfig, ShellProvisioner};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One build's context, with a real journal in its own state directory.
pub struct Harness {
    pub cx: StepContext,
    pub journal: Arc<Journal>,
    /// Every event the build emitted.
    pub sink: Arc<MemorySink>,
    pub state_dir: tempfile::TempDir,
    pub config_dir: tempfile::TempDir,
}

impl Harness {
    pub fn new(build: &str) -> Harness {
        Harness::with_cancel_on(build, None)
    }

    /// With `marker`, the build is cancelled once a remote output line
    /// contains it.
    pub fn with_cancel_on(build: &str, marker: Option<&str>) -> Harness {
        // The EC2 builder's SDK reads its credentials from the environment:
        // they must be the fake ones before any build can start.
        #[cfg(feature = "ec2")]
        crate::ec2::init_env();
        let sink = Arc::new(MemorySink::default());
        let cancel = CancellationToken::new();
        let events: Arc<dyn EventSink> = match marker {
            Some(marker) => Arc::new(CancelOn {
                inner: sink.clone(),
                marker: marker.to_owned(),
                cancel: cancel.clone(),
            }),
            None => sink.clone(),
        };
        let log = BuildLog::root(events, Redactor::new()).for_build(build);
        let state_dir = tempfile::tempdir().unwrap();
        let run_id = random_hex(16);
        let journal =
            Arc::new(Journal::create(state_dir.path(), &run_id, Path::new("image.toml")).unwrap());
        Harness {
            cx: StepContext {
                log,
                journal: journal.clone(),
                cancel,
                run_id,
            },
            journal,
            sink,
            state_dir,
            config_dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn run_id(&self) -> &str {
        &self.cx.run_id
    }

    /// A request to build `image` (an [`ImageInfo`], or just a name for
    /// version 1.0.0) with `provisioners`, cleaning up on error.
    pub fn request(&self, image: impl TestImage, provisioners: Vec<Provisioner>) -> BuildRequest {
        BuildRequest {
            image: image.into_image_info(),
            build_name: self.cx.build_name().to_owned(),
            provisioners,
            on_error: OnError::Cleanup,
            config_dir: self.config_dir.path().to_path_buf(),
            cache: Default::default(),
            // Builder tests that check the SBOM ask for it.
            sbom: imgbuild_builders::SbomFormats::None,
            list_files: None,
        }
    }

    /// Output lines the provisioners streamed.
    pub fn output_lines(&self) -> Vec<String> {
        self.sink
            .events()
            .into_iter()
            .filter_map(|event| match event {
                Event::Output { line, .. } => Some(line),
                _ => None,
            })
            .collect()
    }

    /// "step 1.2s, ..." from the step events, for timing reports.
    pub fn step_timings(&self) -> String {
        self.sink
            .events()
            .into_iter()
            .filter_map(|event| match event {
                Event::StepFinished {
                    step, duration_ms, ..
                } => Some(format!("{step} {:.1}s", duration_ms as f64 / 1000.0)),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Everything the build logged, for failure messages.
    pub fn transcript(&self) -> String {
        self.sink
            .events()
            .iter()
            .map(|event| match event {
                Event::Message { level, message, .. } => format!("[{level:?}] {message}"),
                Event::Output { line, .. } => format!("  | {line}"),
                Event::StepStarted { step, .. } => format!("-- {step}"),
                Event::CleanupFailed { step, error, .. } => {
                    format!("[cleanup {step} failed] {error}")
                }
                other => format!("{other:?}"),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// What the journal still lists, described.
    pub fn outstanding(&self) -> Vec<String> {
        self.journal
            .outstanding()
            .iter()
            .map(|o| o.resource.describe())
            .collect()
    }

    pub fn assert_journal_empty(&self) {
        let outstanding = self.journal.outstanding();
        assert!(
            outstanding.is_empty(),
            "the journal still lists {outstanding:?}"
        );
    }
}

/// What [`Harness::request`] builds: a full [`ImageInfo`], or an image name
/// (version 1.0.0, no labels), which is all the EC2 tests vary.
pub trait TestImage {
    fn into_image_info(self) -> ImageInfo;
}

impl TestImage for ImageInfo {
    fn into_image_info(self) -> ImageInfo {
        self
    }
}

impl TestImage for &str {
    fn into_image_info(self) -> ImageInfo {
        ImageInfo {
            name: self.to_owned(),
            version: "1.0.0".to_owned(),
            description: Some("imgbuild EC2 test image".to_owned()),
            labels: Default::default(),
            revision: None,
            created: "2026-01-01T00:00:00Z".to_owned(),
        }
    }
}

impl TestImage for &String {
    fn into_image_info(self) -> ImageInfo {
        self.as_str().into_image_info()
    }
}

/// An image with a description, a label and a revision, created now.
pub fn image_info(name: &str, version: &str) -> ImageInfo {
    let created = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    ImageInfo {
        name: name.to_owned(),
        version: version.to_owned(),
        description: Some("imgbuild docker builder test image".to_owned()),
        labels: BTreeMap::from([("org.example.owner".to_owned(), "infra-team".to_owned())]),
        revision: Some("0123456789abcdef".to_owned()),
        created,
    }
}

/// Cancels the build when a line containing `marker` is printed.
pub struct CancelOn {
    pub inner: Arc<MemorySink>,
    pub marker: String,
    pub cancel: CancellationToken,
}

impl EventSink for CancelOn {
    fn emit(&self, event: &Event) {
        self.inner.emit(event);
        if let Event::Output { line, .. } = event
            && line.contains(&self.marker)
        {
            self.cancel.cancel();
        }
    }
}

/// A `shell` provisioner running `inline`.
pub fn shell(inline: &[&str]) -> Provisioner {
    let config: ShellConfig =
        serde_json::from_value(serde_json::json!({ "inline": inline })).unwrap();
    Provisioner::new(ShellProvisioner::new(
        config,
        Vec::new(),
        serde_json::json!({}),
    ))
}

pub fn upload(source: &str, destination: &str, base_dir: &Path) -> Provisioner {
    file(Some(source), None, destination, Direction::Upload, base_dir)
}

pub fn upload_content(content: &str, destination: &str, base_dir: &Path) -> Provisioner {
    file(
        None,
        Some(content),
        destination,
        Direction::Upload,
        base_dir,
    )
}

pub fn download(source: &str, destination: &str, base_dir: &Path) -> Provisioner {
    file(
        Some(source),
        None,
        destination,
        Direction::Download,
        base_dir,
    )
}

/// A `file` provisioner, its config checked as the loader would.
pub fn file(
    source: Option<&str>,
    content: Option<&str>,
    destination: &str,
    direction: Direction,
    base_dir: &Path,
) -> Provisioner {
    let config = FileConfig {
        source: source.map(str::to_owned),
        content: content.map(str::to_owned),
        destination: destination.to_owned(),
        direction,
    };
    let problems = config.problems();
    assert!(
        problems.is_empty(),
        "the test's config is invalid: {problems:?}"
    );
    Provisioner::new(FileProvisioner::new(config, base_dir))
}

/// The playbooks the provisioners' Ansible tests use (a role with a file,
/// a template and a handler).
pub fn ansible_fixtures() -> PathBuf {
    crate::common::repo_root().join("provisioners/tests/fixtures/ansible")
}

/// An `ansible` provisioner parsed from `table` (a `[[provision]]` table
/// without `type`) as the config loader does, for build `build`, with paths
/// relative to [`ansible_fixtures`].
pub fn ansible(table: &str, build: &str) -> Provisioner {
    let document = toml::de::DeTable::parse(table).expect("a TOML table");
    let span = document.span();
    let value = toml::Spanned::new(span, toml::de::DeValue::Table(document.into_inner()));
    let context = serde_json::json!({ "build": { "name": build } });
    imgbuild_provisioners::registry::find("ansible")
        .expect("the ansible provisioner is registered")
        .parse(imgbuild_provisioners::registry::ParseInput {
            table: &value,
            config_dir: &ansible_fixtures(),
            template_context: &context,
        })
        .unwrap_or_else(|err| panic!("the ansible config is refused: {err:?}"))
        .provisioner
}
