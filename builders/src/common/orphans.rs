//! Removes what a dead run left behind, from the journal's description alone.

use super::process;
use super::tracked::remove_path;
use imgbuild_core::Resource;
use std::time::Duration;

/// Removes one leftover resource of the run `run_id`. Something already gone
/// counts as removed.
pub async fn clean_orphan(resource: &Resource, run_id: &str) -> Result<(), String> {
    #[cfg(not(feature = "ec2"))]
    let _ = run_id;
    match resource {
        Resource::Process {
            pidfile, marker, ..
        } => {
            if let Some(pid) = process::read_pidfile(pidfile) {
                process::terminate(pid, marker, Duration::from_secs(5)).await;
                if process::is_ours(pid, marker) {
                    return Err(format!("process {pid} did not stop"));
                }
            }
            Ok(())
        }
        Resource::File { path } => remove_path(path, false)
            .await
            .map_err(|err| format!("cannot remove {}: {err}", path.display())),
        Resource::Directory { path } => remove_path(path, true)
            .await
            .map_err(|err| format!("cannot remove {}: {err}", path.display())),
        Resource::DockerContainer { .. } | Resource::DockerImage { .. } => {
            crate::docker::clean_orphan(resource).await
        }
        #[cfg(feature = "ec2")]
        Resource::Ec2Instance { .. }
        | Resource::Ec2KeyPair { .. }
        | Resource::Ec2SecurityGroup { .. }
        | Resource::Ec2Image { .. } => crate::ec2::clean_orphan(resource, run_id).await,
        #[cfg(not(feature = "ec2"))]
        other => Err(format!(
            "{} cannot be removed: this imgbuild was compiled without the `ec2` feature",
            other.describe()
        )),
    }
}
