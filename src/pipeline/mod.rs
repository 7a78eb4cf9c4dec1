//! Runs the builds of one config: checks that nothing would be overwritten,
//! opens the run journal, runs builds in parallel, records each artifact in
//! the manifest as it lands, and reports.

pub mod inputs;
pub mod keys;
pub mod plan;
pub mod reproducible;
pub mod retest;
pub mod retire;
pub mod signals;
mod unrecorded;

use crate::config::{Build, Config, OnTestFailure};
use crate::manifest::{self, BuildRecord, Entry, EntryStatus, ImageRecord, TestResult};
use imgbuild_builders::{Artifact, BuildError, BuildRequest};
use imgbuild_core::events::BuildStatus;
use imgbuild_core::journal::{self, Journal};
use imgbuild_core::{BuildLog, CancellationToken, Event, OnError, StepContext};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone)]
pub struct RunOptions {
    pub run_id: String,
    pub started: time::OffsetDateTime,
    pub parallel: usize,
    pub on_error: OnError,
    pub manifest: manifest::Location,
    pub state_dir: PathBuf,
    /// `--skip-tests`: record the artifacts without running their tests.
    pub skip_tests: bool,
    /// False with `--no-cache`: no step is taken from or added to the cache.
    pub use_cache: bool,
    /// `--skip-unchanged`: a build whose inputs (version masked) equal
    /// those of the latest recorded version is not built again.
    pub skip_unchanged: bool,
    /// `--sign-key`: signs each version's provenance and checksum file.
    pub signer: Option<Arc<crate::attest::SigningKey>>,
    /// `--check-reproducible`: build each version twice and compare.
    pub check_reproducible: bool,
}

/// How the run ended, as the exit code says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Succeeded,
    /// At least one build failed.
    Failed,
    /// Refused before anything was launched (an existing version, ...).
    Refused,
    Interrupted,
}

impl RunStatus {
    pub fn exit_code(self) -> i32 {
        match self {
            RunStatus::Succeeded => 0,
            RunStatus::Failed => 1,
            RunStatus::Refused => 2,
            RunStatus::Interrupted => 130,
        }
    }
}

struct Outcome {
    status: BuildStatus,
    artifact: Option<serde_json::Value>,
}

pub async fn run(
    config: Config,
    options: RunOptions,
    log: BuildLog,
    cancel: CancellationToken,
) -> RunStatus {
    let config = Arc::new(config);
    warn_about_leftovers(&options, &log);

    let Some(journal) = open_journal(&options, &config.path, &log) else {
        return RunStatus::Refused;
    };
    let names: Vec<String> = config.builds.iter().map(|b| b.name.clone()).collect();
    log.emit(Event::RunStarted {
        run_id: options.run_id.clone(),
        builds: names,
    });

    let contexts: Vec<StepContext> = config
        .builds
        .iter()
        .map(|build| StepContext {
            log: log.for_build(&build.name),
            journal: journal.clone(),
            cancel: cancel.clone(),
            run_id: options.run_id.clone(),
        })
        .collect();

    // The contexts share the journal; every one must be gone before the
    // journal can be closed.
    let status = match preflight(&config, &options, &contexts).await {
        Err(status) => {
            drop(contexts);
            status
        }
        Ok(standing) => {
            run_builds(
                config.clone(),
                &options,
                contexts,
                standing,
                cancel.clone(),
                &log,
            )
            .await
        }
    };

    finish_journal(journal, &log, &options);
    if options.use_cache {
        cap_step_store(&config, &log);
    }
    status
}

/// The step store's size cap when none is configured.
pub const DEFAULT_CACHE_MAX_SIZE: u64 = 20 << 30;

