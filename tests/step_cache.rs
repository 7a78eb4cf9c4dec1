//! The step cache, `plan` and `--skip-unchanged`, end to end with the real
//! binary and the real Docker Engine: a change to the last script reruns
//! only the last step and the image still holds every step's changes;
//! `plan` names the changed file; an unchanged build is skipped.

use imgbuild_test_support::docker::{ImageCleanup, base_image as docker_base_image};
use imgbuild_test_support::{cli::*, common::*};

const CONFIG: &str = r#"
[variables]
base_image = { description = "the fixture image" }
version = { description = "unique per build" }

[image]
name = "cached"
version = "{{ var.version }}"

[builders.app]
type = "docker"
image = "{{ var.base_image }}"
pull = "never"
repository = "imgbuild-test/cached"

[[provision]]
type = "shell"
script = "first.sh"

[[provision]]
type = "shell"
script = "second.sh"

[[provision]]
type = "shell"
inline = ["echo run {{ run_id }} > /etc/last-run"]
cache = false
"#;

/// The tests here share the engine's `imgbuild-cache` images, and one of
/// them prunes all of them: they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn build(workspace: &Workspace, version: &str, extra: &[&str]) -> Outcome {
    workspace
        .imgbuild()
        .env("IMGBUILD_NO_CACHE", "false")
        .args(["--output", "json", "build", "image.toml", "--var"])
        .arg(format!("base_image={}", docker_base_image()))
        .arg("--var")
        .arg(format!("version={version}"))
        .args(extra)
        .run()
}

fn plan(workspace: &Workspace, version: &str) -> (i32, serde_json::Value) {
    let outcome = workspace
        .imgbuild()
        .args([
            "--output",
            "json",
            "plan",
            "image.toml",
            "--detailed-exitcode",
            "--var",
        ])
        .arg(format!("base_image={}", docker_base_image()))
        .arg("--var")
        .arg(format!("version={version}"))
        .run();
    let document = serde_json::from_str(outcome.stdout.trim())
        .unwrap_or_else(|err| panic!("plan printed no JSON ({err}): {}", outcome.stdout));
    (outcome.code(), document)
}

