//! `imgbuild rollback`: moves a channel back to the version it held before.

use super::catalog::{CatalogLocation, exit_for, publish_moved, report_moved};
use super::{GlobalOptions, runtime};
use crate::catalog::{self, Change};
use clap::Args;

#[derive(Args)]
pub struct RollbackArgs {
    image: String,
    /// The channel to move back
    #[arg(long)]
    channel: String,
    /// Why, for the channel's history
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    location: CatalogLocation,
}

pub fn run(args: RollbackArgs, global: &GlobalOptions) -> i32 {
    let change = Change::now(args.reason.clone());
    let result = runtime().block_on(args.location.manifest.modify(|manifest| {
        catalog::rollback(manifest, &args.image, &args.channel, "rollback", &change)
    }));
    match result {
        Ok(moved) => {
            report_moved(&moved, global);
            publish_moved(&args.location.manifest, &[&moved])
        }
        Err(err) => exit_for(&err),
    }
}
