//! The command line: one file per subcommand, each a thin layer over the
//! library. Exit codes: 0 success, 1 a build failed, 2 bad usage or invalid
//! config (nothing launched), 130 interrupted.

mod build;
mod cache;
mod catalog;
mod clean;
pub mod inspect;
mod keygen;
mod merge_catalog;
mod output;
mod plan;
mod promote;
mod retire;
mod revoke;
mod rollback;
mod test;
mod validate;
mod verify;

use crate::config::{LoadOptions, VariableInputs, variables::parse_cli_assignment};
use crate::ui::{ColorChoice, OutputFormat, Verbosity};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;

pub const EXIT_OK: i32 = 0;
pub const EXIT_BUILD_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_INTERRUPTED: i32 = 130;

const EXIT_CODES_HELP: &str = "Exit codes: 0 success, 1 a build or its [[test]]s failed, 2 bad usage or invalid config (nothing was launched), 130 interrupted.";

#[derive(Parser)]
#[command(
    name = "imgbuild",
    version,
    about = "Builds immutable, versioned machine images (QEMU, Docker, EC2) from one TOML file",
    after_help = EXIT_CODES_HELP
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
    /// Say per build whether it is up to date, which step it would rebuild
    /// from and why, or that it builds from scratch; creates nothing
    Plan(plan::PlanArgs),
    /// List or prune the step cache (QEMU layers, Docker images)
    Cache(cache::CacheArgs),
    /// Run the [[test]]s again on a version the manifest records, and
    /// record the new verdict
    Test(test::TestArgs),
    /// Make the key pair that signs provenance and checksum files
    Keygen(keygen::KeygenArgs),
    /// Check a recorded version against its signed provenance
    Verify(verify::VerifyArgs),
    /// List the versions of each image with their statuses and channels
    Catalog(catalog::CatalogArgs),
    /// Point a channel (dev, prod, ...) at a version
    Promote(promote::PromoteArgs),
    /// Move a channel back to the version it held before
    Rollback(rollback::RollbackArgs),
    /// Mark a version as never to be handed out or built upon again
    Revoke(revoke::RevokeArgs),
    /// Remove the artifacts of old versions no channel hands out
    Retire(retire::RetireArgs),
    /// Merge two branches' catalogs (git's merge driver: %O %A %B)
    MergeCatalog(merge_catalog::MergeCatalogArgs),
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

/// The log a command's events go to: the human UI for the config's builds,
/// or, with `--output json`, what `json` makes.
fn event_log(
    global: &GlobalOptions,
    config: &crate::config::Config,
    json: impl FnOnce() -> std::sync::Arc<dyn imgbuild_core::EventSink>,
) -> imgbuild_core::BuildLog {
    let names: Vec<String> = config.builds.iter().map(|b| b.name.clone()).collect();
    let sink: std::sync::Arc<dyn imgbuild_core::EventSink> = match global.output {
        crate::ui::OutputFormat::Human => std::sync::Arc::new(crate::ui::HumanSink::new(
            global.color.to_anstream(),
            global.verbosity(),
            &names,
        )),
        crate::ui::OutputFormat::Json => json(),
    };
    imgbuild_core::BuildLog::root(sink, config.redactor.clone())
}

/// `--manifest`, else `IMGBUILD_MANIFEST`, else the manifest beside the
/// config.
fn manifest_path(
    given: &Option<crate::manifest::Location>,
    config: &crate::config::Config,
) -> crate::manifest::Location {
    given.clone().unwrap_or_else(|| {
        crate::manifest::Location::File(crate::manifest::default_path(&config.dir))
    })
}

/// The builder and provisioner types, read from their registries so help
/// lists exactly what this imgbuild has.
pub fn kinds_help() -> String {
    let mut text = String::from("Builder types ([builders.NAME] type = ...):\n");
    for kind in imgbuild_builders::registry::BUILDERS {
        text.push_str(&format!("  {:<14} {}\n", kind.name(), kind.summary()));
    }
    text.push_str("Provisioner types ([[provision]] type = ...):\n");
    for kind in imgbuild_provisioners::PROVISIONERS {
        text.push_str(&format!("  {:<14} {}\n", kind.name(), kind.summary()));
    }
    text
}

pub fn main() -> i32 {
    let command = Cli::command().after_long_help(format!("{}\n{EXIT_CODES_HELP}", kinds_help()));
    let parsed = command
        .try_get_matches()
        .and_then(|matches| Cli::from_arg_matches(&matches));
    let cli = match parsed {
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
        Command::Plan(args) => plan::run(args, &cli.global),
        Command::Cache(args) => cache::run(args, &cli.global),
        Command::Test(args) => test::run(args, &cli.global),
        Command::Keygen(args) => keygen::run(args, &cli.global),
        Command::Verify(args) => verify::run(args, &cli.global),
        Command::Catalog(args) => catalog::run(args, &cli.global),
        Command::Promote(args) => promote::run(args, &cli.global),
        Command::Rollback(args) => rollback::run(args, &cli.global),
        Command::Revoke(args) => revoke::run(args, &cli.global),
        Command::Retire(args) => retire::run(args, &cli.global),
        Command::MergeCatalog(args) => merge_catalog::run(args),
    }
}

/// A new run id: 12 hex digits of Unix milliseconds, so ids sort by start time,
/// then 16 hex digits (64 bits) from the OS's CSPRNG (a v4 UUID's random
/// bytes), so nobody can guess the id, and with it the names of the run's
/// containers, work directories and key pairs, before they exist. 28
/// characters: still short enough for container and VM names.
pub fn new_run_id() -> String {
    let millis = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    run_id_from(millis as u64, uuid::Uuid::new_v4().as_bytes())
}

fn run_id_from(millis: u64, random: &[u8; 16]) -> String {
    // A v4 UUID fixes its version and variant bits in bytes 6 and 8; bytes
    // 0..6 and 9..11 are untouched: 64 random bits.
    let mut bits = [0u8; 8];
    bits[..6].copy_from_slice(&random[..6]);
    bits[6..].copy_from_slice(&random[9..11]);
    let random = u64::from_be_bytes(bits);
    format!("{:012x}{random:016x}", millis & 0xffff_ffff_ffff)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_time_ordered_with_64_random_bits() {
        let id = new_run_id();
        assert_eq!(id.len(), 28, "{id}");
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
        let millis = u64::from_str_radix(&id[..12], 16).unwrap();
        let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        assert!(now as u64 - millis < 60_000, "the prefix is the time: {id}");

        // Every one of the 64 bits of the random part comes from the random
        // bytes, none from the UUID's fixed version and variant bits.
        let ones = uuid::Builder::from_random_bytes([0xff; 16]).into_uuid();
        let zeros = uuid::Builder::from_random_bytes([0; 16]).into_uuid();
        assert_eq!(&run_id_from(1, ones.as_bytes())[12..], "ffffffffffffffff");
        assert_eq!(&run_id_from(1, zeros.as_bytes())[12..], "0000000000000000");
        assert!(run_id_from(0x0123_4567_89ab, zeros.as_bytes()).starts_with("0123456789ab"));

        // Two ids of the same millisecond still differ.
        let same_time: std::collections::BTreeSet<String> = (0..1000)
            .map(|_| run_id_from(7, uuid::Uuid::new_v4().as_bytes()))
            .collect();
        assert_eq!(same_time.len(), 1000);
    }
}
