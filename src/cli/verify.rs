//! `imgbuild verify`: checks a recorded version against its signed
//! provenance: the envelope's signature, that it names this artifact, the
//! artifact's bytes, and the checksum file's signature.

use super::{EXIT_BUILD_FAILED, EXIT_OK, EXIT_USAGE, GlobalOptions};
use crate::attest::{PublicKey, verify};
use crate::manifest::{self, Entry, Location};
use crate::ui::OutputFormat;
use clap::Args;

#[derive(Args)]
pub struct VerifyArgs {
    /// The manifest (a file, or s3://bucket/key)
    #[arg(default_value = manifest::DEFAULT_FILE_NAME)]
    manifest: Location,
    /// The build (required when the manifest holds several)
    #[arg(long, value_name = "NAME")]
    build: Option<String>,
    /// The version to check [default: the build's latest]
    #[arg(long, value_name = "V")]
    version: Option<String>,
    /// The public key (imgbuild.pub from `imgbuild keygen`, or its RW...
    /// line)
    #[arg(long, value_name = "PUBLIC_KEY")]
    key: String,
}

pub fn run(args: VerifyArgs, global: &GlobalOptions) -> i32 {
    let key = match PublicKey::load(&args.key) {
        Ok(key) => key,
        Err(err) => {
            eprintln!("error: --key: {err}");
            return EXIT_USAGE;
        }
    };
    let manifest = match super::runtime().block_on(args.manifest.read()) {
        Ok(manifest) => manifest,
        Err(err) => {
            eprintln!("error: {err}");
            return EXIT_USAGE;
        }
    };
    let entry = match select(&manifest, &args) {
        Ok(entry) => entry,
        Err(message) => {
            eprintln!("error: {message}");
            return EXIT_USAGE;
        }
    };
    let report = verify::verify(entry, &key);
    match global.output {
        OutputFormat::Json => {
            super::print_result(&serde_json::to_string(&report).expect("reports serialize"))
        }
        OutputFormat::Human => super::print_result(&verify::render(&report)),
    }
    if report.verified {
        EXIT_OK
    } else {
        EXIT_BUILD_FAILED
    }
}

/// The entry of `--build` (or the only build) at `--version` (or its
/// latest).
fn select<'a>(manifest: &'a manifest::Manifest, args: &VerifyArgs) -> Result<&'a Entry, String> {
    let mut builds: Vec<&str> = manifest
        .builds
        .iter()
        .map(|e| e.build.name.as_str())
        .collect();
    builds.sort_unstable();
    builds.dedup();
    let build = match (&args.build, builds.as_slice()) {
        (_, []) => return Err(format!("{} records no builds", args.manifest)),
        (Some(build), _) => build.as_str(),
        (None, [only]) => only,
        (None, several) => {
            return Err(format!(
                "{} holds several builds ({}); choose one with --build",
                args.manifest,
                several.join(", ")
            ));
        }
    };
    let mut of_build = manifest
        .builds
        .iter()
        .rev()
        .filter(|e| e.build.name == build)
        .peekable();
    if of_build.peek().is_none() {
        return Err(format!(
            "{} has no build named `{build}`; it has: {}",
            args.manifest,
            builds.join(", ")
        ));
    }
    match &args.version {
        None => Ok(of_build.next().expect("peeked")),
        Some(version) => of_build
            .find(|e| &e.image.version == version)
            .ok_or_else(|| {
                format!(
                    "{} records no version {version} of build `{build}`",
                    args.manifest
                )
            }),
    }
}
