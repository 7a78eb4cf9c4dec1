//! The object store both backends implement, proved the same way on each:
//! a local directory, and S3 as moto serves it (moto honours `If-Match` and
//! `If-None-Match` on PUT, multipart uploads with SHA-256 part checksums,
//! ranged GETs and ListMultipartUploads).
//!
//! Needs moto (`.ci/start-moto.sh`, started on demand; its harness is
//! test-support's EC2 part, hence the feature). Tests share one moto server
//! and run in parallel, so each makes its own bucket.

#![cfg(feature = "ec2")]

use imgbuild_builders::common::object_store::{
    LocalStore, ObjectStore, ObjectStoreError, S3Options, S3Store, read_modify_write,
};
use imgbuild_test_support::ec2::{moto, moto_bucket};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// A store in a fresh bucket of moto's, under a prefix, so every key the
/// tests see is also checked to stay inside it.
async fn s3_store(options: S3Options) -> S3Store {
    let bucket = moto_bucket("imgbuild-objects").await;
    let options = S3Options {
        endpoint_url: Some(moto()),
        region: Some("us-east-1".into()),
        ..options
    };
    S3Store::open(&format!("s3://{bucket}/ci/cache"), options)
        .await
        .unwrap()
}

fn no_progress(_: u64, _: u64) {}

async fn conditional_semantics(store: &dyn ObjectStore) {
    let where_ = store.location();
    assert_eq!(store.get("catalog.json").await.unwrap(), None, "{where_}");

    let v1 = store
        .put_if_absent("catalog.json", b"one".to_vec())
        .await
        .unwrap();
    let err = store
        .put_if_absent("catalog.json", b"two".to_vec())
        .await
        .unwrap_err();
    assert!(err.is_precondition_failed(), "{where_}: {err}");
    let read = store.get("catalog.json").await.unwrap().unwrap();
    assert_eq!(
        (read.bytes.as_slice(), &read.version),
        (&b"one"[..], &v1),
        "{where_}"
    );

    let v2 = store
        .put_if_match("catalog.json", b"two".to_vec(), &v1)
        .await
        .unwrap();
    assert_ne!(v1, v2, "{where_}");
    let err = store
        .put_if_match("catalog.json", b"stale".to_vec(), &v1)
        .await
        .unwrap_err();
    assert!(err.is_precondition_failed(), "{where_}: {err}");
    assert_eq!(
        store.get("catalog.json").await.unwrap().unwrap().bytes,
        b"two"
    );

    // Removed since it was read: the write is refused, nothing reappears.
    store.delete("catalog.json").await.unwrap();
    store.delete("catalog.json").await.unwrap();
    let err = store
        .put_if_match("catalog.json", b"three".to_vec(), &v2)
        .await
        .unwrap_err();
    assert!(err.is_precondition_failed(), "{where_}: {err}");
    assert_eq!(store.get("catalog.json").await.unwrap(), None, "{where_}");

    // A conditional delete removes only the version read: one replaced
    // since stays, and one removed already is no error.
    let v1 = store
        .put_if_absent("record.json", b"one".to_vec())
        .await
        .unwrap();
    let v2 = store
        .put_if_match("record.json", b"two".to_vec(), &v1)
        .await
        .unwrap();
    let err = store.delete_if_match("record.json", &v1).await.unwrap_err();
    assert!(err.is_precondition_failed(), "{where_}: {err}");
    assert_eq!(
        store.get("record.json").await.unwrap().unwrap().bytes,
        b"two",
        "{where_}"
    );
    store.delete_if_match("record.json", &v2).await.unwrap();
    assert_eq!(store.get("record.json").await.unwrap(), None, "{where_}");
    store.delete_if_match("record.json", &v2).await.unwrap();

    for key in ["steps/a.layer", "steps/a.json", "steps2/b", "top"] {
        store
            .put_if_absent(key, key.as_bytes().to_vec())
            .await
            .unwrap();
    }
    let keys = |prefix: &'static str| async move {
        store
            .list(prefix)
            .await
            .unwrap()
            .into_iter()
            .map(|l| (l.key, l.size))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys("steps/").await,
        [
            ("steps/a.json".to_owned(), 12),
            ("steps/a.layer".to_owned(), 13)
        ],
        "{where_}"
    );
    assert_eq!(keys("steps").await.len(), 3, "{where_}");
    assert_eq!(keys("").await.len(), 4, "{where_}");
}

