//! What the catalog commands do to the catalog: promote a version to a
//! channel, roll a channel back, revoke a version, choose what to retire.
//! Pure functions of the [`Manifest`], run inside
//! [`Location::modify`](crate::manifest::Location::modify) so that every
//! change applies to the catalog as it is at the moment of writing.

pub mod merge;

use crate::manifest::{
    CHANNEL_HISTORY, Channel, ChannelChange, Entry, EntryStatus, Manifest, ManifestError,
    StatusNote,
};
use imgbuild_builders::SourceIdentity;
use std::collections::BTreeSet;
use std::time::Duration;

/// Who, when and why, for a change.
#[derive(Debug, Clone)]
pub struct Change {
    pub by: String,
    pub at: String,
    pub reason: Option<String>,
}

impl Change {
    pub fn now(reason: Option<String>) -> Self {
        Change {
            by: crate::manifest::actor(),
            at: crate::pipeline::now_rfc3339(),
            reason,
        }
    }
}

/// A channel name: what fits in a file name, an SSM parameter path and a
/// Terraform variable name.
pub fn check_channel_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a channel name: use letters, digits, `-`, `_` and `.` (at most 64), e.g. `prod`"
        ))
    }
}

/// The recorded builds of `image` `version`.
pub fn version_entries<'a>(manifest: &'a Manifest, image: &str, version: &str) -> Vec<&'a Entry> {
    manifest
        .builds
        .iter()
        .filter(|e| e.image.name == image && e.image.version == version)
        .collect()
}

/// The versions of `image`, oldest first (by when their last build
/// finished).
pub fn versions(manifest: &Manifest, image: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut newest_first = Vec::new();
    for entry in manifest.builds.iter().rev() {
        if entry.image.name == image && seen.insert(entry.image.version.clone()) {
            newest_first.push(entry.image.version.clone());
        }
    }
    newest_first.reverse();
    newest_first
}

/// The image names the catalog records.
pub fn images(manifest: &Manifest) -> Vec<String> {
    let mut names: BTreeSet<String> = manifest
        .builds
        .iter()
        .map(|e| e.image.name.clone())
        .collect();
    names.extend(manifest.channels.keys().cloned());
    names.into_iter().collect()
}

/// The names an artifact is known by: its id, its files' SHA-256, and each
/// `region:ami-id` of an EC2 artifact.
fn artifact_names(entry: &Entry) -> Vec<String> {
    let mut names = vec![entry.artifact_id.clone()];
    names.extend(entry.files.iter().map(|f| f.sha256.clone()));
    if let Some(amis) = entry.details.get("amis").and_then(|a| a.as_object()) {
        names.extend(
            amis.iter()
                .filter_map(|(region, ami)| Some(format!("{region}:{}", ami.as_str()?))),
        );
    }
    names
}

/// The recorded build whose artifact `source` is, newest first: a qcow2
/// by its SHA-256, a Docker image by its id, an AMI by `region:ami-id`.
pub fn parent_of<'a>(manifest: &'a Manifest, source: &SourceIdentity) -> Option<&'a Entry> {
    let mut names = vec![source.reference.clone()];
    if let Some(sha256) = &source.sha256 {
        names.push(sha256.clone());
        names.push(format!("sha256:{sha256}"));
    }
    manifest.builds.iter().rev().find(|entry| {
        artifact_names(entry)
            .iter()
            .any(|name| names.contains(name))
    })
}

/// Why `version` of `image` may not be handed out by a channel, if it may
/// not: unknown, failed, revoked, retired, or its artifact deleted.
pub fn unpromotable(manifest: &Manifest, image: &str, version: &str) -> Option<String> {
    let entries = version_entries(manifest, image, version);
    if entries.is_empty() {
        let known = versions(manifest, image);
        return Some(if known.is_empty() {
            format!("the catalog records no version of image {image}")
        } else {
            format!(
                "the catalog records no version {version} of image {image} (it has: {})",
                known.join(", ")
            )
        });
    }
    for entry in entries {
        let build = &entry.build.name;
        let why = match entry.status {
            EntryStatus::Failed => Some("failed its tests".to_owned()),
            EntryStatus::Revoked => Some(format!("is revoked{}", entry.revocation_reason())),
            EntryStatus::Retired => Some("is retired: its artifact was removed".to_owned()),
            EntryStatus::Built | EntryStatus::Tested if entry.deleted => {
                Some("has no artifact any more (deleted)".to_owned())
            }
            EntryStatus::Built | EntryStatus::Tested => None,
        };
        if let Some(why) = why {
            return Some(format!(
                "version {version} of {image} (build {build}) {why}"
            ));
        }
    }
    None
}

