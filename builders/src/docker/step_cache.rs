//! The Docker step cache: the container committed after each cacheable
//! provisioner, as `imgbuild-cache:<key>` in the same engine, found again
//! by key. A build starts its container from the longest cached prefix of
//! its steps and runs only the rest.
//!
//! A kept image carries its key as a label; one whose label does not match
//! the tag it was found under (a tag moved by hand, a corrupt store) is
//! reported, untagged and rebuilt, never used. Two builds keeping the same
//! key at once both succeed: the tag ends on one of two images with the
//! same content.
//!
//! With a shared step cache (`[cache] shared`), each kept image is also
//! saved (`docker save`) into the shared store, and a build whose engine
//! lacks a longer prefix fetches it from there and loads it. An archive is
//! loaded only if the one tag it sets is the cache tag of its key: a
//! shared store can never move another tag in the engine.
//!
//! Uses `state.base`. Produces `state.cache` (the keys, how many steps the
//! container starts past), which the create-container and provision steps
//! read.

use super::DockerState;
use super::config::DockerConfig;
use super::engine::{self, ImageApi};
use super::plan::Plan;
use super::step_commit::image_config;
use crate::common::cache::{StepCache, step_label};
use crate::common::step_provision::KeepsSteps;
use crate::common::step_store::{EntryInfo, StepStore};
use async_trait::async_trait;
use bollard::models::ContainerConfig;
use bollard::query_parameters::{CommitContainerOptions, RemoveImageOptions};
use imgbuild_core::{Event, Step, StepContext, StepError};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

/// The repository kept steps are tagged in.
pub const CACHE_REPOSITORY: &str = "imgbuild-cache";
/// The label a kept image carries its key in.
pub const KEY_LABEL: &str = "org.imgbuild.step-key";

/// The settings of a Docker build that shape what its provisioners do to
/// the container's filesystem; `None` when its steps cannot be kept.
pub fn cache_settings(config: &DockerConfig) -> Option<serde_json::Value> {
    // What a mounted volume holds is part of no key, and a provisioner may
    // copy from it: such builds keep no steps.
    if !config.volumes.is_empty() {
        return None;
    }
    Some(serde_json::json!({
        "platform": config.platform,
        "privileged": config.privileged,
        "env": config.env,
        "run_command": config.run_command,
    }))
}

/// One kept step in the engine, as `imgbuild cache ls` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CachedImage {
    pub key: String,
    pub image_id: String,
    /// The image's size as the engine reports it (layers shared with the
    /// base and other steps included).
    pub size: u64,
    /// Unix seconds.
    pub created: i64,
    /// The run that kept it.
    pub run_id: Option<String>,
    pub build: Option<String>,
}

/// Every kept step in the engine `DOCKER_HOST` names, oldest first.
pub async fn list_cached() -> Result<Vec<CachedImage>, String> {
    let engine = super::engine::Engine::connect().await?;
    let options = bollard::query_parameters::ListImagesOptions {
        filters: Some(HashMap::from([(
            "reference".to_owned(),
            vec![format!("{CACHE_REPOSITORY}:*")],
        )])),
        ..Default::default()
    };
    let images = engine
        .quick()
        .list_images(Some(options))
        .await
        .map_err(|err| format!("cannot list the cached steps: {}", engine::describe(&err)))?;
    let mut cached: Vec<CachedImage> = images
        .into_iter()
        .flat_map(|image| {
            let labels = image.labels.clone();
            image
                .repo_tags
                .iter()
                .filter_map(|tag| tag.strip_prefix(&format!("{CACHE_REPOSITORY}:")))
                .map(|key| CachedImage {
                    key: key.to_owned(),
                    image_id: image.id.clone(),
                    size: u64::try_from(image.size).unwrap_or_default(),
                    created: image.created,
                    run_id: labels.get(super::RUN_ID_LABEL).cloned(),
                    build: labels.get(super::BUILD_LABEL).cloned(),
                })
                .collect::<Vec<_>>()
        })
        .collect();
    cached.sort_by(|a, b| a.created.cmp(&b.created).then(a.key.cmp(&b.key)));
    Ok(cached)
}

