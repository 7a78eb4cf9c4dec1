//! What a build would do now, compared with its latest recorded version:
//! nothing (same inputs), its steps from some point on, or everything.
//! Resolves each base afresh and creates nothing.

use super::keys::{BuildSteps, StepRecord};
use super::{inputs, request_for};
use crate::config::{Build, Config};
use crate::manifest::{self, Entry, EntryStatus, Manifest};
use imgbuild_builders::{BuildError, SourceIdentity};
use imgbuild_core::{OnError, StepContext};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Same inputs (version aside) as a recorded, usable version.
    UpToDate {
        version: String,
        artifact_id: String,
    },
    /// The first `from_step` provisioners (1-based: the step that reruns)
    /// are unchanged.
    Rebuild {
        from_step: usize,
        reasons: Vec<String>,
    },
    /// Nothing can be reused: no earlier version, a new base, new builder
    /// settings.
    Build { reasons: Vec<String> },
}

#[derive(Debug, Clone, Serialize)]
pub struct StepPlan {
    pub provisioner: String,
    pub cacheable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BuildPlan {
    pub build: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub source: SourceIdentity,
    #[serde(flatten)]
    pub action: Action,
    pub steps: Vec<StepPlan>,
}

impl BuildPlan {
    pub fn needs_work(&self) -> bool {
        !matches!(self.action, Action::UpToDate { .. })
    }
}

/// Which of the build's provisioner steps the step cache can hold, and why
/// not: what `plan` and `inspect` show.
pub fn cacheability(build: &Build) -> Vec<StepPlan> {
    let keeps_steps = build.builder.cache_settings().is_some();
    let mut earlier_uncached = false;
    build
        .provisioners
        .iter()
        .zip(&build.steps)
        .map(|(provisioner, source)| {
            let why_not = if !keeps_steps {
                Some(format!(
                    "the {} builder keeps no steps here",
                    build.builder.kind()
                ))
            } else if let Some(why) = &source.uncacheable {
                Some(why.clone())
            } else if earlier_uncached {
                Some("an earlier step is not cached".to_owned())
            } else {
                None
            };
            earlier_uncached |= why_not.is_some();
            StepPlan {
                provisioner: provisioner.describe(),
                cacheable: why_not.is_none(),
                why_not,
            }
        })
        .collect()
}

pub async fn plan_build(
    config: &Config,
    build: &Build,
    existing: &Manifest,
    cx: &StepContext,
) -> Result<BuildPlan, BuildError> {
    let request = request_for(config, build, OnError::Cleanup);
    let source = build.builder.resolve_source(&request, cx).await?;
    let steps = BuildSteps::of(build, config).map_err(|err| {
        BuildError::Refused(format!(
            "cannot hash the files the provisioners read: {err}"
        ))
    })?;
    let settings = build.builder.cache_settings();
    let records = steps.keyed(build.builder.kind(), settings.as_ref(), &source);
    let step_plans = cacheability(build);
    let (_, unversioned) = inputs::hashes(config, build, &source)
        .await
        .map_err(|err| {
            BuildError::Refused(format!("cannot hash the build's input files: {err}"))
        })?;
    let latest = manifest::latest(existing, &config.image.name, &build.name);
    let action = match latest {
        None => Action::Build {
            reasons: vec![format!(
                "no version of build {} is recorded yet",
                build.name
            )],
        },
        Some(latest) => compare(latest, &unversioned, &source, &records),
    };
    Ok(BuildPlan {
        build: build.name.clone(),
        kind: build.builder.kind().to_owned(),
        source,
        action,
        steps: step_plans,
    })
}

fn compare(
    latest: &Entry,
    unversioned: &str,
    source: &SourceIdentity,
    records: &[StepRecord],
) -> Action {
    let version = &latest.image.version;
    let usable =
        matches!(latest.status, EntryStatus::Built | EntryStatus::Tested) && !latest.deleted;
    if latest.unversioned_inputs_sha256 == unversioned && usable {
        return Action::UpToDate {
            version: version.clone(),
            artifact_id: latest.artifact_id.clone(),
        };
    }
    if latest.source.content() != source.content() {
        return Action::Build {
            reasons: vec![format!(
                "the base changed since version {version}: {} → {}",
                describe_source(&latest.source),
                describe_source(source)
            )],
        };
    }
    let mut reasons = Vec::new();
    if !usable {
        reasons.push(format!(
            "version {version} is {}",
            if latest.deleted {
                "deleted"
            } else {
                latest.status.as_str()
            }
        ));
    }
    if latest.steps.is_empty() && !records.is_empty() {
        reasons.push(format!(
            "version {version} records no step keys (built by an older imgbuild)"
        ));
        return Action::Build { reasons };
    }
    let first_key_change = records
        .iter()
        .zip(&latest.steps)
        .position(|(now, then)| now.key.is_none() || now.key != then.key)
        .or((records.len() != latest.steps.len()).then(|| records.len().min(latest.steps.len())));
    match first_key_change {
        Some(index) => {
            // The first step's key changed, but not the step itself: what
            // comes before it did, the builder's disk-shaping settings.
            if index == 0
                && let (Some(now), Some(then)) = (records.first(), latest.steps.first())
                && now.key.is_some()
                && now.config == then.config
                && now.files == then.files
            {
                reasons.push(format!(
                    "the builder settings that shape the disk changed since version {version}"
                ));
                return Action::Build { reasons };
            }
            reasons.extend(step_changes(
                records.get(index),
                latest.steps.get(index),
                index,
            ));
            Action::Rebuild {
                from_step: index + 1,
                reasons,
            }
        }
        None => {
            reasons.push(format!(
                "every provisioner step is as in version {version}; settings outside the steps changed (tests, outputs, labels or the machine's size)"
            ));
            Action::Rebuild {
                from_step: records.len() + 1,
                reasons,
            }
        }
    }
}

fn describe_source(source: &SourceIdentity) -> String {
    match &source.sha256 {
        Some(sha) => format!(
            "{} (sha256 {})",
            source.reference,
            &sha[..sha.len().min(12)]
        ),
        None => source.reference.clone(),
    }
}

/// What differs between a step now and the same step in the recorded
/// version: fields with their old and new values, files with their hashes.
fn step_changes(now: Option<&StepRecord>, then: Option<&StepRecord>, index: usize) -> Vec<String> {
    let step = index + 1;
    match (now, then) {
        (Some(now), None) => vec![format!("step {step} ({}) is new", now.provisioner)],
        (None, Some(then)) => vec![format!("step {step} ({}) was removed", then.provisioner)],
        (None, None) => Vec::new(),
        (Some(now), Some(then)) => {
            let mut reasons = Vec::new();
            if let Some(why) = &now.uncacheable {
                reasons.push(format!(
                    "step {step} ({}) is never cached: {why}",
                    now.provisioner
                ));
            }
            diff_json(&then.config, &now.config, "", &mut |field, old, new| {
                reasons.push(format!(
                    "step {step} ({}): {field} changed: {old} → {new}",
                    now.provisioner
                ));
            });
            for (path, hash) in &now.files {
                match then.files.get(path) {
                    Some(old) if old == hash => {}
                    Some(old) => reasons.push(format!(
                        "step {step} ({}): file {path} changed: sha256 {} → {}",
                        now.provisioner,
                        &old[..12.min(old.len())],
                        &hash[..12.min(hash.len())]
                    )),
                    None => reasons.push(format!(
                        "step {step} ({}): file {path} is new",
                        now.provisioner
                    )),
                }
            }
            for path in then.files.keys().filter(|p| !now.files.contains_key(*p)) {
                reasons.push(format!(
                    "step {step} ({}): file {path} is no longer read",
                    now.provisioner
                ));
            }
            if reasons.is_empty() {
                reasons.push(format!(
                    "step {step} ({}) changed in a sensitive value, or an earlier step's key changed",
                    now.provisioner
                ));
            }
            reasons
        }
    }
}

fn diff_json(
    old: &serde_json::Value,
    new: &serde_json::Value,
    path: &str,
    report: &mut dyn FnMut(&str, String, String),
) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let field = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                diff_json(
                    a.get(key).unwrap_or(&Value::Null),
                    b.get(key).unwrap_or(&Value::Null),
                    &field,
                    report,
                );
            }
        }
        (a, b) if a != b => report(path, a.to_string(), b.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(provisioner: &str, key: &str, config: serde_json::Value) -> StepRecord {
        StepRecord {
            provisioner: provisioner.into(),
            key: Some(key.into()),
            config,
            files: Default::default(),
            uncacheable: None,
        }
    }

    #[test]
    fn the_first_changed_step_is_named_with_its_old_and_new_value() {
        let mut latest = manifest::tests::entry("box", "1");
        latest.unversioned_inputs_sha256 = "old".into();
        latest.steps = vec![
            record("shell", "k1", serde_json::json!({"inline": ["a"]})),
            record("shell", "k2", serde_json::json!({"inline": ["b"]})),
        ];
        let now = vec![
            record("shell", "k1", serde_json::json!({"inline": ["a"]})),
            record("shell", "k2b", serde_json::json!({"inline": ["c"]})),
        ];
        match compare(&latest, "new", &latest.source.clone(), &now) {
            Action::Rebuild { from_step, reasons } => {
                assert_eq!(from_step, 2);
                assert!(
                    reasons.iter().any(|r| r.contains("inline")
                        && r.contains("[\"b\"]")
                        && r.contains("[\"c\"]")),
                    "{reasons:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            compare(&latest, "old", &latest.source.clone(), &now),
            Action::UpToDate { .. }
        ));
        let mut new_base = latest.source.clone();
        new_base.sha256 = Some("feedface".into());
        assert!(matches!(
            compare(&latest, "new", &new_base, &now),
            Action::Build { .. }
        ));
    }
}