/// Removes the least recently used entries of the step store until it fits
/// its cap (`[cache] max_size`, `IMGBUILD_CACHE_MAX_SIZE`, 20 GiB).
fn cap_step_store(config: &Config, log: &BuildLog) {
    let from_env = std::env::var("IMGBUILD_CACHE_MAX_SIZE")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| imgbuild_core::ByteSize::parse(&v));
    let cap = match (&config.cache.max_size, from_env) {
        (Some(size), _) => size.bytes(),
        (None, Some(Ok(size))) => size.bytes(),
        (None, Some(Err(err))) => {
            log.warn(format!(
                "IMGBUILD_CACHE_MAX_SIZE: {err}; the step cache is not trimmed"
            ));
            return;
        }
        (None, None) => DEFAULT_CACHE_MAX_SIZE,
    };
    let store = imgbuild_builders::common::step_store::StepStore::at(
        config
            .cache
            .dir
            .clone()
            .unwrap_or_else(imgbuild_builders::common::step_store::StepStore::default_root),
    );
    let evicted = store.select_for_prune(Some(cap), None, false);
    if evicted.is_empty() {
        return;
    }
    let freed: u64 = evicted.iter().map(|e| e.size).sum();
    for entry in &evicted {
        store.remove(&entry.key);
    }
    log.info(format!(
        "the step cache was over its {} MiB cap: removed {} least recently used entr{} ({} MiB)",
        cap >> 20,
        evicted.len(),
        if evicted.len() == 1 { "y" } else { "ies" },
        freed >> 20
    ));
}

/// The run's journal, or `None` with the reason logged.
fn open_journal(
    options: &RunOptions,
    config: &std::path::Path,
    log: &BuildLog,
) -> Option<Arc<Journal>> {
    match Journal::create(&options.state_dir, &options.run_id, config) {
        Ok(journal) => Some(Arc::new(journal)),
        Err(err) => {
            log.error(format!(
                "{err}; set IMGBUILD_STATE_DIR to a writable directory"
            ));
            None
        }
    }
}

fn warn_about_leftovers(options: &RunOptions, log: &BuildLog) {
    match journal::dead_runs(&options.state_dir) {
        Ok(runs) => {
            let resources: usize = runs.iter().map(|run| run.outstanding().len()).sum();
            if resources > 0 {
                log.warn(format!(
                    "{} earlier run(s) ended without cleaning up {resources} resource(s) (instances, VMs, containers or files may still exist); run `imgbuild clean` to list and remove them",
                    runs.len()
                ));
            }
        }
        Err(err) => log.warn(format!("cannot check for leftovers of earlier runs: {err}")),
    }
}

/// Refuses the whole run, before anything is created, when any build would
/// overwrite an existing version or cannot start.
async fn preflight(
    config: &Config,
    options: &RunOptions,
    contexts: &[StepContext],
) -> Result<Vec<Option<Entry>>, RunStatus> {
    let existing = match options.manifest.read().await {
        Ok(existing) => existing,
        Err(err) => {
            contexts[0].log.error(err.to_string());
            return Err(RunStatus::Refused);
        }
    };
    let mut refused = false;
    let mut standing = vec![None; config.builds.len()];
    for (index, (build, cx)) in config.builds.iter().zip(contexts).enumerate() {
        if options.skip_unchanged {
            match unchanged(config, build, &existing, cx).await {
                Ok(Some(entry)) => {
                    standing[index] = Some(entry);
                    continue;
                }
                Ok(None) => {}
                Err(BuildError::Cancelled) => return Err(RunStatus::Interrupted),
                Err(err) => {
                    cx.log.error(format!(
                        "--skip-unchanged cannot tell whether this build changed: {err}"
                    ));
                    refused = true;
                    continue;
                }
            }
        }
        if let Some(entry) = manifest::find(
            &existing,
            &config.image.name,
            &config.image.version,
            &build.name,
        ) {
            cx.log.error(format!(
                "image {} version {} was already built by this builder (run {}, {}, {}{}; recorded in {}); versions are immutable, failed ones too: bump `image.version` to build a new one",
                config.image.name,
                config.image.version,
                entry.run_id,
                entry.artifact_id,
                entry.status.as_str(),
                if entry.deleted { ", deleted" } else { "" },
                options.manifest
            ));
            refused = true;
            continue;
        }
        let request = request_for(config, build, options.on_error);
        // Resolving a base can cost a pull: only when there is a revoked
        // version it could be.
        if existing
            .builds
            .iter()
            .any(|e| e.status == EntryStatus::Revoked)
        {
            match build.builder.resolve_source(&request, cx).await {
                Ok(source) => {
                    if let Some(parent) = crate::catalog::parent_of(&existing, &source)
                        && parent.status == EntryStatus::Revoked
                    {
                        cx.log.error(format!(
                            "the base {} is image {} version {} (build {}), which is revoked{}; build from another base",
                            source.reference,
                            parent.image.name,
                            parent.image.version,
                            parent.build.name,
                            parent.revocation_reason()
                        ));
                        refused = true;
                        continue;
                    }
                }
                Err(BuildError::Cancelled) => return Err(RunStatus::Interrupted),
                // The build resolves it again and reports what is wrong.
                Err(_) => {}
            }
        }
        match build.builder.preflight(&request, cx).await {
            Ok(()) => {}
            Err(BuildError::Refused(message)) | Err(BuildError::Failed { message, .. }) => {
                cx.log.error(message);
                refused = true;
            }
            Err(BuildError::Cancelled) => return Err(RunStatus::Interrupted),
        }
    }
    if refused {
        contexts[0]
            .log
            .error("nothing was launched: the problems above must be fixed first");
        return Err(RunStatus::Refused);
    }
    Ok(standing)
}