/// Untags a kept step (the engine removes the image once no tag or
/// container uses it).
pub async fn remove_cached(key: &str) -> Result<(), String> {
    let engine = super::engine::Engine::connect().await?;
    super::remove_image(&engine, &reference(key)).await
}

fn reference(key: &str) -> String {
    format!("{CACHE_REPOSITORY}:{key}")
}

/// The build's step keys and where its container starts.
#[derive(Debug, Clone)]
pub struct CachePlan {
    pub keys: Vec<Option<String>>,
    /// Provisioners the start image already went through.
    pub done: usize,
    /// The kept image the container starts from, when `done > 0`.
    pub start_image: Option<String>,
    pub config: ContainerConfig,
    /// The step store shared with other runners, when there is one.
    pub shared: Option<Arc<StepStore>>,
    /// What each kept step is called in the shared store's records.
    pub image: String,
    pub steps: Vec<String>,
}

pub struct StepFindCached {
    plan: Arc<Plan>,
    cache: StepCache,
    image: String,
    steps: Vec<String>,
}

impl StepFindCached {
    /// `steps` describes each provisioner, for the shared store's records.
    pub fn new(plan: Arc<Plan>, cache: StepCache, image: String, steps: Vec<String>) -> Self {
        StepFindCached {
            plan,
            cache,
            image,
            steps,
        }
    }
}

/// Checks that the `docker save` archive at `path` sets exactly one tag,
/// `reference`, before the engine loads it: the manifest's `RepoTags`, the
/// legacy `repositories` file and an OCI index's image names all count.
pub fn check_saved_image(path: &Path, reference: &str) -> Result<(), String> {
    const SMALL: u64 = 1 << 20;
    let file = std::fs::File::open(path).map_err(|err| err.to_string())?;
    let mut archive = tar::Archive::new(file);
    let mut found: HashMap<String, serde_json::Value> = HashMap::new();
    let entries = archive.entries().map_err(|err| err.to_string())?;
    for entry in entries {
        let entry = entry.map_err(|err| format!("it is not a readable archive ({err})"))?;
        let name = entry.path().map_err(|err| err.to_string())?;
        let name = name.to_string_lossy().into_owned();
        // The engine cleans names as it unpacks: only names that are clean
        // already can be matched here as it will see them.
        let name =
            clean_member_name(&name).ok_or_else(|| format!("it holds an entry named {name:?}"))?;
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Directory => {}
            // `docker save` links a layer that repeats an earlier one to
            // it; any other link could redirect what the engine reads.
            tar::EntryType::Symlink
                if name.ends_with("/layer.tar")
                    && entry
                        .link_name()
                        .ok()
                        .flatten()
                        .is_some_and(|target| target.to_string_lossy().ends_with("/layer.tar")) => {
            }
            other => return Err(format!("it holds {name:?} of type {other:?}")),
        }
        if !matches!(
            name.as_str(),
            "manifest.json" | "repositories" | "index.json"
        ) {
            continue;
        }
        if found.contains_key(&name) {
            return Err(format!("it holds {name} twice"));
        }
        let mut bytes = Vec::new();
        entry
            .take(SMALL)
            .read_to_end(&mut bytes)
            .map_err(|err| err.to_string())?;
        let value = serde_json::from_slice(&bytes)
            .map_err(|err| format!("its {name} is not JSON ({err})"))?;
        found.insert(name, value);
    }
    let manifest = found
        .get("manifest.json")
        .ok_or("it has no manifest.json")?;
    let tags: Vec<&str> = match manifest.as_array().map(Vec::as_slice) {
        Some([image]) => image["RepoTags"]
            .as_array()
            .map(|tags| tags.iter().filter_map(serde_json::Value::as_str).collect())
            .unwrap_or_default(),
        _ => return Err("its manifest.json does not hold exactly one image".to_owned()),
    };
    if tags != [reference] {
        return Err(format!("it would tag {tags:?}"));
    }
    if let Some(repositories) = found.get("repositories") {
        let (repository, tag) = reference.split_once(':').unwrap_or((reference, "latest"));
        let only_ours = repositories.as_object().is_some_and(|repos| {
            repos.len() == 1
                && repos
                    .get(repository)
                    .and_then(serde_json::Value::as_object)
                    .is_some_and(|tags| tags.len() == 1 && tags.contains_key(tag))
        });
        if !only_ours {
            return Err(format!("its repositories file names {repositories}"));
        }
    }
    if let Some(index) = found.get("index.json") {
        let tag = reference.rsplit_once(':').map_or(reference, |(_, tag)| tag);
        let qualified = format!("docker.io/library/{reference}");
        let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
        for manifest in &manifests {
            let annotations = &manifest["annotations"];
            let name = annotations["io.containerd.image.name"].as_str();
            let ref_name = annotations["org.opencontainers.image.ref.name"].as_str();
            if name.is_some_and(|name| name != reference && name != qualified)
                || ref_name.is_some_and(|ref_name| ref_name != tag && ref_name != reference)
            {
                return Err(format!("its index.json names {annotations}"));
            }
        }
    }
    Ok(())
}