#[tokio::test]
async fn conditional_writes_mean_the_same_on_s3_and_on_disk() {
    let s3 = s3_store(S3Options::default()).await;
    // An object beside the store's prefix is not the store's.
    s3.client()
        .put_object()
        .bucket(s3.bucket())
        .key("elsewhere/top")
        .body(b"x".to_vec().into())
        .send()
        .await
        .unwrap();
    conditional_semantics(&s3).await;
    let stored = s3
        .client()
        .list_objects_v2()
        .bucket(s3.bucket())
        .prefix("ci/cache/")
        .send()
        .await
        .unwrap();
    assert_eq!(
        stored.contents().len(),
        4,
        "every key lands under the prefix"
    );

    let dir = tempfile::tempdir().unwrap();
    conditional_semantics(&LocalStore::new(dir.path())).await;
}

fn large_file(path: &Path, size: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(size as u64);
    let mut content = vec![0u8; size];
    rng.fill(&mut content);
    std::fs::write(path, &content).unwrap();
    hex::encode(Sha256::digest(&content))
}

#[tokio::test]
async fn a_large_file_goes_up_in_parallel_parts_and_comes_back_whole() {
    let store = s3_store(S3Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("layer.qcow2");
    let size = 40usize << 20;
    let sha256 = large_file(&source, size);

    let reported = AtomicU64::new(0);
    let progress = |done: u64, total: u64| {
        assert_eq!(total, size as u64);
        reported.fetch_max(done, Ordering::SeqCst);
    };
    let uploaded = store
        .upload_file("steps/k.layer", &source, &progress)
        .await
        .unwrap();
    assert_eq!(
        (uploaded.size, uploaded.sha256.as_str()),
        (size as u64, sha256.as_str())
    );
    assert_eq!(reported.load(Ordering::SeqCst), size as u64);
    // S3's ETag of a multipart object ends in its part count: 40 MiB in
    // 8 MiB parts.
    assert!(
        uploaded.version.0.trim_matches('"').ends_with("-5"),
        "{}",
        uploaded.version
    );
    let head = store
        .client()
        .head_object()
        .bucket(store.bucket())
        .key(store.object_key("steps/k.layer"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.content_length(), Some(size as i64));

    let back = dir.path().join("back.qcow2");
    let reported = AtomicU64::new(0);
    let progress = |done: u64, _: u64| {
        reported.fetch_max(done, Ordering::SeqCst);
    };
    let got = store
        .download_file("steps/k.layer", &back, &sha256, &progress)
        .await
        .unwrap();
    assert_eq!(got, size as u64);
    assert_eq!(reported.load(Ordering::SeqCst), size as u64);
    assert!(std::fs::read(&back).unwrap() == std::fs::read(&source).unwrap());

    // Expecting other content: refused, and nothing left where it would go.
    let wrong = dir.path().join("wrong.qcow2");
    let err = store
        .download_file("steps/k.layer", &wrong, &"0".repeat(64), &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, ObjectStoreError::Integrity { .. }), "{err}");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.contains("wrong")),
        "left behind: {names:?}"
    );

    let err = store
        .download_file("steps/none.layer", &wrong, &sha256, &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, ObjectStoreError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn an_upload_that_fails_midway_leaves_no_multipart_upload_behind() {
    // Two parts at a time: the third and later parts are read only after
    // the first has finished, by which time the file is cut short.
    let store = s3_store(S3Options {
        concurrency: 2,
        ..S3Options::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("layer.qcow2");
    large_file(&source, 40 << 20);

    let truncated = AtomicBool::new(false);
    let truncate = |_: u64, _: u64| {
        if !truncated.swap(true, Ordering::SeqCst) {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&source)
                .unwrap();
            file.set_len(1 << 20).unwrap();
        }
    };
    let err = store
        .upload_file("steps/k.layer", &source, &truncate)
        .await
        .unwrap_err();
    assert!(
        truncated.load(Ordering::SeqCst),
        "no part finished before the failure"
    );
    assert!(
        matches!(err, ObjectStoreError::SourceChanged { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("layer.qcow2"), "{err}");

    let uploads = store
        .client()
        .list_multipart_uploads()
        .bucket(store.bucket())
        .send()
        .await
        .unwrap();
    assert!(
        uploads.uploads().is_empty(),
        "multipart uploads left: {:?}",
        uploads.uploads()
    );
    assert_eq!(store.get("steps/k.layer").await.unwrap(), None);
}

#[derive(Debug, thiserror::Error)]
#[error("the catalog is not a JSON list: {0}")]
struct NotJson(#[from] serde_json::Error);

fn append(item: String) -> impl FnMut(Option<&[u8]>) -> Result<Vec<u8>, NotJson> {
    move |current| {
        let mut items: Vec<String> = match current {
            Some(bytes) => serde_json::from_slice(bytes)?,
            None => Vec::new(),
        };
        items.push(item.clone());
        Ok(serde_json::to_vec(&items)?)
    }
}

/// Twenty writers, each with its own store handle (as separate CI runners
/// would have), append to one JSON list at once; every item must be there.
async fn twenty_writers(stores: Vec<Arc<dyn ObjectStore>>) {
    let where_ = stores[0].location();
    let start = Arc::new(tokio::sync::Barrier::new(stores.len()));
    let writers: Vec<_> = stores
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, store)| {
            let start = start.clone();
            tokio::spawn(async move {
                start.wait().await;
                read_modify_write(store.as_ref(), "catalog.json", append(format!("w{i}")))
                    .await
                    .unwrap()
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let object = stores[0].get("catalog.json").await.unwrap().unwrap();
    let mut items: Vec<String> = serde_json::from_slice(&object.bytes).unwrap();
    items.sort();
    let mut expected: Vec<String> = (0..stores.len()).map(|i| format!("w{i}")).collect();
    expected.sort();
    assert_eq!(items, expected, "{where_}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_writers_on_s3_lose_no_update() {
    let first = s3_store(S3Options::default()).await;
    let url = first.location();
    let mut stores: Vec<Arc<dyn ObjectStore>> = vec![Arc::new(first)];
    for _ in 1..20 {
        let options = S3Options {
            endpoint_url: Some(moto()),
            region: Some("us-east-1".into()),
            ..S3Options::default()
        };
        stores.push(Arc::new(S3Store::open(&url, options).await.unwrap()));
    }
    twenty_writers(stores).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_writers_on_disk_lose_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let stores = (0..20)
        .map(|_| Arc::new(LocalStore::new(dir.path())) as Arc<dyn ObjectStore>)
        .collect();
    twenty_writers(stores).await;
}

async fn keys_in(store: &dyn ObjectStore, prefix: &str) -> Vec<String> {
    store
        .list(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|listed| listed.key)
        .collect()
}

/// The step store shared through S3: what one runner keeps, a runner with
/// an empty local store fetches (verified) instead of rebuilding; a damaged
/// shared entry is reported and removed, never used; two runners keeping
/// one key leave one whole entry.
#[tokio::test]
async fn a_runner_with_an_empty_step_cache_fetches_what_another_shared() {
    use imgbuild_builders::common::step_store::{EntryInfo, StepStore};
    use imgbuild_core::events::{Event, MemorySink};
    use imgbuild_core::{BuildLog, Redactor};

    let shared: Arc<dyn ObjectStore> = Arc::new(s3_store(S3Options::default()).await);
    let runner = |dir: &Path| StepStore::at(dir).shared_through(shared.clone());
    let sink = Arc::new(MemorySink::default());
    let log = BuildLog::root(sink.clone(), Redactor::new()).for_build("vm");
    let messages = || -> Vec<String> {
        sink.events()
            .iter()
            .filter_map(|event| match event {
                Event::Message { message, .. } => Some(message.clone()),
                _ => None,
            })
            .collect()
    };
    let info = |step: &str| EntryInfo {
        image: "web".into(),
        build: "vm".into(),
        step: step.into(),
    };
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("layer.qcow2");
    let sha256 = large_file(&source, 20 << 20);

    let first = runner(&dir.path().join("first"));
    let kept = first
        .put("k1", &source, info("step 1 (shell)"), &log)
        .await
        .unwrap();
    assert_eq!(kept.sha256, sha256);
    let objects = keys_in(shared.as_ref(), "steps/").await;
    assert_eq!(
        objects,
        [
            format!("steps/k1.{sha256}.layer"),
            "steps/k1.json".to_owned()
        ]
    );

    // A runner with an empty store.
    let second = runner(&dir.path().join("second"));
    let fetched = second.get("k1", &log).await.expect("fetched");
    assert_eq!(
        (fetched.sha256.as_str(), fetched.hits),
        (sha256.as_str(), 1)
    );
    assert!(std::fs::read(second.path("k1")).unwrap() == std::fs::read(&source).unwrap());
    assert!(
        messages()
            .iter()
            .any(|m| m.starts_with("fetched the step cache entry")),
        "{:?}",
        messages()
    );
    // Kept locally now: the next use does not fetch.
    let before = messages().len();
    assert_eq!(second.get("k1", &log).await.unwrap().hits, 2);
    assert_eq!(messages().len(), before, "{:?}", messages());
    // Damaged locally: discarded, and fetched whole again.
    let mut bytes = std::fs::read(second.path("k1")).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(second.path("k1"), bytes).unwrap();
    let again = second.get("k1", &log).await.expect("fetched again");
    assert_eq!(again.sha256, sha256);
    assert!(std::fs::read(second.path("k1")).unwrap() == std::fs::read(&source).unwrap());
    // What the shared store does not have is simply absent.
    assert!(second.get("k2", &log).await.is_none());

    // Damaged in the bucket: reported, removed there, never used.
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, b"not the layer").unwrap();
    shared
        .upload_file(&format!("steps/k1.{sha256}.layer"), &garbage, &no_progress)
        .await
        .unwrap();
    let third = runner(&dir.path().join("third"));
    assert!(third.get("k1", &log).await.is_none());
    assert!(!third.path("k1").exists());
    assert!(
        messages()
            .iter()
            .any(|m| m.contains("damaged or incomplete entry k1")),
        "{:?}",
        messages()
    );
    assert!(shared.list("steps/").await.unwrap().is_empty());

    // Two runners keep one key at once, with different bytes: one entry
    // stays, whole, and the loser's data is gone.
    let other = dir.path().join("other.qcow2");
    let other_sha256 = large_file(&other, 12 << 20);
    let (a, b) = (runner(&dir.path().join("a")), runner(&dir.path().join("b")));
    let (kept_a, kept_b) = tokio::join!(
        a.put("k3", &source, info("step 3"), &log),
        b.put("k3", &other, info("step 3"), &log)
    );
    let (kept_a, kept_b) = (kept_a.unwrap(), kept_b.unwrap());
    assert_eq!(
        (kept_a.sha256.as_str(), kept_b.sha256.as_str()),
        (sha256.as_str(), other_sha256.as_str())
    );
    let objects = keys_in(shared.as_ref(), "steps/").await;
    assert_eq!(objects.len(), 2, "{objects:?}");
    let fresh = runner(&dir.path().join("fresh"));
    let winner = fresh.get("k3", &log).await.expect("one whole entry");
    assert!(winner.sha256 == sha256 || winner.sha256 == other_sha256);
    assert!(objects.contains(&format!("steps/k3.{}.layer", winner.sha256)));
}

/// A shared store that cannot be reached costs only the sharing: the entry
/// is kept locally and the build is told.
#[tokio::test]
async fn an_unreachable_shared_step_cache_leaves_the_local_one_working() {
    use imgbuild_builders::common::step_store::{EntryInfo, StepStore};
    use imgbuild_core::events::{Event, MemorySink};
    use imgbuild_core::{BuildLog, Redactor};

    let missing = moto_s3_missing_bucket().await;
    let dir = tempfile::tempdir().unwrap();
    let store = StepStore::at(dir.path().join("steps")).shared_through(missing);
    let sink = Arc::new(MemorySink::default());
    let log = BuildLog::root(sink.clone(), Redactor::new()).for_build("vm");
    let source = dir.path().join("layer");
    let sha256 = large_file(&source, 1 << 20);
    let info = EntryInfo {
        image: "web".into(),
        build: "vm".into(),
        step: "step 1".into(),
    };
    let kept = store.put("k", &source, info, &log).await.unwrap();
    assert_eq!(kept.sha256, sha256);
    assert!(store.get("k", &log).await.is_some());
    assert!(store.get("absent", &log).await.is_none());
    let warnings: Vec<String> = sink
        .events()
        .iter()
        .filter_map(|event| match event {
            Event::Message { message, .. } => Some(message.clone()),
            _ => None,
        })
        .filter(|m| m.contains("could not"))
        .collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(
        warnings[0].starts_with("could not share the step cache entry"),
        "{warnings:?}"
    );
}

/// A store over a bucket that does not exist in moto.
async fn moto_s3_missing_bucket() -> Arc<dyn ObjectStore> {
    let options = S3Options {
        endpoint_url: Some(moto()),
        region: Some("us-east-1".into()),
        ..S3Options::default()
    };
    Arc::new(
        S3Store::open("s3://imgbuild-no-such-bucket/steps", options)
            .await
            .unwrap(),
    )
}

/// A runner killed mid-share leaves an unfinished multipart upload of the
/// entry's data, which its journal names: `imgbuild clean` aborts it.
#[tokio::test]
async fn clean_aborts_the_multipart_upload_of_a_share_cut_off_midway() {
    use imgbuild_builders::common::orphans::Removal;
    use imgbuild_builders::common::step_store::remove_orphan_share;
    let bucket = moto_bucket("imgbuild-orphans").await;
    let location = format!("s3://{bucket}/ci");
    // Each test runs in a process of its own: the binary's environment is
    // this test's.
    unsafe { std::env::set_var("AWS_ENDPOINT_URL_S3", moto()) };
    let store = imgbuild_test_support::ec2::moto_s3(&location).await;
    let name = "steps/k.0123abcd.layer";
    let started = store
        .client()
        .create_multipart_upload()
        .bucket(store.bucket())
        .key(store.object_key(name))
        .send()
        .await
        .unwrap();
    store
        .client()
        .upload_part()
        .bucket(store.bucket())
        .key(store.object_key(name))
        .upload_id(started.upload_id().unwrap())
        .part_number(1)
        .body(vec![7u8; 1 << 20].into())
        .send()
        .await
        .unwrap();

    let removal = remove_orphan_share(&location, name).await.unwrap();
    assert!(matches!(removal, Removal::Removed), "{removal:?}");
    let uploads = store
        .client()
        .list_multipart_uploads()
        .bucket(store.bucket())
        .send()
        .await
        .unwrap();
    assert!(uploads.uploads().is_empty(), "{:?}", uploads.uploads());
    let again = remove_orphan_share(&location, name).await.unwrap();
    assert!(matches!(again, Removal::Absent), "{again:?}");
}
