//! `imgbuild retire`: removes the artifacts of old versions that no
//! channel hands out.

use super::catalog::CatalogLocation;
use super::{EXIT_OK, EXIT_USAGE, GlobalOptions, new_run_id, print_result, runtime};
use crate::pipeline::retire::{self, RetireOptions};
use crate::pipeline::signals;
use crate::ui::{HumanSink, JsonSink, OutputFormat};
use clap::Args;
use imgbuild_core::journal::default_state_dir;
use imgbuild_core::{BuildLog, CancellationToken, Redactor};
use std::sync::Arc;

#[derive(Args)]
pub struct RetireArgs {
    image: String,
    /// How many of the newest versions to keep, whatever their age
    #[arg(long, value_name = "N")]
    keep: usize,
    /// Only retire versions older than this (`90d`, `12h`)
    #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration)]
    older_than: Option<std::time::Duration>,
    /// Only list what would be removed
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    location: CatalogLocation,
}

pub fn run(args: RetireArgs, global: &GlobalOptions) -> i32 {
    let options = RetireOptions {
        image: args.image.clone(),
        keep: args.keep,
        older_than: args.older_than,
        dry_run: args.dry_run,
        run_id: new_run_id(),
        state_dir: default_state_dir(),
    };
    let location = args.location.manifest;
    let json = global.output == OutputFormat::Json;
    runtime().block_on(async move {
        if options.dry_run {
            return match retire::plan(&location, &options).await {
                Ok(planned) if json => {
                    print_result(&serde_json::json!({ "retire": planned }).to_string());
                    EXIT_OK
                }
                Ok(planned) => {
                    if planned.is_empty() {
                        print_result("nothing to retire");
                    }
                    for version in planned {
                        print_result(&format!(
                            "would retire {} {}: {}",
                            options.image,
                            version.version,
                            version.artifacts.join("; ")
                        ));
                    }
                    EXIT_OK
                }
                Err(err) => {
                    eprintln!("error: {err}");
                    EXIT_USAGE
                }
            };
        }
        let sink: Arc<dyn imgbuild_core::EventSink> = if json {
            Arc::new(JsonSink::new())
        } else {
            Arc::new(HumanSink::new(
                global.color.to_anstream(),
                global.verbosity(),
                &[],
            ))
        };
        let log = BuildLog::root(sink, Redactor::new());
        let cancel = CancellationToken::new();
        let watcher = signals::watch(cancel.clone(), log.clone()).ok();
        let status = retire::run(&location, &options, &log, cancel).await;
        if let Some(watcher) = watcher {
            watcher.abort();
        }
        status.exit_code()
    })
}
