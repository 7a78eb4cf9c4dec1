//! `imgbuild retire`: removes the artifacts of old versions no channel
//! hands out — files with their checksums, Docker tags (and images no
//! other tag names), AMIs with their snapshots in every region — and keeps
//! each version in the catalog as `retired` with what was removed.
//!
//! It runs like a build: a run journal of its own (remote deletions are
//! journalled before they start, so a killed run is finished by
//! `imgbuild clean`), Ctrl-C stops between versions. A version whose
//! removal failed keeps its status and records the error; running `retire`
//! again finishes it, since what is already gone counts as removed.

use super::RunStatus;
use crate::catalog;
use crate::manifest::{Entry, EntryStatus, Location, Retirement};
use imgbuild_builders::registry;
use imgbuild_core::journal::Journal;
use imgbuild_core::{BuildLog, CancellationToken, StepContext};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub struct RetireOptions {
    pub image: String,
    pub keep: usize,
    pub older_than: Option<Duration>,
    pub dry_run: bool,
    pub run_id: String,
    pub state_dir: PathBuf,
}

/// One version's builds to remove, as planned.
#[derive(Debug, serde::Serialize)]
pub struct Planned {
    pub version: String,
    /// `build: artifact id` of each build not yet retired.
    pub artifacts: Vec<String>,
}

/// What `retire` would remove now.
pub async fn plan(location: &Location, options: &RetireOptions) -> Result<Vec<Planned>, String> {
    let manifest = location.read().await.map_err(|err| err.to_string())?;
    if !catalog::images(&manifest).contains(&options.image) {
        return Err(format!(
            "{location} records no image {} (it has: {})",
            options.image,
            catalog::images(&manifest).join(", ")
        ));
    }
    Ok(
        catalog::retire_candidates(&manifest, &options.image, options.keep, options.older_than)
            .into_iter()
            .map(|version| Planned {
                artifacts: catalog::version_entries(&manifest, &options.image, &version)
                    .iter()
                    .filter(|e| e.status != EntryStatus::Retired)
                    .map(|e| format!("{}: {}", e.build.name, e.artifact_id))
                    .collect(),
                version,
            })
            .collect(),
    )
}

pub async fn run(
    location: &Location,
    options: &RetireOptions,
    log: &BuildLog,
    cancel: CancellationToken,
) -> RunStatus {
    let planned = match plan(location, options).await {
        Ok(planned) => planned,
        Err(err) => {
            log.error(err);
            return RunStatus::Refused;
        }
    };
    if planned.is_empty() {
        log.info(format!(
            "nothing to retire: {} keeps its {} newest version(s) and those a channel hands out",
            options.image, options.keep
        ));
        return RunStatus::Succeeded;
    }
    let journal = match Journal::create(
        &options.state_dir,
        &options.run_id,
        Path::new(&location.to_string()),
    ) {
        Ok(journal) => Arc::new(journal),
        Err(err) => {
            log.error(format!(
                "{err}; set IMGBUILD_STATE_DIR to a writable directory"
            ));
            return RunStatus::Refused;
        }
    };
    let mut failed = false;
    for version in planned.iter().map(|p| &p.version) {
        if cancel.is_cancelled() {
            log.warn("interrupted: the remaining versions are not retired");
            break;
        }
        let cx = StepContext {
            log: log.for_build(&format!("{}:{version}", options.image)),
            journal: journal.clone(),
            cancel: cancel.clone(),
            run_id: options.run_id.clone(),
        };
        failed |= !retire_version(location, &options.image, version, &cx).await;
    }
    let outstanding = match Arc::try_unwrap(journal) {
        Ok(journal) => journal.finish().map(|o| o.len()).unwrap_or(0),
        Err(_) => 0,
    };
    if outstanding > 0 {
        log.warn(format!(
            "{outstanding} deletion(s) did not finish; `imgbuild clean --run {}` finishes them",
            options.run_id
        ));
    }
    match (cancel.is_cancelled(), failed) {
        (true, _) => RunStatus::Interrupted,
        (false, true) => RunStatus::Failed,
        (false, false) => RunStatus::Succeeded,
    }
}

/// Retires every build of `version`; false when one could not be removed.
async fn retire_version(location: &Location, image: &str, version: &str, cx: &StepContext) -> bool {
    // Read again right before removing: a channel may have been pointed at
    // the version since the plan was made.
    let manifest = match location.read().await {
        Ok(manifest) => manifest,
        Err(err) => {
            cx.log.error(err.to_string());
            return false;
        }
    };
    let channels = catalog::channels_at(&manifest, image, version);
    if !channels.is_empty() {
        cx.log.warn(format!(
            "channel(s) {} now hand out this version; it is kept",
            channels.join(", ")
        ));
        return true;
    }
    let mut ok = true;
    for entry in catalog::version_entries(&manifest, image, version) {
        if entry.status == EntryStatus::Retired {
            continue;
        }
        let result = remove(entry, cx).await;
        let build = entry.build.name.clone();
        let retirement = Retirement {
            at: super::now_rfc3339(),
            by: crate::manifest::actor(),
            removed: result.clone().unwrap_or_default(),
            error: result.clone().err(),
        };
        match &result {
            Ok(removed) => cx.log.info(format!(
                "build {build}: removed {}",
                if removed.is_empty() {
                    "nothing (already gone)".to_owned()
                } else {
                    removed.join(", ")
                }
            )),
            Err(err) => {
                ok = false;
                cx.log.error(format!(
                    "build {build}: {err}; the version keeps its status, and running `imgbuild retire` again retries it"
                ));
            }
        }
        let recorded = location
            .update(image, version, &build, |e| {
                e.retirement = Some(retirement.clone());
                if result.is_ok() {
                    e.status = EntryStatus::Retired;
                }
            })
            .await;
        if let Err(err) = recorded {
            ok = false;
            cx.log.error(format!(
                "build {build}: the artifact is removed but the catalog could not record it: {err}"
            ));
        }
    }
    ok
}

async fn remove(entry: &Entry, cx: &StepContext) -> Result<Vec<String>, String> {
    if entry.deleted {
        return Ok(Vec::new());
    }
    let kind = registry::find(&entry.build.kind).ok_or_else(|| {
        format!(
            "this imgbuild has no `{}` builder to remove {} with",
            entry.build.kind, entry.artifact_id
        )
    })?;
    let artifact = entry.artifact();
    kind.retire(&artifact, cx).await
}
