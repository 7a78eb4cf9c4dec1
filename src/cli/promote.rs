//! `imgbuild promote`: points a channel at a version.

use super::catalog::{CatalogLocation, exit_for, publish_moved, report_moved};
use super::{GlobalOptions, runtime};
use crate::catalog::{self, Change};
use clap::Args;

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
