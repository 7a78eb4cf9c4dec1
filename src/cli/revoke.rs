//! `imgbuild revoke`: a version is never handed out or built upon again.

use super::catalog::{CatalogLocation, exit_for, publish_moved, report_moved};
use super::{GlobalOptions, print_result, runtime};
use crate::catalog::{self, Change};
use crate::ui::OutputFormat;
use clap::Args;

#[derive(Args)]
pub struct RevokeArgs {
    image: String,
    version: String,
    /// Why (a CVE, a broken package): kept with the version
    #[arg(long)]
    reason: String,
    /// Roll back every channel that hands out the version
    #[arg(long)]
    move_channels: bool,
    #[command(flatten)]
    location: CatalogLocation,
}

pub fn run(args: RevokeArgs, global: &GlobalOptions) -> i32 {
    let change = Change::now(Some(args.reason.clone()));
    let result = runtime().block_on(args.location.manifest.modify(|manifest| {
        catalog::revoke(
            manifest,
            &args.image,
            &args.version,
            args.move_channels,
            &change,
        )
    }));
    let revoked = match result {
        Ok(revoked) => revoked,
        Err(err) => return exit_for(&err),
    };
    for moved in &revoked.moved {
        report_moved(moved, global);
    }
    if global.output == OutputFormat::Json {
        print_result(
            &serde_json::json!({
                "image": args.image,
                "revoked": args.version,
                "still_pointing": revoked.still_pointing,
            })
            .to_string(),
        );
    } else {
        print_result(&format!("{} {}: revoked", args.image, args.version));
    }
    if !revoked.still_pointing.is_empty() {
        eprintln!(
            "warning: channel(s) {} of {} still point at the revoked version {}{}; `imgbuild output --channel` refuses it until the channel moves",
            revoked.still_pointing.join(", "),
            args.image,
            args.version,
            if args.move_channels {
                " (they held no earlier version that can still be handed out): promote another version"
            } else {
                ": roll them back (`imgbuild rollback`, or revoke with --move-channels)"
            }
        );
    }
    publish_moved(
        &args.location.manifest,
        &revoked.moved.iter().collect::<Vec<_>>(),
    )
}
