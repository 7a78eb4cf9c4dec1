//! `imgbuild clean`: removes what runs that died (SIGKILL, CI timeout,
//! power loss) or were left for debugging (`--on-error abort`) created, as
//! listed in their journals.

use super::{EXIT_BUILD_FAILED, EXIT_OK, EXIT_USAGE, GlobalOptions, runtime};
use crate::ui::OutputFormat;
use clap::Args;
use imgbuild_builders::common::orphans::{self, Cleaned};
use imgbuild_core::Resource;
use imgbuild_core::journal::{dead_runs, default_state_dir};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::SystemTime;

#[derive(Args)]
pub struct CleanArgs {
    /// Only list what would be removed
    #[arg(long)]
    dry_run: bool,
    /// Only this run (the id printed by `build`)
    #[arg(long, value_name = "RUN_ID")]
    run: Option<String>,
    /// Where run journals live [default: $IMGBUILD_STATE_DIR, $XDG_STATE_HOME/imgbuild or ~/.local/state/imgbuild]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

pub fn run(args: CleanArgs, global: &GlobalOptions) -> i32 {
    let state_dir = args.state_dir.clone().unwrap_or_else(default_state_dir);
    runtime().block_on(clean(args, state_dir, global))
}

async fn clean(args: CleanArgs, state_dir: PathBuf, global: &GlobalOptions) -> i32 {
    let runs = match dead_runs(&state_dir) {
        Ok(runs) => runs,
        Err(err) => {
            eprintln!("error: {err}");
            return EXIT_USAGE;
        }
    };
    let runs: Vec<_> = runs
        .into_iter()
        .filter(|run| args.run.as_ref().is_none_or(|id| &run.run_id == id))
        .collect();
    let json = global.output == OutputFormat::Json;
    let say = |value: serde_json::Value, text: String| {
        if json {
            super::print_result(&value.to_string());
        } else {
            super::print_result(&text);
        }
    };
    if runs.is_empty() {
        if let Some(id) = &args.run {
            eprintln!(
                "error: no finished run {id} with leftovers in {}",
                state_dir.display()
            );
            return EXIT_USAGE;
        }
        say(
            serde_json::json!({"event": "clean", "runs": 0}),
            "nothing to clean".to_owned(),
        );
        return EXIT_OK;
    }
    let now = SystemTime::now();
    // Failed removals and resources kept for a later clean: either way,
    // something may still exist.
    let mut unfinished = 0;
    for mut run in runs {
        let outstanding = run.outstanding();
        say(
            serde_json::json!({"event": "run", "run_id": run.run_id, "config": run.config, "started_at": run.started_at, "resources": outstanding.len()}),
            format!(
                "run {} ({}, started {}): {} resource(s)",
                run.run_id,
                run.config.as_deref().unwrap_or("?"),
                run.started_at.as_deref().unwrap_or("?"),
                outstanding.len()
            ),
        );
        // Builds whose process is not proven gone: their files stay, since
        // it may still be writing them.
        let mut still_running = BTreeSet::new();
        for item in orphans::cleaning_order(outstanding) {
            let description = item.resource.describe();
            if args.dry_run {
                say(
                    serde_json::json!({"event": "leftover", "run_id": run.run_id, "build": item.build, "resource": item.resource}),
                    format!("  would remove {description} (build {})", item.build),
                );
                continue;
            }
            let is_process = matches!(item.resource, Resource::Process { .. });
            if orphans::needs_processes_gone(&item.resource) && still_running.contains(&item.build)
            {
                unfinished += 1;
                let reason = format!(
                    "a process of build {} is still running and may be using it; it is removed by the `imgbuild clean` after that process is gone",
                    item.build
                );
                say(
                    serde_json::json!({"event": "kept", "run_id": run.run_id, "build": item.build, "resource": item.resource, "reason": reason}),
                    format!("  kept {description}: {reason}"),
                );
                continue;
            }
            match orphans::clean_outstanding(&item, &run.run_id, now).await {
                Ok(Cleaned::Removed) => {
                    if let Err(err) = run.release(item.id) {
                        eprintln!("warning: {err}");
                    }
                    say(
                        serde_json::json!({"event": "removed", "run_id": run.run_id, "build": item.build, "resource": item.resource}),
                        format!("  removed {description}"),
                    );
                }
                Ok(Cleaned::NotOurs(reason)) => {
                    if let Err(err) = run.release(item.id) {
                        eprintln!("warning: {err}");
                    }
                    say(
                        serde_json::json!({"event": "not_ours", "run_id": run.run_id, "build": item.build, "resource": item.resource, "reason": reason}),
                        format!("  left {description}: {reason}"),
                    );
                }
                Ok(Cleaned::Kept(reason)) => {
                    unfinished += 1;
                    if is_process {
                        still_running.insert(item.build.clone());
                    }
                    say(
                        serde_json::json!({"event": "kept", "run_id": run.run_id, "build": item.build, "resource": item.resource, "reason": reason}),
                        format!("  kept {description}: {reason}"),
                    );
                }
                Err(err) => {
                    unfinished += 1;
                    if is_process {
                        still_running.insert(item.build.clone());
                    }
                    say(
                        serde_json::json!({"event": "remove_failed", "run_id": run.run_id, "build": item.build, "resource": item.resource, "error": err}),
                        format!("  could not remove {description}: {err}"),
                    );
                }
            }
        }
        if !args.dry_run
            && let Err(err) = run.finish()
        {
            eprintln!("warning: {err}");
        }
    }
    if unfinished > 0 {
        EXIT_BUILD_FAILED
    } else {
        EXIT_OK
    }
}