/// `name` without a leading `./`, if it is otherwise clean: relative, with
/// no empty, `.` or `..` component.
fn clean_member_name(name: &str) -> Option<String> {
    let name = name.strip_prefix("./").unwrap_or(name);
    let trimmed = name.strip_suffix('/').unwrap_or(name);
    let clean = !trimmed.is_empty()
        && !trimmed.starts_with('/')
        && trimmed
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..");
    clean.then(|| trimmed.to_owned())
}

/// The longest prefix past the first `local` steps that the shared store
/// holds, loaded into the engine: (steps, key, image id).
async fn fetch_shared(
    store: &StepStore,
    images: &dyn ImageApi,
    keys: &[Option<String>],
    local: usize,
    cx: &StepContext,
) -> Option<(usize, String, String)> {
    for count in (local + 1..=keys.len()).rev() {
        let Some(key) = &keys[count - 1] else {
            continue;
        };
        let archive = match store.scratch_file() {
            Ok(archive) => archive,
            Err(err) => {
                cx.log
                    .warn(format!("cannot fetch from the shared step cache: {err}"));
                return None;
            }
        };
        if store.fetch_file(key, &archive, &cx.log).await.is_none() {
            continue;
        }
        let reference = reference(key);
        let checked = tokio::task::spawn_blocking({
            let (path, reference) = (archive.to_path_buf(), reference.clone());
            move || check_saved_image(&path, &reference)
        })
        .await
        .unwrap_or_else(|err| Err(err.to_string()));
        let loaded = match checked {
            Ok(()) => images.load_image(&archive).await,
            Err(why) => Err(format!("it is not a saved {reference} alone: {why}")),
        };
        if let Err(why) = loaded {
            cx.log.warn(format!(
                "the shared step cache entry {key} is not loaded ({why}); building that step again"
            ));
            continue;
        }
        if let Some(image) = kept_image(images, key, cx).await {
            return Some((count, key.clone(), image));
        }
    }
    None
}

/// Saves the kept image of `key` into the shared store, unless another
/// runner shared it first. Failures are warnings: other runners then run
/// the step themselves.
async fn share_kept(
    store: &StepStore,
    images: &dyn ImageApi,
    key: &str,
    info: EntryInfo,
    cx: &StepContext,
) {
    if !store.shared_lacks(key, &cx.log).await {
        return;
    }
    let saved = match store.scratch_file() {
        Ok(archive) => images
            .save_image(&reference(key), &archive)
            .await
            .map(|()| archive),
        Err(err) => Err(err.to_string()),
    };
    match saved {
        Ok(archive) => store.share_file(key, &archive, info, &cx.log).await,
        Err(err) => cx.log.warn(format!(
            "cannot save {} to share it: {err}; other runners run that step themselves",
            reference(key)
        )),
    }
}

