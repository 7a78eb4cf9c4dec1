//! The object store in an S3 bucket (`s3://bucket/prefix`), through the AWS
//! SDK: conditional PUTs (`If-None-Match: *`, `If-Match: <etag>`) for small
//! objects, multipart uploads with a SHA-256 per part and ranged GETs for
//! files, each in parallel.

use super::local::temp_beside;
use super::{
    Listed, Object, ObjectStore, ObjectStoreError, Progress, Uploaded, Version, check_key,
    check_prefix,
};
use crate::common::artifact::sha256_file;
use async_trait::async_trait;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart};
use base64::Engine;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// S3 allows at most this many parts in one multipart upload.
const MAX_PARTS: u64 = 10_000;
/// S3 refuses parts smaller than this, the last one excepted.
const MIN_PART_SIZE: u64 = 5 << 20;

#[derive(Debug, Clone)]
pub struct S3Options {
    /// The S3 endpoint when it is not AWS's own (moto, MinIO); otherwise
    /// `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`, which the SDK reads.
    pub endpoint_url: Option<String>,
    /// Otherwise the AWS chain's (`AWS_REGION`, the profile), else us-east-1.
    pub region: Option<String>,
    /// Bytes per part of a multipart upload and per ranged GET; files no
    /// larger go up in one PUT.
    pub part_size: u64,
    /// Parts or ranges in flight at once.
    pub concurrency: usize,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options {
            endpoint_url: None,
            region: None,
            part_size: 8 << 20,
            concurrency: 4,
        }
    }
}

#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Empty, or ending in `/`.
    prefix: String,
    part_size: u64,
    concurrency: usize,
    /// The endpoint when it is not AWS's own, for [`S3Store::https_url`].
    endpoint: Option<String>,
    region: String,
}

/// `s3://bucket/prefix` split into the bucket and the prefix (empty, or
/// ending in `/`).
pub(super) fn parse_url(url: &str) -> Result<(String, String), ObjectStoreError> {
    let invalid = |reason| ObjectStoreError::InvalidLocation {
        location: url.to_owned(),
        reason,
    };
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| invalid("it does not start with s3://"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(invalid("it names no bucket"));
    }
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return Ok((bucket.to_owned(), String::new()));
    }
    check_key(prefix)
        .map_err(|_| invalid("its prefix has an empty segment or one starting with `.`"))?;
    Ok((bucket.to_owned(), format!("{prefix}/")))
}

fn env_endpoint() -> Option<String> {
    ["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"]
        .iter()
        .filter_map(|name| std::env::var(name).ok())
        .find(|url| !url.trim().is_empty())
}

/// Error codes that mean the credentials, not the request, were refused.
const AUTH_CODES: &[&str] = &[
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
];

impl S3Store {
    /// The store at `url` (`s3://bucket/prefix`), with credentials and
    /// region from the standard AWS chain (environment, profiles and SSO,
    /// container and instance roles), as the EC2 builder loads them.
    pub async fn open(url: &str, options: S3Options) -> Result<S3Store, ObjectStoreError> {
        let (bucket, prefix) = parse_url(url)?;
        let region = RegionProviderChain::first_try(options.region.clone().map(Region::new))
            .or_default_provider()
            // S3 needs some region to sign with; us-east-1 is the one
            // whose endpoint answers for every bucket with a redirect hint.
            .or_else(Region::from_static("us-east-1"));
        // Pinned rather than `latest()`, so an SDK upgrade cannot change
        // retry or timeout behaviour without this line changing too.
        let sdk = aws_config::defaults(BehaviorVersion::v2026_01_12())
            .region(region)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(8)
                    .with_max_backoff(Duration::from_secs(20)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    // One attempt of one part on a slow uplink; a stalled
                    // transfer is caught sooner by the SDK's stall guard.
                    .operation_attempt_timeout(Duration::from_secs(600))
                    .build(),
            )
            .load()
            .await;
        let mut config = aws_sdk_s3::config::Builder::from(&sdk);
        let custom_endpoint = options
            .endpoint_url
            .clone()
            .or_else(|| sdk.endpoint_url().map(str::to_owned))
            .or_else(env_endpoint);
        if let Some(url) = &options.endpoint_url {
            config = config.endpoint_url(url);
        }
        let region = sdk
            .region()
            .map_or_else(|| "us-east-1".to_owned(), |r| r.as_ref().to_owned());
        if custom_endpoint.is_some() {
            // moto, MinIO and Ceph serve buckets as paths; AWS's
            // virtual-hosted names need DNS those endpoints do not have.
            config = config.force_path_style(true);
        }
        let mut store = S3Store::with_client(
            Client::from_conf(config.build()),
            &bucket,
            &prefix,
            &options,
        );
        store.endpoint = custom_endpoint;
        store.region = region;
        Ok(store)
    }

