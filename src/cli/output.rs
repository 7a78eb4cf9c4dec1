//! `imgbuild output`: reads the manifest and prints what the next tool
//! needs — the latest AMI id or artifact of a build, or a Terraform
//! variables file.

use super::{EXIT_OK, EXIT_USAGE, GlobalOptions};
use crate::manifest;
use crate::outputs;
use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// The bare id: an AMI id for EC2 builds, the artifact id otherwise
    Id,
    /// The whole latest manifest entry of the build
    Json,
    /// A Terraform `*.auto.tfvars.json` for the latest entry of every build
    Tfvars,
}

#[derive(Args)]
pub struct OutputArgs {
    /// The manifest to read
    #[arg(default_value = manifest::DEFAULT_FILE_NAME)]
    manifest: PathBuf,
    /// The build (required when the manifest holds several)
    #[arg(long, value_name = "NAME")]
    build: Option<String>,
    /// For EC2 builds: the AMI in this region (default: the build's own)
    #[arg(long, value_name = "REGION")]
    region: Option<String>,
    #[arg(long, value_enum, default_value = "id")]
    format: Format,
    /// Hand out a version whose [[test]]s failed (refused otherwise)
    #[arg(long)]
    allow_failed: bool,
}

pub fn run(args: OutputArgs, _global: &GlobalOptions) -> i32 {
    match render(&args) {
        Ok(text) => {
            super::print_result(&text);
            EXIT_OK
        }
        Err(message) => {
            eprintln!("error: {message}");
            EXIT_USAGE
        }
    }
}

fn render(args: &OutputArgs) -> Result<String, String> {
    let manifest = manifest::read(&args.manifest).map_err(|err| err.to_string())?;
    if manifest.builds.is_empty() {
        return Err(format!("{} records no builds yet", args.manifest.display()));
    }
    if args.format == Format::Tfvars {
        return serde_json::to_string_pretty(&outputs::tfvars(&manifest, args.allow_failed)?)
            .map_err(|e| e.to_string());
    }
    let latest = outputs::latest_by_build(&manifest);
    let entry = match &args.build {
        Some(build) => latest.get(build).copied().ok_or_else(|| {
            format!(
                "{} has no build named `{build}`; it has: {}",
                args.manifest.display(),
                latest.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?,
        None if latest.len() == 1 => *latest.values().next().expect("one entry"),
        None => {
            return Err(format!(
                "{} holds several builds ({}); choose one with --build",
                args.manifest.display(),
                latest.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    };
    outputs::check_usable(entry, args.allow_failed)?;
    match args.format {
        Format::Id => outputs::artifact_for(entry, args.region.as_deref()),
        Format::Json => serde_json::to_string_pretty(entry).map_err(|e| e.to_string()),
        Format::Tfvars => unreachable!("handled above"),
    }
}
