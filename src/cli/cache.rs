//! `imgbuild cache ls` and `imgbuild cache prune`: what the step cache
//! holds (QEMU layers in the step store, Docker images in the engine) and
//! how to make room.

use super::{EXIT_OK, GlobalOptions, print_result, runtime};
use crate::ui::OutputFormat;
use clap::{Args, Subcommand};
use imgbuild_builders::common::step_store::{Entry, StepStore};
use imgbuild_builders::docker::step_cache::{self, CachedImage};
use std::path::PathBuf;
use std::time::Duration;

const EXIT_FAILED: i32 = 1;

#[derive(Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
    /// The step store [default: IMGBUILD_CACHE_DIR, else ~/.cache/imgbuild/steps]
    #[arg(long, value_name = "DIR", global = true)]
    dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CacheCommand {
    /// List the kept steps: key, image, step, size, age, hits
    Ls,
    /// Remove kept steps: all of them, those unused for a while, or the
    /// least recently used until the rest fit
    Prune {
        /// Keep at most this much in the step store ("20G")
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_size: Option<u64>,
        /// Remove what was last used longer ago than this ("7d")
        #[arg(long, value_name = "AGE", value_parser = imgbuild_core::duration::parse)]
        older_than: Option<Duration>,
        /// Remove everything
        #[arg(long, conflicts_with_all = ["max_size", "older_than"])]
        all: bool,
        /// Say what would go, remove nothing
        #[arg(long)]
        dry_run: bool,
    },
}

fn parse_size(text: &str) -> Result<u64, String> {
    imgbuild_core::ByteSize::parse(text).map(|size| size.bytes())
}

pub fn run(args: CacheArgs, global: &GlobalOptions) -> i32 {
    let store = StepStore::at(args.dir.clone().unwrap_or_else(StepStore::default_root));
    // A machine without Docker still has a step store to list.
    let images = runtime().block_on(step_cache::list_cached());
    match args.command {
        CacheCommand::Ls => list(&store, images, global),
        CacheCommand::Prune {
            max_size,
            older_than,
            all,
            dry_run,
        } => prune(&store, images, max_size, older_than, all, dry_run, global),
    }
}

fn list(
    store: &StepStore,
    images: Result<Vec<CachedImage>, String>,
    global: &GlobalOptions,
) -> i32 {
    let entries = store.list();
    let (images, docker_error) = match images {
        Ok(images) => (images, None),
        Err(err) => (Vec::new(), Some(err)),
    };
    match global.output {
        OutputFormat::Json => print_result(
            &serde_json::json!({
                "store": store.root(),
                "entries": entries,
                "docker": images,
                "docker_error": docker_error,
            })
            .to_string(),
        ),
        OutputFormat::Human => {
            let mut text = format!("step store {}:\n", store.root().display());
            if entries.is_empty() {
                text.push_str("  (empty)\n");
            }
            for entry in &entries {
                text.push_str(&format!(
                    "  {}  {}/{}  {}  {} MiB  used {}  {} hit(s)\n",
                    &entry.key[..entry.key.len().min(16)],
                    entry.info.image,
                    entry.info.build,
                    entry.info.step,
                    entry.size >> 20,
                    entry.last_used,
                    entry.hits
                ));
            }
            match &docker_error {
                Some(err) => text.push_str(&format!("docker: {err}\n")),
                None => {
                    text.push_str(&format!(
                        "docker images {}:*:\n",
                        step_cache::CACHE_REPOSITORY
                    ));
                    if images.is_empty() {
                        text.push_str("  (none)\n");
                    }
                    for image in &images {
                        text.push_str(&format!(
                            "  {}  build {}  {} MiB  created {}\n",
                            &image.key[..image.key.len().min(16)],
                            image.build.as_deref().unwrap_or("?"),
                            image.size >> 20,
                            time::OffsetDateTime::from_unix_timestamp(image.created)
                                .ok()
                                .and_then(|t| t
                                    .format(&time::format_description::well_known::Rfc3339)
                                    .ok())
                                .unwrap_or_default()
                        ));
                    }
                }
            }
            print_result(text.trim_end());
        }
    }
    EXIT_OK
}

fn prune(
    store: &StepStore,
    images: Result<Vec<CachedImage>, String>,
    max_size: Option<u64>,
    older_than: Option<Duration>,
    all: bool,
    dry_run: bool,
    global: &GlobalOptions,
) -> i32 {
    if max_size.is_none() && older_than.is_none() && !all {
        eprintln!("error: say what to prune: --max-size SIZE, --older-than AGE or --all");
        return super::EXIT_USAGE;
    }
    let chosen: Vec<Entry> = store.select_for_prune(max_size, older_than, all);
    // Docker's kept steps share layers, so their sizes do not add up: they
    // go by age or all at once, not by size.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut failed = false;
    let doomed_images: Vec<CachedImage> = match images {
        Ok(images) => images
            .into_iter()
            .filter(|image| {
                all || older_than
                    .is_some_and(|limit| now.saturating_sub(image.created) > limit.as_secs() as i64)
            })
            .collect(),
        Err(err) => {
            if all || older_than.is_some() {
                eprintln!("warning: {err}; Docker's kept steps were left alone");
            }
            Vec::new()
        }
    };
    if !dry_run {
        for entry in &chosen {
            store.remove(&entry.key);
        }
        if all {
            store.remove_base_links();
        }
        let results = runtime().block_on(async {
            let mut results = Vec::new();
            for image in &doomed_images {
                results.push((
                    image.key.clone(),
                    step_cache::remove_cached(&image.key).await,
                ));
            }
            results
        });
        for (key, result) in results {
            if let Err(err) = result {
                eprintln!("error: cached step {key}: {err}");
                failed = true;
            }
        }
    }
    let freed: u64 = chosen.iter().map(|e| e.size).sum();
    let verb = if dry_run { "would remove" } else { "removed" };
    match global.output {
        OutputFormat::Json => print_result(
            &serde_json::json!({
                "dry_run": dry_run,
                "entries": chosen,
                "docker": doomed_images,
                "freed_bytes": freed,
            })
            .to_string(),
        ),
        OutputFormat::Human => print_result(&format!(
            "{verb} {} step store entr{} ({} MiB) and {} Docker image(s)",
            chosen.len(),
            if chosen.len() == 1 { "y" } else { "ies" },
            freed >> 20,
            doomed_images.len()
        )),
    }
    if failed { EXIT_FAILED } else { EXIT_OK }
}
