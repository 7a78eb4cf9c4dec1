//! `imgbuild plan`: per build, whether it is up to date, which step it
//! would rebuild from and why, or that it must build from scratch. Bases
//! are resolved afresh; nothing is launched or created.

use super::{
    ConfigArgs, EXIT_OK, EXIT_USAGE, GlobalOptions, new_run_id, print_result, report_diagnostics,
    runtime,
};
use crate::config;
use crate::pipeline::plan::{Action, BuildPlan, plan_build};
use crate::ui::OutputFormat;
use clap::Args;
use imgbuild_builders::BuildError;
use imgbuild_core::journal::Journal;
use imgbuild_core::{CancellationToken, Event, EventSink, StepContext};
use std::sync::Arc;

/// `--detailed-exitcode`: something needs building.
pub const EXIT_CHANGES: i32 = 3;
const EXIT_FAILED: i32 = 1;

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The manifest the recorded versions are read from [default:
    /// imgbuild-manifest.json beside the config]
    #[arg(long, value_name = "PATH|s3://BUCKET/KEY", env = "IMGBUILD_MANIFEST")]
    manifest: Option<crate::manifest::Location>,
    /// Exit 0 when nothing needs building, 3 when something does (1 and 2
    /// as usual)
    #[arg(long)]
    detailed_exitcode: bool,
}

/// Keeps stdout for the plan itself in JSON mode.
struct Discard;
impl EventSink for Discard {
    fn emit(&self, _: &Event) {}
}

pub fn run(args: PlanArgs, global: &GlobalOptions) -> i32 {
    let run_id = new_run_id();
    let options = args
        .config
        .load_options(&run_id, time::OffsetDateTime::now_utc());
    let config = match config::load(&args.config.config, &options) {
        Ok(config) => config,
        Err(diagnostics) => {
            report_diagnostics(&diagnostics, global);
            return EXIT_USAGE;
        }
    };
    let manifest_path = super::manifest_path(&args.manifest, &config);
    let existing = match super::runtime().block_on(manifest_path.read()) {
        Ok(existing) => existing,
        Err(err) => {
            eprintln!("error: {err}");
            return EXIT_USAGE;
        }
    };
    let log = super::event_log(global, &config, || Arc::new(Discard));
    // Resolving a base creates nothing, but the builders' calls take a step
    // context, journal included: a private one, gone afterwards.
    let scratch = match tempfile::tempdir() {
        Ok(dir) => dir,
        Err(err) => {
            eprintln!("error: cannot create a temporary directory: {err}");
            return EXIT_FAILED;
        }
    };
    let journal = match Journal::create(scratch.path(), &run_id, &config.path) {
        Ok(journal) => Arc::new(journal),
        Err(err) => {
            eprintln!("error: {err}");
            return EXIT_FAILED;
        }
    };
    let cancel = CancellationToken::new();
    let results: Vec<(String, Result<BuildPlan, BuildError>)> = runtime().block_on(async {
        let mut results = Vec::new();
        for build in &config.builds {
            let cx = StepContext {
                log: log.for_build(&build.name),
                journal: journal.clone(),
                cancel: cancel.clone(),
                run_id: run_id.clone(),
            };
            results.push((
                build.name.clone(),
                plan_build(&config, build, &existing, &cx).await,
            ));
        }
        results
    });

    let mut failed = false;
    let mut plans = Vec::new();
    for (name, result) in results {
        match result {
            Ok(plan) => plans.push(plan),
            Err(err) => {
                eprintln!("error: build {name}: cannot plan: {err}");
                failed = true;
            }
        }
    }
    let to_build: Vec<&str> = plans
        .iter()
        .filter(|p| p.needs_work())
        .map(|p| p.build.as_str())
        .collect();
    match global.output {
        OutputFormat::Json => print_result(
            &serde_json::json!({
                "image": config.image.name,
                "version": config.image.version,
                "builds": plans,
                "to_build": to_build,
            })
            .to_string(),
        ),
        OutputFormat::Human => print_result(render_human(&plans).trim_end()),
    }
    if failed {
        EXIT_FAILED
    } else if args.detailed_exitcode && !to_build.is_empty() {
        EXIT_CHANGES
    } else {
        EXIT_OK
    }
}

fn render_human(plans: &[BuildPlan]) -> String {
    let mut text = String::new();
    for plan in plans {
        let headline = match &plan.action {
            Action::UpToDate {
                version,
                artifact_id,
            } => format!("up to date: same inputs as version {version} ({artifact_id})"),
            Action::Rebuild { from_step, .. } if *from_step > plan.steps.len() => {
                "rebuild: every provisioner step is unchanged".to_owned()
            }
            Action::Rebuild { from_step, .. } => {
                format!("rebuild from step {from_step} of {}", plan.steps.len())
            }
            Action::Build { .. } => "build from scratch".to_owned(),
        };
        text.push_str(&format!("{} ({}): {headline}\n", plan.build, plan.kind));
        if let Action::Rebuild { reasons, .. } | Action::Build { reasons } = &plan.action {
            for reason in reasons {
                text.push_str(&format!("    because {reason}\n"));
            }
        }
        for (index, step) in plan.steps.iter().enumerate() {
            let cache = match &step.why_not {
                None => "cacheable".to_owned(),
                Some(why) => format!("not cached: {why}"),
            };
            text.push_str(&format!(
                "    step {}: {} ({cache})\n",
                index + 1,
                step.provisioner
            ));
        }
    }
    text
}