#[test]
fn a_changed_last_script_reruns_only_what_follows_it_and_plan_says_why() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let workspace = Workspace::new();
    workspace.write("image.toml", CONFIG);
    workspace.write("first.sh", "echo first > /etc/first\n");
    workspace.write("second.sh", "echo second-a > /etc/second\n");
    let (v1, v2, v3) = (unique_version(), unique_version(), unique_version());
    let _cleanup = ImageCleanup::references(
        [&v1, &v2, &v3]
            .iter()
            .map(|v| format!("imgbuild-test/cached:{v}"))
            .collect::<Vec<_>>(),
    );
    // The cache images the builds keep, named by the keys they record.
    let _cache_cleanup = CacheCleanup(workspace.join("imgbuild-manifest.json"));

    let first = build(&workspace, &v1, &[]).exits_with(EXIT_OK);
    let inspected = workspace
        .imgbuild()
        .args(["--output", "json", "inspect", "image.toml", "--var"])
        .arg(format!("base_image={}", docker_base_image()))
        .arg("--var")
        .arg(format!("version={v1}"))
        .run()
        .exits_with(EXIT_OK);
    let inspected: serde_json::Value = serde_json::from_str(inspected.stdout.trim()).unwrap();
    let step_cache = &inspected["builds"][0]["step_cache"];
    assert_eq!(step_cache[1]["cacheable"], true, "{inspected}");
    assert_eq!(step_cache[2]["why_not"], "`cache = false`", "{inspected}");
    assert_eq!(
        first.provisioners_run(),
        [
            "provisioner 1 of 3",
            "provisioner 2 of 3",
            "provisioner 3 of 3"
        ]
    );
    assert_eq!(first.cached_steps(), None);

    // Nothing changed: plan says up to date, and a skipping build builds
    // nothing and hands out v1.
    let (code, document) = plan(&workspace, &v2);
    assert_eq!(code, EXIT_OK, "{document}");
    assert_eq!(document["builds"][0]["action"], "up-to-date", "{document}");
    assert_eq!(document["builds"][0]["version"], v1.as_str());
    assert_eq!(document["to_build"], serde_json::json!([]));
    let steps = &document["builds"][0]["steps"];
    assert_eq!(steps[0]["cacheable"], true, "{document}");
    assert_eq!(steps[2]["cacheable"], false);
    assert!(
        steps[2]["why_not"]
            .as_str()
            .unwrap()
            .contains("cache = false"),
        "{document}"
    );
    let skipped = build(&workspace, &v2, &["--skip-unchanged"]).exits_with(EXIT_OK);
    let skip = skipped
        .events()
        .into_iter()
        .find(|e| e["event"] == "build_skipped")
        .unwrap_or_else(|| panic!("no build_skipped event:\n{}", skipped.stdout));
    assert_eq!(skip["version"], v1.as_str());
    assert!(skipped.provisioners_run().is_empty());
    assert_eq!(
        docker(&["images", "-q", &format!("imgbuild-test/cached:{v2}")]),
        "",
        "a skipped build made an image"
    );

    // Change only the second script: plan names the file, and the build
    // starts from the first step's kept state.
    workspace.write("second.sh", "echo second-b > /etc/second\n");
    let (code, document) = plan(&workspace, &v2);
    assert_eq!(code, 3, "{document}");
    let build_plan = &document["builds"][0];
    assert_eq!(build_plan["action"], "rebuild", "{document}");
    assert_eq!(build_plan["from_step"], 2, "{document}");
    assert!(
        build_plan["reasons"].to_string().contains("second.sh"),
        "{document}"
    );
    assert_eq!(document["to_build"], serde_json::json!(["app"]));

    let second = build(&workspace, &v2, &[]).exits_with(EXIT_OK);
    assert_eq!(second.cached_steps(), Some(1));
    assert_eq!(
        second.provisioners_run(),
        ["provisioner 2 of 3", "provisioner 3 of 3"]
    );
    // The image holds the kept first step's file and the new second one.
    let reference = format!("imgbuild-test/cached:{v2}");
    assert_eq!(
        docker(&[
            "run",
            "--rm",
            "--entrypoint",
            "cat",
            &reference,
            "/etc/first",
            "/etc/second"
        ]),
        "first\nsecond-b"
    );
    // Built with the cache, it has the same files with the same content,
    // modes and owners as one built from scratch.
    let scratch = build(&workspace, &v3, &["--no-cache"]).exits_with(EXIT_OK);
    assert_eq!(scratch.cached_steps(), None);
    assert_eq!(
        listing(&reference),
        listing(&format!("imgbuild-test/cached:{v3}"))
    );

    // `cache ls` shows the kept steps the manifest names; `cache prune`
    // removes them (a dry run first, which removes nothing).
    let kept: Vec<String> = workspace.manifest()["builds"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|step| step["key"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(kept.len(), 2, "the two cacheable steps have keys");
    let store = workspace.join("store");
    let listed = workspace
        .imgbuild()
        .args(["--output", "json", "cache", "ls", "--dir"])
        .arg(&store)
        .run()
        .exits_with(EXIT_OK);
    let listed: serde_json::Value = serde_json::from_str(listed.stdout.trim()).unwrap();
    let listed_keys: Vec<&str> = listed["docker"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|image| image["key"].as_str())
        .collect();
    for key in &kept {
        assert!(listed_keys.contains(&key.as_str()), "{key} not in {listed}");
    }
    workspace
        .imgbuild()
        .args(["cache", "prune", "--all", "--dry-run", "--dir"])
        .arg(&store)
        .run()
        .exits_with(EXIT_OK)
        .stdout_has("would remove");
    assert_ne!(
        docker(&["images", "-q", &format!("imgbuild-cache:{}", kept[0])]),
        ""
    );
    workspace
        .imgbuild()
        .args(["cache", "prune", "--all", "--dir"])
        .arg(&store)
        .run()
        .exits_with(EXIT_OK);
    for key in &kept {
        assert_eq!(
            docker(&["images", "-q", &format!("imgbuild-cache:{key}")]),
            "",
            "{key} survived"
        );
    }
}

/// Every file with its mode, owner and content hash, outside the places
/// that differ per run or per container (/proc, /sys, /dev, and the
/// uncached step's /etc/last-run).
fn listing(reference: &str) -> String {
    docker(&[
        "run",
        "--rm",
        "--entrypoint",
        "sh",
        reference,
        "-c",
        "find / -xdev \\( -path /proc -o -path /sys -o -path /dev -o -path /etc/last-run -o -path /etc/hostname -o -path /etc/hosts -o -path /etc/resolv.conf \\) -prune -o -printf '%p %m %u %g\\n' | sort; find / -xdev -type f \\( -path /proc -o -path /sys -o -path /dev -o -path /etc/last-run -o -path /etc/hostname -o -path /etc/hosts -o -path /etc/resolv.conf \\) -prune -o -type f -exec sha256sum {} + | sort",
    ])
}

/// Removes the `imgbuild-cache:<key>` images the manifest's builds name.
struct CacheCleanup(std::path::PathBuf);

impl Drop for CacheCleanup {
    fn drop(&mut self) {
        let Ok(text) = std::fs::read_to_string(&self.0) else {
            return;
        };
        let Ok(manifest) = serde_json::from_str::<serde_json::Value>(&text) else {
            return;
        };
        for build in manifest["builds"].as_array().into_iter().flatten() {
            for step in build["steps"].as_array().into_iter().flatten() {
                if let Some(key) = step["key"].as_str() {
                    let _ = std::process::Command::new("docker")
                        .args(["image", "rm", "-f", &format!("imgbuild-cache:{key}")])
                        .output();
                }
            }
        }
    }
}

/// A workspace with the config and its two scripts, and two versions to
/// build whose images (and kept steps) are removed when the test ends.
struct TwoVersions {
    // Dropped in this order: the cleanups read the workspace's manifest.
    _cleanup: ImageCleanup,
    _cache_cleanup: CacheCleanup,
    versions: [String; 2],
    workspace: Workspace,
}

impl TwoVersions {
    fn new(first: &str, second: &str) -> TwoVersions {
        let workspace = Workspace::new();
        workspace.write("image.toml", CONFIG);
        workspace.write("first.sh", first);
        workspace.write("second.sh", second);
        let versions = [unique_version(), unique_version()];
        let _cleanup = ImageCleanup::references(
            versions
                .iter()
                .map(|v| format!("imgbuild-test/cached:{v}"))
                .collect::<Vec<_>>(),
        );
        let _cache_cleanup = CacheCleanup(workspace.join("imgbuild-manifest.json"));
        TwoVersions {
            workspace,
            versions,
            _cleanup,
            _cache_cleanup,
        }
    }
}

#[test]
fn concurrent_builds_share_the_cache_and_a_new_base_rebuilds_from_scratch() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let two = TwoVersions::new(
        "echo concurrent > /etc/first\n",
        "echo second > /etc/second\n",
    );
    let (workspace, versions) = (&two.workspace, &two.versions);
    // Two runs at once, both keeping the same steps under the same keys.
    let runs: Vec<Running> = versions
        .iter()
        .enumerate()
        .map(|(index, version)| {
            workspace
                .imgbuild()
                .env("IMGBUILD_NO_CACHE", "false")
                .args(["build", "image.toml", "--var"])
                .arg(format!("base_image={}", docker_base_image()))
                .arg("--var")
                .arg(format!("version={version}"))
                .spawn(&workspace.join(&format!("run{index}.log")))
        })
        .collect();
    for run in runs {
        let (status, log) = run.wait(std::time::Duration::from_secs(600));
        assert!(status.success(), "{log}");
    }
    let manifest = workspace.manifest();
    let builds = manifest["builds"].as_array().unwrap();
    assert_eq!(builds.len(), 2);
    assert_eq!(builds[0]["steps"][1]["key"], builds[1]["steps"][1]["key"]);
    // The kept step is sound and usable by whichever run tagged it last.
    let key = builds[0]["steps"][1]["key"].as_str().unwrap();
    assert_ne!(
        docker(&["images", "-q", &format!("imgbuild-cache:{key}")]),
        ""
    );

    // Another base: every key changes and plan says why.
    let outcome = workspace
        .imgbuild()
        .args(["--output", "json", "plan", "image.toml", "--var"])
        .arg(format!(
            "base_image={}",
            imgbuild_test_support::docker::sshd_image()
        ))
        .arg("--var")
        .arg(format!("version={}", unique_version()))
        .run()
        .exits_with(EXIT_OK);
    let document: serde_json::Value = serde_json::from_str(outcome.stdout.trim()).unwrap();
    let build_plan = &document["builds"][0];
    assert_eq!(build_plan["action"], "build", "{document}");
    assert!(
        build_plan["reasons"][0]
            .as_str()
            .unwrap()
            .contains("the base changed"),
        "{document}"
    );
}

