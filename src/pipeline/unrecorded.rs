//! An artifact's local files between the build and the manifest. Testing
//! and delivering a version can take minutes; a run killed meanwhile would
//! leave files that no manifest names and no journal remembers. So they
//! are recorded in the run journal as soon as the builder hands the
//! artifact over, and released once the manifest records the version or
//! they are gone. Images and AMIs are not covered here: their builders
//! release their records when the build ends.

use imgbuild_builders::Artifact;
use imgbuild_builders::common::artifact::checksum_path;
use imgbuild_core::{Resource, ResourceId, StepContext};
use std::path::PathBuf;

pub struct Unrecorded {
    records: Vec<(ResourceId, PathBuf)>,
}

impl Unrecorded {
    /// Records `artifact`'s files (and their checksum files).
    pub fn journal(artifact: &Artifact, cx: &StepContext) -> Unrecorded {
        let paths = artifact
            .files
            .iter()
            .flat_map(|file| [file.path.clone(), checksum_path(&file.path)])
            .filter(|path| path.exists());
        let mut records = Vec::new();
        for path in paths {
            match cx
                .journal
                .record(cx.build_name(), Resource::File { path: path.clone() })
            {
                Ok(id) => records.push((id, path)),
                Err(err) => cx.log.warn(format!(
                    "cannot record {} in the run journal ({err}); if this run is killed before the manifest records it, remove it by hand",
                    path.display()
                )),
            }
        }
        Unrecorded { records }
    }

    /// The manifest records the version: the files are its now.
    pub fn recorded(self, cx: &StepContext) {
        self.release(cx, |_| true);
    }

    /// The version is not recorded: files still there stay in the journal,
    /// for `imgbuild clean` to remove; those already gone are let go.
    pub fn abandoned(self, cx: &StepContext) {
        self.release(cx, |path| !path.exists());
    }

    fn release(self, cx: &StepContext, settled: impl Fn(&std::path::Path) -> bool) {
        for (id, path) in self.records {
            if settled(&path)
                && let Err(err) = cx.journal.release(id)
            {
                cx.log.warn(format!("cannot update the run journal: {err}"));
            }
        }
    }
}