/// The latest recorded version of `build` whose inputs, version masked,
/// equal the build's now (its base resolved afresh), if it is still good:
/// not failed, not deleted, and not older than the build's `max_age`.
async fn unchanged(
    config: &Config,
    build: &Build,
    existing: &manifest::Manifest,
    cx: &StepContext,
) -> Result<Option<Entry>, BuildError> {
    let Some(latest) = manifest::latest(existing, &config.image.name, &build.name) else {
        cx.log
            .info("--skip-unchanged: no version of this build is recorded yet");
        return Ok(None);
    };
    let request = request_for(config, build, OnError::Cleanup);
    let source = build.builder.resolve_source(&request, cx).await?;
    let (_, unversioned) = inputs::hashes(config, build, &source)
        .await
        .map_err(|err| {
            BuildError::Refused(format!("cannot hash the build's input files: {err}"))
        })?;
    let usable =
        matches!(latest.status, EntryStatus::Built | EntryStatus::Tested) && !latest.deleted;
    if latest.unversioned_inputs_sha256 != unversioned || !usable {
        cx.log.info(format!(
            "--skip-unchanged: {}; building",
            if usable {
                format!("the inputs differ from version {}'s", latest.image.version)
            } else {
                format!(
                    "the latest version {} is {}",
                    latest.image.version,
                    if latest.deleted {
                        "deleted"
                    } else {
                        latest.status.as_str()
                    }
                )
            }
        ));
        return Ok(None);
    }
    if let Some(max_age) = build.max_age
        && let Some(age) = latest.age()
        && age > max_age
    {
        cx.log.info(format!(
            "--skip-unchanged: version {} has the same inputs but is {} old, more than max_age {}; building",
            latest.image.version,
            humantime::format_duration(std::time::Duration::from_secs(age.as_secs())),
            humantime::format_duration(max_age)
        ));
        return Ok(None);
    }
    Ok(Some(latest.clone()))
}

fn request_for(config: &Config, build: &Build, on_error: OnError) -> BuildRequest {
    BuildRequest {
        image: config.image.clone(),
        build_name: build.name.clone(),
        provisioners: build.provisioners.clone(),
        on_error,
        config_dir: config.dir.clone(),
        cache: Default::default(),
        sbom: build.sbom.unwrap_or(config.sbom),
        list_files: None,
    }
}

async fn run_builds(
    config: Arc<Config>,
    options: &RunOptions,
    contexts: Vec<StepContext>,
    standing: Vec<Option<Entry>>,
    cancel: CancellationToken,
    log: &BuildLog,
) -> RunStatus {
    let permits = Arc::new(tokio::sync::Semaphore::new(options.parallel.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let shared = Arc::new(options.clone());
    for ((index, cx), standing) in contexts.into_iter().enumerate().zip(standing) {
        if let Some(entry) = standing {
            let outcome = skipped(&config.builds[index], entry, &cx);
            tasks.spawn(async move { (index, outcome) });
            continue;
        }
        let config = config.clone();
        let permits = permits.clone();
        let options = shared.clone();
        tasks.spawn(async move {
            let _permit = tokio::select! {
                permit = permits.acquire_owned() => permit.expect("semaphore never closes"),
                _ = cx.cancel.cancelled() => {
                    return (index, Outcome { status: BuildStatus::Cancelled, artifact: None });
                }
            };
            (
                index,
                run_one(&config, &config.builds[index], cx, &options).await,
            )
        });
    }
    let mut outcomes: Vec<Option<Outcome>> = (0..config.builds.len()).map(|_| None).collect();
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((index, outcome)) => outcomes[index] = Some(outcome),
            Err(err) => log.error(format!("a build task crashed: {err}")),
        }
    }
    let outcomes: Vec<Outcome> = outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or(Outcome {
                status: BuildStatus::Failed,
                artifact: None,
            })
        })
        .collect();
    let status = if cancel.is_cancelled() {
        RunStatus::Interrupted
    } else if outcomes.iter().all(|o| o.status == BuildStatus::Succeeded) {
        RunStatus::Succeeded
    } else {
        RunStatus::Failed
    };
    log.emit(Event::RunFinished {
        run_id: options.run_id.clone(),
        exit_code: status.exit_code(),
        artifacts: outcomes.into_iter().filter_map(|o| o.artifact).collect(),
    });
    status
}

