//! The build's settings, resolved once before the first step and shared
//! read-only by all of them: every path relative to the config file made
//! absolute here, so no step joins `config_dir` itself.

use super::config::{Accelerator, Compression, QemuConfig, is_url};
use crate::common::artifact::{SourceIdentity, checksum_path, sha256_file_async};
use crate::{BuildRequest, ImageInfo};

use imgbuild_core::Sha256Digest;
use std::path::{Path, PathBuf};

/// Where the base image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseSource {
    /// Downloaded once into the cache, keyed and verified by its checksum.
    Url { url: String, checksum: Sha256Digest },
    /// A local file, verified when a checksum is given.
    File {
        path: PathBuf,
        checksum: Option<Sha256Digest>,
    },
}

impl BaseSource {
    /// The base's identity as a build records it, resolved now: a URL's
    /// pinned checksum, a local file's SHA-256 as it is on disk.
    pub async fn identity(&self) -> Result<SourceIdentity, String> {
        match self {
            BaseSource::Url { url, checksum } => Ok(SourceIdentity {
                kind: "url".to_owned(),
                reference: url.clone(),
                sha256: Some(checksum.hex().to_owned()),
            }),
            BaseSource::File { path, .. } => {
                let path = std::fs::canonicalize(path)
                    .map_err(|err| format!("base image {}: {err}", path.display()))?;
                let (_, digest) = sha256_file_async(path.clone())
                    .await
                    .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
                Ok(SourceIdentity {
                    kind: "file".to_owned(),
                    reference: path.display().to_string(),
                    sha256: Some(digest),
                })
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub config: QemuConfig,
    /// Relative paths in the config are relative to this directory.
    pub config_dir: PathBuf,
    pub run_id: String,
    pub base: BaseSource,
    /// Where downloaded bases are kept between builds.
    pub cache_dir: PathBuf,
    /// `output_dir`, resolved: holds the finished image and, while the
    /// build runs, its working directory.
    pub output_dir: PathBuf,
    /// The build's private working directory (disk, seed, serial console).
    pub work_dir: PathBuf,
    /// The finished image, and its `<image>.sha256` beside it.
    pub output: PathBuf,
    pub checksum_file: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The accelerator of this attempt (an `auto` build may make two).
    pub accelerator: Accelerator,
    /// The cloud-init instance id in the seed. A boot under a new id is a
    /// new instance to cloud-init, which then creates the user and trusts
    /// the key again even in an image that kept its cloud-init state.
    pub instance_id: String,
}

/// `<name>-<version>.<format>[.zst]` in the output directory.
pub fn output_path(config: &QemuConfig, image: &ImageInfo, config_dir: &Path) -> PathBuf {
    let compressed = match config.compression {
        Compression::None => "",
        Compression::Zstd => ".zst",
    };
    config_dir.join(&config.output_dir).join(format!(
        "{}.{}{compressed}",
        image.artifact_stem(),
        config.format.as_str()
    ))
}

impl Plan {
    /// Fails only on what `validate` already refuses (a URL without a
    /// checksum), for a caller that skipped it.
    pub fn new(
        config: &QemuConfig,
        request: &BuildRequest,
        run_id: &str,
        build_name: &str,
        accelerator: Accelerator,
    ) -> Result<Plan, String> {
        let config_dir = request.config_dir.clone();
        let base = if is_url(&config.base_image) {
            BaseSource::Url {
                url: config.base_image.clone(),
                checksum: config.base_checksum.clone().ok_or(
                    "a base image URL needs `base_checksum = \"sha256:...\"`, so a changed download is never built into an image",
                )?,
            }
        } else {
            BaseSource::File {
                path: config_dir.join(&config.base_image),
                checksum: config.base_checksum.clone(),
            }
        };
        let output_dir = config_dir.join(&config.output_dir);
        let output = output_path(config, &request.image, &config_dir);
        Ok(Plan {
            base,
            cache_dir: cache_dir(config.cache_dir.as_deref(), &config_dir),
            work_dir: output_dir.join(format!(".imgbuild-{run_id}-{build_name}")),
            checksum_file: checksum_path(&output),
            output,
            output_dir,
            kernel: config.kernel.as_ref().map(|path| config_dir.join(path)),
            initrd: config.initrd.as_ref().map(|path| config_dir.join(path)),
            instance_id: format!("imgbuild-{run_id}"),
            run_id: run_id.to_owned(),
            config: config.clone(),
            config_dir,
            accelerator,
        })
    }
}

fn cache_dir(configured: Option<&Path>, config_dir: &Path) -> PathBuf {
    if let Some(dir) = configured {
        return config_dir.join(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("imgbuild");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache/imgbuild")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use imgbuild_core::OnError;

    pub fn request(config_dir: &Path) -> BuildRequest {
        BuildRequest {
            image: ImageInfo {
                name: "web".into(),
                version: "1.2".into(),
                description: None,
                labels: Default::default(),
                revision: None,
                created: "2026-01-01T00:00:00Z".into(),
            },
            build_name: "vm".into(),
            provisioners: Vec::new(),
            on_error: OnError::Cleanup,
            config_dir: config_dir.to_path_buf(),
            cache: Default::default(),
            sbom: crate::SbomFormats::None,
            list_files: None,
        }
    }

    pub fn plan(config: serde_json::Value, config_dir: &Path) -> Plan {
        let config: QemuConfig = serde_json::from_value(config).unwrap();
        Plan::new(
            &config,
            &request(config_dir),
            "run1",
            "vm",
            Accelerator::Tcg,
        )
        .unwrap()
    }

    #[test]
    fn paths_are_resolved_against_the_config_dir() {
        let plan = plan(
            serde_json::json!({
                "base_image": "images/base.qcow2",
                "output_dir": "out",
                "compression": "zstd",
                "kernel": "boot/vmlinuz",
                "cache_dir": "cache",
            }),
            Path::new("/cfg"),
        );
        assert_eq!(
            plan.base,
            BaseSource::File {
                path: "/cfg/images/base.qcow2".into(),
                checksum: None
            }
        );
        assert_eq!(plan.output, Path::new("/cfg/out/web-1.2.qcow2.zst"));
        assert_eq!(
            plan.checksum_file,
            Path::new("/cfg/out/web-1.2.qcow2.zst.sha256")
        );
        assert_eq!(plan.work_dir, Path::new("/cfg/out/.imgbuild-run1-vm"));
        assert_eq!(plan.kernel.as_deref(), Some(Path::new("/cfg/boot/vmlinuz")));
        assert_eq!(plan.initrd, None);
        assert_eq!(plan.cache_dir, Path::new("/cfg/cache"));
    }

    #[test]
    fn a_url_base_carries_its_checksum() {
        let hex = "b".repeat(64);
        let plan = plan(
            serde_json::json!({"base_image": "https://example.com/b.img", "base_checksum": hex}),
            Path::new("/cfg"),
        );
        match plan.base {
            BaseSource::Url { url, checksum } => {
                assert_eq!(url, "https://example.com/b.img");
                assert_eq!(checksum.hex(), hex);
            }
            other => panic!("{other:?}"),
        }
        let config: QemuConfig =
            serde_json::from_value(serde_json::json!({"base_image": "https://example.com/b.img"}))
                .unwrap();
        let request = request(Path::new("/cfg"));
        let err = Plan::new(&config, &request, "run1", "vm", Accelerator::Tcg).unwrap_err();
        assert!(err.contains("base_checksum"), "{err}");
    }
}
