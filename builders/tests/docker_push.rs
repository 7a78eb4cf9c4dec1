//! `push` against real registries: Debian's `docker-registry` started by
//! `.ci/start-registry.sh`, plain on 127.0.0.1:5000 and with htpasswd auth
//! over TLS (a test CA) on 127.0.0.1:5443, through the real engine.
//!
//! Credentials come from `DOCKER_CONFIG`, which is process-wide: the tests
//! here hold one lock while they run, so they run one after another.

use imgbuild_builders::{Artifact, BuildError, SourceIdentity};
use imgbuild_test_support::common::{run_script, unique_version, wait_until};
use imgbuild_test_support::{docker::*, harness::*};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const PLAIN: &str = "127.0.0.1:5000";
const AUTH: &str = "127.0.0.1:5443";
const USER: &str = "imgbuild";

static ENV_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn state_dir() -> PathBuf {
    PathBuf::from(
        std::env::var("IMGBUILD_REGISTRY_STATE")
            .unwrap_or_else(|_| "/var/lib/imgbuild-registry".to_owned()),
    )
}

/// Both registries answer (the script is idempotent and quick when they do).
fn registries_ready() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        docker_ready();
        run_script(".ci/start-registry.sh", &[]);
    });
}

fn password() -> String {
    std::fs::read_to_string(state_dir().join("auth/password"))
        .expect("start-registry.sh keeps the TLS registry's password")
        .trim()
        .to_owned()
}

/// A fresh `DOCKER_CONFIG` holding `config`; the caller holds `ENV_LOCK`.
fn docker_config(config: serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    // SAFETY: every test in this binary holds ENV_LOCK while the
    // environment is changed or read.
    unsafe { std::env::set_var("DOCKER_CONFIG", dir.path()) };
    dir
}

fn auths(registry: &str, username: &str, password: &str) -> serde_json::Value {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    serde_json::json!({"auths": {registry: {"auth": auth}}})
}

/// The manifest digest a registry reports for `path:tag`, asked with curl
/// (not through imgbuild's own registry code); `None` when the tag is absent.
fn registry_digest(registry: &str, path: &str, tag: &str) -> Option<String> {
    let (scheme, auth) = if registry == AUTH {
        ("https", Some(format!("{USER}:{}", password())))
    } else {
        ("http", None)
    };
    let mut command = Command::new("curl");
    command.args(["-sS", "-o", "/dev/null", "-D", "-", "-w", "%{http_code}"]);
    command.args([
        "-I",
        "-H",
        "Accept: application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
    ]);
    if let Some(auth) = auth {
        command.arg("--cacert").arg(state_dir().join("tls/ca.crt"));
        command.args(["-u", &auth]);
    }
    command.arg(format!("{scheme}://{registry}/v2/{path}/manifests/{tag}"));
    let output = command.output().expect("curl runs");
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    if text.trim_end().ends_with("404") {
        return None;
    }
    assert!(
        text.trim_end().ends_with("200"),
        "HEAD {path}:{tag}: {text}"
    );
    text.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("docker-content-digest")
                .then(|| value.trim().to_owned())
        })
        .or_else(|| panic!("no digest header: {text}"))
}

