//! A three-way merge of catalog files, for git's merge driver
//! (`imgbuild merge-catalog %O %A %B`). Two branches that each recorded a
//! build append to the end of the same `builds` list, which a line merge
//! always reports as a conflict; merged as data, builds are a set keyed by
//! image, version and build, and only two different changes to the same
//! entry or channel conflict.

use crate::manifest::{CHANNEL_HISTORY, Channel, Entry, Manifest};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// What both sides changed differently; the merged catalog keeps ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict(pub String);

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

type Key = (String, String, String);

fn key(entry: &Entry) -> Key {
    (
        entry.image.name.clone(),
        entry.image.version.clone(),
        entry.build.name.clone(),
    )
}

/// Equal as recorded (the types carry free-form JSON, so compared as it).
fn same<T: Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// The three-way pick: the side that changed, or either when both made the
/// same change; `None` when they changed it differently.
fn pick<'a, T: Serialize>(base: Option<&T>, ours: &'a T, theirs: &'a T) -> Option<&'a T> {
    if same(ours, theirs) || base.is_some_and(|base| same(base, theirs)) {
        Some(ours)
    } else if base.is_some_and(|base| same(base, ours)) {
        Some(theirs)
    } else {
        None
    }
}

/// Merges `theirs` into `ours`, given their common ancestor `base`.
/// Builds: ours in their order, then theirs that ours lacks; an entry
/// changed on one side takes that change, and one removed on one side and
/// left alone on the other goes. Channels: the same per channel, except
/// that two sides pointing a channel at the same version keep one history
/// of both sides' changes.
pub fn merge(base: &Manifest, ours: &Manifest, theirs: &Manifest) -> (Manifest, Vec<Conflict>) {
    let mut conflicts = Vec::new();
    let base_builds: BTreeMap<Key, &Entry> = base.builds.iter().map(|e| (key(e), e)).collect();
    let their_builds: BTreeMap<Key, &Entry> = theirs.builds.iter().map(|e| (key(e), e)).collect();
    let our_keys: BTreeSet<Key> = ours.builds.iter().map(key).collect();

    let mut builds = Vec::new();
    for entry in &ours.builds {
        let k = key(entry);
        let base_entry = base_builds.get(&k).copied();
        match their_builds.get(&k) {
            Some(their_entry) => match pick(base_entry, entry, *their_entry) {
                Some(chosen) => builds.push(chosen.clone()),
                None => {
                    conflicts.push(Conflict(format!(
                        "build {} of {} version {} was changed differently on both sides",
                        k.2, k.0, k.1
                    )));
                    builds.push(entry.clone());
                }
            },
            // Removed by them: gone, unless we changed it meanwhile.
            None => match base_entry {
                Some(base_entry) if same(base_entry, entry) => {}
                _ => builds.push(entry.clone()),
            },
        }
    }
    for entry in &theirs.builds {
        let k = key(entry);
        if our_keys.contains(&k) {
            continue;
        }
        // Removed by us: gone, unless they changed it meanwhile.
        match base_builds.get(&k) {
            Some(base_entry) if same(*base_entry, entry) => {}
            _ => builds.push(entry.clone()),
        }
    }

    let mut channels: BTreeMap<String, BTreeMap<String, Channel>> = BTreeMap::new();
    let names: BTreeSet<(&String, &String)> = [ours, theirs]
        .iter()
        .flat_map(|side| {
            side.channels
                .iter()
                .flat_map(|(image, channels)| channels.keys().map(move |name| (image, name)))
        })
        .collect();
    for (image, name) in names {
        let of = |side: &Manifest| side.channels.get(image).and_then(|c| c.get(name)).cloned();
        let (base_channel, our_channel, their_channel) = (of(base), of(ours), of(theirs));
        let merged = match (our_channel, their_channel) {
            (Some(our_channel), Some(their_channel)) => {
                match pick(base_channel.as_ref(), &our_channel, &their_channel) {
                    Some(chosen) => Some(chosen.clone()),
                    None if our_channel.version == their_channel.version => {
                        Some(join_histories(our_channel, &their_channel))
                    }
                    None => {
                        conflicts.push(Conflict(format!(
                            "channel {name} of {image} was moved on both sides: to {} here, to {} on the branch merged in; promote the one that should win after the merge",
                            our_channel.version, their_channel.version
                        )));
                        Some(our_channel)
                    }
                }
            }
            // A channel one side made, or one side removed and the other
            // left alone.
            (Some(only), None) | (None, Some(only)) => match &base_channel {
                Some(base_channel) if same(base_channel, &only) => None,
                _ => Some(only),
            },
            (None, None) => None,
        };
        if let Some(channel) = merged {
            channels
                .entry(image.clone())
                .or_default()
                .insert(name.clone(), channel);
        }
    }

    let merged = Manifest {
        format_version: ours.format_version.max(theirs.format_version),
        builds,
        channels,
    };
    (merged, conflicts)
}

