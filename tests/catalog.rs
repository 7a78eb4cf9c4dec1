//! The image catalog through the real binary: channels moved by promote,
//! rollback and revoke, what `output --channel` hands out, `retire`
//! removing real files and Docker images, a catalog in moto's S3 under
//! twenty concurrent writers, and a build refused because its base is a
//! revoked version.

use imgbuild::manifest::{Location, Manifest};
use imgbuild_test_support::{cli::*, common::*, docker::ImageCleanup};
use serde_json::{Value, json};
use std::process::Command;

/// A recorded build as an older imgbuild (format 2) wrote it.
fn entry(image: &str, build: &str, kind: &str, version: &str, artifact_id: &str) -> Value {
    json!({
        "run_id": format!("run-{version}"),
        "image": {"name": image, "version": version},
        "build": {"name": build, "type": kind},
        "artifact_id": artifact_id,
        "source": {"kind": "file", "reference": "/base.qcow2", "sha256": "00"},
        "inputs_sha256": "0",
        "started_at": format!("2026-01-0{version}T00:00:00Z"),
        "finished_at": format!("2026-01-0{version}T00:10:00Z"),
        "duration_secs": 600.0,
        "imgbuild_version": "0.1.0",
        "status": "tested",
    })
}

/// A QEMU entry whose disk and checksum file exist in the workspace.
fn disk_entry(workspace: &Workspace, version: &str) -> Value {
    let disk = workspace.write(
        &format!("output/img-{version}.qcow2"),
        &format!("disk {version}"),
    );
    workspace.write(
        &format!("output/img-{version}.qcow2.sha256"),
        &format!("00  img-{version}.qcow2\n"),
    );
    let mut value = entry("img", "vm", "qemu", version, &disk.display().to_string());
    value["files"] =
        json!([{"path": disk, "size": 6, "sha256": format!("{version}{}", "0".repeat(63))}]);
    value
}

fn write_v2(workspace: &Workspace, builds: Vec<Value>) {
    workspace.write(
        "imgbuild-manifest.json",
        &serde_json::to_string_pretty(&json!({"format_version": 2, "builds": builds})).unwrap(),
    );
}

fn stdout_of(outcome: &Outcome) -> String {
    outcome.stdout.trim().to_owned()
}