/// The versions a channel held, most recent last, as its history tells:
/// a rollback undoes the promotion it went back over. A version set by
/// hand in the file (the history lags behind it) is on top.
pub fn channel_stack(channel: &Channel) -> Vec<String> {
    let mut stack: Vec<String> = Vec::new();
    for change in &channel.history {
        if change.action == "rollback" || change.action == "revoke" {
            while let Some(top) = stack.last() {
                if *top == change.version {
                    break;
                }
                stack.pop();
            }
            if stack.is_empty() {
                stack.push(change.version.clone());
            }
        } else if stack.last() != Some(&change.version) {
            stack.push(change.version.clone());
        }
    }
    if stack.last() != Some(&channel.version) {
        stack.push(channel.version.clone());
    }
    stack
}

fn push_history(channel: &mut Channel, change: ChannelChange) {
    channel.history.push(change);
    let excess = channel.history.len().saturating_sub(CHANNEL_HISTORY);
    channel.history.drain(..excess);
}

/// What a channel change did, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub image: String,
    pub channel: String,
    pub from: Option<String>,
    pub to: String,
    /// Earlier versions passed over because they cannot be handed out.
    pub skipped: Vec<String>,
}

pub fn promote(
    manifest: &mut Manifest,
    image: &str,
    version: &str,
    channel_name: &str,
    change: &Change,
) -> Result<Moved, ManifestError> {
    check_channel_name(channel_name).map_err(ManifestError::Refused)?;
    if let Some(why) = unpromotable(manifest, image, version) {
        return Err(ManifestError::Refused(format!(
            "{why}; it cannot be promoted to {channel_name}"
        )));
    }
    let record = ChannelChange {
        version: version.to_owned(),
        action: "promote".to_owned(),
        at: change.at.clone(),
        by: change.by.clone(),
        reason: change.reason.clone(),
    };
    let channels = manifest.channels.entry(image.to_owned()).or_default();
    let from = channels.get(channel_name).map(|c| c.version.clone());
    let channel = channels
        .entry(channel_name.to_owned())
        .or_insert_with(|| Channel {
            version: version.to_owned(),
            history: Vec::new(),
            ssm_parameter: None,
        });
    channel.version = version.to_owned();
    push_history(channel, record);
    Ok(Moved {
        image: image.to_owned(),
        channel: channel_name.to_owned(),
        from,
        to: version.to_owned(),
        skipped: Vec::new(),
    })
}

/// Moves `channel_name` back to the version it held before, passing over
/// versions that can no longer be handed out.
pub fn rollback(
    manifest: &mut Manifest,
    image: &str,
    channel_name: &str,
    action: &str,
    change: &Change,
) -> Result<Moved, ManifestError> {
    let channel = manifest
        .channels
        .get(image)
        .and_then(|channels| channels.get(channel_name))
        .ok_or_else(|| {
            ManifestError::Refused(format!(
                "image {image} has no channel {channel_name}{}",
                known_channels(manifest, image)
            ))
        })?;
    let mut stack = channel_stack(channel);
    let current = stack.pop().expect("the stack holds the current version");
    let mut skipped = Vec::new();
    let target = loop {
        let Some(candidate) = stack.pop() else {
            return Err(ManifestError::Refused(format!(
                "channel {channel_name} of {image} has no earlier version to go back to{}{}",
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(
                        " that can still be handed out (passed over: {})",
                        skipped.join(", ")
                    )
                },
                "; promote a version instead"
            )));
        };
        if candidate == current {
            continue;
        }
        match unpromotable(manifest, image, &candidate) {
            None => break candidate,
            Some(why) => skipped.push(format!("{candidate}: {why}")),
        }
    };
    let record = ChannelChange {
        version: target.clone(),
        action: action.to_owned(),
        at: change.at.clone(),
        by: change.by.clone(),
        reason: change.reason.clone(),
    };
    let channel = manifest
        .channels
        .get_mut(image)
        .and_then(|channels| channels.get_mut(channel_name))
        .expect("found above");
    channel.version = target.clone();
    push_history(channel, record);
    Ok(Moved {
        image: image.to_owned(),
        channel: channel_name.to_owned(),
        from: Some(current),
        to: target,
        skipped,
    })
}