/// The kept image for `key`, if there is a sound one. An image whose label
/// disagrees with its tag is untagged (and reported): it is never used.
async fn kept_image(images: &dyn ImageApi, key: &str, cx: &StepContext) -> Option<String> {
    let reference = reference(key);
    let inspected = match images.inspect_image(&reference).await {
        Ok(inspected) => inspected,
        Err(err) if engine::is_not_found(&err) => return None,
        Err(err) => {
            cx.log.warn(format!(
                "cannot look up the cached step {reference}: {}; building that step again",
                engine::describe(&err)
            ));
            return None;
        }
    };
    let labelled = inspected
        .config
        .as_ref()
        .and_then(|config| config.labels.as_ref())
        .and_then(|labels| labels.get(KEY_LABEL))
        .cloned();
    if labelled.as_deref() == Some(key) {
        return inspected.id;
    }
    cx.log.warn(format!(
        "the cached step {reference} is labelled {}, not its key: discarding it and building that step again",
        labelled.as_deref().unwrap_or("with no key")
    ));
    let options = RemoveImageOptions {
        force: false,
        noprune: false,
        platforms: None,
    };
    if let Err(err) = images.remove_image(&reference, options).await {
        cx.log.warn(format!(
            "cannot remove the unsound cached step {reference}: {}",
            engine::describe(&err)
        ));
    }
    None
}

#[async_trait]
impl Step<DockerState> for StepFindCached {
    fn name(&self) -> &'static str {
        "find_cached_steps"
    }

    async fn run(&mut self, state: &mut DockerState, cx: &StepContext) -> Result<(), StepError> {
        let base = state
            .base
            .as_ref()
            .ok_or_else(|| StepError::failed("no base image"))?;
        let Some(settings) = cache_settings(&self.plan.config) else {
            cx.log
                .info("the step cache is off for builds with `volumes`");
            return Ok(());
        };
        let keys = self.cache.keys("docker", &settings, &base.identity());
        // Longest prefix first: the last key that has a sound kept image.
        let mut start = None;
        for count in (1..=keys.len()).rev() {
            if let Some(key) = &keys[count - 1]
                && let Some(image) = kept_image(state.images.as_ref(), key, cx).await
            {
                start = Some((count, key.clone(), image));
                break;
            }
        }
        let store = self.cache.store();
        store.record_shares_in(cx);
        let shared = store.is_shared().then(|| Arc::new(store));
        if let Some(store) = &shared {
            let local = start.as_ref().map_or(0, |(count, ..)| *count);
            if let Some(fetched) =
                fetch_shared(store, state.images.as_ref(), &keys, local, cx).await
            {
                start = Some(fetched);
            }
        }
        let (done, start_image) = match start {
            Some((done, key, image)) => {
                cx.log.info(format!(
                    "the first {done} of {} provisioner(s) are in the step cache: starting from {} ({image})",
                    keys.len(),
                    reference(&key)
                ));
                cx.log.emit(Event::StepsCached {
                    build: cx.build_name().to_owned(),
                    steps: done,
                    key,
                });
                (done, Some(image))
            }
            None => (0, None),
        };
        state.cache = Some(CachePlan {
            keys,
            done,
            start_image,
            config: image_config(base, HashMap::new()),
            shared,
            image: self.image.clone(),
            steps: self.steps.clone(),
        });
        Ok(())
    }
}

#[async_trait]
impl KeepsSteps for DockerState {
    fn steps_done(&self) -> usize {
        self.cache.as_ref().map_or(0, |cache| cache.done)
    }

    fn key_after(&self, index: usize) -> Option<String> {
        self.cache.as_ref()?.keys.get(index)?.clone()
    }