#[test]
fn channels_move_by_command_and_by_a_one_line_edit_and_output_follows_them() {
    let workspace = Workspace::new();
    let mut builds: Vec<Value> = (1..=4)
        .map(|v| disk_entry(&workspace, &v.to_string()))
        .collect();
    builds[2]["status"] = json!("failed");
    write_v2(&workspace, builds);
    let disk = |v: u32| {
        workspace
            .join(&format!("output/img-{v}.qcow2"))
            .display()
            .to_string()
    };
    let on_prod = || {
        stdout_of(
            &workspace
                .imgbuild()
                .args(["output", "--channel", "prod"])
                .run()
                .exits_with(EXIT_OK),
        )
    };

    workspace
        .imgbuild()
        .args([
            "promote",
            "img",
            "1",
            "--channel",
            "prod",
            "--reason",
            "first",
        ])
        .env("IMGBUILD_ACTOR", "alice")
        .run()
        .exits_with(EXIT_OK);
    // The first change migrated the file and kept every build.
    let written = workspace.manifest();
    assert_eq!(written["format_version"], 3);
    assert_eq!(written["builds"].as_array().unwrap().len(), 4);
    let history = &written["channels"]["img"]["prod"]["history"][0];
    assert_eq!(
        (history["by"].as_str(), history["reason"].as_str()),
        (Some("alice"), Some("first"))
    );
    assert_eq!(on_prod(), disk(1));

    workspace
        .imgbuild()
        .args(["promote", "img", "2", "--channel", "prod"])
        .run()
        .exits_with(EXIT_OK);
    assert_eq!(on_prod(), disk(2));
    // A failed version is refused, and nothing changes.
    let before = workspace.read("imgbuild-manifest.json");
    workspace
        .imgbuild()
        .args(["promote", "img", "3", "--channel", "prod"])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("failed its tests");
    assert_eq!(workspace.read("imgbuild-manifest.json"), before);

    // A pull request promotes by changing one line.
    let channel = before
        .find("\"prod\": {")
        .expect("the channel is in the file");
    let (head, tail) = before.split_at(channel);
    let edited = format!(
        "{head}{}",
        tail.replacen("\"version\": \"2\"", "\"version\": \"4\"", 1)
    );
    let changed: Vec<_> = before
        .lines()
        .zip(edited.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(changed.len(), 1, "{changed:?}");
    workspace.write("imgbuild-manifest.json", &edited);
    assert_eq!(on_prod(), disk(4));
    // ...and rollback goes back to what the channel held before the edit.
    workspace
        .imgbuild()
        .args(["rollback", "img", "--channel", "prod"])
        .run()
        .exits_with(EXIT_OK);
    assert_eq!(on_prod(), disk(2));

    // Revoking what prod hands out moves prod back, and it stays
    // unpromotable.
    workspace
        .imgbuild()
        .args([
            "revoke",
            "img",
            "2",
            "--reason",
            "CVE-2026-0001",
            "--move-channels",
        ])
        .run()
        .exits_with(EXIT_OK);
    assert_eq!(on_prod(), disk(1));
    workspace
        .imgbuild()
        .args(["promote", "img", "2", "--channel", "prod"])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("CVE-2026-0001");
    workspace
        .imgbuild()
        .args(["output", "--build", "vm"])
        .run()
        .exits_with(EXIT_OK);
    workspace
        .imgbuild()
        .args(["rollback", "img", "--channel", "prod"])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("no earlier version");

    let listed = workspace
        .imgbuild()
        .args(["--output", "json", "catalog"])
        .run()
        .exits_with(EXIT_OK);
    let listed: Value = serde_json::from_str(&listed.stdout).unwrap();
    let image = &listed["images"][0];
    assert_eq!(image["channels"]["prod"], "1");
    let statuses: Vec<&str> = image["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["builds"][0]["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["tested", "revoked", "failed", "tested"]);
}

fn docker_cli(args: &[&str]) -> String {
    let output = Command::new("docker").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn image_exists(reference: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", reference])
        .output()
        .unwrap()
        .status
        .success()
}

#[test]
fn retire_removes_old_disks_and_images_and_keeps_what_channels_hand_out() {
    let workspace = Workspace::new();
    let repository = unique("imgbuild-retire");
    let mut cleanup = ImageCleanup::repository(&repository);
    // Two real images of their own (a label makes a new image id).
    let mut builds: Vec<Value> = (1..=3)
        .map(|v| disk_entry(&workspace, &v.to_string()))
        .collect();
    for version in ["1", "2"] {
        let context = workspace.join(&format!("ctx-{version}"));
        std::fs::create_dir_all(&context).unwrap();
        std::fs::write(
            context.join("Dockerfile"),
            format!(
                "FROM {}\nLABEL imgbuild.test.version={version}\n",
                docker_base_image()
            ),
        )
        .unwrap();
        let tag = format!("{repository}:{version}");
        docker_cli(&["build", "-q", "-t", &tag, &context.display().to_string()]);
        let id = docker_cli(&["image", "inspect", "-f", "{{.Id}}", &tag]);
        cleanup.add(id.clone());
        let mut value = entry("svc", "box", "docker", version, &id);
        value["details"] = json!({"repository": repository, "tags": [version]});
        builds.push(value);
    }
    write_v2(&workspace, builds);
    workspace
        .imgbuild()
        .args(["promote", "img", "1", "--channel", "prod"])
        .run()
        .exits_with(EXIT_OK);

    let dry = workspace
        .imgbuild()
        .args(["retire", "img", "--keep", "1", "--dry-run"])
        .run()
        .exits_with(EXIT_OK);
    assert!(dry.stdout.contains("img 2"), "{}", dry.stdout);
    assert!(
        !dry.stdout.contains("img 1") && !dry.stdout.contains("img 3"),
        "{}",
        dry.stdout
    );
    assert!(
        workspace.join("output/img-2.qcow2").exists(),
        "a dry run removes nothing"
    );

    workspace
        .imgbuild()
        .args(["retire", "img", "--keep", "1"])
        .run()
        .exits_with(EXIT_OK);
    assert!(!workspace.join("output/img-2.qcow2").exists());
    assert!(!workspace.join("output/img-2.qcow2.sha256").exists());
    for kept in ["output/img-1.qcow2", "output/img-3.qcow2"] {
        assert!(workspace.join(kept).exists(), "{kept} is kept");
    }
    workspace
        .imgbuild()
        .args(["retire", "svc", "--keep", "1"])
        .run()
        .exits_with(EXIT_OK);
    assert!(!image_exists(&format!("{repository}:1")));
    assert!(image_exists(&format!("{repository}:2")));

    let catalog = workspace.manifest();
    let retired: Vec<(String, String)> = catalog["builds"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["status"] == "retired")
        .map(|b| {
            (
                b["image"]["name"].as_str().unwrap().to_owned(),
                b["image"]["version"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        retired,
        [
            ("img".to_owned(), "2".to_owned()),
            ("svc".to_owned(), "1".to_owned())
        ]
    );
    let removed = catalog["builds"][1]["retirement"]["removed"]
        .as_array()
        .unwrap();
    assert_eq!(removed.len(), 2, "the disk and its checksum: {removed:?}");
    // A retired version can no longer be handed out or promoted.
    workspace
        .imgbuild()
        .args(["promote", "img", "2", "--channel", "dev"])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("retired");
    // Nothing left to do: running it again changes nothing.
    let before = workspace.read("imgbuild-manifest.json");
    workspace
        .imgbuild()
        .args(["retire", "img", "--keep", "1"])
        .run()
        .exits_with(EXIT_OK);
    assert_eq!(workspace.read("imgbuild-manifest.json"), before);

    // An artifact removed by hand is not handed out: the disk, and the
    // image by its id.
    std::fs::remove_file(workspace.join("output/img-3.qcow2")).unwrap();
    workspace
        .imgbuild()
        .args(["promote", "img", "3", "--channel", "prod"])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("its artifact is gone")
        .stderr_has("img-3.qcow2");
    assert_eq!(workspace.read("imgbuild-manifest.json"), before);
    workspace
        .imgbuild()
        .args(["promote", "svc", "2", "--channel", "prod"])
        .run()
        .exits_with(EXIT_OK);
    let svc_2 = catalog["builds"][4]["artifact_id"].as_str().unwrap();
    docker_cli(&["rmi", &format!("{repository}:2")]);
    workspace
        .imgbuild()
        .args(["promote", "svc", "2", "--channel", "dev"])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has(svc_2);
    // Where the artifact cannot be looked at, promoting is a choice.
    workspace
        .imgbuild()
        .args([
            "promote",
            "img",
            "3",
            "--channel",
            "prod",
            "--no-artifact-check",
        ])
        .run()
        .exits_with(EXIT_OK);
}

/// A fresh moto bucket, and the environment an imgbuild process needs to
/// reach it.
fn moto_bucket() -> (String, Vec<(&'static str, String)>) {
    let bucket = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(imgbuild_test_support::ec2::moto_bucket("imgbuild-catalog"));
    (bucket, imgbuild_test_support::ec2::moto_env())
}

#[test]
fn a_catalog_in_s3_loses_no_update_under_twenty_concurrent_writers() {
    let (bucket, env) = moto_bucket();
    let url = format!("s3://{bucket}/images/catalog.json");
    let workspace = Workspace::new();
    // Ten versions recorded first, so the promoters have something to
    // promote; then ten builds record new versions while ten promotions
    // run, each a separate process with its own S3 client.
    let seed: Vec<Value> = (0..10)
        .map(|v| entry("img", "vm", "qemu", &v.to_string(), "/out"))
        .collect();
    let seed_file = workspace.write(
        "seed.json",
        &serde_json::to_string(&json!({"format_version": 2, "builds": seed})).unwrap(),
    );
    let with_env = |mut command: Command| {
        for (name, value) in &env {
            command.env(name, value);
        }
        command
    };
    // The seed goes up through the library.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    for (name, value) in &env {
        // SAFETY: set before any thread of this test reads the
        // environment; the other tests of this binary set nothing and read
        // no AWS variable.
        unsafe { std::env::set_var(name, value) };
    }
    let location: Location = url.parse().unwrap();
    let seeded: Manifest = imgbuild::manifest::read(&seed_file).unwrap();
    runtime.block_on(async {
        location
            .modify(|manifest| {
                *manifest = seeded.clone();
                Ok(())
            })
            .await
            .unwrap();
    });

    let promoters: Vec<_> = (0..10)
        .map(|i| {
            let mut command = with_env(Command::new(imgbuild_binary()));
            command
                .args([
                    "promote",
                    "img",
                    &i.to_string(),
                    "--channel",
                    &format!("ch{i}"),
                ])
                .args(["--manifest", &url])
                .env("IMGBUILD_STATE_DIR", workspace.state_dir())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            command.spawn().unwrap()
        })
        .collect();
    runtime.block_on(async {
        let writers: Vec<_> = (10..20)
            .map(|v| {
                let location = location.clone();
                tokio::spawn(async move {
                    let mut recorded: imgbuild::manifest::Entry =
                        serde_json::from_value(entry("img", "vm", "qemu", &v.to_string(), "/out"))
                            .unwrap();
                    recorded.finished_at = format!("2026-02-01T00:00:{v}Z");
                    location.append(recorded).await
                })
            })
            .collect();
        for writer in writers {
            assert!(writer.await.unwrap().unwrap().is_none());
        }
    });
    for promoter in promoters {
        let output = promoter.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let catalog = runtime.block_on(location.read()).unwrap();
    let mut versions: Vec<u32> = catalog
        .builds
        .iter()
        .map(|e| e.image.version.parse().unwrap())
        .collect();
    versions.sort();
    assert_eq!(versions, (0..20).collect::<Vec<_>>());
    let channels = &catalog.channels["img"];
    assert_eq!(channels.len(), 10);
    for i in 0..10 {
        assert_eq!(channels[&format!("ch{i}")].version, i.to_string());
    }
    // `output` reads the same object.
    let output = with_env(Command::new(imgbuild_binary()))
        .args(["output", &url, "--channel", "ch3"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "/out");
}

#[test]
fn a_channel_published_to_ssm_follows_promote_and_rollback() {
    let (_, env) = moto_bucket();
    let workspace = Workspace::new();
    // Real AMIs in moto, in both regions, so that promote finds them.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let register = |region: &str, name: &str| {
        runtime.block_on(async {
            imgbuild_test_support::ec2::ec2(region)
                .await
                .register_image()
                .name(name)
                .root_device_name("/dev/xvda")
                .send()
                .await
                .unwrap()
                .image_id()
                .unwrap()
                .to_owned()
        })
    };
    let amis: std::collections::HashMap<&str, Value> = ["1", "2"]
        .into_iter()
        .map(|v| {
            let name = unique(&format!("web-{v}"));
            let amis = json!({
                "us-east-1": register("us-east-1", &name),
                "eu-west-1": register("eu-west-1", &name),
            });
            (v, amis)
        })
        .collect();
    let region = |v: &str| amis[v].clone();
    let builds: Vec<Value> = ["1", "2"]
        .iter()
        .map(|v| {
            let mut value = entry(
                "web",
                "ami",
                "ec2",
                v,
                &format!("us-east-1:{}", region(v)["us-east-1"].as_str().unwrap()),
            );
            value["details"] =
                json!({"region": "us-east-1", "ami_name": format!("web-{v}"), "amis": region(v)});
            value
        })
        .collect();
    write_v2(&workspace, builds);
    let imgbuild = |args: &[&str]| {
        let mut command = workspace.imgbuild().args(args);
        for (name, value) in &env {
            command = command.env(name, value);
        }
        command.run()
    };
    let parameter = |region: &str| {
        let endpoint = env[0].1.clone();
        let region = region.to_owned();
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .region(aws_config::Region::new(region))
                    .endpoint_url(endpoint)
                    .credentials_provider(aws_sdk_ssm::config::Credentials::new(
                        "testing", "testing", None, None, "test",
                    ))
                    .load()
                    .await;
                let answer = aws_sdk_ssm::Client::new(&config)
                    .get_parameter()
                    .name("/images/web/prod")
                    .send()
                    .await
                    .unwrap();
                answer.parameter().unwrap().value().unwrap().to_owned()
            })
    };

    imgbuild(&["promote", "web", "1", "--channel", "prod", "--ssm"]).exits_with(EXIT_OK);
    assert_eq!(parameter("us-east-1"), region("1")["us-east-1"]);
    assert_eq!(parameter("eu-west-1"), region("1")["eu-west-1"]);
    // Later changes publish without being asked again.
    imgbuild(&["promote", "web", "2", "--channel", "prod"]).exits_with(EXIT_OK);
    assert_eq!(parameter("eu-west-1"), region("2")["eu-west-1"]);
    imgbuild(&["rollback", "web", "--channel", "prod"]).exits_with(EXIT_OK);
    assert_eq!(parameter("us-east-1"), region("1")["us-east-1"]);
    assert_eq!(
        workspace.manifest()["channels"]["web"]["prod"]["ssm_parameter"],
        "/images/web/prod"
    );

    // A copy deregistered by hand: the version is not handed out again.
    let gone = region("2")["eu-west-1"].as_str().unwrap().to_owned();
    runtime.block_on(async {
        imgbuild_test_support::ec2::ec2("eu-west-1")
            .await
            .deregister_image()
            .image_id(&gone)
            .send()
            .await
            .unwrap();
    });
    imgbuild(&["promote", "web", "2", "--channel", "prod"])
        .exits_with(EXIT_USAGE)
        .stderr_has(&format!("eu-west-1:{gone}"));
    assert_eq!(parameter("us-east-1"), region("1")["us-east-1"]);
}

fn docker_config(image: &str, version: &str, base: &str) -> String {
    format!(
        r#"[image]
name = "{image}"
version = "{version}"

[builders.box]
type = "docker"
image = "{base}"
pull = "never"

[[provision]]
type = "shell"
inline = ["echo {image} {version} > /etc/imgbuild-layer"]
"#
    )
}

#[test]
fn a_build_records_its_parent_and_is_refused_once_the_parent_is_revoked() {
    let workspace = Workspace::new();
    let (base, app) = (unique("imgbuild-parent"), unique("imgbuild-child"));
    let _cleanup = (
        ImageCleanup::repository(&base),
        ImageCleanup::repository(&app),
    );
    workspace.write(
        "base.toml",
        &docker_config(&base, "1", &docker_base_image()),
    );
    workspace
        .imgbuild()
        .args(["build", "base.toml"])
        .run()
        .exits_with(EXIT_OK);

    let from_base = format!("{base}:1");
    workspace.write("app.toml", &docker_config(&app, "1", &from_base));
    workspace
        .imgbuild()
        .args(["build", "app.toml"])
        .run()
        .exits_with(EXIT_OK);
    let catalog = workspace.manifest();
    let child = &catalog["builds"][1];
    assert_eq!(child["image"]["name"], app.as_str());
    assert_eq!(
        child["parent"],
        json!({"image": base, "version": "1", "build": "box"})
    );

    workspace
        .imgbuild()
        .args(["revoke", &base, "1", "--reason", "bad openssl"])
        .run()
        .exits_with(EXIT_OK);
    workspace.write("app.toml", &docker_config(&app, "2", &from_base));
    workspace
        .imgbuild()
        .args(["build", "app.toml"])
        .run()
        .exits_with(EXIT_USAGE)
        .stderr_has("revoked (bad openssl)");
    assert!(!image_exists(&format!("{app}:2")), "nothing was built");
    assert_eq!(workspace.manifest()["builds"].as_array().unwrap().len(), 2);
}

/// Unknown names, a failed version, a channel in the way and a corrupt
/// catalog: each is named in the error, and the catalog is left as it was.
#[test]
fn bad_input_is_named_and_changes_nothing() {
    let workspace = Workspace::new();
    let mut builds = vec![disk_entry(&workspace, "1"), disk_entry(&workspace, "2")];
    builds[1]["status"] = json!("failed");
    write_v2(&workspace, builds);
    workspace
        .imgbuild()
        .args(["promote", "img", "1", "--channel", "prod"])
        .run()
        .exits_with(EXIT_OK);
    let before = workspace.read("imgbuild-manifest.json");
    for (args, names) in [
        (&["promote", "nope", "1", "--channel", "prod"][..], "nope"),
        (&["promote", "img", "9", "--channel", "prod"][..], "9"),
        (&["promote", "img", "2", "--channel", "prod"][..], "failed"),
        (&["rollback", "img", "--channel", "staging"][..], "staging"),
        (&["output", "--channel", "staging"][..], "staging"),
        (&["revoke", "img", "9", "--reason", "x"][..], "9"),
    ] {
        workspace
            .imgbuild()
            .args(args)
            .run()
            .exits_with(EXIT_USAGE)
            .stderr_has(names);
        assert_eq!(workspace.read("imgbuild-manifest.json"), before, "{args:?}");
    }
    // What prod hands out is never retired, however few are kept.
    workspace
        .imgbuild()
        .args(["retire", "img", "--keep", "0"])
        .run()
        .exits_with(EXIT_OK);
    assert!(workspace.join("output/img-1.qcow2").exists());
    assert_eq!(
        workspace.manifest()["channels"]["img"]["prod"]["version"],
        "1"
    );

    let corrupt = "{\n  \"format_version\": 3,\n  \"builds\": [ oops\n";
    workspace.write("imgbuild-manifest.json", corrupt);
    workspace
        .imgbuild()
        .args(["promote", "img", "1", "--channel", "dev"])
        .run()
        .exits_with(EXIT_BUILD_FAILED)
        .stderr_has("imgbuild-manifest.json")
        .stderr_has("line 3");
    assert_eq!(workspace.read("imgbuild-manifest.json"), corrupt);
}

/// The GitOps flow on real builds: three versions built by the Docker
/// builder, prod promoted, moved on and rolled back, a version revoked and
/// the old ones retired; the engine and `output --channel` checked at every
/// step. (The AMI part, retired in both regions, is in tests/ec2_build.rs.)
#[test]
fn the_gitops_flow_on_real_builds_promotes_rolls_back_revokes_and_retires() {
    let workspace = Workspace::new();
    let web = unique("imgbuild-gitops");
    let _cleanup = ImageCleanup::repository(&web);
    let imgbuild = |args: &[&str]| workspace.imgbuild().args(args).run();
    let mut ids = Vec::new();
    for version in ["1", "2", "3"] {
        workspace.write(
            "web.toml",
            &docker_config(&web, version, &docker_base_image()),
        );
        imgbuild(&["build", "web.toml"]).exits_with(EXIT_OK);
        let catalog = workspace.manifest();
        let id = catalog["builds"][ids.len()]["artifact_id"]
            .as_str()
            .unwrap();
        assert!(image_exists(id), "{id}");
        ids.push(id.to_owned());
    }
    let prod = || stdout_of(&imgbuild(&["output", "--channel", "prod"]).exits_with(EXIT_OK));

    imgbuild(&[
        "promote",
        &web,
        "1",
        "--channel",
        "prod",
        "--reason",
        "first",
    ])
    .exits_with(EXIT_OK);
    assert_eq!(prod(), ids[0]);
    imgbuild(&["promote", &web, "2", "--channel", "prod"]).exits_with(EXIT_OK);
    assert_eq!(prod(), ids[1]);
    imgbuild(&["rollback", &web, "--channel", "prod"]).exits_with(EXIT_OK);
    assert_eq!(prod(), ids[0]);

    imgbuild(&["revoke", &web, "2", "--reason", "CVE-2026-0001"]).exits_with(EXIT_OK);
    let before = workspace.read("imgbuild-manifest.json");
    imgbuild(&["promote", &web, "2", "--channel", "prod"])
        .exits_with(EXIT_USAGE)
        .stderr_has("revoked (CVE-2026-0001)");
    assert_eq!(workspace.read("imgbuild-manifest.json"), before);
    assert_eq!(prod(), ids[0]);

    // Kept: the newest (3) and what prod hands out (1); version 2 goes,
    // its tag and its image.
    imgbuild(&["retire", &web, "--keep", "1"]).exits_with(EXIT_OK);
    assert!(!image_exists(&format!("{web}:2")), "the tag of 2 is left");
    assert!(!image_exists(&ids[1]), "the image of 2 is left");
    for (version, id) in [("1", &ids[0]), ("3", &ids[2])] {
        assert!(image_exists(&format!("{web}:{version}")), "{version}");
        assert!(image_exists(id), "{id}");
    }
    let statuses: Vec<String> = workspace.manifest()["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["status"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(statuses, ["built", "retired", "built"]);
    assert_eq!(prod(), ids[0]);
    assert!(workspace.journals().is_empty());

    // What is in what prod hands out: the SBOM the build wrote, refused
    // once it no longer holds what was recorded.
    let sbom = |format: &str| imgbuild(&["output", "--channel", "prod", "--format", format]);
    let spdx: Value = serde_json::from_str(&sbom("sbom").exits_with(EXIT_OK).stdout).unwrap();
    assert_eq!(spdx["spdxVersion"], "SPDX-2.3");
    assert!(!spdx["packages"].as_array().unwrap().is_empty());
    let cdx: Value = serde_json::from_str(&sbom("cyclonedx").exits_with(EXIT_OK).stdout).unwrap();
    assert_eq!(cdx["specVersion"], "1.5");
    let first = &workspace.manifest()["builds"][0];
    let path = first["details"]["sbom"]["spdx"].as_str().unwrap();
    std::fs::write(path, "{}").unwrap();
    sbom("spdx")
        .exits_with(EXIT_USAGE)
        .stderr_has("changed since the build");
}

fn git(workspace: &Workspace, args: &[&str]) -> std::process::Output {
    Command::new("git")
        .args(["-c", "user.name=ci", "-c", "user.email=ci@example.com"])
        .args(args)
        .current_dir(workspace.path())
        .output()
        .unwrap()
}

fn git_ok(workspace: &Workspace, args: &[&str]) {
    let output = git(workspace, args);
    assert!(
        output.status.success(),
        "git {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Records `version` as a pipeline's build does: appended through the
/// catalog's own writer.
fn record(workspace: &Workspace, version: &str) {
    let value = disk_entry(workspace, version);
    let location = Location::File(workspace.join("imgbuild-manifest.json"));
    let entry = serde_json::from_value(value).unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(location.append(entry))
        .unwrap();
}

/// Two branches that each recorded a build (and one promoted) merge
/// cleanly through the merge driver, where git's line merge conflicts; two
/// branches that moved the same channel differently do conflict.
#[test]
fn git_merges_branches_that_recorded_builds_and_refuses_two_different_promotions() {
    let workspace = Workspace::new();
    git_ok(&workspace, &["init", "-q", "-b", "main"]);
    // Only the catalog is committed, as in a repository of configs.
    workspace.write(
        ".gitignore",
        "*\n!.gitignore\n!.gitattributes\n!imgbuild-manifest.json\n",
    );
    workspace.write(
        ".gitattributes",
        "imgbuild-manifest.json merge=imgbuild-catalog\n",
    );
    record(&workspace, "1");
    git_ok(&workspace, &["add", "-A"]);
    git_ok(&workspace, &["commit", "-q", "-m", "v1"]);

    git_ok(&workspace, &["checkout", "-q", "-b", "two"]);
    record(&workspace, "2");
    git_ok(&workspace, &["commit", "-q", "-am", "v2"]);
    git_ok(&workspace, &["checkout", "-q", "main"]);
    record(&workspace, "3");
    workspace
        .imgbuild()
        .args(["promote", "img", "1", "--channel", "prod"])
        .run()
        .exits_with(EXIT_OK);
    git_ok(&workspace, &["commit", "-q", "-am", "v3, prod on 1"]);

    // Without the driver, git's line merge conflicts on the appended builds.
    let plain = git(&workspace, &["merge", "--no-edit", "two"]);
    assert!(
        !plain.status.success(),
        "a line merge of two appends conflicts"
    );
    git_ok(&workspace, &["merge", "--abort"]);

    let driver = format!("{} merge-catalog %O %A %B", imgbuild_binary().display());
    git_ok(
        &workspace,
        &["config", "merge.imgbuild-catalog.driver", &driver],
    );
    git_ok(&workspace, &["merge", "-q", "--no-edit", "two"]);
    let merged = workspace.manifest();
    let versions: Vec<&str> = merged["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["image"]["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["1", "3", "2"]);
    assert_eq!(merged["channels"]["img"]["prod"]["version"], "1");
    assert_eq!(merged["format_version"], 3);

    // Both branches move prod, to different versions.
    git_ok(&workspace, &["checkout", "-q", "-b", "to-two"]);
    workspace
        .imgbuild()
        .args(["promote", "img", "2", "--channel", "prod"])
        .run()
        .exits_with(EXIT_OK);
    git_ok(&workspace, &["commit", "-q", "-am", "prod on 2"]);
    git_ok(&workspace, &["checkout", "-q", "main"]);
    workspace
        .imgbuild()
        .args(["promote", "img", "3", "--channel", "prod"])
        .run()
        .exits_with(EXIT_OK);
    git_ok(&workspace, &["commit", "-q", "-am", "prod on 3"]);
    let conflicted = git(&workspace, &["merge", "--no-edit", "to-two"]);
    assert!(!conflicted.status.success());
    let said = String::from_utf8_lossy(&conflicted.stderr).into_owned()
        + &String::from_utf8_lossy(&conflicted.stdout);
    assert!(said.contains("channel prod of img"), "{said}");
    // What is left to resolve is still a valid catalog, holding ours.
    assert_eq!(
        workspace.manifest()["channels"]["img"]["prod"]["version"],
        "3"
    );
}
