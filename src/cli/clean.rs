//! `imgbuild clean`: removes what runs that died (SIGKILL, CI timeout,
//! power loss) or were left for debugging (`--on-error abort`) created, as
//! listed in their journals.

use super::{EXIT_BUILD_FAILED, EXIT_OK, EXIT_USAGE, GlobalOptions, runtime};
use crate::ui::OutputFormat;
use clap::Args;
use imgbuild_core::journal::{dead_runs, default_state_dir};
use std::path::PathBuf;

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
    let mut failures = 0;
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
        for item in outstanding {
            let description = item.resource.describe();
            if args.dry_run {
                say(
                    serde_json::json!({"event": "leftover", "run_id": run.run_id, "build": item.build, "resource": item.resource}),
                    format!("  would remove {description} (build {})", item.build),
                );
                continue;
            }
            match imgbuild_builders::common::orphans::clean_orphan(&item.resource, &run.run_id)
                .await
            {
                Ok(()) => {
                    if let Err(err) = run.release(item.id) {
                        eprintln!("warning: {err}");
                    }
                    say(
                        serde_json::json!({"event": "removed", "run_id": run.run_id, "build": item.build, "resource": item.resource}),
                        format!("  removed {description}"),
                    );
                }
                Err(err) => {
                    failures += 1;
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
    if failures > 0 {
        EXIT_BUILD_FAILED
    } else {
        EXIT_OK
    }
}