    async fn keep(&mut self, key: &str, cx: &StepContext) -> Result<(), String> {
        let cache = self.cache.as_ref().ok_or("no step cache")?;
        let container = self.container.as_ref().ok_or("no build container")?;
        // The kept image gets the base's own configuration, never the build
        // container's keep-alive command; the final commit sets it again.
        let mut config = cache.config.clone();
        let mut labels = config.labels.take().unwrap_or_default();
        labels.insert(KEY_LABEL.to_owned(), key.to_owned());
        config.labels = Some(labels);
        let options = CommitContainerOptions {
            container: Some(container.id.clone()),
            repo: Some(CACHE_REPOSITORY.to_owned()),
            tag: Some(key.to_owned()),
            comment: Some(format!("imgbuild step cache {key}")),
            author: None,
            // The next provisioner must not see a half-written state
            // committed under it: the container pauses while it is saved.
            pause: true,
            changes: None,
        };
        self.images
            .commit_container(options, config)
            .await
            .map_err(|err| engine::describe(&err))?;
        if let Some(store) = &cache.shared {
            let (_, step) = step_label(&cache.keys, &cache.steps, key, cache.done);
            let info = EntryInfo {
                image: cache.image.clone(),
                build: cx.build_name().to_owned(),
                step,
            };
            share_kept(store, self.images.as_ref(), key, info, cx).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::testing::TestContext;
    use crate::docker::engine::fake::FakeImages;
    use serde_json::json;

    const KEY: &str = "4f1c";

    /// A `docker save` archive holding only the given metadata files.
    fn archive(dir: &Path, files: &[(&str, serde_json::Value)]) -> std::path::PathBuf {
        let path = dir.join(format!("saved-{}.tar", uuid::Uuid::new_v4().simple()));
        let mut builder = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (name, value) in files {
            let bytes = serde_json::to_vec(value).unwrap();
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, &bytes[..]).unwrap();
        }
        builder.finish().unwrap();
        path
    }

    /// An archive of raw entries (name, type, link target, content), names
    /// written as they are: the tar crate's own builder refuses unclean
    /// ones, a hostile archive need not.
    /// An archive member: name, type, link target, content.
    type Member<'a> = (&'a str, tar::EntryType, &'a str, Vec<u8>);

    fn raw_archive(dir: &Path, entries: &[Member<'_>]) -> std::path::PathBuf {
        let path = dir.join(format!("raw-{}.tar", uuid::Uuid::new_v4().simple()));
        let mut builder = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (name, kind, link, bytes) in entries {
            let mut header = tar::Header::new_old();
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_entry_type(*kind);
            header.set_size(bytes.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append(&header, &bytes[..]).unwrap();
        }
        builder.finish().unwrap();
        path
    }

    fn manifest(tags: &[&str]) -> (&'static str, serde_json::Value) {
        (
            "manifest.json",
            json!([{"Config": "c.json", "RepoTags": tags, "Layers": ["l/layer.tar"]}]),
        )
    }

    #[test]
    fn a_saved_step_loads_only_if_it_sets_its_own_cache_tag_alone() {
        let dir = tempfile::tempdir().unwrap();
        let ours = reference(KEY);
        let sound = archive(
            dir.path(),
            &[
                manifest(&[&ours]),
                ("repositories", json!({CACHE_REPOSITORY: {KEY: "l"}})),
                (
                    "index.json",
                    json!({"manifests": [{"annotations": {
                        "io.containerd.image.name": format!("docker.io/library/{ours}"),
                        "org.opencontainers.image.ref.name": KEY}}]}),
                ),
            ],
        );
        check_saved_image(&sound, &ours).unwrap();

        let refused = [
            (
                archive(dir.path(), &[manifest(&[&ours, "team/web:latest"])]),
                "would tag",
            ),
            (
                archive(dir.path(), &[manifest(&["team/web:latest"])]),
                "would tag",
            ),
            (
                archive(
                    dir.path(),
                    &[
                        manifest(&[&ours]),
                        ("repositories", json!({"team/web": {"latest": "l"}})),
                    ],
                ),
                "repositories",
            ),
            (
                archive(
                    dir.path(),
                    &[
                        manifest(&[&ours]),
                        (
                            "index.json",
                            json!({"manifests": [{"annotations": {
                                "io.containerd.image.name": "docker.io/team/web:latest"}}]}),
                        ),
                    ],
                ),
                "index.json",
            ),
            (archive(dir.path(), &[]), "no manifest.json"),
        ];
        for (path, why) in refused {
            let err = check_saved_image(&path, &ours).unwrap_err();
            assert!(err.contains(why), "{err} (wanted {why})");
        }

        // Names the engine would clean to a metadata file, links that
        // could redirect one, and a second copy are refused before the
        // first manifest could vouch for the archive.
        let harmless = serde_json::to_vec(&manifest(&[&ours]).1).unwrap();
        let hostile = serde_json::to_vec(&manifest(&["team/web:latest"]).1).unwrap();
        let regular = tar::EntryType::Regular;
        let sneaky: [Vec<Member<'_>>; 5] = [
            vec![
                ("manifest.json", regular, "", harmless.clone()),
                ("x/../manifest.json", regular, "", hostile.clone()),
            ],
            vec![
                ("manifest.json", regular, "", harmless.clone()),
                (".//manifest.json", regular, "", hostile.clone()),
            ],
            vec![
                ("manifest.json", regular, "", harmless.clone()),
                ("d", tar::EntryType::Symlink, ".", Vec::new()),
                ("d/manifest.json", regular, "", hostile.clone()),
            ],
            vec![
                ("manifest.json", regular, "", harmless.clone()),
                ("./manifest.json", regular, "", hostile.clone()),
            ],
            vec![
                ("manifest.json", regular, "", harmless.clone()),
                ("l", tar::EntryType::Link, "manifest.json", Vec::new()),
            ],
        ];
        for entries in sneaky {
            let path = raw_archive(dir.path(), &entries);
            assert!(
                check_saved_image(&path, &ours).is_err(),
                "{:?} passed",
                entries.iter().map(|e| e.0).collect::<Vec<_>>()
            );
        }
        // `docker save` links a repeated layer to its first copy.
        let deduplicated = raw_archive(
            dir.path(),
            &[
                ("a/layer.tar", regular, "", Vec::new()),
                (
                    "b/layer.tar",
                    tar::EntryType::Symlink,
                    "../a/layer.tar",
                    Vec::new(),
                ),
                ("manifest.json", regular, "", harmless),
            ],
        );
        check_saved_image(&deduplicated, &ours).unwrap();
    }

    fn shared_store(dir: &Path) -> StepStore {
        StepStore::at(dir.join("local")).shared_with(Some(dir.join("shared").display().to_string()))
    }

    fn info() -> EntryInfo {
        EntryInfo {
            image: "web".into(),
            build: "app".into(),
            step: "step 1".into(),
        }
    }

    #[tokio::test]
    async fn a_shared_archive_that_would_move_another_tag_is_never_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let store = shared_store(dir.path());
        let t = TestContext::new("app");
        let hostile = archive(dir.path(), &[manifest(&["team/web:latest"])]);
        store.share_file(KEY, &hostile, info(), &t.cx.log).await;
        let images = FakeImages::default();
        let keys = vec![Some(KEY.to_owned())];
        assert_eq!(fetch_shared(&store, &images, &keys, 0, &t.cx).await, None);
        assert!(
            !images.calls().iter().any(|call| call.starts_with("load")),
            "{:?}",
            images.calls()
        );
        assert!(
            format!("{:?}", t.sink.events()).contains("would tag"),
            "{:?}",
            t.sink.events()
        );
    }

    /// The longest key missing from the shared store does not end the
    /// search: a shorter shared prefix is fetched and loaded.
    #[tokio::test]
    async fn a_shorter_shared_prefix_is_fetched_when_the_longest_is_not_shared() {
        let dir = tempfile::tempdir().unwrap();
        let store = shared_store(dir.path());
        let t = TestContext::new("app");
        let saved = archive(dir.path(), &[manifest(&[&reference(KEY)])]);
        store.share_file(KEY, &saved, info(), &t.cx.log).await;
        let images = FakeImages::default();
        let keys = vec![Some(KEY.to_owned()), Some("5e2d".to_owned())];
        // The fake engine loads nothing, so nothing is found after all.
        assert_eq!(fetch_shared(&store, &images, &keys, 0, &t.cx).await, None);
        assert!(
            images.calls().iter().any(|call| call.starts_with("load")),
            "{:?}",
            images.calls()
        );
    }

    #[tokio::test]
    async fn a_kept_step_is_saved_once_into_the_shared_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = shared_store(dir.path());
        let t = TestContext::new("app");
        let images = FakeImages::default();
        share_kept(&store, &images, KEY, info(), &t.cx).await;
        // A second runner keeping the same key finds it shared: no save.
        share_kept(&store, &images, KEY, info(), &t.cx).await;
        assert_eq!(images.calls(), [format!("save {}", reference(KEY))]);
        let fetched = dir.path().join("fetched");
        let entry = store.fetch_file(KEY, &fetched, &t.cx.log).await.unwrap();
        assert_eq!(entry.info, info());
        assert_eq!(std::fs::read_to_string(&fetched).unwrap(), reference(KEY));
        // Only the shared store holds it: the engine keeps the image.
        assert!(store.list().is_empty());
    }
}
