//! An artifact between the build and the manifest. Testing and delivering a
//! version can take minutes; a run killed meanwhile would leave files, an
//! image or AMIs that no manifest names and no journal remembers. So what
//! removes the artifact ([`Builder::unrecorded`]) is recorded in the run
//! journal as soon as the builder hands it over, and released once the
//! manifest records the version.

use imgbuild_builders::{Artifact, Builder};
use imgbuild_core::{Resource, ResourceId, StepContext};
use std::path::PathBuf;

pub struct Unrecorded {
    /// Each record, with the file it names when it names one.
    records: Vec<(ResourceId, Option<PathBuf>)>,
}

impl Unrecorded {
    pub fn journal(builder: &dyn Builder, artifact: &Artifact, cx: &StepContext) -> Unrecorded {
        let mut records = Vec::new();
        for resource in builder.unrecorded(artifact) {
            let path = match &resource {
                Resource::ArtifactFile { path, .. } => Some(path.clone()),
                _ => None,
            };
            let description = resource.describe();
            match cx.journal.record(cx.build_name(), resource) {
                Ok(id) => records.push((id, path)),
                Err(err) => cx.log.warn(format!(
                    "cannot record {description} in the run journal ({err}); if this run is killed before the manifest records it, remove it by hand"
                )),
            }
        }
        Unrecorded { records }
    }

    /// The manifest records the version: what was recorded is its now.
    pub fn recorded(self, cx: &StepContext) {
        self.release(cx, |_| true);
    }

    /// The version is not recorded, and the run goes on to say so. Files
    /// still there stay in the journal for `imgbuild clean`; the rest is as
    /// the failed step left it (a failed push or upload removes the image
    /// or file itself).
    pub fn abandoned(self, cx: &StepContext) {
        self.release(cx, |path| path.is_none_or(|path| !path.exists()));
    }

    fn release(self, cx: &StepContext, settled: impl Fn(Option<&PathBuf>) -> bool) {
        for (id, path) in self.records {
            if settled(path.as_ref())
                && let Err(err) = cx.journal.release(id)
            {
                cx.log.warn(format!("cannot update the run journal: {err}"));
            }
        }
    }
}