/// The messages a build logged that start with `prefix`.
fn messages(outcome: &Outcome, prefix: &str) -> Vec<String> {
    outcome
        .events()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_runner_whose_engine_lacks_the_kept_steps_resumes_from_the_shared_store() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Content of this test's own: keys no other build kept or shared.
    let marker = unique_version();
    let mut two = TwoVersions::new(
        &format!("echo first {marker} > /etc/first\n"),
        "echo shared > /etc/second\n",
    );
    let (workspace, versions) = (&two.workspace, &two.versions);
    // A directory every runner mounts stands in for the bucket here (the
    // QEMU test shares through moto's S3; both are one object store).
    let shared = workspace.join("shared");
    let shared_build = |version: &str| {
        workspace
            .imgbuild()
            .env("IMGBUILD_NO_CACHE", "false")
            .env("IMGBUILD_CACHE_SHARED", &shared)
            .args(["--output", "json", "build", "image.toml", "--var"])
            .arg(format!("base_image={}", docker_base_image()))
            .arg("--var")
            .arg(format!("version={version}"))
            .run()
            .exits_with(EXIT_OK)
    };

    let first = shared_build(&versions[0]);
    assert_eq!(first.cached_steps(), None);
    let shared_entries = messages(&first, "shared the step cache entry");
    assert_eq!(shared_entries.len(), 2, "{}", first.stdout);
    let keys: Vec<String> = workspace.manifest()["builds"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|step| step["key"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(keys.len(), 2);

    // Another runner: its engine holds none of the kept images, nor the
    // image built on them.
    docker(&[
        "image",
        "rm",
        &format!("imgbuild-test/cached:{}", versions[0]),
    ]);
    for key in &keys {
        docker(&["image", "rm", &format!("imgbuild-cache:{key}")]);
        assert_eq!(
            docker(&["images", "-q", &format!("imgbuild-cache:{key}")]),
            ""
        );
    }
    let second = shared_build(&versions[1]);
    assert_eq!(second.cached_steps(), Some(2), "{}", second.stdout);
    assert_eq!(second.provisioners_run(), ["provisioner 3 of 3"]);
    // Only the longest shared prefix is fetched, and it shares nothing new.
    assert_eq!(
        messages(&second, "fetched the step cache entry").len(),
        1,
        "{}",
        second.stdout
    );
    assert!(messages(&second, "shared the step cache entry").is_empty());
    assert_eq!(
        docker(&[
            "run",
            "--rm",
            "--entrypoint",
            "cat",
            &format!("imgbuild-test/cached:{}", versions[1]),
            "/etc/first",
            "/etc/second"
        ]),
        format!("first {marker}\nshared")
    );

    // A third runner, after a change to the second script: the longest
    // key is in no store, and the first step comes from the bucket.
    docker(&[
        "image",
        "rm",
        &format!("imgbuild-test/cached:{}", versions[1]),
    ]);
    for key in &keys {
        // Only the longest prefix was loaded: the other tag is not there.
        let _ = std::process::Command::new("docker")
            .args(["image", "rm", &format!("imgbuild-cache:{key}")])
            .output();
    }
    workspace.write("second.sh", "echo changed > /etc/second\n");
    let third_version = unique_version();
    two._cleanup
        .add(format!("imgbuild-test/cached:{third_version}"));
    let third = shared_build(&third_version);
    assert_eq!(third.cached_steps(), Some(1), "{}", third.stdout);
    assert_eq!(
        third.provisioners_run(),
        ["provisioner 2 of 3", "provisioner 3 of 3"]
    );
    assert_eq!(
        messages(&third, "fetched the step cache entry").len(),
        1,
        "{}",
        third.stdout
    );
    assert_eq!(messages(&third, "shared the step cache entry").len(), 1);
}
