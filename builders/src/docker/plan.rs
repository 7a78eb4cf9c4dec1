//! The build's settings, resolved once before the first step and shared
//! read-only by all of them: what the build produces (the tag it commits
//! to, or the tar file and its checksum), the container's mounts with host
//! paths made absolute, its name and its environment.

use super::config::{DockerConfig, Output};
use super::step_check_tag::Target;
use super::step_create_container::container_name;
use crate::common::artifact::checksum_path;
use crate::{BuildRequest, ImageInfo};
use std::path::PathBuf;

/// What the last step makes of the container.
#[derive(Debug, Clone)]
pub enum Produce {
    /// Commit it and tag the image `target`.
    Commit(Target),
    /// Write its filesystem as a tar file, with `<path>.sha256` beside it.
    Export {
        path: PathBuf,
        checksum_file: PathBuf,
    },
    Discard,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub config: DockerConfig,
    pub image: ImageInfo,
    pub produce: Produce,
    /// `imgbuild-<run id>-<build>`, which `imgbuild clean` finds it by.
    pub container_name: String,
    /// What the container is for, as messages name it: "build container".
    pub container_role: &'static str,
    /// `volumes`, host paths resolved against the config directory.
    pub binds: Vec<String>,
    /// `env` as `KEY=value`, for every exec.
    pub exec_env: Vec<String>,
}

impl Plan {
    /// Fails when the repository or version cannot make a Docker tag (they
    /// may come from `[image]`, which the builder's own checks cannot see).
    pub fn new(
        config: &DockerConfig,
        request: &BuildRequest,
        run_id: &str,
        build_name: &str,
    ) -> Result<Plan, String> {
        let produce = match config.output(&request.config_dir) {
            Output::Commit => Produce::Commit(Target::new(config, &request.image)?),
            Output::Export(path) => Produce::Export {
                checksum_file: checksum_path(&path),
                path,
            },
            Output::Discard => Produce::Discard,
        };
        Ok(Plan {
            config: config.clone(),
            image: request.image.clone(),
            produce,
            container_name: container_name(run_id, build_name),
            container_role: "build container",
            binds: config.binds(&request.config_dir),
            exec_env: config.exec_env(),
        })
    }

    /// The same settings for the container `[[test]]`s run in, started from
    /// the committed image: it sees the image as it will be used, so the
    /// build's mounts and exec `env` (which the image does not keep) stay
    /// out. Its name cannot meet a build container's: build names have no
    /// `.`.
    pub fn for_test_container(&self, run_id: &str, build_name: &str) -> Plan {
        Plan {
            container_name: container_name(run_id, &format!("{build_name}.test")),
            container_role: "test container",
            binds: Vec::new(),
            exec_env: Vec::new(),
            ..self.clone()
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use imgbuild_core::OnError;
    use std::path::Path;

    pub fn request(config_dir: &Path, version: &str) -> BuildRequest {
        BuildRequest {
            image: ImageInfo {
                name: "web".into(),
                version: version.into(),
                description: None,
                labels: Default::default(),
                revision: None,
                created: "2026-01-01T00:00:00Z".into(),
            },
            build_name: "app".into(),
            provisioners: Vec::new(),
            on_error: OnError::Cleanup,
            config_dir: config_dir.to_path_buf(),
            cache: Default::default(),
            sbom: crate::SbomFormats::None,
            list_files: None,
        }
    }

    pub fn plan(config: serde_json::Value) -> Plan {
        let config: DockerConfig = serde_json::from_value(config).unwrap();
        Plan::new(&config, &request(Path::new("/cfg"), "1.2"), "run1", "app/x").unwrap()
    }

    #[test]
    fn what_the_build_produces_is_resolved_once() {
        let commit = plan(serde_json::json!({"image": "debian", "repository": "team/web"}));
        match &commit.produce {
            Produce::Commit(target) => assert_eq!(target.reference(), "team/web:1.2"),
            other => panic!("{other:?}"),
        }
        assert_eq!(commit.container_name, "imgbuild-run1-app-x");

        let export = plan(serde_json::json!({"image": "debian", "export_path": "out/fs.tar"}));
        match &export.produce {
            Produce::Export {
                path,
                checksum_file,
            } => {
                assert_eq!(path, Path::new("/cfg/out/fs.tar"));
                assert_eq!(checksum_file, Path::new("/cfg/out/fs.tar.sha256"));
            }
            other => panic!("{other:?}"),
        }
        let discard = plan(serde_json::json!({"image": "debian", "discard": true}));
        assert!(matches!(discard.produce, Produce::Discard));
    }

    #[test]
    fn mounts_and_environment_are_resolved_once() {
        let plan = plan(serde_json::json!({
            "image": "debian",
            "volumes": ["/srv/data:/data:ro", "cache:/cache"],
            "env": {"B": "2", "A": "1"},
        }));
        assert_eq!(plan.binds, vec!["/srv/data:/data:ro", "cache:/cache"]);
        assert_eq!(plan.exec_env, vec!["A=1", "B=2"]);
    }

    #[test]
    fn the_test_container_sees_the_image_without_the_builds_mounts_and_env() {
        let build = plan(serde_json::json!({
            "image": "debian",
            "volumes": ["/srv/data:/data:ro"],
            "env": {"A": "1"},
            "privileged": true,
        }));
        let test = build.for_test_container("run1", "app");
        assert_eq!(test.container_name, "imgbuild-run1-app.test");
        assert_eq!(test.container_role, "test container");
        assert!(test.binds.is_empty(), "{:?}", test.binds);
        assert!(test.exec_env.is_empty(), "{:?}", test.exec_env);
        assert!(test.config.privileged);
        assert_eq!(test.config.run_command, build.config.run_command);
        // A build may be called `app-test`; its container stays distinct.
        assert_ne!(
            test.container_name,
            container_name("run1", "app-test"),
            "a test container's name must not be a build container's"
        );
    }

    #[test]
    fn a_version_that_cannot_be_a_tag_is_refused() {
        let config: DockerConfig =
            serde_json::from_value(serde_json::json!({"image": "debian"})).unwrap();
        let err =
            Plan::new(&config, &request(Path::new("/cfg"), "1+2"), "run1", "app").unwrap_err();
        assert!(err.contains("cannot be a Docker tag"), "{err}");
    }
}
