//! The command line: one file per subcommand, each a thin layer over the
//! library. Exit codes: 0 success, 1 a build failed, 2 bad usage or invalid
//! config (nothing launched), 130 interrupted.

mod build;
mod clean;
mod inspect;
mod output;
mod validate;

use crate::config::{LoadOptions, VariableInputs, variables::parse_cli_assignment};
use crate::ui::{ColorChoice, OutputFormat, Verbosity};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

pub const EXIT_OK: i32 = 0;
pub const EXIT_BUILD_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_INTERRUPTED: i32 = 130;

#[derive(Parser)]
#[command(
    name = "imgbuild",
    version,
    about = "Builds immutable, versioned machine images (QEMU, Docker, EC2) from one TOML file",
    after_help = "Exit codes: 0 success, 1 a build failed, 2 bad usage or invalid config (nothing was launched), 130 interrupted."
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: GlobalOptions,
}

#[derive(Args, Clone)]
pub struct GlobalOptions {
    /// `json` prints one JSON event per line on stdout (logs go to stderr)
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "human",
        env = "IMGBUILD_OUTPUT"
    )]
    output: OutputFormat,
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "auto",
        env = "IMGBUILD_COLOR"
    )]
    color: ColorChoice,
    /// More detail (step timings)
    #[arg(short, long, global = true, conflicts_with = "quiet")]
    verbose: bool,
    /// Only warnings, errors and results
    #[arg(short, long, global = true)]
    quiet: bool,
}

impl GlobalOptions {
    fn verbosity(&self) -> Verbosity {
        if self.quiet {
            Verbosity::Quiet
        } else if self.verbose {
            Verbosity::Verbose
        } else {
            Verbosity::Normal
        }
    }

    fn colour(&self) -> bool {
        match self.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::env::var_os("NO_COLOR").is_none()
                    && std::io::IsTerminal::is_terminal(&std::io::stderr())
            }
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Build the images a config describes
    Build(build::BuildArgs),
    /// Check a config without building anything
    Validate(validate::ValidateArgs),
    /// Show the resolved builds, provisioners, variables and outputs
    Inspect(inspect::InspectArgs),
    /// List and remove what interrupted or killed runs left behind
    Clean(clean::CleanArgs),
    /// Print the latest AMI id or artifact of a build from a manifest
    Output(output::OutputArgs),
}

/// Inputs shared by every command that reads a config.
#[derive(Args, Clone)]
pub struct ConfigArgs {
    /// The image.toml to read
    config: PathBuf,
    /// Set a variable (repeatable)
    #[arg(long = "var", value_name = "NAME=VALUE", value_parser = parse_cli_assignment)]
    vars: Vec<(String, String)>,
    /// Read variables from a TOML file of `name = "value"` lines (repeatable)
    #[arg(long = "var-file", value_name = "FILE")]
    var_files: Vec<PathBuf>,
    /// Only these builds (repeatable, or comma-separated)
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    only: Vec<String>,
    /// All builds but these (repeatable, or comma-separated)
    #[arg(
        long,
        value_name = "NAME",
        value_delimiter = ',',
        conflicts_with = "only"
    )]
    except: Vec<String>,
}

impl ConfigArgs {
    fn load_options(&self, run_id: &str, started: time::OffsetDateTime) -> LoadOptions {
        LoadOptions {
            variables: VariableInputs::from_process_env(self.vars.clone(), self.var_files.clone()),
            run_id: run_id.to_owned(),
            started,
            only: self.only.clone(),
            except: self.except.clone(),
        }
    }
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return match err.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    EXIT_OK
                }
                _ => EXIT_USAGE,
            };
        }
    };
    match cli.command {
        Command::Build(args) => build::run(args, &cli.global),
        Command::Validate(args) => validate::run(args, &cli.global),
        Command::Inspect(args) => inspect::run(args, &cli.global),
        Command::Clean(args) => clean::run(args, &cli.global),
        Command::Output(args) => output::run(args, &cli.global),
    }
}

/// A new run id: time-ordered (UUIDv7), so journals and manifest entries
/// sort by start time.
pub fn new_run_id() -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    // Short enough for container and VM names, still unique per run.
    id[..16].to_owned()
}

/// Prints a command's result on stdout. A reader that stops early (`| head`,
/// `| grep -q`) closes the pipe; that is not an error worth a panic.
fn print_result(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
}

/// Prints config problems the way the output format asks.
fn report_diagnostics(
    diagnostics: &crate::config::diagnostic::Diagnostics,
    global: &GlobalOptions,
) {
    match global.output {
        OutputFormat::Human => {
            anstream::eprintln!("{}", diagnostics.render(global.colour()));
        }
        OutputFormat::Json => {
            let problems: Vec<_> = diagnostics.iter().map(|d| d.to_json()).collect();
            print_result(
                &serde_json::json!({"event": "config_invalid", "problems": problems}).to_string(),
            );
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the async runtime starts")
}
