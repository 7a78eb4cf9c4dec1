//! Temporary files and directories a step creates, recorded in the run
//! journal before they exist and released once removed.

use imgbuild_core::{Resource, ResourceId, StepContext, StepError};
use std::io;
use std::path::{Path, PathBuf};

/// Records `resource` for the current build before the caller creates it.
pub fn record(cx: &StepContext, resource: Resource) -> Result<ResourceId, StepError> {
    cx.journal
        .record(cx.build_name(), resource)
        .map_err(StepError::failed)
}

pub fn release(cx: &StepContext, id: ResourceId) -> Result<(), StepError> {
    cx.journal.release(id).map_err(StepError::failed)
}

/// A path a step owns and removes on cleanup.
#[derive(Debug)]
pub struct TrackedPath {
    pub id: ResourceId,
    pub path: PathBuf,
    pub is_dir: bool,
}

impl TrackedPath {
    pub fn file(cx: &StepContext, path: PathBuf) -> Result<Self, StepError> {
        let id = record(cx, Resource::File { path: path.clone() })?;
        Ok(TrackedPath {
            id,
            path,
            is_dir: false,
        })
    }

    pub fn dir(cx: &StepContext, path: PathBuf) -> Result<Self, StepError> {
        let id = record(cx, Resource::Directory { path: path.clone() })?;
        Ok(TrackedPath {
            id,
            path,
            is_dir: true,
        })
    }

    pub async fn remove(self, cx: &StepContext) -> Result<(), StepError> {
        remove_path(&self.path, self.is_dir).await.map_err(|err| {
            StepError::failed(format!("cannot remove {}: {err}", self.path.display()))
        })?;
        release(cx, self.id)
    }

    /// The path stays (it became an artifact); the journal forgets it.
    pub fn keep(self, cx: &StepContext) -> Result<PathBuf, StepError> {
        release(cx, self.id)?;
        Ok(self.path)
    }
}

/// Removes a file or tree; one that is already gone is fine.
pub async fn remove_path(path: &Path, is_dir: bool) -> io::Result<()> {
    let result = if is_dir {
        tokio::fs::remove_dir_all(path).await
    } else {
        tokio::fs::remove_file(path).await
    };
    match result {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}