/// What the tests said about one artifact.
struct Verdict {
    status: EntryStatus,
    tests: Vec<TestResult>,
    skipped: bool,
    /// Why the tests could not run, or did not finish.
    error: Option<String>,
    cancelled: bool,
}

impl Verdict {
    fn untested(skipped: bool) -> Self {
        Verdict {
            status: EntryStatus::Built,
            tests: Vec::new(),
            skipped,
            error: None,
            cancelled: false,
        }
    }

    fn failed(error: String, cancelled: bool) -> Self {
        Verdict {
            status: EntryStatus::Failed,
            tests: Vec::new(),
            skipped: false,
            error: Some(error),
            cancelled,
        }
    }

    /// The build's failure message, when the verdict fails it: each failed
    /// test with what it ran and how it ended.
    fn failure(&self, build: &Build) -> Option<String> {
        if self.status != EntryStatus::Failed {
            return None;
        }
        if let Some(error) = &self.error {
            return Some(error.clone());
        }
        let failed: Vec<String> = self
            .tests
            .iter()
            .filter(|t| !t.passed)
            .map(|t| {
                let ran = build
                    .test_configs
                    .iter()
                    .find(|c| c["name"] == t.name.as_str())
                    .map(test_command)
                    .unwrap_or_default();
                let ended = match t.exit_code {
                    Some(code) => format!("exit code {code}"),
                    None => t.error.clone().unwrap_or_else(|| "no exit code".into()),
                };
                format!("`{}` ({ran}: {ended})", t.name)
            })
            .collect();
        Some(format!(
            "{} of {} tests failed on the artifact: {}",
            failed.len(),
            self.tests.len(),
            failed.join(", ")
        ))
    }
}

/// What a test's resolved config runs, in one line: its inline commands or
/// its script files.
fn test_command(config: &serde_json::Value) -> String {
    let list = |value: &serde_json::Value| -> Vec<String> {
        match value {
            serde_json::Value::Array(items) => items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_owned))
                .collect(),
            serde_json::Value::String(text) => vec![text.clone()],
            _ => Vec::new(),
        }
    };
    for (field, separator) in [("inline", "; "), ("script", ", "), ("scripts", ", ")] {
        let items = list(&config[field]);
        if !items.is_empty() {
            return format!("{field} `{}`", items.join(separator));
        }
    }
    String::from("the test")
}

/// Runs the build's `[[test]]`s on its artifact, unless there are none or
/// `--skip-tests` was given.
async fn test(
    build: &Build,
    request: &BuildRequest,
    artifact: &Artifact,
    cx: &StepContext,
    skip_tests: bool,
) -> Verdict {
    if build.tests.is_empty() {
        return Verdict::untested(false);
    }
    if skip_tests {
        cx.log.warn(format!(
            "--skip-tests: the {} test(s) of this build did not run; the version is recorded as untested (status `built`, `tests_skipped`)",
            build.tests.len()
        ));
        return Verdict::untested(true);
    }
    match build
        .builder
        .test_artifact(request, artifact, &build.tests, cx)
        .await
    {
        // A builder that returned fewer results than tests did not run them
        // all: that is no pass.
        Ok(results) if results.len() == build.tests.len() && results.iter().all(|r| r.passed) => {
            Verdict {
                status: EntryStatus::Tested,
                tests: results,
                skipped: false,
                error: None,
                cancelled: false,
            }
        }
        Ok(results) => {
            let error = (results.len() != build.tests.len()).then(|| {
                format!(
                    "the builder reported {} results for {} tests",
                    results.len(),
                    build.tests.len()
                )
            });
            Verdict {
                status: EntryStatus::Failed,
                tests: results,
                skipped: false,
                error,
                cancelled: false,
            }
        }
        Err(BuildError::Cancelled) => Verdict::failed(
            "interrupted before the tests finished: no test failed, but the version is untested, so it is recorded as failed (never deleted) until `imgbuild test` passes on it".into(),
            true,
        ),
        Err(err) => Verdict::failed(format!("the tests could not run: {err}"), false),
    }
}