    fn with_client(client: Client, bucket: &str, prefix: &str, options: &S3Options) -> S3Store {
        S3Store {
            client,
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            part_size: options.part_size.max(MIN_PART_SIZE),
            concurrency: options.concurrency.max(1),
            endpoint: None,
            region: "us-east-1".to_owned(),
        }
    }

    /// The SDK client the store uses.
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Aborts every unfinished multipart upload of `key`, and says how
    /// many there were: for a dead run's upload, whose key is its own.
    pub async fn abort_uploads_of(&self, key: &str) -> Result<usize, String> {
        let store = self;
        let object_key = store.object_key(key);
        let listed = store
            .client()
            .list_multipart_uploads()
            .bucket(store.bucket())
            .prefix(&object_key)
            .send()
            .await
            .map_err(|err| aws_sdk_s3::error::DisplayErrorContext(err).to_string())?;
        let mut aborted_count = 0;
        for upload in listed.uploads() {
            if upload.key() != Some(object_key.as_str()) {
                continue;
            }
            let Some(id) = upload.upload_id() else {
                continue;
            };
            aborted_count += 1;
            let aborted = store
                .client()
                .abort_multipart_upload()
                .bucket(store.bucket())
                .key(&object_key)
                .upload_id(id)
                .send()
                .await;
            if let Err(err) = aborted
                && err
                    .raw_response()
                    .is_none_or(|r| r.status().as_u16() != 404)
            {
                return Err(aws_sdk_s3::error::DisplayErrorContext(err).to_string());
            }
        }
        Ok(aborted_count)
    }

    /// The object key in the bucket for a store key.
    pub fn object_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The object's `https://` address: virtual-hosted on AWS (path-style
    /// for bucket names with dots, which the wildcard certificate does not
    /// cover), path-style on another endpoint, as the client reaches it.
    pub fn https_url(&self, key: &str) -> String {
        let object_key = self.object_key(key);
        let (base, path): (String, Vec<&str>) = match &self.endpoint {
            Some(endpoint) => (
                endpoint.clone(),
                std::iter::once(self.bucket.as_str())
                    .chain(object_key.split('/'))
                    .collect(),
            ),
            None if self.bucket.contains('.') => (
                format!("https://s3.{}.amazonaws.com", self.region),
                std::iter::once(self.bucket.as_str())
                    .chain(object_key.split('/'))
                    .collect(),
            ),
            None => (
                format!("https://{}.s3.{}.amazonaws.com", self.bucket, self.region),
                object_key.split('/').collect(),
            ),
        };
        match reqwest::Url::parse(&base) {
            Ok(mut url) => {
                if let Ok(mut segments) = url.path_segments_mut() {
                    segments.pop_if_empty().extend(path);
                }
                url.to_string()
            }
            Err(_) => format!("{}/{}", base.trim_end_matches('/'), path.join("/")),
        }
    }

