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

/// Checks a base disk before anything boots from it and returns its
/// format. Only qcow2 and raw are accepted, never a format qemu-img would
/// guess (vmdk, vhdx, ... can reference extents elsewhere), and a qcow2
/// must stand alone: a backing file or an external data file in a hostile
/// image would point at a file on this host, which the guest could then
/// read and the export would bake into the artifact. `qemu-img info` opens
/// the image without its backing chain, so the check itself reads nothing
/// else.
pub async fn inspect_base(path: &Path, declared: Option<&str>) -> Result<String, StepError> {
    let path_text = path.to_string_lossy();
    let mut args = vec!["info", "--output=json"];
    if let Some(format) = declared {
        args.extend(["-f", format]);
    }
    args.push(&path_text);
    let info = run(&args).await?;
    let value: serde_json::Value = serde_json::from_str(&info)
        .map_err(|err| StepError::failed(format!("unreadable `qemu-img info` output: {err}")))?;
    base_problem(&value)
        .map(|problem| {
            Err(StepError::failed(format!(
                "refusing the base image {}: {problem}",
                path.display()
            )))
        })
        .unwrap_or_else(|| Ok(value["format"].as_str().unwrap_or_default().to_owned()))
}

fn base_problem(info: &serde_json::Value) -> Option<String> {
    let format = info["format"].as_str().unwrap_or("unknown");
    if !matches!(format, "qcow2" | "raw") {
        return Some(format!(
            "its format is {format}; only qcow2 and raw bases are accepted (convert it with `qemu-img convert -O qcow2`)"
        ));
    }
    if let Some(backing) = info["backing-filename"].as_str() {
        return Some(format!(
            "it has a backing file ({backing}); flatten it first with `qemu-img convert -O qcow2`"
        ));
    }
    if let Some(data_file) = info["format-specific"]["data"]["data-file"].as_str() {
        return Some(format!(
            "it keeps its data in an external file ({data_file}); convert it to a standalone image with `qemu-img convert -O qcow2`"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_standalone_qcow2_and_raw_bases_pass() {
        let plain = serde_json::json!({"format": "qcow2", "format-specific": {"data": {}}});
        assert_eq!(base_problem(&plain), None);
        assert_eq!(base_problem(&serde_json::json!({"format": "raw"})), None);
        for (info, expected) in [
            (serde_json::json!({"format": "vmdk"}), "format is vmdk"),
            (
                serde_json::json!({"format": "qcow2", "backing-filename": "/etc/shadow"}),
                "/etc/shadow",
            ),
            (
                serde_json::json!({"format": "qcow2", "format-specific": {"data": {"data-file": "/root/x"}}}),
                "/root/x",
            ),
        ] {
            let problem = base_problem(&info).expect("refused");
            assert!(problem.contains(expected), "{problem}");
        }
    }
}
