//! `imgbuild build`: validate, then build every selected image version.

use super::{ConfigArgs, EXIT_USAGE, GlobalOptions, new_run_id, report_diagnostics, runtime};
use crate::config;

use crate::pipeline::{self, RunOptions, RunStatus};
use crate::ui::{JsonSink, OutputFormat};
use clap::{Args, ValueEnum};
use imgbuild_core::journal::default_state_dir;
use imgbuild_core::{CancellationToken, OnError};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnErrorArg {
    /// Remove everything the failed build created
    Cleanup,
    /// Leave the machine running for debugging; `imgbuild clean` removes it later
    Abort,
}

#[derive(Args)]
pub struct BuildArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// How many builds run at once [default: all]
    #[arg(long, value_name = "N")]
    parallel: Option<usize>,
    /// What happens to a failed build's machine
    #[arg(long, value_enum, default_value = "cleanup")]
    on_error: OnErrorArg,
    /// Where to record artifacts [default: imgbuild-manifest.json beside the config]
    #[arg(long, value_name = "PATH|s3://BUCKET/KEY", env = "IMGBUILD_MANIFEST")]
    manifest: Option<crate::manifest::Location>,
    /// Record the artifacts without running their [[test]]s (for
    /// emergencies; the manifest entry says the tests were skipped)
    #[arg(long)]
    skip_tests: bool,
    /// Take no provisioner step from the step cache and add none to it
    #[arg(long, env = "IMGBUILD_NO_CACHE")]
    no_cache: bool,
    /// Build nothing for a build whose inputs (its version aside) equal
    /// those of its latest recorded version, which then stands (see
    /// `max_age`)
    #[arg(long)]
    skip_unchanged: bool,
    /// Sign each version's provenance (a DSSE envelope) and checksum file
    /// (a .minisig) with this key from `imgbuild keygen`; the variable may
    /// also hold the key file's text. An encrypted key is decrypted with
    /// IMGBUILD_SIGNING_KEY_PASSWORD, or asked for on the terminal
    #[arg(
        long,
        value_name = "FILE",
        env = "IMGBUILD_SIGNING_KEY",
        hide_env_values = true
    )]
    sign_key: Option<String>,
    /// Build each version twice from the same inputs, without the step
    /// cache, and record whether the two artifacts, and the files of the
    /// two machines, are identical (QEMU and Docker builds). The first
    /// build's artifact is deleted; the second is tested and recorded
    #[arg(long)]
    check_reproducible: bool,
}

pub fn run(args: BuildArgs, global: &GlobalOptions) -> i32 {
    let run_id = new_run_id();
    let started = time::OffsetDateTime::now_utc();
    let options = args.config.load_options(&run_id, started);
    let config = match config::load(&args.config.config, &options) {
        Ok(config) => config,
        Err(diagnostics) => {
            report_diagnostics(&diagnostics, global);
            return EXIT_USAGE;
        }
    };
    if args.parallel == Some(0) {
        eprintln!("error: --parallel must be at least 1");
        return EXIT_USAGE;
    }
    // Before anything is launched: a key that cannot be used fails the run
    // now, not after an hour of building.
    let signer = match args.sign_key.as_deref().filter(|k| !k.is_empty()) {
        None => None,
        Some(spec) => match crate::attest::SigningKey::load(spec) {
            Ok(key) => Some(Arc::new(key)),
            Err(err) => {
                eprintln!("error: --sign-key: {err}");
                return EXIT_USAGE;
            }
        },
    };
    if args.check_reproducible
        && let Some(build) = config
            .builds
            .iter()
            .find(|build| !matches!(build.builder.kind(), "qemu" | "docker"))
    {
        eprintln!(
            "error: --check-reproducible: build `{}` is a {} build; only QEMU and Docker builds can be built twice and compared (an AMI's files cannot be listed without launching it again); leave it out with --except {}",
            build.name,
            build.builder.kind(),
            build.name
        );
        return EXIT_USAGE;
    }
    let log = super::event_log(global, &config, || Arc::new(JsonSink::new()));
    let manifest_path = super::manifest_path(&args.manifest, &config);
    let run_options = RunOptions {
        run_id,
        started,
        parallel: args.parallel.unwrap_or(config.builds.len()),
        on_error: match args.on_error {
            OnErrorArg::Cleanup => OnError::Cleanup,
            OnErrorArg::Abort => OnError::Abort,
        },
        manifest: manifest_path.clone(),
        state_dir: default_state_dir(),
        skip_tests: args.skip_tests,
        // Both builds must run every provisioner to measure anything.
        use_cache: !args.no_cache && !args.check_reproducible,
        skip_unchanged: args.skip_unchanged,
        signer,
        check_reproducible: args.check_reproducible,
    };
    let quiet = global.quiet;
    let output = global.output;
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
        let status = pipeline::run(config, run_options, log, cancel).await;
        if let Some(watcher) = watcher {
            watcher.abort();
        }
        status
    });
    if output == OutputFormat::Human && !quiet {
        summarize(status, &manifest_path);
    }
    status.exit_code()
}

fn summarize(status: RunStatus, manifest_path: &crate::manifest::Location) {
    match status {
        RunStatus::Succeeded => {
            super::print_result(&format!(
                "all builds finished; artifacts are recorded in {}",
                manifest_path
            ));
        }
        RunStatus::Failed => eprintln!(
            "some builds failed; successful ones, and artifacts that failed their tests, are recorded in {}",
            manifest_path
        ),
        RunStatus::Refused => {}
        RunStatus::Interrupted => eprintln!("interrupted; cleanup is done"),
    }
}
