//! `upload = "s3://bucket/prefix/"` on the QEMU builder, against moto's S3:
//! the builder's preflight and its delivery steps, on an image file made
//! here (what the export step leaves: the image and its `.sha256`), so no
//! VM boots. The real build that uploads is the fully cached build in
//! tests/qemu_step_cache.rs, through the binary.
//!
//! The builder reaches moto the way a user reaches another endpoint: through
//! `AWS_ENDPOINT_URL_S3`, with the fake credentials the harness sets.

#![cfg(feature = "ec2")]

use imgbuild_builders::common::object_store::{ObjectStore, S3Options, S3Store};
use imgbuild_builders::qemu::QemuBuilder;
use imgbuild_builders::{Artifact, ArtifactFile, BuildError, Builder, SourceIdentity};
use imgbuild_core::events::{Event, EventSink, MemorySink};
use imgbuild_core::{BuildLog, CancellationToken, Journal, Redactor, StepContext};
use imgbuild_test_support::common::unique;
use imgbuild_test_support::ec2::{create_moto_bucket, moto};
use imgbuild_test_support::harness::{Harness, image_info};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

/// moto's endpoint, set as the S3 endpoint override for every builder in
/// this test binary.
fn s3_endpoint() -> String {
    static ONCE: Once = Once::new();
    let url = moto();
    ONCE.call_once(|| {
        // SAFETY: as in `init_env`: once, before any test of this binary
        // reads the environment (each test calls this first).
        unsafe { std::env::set_var("AWS_ENDPOINT_URL_S3", &url) };
    });
    url
}

/// A fresh bucket in moto (`create`), or only its name; and a store over
/// the whole bucket for looking at what the builder left there.
async fn bucket(create: bool) -> (String, S3Store) {
    let name = unique("imgbuild-upload");
    let store = S3Store::open(
        &format!("s3://{name}"),
        S3Options {
            endpoint_url: Some(s3_endpoint()),
            region: Some("us-east-1".into()),
            ..S3Options::default()
        },
    )
    .await
    .unwrap();
    if create {
        create_moto_bucket(&name).await;
    }
    (name, store)
}

async fn keys(store: &S3Store) -> Vec<String> {
    store
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|listed| listed.key)
        .collect()
}

async fn open_multipart_uploads(store: &S3Store) -> Vec<String> {
    store
        .client()
        .list_multipart_uploads()
        .bucket(store.bucket())
        .send()
        .await
        .unwrap()
        .uploads()
        .iter()
        .map(|u| format!("{:?}", u.key()))
        .collect()
}

fn builder(output_dir: &Path, upload: &str) -> QemuBuilder {
    QemuBuilder::new(
        serde_json::from_value(serde_json::json!({
            "base_image": "base.qcow2",
            "output_dir": output_dir,
            "upload": upload,
        }))
        .unwrap(),
    )
}

/// What the export step leaves for `image` built into `output_dir`: the
/// image (random bytes, `size` of them) and its checksum file.
fn exported(output_dir: &Path, file_name: &str, size: usize) -> Artifact {
    std::fs::create_dir_all(output_dir).unwrap();
    let path = output_dir.join(file_name);
    let mut content = vec![0u8; size];
    fastrand::Rng::with_seed(size as u64).fill(&mut content);
    std::fs::write(&path, &content).unwrap();
    let sha256 = hex::encode(Sha256::digest(&content));
    let checksum_file = PathBuf::from(format!("{}.sha256", path.display()));
    std::fs::write(&checksum_file, format!("{sha256}  {file_name}\n")).unwrap();
    Artifact {
        builder: "qemu".into(),
        id: path.display().to_string(),
        files: vec![ArtifactFile {
            path,
            size: size as u64,
            sha256,
        }],
        source: SourceIdentity {
            kind: "file".into(),
            reference: "base.qcow2".into(),
            sha256: None,
        },
        details: serde_json::json!({ "format": "qcow2", "checksum_file": checksum_file }),
    }
}

fn assert_local_files_gone(artifact: &Artifact) {
    let image = &artifact.files[0].path;
    let checksum = PathBuf::from(format!("{}.sha256", image.display()));
    assert!(
        !image.exists() && !checksum.exists(),
        "an undelivered image is kept: {}",
        image.display()
    );
}

