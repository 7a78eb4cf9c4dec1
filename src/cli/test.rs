//! `imgbuild test`: run the config's `[[test]]`s again on a version the
//! manifest records, and record the new verdict.

use super::{ConfigArgs, EXIT_USAGE, GlobalOptions, new_run_id, report_diagnostics, runtime};
use crate::config;

use crate::pipeline::{self, RunOptions, RunStatus};
use crate::ui::{JsonSink, OutputFormat};
use clap::Args;
use imgbuild_core::journal::default_state_dir;
use imgbuild_core::{CancellationToken, OnError};
use std::sync::Arc;

#[derive(Args)]
pub struct TestArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// The recorded version to test; the config is read as if its
    /// `image.version` were this [default: the config's `image.version`]
    #[arg(long, value_name = "VERSION")]
    version: Option<String>,
    /// The manifest recording the version [default: imgbuild-manifest.json
    /// beside the config]
    #[arg(long, value_name = "PATH|s3://BUCKET/KEY", env = "IMGBUILD_MANIFEST")]
    manifest: Option<crate::manifest::Location>,
}

pub fn run(args: TestArgs, global: &GlobalOptions) -> i32 {
    let run_id = new_run_id();
    let started = time::OffsetDateTime::now_utc();
    let options = args.config.load_options(&run_id, started);
    let config = match config::load_version(&args.config.config, &options, args.version.as_deref())
    {
        Ok(config) => config,
        Err(diagnostics) => {
            report_diagnostics(&diagnostics, global);
            return EXIT_USAGE;
        }
    };
    let log = super::event_log(global, &config, || Arc::new(JsonSink::new()));
    let manifest_path = super::manifest_path(&args.manifest, &config);
    let run_options = RunOptions {
        run_id,
        started,
        parallel: 1,
        on_error: OnError::Cleanup,
        manifest: manifest_path.clone(),
        state_dir: default_state_dir(),
        skip_tests: false,
        use_cache: false,
        skip_unchanged: false,
        signer: None,
        check_reproducible: false,
    };
    let status = runtime().block_on(async move {
        let cancel = CancellationToken::new();
        let watcher = match pipeline::signals::watch(cancel.clone(), log.clone()) {
            Ok(watcher) => Some(watcher),
            Err(err) => {
                log.warn(format!(
                    "cannot watch for Ctrl-C ({err}); an interrupt will not clean up"
                ));
                None
            }
        };
        let status = pipeline::retest::run(config, run_options, log, cancel).await;
        if let Some(watcher) = watcher {
            watcher.abort();
        }
        status
    });
    if global.output == OutputFormat::Human && !global.quiet {
        summarize(status, &manifest_path);
    }
    status.exit_code()
}

fn summarize(status: RunStatus, manifest_path: &crate::manifest::Location) {
    match status {
        RunStatus::Succeeded => super::print_result(&format!(
            "all tests passed; the versions are recorded as tested in {manifest_path}"
        )),
        RunStatus::Failed => {
            eprintln!("some tests failed; those versions are recorded as failed in {manifest_path}")
        }
        RunStatus::Refused => {}
        RunStatus::Interrupted => eprintln!(
            "interrupted; cleanup is done, and versions whose tests did not finish keep their earlier status in {manifest_path}"
        ),
    }
}
