//! The file provisioner: uploads files or whole trees (modes kept) to the
//! machine, or downloads them from it.

use crate::communicator::Communicator;
use crate::provisioner::{Provision, ProvisionContext, ProvisionError, Provisioner};
use crate::registry::{self, ParseError, ParseInput, Parsed, ProvisionerKind};
use crate::transfer::{self, PackEntry, ProgressReader};
use async_trait::async_trait;
use imgbuild_core::ConfigProblem;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Upload,
    Download,
}

/// The `[[provision]] type = "file"` table.
///
/// Paths follow rsync (and Packer): a directory source ending in `/` sends
/// its contents into `destination`; without the slash the directory itself
/// is created inside `destination`. A file goes to `destination`, or into it
/// when `destination` ends in `/`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Text to upload as a file, instead of `source`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    pub destination: String,
    #[serde(default)]
    pub direction: Direction,
}

impl FileConfig {
    pub fn problems(&self) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        match (&self.source, &self.content, self.direction) {
            (Some(_), Some(_), _) => problems.push(ConfigProblem::new(
                "content",
                "give either `source` or `content`, not both".to_owned(),
            )),
            (None, None, _) => problems.push(ConfigProblem::new(
                "source",
                "a file provisioner needs `source` (or `content` for an upload)".to_owned(),
            )),
            (None, Some(_), Direction::Download) => problems.push(ConfigProblem::new(
                "content",
                "`content` only makes sense for uploads; a download needs `source`".to_owned(),
            )),
            _ => {}
        }
        if self.destination.is_empty() {
            problems.push(ConfigProblem::new(
                "destination",
                "must not be empty".to_owned(),
            ));
        }
        problems
    }
}

/// `type = "file"`.
pub struct FileKind;

impl ProvisionerKind for FileKind {
    fn name(&self) -> &'static str {
        "file"
    }

    fn summary(&self) -> &'static str {
        "uploads files or trees to the machine, or downloads them from it"
    }

    fn parse(&self, input: ParseInput<'_>) -> Result<Parsed, ParseError> {
        let config: FileConfig = registry::deserialize(&input)?;
        let mut problems = config.problems();
        let provisioner = FileProvisioner::new(config.clone(), input.config_dir);
        let mut input_files = Vec::new();
        if config.direction == Direction::Upload
            && config.source.is_some()
            && let Some(local) = &provisioner.local_path
        {
            match std::fs::metadata(local) {
                Ok(_) => input_files.push(local.clone()),
                Err(err) => problems.push(
                    ConfigProblem::new("source", format!("cannot read {}: {err}", local.display()))
                        .help("upload sources are relative to the directory of the config file"),
                ),
            }
        }
        registry::refuse(problems)?;
        Ok(Parsed {
            provisioner: Provisioner::new(provisioner),
            resolved: serde_json::to_value(&config).unwrap_or_default(),
            input_files,
        })
    }
}

#[derive(Debug, Clone)]
pub struct FileProvisioner {
    pub config: FileConfig,
    /// For uploads: the local source resolved against the config's
    /// directory; for downloads: the local destination likewise.
    pub local_path: Option<PathBuf>,
}

impl FileProvisioner {
    pub fn new(config: FileConfig, base_dir: &Path) -> Self {
        let local = match config.direction {
            Direction::Upload => config.source.as_deref(),
            Direction::Download => Some(config.destination.as_str()),
        };
        let local_path = local.map(|path| resolve_keeping_slash(base_dir, path));
        FileProvisioner { config, local_path }
    }

    fn describe_transfer(&self) -> String {
        match (self.config.direction, &self.config.source) {
            (Direction::Upload, Some(source)) => {
                format!("file upload {source} -> {}", self.config.destination)
            }
            (Direction::Upload, None) => format!("file content -> {}", self.config.destination),
            (Direction::Download, source) => format!(
                "file download {} -> {}",
                source.as_deref().unwrap_or("?"),
                self.config.destination
            ),
        }
    }

    async fn upload(
        &self,
        comm: &dyn Communicator,
        cx: &ProvisionContext,
    ) -> Result<(), ProvisionError> {
        let destination = self.config.destination.as_str();
        if let Some(content) = &self.config.content {
            let (dest_dir, name) = split_remote(destination, None);
            let archive = transfer::single_file_archive(&name, content.as_bytes(), 0o644)?;
            cx.log.info(format!("uploading content to {destination}"));
            return Ok(comm.upload_tar(&dest_dir, archive).await?);
        }
        let local = self.local_path.as_ref().expect("uploads have a source");
        let metadata = std::fs::metadata(local).map_err(|source| ProvisionError::Read {
            path: local.display().to_string(),
            source,
        })?;
        let (dest_dir, entry) = if metadata.is_dir() {
            let contents_only = local.to_string_lossy().ends_with('/');
            let name = if contents_only {
                PathBuf::new()
            } else {
                PathBuf::from(local.file_name().unwrap_or_default())
            };
            (
                destination.trim_end_matches('/').to_owned(),
                PackEntry {
                    local: local.clone(),
                    name_in_archive: name,
                },
            )
        } else {
            let (dest_dir, name) =
                split_remote(destination, local.file_name().and_then(|n| n.to_str()));
            (
                dest_dir,
                PackEntry {
                    local: local.clone(),
                    name_in_archive: PathBuf::from(name),
                },
            )
        };
        let dest_dir = if dest_dir.is_empty() {
            "/".to_owned()
        } else {
            dest_dir
        };
        let total = transfer::total_size(std::slice::from_ref(&entry));
        cx.log.info(format!(
            "uploading {} to {destination} ({})",
            local.display(),
            human_bytes(total)
        ));
        let packed = transfer::pack(vec![entry]);
        let mut packed = packed;
        let stream = std::mem::replace(&mut packed.stream, Box::new(tokio::io::empty()));
        let task = format!(
            "upload {}",
            self.config.source.as_deref().unwrap_or_default()
        );
        let progress = ProgressReader::new(stream, cx.log.clone(), task, Some(total));
        let sent = comm.upload_tar(&dest_dir, Box::new(progress)).await;
        // A packing failure (unreadable file) explains a remote tar error
        // better than the error itself, so it wins.
        packed.finish().await?;
        Ok(sent?)
    }