/// A build `--skip-unchanged` left out: the recorded version stands, and
/// is what the run reports and the step outputs carry.
fn skipped(build: &Build, entry: Entry, cx: &StepContext) -> Outcome {
    cx.log.emit(Event::BuildSkipped {
        build: build.name.clone(),
        version: entry.image.version.clone(),
        artifact_id: entry.artifact_id.clone(),
    });
    write_step_outputs(&entry, cx);
    let entry_json = serde_json::to_value(&entry).expect("entries serialize");
    cx.log.emit(Event::Artifact {
        build: build.name.clone(),
        artifact: entry_json.clone(),
    });
    Outcome {
        status: BuildStatus::Succeeded,
        artifact: Some(entry_json),
    }
}

fn write_step_outputs(entry: &Entry, cx: &StepContext) {
    if let Some(path) = std::env::var_os("GITHUB_OUTPUT").filter(|p| !p.is_empty())
        && let Err(err) = crate::outputs::write_github_outputs(std::path::Path::new(&path), entry)
    {
        cx.log.warn(format!(
            "cannot write the step outputs to GITHUB_OUTPUT ({}): {err}",
            std::path::Path::new(&path).display()
        ));
    }
}

async fn run_one(config: &Config, build: &Build, cx: StepContext, options: &RunOptions) -> Outcome {
    let (on_error, manifest_path, run_id, skip_tests, use_cache) = (
        options.on_error,
        &options.manifest,
        options.run_id.as_str(),
        options.skip_tests,
        options.use_cache,
    );
    let started_at = now_rfc3339();
    let started = Instant::now();
    cx.log.emit(Event::BuildStarted {
        build: build.name.clone(),
        builder: build.builder.kind().to_owned(),
    });
    let mut request = request_for(config, build, on_error);
    let steps = match keys::BuildSteps::of(build, config) {
        Ok(steps) => {
            request.cache = steps.cache(use_cache, &config.cache);
            Some(steps)
        }
        Err(err) => {
            cx.log.warn(format!(
                "cannot hash the files the provisioners read ({err}); no step of this build is taken from or added to the cache"
            ));
            None
        }
    };
    let finish = |status: BuildStatus, error: Option<String>| {
        cx.log.emit(Event::BuildFinished {
            build: build.name.clone(),
            status,
            duration_ms: started.elapsed().as_millis() as u64,
            error,
        });
    };
    let first_build = if options.check_reproducible {
        let mut check_request = request_for(config, build, on_error);
        // Only the recorded build writes the version's SBOM.
        check_request.sbom = imgbuild_builders::SbomFormats::None;
        match reproducible::first_build(build.builder.as_ref(), check_request, &cx).await {
            Ok(first) => {
                request.list_files = Some(first.second_listing());
                Some(first)
            }
            Err(err) => {
                let cancelled = matches!(err, BuildError::Cancelled);
                let status = if cancelled {
                    BuildStatus::Cancelled
                } else {
                    BuildStatus::Failed
                };
                finish(
                    status,
                    (!cancelled).then(|| format!("the first of the two builds failed: {err}")),
                );
                return Outcome {
                    status,
                    artifact: None,
                };
            }
        }
    } else {
        None
    };
    let result = build.builder.build(&request, &cx).await;
    let artifact = match result {
        Ok(artifact) => artifact,
        Err(BuildError::Cancelled) => {
            finish(BuildStatus::Cancelled, None);
            return Outcome {
                status: BuildStatus::Cancelled,
                artifact: None,
            };
        }
        Err(err) => {
            finish(BuildStatus::Failed, Some(err.to_string()));
            return Outcome {
                status: BuildStatus::Failed,
                artifact: None,
            };
        }
    };

    let unrecorded = unrecorded::Unrecorded::journal(build.builder.as_ref(), &artifact, &cx);
    let reproducibility = first_build.and_then(|first| {
        match reproducible::compare(&first, &artifact) {
            Ok(report) => {
                let summary = reproducible::summary(&report);
                if report.artifact_identical && report.files_identical {
                    cx.log.info(summary);
                } else {
                    cx.log.warn(summary);
                }
                Some(report)
            }
            Err(err) => {
                cx.log.error(format!(
                    "--check-reproducible: the two builds could not be compared ({err}); the entry records no comparison"
                ));
                None
            }
        }
    });
    let verdict = test(build, &request, &artifact, &cx, skip_tests).await;
    let mut deleted = false;
    if verdict.status == EntryStatus::Failed
        && !verdict.cancelled
        && config.on_test_failure == OnTestFailure::Delete
    {
        match build.builder.delete_artifact(&artifact, &cx).await {
            Ok(()) => {
                cx.log.info(format!(
                    "deleted the artifact {} (on_test_failure = \"delete\")",
                    artifact.id
                ));
                deleted = true;
            }
            Err(err) => cx.log.error(format!(
                "the artifact {} failed its tests but could not be deleted ({err}); it stays recorded as failed: remove it by hand",
                artifact.id
            )),
        }
    }

    // Only what passed its tests (or skipped them, which the entry records)
    // is delivered; a failed delivery records nothing, so no entry ever
    // names an upload or push that did not happen.
    let artifact = if verdict.status == EntryStatus::Failed {
        artifact
    } else {
        match build.builder.deliver(&request, artifact, &cx).await {
            Ok(delivered) => delivered,
            Err(BuildError::Cancelled) => {
                unrecorded.abandoned(&cx);
                finish(BuildStatus::Cancelled, None);
                return Outcome {
                    status: BuildStatus::Cancelled,
                    artifact: None,
                };
            }
            Err(err) => {
                let message = format!(
                    "delivery failed: {err}; version {} is not recorded in {}",
                    config.image.version, manifest_path
                );
                unrecorded.abandoned(&cx);
                finish(BuildStatus::Failed, Some(message));
                return Outcome {
                    status: BuildStatus::Failed,
                    artifact: None,
                };
            }
        }
    };

    let (inputs_sha256, unversioned_inputs_sha256) =
        match inputs::hashes(config, build, &artifact.source).await {
            Ok(hashes) => hashes,
            Err(err) => {
                cx.log
                    .warn(format!("cannot hash the build's input files: {err}"));
                (String::new(), String::new())
            }
        };
    let steps = match &steps {
        Some(steps) => steps.keyed(
            build.builder.kind(),
            build.builder.cache_settings().as_ref(),
            &artifact.source,
        ),
        None => Vec::new(),
    };
    let mut entry = Entry {
        run_id: run_id.to_owned(),
        image: ImageRecord {
            name: config.image.name.clone(),
            version: config.image.version.clone(),
            description: config.image.description.clone(),
            labels: config.image.labels.clone(),
        },
        build: BuildRecord {
            name: build.name.clone(),
            kind: build.builder.kind().to_owned(),
        },
        artifact_id: artifact.id.clone(),
        files: artifact.files.clone(),
        details: artifact.details.clone(),
        source: artifact.source.clone(),
        inputs_sha256,
        unversioned_inputs_sha256,
        steps,
        started_at,
        finished_at: now_rfc3339(),
        duration_secs: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        imgbuild_version: env!("CARGO_PKG_VERSION").to_owned(),
        git_commit: config.image.revision.clone(),
        status: verdict.status,
        tests: verdict.tests.clone(),
        tests_skipped: verdict.skipped,
        test_error: verdict.error.clone(),
        deleted,
        retested_at: None,
        parent: None,
        revocation: None,
        retirement: None,
        attestation: None,
        reproducibility,
    };
    entry.mask_free_text(&config.redactor);
    // After tests and delivery, so the provenance names what was delivered;
    // before the record, so no entry points at a missing attestation.
    if let Err(message) =
        crate::attest::attest_entry(&mut entry, config, options.signer.clone(), &cx).await
    {
        unrecorded.abandoned(&cx);
        finish(BuildStatus::Failed, Some(message));
        return Outcome {
            status: BuildStatus::Failed,
            artifact: None,
        };
    }
    // The parent from the catalog as it is when the entry is written: it may
    // have been recorded since the run started.
    let recorded = match manifest_path
        .append_completed(entry, |current, entry| {
            entry.parent =
                crate::catalog::parent_of(current, &entry.source).map(|p| manifest::ParentRef {
                    image: p.image.name.clone(),
                    version: p.image.version.clone(),
                    build: p.build.name.clone(),
                });
        })
        .await
    {
        Ok(Ok(written)) => {
            unrecorded.recorded(&cx);
            written
        }
        Ok(Err(existing)) => {
            // The files may be the recorded version's own: never left for
            // `imgbuild clean`.
            unrecorded.recorded(&cx);
            cx.log.error(format!(
                "the manifest already records this version (run {}); the new artifact {} is not recorded",
                existing.run_id, artifact.id
            ));
            finish(BuildStatus::Failed, Some("version recorded twice".into()));
            return Outcome {
                status: BuildStatus::Failed,
                artifact: None,
            };
        }
        Err(err) => {
            unrecorded.abandoned(&cx);
            cx.log.error(format!(
                "the artifact {} was built but cannot be recorded: {err}",
                artifact.id
            ));
            finish(BuildStatus::Failed, Some(err.to_string()));
            return Outcome {
                status: BuildStatus::Failed,
                artifact: None,
            };
        }
    };
    let entry_json = serde_json::to_value(&recorded).expect("entries serialize");
    if let Some(failure) = verdict.failure(build) {
        let kept = if deleted {
            "the artifact was deleted"
        } else {
            "the artifact is kept"
        };
        let message = format!(
            "{failure}; version {} is recorded as failed in {} ({kept}), and `imgbuild output` refuses it without --allow-failed",
            config.image.version, manifest_path
        );
        if verdict.cancelled {
            cx.log.warn(message);
            finish(BuildStatus::Cancelled, None);
            return Outcome {
                status: BuildStatus::Cancelled,
                artifact: None,
            };
        }
        finish(BuildStatus::Failed, Some(message));
        return Outcome {
            status: BuildStatus::Failed,
            artifact: None,
        };
    }
    write_step_outputs(&recorded, &cx);
    cx.log.emit(Event::Artifact {
        build: build.name.clone(),
        artifact: entry_json.clone(),
    });
    finish(BuildStatus::Succeeded, None);
    Outcome {
        status: BuildStatus::Succeeded,
        artifact: Some(entry_json),
    }
}