fn docker_cli(args: &[&str]) -> (bool, String) {
    let output = Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// Everything the build's log got, as JSON: what must not hold a secret.
fn events_json(harness: &Harness) -> String {
    serde_json::to_string(&harness.sink.events()).unwrap()
}

/// The fixture base image tagged `repository:version`, as an artifact:
/// delivery tests that need no build of their own push this.
async fn tagged_base(repository: &str, version: &str) -> Artifact {
    let base = base_image();
    let docker = docker();
    let id = docker.inspect_image(&base).await.unwrap().id.unwrap();
    let (ok, out) = docker_cli(&["tag", &base, &format!("{repository}:{version}")]);
    assert!(ok, "{out}");
    Artifact {
        builder: "docker".into(),
        id: id.clone(),
        files: Vec::new(),
        source: SourceIdentity {
            kind: "docker-image".into(),
            reference: base,
            sha256: None,
        },
        details: serde_json::json!({
            "repository": repository,
            "tags": [version],
            "references": [format!("{repository}:{version}")],
            "image_id": id,
        }),
    }
}

#[tokio::test]
async fn pushes_to_both_registries_pulls_back_by_digest_and_refuses_the_version_again() {
    let _env = ENV_LOCK.lock().await;
    registries_ready();
    let _config = docker_config(auths(AUTH, USER, &password()));
    let docker = docker();
    let repository = unique_repository();
    let path = repository.clone();
    let plain = format!("{PLAIN}/{path}");
    let tls = format!("{AUTH}/{path}");
    let mut cleanup = ImageCleanup::repository(&repository);
    cleanup.add(format!("{plain}:latest"));
    let version = unique_version();
    cleanup.add(format!("{plain}:{version}"));
    cleanup.add(format!("{tls}:{version}"));
    cleanup.add(format!("{tls}:latest"));
    let config = serde_json::json!({
        "image": base_image(),
        "pull": false,
        "repository": repository,
        "tags": ["latest"],
        "push": [plain, tls],
    });
    let builder = builder(config.clone());
    let harness = Harness::new("app");
    assert!(builder.validate(harness.config_dir.path()).is_empty());
    let request = harness.request(
        image_info("app", &version),
        vec![shell(&["echo pushed-and-pulled > /etc/imgbuild-push"])],
    );

    let started = Instant::now();
    builder.preflight(&request, &harness.cx).await.unwrap();
    let artifact = builder.build(&request, &harness.cx).await.unwrap();
    cleanup.add(artifact.id.clone());
    let built = started.elapsed();
    let artifact = builder
        .deliver(&request, artifact, &harness.cx)
        .await
        .unwrap_or_else(|err| panic!("{err}\n{}", harness.transcript()));
    eprintln!(
        "built in {:.1}s, pushed in {:.1}s",
        built.as_secs_f64(),
        (started.elapsed() - built).as_secs_f64()
    );

    let pushed = artifact.details["pushed"].as_array().unwrap().clone();
    let entries: Vec<(String, String)> = pushed
        .iter()
        .map(|p| {
            (
                p["repository"].as_str().unwrap().to_owned(),
                p["tag"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        vec![
            (plain.clone(), version.clone()),
            (plain.clone(), "latest".to_owned()),
            (tls.clone(), version.clone()),
            (tls.clone(), "latest".to_owned()),
        ]
    );
    for entry in &pushed {
        let (registry, tag) = (
            if entry["repository"] == plain.as_str() {
                PLAIN
            } else {
                AUTH
            },
            entry["tag"].as_str().unwrap(),
        );
        let digest = entry["digest"].as_str().unwrap();
        assert_eq!(
            registry_digest(registry, &path, tag).as_deref(),
            Some(digest),
            "{entry}"
        );
        assert_eq!(
            entry["reference"],
            format!("{}@{digest}", entry["repository"].as_str().unwrap())
        );
    }
    let progress = harness.sink.events().iter().any(|event| {
        matches!(event, imgbuild_core::events::Event::Progress { task, done: 100, .. } if task == &format!("push {tls}:{version}"))
    });
    assert!(
        progress,
        "no finished push progress:\n{}",
        harness.transcript()
    );
    assert!(
        !events_json(&harness).contains(&password()),
        "the password reached an event"
    );

    // A clean engine: no tag and no image of the build, then back by digest
    // from each registry (the TLS one with the same config's credentials).
    let (ok, out) = docker_cli(&["rmi", "-f", &artifact.id]);
    assert!(ok, "{out}");
    assert!(!image_exists(&docker, &artifact.id).await);
    assert!(repository_tags(&docker, &repository).await.is_empty());
    for entry in [&pushed[0], &pushed[2]] {
        let reference = entry["reference"].as_str().unwrap();
        let (ok, out) = docker_cli(&["pull", reference]);
        assert!(ok, "docker pull {reference}: {out}");
        let pulled = docker.inspect_image(reference).await.unwrap();
        assert_eq!(pulled.id.as_deref(), Some(artifact.id.as_str()));
        let (code, text) =
            run_image(&docker, reference, Some(vec!["cat", "/etc/imgbuild-push"])).await;
        assert_eq!((code, text.trim()), (0, "pushed-and-pulled"));
        let (ok, out) = docker_cli(&["rmi", "-f", reference]);
        assert!(ok, "{out}");
    }
    let (ok, out) = docker_cli(&["rmi", "-f", &artifact.id]);
    assert!(ok || out.contains("No such image"), "{out}");

    // The version exists in the registries now (and nowhere locally): a new
    // run is refused before anything is created.
    let again = Harness::new("app");
    let request = again.request(image_info("app", &version), Vec::new());
    let err = builder.preflight(&request, &again.cx).await.unwrap_err();
    let BuildError::Refused(message) = &err else {
        panic!("{err:?}")
    };
    assert!(
        message.contains(&format!(
            "{plain}:{version} already exists in the registry {PLAIN}"
        )),
        "{message}"
    );
    assert!(message.contains("bump `image.version`"), "{message}");
    // The build's own first step says the same, before any container.
    let err = builder.build(&request, &again.cx).await.unwrap_err();
    assert!(
        err.to_string().contains("already exists in the registry"),
        "{err}"
    );
    assert!(containers_of_run(&docker, again.run_id()).await.is_empty());
    assert!(repository_tags(&docker, &repository).await.is_empty());
}

#[tokio::test]
async fn a_credential_helper_supplies_the_login() {
    let _env = ENV_LOCK.lock().await;
    registries_ready();
    let bin = tempfile::tempdir().unwrap();
    let calls = bin.path().join("calls");
    // The real protocol: `get`, the server on stdin, JSON on stdout.
    let helper = bin.path().join("docker-credential-imgbuildtest");
    std::fs::write(
        &helper,
        format!(
            r#"#!/bin/sh
[ "$1" = get ] || exit 2
read -r server
echo "get $server" >> {calls}
if [ "$server" = {AUTH} ]; then
  printf '{{"ServerURL":"%s","Username":"{USER}","Secret":"%s"}}\n' "$server" "$(cat {password})"
else
  echo "credentials not found in native keychain"; exit 1
fi
"#,
            calls = calls.display(),
            password = state_dir().join("auth/password").display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let old_path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bin.path().to_path_buf()];
    paths.extend(std::env::split_paths(&old_path));
    // SAFETY: under ENV_LOCK, like every environment change here.
    unsafe { std::env::set_var("PATH", std::env::join_paths(paths).unwrap()) };
    struct RestorePath(std::ffi::OsString);
    impl Drop for RestorePath {
        fn drop(&mut self) {
            // SAFETY: still under ENV_LOCK (dropped before the guard).
            unsafe { std::env::set_var("PATH", &self.0) };
        }
    }
    let _restore = RestorePath(old_path);
    let _config = docker_config(serde_json::json!({"credHelpers": {AUTH: "imgbuildtest"}}));

    let repository = unique_repository();
    let version = unique_version();
    let tls = format!("{AUTH}/{repository}");
    let mut cleanup = ImageCleanup::repository(&repository);
    cleanup.add(format!("{tls}:{version}"));
    let builder = builder(serde_json::json!({
        "image": base_image(),
        "repository": repository,
        "push": [tls],
    }));
    let harness = Harness::new("app");
    let request = harness.request(image_info("app", &version), Vec::new());
    builder.preflight(&request, &harness.cx).await.unwrap();
    let artifact = tagged_base(&repository, &version).await;
    let artifact = builder
        .deliver(&request, artifact, &harness.cx)
        .await
        .unwrap_or_else(|err| panic!("{err}\n{}", harness.transcript()));
    let digest = artifact.details["pushed"][0]["digest"].as_str().unwrap();
    assert_eq!(
        registry_digest(AUTH, &repository, &version).as_deref(),
        Some(digest)
    );
    let calls = std::fs::read_to_string(&calls).unwrap();
    assert!(
        calls.lines().all(|line| line == format!("get {AUTH}")),
        "{calls}"
    );
    assert!(
        calls.lines().count() >= 2,
        "preflight and push each ask: {calls}"
    );
    assert!(!events_json(&harness).contains(&password()));
}

#[tokio::test]
async fn a_wrong_password_fails_clearly_and_shows_no_secret() {
    let _env = ENV_LOCK.lock().await;
    registries_ready();
    let wrong = format!("not-the-password-{}", unique_version());
    let _config = docker_config(auths(AUTH, USER, &wrong));
    let docker = docker();
    let repository = unique_repository();
    let version = unique_version();
    let tls = format!("{AUTH}/{repository}");
    let mut cleanup = ImageCleanup::repository(&repository);
    cleanup.add(format!("{tls}:{version}"));
    let builder = builder(serde_json::json!({
        "image": base_image(),
        "repository": repository,
        "push": [tls],
    }));
    let harness = Harness::new("app");
    let request = harness.request(image_info("app", &version), Vec::new());

    let err = builder
        .preflight(&request, &harness.cx)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "the registry {AUTH} refused a username and password"
        )) && err.contains(&format!("docker login {AUTH}")),
        "{err}"
    );
    assert!(!err.contains(&wrong), "{err}");

    // Past preflight (say the password changed since), the push itself
    // fails the same way, and takes back what the build left.
    let artifact = tagged_base(&repository, &version).await;
    let err = builder
        .deliver(&request, artifact, &harness.cx)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "cannot push {tls}:{version} to the registry {AUTH}"
        )) && err.contains(&format!("docker login {AUTH}")),
        "{err}"
    );
    assert!(!err.contains(&wrong), "{err}");
    assert!(!events_json(&harness).contains(&wrong));
    assert!(repository_tags(&docker, &repository).await.is_empty());
    assert!(repository_tags(&docker, &tls).await.is_empty());
    assert!(
        image_exists(&docker, &base_image()).await,
        "the base image stays"
    );
    assert_eq!(registry_digest(AUTH, &repository, &version), None);
}