fn known_channels(manifest: &Manifest, image: &str) -> String {
    match manifest.channels.get(image) {
        Some(channels) if !channels.is_empty() => format!(
            " (it has: {})",
            channels.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
        _ => " (it has none yet: `imgbuild promote` makes one)".to_owned(),
    }
}

/// The channels of `image` that hand out `version`.
pub fn channels_at(manifest: &Manifest, image: &str, version: &str) -> Vec<String> {
    manifest
        .channels
        .get(image)
        .map(|channels| {
            channels
                .iter()
                .filter(|(_, c)| c.version == version)
                .map(|(name, _)| name.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// What `revoke` did.
#[derive(Debug, Clone)]
pub struct Revoked {
    /// Channels that still hand out the revoked version (without
    /// `--move-channels`, or when nothing earlier could be handed out).
    pub still_pointing: Vec<String>,
    pub moved: Vec<Moved>,
}

pub fn revoke(
    manifest: &mut Manifest,
    image: &str,
    version: &str,
    move_channels: bool,
    change: &Change,
) -> Result<Revoked, ManifestError> {
    if version_entries(manifest, image, version).is_empty() {
        return Err(ManifestError::Refused(
            unpromotable(manifest, image, version).expect("an unknown version is unpromotable"),
        ));
    }
    for entry in manifest
        .builds
        .iter_mut()
        .filter(|e| e.image.name == image && e.image.version == version)
    {
        if entry.status == EntryStatus::Revoked {
            continue;
        }
        entry.revocation = Some(StatusNote {
            at: change.at.clone(),
            by: change.by.clone(),
            reason: change.reason.clone(),
            previous_status: entry.status,
        });
        entry.status = EntryStatus::Revoked;
    }
    let mut result = Revoked {
        still_pointing: Vec::new(),
        moved: Vec::new(),
    };
    for channel in channels_at(manifest, image, version) {
        if !move_channels {
            result.still_pointing.push(channel);
            continue;
        }
        match rollback(manifest, image, &channel, "revoke", change) {
            Ok(moved) => result.moved.push(moved),
            Err(_) => result.still_pointing.push(channel),
        }
    }
    Ok(result)
}

/// Which versions `retire` removes: every version of `image` except the
/// `keep` newest, those a channel hands out, those younger than
/// `older_than`, and those already retired. Oldest first.
pub fn retire_candidates(
    manifest: &Manifest,
    image: &str,
    keep: usize,
    older_than: Option<Duration>,
) -> Vec<String> {
    let all = versions(manifest, image);
    let kept_by_count = all.len().saturating_sub(keep);
    all.into_iter()
        .take(kept_by_count)
        .filter(|version| channels_at(manifest, image, version).is_empty())
        .filter(|version| {
            let entries = version_entries(manifest, image, version);
            let retired = entries.iter().all(|e| e.status == EntryStatus::Retired);
            let old_enough = older_than.is_none_or(|limit| {
                entries
                    .iter()
                    .all(|e| e.age().is_some_and(|age| age > limit))
            });
            !retired && old_enough
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::entry;

    fn catalog(versions: &[&str]) -> Manifest {
        let mut manifest = Manifest::default();
        for (i, version) in versions.iter().enumerate() {
            let mut e = entry("vm", version);
            e.finished_at = format!("2026-01-0{}T00:00:00Z", i + 1);
            manifest.builds.push(e);
        }
        manifest
    }

    fn change() -> Change {
        Change {
            by: "ci".into(),
            at: "2026-02-01T00:00:00Z".into(),
            reason: None,
        }
    }

    #[test]
    fn promote_refuses_failed_revoked_retired_and_unknown_versions() {
        let mut manifest = catalog(&["1", "2", "3", "4"]);
        manifest.builds[0].status = EntryStatus::Failed;
        manifest.builds[1].status = EntryStatus::Revoked;
        manifest.builds[2].status = EntryStatus::Retired;
        for (version, expected) in [
            ("1", "failed"),
            ("2", "revoked"),
            ("3", "retired"),
            ("9", "no version 9"),
        ] {
            let err = promote(&mut manifest, "img", version, "prod", &change()).unwrap_err();
            assert!(err.to_string().contains(expected), "{version}: {err}");
        }
        assert!(manifest.channels.is_empty());
        let moved = promote(&mut manifest, "img", "4", "prod", &change()).unwrap();
        assert_eq!((moved.from, moved.to.as_str()), (None, "4"));
        assert_eq!(manifest.channels["img"]["prod"].version, "4");
    }

    #[test]
    fn rollback_undoes_promotions_in_order_and_skips_revoked_versions() {
        let mut manifest = catalog(&["1", "2", "3", "4"]);
        for version in ["1", "2", "3", "4"] {
            promote(&mut manifest, "img", version, "prod", &change()).unwrap();
        }
        let back = rollback(&mut manifest, "img", "prod", "rollback", &change()).unwrap();
        assert_eq!(back.to, "3");
        // A second rollback goes further back, not forth to 4.
        manifest.builds[1].status = EntryStatus::Revoked;
        let back = rollback(&mut manifest, "img", "prod", "rollback", &change()).unwrap();
        assert_eq!(back.to, "1");
        assert_eq!(back.skipped.len(), 1, "{:?}", back.skipped);
        let err = rollback(&mut manifest, "img", "prod", "rollback", &change()).unwrap_err();
        assert!(err.to_string().contains("no earlier version"), "{err}");
    }

    #[test]
    fn a_channel_edited_by_hand_rolls_back_to_what_the_history_last_set() {
        let mut manifest = catalog(&["1", "2", "3"]);
        promote(&mut manifest, "img", "1", "prod", &change()).unwrap();
        promote(&mut manifest, "img", "2", "prod", &change()).unwrap();
        // A pull request changed the one line.
        manifest
            .channels
            .get_mut("img")
            .unwrap()
            .get_mut("prod")
            .unwrap()
            .version = "3".into();
        let back = rollback(&mut manifest, "img", "prod", "rollback", &change()).unwrap();
        assert_eq!((back.from.as_deref(), back.to.as_str()), (Some("3"), "2"));
    }

    #[test]
    fn revoke_marks_every_build_and_moves_channels_when_asked() {
        let mut manifest = catalog(&["1", "2"]);
        manifest.builds.push({
            let mut e = entry("box", "2");
            e.finished_at = "2026-01-03T00:00:00Z".into();
            e
        });
        promote(&mut manifest, "img", "1", "prod", &change()).unwrap();
        promote(&mut manifest, "img", "2", "prod", &change()).unwrap();
        promote(&mut manifest, "img", "2", "dev", &change()).unwrap();
        let revoked = revoke(&mut manifest, "img", "2", true, &change()).unwrap();
        assert!(
            version_entries(&manifest, "img", "2")
                .iter()
                .all(|e| e.status == EntryStatus::Revoked && e.revocation.is_some())
        );
        assert_eq!(manifest.channels["img"]["prod"].version, "1");
        // dev never held anything else: it still points at the revoked one.
        assert_eq!(revoked.still_pointing, vec!["dev".to_owned()]);
        assert!(promote(&mut manifest, "img", "2", "prod", &change()).is_err());
    }

    #[test]
    fn a_base_is_recognised_as_a_recorded_artifact_by_its_identity() {
        let mut manifest = catalog(&["1", "2"]);
        manifest.builds[0].files = vec![imgbuild_builders::ArtifactFile {
            path: "/out/img-1.qcow2".into(),
            size: 1,
            sha256: "ab".repeat(32),
        }];
        manifest.builds[1].artifact_id = "sha256:cd".into();
        let file = SourceIdentity {
            kind: "file".into(),
            reference: "/elsewhere/copy.qcow2".into(),
            sha256: Some("ab".repeat(32)),
        };
        assert_eq!(parent_of(&manifest, &file).unwrap().image.version, "1");
        let image = SourceIdentity {
            kind: "docker-image".into(),
            reference: "img:2".into(),
            sha256: Some("cd".into()),
        };
        assert_eq!(parent_of(&manifest, &image).unwrap().image.version, "2");
        let unrelated = SourceIdentity {
            kind: "file".into(),
            reference: "/base".into(),
            sha256: Some("ef".into()),
        };
        // `/base` is the fixture entries' own source, not an artifact.
        assert!(parent_of(&manifest, &unrelated).is_none());
    }

    #[test]
    fn retire_keeps_the_newest_and_what_channels_hand_out() {
        let mut manifest = catalog(&["1", "2", "3", "4", "5"]);
        promote(&mut manifest, "img", "2", "prod", &change()).unwrap();
        assert_eq!(retire_candidates(&manifest, "img", 2, None), vec!["1", "3"]);
        manifest.builds[0].status = EntryStatus::Retired;
        assert_eq!(retire_candidates(&manifest, "img", 2, None), vec!["3"]);
        assert_eq!(
            retire_candidates(&manifest, "img", 0, None),
            vec!["3", "4", "5"]
        );
        // Built in 2026-01: not older than 100 years.
        let century = Duration::from_secs(100 * 365 * 86_400);
        assert!(retire_candidates(&manifest, "img", 0, Some(century)).is_empty());
    }
}
