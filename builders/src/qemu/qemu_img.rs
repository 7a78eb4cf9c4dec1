//! Calls to `qemu-img`, the one tool that reads and writes every disk format
//! QEMU does.

use super::config::DiskFormat;
use async_trait::async_trait;
use imgbuild_core::StepError;
use std::path::Path;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

/// What the steps ask of `qemu-img`, behind a trait so their logic can be
/// tested without the tool; [`Tool`] runs the real one.
#[async_trait]
pub trait QemuImg: Send + Sync {
    /// `qemu-img info --output=json`: opens `path` alone (no backing
    /// chain), read as `declared` when given.
    async fn info(
        &self,
        path: &Path,
        declared: Option<DiskFormat>,
    ) -> Result<serde_json::Value, StepError>;

    /// A new qcow2 `disk` whose reads fall through to `backing` (read as
    /// `backing_format`, never probed), grown to `size` bytes when given.
    async fn create_overlay(
        &self,
        disk: &Path,
        backing: &Path,
        backing_format: &str,
        size: Option<u64>,
    ) -> Result<(), StepError>;

    /// `qemu-img rebase -u`: rewrites which file the qcow2 `image` names as
    /// its backing file (read as `backing_format`) without reading or
    /// writing any data. Only sound when the new backing file has the same
    /// content as the old one: a kept layer moved into the step store.
    async fn rebase_unsafe(
        &self,
        image: &Path,
        backing: &Path,
        backing_format: &str,
    ) -> Result<(), StepError>;

    /// Writes `source` with everything it reads through as a standalone
    /// `format` image at `target`, calling `progress` with whole percents.
    async fn convert(
        &self,
        source: &Path,
        target: &Path,
        format: DiskFormat,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), StepError>;
}

/// The `qemu-img` on `PATH`.
pub struct Tool;

fn not_installed(err: std::io::Error) -> StepError {
    StepError::failed(format!(
        "cannot run qemu-img ({err}); install Debian's `qemu-utils` package"
    ))
}

