//! `imgbuild catalog`: the versions of each image with their statuses,
//! channels and ages; and what every catalog command shares.

use super::{EXIT_BUILD_FAILED, EXIT_OK, EXIT_USAGE, GlobalOptions, print_result, runtime};
use crate::catalog;
use crate::manifest::{self, Location, Manifest, ManifestError};
use crate::ui::OutputFormat;
use clap::Args;
use imgbuild_builders::registry;
use serde_json::json;

/// Where the catalog is, for commands that read no config.
#[derive(Args, Clone)]
pub struct CatalogLocation {
    /// The catalog: a file or s3://BUCKET/KEY
    #[arg(
        long,
        value_name = "PATH|s3://BUCKET/KEY",
        env = "IMGBUILD_MANIFEST",
        default_value = manifest::DEFAULT_FILE_NAME
    )]
    pub manifest: Location,
}

#[derive(Args)]
pub struct CatalogArgs {
    /// Only this image
    image: Option<String>,
    #[command(flatten)]
    location: CatalogLocation,
}

/// The exit code for a catalog command that failed with `err`: a refusal
/// is a usage error (nothing changed), anything else a failure.
pub fn exit_for(err: &ManifestError) -> i32 {
    eprintln!("error: {err}");
    match err {
        ManifestError::Refused(_) => EXIT_USAGE,
        _ => EXIT_BUILD_FAILED,
    }
}

pub fn run(args: CatalogArgs, global: &GlobalOptions) -> i32 {
    let manifest = match runtime().block_on(args.location.manifest.read()) {
        Ok(manifest) => manifest,
        Err(err) => return exit_for(&err),
    };
    let images: Vec<String> = match &args.image {
        Some(image) => {
            if !catalog::images(&manifest).contains(image) {
                eprintln!(
                    "error: {} records no image {image} (it has: {})",
                    args.location.manifest,
                    catalog::images(&manifest).join(", ")
                );
                return EXIT_USAGE;
            }
            vec![image.clone()]
        }
        None => catalog::images(&manifest),
    };
    match global.output {
        OutputFormat::Json => print_result(&to_json(&manifest, &images).to_string()),
        OutputFormat::Human => print_result(&table(&manifest, &images)),
    }
    EXIT_OK
}

fn to_json(manifest: &Manifest, images: &[String]) -> serde_json::Value {
    let images: Vec<_> = images
        .iter()
        .map(|image| {
            let versions: Vec<_> = catalog::versions(manifest, image)
                .iter()
                .map(|version| {
                    let entries = catalog::version_entries(manifest, image, version);
                    json!({
                        "version": version,
                        "channels": catalog::channels_at(manifest, image, version),
                        "builds": entries.iter().map(|e| json!({
                            "build": e.build.name,
                            "type": e.build.kind,
                            "status": e.status.as_str(),
                            "artifact_id": e.artifact_id,
                            "finished_at": e.finished_at,
                            "parent": e.parent,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            json!({
                "image": image,
                "channels": manifest.channels.get(image).map(|channels| {
                    channels.iter().map(|(name, c)| (name.clone(), json!(c.version))).collect::<serde_json::Map<_, _>>()
                }).unwrap_or_default(),
                "versions": versions,
            })
        })
        .collect();
    json!({ "images": images })
}

fn table(manifest: &Manifest, images: &[String]) -> String {
    let mut rows = vec![[
        "IMAGE".to_owned(),
        "VERSION".to_owned(),
        "BUILD".to_owned(),
        "STATUS".to_owned(),
        "CHANNELS".to_owned(),
        "AGE".to_owned(),
        "ARTIFACT".to_owned(),
    ]];
    for image in images {
        for version in catalog::versions(manifest, image) {
            let channels = catalog::channels_at(manifest, image, &version).join(",");
            for entry in catalog::version_entries(manifest, image, &version) {
                rows.push([
                    image.clone(),
                    version.clone(),
                    entry.build.name.clone(),
                    entry.status.as_str().to_owned(),
                    channels.clone(),
                    entry.age().map(short_age).unwrap_or_else(|| "?".into()),
                    entry.artifact_id.clone(),
                ]);
            }
        }
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|row| {
            row.iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn short_age(age: std::time::Duration) -> String {
    let secs = age.as_secs();
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    }
}

/// Prints what a channel change did.
pub fn report_moved(moved: &catalog::Moved, global: &GlobalOptions) {
    for skipped in &moved.skipped {
        eprintln!("passed over {skipped}");
    }
    match global.output {
        OutputFormat::Json => print_result(
            &json!({
                "image": moved.image,
                "channel": moved.channel,
                "from": moved.from,
                "to": moved.to,
                "skipped": moved.skipped,
            })
            .to_string(),
        ),
        OutputFormat::Human => print_result(&format!(
            "{} {}: {} -> {}",
            moved.image,
            moved.channel,
            moved.from.as_deref().unwrap_or("(new channel)"),
            moved.to
        )),
    }
}

/// Publishes what `channel` of `image` now hands out to the SSM parameter
/// the channel names, if it names one: the catalog was written first, so
/// on failure it is right and the parameter is stale, which the message
/// says with the command that publishes again.
pub async fn publish(
    location: &Location,
    image: &str,
    channel: &str,
) -> Result<Vec<String>, String> {
    let manifest = location.read().await.map_err(|err| err.to_string())?;
    let Some(pointed) = manifest.channels.get(image).and_then(|c| c.get(channel)) else {
        return Ok(Vec::new());
    };
    let Some(parameter) = &pointed.ssm_parameter else {
        return Ok(Vec::new());
    };
    let entries: Vec<_> = catalog::version_entries(&manifest, image, &pointed.version)
        .into_iter()
        .filter_map(|e| Some((e, registry::find(&e.build.kind)?)))
        .filter(|(_, kind)| kind.publishes_channels())
        .collect();
    if entries.is_empty() {
        return Err(format!(
            "channel {channel} of {image} is published to SSM ({parameter}), but version {} has no EC2 build to publish",
            pointed.version
        ));
    }
    let several = entries.len() > 1;
    let mut published = Vec::new();
    for (entry, kind) in entries {
        let name = if several {
            format!("{parameter}/{}", entry.build.name)
        } else {
            parameter.clone()
        };
        let recorded = registry::RecordedArtifact {
            build: &entry.build.name,
            version: &entry.image.version,
            artifact_id: &entry.artifact_id,
            details: &entry.details,
        };
        published.extend(kind.publish_channel(&recorded, &name).await.map_err(|err| {
            format!(
                "{err}; the catalog already says {channel} = {}: run `imgbuild promote {image} {} --channel {channel}` again to publish it",
                pointed.version, pointed.version
            )
        })?);
    }
    Ok(published)
}

/// Publishes the channels a command moved, reporting each parameter set;
/// the exit code for the command.
pub fn publish_moved(location: &Location, moved: &[&catalog::Moved]) -> i32 {
    let mut code = EXIT_OK;
    for moved in moved {
        match runtime().block_on(publish(location, &moved.image, &moved.channel)) {
            Ok(published) => {
                for line in published {
                    eprintln!("published {line}");
                }
            }
            Err(err) => {
                eprintln!("error: {err}");
                code = EXIT_BUILD_FAILED;
            }
        }
    }
    code
}