/// A registry of the test's own, on a free port, stopped between preflight
/// and push: the push retries, then fails naming it.
#[tokio::test]
async fn a_registry_that_went_away_fails_the_delivery_naming_it() {
    let _env = ENV_LOCK.lock().await;
    registries_ready();
    let _config = docker_config(serde_json::json!({}));
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let registry = format!("127.0.0.1:{port}");
    std::fs::write(
        dir.path().join("config.yml"),
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {registry}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let mut server = Command::new("docker-registry")
        .arg("serve")
        .arg(dir.path().join("config.yml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("docker-registry is installed (.ci/start-registry.sh)");
    wait_until("the test registry answers", Duration::from_secs(30), || {
        Command::new("curl")
            .args(["-fsS", "-m", "2", "-o", "/dev/null"])
            .arg(format!("http://{registry}/v2/"))
            .status()
            .is_ok_and(|s| s.success())
    })
    .await;

    let docker = docker();
    let repository = unique_repository();
    let version = unique_version();
    let remote = format!("{registry}/{repository}");
    let mut cleanup = ImageCleanup::repository(&repository);
    cleanup.add(format!("{remote}:{version}"));
    let builder = builder(serde_json::json!({
        "image": base_image(),
        "repository": repository,
        "push": [remote],
    }));
    let harness = Harness::new("app");
    let request = harness.request(image_info("app", &version), Vec::new());
    builder.preflight(&request, &harness.cx).await.unwrap();
    server.kill().unwrap();
    server.wait().unwrap();

    let artifact = tagged_base(&repository, &version).await;
    let started = Instant::now();
    let err = builder
        .deliver(&request, artifact, &harness.cx)
        .await
        .unwrap_err()
        .to_string();
    eprintln!("gave up after {:.1}s", started.elapsed().as_secs_f64());
    assert!(
        err.contains(&format!(
            "cannot push {remote}:{version} to the registry {registry}"
        )) && err.contains("gave up after 4 attempts")
            && err.contains("is the registry running"),
        "{err}"
    );
    assert!(
        harness.transcript().contains("retrying in"),
        "{}",
        harness.transcript()
    );
    assert!(repository_tags(&docker, &repository).await.is_empty());
    assert!(repository_tags(&docker, &remote).await.is_empty());

    // Down before the build: refused at once, naming it.
    let err = builder
        .preflight(&request, &harness.cx)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("cannot reach the registry {registry}")),
        "{err}"
    );
}
