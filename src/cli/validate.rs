//! `imgbuild validate`: everything `build` checks before launching, and
//! nothing else.

use super::{ConfigArgs, EXIT_OK, EXIT_USAGE, GlobalOptions, new_run_id, report_diagnostics};
use crate::config;
use crate::ui::OutputFormat;
use clap::Args;

#[derive(Args)]
pub struct ValidateArgs {
    #[command(flatten)]
    config: ConfigArgs,
}

pub fn run(args: ValidateArgs, global: &GlobalOptions) -> i32 {
    let options = args
        .config
        .load_options(&new_run_id(), time::OffsetDateTime::now_utc());
    match config::load(&args.config.config, &options) {
        Ok(config) => {
            match global.output {
                OutputFormat::Human => {
                    if !global.quiet {
                        let names: Vec<&str> =
                            config.builds.iter().map(|b| b.name.as_str()).collect();
                        super::print_result(&format!(
                            "{} is valid: image {} {}, builds: {}",
                            config.path.display(),
                            config.image.name,
                            config.image.version,
                            names.join(", ")
                        ));
                    }
                }
                OutputFormat::Json => super::print_result(
                    &serde_json::json!({"event": "config_valid", "config": config.path})
                        .to_string(),
                ),
            }
            EXIT_OK
        }
        Err(diagnostics) => {
            report_diagnostics(&diagnostics, global);
            EXIT_USAGE
        }
    }
}
