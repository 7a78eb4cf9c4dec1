//! For tests: a store where another writer changes an object between every
//! read and whatever the reader does next, so that a lost race happens
//! every time instead of once in a while.

use super::{
    Listed, LocalStore, Object, ObjectStore, ObjectStoreError, Progress, Uploaded, Version,
};
use async_trait::async_trait;
use std::path::Path;

/// What the other writer does once `key` was read holding `current`: the
/// bytes it puts there instead, or `None` to leave it.
pub type Meddle = dyn Fn(&str, Option<&[u8]>) -> Option<Vec<u8>> + Send + Sync;

pub struct Meddled {
    inner: LocalStore,
    meddle: Box<Meddle>,
}

impl Meddled {
    pub fn new(
        inner: LocalStore,
        meddle: impl Fn(&str, Option<&[u8]>) -> Option<Vec<u8>> + Send + Sync + 'static,
    ) -> Meddled {
        Meddled {
            inner,
            meddle: Box::new(meddle),
        }
    }
}

impl std::fmt::Debug for Meddled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Meddled({})", self.inner.location())
    }
}

#[async_trait]
impl ObjectStore for Meddled {
    fn location(&self) -> String {
        self.inner.location()
    }
    async fn get(&self, key: &str) -> Result<Option<Object>, ObjectStoreError> {
        let read = self.inner.get(key).await?;
        if let Some(meddled) = (self.meddle)(key, read.as_ref().map(|o| o.bytes.as_slice())) {
            match &read {
                Some(object) => {
                    self.inner
                        .put_if_match(key, meddled, &object.version)
                        .await?
                }
                None => self.inner.put_if_absent(key, meddled).await?,
            };
        }
        Ok(read)
    }
    async fn put_if_absent(&self, key: &str, bytes: Vec<u8>) -> Result<Version, ObjectStoreError> {
        self.inner.put_if_absent(key, bytes).await
    }
    async fn put_if_match(
        &self,
        key: &str,
        bytes: Vec<u8>,
        version: &Version,
    ) -> Result<Version, ObjectStoreError> {
        self.inner.put_if_match(key, bytes, version).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<Listed>, ObjectStoreError> {
        self.inner.list(prefix).await
    }
    async fn delete(&self, key: &str) -> Result<(), ObjectStoreError> {
        self.inner.delete(key).await
    }
    async fn delete_if_match(&self, key: &str, version: &Version) -> Result<(), ObjectStoreError> {
        self.inner.delete_if_match(key, version).await
    }
    async fn upload_file(
        &self,
        key: &str,
        path: &Path,
        progress: Progress<'_>,
    ) -> Result<Uploaded, ObjectStoreError> {
        self.inner.upload_file(key, path, progress).await
    }
    async fn download_file(
        &self,
        key: &str,
        path: &Path,
        expected_sha256: &str,
        progress: Progress<'_>,
    ) -> Result<u64, ObjectStoreError> {
        self.inner
            .download_file(key, path, expected_sha256, progress)
            .await
    }
}
