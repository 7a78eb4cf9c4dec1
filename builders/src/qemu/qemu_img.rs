//! Calls to `qemu-img`, the one tool that reads and writes every disk format
//! QEMU does.

use imgbuild_core::StepError;
use std::path::Path;
use tokio::process::Command;

pub async fn run(args: &[&str]) -> Result<String, StepError> {
    let output = Command::new("qemu-img")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|err| {
            StepError::failed(format!(
                "cannot run qemu-img ({err}); install Debian's `qemu-utils` package"
            ))
        })?;
    if !output.status.success() {
        return Err(StepError::failed(format!(
            "`qemu-img {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The format qemu-img detects for an image ("qcow2", "raw", ...).
pub async fn detect_format(path: &Path) -> Result<String, StepError> {
    let path_text = path.to_string_lossy();
    let info = run(&["info", "--output=json", &path_text]).await?;
    let value: serde_json::Value = serde_json::from_str(&info)
        .map_err(|err| StepError::failed(format!("unreadable `qemu-img info` output: {err}")))?;
    value
        .get("format")
        .and_then(|f| f.as_str())
        .map(str::to_owned)
        .ok_or_else(|| {
            StepError::failed(format!("qemu-img reports no format for {}", path.display()))
        })
}