    /// The size of the object at `key`, `None` when there is none. A
    /// missing bucket also answers 404 to a HEAD (which has no body to say
    /// which): [`S3Store::check_bucket`] first tells the two apart.
    pub async fn head(&self, key: &str) -> Result<Option<u64>, ObjectStoreError> {
        check_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .send()
            .await
        {
            Ok(head) => Ok(Some(head.content_length.unwrap_or_default().max(0) as u64)),
            Err(err)
                if err
                    .raw_response()
                    .is_some_and(|r| r.status().as_u16() == 404) =>
            {
                Ok(None)
            }
            Err(err) => Err(self.error("HeadObject", key, err)),
        }
    }

    /// Whether the bucket exists and these credentials may use it
    /// (HeadBucket): a missing bucket is a `Service` error with the code
    /// `NoSuchBucket`, refused credentials an `Auth` error.
    pub async fn check_bucket(&self) -> Result<(), ObjectStoreError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(err)
                if err
                    .raw_response()
                    .is_some_and(|r| r.status().as_u16() == 404) =>
            {
                Err(ObjectStoreError::Service {
                    store: self.location(),
                    key: self.bucket.clone(),
                    operation: "HeadBucket",
                    status: Some(404),
                    code: Some("NoSuchBucket".to_owned()),
                    message: format!(
                        "the bucket {} does not exist; create it, or correct the URL",
                        self.bucket
                    ),
                })
            }
            Err(err) => Err(self.error("HeadBucket", &self.bucket, err)),
        }
    }

    /// What a failed call means: a lost race, refused credentials, or
    /// anything else with AWS's own words.
    fn error<E>(
        &self,
        operation: &'static str,
        key: &str,
        err: SdkError<E, HttpResponse>,
    ) -> ObjectStoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().map(str::to_owned);
        let store = self.location();
        let key = key.to_owned();
        // 409 ConditionalRequestConflict: another conditional write to the
        // key was in flight; AWS asks for the same retry as a 412.
        if status == Some(412)
            || matches!(
                code.as_deref(),
                Some("PreconditionFailed" | "ConditionalRequestConflict")
            )
        {
            return ObjectStoreError::PreconditionFailed { store, key };
        }
        let context = DisplayErrorContext(&err).to_string();
        let message = match &err {
            SdkError::ServiceError(_) => {
                let text = err.message().unwrap_or("(S3 gave no message)");
                match code.as_deref() {
                    Some(code) => format!("{code}: {text}"),
                    None => format!("HTTP {}: {text}", status.unwrap_or_default()),
                }
            }
            SdkError::TimeoutError(_) => "no answer before the timeout".to_owned(),
            SdkError::DispatchFailure(_) => {
                format!("could not reach S3 ({context}); check the network and the endpoint")
            }
            _ => context.clone(),
        };
        let refused_credentials = matches!(status, Some(401 | 403))
            || code.as_deref().is_some_and(|c| AUTH_CODES.contains(&c))
            // The chain found no credentials at all: the SDK says so
            // before any request is sent.
            || (status.is_none() && context.to_ascii_lowercase().contains("credentials"));
        if refused_credentials {
            return ObjectStoreError::Auth {
                store,
                key,
                operation,
                message,
            };
        }
        let hint = match code.as_deref() {
            Some("NoSuchBucket") => "; create the bucket, or correct the URL",
            Some("PermanentRedirect" | "AuthorizationHeaderMalformed") => {
                "; the bucket is in another region: set AWS_REGION to it"
            }
            _ if status == Some(301) => "; the bucket is in another region: set AWS_REGION to it",
            _ => "",
        };
        ObjectStoreError::Service {
            store,
            key,
            operation,
            status,
            code,
            message: format!("{message}{hint}"),
        }
    }

    async fn put(
        &self,
        key: &str,
        bytes: Vec<u8>,
        condition: Condition<'_>,
    ) -> Result<Version, ObjectStoreError> {
        check_key(key)?;
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .checksum_sha256(base64_sha256(&bytes))
            .body(ByteStream::from(bytes));
        request = match condition {
            Condition::Absent => request.if_none_match("*"),
            Condition::Matches(version) => request.if_match(&version.0),
            Condition::None => request,
        };
        let output = request.send().await.map_err(|err| {
            let err = self.error("PutObject", key, err);
            match (condition, err) {
                // Removed since it was read: S3 answers 404 to If-Match on a
                // missing key, and the version read is gone all the same.
                (
                    Condition::Matches(_),
                    ObjectStoreError::Service {
                        status: Some(404), ..
                    },
                ) => ObjectStoreError::PreconditionFailed {
                    store: self.location(),
                    key: key.to_owned(),
                },
                (_, err) => err,
            }
        })?;
        Ok(Version(output.e_tag.unwrap_or_default()))
    }

    async fn upload_parts(
        &self,
        key: &str,
        path: &Path,
        source: Arc<File>,
        upload_id: &str,
        size: u64,
        progress: Progress<'_>,
    ) -> Result<Vec<CompletedPart>, ObjectStoreError> {
        let part_size = self.part_size.max(size.div_ceil(MAX_PARTS));
        let count = size.div_ceil(part_size);
        let object_key = self.object_key(key);
        let failed = AtomicBool::new(false);
        let done = AtomicU64::new(0);
        let uploads = futures_util::stream::iter(1..=count).map(|number| {
            let (source, object_key, failed, done) = (source.clone(), &object_key, &failed, &done);
            async move {
                // Parts not started once one failed are never sent: the
                // upload is aborted as soon as those in flight settle.
                if failed.load(Ordering::SeqCst) {
                    return None;
                }
                let offset = (number - 1) * part_size;
                let length = part_size.min(size - offset);
                let part = self
                    .upload_part(
                        key, path, source, object_key, upload_id, number, offset, length,
                    )
                    .await;
                match &part {
                    Ok(_) => {
                        let now = done.fetch_add(length, Ordering::SeqCst) + length;
                        progress(now, size);
                    }
                    Err(_) => failed.store(true, Ordering::SeqCst),
                }
                Some(part)
            }
        });
        // Every started part is awaited, failed or not, so none is still in
        // flight (and able to land after the abort) when this returns.
        let results: Vec<_> = uploads.buffer_unordered(self.concurrency).collect().await;
        let mut parts = Vec::with_capacity(results.len());
        for result in results.into_iter().flatten() {
            parts.push(result?);
        }
        parts.sort_by_key(|p: &CompletedPart| p.part_number);
        Ok(parts)
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_part(
        &self,
        key: &str,
        path: &Path,
        source: Arc<File>,
        object_key: &str,
        upload_id: &str,
        number: u64,
        offset: u64,
        length: u64,
    ) -> Result<CompletedPart, ObjectStoreError> {
        let read_path = path.to_path_buf();
        let (bytes, checksum) = tokio::task::spawn_blocking(move || {
            let mut buffer = vec![0u8; length as usize];
            source.read_exact_at(&mut buffer, offset)?;
            let checksum = base64_sha256(&buffer);
            Ok::<_, io::Error>((buffer, checksum))
        })
        .await
        .map_err(|join| io::Error::other(join.to_string()))
        .and_then(|read| read)
        .map_err(|err| match err.kind() {
            io::ErrorKind::UnexpectedEof => ObjectStoreError::SourceChanged {
                store: self.location(),
                key: key.to_owned(),
                path: read_path.clone(),
                detail: format!("it ended before byte {}", offset + length),
            },
            _ => ObjectStoreError::Io {
                action: "read",
                path: read_path.clone(),
                source: err,
            },
        })?;
        let output = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(object_key)
            .upload_id(upload_id)
            .part_number(number as i32)
            .checksum_sha256(&checksum)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(|err| self.error("UploadPart", key, err))?;
        Ok(CompletedPart::builder()
            .part_number(number as i32)
            .set_e_tag(output.e_tag)
            .checksum_sha256(checksum)
            .build())
    }

    async fn upload_multipart(
        &self,
        key: &str,
        path: &Path,
        source: File,
        size: u64,
        progress: Progress<'_>,
    ) -> Result<Uploaded, ObjectStoreError> {
        let before = source
            .metadata()
            .map_err(|err| io_err("inspect", path, err))?;
        let source = Arc::new(source);
        let object_key = self.object_key(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&object_key)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .map_err(|err| self.error("CreateMultipartUpload", key, err))?;
        let upload_id = created.upload_id.unwrap_or_default();
        let mut abort = AbortOnDrop {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: object_key.clone(),
            upload_id: Some(upload_id.clone()),
        };
        let attempt = async {
            // The whole file's hash, read once more beside the parts' reads.
            let hash_path = path.to_path_buf();
            let whole = tokio::task::spawn_blocking(move || sha256_file(&hash_path));
            let parts = self
                .upload_parts(key, path, source.clone(), &upload_id, size, progress)
                .await?;
            let (hashed, sha256) = whole
                .await
                .map_err(|join| io::Error::other(join.to_string()))
                .and_then(|hashed| hashed)
                .map_err(|err| io_err("hash", path, err))?;
            let after = source
                .metadata()
                .map_err(|err| io_err("inspect", path, err))?;
            if hashed != size
                || after.len() != size
                || after.modified().ok() != before.modified().ok()
            {
                return Err(ObjectStoreError::SourceChanged {
                    store: self.location(),
                    key: key.to_owned(),
                    path: path.to_path_buf(),
                    detail: format!("{size} bytes when the upload started, {} now", after.len()),
                });
            }
            let completed = self
                .client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&object_key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|err| self.error("CompleteMultipartUpload", key, err))?;
            Ok(Uploaded {
                size,
                sha256,
                version: Version(completed.e_tag.unwrap_or_default()),
            })
        };
        match attempt.await {
            Ok(uploaded) => {
                abort.upload_id = None;
                Ok(uploaded)
            }
            Err(err) => match abort.now().await {
                Ok(()) => Err(err),
                Err(abort_err) => Err(ObjectStoreError::Service {
                    store: self.location(),
                    key: key.to_owned(),
                    operation: "AbortMultipartUpload",
                    status: None,
                    code: None,
                    message: format!(
                        "{}, after the upload failed ({err}); its parts stay in the bucket (and are billed) until an AbortMultipartUpload of upload {} or a lifecycle rule removes them",
                        DisplayErrorContext(&abort_err),
                        upload_id
                    ),
                }),
            },
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn download_range(
        &self,
        key: &str,
        object_key: &str,
        version: &str,
        file: Arc<File>,
        temp_path: &Path,
        offset: u64,
        length: u64,
    ) -> Result<(), ObjectStoreError> {
        let output = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(object_key)
            .range(format!("bytes={offset}-{}", offset + length - 1))
            // Every range of one version: a replacement mid-download is a
            // 412, never a file spliced from two objects.
            .if_match(version)
            .send()
            .await
            .map_err(|err| self.error("GetObject", key, err))?;
        let bytes = output
            .body
            .collect()
            .await
            .map_err(|err| ObjectStoreError::Service {
                store: self.location(),
                key: key.to_owned(),
                operation: "GetObject",
                status: None,
                code: None,
                message: format!("the download broke off: {}", DisplayErrorContext(&err)),
            })?
            .into_bytes();
        if bytes.len() as u64 != length {
            return Err(ObjectStoreError::Service {
                store: self.location(),
                key: key.to_owned(),
                operation: "GetObject",
                status: None,
                code: None,
                message: format!(
                    "asked for {length} bytes at {offset}, got {}; download it again",
                    bytes.len()
                ),
            });
        }
        let temp_path = temp_path.to_path_buf();
        tokio::task::spawn_blocking(move || file.write_all_at(&bytes, offset))
            .await
            .map_err(|join| io::Error::other(join.to_string()))
            .and_then(|written| written)
            .map_err(|err| io_err("write", &temp_path, err))
    }
}

#[derive(Clone, Copy)]
enum Condition<'a> {
    Absent,
    Matches(&'a Version),
    None,
}

fn base64_sha256(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(bytes))
}

