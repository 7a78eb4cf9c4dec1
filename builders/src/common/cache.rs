//! Step keys: what identifies the machine's state after each provisioner,
//! so a later build with the same inputs can start from a kept state
//! instead of redoing the work.
//!
//! The first key covers what shapes the machine's disk before any
//! provisioner ran: the builder type, the settings that shape the disk (not
//! memory, CPUs or timeouts) and the base's identity. Each provisioner's key
//! chains the previous key with that provisioner's digest (its resolved
//! config and the content of the files it reads). A step that cannot be
//! cached ends the chain: a kept state is only ever used for a prefix of
//! identical steps.

use crate::SourceIdentity;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Bumped when what a key covers, or how a kept state is stored, changes:
/// old entries then simply stop matching.
const KEY_SCHEME: &str = "imgbuild-step-key-v2";

/// One provisioner as the cache sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StepInput {
    /// SHA-256 over the step's resolved config (sensitive values entering
    /// only as hashes) and the content of every local file it reads.
    pub digest: String,
    /// Why this step is never cached (`cache = false`, a per-run value in
    /// its config); `None` when it may be.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uncacheable: Option<String>,
}

/// What a build hands its builder about the cache.
#[derive(Debug, Clone, Default)]
pub struct StepCache {
    /// One per provisioner, in order.
    pub steps: Vec<StepInput>,
    /// False with `--no-cache`, and in builds that only test or plan.
    pub enabled: bool,
    /// `[cache] dir`; the store's default place otherwise.
    pub store_root: Option<std::path::PathBuf>,
    /// `[cache] shared` (or `IMGBUILD_CACHE_SHARED`): the object store the
    /// step store is shared through with other runners.
    pub shared: Option<String>,
}

impl StepCache {
    /// Where files kept under step keys live (QEMU disk layers).
    pub fn store(&self) -> crate::common::step_store::StepStore {
        crate::common::step_store::StepStore::at(
            self.store_root
                .clone()
                .unwrap_or_else(crate::common::step_store::StepStore::default_root),
        )
        .shared_with(self.shared.clone())
    }

    /// The key after each provisioner, `None` from the first one that cannot
    /// be cached onward.
    pub fn keys(
        &self,
        kind: &str,
        settings: &serde_json::Value,
        source: &SourceIdentity,
    ) -> Vec<Option<String>> {
        chain(&base_key(kind, settings, source), &self.steps)
    }
}

/// What the store's record calls the state kept under `key`: "step 2
/// (shell (setup.sh))", by the key's place in `keys` (`fallback` when it is
/// not there) and `descriptions`, one per provisioner.
pub fn step_label(
    keys: &[Option<String>],
    descriptions: &[String],
    key: &str,
    fallback: usize,
) -> (usize, String) {
    let index = keys
        .iter()
        .position(|known| known.as_deref() == Some(key))
        .unwrap_or(fallback);
    let label = match descriptions.get(index) {
        Some(described) => format!("step {} ({described})", index + 1),
        None => format!("step {}", index + 1),
    };
    (index, label)
}

/// The key of the machine before any provisioner ran.
pub fn base_key(kind: &str, settings: &serde_json::Value, source: &SourceIdentity) -> String {
    let document = serde_json::json!({
        "scheme": KEY_SCHEME,
        "builder": kind,
        "settings": settings,
        "source": source.content(),
    });
    digest_json(&document)
}

/// The key after each step: `sha256(previous key, step digest)`, `None` from
/// the first uncacheable step onward.
pub fn chain(base_key: &str, steps: &[StepInput]) -> Vec<Option<String>> {
    let mut previous = Some(base_key.to_owned());
    steps
        .iter()
        .map(|step| {
            previous = match (&previous, &step.uncacheable) {
                (Some(key), None) => {
                    let mut hasher = Sha256::new();
                    hasher.update(key.as_bytes());
                    hasher.update(b"\n");
                    hasher.update(step.digest.as_bytes());
                    Some(hex::encode(hasher.finalize()))
                }
                _ => None,
            };
            previous.clone()
        })
        .collect()
}

/// SHA-256 of a JSON value's canonical text (serde_json keeps object keys
/// sorted, so equal values hash equal).
pub fn digest_json(value: &serde_json::Value) -> String {
    let bytes = serde_json::to_vec(value).expect("json values serialize");
    hex::encode(Sha256::digest(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(sha: &str) -> SourceIdentity {
        SourceIdentity {
            kind: "file".into(),
            reference: "base.qcow2".into(),
            sha256: Some(sha.into()),
        }
    }

    fn step(digest: &str) -> StepInput {
        StepInput {
            digest: digest.into(),
            uncacheable: None,
        }
    }

    #[test]
    fn a_changed_step_changes_its_key_and_every_later_one_only() {
        let base = base_key("qemu", &serde_json::json!({"disk_size": 1}), &source("a"));
        let before = chain(&base, &[step("1"), step("2"), step("3")]);
        let after = chain(&base, &[step("1"), step("2b"), step("3")]);
        assert_eq!(before[0], after[0]);
        assert_ne!(before[1], after[1]);
        assert_ne!(before[2], after[2]);
        assert!(before.iter().all(Option::is_some));
    }

    #[test]
    fn a_new_base_or_disk_setting_changes_every_key() {
        let steps = [step("1"), step("2")];
        let settings = serde_json::json!({"disk_size": 1});
        let old = chain(&base_key("qemu", &settings, &source("a")), &steps);
        let new_base = chain(&base_key("qemu", &settings, &source("b")), &steps);
        let new_size = chain(
            &base_key("qemu", &serde_json::json!({"disk_size": 2}), &source("a")),
            &steps,
        );
        for index in 0..2 {
            assert_ne!(old[index], new_base[index]);
            assert_ne!(old[index], new_size[index]);
        }
    }

    #[test]
    fn the_same_base_at_another_path_or_url_keeps_every_key() {
        let settings = serde_json::json!({"disk_size": 1});
        let here = base_key("qemu", &settings, &source("a"));
        let elsewhere = SourceIdentity {
            kind: "url".into(),
            reference: "https://mirror.example/base.qcow2".into(),
            ..source("a")
        };
        assert_eq!(here, base_key("qemu", &settings, &elsewhere));
        // Without a hash, the base is only known by its name.
        let ami = |id: &str| SourceIdentity {
            kind: "ami".into(),
            reference: id.into(),
            sha256: None,
        };
        assert_ne!(
            base_key("ec2", &settings, &ami("ami-1")),
            base_key("ec2", &settings, &ami("ami-2"))
        );
    }

    #[test]
    fn an_uncacheable_step_ends_the_chain() {
        let base = base_key("docker", &serde_json::Value::Null, &source("a"));
        let mut middle = step("2");
        middle.uncacheable = Some("cache = false".into());
        let keys = chain(&base, &[step("1"), middle, step("3")]);
        assert!(keys[0].is_some());
        assert_eq!(keys[1], None);
        assert_eq!(keys[2], None);
    }
}
