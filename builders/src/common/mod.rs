//! Pieces every builder uses: artifacts and hashing, tracked temporary
//! resources, the provisioning step, and removal of what dead runs left.

pub mod artifact;
pub mod cache;
pub mod file_listing;
pub mod name_lock;
pub mod object_store;
pub mod orphans;
pub mod outcome;
pub mod process;
pub mod ssh;
pub mod step_provision;
pub mod step_run_tests;
pub mod step_sbom;
pub mod step_store;
#[cfg(test)]
pub mod testing;
pub mod tracked;
