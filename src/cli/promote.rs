//! `imgbuild promote`: points a channel at a version.

use super::catalog::{CatalogLocation, exit_for, publish_moved, report_moved};
use super::{EXIT_BUILD_FAILED, EXIT_USAGE, GlobalOptions, runtime};
use crate::catalog::{self, Change};
use clap::Args;
use imgbuild_builders::registry;

#[derive(Args)]
pub struct PromoteArgs {
    image: String,
    version: String,
    /// The channel to point at the version (made if new)
    #[arg(long)]
    channel: String,
    /// Why, for the channel's history
    #[arg(long)]
    reason: Option<String>,
    /// Also publish the channel's AMI ids as this SSM parameter in every
    /// region, now and on every later change of the channel [default name:
    /// /images/<image>/<channel>]
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "")]
    ssm: Option<String>,
    /// Promote without checking that the version's artifacts still exist
    /// (for a machine that cannot reach where they are kept)
    #[arg(long)]
    no_artifact_check: bool,
    #[command(flatten)]
    location: CatalogLocation,
}

pub fn run(args: PromoteArgs, global: &GlobalOptions) -> i32 {
    let change = Change::now(args.reason.clone());
    let ssm = args.ssm.as_ref().map(|name| {
        if name.is_empty() {
            format!("/images/{}/{}", args.image, args.channel)
        } else {
            name.clone()
        }
    });
    if !args.no_artifact_check
        && let Err(code) = runtime().block_on(check_artifacts(&args))
    {
        return code;
    }
    let result = runtime().block_on(args.location.manifest.modify(|manifest| {
        let moved = catalog::promote(manifest, &args.image, &args.version, &args.channel, &change)?;
        if let Some(parameter) = &ssm
            && let Some(channel) = manifest
                .channels
                .get_mut(&args.image)
                .and_then(|c| c.get_mut(&args.channel))
        {
            channel.ssm_parameter = Some(parameter.clone());
        }
        Ok(moved)
    }));
    match result {
        Ok(moved) => {
            report_moved(&moved, global);
            publish_moved(&args.location.manifest, &[&moved])
        }
        Err(err) => exit_for(&err),
    }
}

/// Refuses a version whose artifact is gone (removed by hand, its tag
/// deleted, its AMI deregistered): a channel must never hand out something
/// that cannot start. Versions promote refuses anyway are left to it.
async fn check_artifacts(args: &PromoteArgs) -> Result<(), i32> {
    let manifest = args
        .location
        .manifest
        .read()
        .await
        .map_err(|err| exit_for(&err))?;
    if catalog::unpromotable(&manifest, &args.image, &args.version).is_some() {
        return Ok(());
    }
    let mut missing = Vec::new();
    for entry in catalog::version_entries(&manifest, &args.image, &args.version) {
        let Some(kind) = registry::find(&entry.build.kind) else {
            continue;
        };
        match kind.missing(&entry.artifact()).await {
            Ok(gone) => missing.extend(
                gone.into_iter()
                    .map(|what| format!("build {}: {what}", entry.build.name)),
            ),
            Err(err) => {
                eprintln!(
                    "error: cannot check that version {} of {} still exists (build {}): {err}; run again when it can be reached, or pass --no-artifact-check to promote without looking",
                    args.version, args.image, entry.build.name
                );
                return Err(EXIT_BUILD_FAILED);
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "error: version {} of {} cannot be promoted: its artifact is gone:\n  {}\nbuild a new version, or `imgbuild revoke` this one so that nothing hands it out",
        args.version,
        args.image,
        missing.join("\n  ")
    );
    Err(EXIT_USAGE)
}