fn finish_journal(journal: Arc<Journal>, log: &BuildLog, options: &RunOptions) {
    let Ok(journal) = Arc::try_unwrap(journal) else {
        log.warn("the run journal is still in use; it is kept");
        return;
    };
    match journal.finish() {
        Ok(outstanding) if outstanding.is_empty() => {}
        Ok(outstanding) => {
            let list: Vec<String> = outstanding
                .iter()
                .map(|o| format!("  {}: {}", o.build, o.resource.describe()))
                .collect();
            let why = if options.on_error == OnError::Abort {
                "left in place for debugging (--on-error abort)"
            } else {
                "could not be cleaned up"
            };
            log.warn(format!(
                "{} resource(s) {why}:\n{}\nremove them with `imgbuild clean --run {}`",
                outstanding.len(),
                list.join("\n"),
                options.run_id
            ));
        }
        Err(err) => log.warn(format!("cannot close the run journal: {err}")),
    }
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OnTestFailure;
    use imgbuild_builders::{Builder, ConfigProblem, ImageInfo, PlannedArtifact, SourceIdentity};
    use imgbuild_core::Redactor;
    use imgbuild_core::events::MemorySink;
    use imgbuild_provisioners::image_test::ImageTest;
    use std::path::Path;

    /// Builds an artifact instantly and keeps the trait's defaults for
    /// `test_artifact` and `delete_artifact`: both refuse, as a builder that
    /// cannot test yet does.
    struct CannotTest;

    #[async_trait::async_trait]
    impl Builder for CannotTest {
        fn kind(&self) -> &'static str {
            "fake"
        }
        fn validate(&self, _: &Path) -> Vec<ConfigProblem> {
            Vec::new()
        }
        fn resolved_config(&self) -> serde_json::Value {
            serde_json::json!({})
        }
        fn planned_artifact(&self, _: &ImageInfo, _: &Path) -> PlannedArtifact {
            PlannedArtifact {
                description: "nothing".into(),
                files: Vec::new(),
            }
        }
        async fn resolve_source(
            &self,
            _: &BuildRequest,
            _: &StepContext,
        ) -> Result<SourceIdentity, BuildError> {
            Ok(fake_source())
        }
        async fn preflight(&self, _: &BuildRequest, _: &StepContext) -> Result<(), BuildError> {
            Ok(())
        }
        async fn build(&self, _: &BuildRequest, _: &StepContext) -> Result<Artifact, BuildError> {
            Ok(Artifact {
                builder: "fake".into(),
                id: "fake-artifact-1".into(),
                files: Vec::new(),
                source: fake_source(),
                details: serde_json::Value::Null,
            })
        }
    }

    fn fake_source() -> SourceIdentity {
        SourceIdentity {
            kind: "file".into(),
            reference: "/base".into(),
            sha256: None,
        }
    }

    fn shell_test(name: &str) -> ImageTest {
        let table = toml::de::DeTable::parse("inline = [\"true\"]").unwrap();
        let table = toml::Spanned::new(table.span(), toml::de::DeValue::Table(table.into_inner()));
        let parsed = imgbuild_provisioners::registry::find("shell")
            .unwrap()
            .parse(imgbuild_provisioners::registry::ParseInput {
                table: &table,
                config_dir: Path::new("/"),
                template_context: &serde_json::json!({}),
            })
            .unwrap();
        ImageTest {
            name: name.into(),
            shell: parsed.provisioner,
            retries: 0,
            retry_delay: std::time::Duration::ZERO,
        }
    }

    #[tokio::test]
    async fn tests_that_cannot_run_fail_the_build_and_record_the_version_as_failed() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            path: dir.path().join("image.toml"),
            dir: dir.path().to_path_buf(),
            image: ImageInfo {
                name: "web".into(),
                version: "1".into(),
                description: None,
                labels: Default::default(),
                revision: None,
                created: "now".into(),
            },
            variables: Vec::new(),
            builds: vec![Build {
                name: "box".into(),
                builder: Box::new(CannotTest),
                provisioners: Vec::new(),
                provisioner_configs: Vec::new(),
                steps: Vec::new(),
                max_age: None,
                sbom: None,
                input_files: Vec::new(),
                tests: vec![shell_test("boots")],
                test_configs: vec![serde_json::json!({"name": "boots", "inline": ["true"]})],
            }],
            excluded: Vec::new(),
            redactor: Redactor::new(),
            on_test_failure: OnTestFailure::Delete,
            sbom: Default::default(),
            cache: Default::default(),
            run_values: Vec::new(),
        };
        let options = RunOptions {
            run_id: "run1".into(),
            started: time::OffsetDateTime::UNIX_EPOCH,
            parallel: 1,
            on_error: OnError::Cleanup,
            manifest: manifest::Location::File(dir.path().join("manifest.json")),
            state_dir: dir.path().join("state"),
            skip_tests: false,
            use_cache: true,
            skip_unchanged: false,
            signer: None,
            check_reproducible: false,
        };
        let sink = Arc::new(MemorySink::default());
        let log = BuildLog::root(sink.clone(), Redactor::new());
        let status = run(config, options, log, CancellationToken::new()).await;
        assert_eq!(status, RunStatus::Failed);

        let manifest = manifest::read(&dir.path().join("manifest.json")).unwrap();
        let entry = &manifest.builds[0];
        assert_eq!(entry.status, EntryStatus::Failed);
        assert!(!entry.deleted, "the builder refused to delete it");
        let error = entry.test_error.as_deref().unwrap();
        assert!(error.contains("cannot run [[test]]"), "{error}");

        let events = serde_json::to_string(&sink.events()).unwrap();
        assert!(
            events.contains("failed its tests but could not be deleted"),
            "{events}"
        );
        assert!(events.contains("the tests could not run"), "{events}");
    }
}
