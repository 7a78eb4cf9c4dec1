//! `imgbuild merge-catalog`: git's merge driver for a committed catalog, so
//! that two branches that each recorded a build merge without a conflict.
//!
//! ```text
//! # .gitattributes
//! imgbuild-manifest.json merge=imgbuild-catalog
//! # once per clone (or in the CI's git config)
//! git config merge.imgbuild-catalog.driver "imgbuild merge-catalog %O %A %B"
//! ```

use super::{EXIT_BUILD_FAILED, EXIT_OK};
use crate::catalog::merge;
use crate::manifest;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct MergeCatalogArgs {
    /// The common ancestor's catalog (git's %O)
    base: PathBuf,
    /// Ours (git's %A): the merge is written here
    ours: PathBuf,
    /// Theirs, the branch merged in (git's %B)
    theirs: PathBuf,
}

/// Exits 0 when merged cleanly, 1 on a conflict: git then leaves the file
/// conflicted, holding our side of what conflicts and both sides'
/// everything else, for the person merging to finish.
pub fn run(args: MergeCatalogArgs) -> i32 {
    let sides = [&args.base, &args.ours, &args.theirs].map(|path| manifest::read_for_merge(path));
    let [base, ours, theirs] = match sides {
        [Ok(base), Ok(ours), Ok(theirs)] => [base, ours, theirs],
        sides => {
            for err in sides.into_iter().filter_map(Result::err) {
                eprintln!("error: {err}");
            }
            return EXIT_BUILD_FAILED;
        }
    };
    let (merged, conflicts) = merge::merge(&base, &ours, &theirs);
    if let Err(err) = manifest::save(&args.ours, &merged) {
        eprintln!("error: {err}");
        return EXIT_BUILD_FAILED;
    }
    for conflict in &conflicts {
        eprintln!("conflict: {conflict}");
    }
    if conflicts.is_empty() {
        EXIT_OK
    } else {
        EXIT_BUILD_FAILED
    }
}