/// One history of both sides' changes, in time order, without repeats.
fn join_histories(mut ours: Channel, theirs: &Channel) -> Channel {
    for change in &theirs.history {
        if !ours.history.contains(change) {
            ours.history.push(change.clone());
        }
    }
    ours.history.sort_by(|a, b| a.at.cmp(&b.at));
    let excess = ours.history.len().saturating_sub(CHANNEL_HISTORY);
    ours.history.drain(..excess);
    if ours.ssm_parameter.is_none() {
        ours.ssm_parameter = theirs.ssm_parameter.clone();
    }
    ours
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{self, Change};
    use crate::manifest::tests::entry;

    fn change(at: &str) -> Change {
        Change {
            at: at.to_owned(),
            by: "ci".to_owned(),
            reason: Some("test".to_owned()),
        }
    }

    fn catalog(versions: &[&str]) -> Manifest {
        Manifest {
            builds: versions.iter().map(|v| entry("vm", v)).collect(),
            ..Manifest::default()
        }
    }

    fn versions(manifest: &Manifest) -> Vec<&str> {
        manifest
            .builds
            .iter()
            .map(|e| e.image.version.as_str())
            .collect()
    }

    #[test]
    fn builds_recorded_on_both_branches_are_all_kept() {
        let base = catalog(&["1"]);
        let ours = catalog(&["1", "2"]);
        let theirs = catalog(&["1", "3"]);
        let (merged, conflicts) = merge(&base, &ours, &theirs);
        assert!(conflicts.is_empty(), "{conflicts:?}");
        assert_eq!(versions(&merged), ["1", "2", "3"]);
    }

    #[test]
    fn a_change_on_one_side_wins_and_different_changes_conflict() {
        let mut base = catalog(&["1", "2"]);
        catalog::promote(
            &mut base,
            "img",
            "1",
            "prod",
            &change("2026-01-01T00:00:00Z"),
        )
        .unwrap();
        // They revoke 1 (prod stays on it: no --move-channels); we
        // promote 2 to dev.
        let mut theirs = base.clone();
        catalog::revoke(
            &mut theirs,
            "img",
            "1",
            false,
            &change("2026-01-02T00:00:00Z"),
        )
        .unwrap();
        let mut ours = base.clone();
        catalog::promote(
            &mut ours,
            "img",
            "2",
            "dev",
            &change("2026-01-03T00:00:00Z"),
        )
        .unwrap();
        let (merged, conflicts) = merge(&base, &ours, &theirs);
        assert!(conflicts.is_empty(), "{conflicts:?}");
        assert_eq!(
            merged.builds[0].status,
            crate::manifest::EntryStatus::Revoked
        );
        assert_eq!(merged.channels["img"]["dev"].version, "2");
        assert_eq!(merged.channels["img"]["prod"].version, "1");

        // Both move prod, to different versions: a conflict, ours kept.
        let mut ours_prod = base.clone();
        catalog::promote(
            &mut ours_prod,
            "img",
            "2",
            "prod",
            &change("2026-01-04T00:00:00Z"),
        )
        .unwrap();
        let mut theirs_prod = catalog(&["1", "2", "3"]);
        theirs_prod.channels = base.channels.clone();
        catalog::promote(
            &mut theirs_prod,
            "img",
            "3",
            "prod",
            &change("2026-01-05T00:00:00Z"),
        )
        .unwrap();
        let (merged, conflicts) = merge(&base, &ours_prod, &theirs_prod);
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert!(
            conflicts[0].0.contains("channel prod of img"),
            "{}",
            conflicts[0]
        );
        assert_eq!(merged.channels["img"]["prod"].version, "2");
        assert_eq!(versions(&merged), ["1", "2", "3"]);
    }

    #[test]
    fn the_same_promotion_on_both_sides_keeps_both_histories() {
        let base = catalog(&["1", "2"]);
        let mut ours = base.clone();
        catalog::promote(
            &mut ours,
            "img",
            "2",
            "prod",
            &change("2026-01-02T00:00:00Z"),
        )
        .unwrap();
        let mut theirs = base.clone();
        catalog::promote(
            &mut theirs,
            "img",
            "2",
            "prod",
            &change("2026-01-01T00:00:00Z"),
        )
        .unwrap();
        let (merged, conflicts) = merge(&base, &ours, &theirs);
        assert!(conflicts.is_empty(), "{conflicts:?}");
        let history: Vec<&str> = merged.channels["img"]["prod"]
            .history
            .iter()
            .map(|c| c.at.as_str())
            .collect();
        assert_eq!(history, ["2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z"]);
    }
}