async fn run(args: &[&str]) -> Result<String, StepError> {
    let output = Command::new("qemu-img")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(not_installed)?;
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

#[async_trait]
impl QemuImg for Tool {
    async fn info(
        &self,
        path: &Path,
        declared: Option<DiskFormat>,
    ) -> Result<serde_json::Value, StepError> {
        let path_text = path.to_string_lossy();
        let mut args = vec!["info", "--output=json"];
        if let Some(format) = declared {
            args.extend(["-f", format.as_str()]);
        }
        args.push(&path_text);
        let info = run(&args).await?;
        serde_json::from_str(&info)
            .map_err(|err| StepError::failed(format!("unreadable `qemu-img info` output: {err}")))
    }

    async fn create_overlay(
        &self,
        disk: &Path,
        backing: &Path,
        backing_format: &str,
        size: Option<u64>,
    ) -> Result<(), StepError> {
        let backing = backing.to_string_lossy();
        let disk = disk.to_string_lossy();
        let size = size.map(|bytes| bytes.to_string());
        let mut args = vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            backing_format,
            "-b",
            &backing,
            &disk,
        ];
        args.extend(size.as_deref());
        run(&args).await.map(|_| ())
    }

    async fn rebase_unsafe(
        &self,
        image: &Path,
        backing: &Path,
        backing_format: &str,
    ) -> Result<(), StepError> {
        let (image, backing) = (image.to_string_lossy(), backing.to_string_lossy());
        run(&[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-F",
            backing_format,
            "-b",
            &backing,
            &image,
        ])
        .await
        .map(|_| ())
    }

    async fn convert(
        &self,
        source: &Path,
        target: &Path,
        format: DiskFormat,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<(), StepError> {
        let mut child = Command::new("qemu-img")
            .args(["convert", "-p", "-O", format.as_str()])
            .arg(source)
            .arg(target)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(not_installed)?;
        // `-p` rewrites "(12.34/100%)" in place.
        let mut stdout = child.stdout.take().expect("piped");
        let mut buffer = [0u8; 256];
        let mut pending = String::new();
        let mut last = None;
        loop {
            let read = stdout
                .read(&mut buffer)
                .await
                .map_err(|err| StepError::failed(format!("reading qemu-img progress: {err}")))?;
            if read == 0 {
                break;
            }
            pending.push_str(&String::from_utf8_lossy(&buffer[..read]));
            while let Some(end) = pending.find(['\r', '\n']) {
                let piece: String = pending.drain(..=end).collect();
                if let Some(percent) = parse_progress(&piece) {
                    let whole = percent as u64;
                    if last != Some(whole) {
                        last = Some(whole);
                        progress(whole);
                    }
                }
            }
        }
        let output = child
            .wait_with_output()
            .await
            .map_err(|err| StepError::failed(format!("qemu-img convert: {err}")))?;
        if !output.status.success() {
            return Err(StepError::failed(format!(
                "qemu-img convert failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }
}

fn parse_progress(text: &str) -> Option<f64> {
    let inner = text.trim().trim_start_matches('(');
    let number = inner.split('/').next()?;
    number.trim().parse().ok()
}

/// Checks a base disk before anything boots from it and returns its
/// format. Only qcow2 and raw are accepted, never a format qemu-img would
/// guess (vmdk, vhdx, ... can reference extents elsewhere), and a qcow2
/// must stand alone: a backing file or an external data file in a hostile
/// image would point at a file on this host, which the guest could then
/// read and the export would bake into the artifact. `qemu-img info` opens
/// the image without its backing chain, so the check itself reads nothing
/// else.
pub async fn inspect_base(
    tool: &dyn QemuImg,
    path: &Path,
    declared: Option<DiskFormat>,
) -> Result<String, StepError> {
    let value = tool.info(path, declared).await?;
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
    fn reads_qemu_img_progress() {
        assert_eq!(parse_progress("    (12.50/100%)\r"), Some(12.5));
        assert_eq!(parse_progress("(100.00/100%)"), Some(100.0));
        assert_eq!(parse_progress("garbage"), None);
    }

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

/// A stand-in for `qemu-img` that answers `info` with a fixed document,
/// records every call, and writes small files where the real tool would.
#[cfg(test)]
pub mod fake {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Mutex;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        Info {
            path: PathBuf,
            declared: Option<DiskFormat>,
        },
        CreateOverlay {
            disk: PathBuf,
            backing: PathBuf,
            backing_format: String,
            size: Option<u64>,
        },
        Convert {
            source: PathBuf,
            target: PathBuf,
            format: DiskFormat,
        },
        RebaseUnsafe {
            image: PathBuf,
            backing: PathBuf,
            backing_format: String,
        },
    }

    /// How the fake's `rebase_unsafe` records a backing file in an image.
    pub const BACKING_LINE: &str = "backing-file=";

    pub struct FakeQemuImg {
        pub info: serde_json::Value,
        /// `info` for particular files, over `info`: a kept layer's record
        /// of its backing file.
        pub info_of: Mutex<std::collections::HashMap<PathBuf, serde_json::Value>>,
        /// What `convert` writes to its target.
        pub converted: Vec<u8>,
        pub calls: Mutex<Vec<Call>>,
    }

    impl FakeQemuImg {
        pub fn new(info: serde_json::Value) -> FakeQemuImg {
            FakeQemuImg {
                info,
                info_of: Mutex::new(Default::default()),
                converted: b"standalone image".to_vec(),
                calls: Mutex::new(Vec::new()),
            }
        }

        pub fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }
    }

    #[async_trait]
    impl QemuImg for FakeQemuImg {
        async fn info(
            &self,
            path: &Path,
            declared: Option<DiskFormat>,
        ) -> Result<serde_json::Value, StepError> {
            self.calls.lock().unwrap().push(Call::Info {
                path: path.to_path_buf(),
                declared,
            });
            if let Some(specific) = self.info_of.lock().unwrap().get(path) {
                return Ok(specific.clone());
            }
            // What `rebase_unsafe` wrote into the file, as the real tool
            // reads it from the image's header.
            let written = std::fs::read_to_string(path).unwrap_or_default();
            if let Some(backing) = written
                .lines()
                .find_map(|line| line.strip_prefix(BACKING_LINE))
            {
                return Ok(serde_json::json!({"format": "qcow2", "backing-filename": backing}));
            }
            Ok(self.info.clone())
        }

        async fn rebase_unsafe(
            &self,
            image: &Path,
            backing: &Path,
            backing_format: &str,
        ) -> Result<(), StepError> {
            self.calls.lock().unwrap().push(Call::RebaseUnsafe {
                image: image.to_path_buf(),
                backing: backing.to_path_buf(),
                backing_format: backing_format.to_owned(),
            });
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(image)
                .map_err(StepError::failed)?;
            std::io::Write::write_all(
                &mut file,
                format!("\n{BACKING_LINE}{}\n", backing.display()).as_bytes(),
            )
            .map_err(StepError::failed)
        }

        async fn create_overlay(
            &self,
            disk: &Path,
            backing: &Path,
            backing_format: &str,
            size: Option<u64>,
        ) -> Result<(), StepError> {
            self.calls.lock().unwrap().push(Call::CreateOverlay {
                disk: disk.to_path_buf(),
                backing: backing.to_path_buf(),
                backing_format: backing_format.to_owned(),
                size,
            });
            std::fs::write(disk, b"overlay").map_err(StepError::failed)
        }

        async fn convert(
            &self,
            source: &Path,
            target: &Path,
            format: DiskFormat,
            progress: &(dyn Fn(u64) + Send + Sync),
        ) -> Result<(), StepError> {
            self.calls.lock().unwrap().push(Call::Convert {
                source: source.to_path_buf(),
                target: target.to_path_buf(),
                format,
            });
            progress(100);
            std::fs::write(target, &self.converted).map_err(StepError::failed)
        }
    }
}