fn io_err(action: &'static str, path: &Path, source: io::Error) -> ObjectStoreError {
    ObjectStoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Aborts the multipart upload unless it completed, also when the upload's
/// future is dropped midway (a cancelled build), so no parts are left
/// behind.
struct AbortOnDrop {
    client: Client,
    bucket: String,
    key: String,
    upload_id: Option<String>,
}

impl AbortOnDrop {
    async fn now(
        &mut self,
    ) -> Result<
        (),
        SdkError<
            aws_sdk_s3::operation::abort_multipart_upload::AbortMultipartUploadError,
            HttpResponse,
        >,
    > {
        let Some(upload_id) = self.upload_id.take() else {
            return Ok(());
        };
        let aborted = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&upload_id)
            .send()
            .await;
        match aborted {
            Ok(_) => Ok(()),
            // Already gone: nothing is left behind, which is the point.
            Err(err)
                if err
                    .raw_response()
                    .is_some_and(|r| r.status().as_u16() == 404) =>
            {
                Ok(())
            }
            Err(err) => Err(err),
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        let Some(upload_id) = self.upload_id.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let request = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(upload_id);
            runtime.spawn(async move {
                let _ = request.send().await;
            });
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    async fn get(&self, key: &str) -> Result<Option<Object>, ObjectStoreError> {
        check_key(key)?;
        let output = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .send()
            .await
        {
            Ok(output) => output,
            Err(err)
                if err
                    .raw_response()
                    .is_some_and(|r| r.status().as_u16() == 404)
                    && err.code() != Some("NoSuchBucket") =>
            {
                return Ok(None);
            }
            Err(err) => return Err(self.error("GetObject", key, err)),
        };
        let version = Version(output.e_tag.unwrap_or_default());
        let bytes = output
            .body
            .collect()
            .await
            .map_err(|err| ObjectStoreError::Service {
                store: self.location(),
                key: key.to_owned(),
                operation: "GetObject",
                status: None,
                code: None,
                message: format!("the download broke off: {}", DisplayErrorContext(&err)),
            })?
            .into_bytes()
            .to_vec();
        Ok(Some(Object { bytes, version }))
    }

    async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<Version, ObjectStoreError> {
        self.put(key, bytes, Condition::Absent).await
    }

    async fn put_if_match(
        &self,
        key: &str,
        bytes: Vec<u8>,
        version: &Version,
    ) -> Result<Version, ObjectStoreError> {
        self.put(key, bytes, Condition::Matches(version)).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Listed>, ObjectStoreError> {
        check_prefix(prefix)?;
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.object_key(prefix))
            .into_paginator()
            .send();
        let mut found = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|err| self.error("ListObjectsV2", prefix, err))?;
            for object in page.contents() {
                let Some(key) = object.key().and_then(|k| k.strip_prefix(&self.prefix)) else {
                    continue;
                };
                found.push(Listed {
                    key: key.to_owned(),
                    size: object.size().unwrap_or_default().max(0) as u64,
                    modified: object
                        .last_modified()
                        .and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                });
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectStoreError> {
        check_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .send()
            .await
            .map_err(|err| self.error("DeleteObject", key, err))?;
        Ok(())
    }

    async fn delete_if_match(&self, key: &str, version: &Version) -> Result<(), ObjectStoreError> {
        check_key(key)?;
        let sent = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .if_match(&version.0)
            .send()
            .await;
        match sent.map_err(|err| self.error("DeleteObject", key, err)) {
            // S3 answers 404 to If-Match on a key removed already.
            Ok(_)
            | Err(ObjectStoreError::Service {
                status: Some(404), ..
            }) => Ok(()),
            Err(err) => Err(err),
        }
    }

    async fn upload_file(
        &self,
        key: &str,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<Uploaded, ObjectStoreError> {
        check_key(key)?;
        let source = File::open(path).map_err(|err| io_err("open", path, err))?;
        let size = source
            .metadata()
            .map_err(|err| io_err("inspect", path, err))?
            .len();
        if size > self.part_size {
            return self
                .upload_multipart(key, path, source, size, progress)
                .await;
        }
        let read_path = path.to_path_buf();
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(&read_path))
            .await
            .map_err(|join| io::Error::other(join.to_string()))
            .and_then(|read| read)
            .map_err(|err| io_err("read", path, err))?;
        let (size, sha256) = (bytes.len() as u64, hex::encode(Sha256::digest(&bytes)));
        let version = self.put(key, bytes, Condition::None).await?;
        progress(size, size);
        Ok(Uploaded {
            size,
            sha256,
            version,
        })
    }

    async fn download_file(
        &self,
        key: &str,
        path: &Path,
        expected_sha256: &str,
        progress: Progress<'_>,
    ) -> Result<u64, ObjectStoreError> {
        check_key(key)?;
        let object_key = self.object_key(key);
        let head = match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&object_key)
            .send()
            .await
        {
            Ok(head) => head,
            Err(err)
                if err
                    .raw_response()
                    .is_some_and(|r| r.status().as_u16() == 404) =>
            {
                return Err(ObjectStoreError::NotFound {
                    store: self.location(),
                    key: key.to_owned(),
                });
            }
            Err(err) => return Err(self.error("HeadObject", key, err)),
        };
        let size = head.content_length.unwrap_or_default().max(0) as u64;
        let version = head.e_tag.unwrap_or_default();
        let temp = {
            let target = path.to_path_buf();
            tokio::task::spawn_blocking(move || temp_beside(&target))
                .await
                .map_err(|join| {
                    io_err(
                        "create a temporary file for",
                        path,
                        io::Error::other(join.to_string()),
                    )
                })??
        };
        let temp_path = temp.path().to_path_buf();
        let file = Arc::new(
            temp.as_file()
                .try_clone()
                .map_err(|err| io_err("open", &temp_path, err))?,
        );
        file.set_len(size)
            .map_err(|err| io_err("size", &temp_path, err))?;
        let done = AtomicU64::new(0);
        let part_size = self.part_size;
        let ranges =
            futures_util::stream::iter((0..size).step_by(part_size as usize)).map(|offset| {
                let (file, object_key, version, temp_path, done) =
                    (file.clone(), &object_key, &version, &temp_path, &done);
                async move {
                    let length = part_size.min(size - offset);
                    self.download_range(key, object_key, version, file, temp_path, offset, length)
                        .await?;
                    let now = done.fetch_add(length, Ordering::SeqCst) + length;
                    progress(now, size);
                    Ok::<_, ObjectStoreError>(())
                }
            });
        let mut ranges = ranges.buffer_unordered(self.concurrency);
        while let Some(range) = ranges.next().await {
            range?;
        }
        drop(ranges);
        let hash_path = temp_path.clone();
        let (hashed, sha256) = tokio::task::spawn_blocking(move || {
            file.sync_all()?;
            sha256_file(&hash_path)
        })
        .await
        .map_err(|join| io::Error::other(join.to_string()))
        .and_then(|hashed| hashed)
        .map_err(|err| io_err("hash", &temp_path, err))?;
        if !sha256.eq_ignore_ascii_case(expected_sha256) {
            return Err(ObjectStoreError::Integrity {
                store: self.location(),
                key: key.to_owned(),
                expected: expected_sha256.to_owned(),
                actual: sha256,
            });
        }
        temp.persist(path)
            .map_err(|err| io_err("rename into", path, err.error))?;
        Ok(hashed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_bucket_and_prefix() {
        assert_eq!(parse_url("s3://b").unwrap(), ("b".into(), "".into()));
        assert_eq!(parse_url("s3://b/").unwrap(), ("b".into(), "".into()));
        assert_eq!(
            parse_url("s3://b/ci/cache/").unwrap(),
            ("b".into(), "ci/cache/".into())
        );
        for bad in [
            "s3://",
            "s3:///x",
            "s3://b/../x",
            "s3://b/a//c",
            "http://b/x",
        ] {
            assert!(
                matches!(
                    parse_url(bad),
                    Err(ObjectStoreError::InvalidLocation { .. })
                ),
                "{bad} should be refused"
            );
        }
    }
}
