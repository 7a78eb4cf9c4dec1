//! `imgbuild output`: reads the manifest and prints what the next tool
//! needs — the latest AMI id or artifact of a build, or a Terraform
//! variables file.

use super::{EXIT_OK, EXIT_USAGE, GlobalOptions};
use crate::manifest;
use crate::outputs;
use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// The bare id: an AMI id for EC2 builds, the artifact id otherwise
    Id,
    /// The whole latest manifest entry of the build
    Json,
    /// A Terraform `*.auto.tfvars.json` for the latest entry of every build
    Tfvars,
    /// The pushed image's pinned reference, `repository@sha256:...`
    Digest,
    /// The build's SBOM document: SPDX, or CycloneDX when only that was
    /// written
    Sbom,
    /// The build's SPDX 2.3 SBOM
    Spdx,
    /// The build's CycloneDX 1.5 SBOM
    Cyclonedx,
}

#[derive(Args)]
pub struct OutputArgs {
    /// The catalog to read: a file or s3://BUCKET/KEY
    #[arg(
        default_value = manifest::DEFAULT_FILE_NAME,
        env = "IMGBUILD_MANIFEST",
        value_name = "MANIFEST"
    )]
    manifest: manifest::Location,
    /// The image (required when the catalog holds several)
    #[arg(long, value_name = "NAME")]
    image: Option<String>,
    /// The version this channel hands out, instead of the latest
    #[arg(long, value_name = "NAME")]
    channel: Option<String>,
    /// The build (required when the version has several)
    #[arg(long, value_name = "NAME")]
    build: Option<String>,
    /// For EC2 builds: the AMI in this region (default: the build's own)
    #[arg(long, value_name = "REGION")]
    region: Option<String>,
    #[arg(long, value_enum, default_value = "id")]
    format: Format,
    /// With `--format digest`: the repository pushed to (default: the first)
    #[arg(long, value_name = "REPOSITORY")]
    repository: Option<String>,
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
    let manifest = super::runtime()
        .block_on(args.manifest.read())
        .map_err(|err| err.to_string())?;
    if manifest.builds.is_empty() {
        return Err(format!("{} records no builds yet", args.manifest));
    }
    let images = crate::catalog::images(&manifest);
    let image = match &args.image {
        Some(image) if !images.contains(image) => {
            return Err(format!(
                "{} records no image {image} (it has: {})",
                args.manifest,
                images.join(", ")
            ));
        }
        Some(image) => Some(image.as_str()),
        None if images.len() == 1 => Some(images[0].as_str()),
        None if args.channel.is_some() => {
            return Err(format!(
                "{} holds several images ({}); choose one with --image",
                args.manifest,
                images.join(", ")
            ));
        }
        None => None,
    };
    let selected = match (&args.channel, image) {
        (Some(channel), Some(image)) => outputs::on_channel(&manifest, image, channel)?,
        _ => outputs::latest_by_build(&manifest, image),
    };
    if args.format == Format::Tfvars {
        return serde_json::to_string_pretty(&outputs::tfvars(&selected, args.allow_failed)?)
            .map_err(|e| e.to_string());
    }
    let entry = match &args.build {
        Some(build) => selected.get(build).copied().ok_or_else(|| {
            format!(
                "{} has no build named `{build}` here; it has: {}",
                args.manifest,
                selected.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })?,
        None if selected.len() == 1 => *selected.values().next().expect("one entry"),
        None => {
            return Err(format!(
                "{} holds several builds ({}); choose one with --build",
                args.manifest,
                selected.keys().cloned().collect::<Vec<_>>().join(", ")
            ));
        }
    };
    outputs::check_usable(entry, args.allow_failed)?;
    match args.format {
        Format::Id => outputs::artifact_for(entry, args.region.as_deref()),
        Format::Json => serde_json::to_string_pretty(entry).map_err(|e| e.to_string()),
        Format::Digest => outputs::digest_for(entry, args.repository.as_deref()),
        Format::Sbom => outputs::sbom_for(entry, None),
        Format::Spdx => outputs::sbom_for(entry, Some("spdx")),
        Format::Cyclonedx => outputs::sbom_for(entry, Some("cyclonedx")),
        Format::Tfvars => unreachable!("handled above"),
    }
}