fn failure(result: Result<impl std::fmt::Debug, BuildError>) -> String {
    match result {
        Err(BuildError::Failed { message, .. }) | Err(BuildError::Refused(message)) => message,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn a_tested_image_goes_up_with_its_checksum_and_comes_back_whole() {
    s3_endpoint();
    let h = Harness::new("vm");
    let (bucket, store) = bucket(true).await;
    let image = image_info("web", "1.4.0");
    let request = h.request(image.clone(), Vec::new());
    let out = h.config_dir.path().join("output");
    let location = format!("s3://{bucket}/team/vm/");
    let vm = builder(&out, &location);

    vm.preflight(&request, &h.cx).await.unwrap();
    assert!(keys(&store).await.is_empty(), "preflight only reads");

    // Four 8 MiB parts and a bit: a multipart upload, parts in parallel.
    let size = (33 << 20) + 123;
    let artifact = exported(&out, "web-1.4.0.qcow2", size);
    let delivered = vm.deliver(&request, artifact.clone(), &h.cx).await.unwrap();

    let upload = &delivered.details["upload"];
    let sha256 = &artifact.files[0].sha256;
    assert_eq!(
        upload["url"],
        format!("s3://{bucket}/team/vm/web-1.4.0.qcow2")
    );
    assert_eq!(
        upload["checksum_url"],
        format!("s3://{bucket}/team/vm/web-1.4.0.qcow2.sha256")
    );
    assert_eq!(upload["size"], size as u64);
    assert_eq!(upload["sha256"], sha256.as_str());
    assert_eq!(
        upload["https_url"],
        format!("{}/{bucket}/team/vm/web-1.4.0.qcow2", s3_endpoint())
    );
    assert_eq!(delivered.details["format"], "qcow2", "other details stay");
    assert_eq!(delivered.files, artifact.files);

    let back = h.config_dir.path().join("back.qcow2");
    let got = store
        .download_file("team/vm/web-1.4.0.qcow2", &back, sha256, &|_, _| {})
        .await
        .unwrap();
    assert_eq!(got, size as u64);
    assert_eq!(
        hex::encode(Sha256::digest(std::fs::read(&back).unwrap())),
        *sha256
    );
    assert_eq!(
        store
            .get("team/vm/web-1.4.0.qcow2.sha256")
            .await
            .unwrap()
            .unwrap()
            .bytes,
        std::fs::read(out.join("web-1.4.0.qcow2.sha256")).unwrap()
    );
    assert_eq!(
        keys(&store).await,
        ["team/vm/web-1.4.0.qcow2", "team/vm/web-1.4.0.qcow2.sha256"]
    );

    let progress: Vec<(u64, Option<u64>)> = h
        .sink
        .events()
        .into_iter()
        .filter_map(|event| match event {
            Event::Progress {
                task, done, total, ..
            } if task == "upload web-1.4.0.qcow2" => Some((done, total)),
            _ => None,
        })
        .collect();
    assert_eq!(progress.len(), 5, "one event per part: {progress:?}");
    assert_eq!(
        progress.iter().map(|(done, _)| *done).max(),
        Some(size as u64)
    );
    assert!(
        progress
            .iter()
            .all(|(_, total)| *total == Some(size as u64))
    );

    // The same version built on another machine (its own output directory)
    // is refused before anything is made, naming the object.
    let elsewhere = builder(&h.config_dir.path().join("elsewhere"), &location);
    let refused = failure(elsewhere.preflight(&request, &h.cx).await);
    assert!(
        refused.contains(&format!(
            "s3://{bucket}/team/vm/web-1.4.0.qcow2 already exists ({size} bytes)"
        )) && refused.contains("image web version 1.4.0")
            && refused.contains("bump `image.version`"),
        "{refused}"
    );

    // Delivered anyway (the key taken between preflight and upload):
    // refused, the objects there are left alone, and the image that cannot
    // be recorded is removed so that the version can be built again.
    let duplicate = exported(
        &h.config_dir.path().join("elsewhere"),
        "web-1.4.0.qcow2",
        1 << 20,
    );
    let again = failure(elsewhere.deliver(&request, duplicate.clone(), &h.cx).await);
    assert!(again.contains("already exists"), "{again}");
    assert_local_files_gone(&duplicate);
    assert!(artifact.files[0].path.exists(), "the delivered image stays");
    assert_eq!(
        keys(&store).await,
        ["team/vm/web-1.4.0.qcow2", "team/vm/web-1.4.0.qcow2.sha256"]
    );
    assert!(open_multipart_uploads(&store).await.is_empty());

    // Without `upload`, nothing is delivered and the artifact is as it was.
    let plain = QemuBuilder::new(
        serde_json::from_value(serde_json::json!({"base_image": "base.qcow2"})).unwrap(),
    );
    let same = plain
        .deliver(&request, artifact.clone(), &h.cx)
        .await
        .unwrap();
    assert!(same.details.get("upload").is_none());
}

#[tokio::test]
async fn a_missing_bucket_is_refused_before_the_build_and_a_delivery_to_it_leaves_nothing() {
    s3_endpoint();
    let h = Harness::new("vm");
    let (bucket, store) = bucket(false).await;
    let request = h.request(image_info("web", "2.0.0"), Vec::new());
    let out = h.config_dir.path().join("output");
    let vm = builder(&out, &format!("s3://{bucket}/"));

    let refused = failure(vm.preflight(&request, &h.cx).await);
    assert!(
        refused.contains(&format!("the bucket {bucket} does not exist"))
            && refused.contains("create it"),
        "{refused}"
    );

    // The bucket gone between preflight and delivery.
    let artifact = exported(&out, "web-2.0.0.qcow2", 12 << 20);
    let failed = failure(vm.deliver(&request, artifact.clone(), &h.cx).await);
    assert!(
        failed.contains(&bucket) && failed.contains("NoSuchBucket"),
        "{failed}"
    );
    assert_local_files_gone(&artifact);
    create_moto_bucket(&bucket).await;
    assert!(keys(&store).await.is_empty());
    assert!(open_multipart_uploads(&store).await.is_empty());
}

/// Passes every event on, and calls `hook` on the first progress event of
/// an upload (once a part has gone up).
struct OnFirstUploadProgress {
    inner: Arc<MemorySink>,
    hook: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl EventSink for OnFirstUploadProgress {
    fn emit(&self, event: &Event) {
        if let Event::Progress { task, .. } = event
            && task.starts_with("upload ")
            && let Some(hook) = self.hook.lock().unwrap().take()
        {
            hook();
        }
        self.inner.emit(event);
    }
}

fn context_with(
    hook: impl FnOnce() + Send + 'static,
    cancel: CancellationToken,
) -> (StepContext, Arc<MemorySink>, tempfile::TempDir) {
    let sink = Arc::new(MemorySink::default());
    let events = Arc::new(OnFirstUploadProgress {
        inner: sink.clone(),
        hook: std::sync::Mutex::new(Some(Box::new(hook))),
    });
    let state = tempfile::tempdir().unwrap();
    let run_id = unique("run");
    let journal =
        Arc::new(Journal::create(state.path(), &run_id, Path::new("image.toml")).unwrap());
    let cx = StepContext {
        log: BuildLog::root(events, Redactor::new()).for_build("vm"),
        journal,
        cancel,
        run_id,
    };
    (cx, sink, state)
}

#[tokio::test]
async fn an_image_cut_short_during_its_upload_aborts_it_and_leaves_nothing() {
    s3_endpoint();
    let h = Harness::new("vm");
    let (bucket, store) = bucket(true).await;
    let request = h.request(image_info("web", "3.0.0"), Vec::new());
    let out = h.config_dir.path().join("output");
    let vm = builder(&out, &format!("s3://{bucket}/vm/"));
    // Five parts, four in flight: the fifth is read after the first part
    // is done, by which time the file is cut short.
    let artifact = exported(&out, "web-3.0.0.qcow2", 40 << 20);
    let path = artifact.files[0].path.clone();
    let (cx, _sink, _state) = context_with(
        move || {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(1 << 20)
                .unwrap();
        },
        CancellationToken::new(),
    );
    let failed = failure(vm.deliver(&request, artifact.clone(), &cx).await);
    assert_local_files_gone(&artifact);
    assert!(
        failed.contains("web-3.0.0.qcow2 changed while it was being uploaded")
            && failed.contains(&format!("s3://{bucket}/vm/web-3.0.0.qcow2")),
        "{failed}"
    );
    assert!(open_multipart_uploads(&store).await.is_empty());
    assert!(keys(&store).await.is_empty());
}

#[tokio::test]
async fn an_interrupted_upload_is_aborted_before_the_delivery_returns() {
    s3_endpoint();
    let h = Harness::new("vm");
    let (bucket, store) = bucket(true).await;
    let request = h.request(image_info("web", "4.0.0"), Vec::new());
    let out = h.config_dir.path().join("output");
    let vm = builder(&out, &format!("s3://{bucket}/"));
    let artifact = exported(&out, "web-4.0.0.qcow2", 40 << 20);
    let cancel = CancellationToken::new();
    let (cx, _sink, _state) = context_with(
        {
            let cancel = cancel.clone();
            move || cancel.cancel()
        },
        cancel,
    );
    let result = vm.deliver(&request, artifact.clone(), &cx).await;
    assert!(matches!(result, Err(BuildError::Cancelled)), "{result:?}");
    assert_local_files_gone(&artifact);
    // Checked at once: the abort the store spawns when the upload is
    // dropped may still be on its way; the step's own cleanup is not.
    assert!(open_multipart_uploads(&store).await.is_empty());
    assert!(keys(&store).await.is_empty());
}

#[tokio::test]
async fn an_image_changed_since_its_tests_is_taken_back_out_of_the_bucket() {
    s3_endpoint();
    let h = Harness::new("vm");
    let (bucket, store) = bucket(true).await;
    let request = h.request(image_info("web", "5.0.0"), Vec::new());
    let out = h.config_dir.path().join("output");
    let vm = builder(&out, &format!("s3://{bucket}/"));
    let artifact = exported(&out, "web-5.0.0.qcow2", 1 << 20);
    let mut bytes = std::fs::read(&artifact.files[0].path).unwrap();
    bytes[4096] ^= 1;
    std::fs::write(&artifact.files[0].path, bytes).unwrap();

    let failed = failure(vm.deliver(&request, artifact.clone(), &h.cx).await);
    assert!(
        failed.contains("changed since it was built and tested"),
        "{failed}"
    );
    assert_local_files_gone(&artifact);
    assert!(keys(&store).await.is_empty(), "the upload is removed again");
    assert!(
        h.sink.events().iter().any(|event| matches!(
            event,
            Event::Message { message, .. } if message.contains("removed s3://") && message.contains("web-5.0.0.qcow2 again")
        )),
        "{}",
        h.transcript()
    );
}

/// Each object is in the run journal while it goes up and released once
/// the delivery is over; what a run killed mid-upload left (an open
/// multipart upload, a whole object never recorded) is found from its
/// record and removed by `imgbuild clean`'s orphan cleaning.
#[tokio::test]
async fn uploads_are_journalled_while_they_run_and_a_dead_runs_are_cleaned_from_the_record() {
    use imgbuild_builders::common::orphans::{Removal, clean_orphan};
    use imgbuild_builders::qemu::kind::QemuResource;
    s3_endpoint();
    let h = Harness::new("vm");
    let (bucket, store) = bucket(true).await;
    let request = h.request(image_info("web", "6.0.0"), Vec::new());
    let out = h.config_dir.path().join("output");
    let location = format!("s3://{bucket}/vm/");
    let vm = builder(&out, &location);
    let artifact = exported(&out, "web-6.0.0.qcow2", 20 << 20);

    let journal_slot: Arc<std::sync::Mutex<Option<Arc<Journal>>>> = Default::default();
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let (cx, _sink, _state) = context_with(
        {
            let (journal_slot, seen) = (journal_slot.clone(), seen.clone());
            move || {
                let journal = journal_slot.lock().unwrap().clone().unwrap();
                *seen.lock().unwrap() = journal
                    .outstanding()
                    .iter()
                    .map(|item| item.resource.describe())
                    .collect();
            }
        },
        CancellationToken::new(),
    );
    *journal_slot.lock().unwrap() = Some(cx.journal.clone());
    vm.deliver(&request, artifact, &cx).await.unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [format!("the S3 upload {location}web-6.0.0.qcow2")],
        "recorded before the first part went up"
    );
    assert!(
        cx.journal.outstanding().is_empty(),
        "released once delivered"
    );

    // What a killed run leaves: an object stored whole but never recorded,
    // and a multipart upload with a part in.
    let orphan = |name: &str| -> imgbuild_core::Resource {
        QemuResource::Upload {
            location: location.clone(),
            name: name.to_owned(),
        }
        .into()
    };
    store
        .put_if_absent("vm/web-7.0.0.qcow2.sha256", b"x".to_vec())
        .await
        .unwrap();
    let started = store
        .client()
        .create_multipart_upload()
        .bucket(&bucket)
        .key("vm/web-7.0.0.qcow2")
        .send()
        .await
        .unwrap();
    store
        .client()
        .upload_part()
        .bucket(&bucket)
        .key("vm/web-7.0.0.qcow2")
        .upload_id(started.upload_id().unwrap())
        .part_number(1)
        .body(vec![7u8; 1 << 20].into())
        .send()
        .await
        .unwrap();
    assert_eq!(open_multipart_uploads(&store).await.len(), 1);
    for name in ["web-7.0.0.qcow2", "web-7.0.0.qcow2.sha256"] {
        assert_eq!(
            clean_orphan(&orphan(name), "run").await.unwrap(),
            Removal::Removed,
            "{name}"
        );
        assert_eq!(
            clean_orphan(&orphan(name), "run").await.unwrap(),
            Removal::Absent,
            "{name} a second time"
        );
    }
    assert!(open_multipart_uploads(&store).await.is_empty());
    assert_eq!(
        keys(&store).await,
        ["vm/web-6.0.0.qcow2", "vm/web-6.0.0.qcow2.sha256"],
        "the delivered version stays"
    );
}