    async fn download(
        &self,
        comm: &dyn Communicator,
        cx: &ProvisionContext,
    ) -> Result<(), ProvisionError> {
        let source = self
            .config
            .source
            .as_deref()
            .expect("downloads have a source");
        let local = self
            .local_path
            .clone()
            .expect("downloads have a destination");
        let contents_only = source.ends_with('/') && source.len() > 1;
        let remote = if contents_only {
            source.trim_end_matches('/')
        } else {
            source
        };
        cx.log
            .info(format!("downloading {source} to {}", local.display()));
        let stream = comm.download_tar(remote).await?;
        let into_dir = self.config.destination.ends_with('/') || local.is_dir();
        let (dest_dir, rename_root) = if into_dir && !contents_only {
            (local.clone(), None)
        } else {
            let parent = local.parent().map(Path::to_path_buf).unwrap_or_default();
            (parent, Some(local.clone()))
        };
        std::fs::create_dir_all(&dest_dir).map_err(|source| ProvisionError::Write {
            path: dest_dir.display().to_string(),
            source,
        })?;
        let progress =
            ProgressReader::new(stream, cx.log.clone(), format!("download {source}"), None);
        let bytes = transfer::unpack(Box::new(progress), dest_dir, rename_root).await?;
        cx.log
            .info(format!("downloaded {} from {source}", human_bytes(bytes)));
        Ok(())
    }
}

/// Splits a remote destination into the directory to extract in and the
/// file name to use.
fn split_remote(destination: &str, source_name: Option<&str>) -> (String, String) {
    if destination.ends_with('/') {
        return (
            destination.trim_end_matches('/').to_owned(),
            source_name.unwrap_or("file").to_owned(),
        );
    }
    match destination.rsplit_once('/') {
        Some((dir, name)) => (dir.to_owned(), name.to_owned()),
        None => (".".to_owned(), destination.to_owned()),
    }
}

/// Joins a relative path onto the config's directory without losing a
/// trailing slash, which carries meaning here.
fn resolve_keeping_slash(base: &Path, path: &str) -> PathBuf {
    let joined = base.join(path);
    if path.ends_with('/') && !joined.to_string_lossy().ends_with('/') {
        PathBuf::from(format!("{}/", joined.display()))
    } else {
        joined
    }
}

#[async_trait]
impl Provision for FileProvisioner {
    fn describe(&self) -> String {
        self.describe_transfer()
    }

    async fn run(
        &self,
        comm: &dyn Communicator,
        cx: &ProvisionContext,
    ) -> Result<(), ProvisionError> {
        match self.config.direction {
            Direction::Upload => self.upload(comm, cx).await,
            Direction::Download => self.download(comm, cx).await,
        }
    }
}

pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_destinations_split_like_rsync() {
        assert_eq!(
            split_remote("/etc/app.conf", Some("x")),
            ("/etc".into(), "app.conf".into())
        );
        assert_eq!(
            split_remote("/etc/", Some("x.conf")),
            ("/etc".into(), "x.conf".into())
        );
        assert_eq!(
            split_remote("rel.txt", None),
            (".".into(), "rel.txt".into())
        );
    }

    #[test]
    fn trailing_slashes_survive_resolution() {
        assert_eq!(
            resolve_keeping_slash(Path::new("/cfg"), "files/"),
            PathBuf::from("/cfg/files/")
        );
        assert_eq!(
            resolve_keeping_slash(Path::new("/cfg"), "/abs"),
            PathBuf::from("/abs")
        );
    }

    #[test]
    fn config_problems() {
        let config = |s: Option<&str>, c: Option<&str>, d: Direction| FileConfig {
            source: s.map(Into::into),
            content: c.map(Into::into),
            destination: "/x".into(),
            direction: d,
        };
        assert!(
            config(Some("a"), None, Direction::Upload)
                .problems()
                .is_empty()
        );
        assert!(
            config(None, Some("a"), Direction::Upload)
                .problems()
                .is_empty()
        );
        assert!(!config(None, None, Direction::Upload).problems().is_empty());
        assert!(
            !config(Some("a"), Some("b"), Direction::Upload)
                .problems()
                .is_empty()
        );
        assert!(
            !config(None, Some("b"), Direction::Download)
                .problems()
                .is_empty()
        );
    }

    #[test]
    fn bytes_read_humanly() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(64 << 20), "64.0 MiB");
    }
}
