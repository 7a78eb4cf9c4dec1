//! The Docker builder against the real engine on this machine:
//! `.ci/start-dockerd.sh` starts one if needed, and the base image is the
//! fixture from `tests/fixtures/docker-base-image.sh`. Every test uses its
//! own repository and run id, and removes the images it makes.

use imgbuild_builders::BuildError;
use imgbuild_builders::docker::DockerCommunicator;
use imgbuild_builders::docker::kind::DockerResource;
use imgbuild_core::Stream;
use imgbuild_core::journal;
use imgbuild_core::{Journal, OnError, Resource};
use imgbuild_provisioners::{CommError, Communicator, ExitStatus, OutputSink};
use imgbuild_test_support::{docker::*, harness::*};
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_build_commits_a_tagged_labelled_image_and_leaves_nothing_else() {
    let base = base_image();
    let docker = docker();
    let repository = unique_repository();
    let mut cleanup = ImageCleanup::repository(&repository);
    let harness = Harness::new("app");
    let builder = builder(serde_json::json!({
        "image": base,
        "pull": false,
        "repository": repository,
        "tags": ["latest", "stable"],
        "env": {"BUILD_ENV": "from-the-builder"},
        "changes": [
            "ENV GREETING=hello",
            "LABEL org.example.tier=backend",
            "EXPOSE 8080/tcp",
            "WORKDIR /srv",
            "CMD [\"cat\", \"/etc/imgbuild-built\"]",
        ],
        "author": "Infra Team <infra@example.com>",
        "message": "built by the imgbuild tests",
    }));
    assert!(builder.validate(harness.config_dir.path()).is_empty());
    let image = image_info("app", "1.0.0");
    let provisioners = vec![
        shell(&[
            "echo \"built with $BUILD_ENV\" > /etc/imgbuild-built",
            "echo provisioning-output-line",
        ]),
        upload_content(
            "port = 8080\n",
            "/srv/app/config.toml",
            harness.config_dir.path(),
        ),
    ];
    let request = harness.request(image.clone(), provisioners);

    let started = Instant::now();
    builder.preflight(&request, &harness.cx).await.unwrap();
    let artifact = builder.build(&request, &harness.cx).await.unwrap();
    eprintln!(
        "build took {:.1}s ({})",
        started.elapsed().as_secs_f64(),
        harness.step_timings()
    );
    cleanup.add(artifact.id.clone());

    assert_eq!(artifact.builder, "docker");
    assert!(artifact.id.starts_with("sha256:"), "{}", artifact.id);
    assert_eq!(artifact.details["repository"], repository);
    assert_eq!(
        artifact.details["tags"],
        serde_json::json!(["1.0.0", "latest", "stable"])
    );
    assert_eq!(artifact.source.kind, "docker-image");
    assert_eq!(artifact.source.reference, base);
    let base_id = docker.inspect_image(&base).await.unwrap().id.unwrap();
    assert_eq!(artifact.details["base_image"]["id"], base_id);
    assert_eq!(
        artifact.source.sha256.as_deref(),
        base_id.strip_prefix("sha256:")
    );

    // Every tag names the new image; the run's temporary tag is gone.
    assert_eq!(
        repository_tags(&docker, &repository).await,
        ["1.0.0", "latest", "stable"]
    );
    for tag in ["1.0.0", "latest", "stable"] {
        let inspected = docker
            .inspect_image(&format!("{repository}:{tag}"))
            .await
            .unwrap();
        assert_eq!(inspected.id.as_deref(), Some(artifact.id.as_str()), "{tag}");
    }
    let inspected = docker.inspect_image(&artifact.id).await.unwrap();
    let tags = inspected.repo_tags.clone().unwrap_or_default();
    assert_eq!(tags.len(), 3, "only the three tags: {tags:?}");
    assert_eq!(
        inspected.author.as_deref(),
        Some("Infra Team <infra@example.com>")
    );
    assert_eq!(
        inspected.comment.as_deref(),
        Some("built by the imgbuild tests")
    );

    let config = inspected.config.unwrap();
    let labels = config.labels.unwrap_or_default();
    let label = |key: &str| labels.get(key).map(String::as_str);
    assert_eq!(label("org.opencontainers.image.version"), Some("1.0.0"));
    assert_eq!(
        label("org.opencontainers.image.created"),
        Some(image.created.as_str())
    );
    assert_eq!(
        label("org.opencontainers.image.revision"),
        Some("0123456789abcdef")
    );
    assert_eq!(label("org.opencontainers.image.title"), Some("app"));
    assert_eq!(
        label("org.opencontainers.image.description"),
        Some("imgbuild docker builder test image")
    );
    assert_eq!(
        label("org.opencontainers.image.base.name"),
        Some(base.as_str())
    );
    assert_eq!(label("org.example.owner"), Some("infra-team"));
    assert_eq!(label("org.example.tier"), Some("backend"));
    assert_eq!(label(RUN_ID_LABEL), Some(harness.run_id()));
    // The base image's labels are inherited, as with `FROM`.
    assert!(label("org.imgbuild.fixture-hash").is_some(), "{labels:?}");
    let env = config.env.unwrap_or_default();
    assert!(env.contains(&"GREETING=hello".to_owned()), "{env:?}");
    assert!(
        env.contains(&"LANG=C.UTF-8".to_owned()),
        "base image env kept: {env:?}"
    );
    assert!(
        !env.iter().any(|e| e.starts_with("BUILD_ENV")),
        "build env leaked: {env:?}"
    );
    assert_eq!(
        config.cmd,
        Some(vec!["cat".to_owned(), "/etc/imgbuild-built".to_owned()])
    );
    assert!(
        config.entrypoint.unwrap_or_default().is_empty(),
        "the run command leaked into the image"
    );
    assert_eq!(config.exposed_ports, Some(vec!["8080/tcp".to_owned()]));
    assert_eq!(config.working_dir.as_deref(), Some("/srv"));

    // The image does what the provisioners and changes said.
    let (code, output) = run_image(&docker, &format!("{repository}:1.0.0"), None).await;
    assert_eq!((code, output.trim()), (0, "built with from-the-builder"));
    let (code, output) = run_image(
        &docker,
        &format!("{repository}:stable"),
        Some(vec!["cat", "app/config.toml"]),
    )
    .await;
    assert_eq!((code, output.as_str()), (0, "port = 8080\n"));

    assert!(
        harness
            .output_lines()
            .contains(&"provisioning-output-line".to_owned())
    );
    harness.assert_journal_empty();
    assert!(
        containers_of_run(&docker, harness.run_id())
            .await
            .is_empty()
    );
}

#[tokio::test]
async fn a_second_build_of_the_same_version_is_refused_before_anything_starts() {
    let base = base_image();
    let docker = docker();
    let repository = unique_repository();
    let mut cleanup = ImageCleanup::repository(&repository);
    let config = serde_json::json!({"image": base, "pull": false, "repository": repository});
    let image = image_info("immutable", "2.0.0");

    let first = Harness::new("app");
    let request = first.request(image.clone(), Vec::new());
    builder(config.clone())
        .preflight(&request, &first.cx)
        .await
        .unwrap();
    let artifact = builder(config.clone())
        .build(&request, &first.cx)
        .await
        .unwrap();
    cleanup.add(artifact.id.clone());
    // The version alone: no `latest` unless the config asks for it.
    assert_eq!(artifact.details["tags"], serde_json::json!(["2.0.0"]));
    assert_eq!(repository_tags(&docker, &repository).await, ["2.0.0"]);

    let second = Harness::new("app");
    let request = second.request(image.clone(), vec![shell(&["echo must-not-run"])]);
    let err = builder(config.clone())
        .preflight(&request, &second.cx)
        .await
        .unwrap_err();
    let BuildError::Refused(message) = err else {
        panic!("expected a refusal, got {err:?}");
    };
    let reference = format!("{repository}:2.0.0");
    assert!(
        message.contains(&format!("docker image {reference} already exists")),
        "{message}"
    );
    assert!(message.contains(&artifact.id), "{message}");
    assert!(message.contains("bump `image.version`"), "{message}");
    assert!(
        message.contains(&format!("docker image rm {reference}")),
        "{message}"
    );

    // The build itself checks again before starting anything.
    let err = builder(config)
        .build(&request, &second.cx)
        .await
        .unwrap_err();
    match err {
        BuildError::Failed { step, message } => {
            assert_eq!(step, "check_tag");
            assert!(message.contains("already exists"), "{message}");
        }
        other => panic!("expected the tag check to fail, got {other:?}"),
    }
    assert!(!second.output_lines().contains(&"must-not-run".to_owned()));
    assert!(containers_of_run(&docker, second.run_id()).await.is_empty());
    second.assert_journal_empty();
    let inspected = docker.inspect_image(&reference).await.unwrap();
    assert_eq!(
        inspected.id.as_deref(),
        Some(artifact.id.as_str()),
        "the first image is untouched"
    );
    assert_eq!(repository_tags(&docker, &repository).await, ["2.0.0"]);
}

#[tokio::test]
async fn a_failing_provisioner_fails_the_build_and_leaves_no_container_or_tag() {
    let base = base_image();
    let docker = docker();
    let repository = unique_repository();
    let _cleanup = ImageCleanup::repository(&repository);
    let harness = Harness::new("app");
    let builder = builder(
        serde_json::json!({"image": base, "pull": false, "repository": repository, "tags": ["latest"]}),
    );
    let request = harness.request(
        image_info("failing", "3.0.0"),
        vec![shell(&["echo about to fail >&2", "exit 3"])],
    );

    builder.preflight(&request, &harness.cx).await.unwrap();
    let err = builder.build(&request, &harness.cx).await.unwrap_err();
    match err {
        BuildError::Failed { step, message } => {
            assert_eq!(step, "provision");
            assert!(message.contains("exit code 3"), "{message}");
            assert!(
                message.contains("about to fail"),
                "the output tail explains it: {message}"
            );
        }
        other => panic!("expected a provisioning failure, got {other:?}"),
    }
    assert!(
        containers_of_run(&docker, harness.run_id())
            .await
            .is_empty()
    );
    harness.assert_journal_empty();
    // Neither the version, nor `latest`, nor the run's temporary tag.
    assert_eq!(
        repository_tags(&docker, &repository).await,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn on_error_abort_keeps_the_container_for_debugging_until_cleaned() {
    let base = base_image();
    let docker = docker();
    let harness = Harness::new("debug-me");
    let builder = builder(serde_json::json!({"image": base, "pull": false, "discard": true}));
    let mut request = harness.request(
        image_info("debug", "1.0.0"),
        vec![shell(&["touch /evidence", "exit 7"])],
    );
    request.on_error = OnError::Abort;
    let err = builder.build(&request, &harness.cx).await.unwrap_err();
    assert!(
        matches!(&err, BuildError::Failed { step, .. } if step == "provision"),
        "{err:?}"
    );

    let left = containers_of_run(&docker, harness.run_id()).await;
    assert_eq!(left.len(), 1, "{left:?}");
    let name = left[0].trim_start_matches('/').to_owned();
    let warned = harness.sink.events().iter().any(|event| {
        matches!(event, imgbuild_core::Event::Message { message, .. }
            if message.contains(&format!("docker exec -it {name} sh")))
    });
    assert!(warned, "the log says how to get into the container");
    let (code, _) = docker_exec(&docker, &name, &["test", "-e", "/evidence"]).await;
    assert_eq!(
        code, 0,
        "the container is still running, as the provisioner left it"
    );

    let outstanding = harness.journal.outstanding();
    assert_eq!(outstanding.len(), 1, "{outstanding:?}");
    assert_eq!(
        outstanding[0].resource,
        Resource::from(DockerResource::Container { name: name.clone() })
    );
    imgbuild_builders::docker::clean_orphan(&outstanding[0].resource, harness.run_id())
        .await
        .unwrap();
    assert!(
        containers_of_run(&docker, harness.run_id())
            .await
            .is_empty()
    );
}

/// A bound on a whole build that only catches a hang: far above what a
/// build here takes on a loaded machine, far below the remote sleep a
/// cancelled build must not wait out.
const HANG: Duration = Duration::from_secs(300);

/// Waits (bounded by HANG) until a process whose whole command line is
/// `argv` runs in a container of `run_id`. The build's own main process
/// (`sleep 3600 & wait`) and the shell running the provisioner's script do
/// not match: only the command itself, once started.
async fn wait_for_process(docker: &bollard::Docker, run_id: &str, argv: &str) -> bool {
    let probe = format!(
        "for f in /proc/[0-9]*/cmdline; do [ \"$(tr '\\0' ' ' < \"$f\" 2>/dev/null)\" = '{argv} ' ] && exit 0; done; exit 1"
    );
    let deadline = Instant::now() + HANG;
    while Instant::now() < deadline {
        for name in containers_of_run(docker, run_id).await {
            let name = name.trim_start_matches('/');
            // A container listed before it starts refuses the exec: not yet.
            let probed = try_docker_exec(docker, name, &["sh", "-c", &probe]).await;
            if matches!(probed, Ok((0, _))) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn cancelling_during_provisioning_stops_promptly_and_removes_the_container() {
    let base = base_image();
    let docker = docker();
    let repository = unique_repository();
    let _cleanup = ImageCleanup::repository(&repository);
    let harness = Harness::new("app");
    let builder =
        builder(serde_json::json!({"image": base, "pull": false, "repository": repository}));
    // The sleep is far longer than HANG: a build that waits for it instead
    // of stopping is caught by the bound, whatever the machine's load.
    let request = harness.request(
        image_info("cancelled", "4.0.0"),
        vec![shell(&[
            "echo going-to-sleep",
            "sleep 3000",
            "echo woke-up",
        ])],
    );

    let build = tokio::time::timeout(HANG, builder.build(&request, &harness.cx));
    tokio::pin!(build);
    // Cancelled only once the remote sleep runs; a build that ends before
    // that (a failed pull or create) ends the wait with it.
    let sleeping = tokio::select! {
        result = &mut build => panic!("the build ended before its provisioner slept: {result:?}"),
        sleeping = wait_for_process(&docker, harness.run_id(), "sleep 3000") => sleeping,
    };
    assert!(sleeping, "the provisioner's `sleep 3000` never started");
    let cancelled_at = Instant::now();
    harness.cx.cancel.cancel();
    let result = build.await.unwrap_or_else(|_| {
        panic!("the build still ran {HANG:?} after it started: the cancel did not cut the remote `sleep 3000` short")
    });
    eprintln!(
        "returned {:.1}s after the cancel",
        cancelled_at.elapsed().as_secs_f64()
    );
    assert!(matches!(result, Err(BuildError::Cancelled)), "{result:?}");
    let lines = harness.output_lines();
    assert!(lines.contains(&"going-to-sleep".to_owned()), "{lines:?}");
    assert!(!lines.contains(&"woke-up".to_owned()), "{lines:?}");
    assert!(
        containers_of_run(&docker, harness.run_id())
            .await
            .is_empty()
    );
    harness.assert_journal_empty();
    assert_eq!(
        repository_tags(&docker, &repository).await,
        Vec::<String>::new(),
        "the cancelled build left a tag"
    );
}

#[tokio::test]
async fn directory_trees_travel_both_ways_with_their_modes() {
    let base = base_image();
    let harness = Harness::new("files");
    let dir = harness.config_dir.path();
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    std::fs::create_dir_all(tree.join("secret")).unwrap();
    std::fs::create_dir_all(tree.join("empty")).unwrap();
    std::fs::write(tree.join("bin/run.sh"), "#!/bin/sh\necho run\n").unwrap();
    std::fs::write(tree.join("secret/key"), "s3cret\n").unwrap();
    std::fs::write(tree.join("plain.txt"), "plain\n").unwrap();
    let chmod = |path: &str, mode: u32| {
        std::fs::set_permissions(tree.join(path), std::fs::Permissions::from_mode(mode)).unwrap();
    };
    chmod("bin/run.sh", 0o755);
    chmod("secret/key", 0o600);
    chmod("secret", 0o700);
    chmod("plain.txt", 0o644);
    std::os::unix::fs::symlink("bin/run.sh", tree.join("link")).unwrap();

    let builder = builder(serde_json::json!({"image": base, "pull": false, "discard": true}));
    let provisioners = vec![
        // Neither /opt/imgbuild nor anything below it exists yet.
        upload("tree", "/opt/imgbuild/deep/", dir),
        upload_content("relative\n", "rel/notes.txt", dir),
        shell(&[
            "cd /opt/imgbuild/deep/tree",
            "stat -c 'mode %a %U %n' bin/run.sh secret secret/key plain.txt",
            "readlink link",
            "bin/run.sh",
            "cat /rel/notes.txt",
            "echo made-in-container > made.txt",
        ]),
        download("/opt/imgbuild/deep/tree", "downloaded/", dir),
    ];
    let request = harness.request(image_info("files", "1.0.0"), provisioners);
    builder.preflight(&request, &harness.cx).await.unwrap();
    let artifact = builder.build(&request, &harness.cx).await.unwrap();
    assert_eq!(artifact.id, "discarded");

    let lines = harness.output_lines();
    for expected in [
        "mode 755 root bin/run.sh",
        "mode 700 root secret",
        "mode 600 root secret/key",
        "mode 644 root plain.txt",
        "bin/run.sh",
        "run",
        "relative",
    ] {
        assert!(
            lines.contains(&expected.to_owned()),
            "missing {expected:?} in {lines:?}"
        );
    }

    let back = dir.join("downloaded/tree");
    let mode = |path: &str| {
        std::fs::symlink_metadata(back.join(path))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("bin/run.sh"), 0o755);
    assert_eq!(mode("secret"), 0o700);
    assert_eq!(mode("secret/key"), 0o600);
    assert_eq!(
        std::fs::read_to_string(back.join("secret/key")).unwrap(),
        "s3cret\n"
    );
    assert_eq!(
        std::fs::read_to_string(back.join("made.txt")).unwrap(),
        "made-in-container\n"
    );
    assert_eq!(
        std::fs::read_link(back.join("link")).unwrap(),
        Path::new("bin/run.sh")
    );
    assert!(back.join("empty").is_dir());
    assert!(
        containers_of_run(&docker(), harness.run_id())
            .await
            .is_empty()
    );
    harness.assert_journal_empty();
}

/// Collects what a command printed, by stream.
#[derive(Default)]
struct Lines(std::sync::Mutex<Vec<(Stream, String)>>);

impl OutputSink for Lines {
    fn line(&self, stream: Stream, line: &str) {
        self.0.lock().unwrap().push((stream, line.to_owned()));
    }
}

impl Lines {
    fn of(&self, stream: Stream) -> Vec<String> {
        let lines = self.0.lock().unwrap();
        lines
            .iter()
            .filter(|(s, _)| *s == stream)
            .map(|(_, l)| l.clone())
            .collect()
    }
}

async fn read_all(mut stream: imgbuild_provisioners::communicator::ByteStream) -> Vec<u8> {
    let mut bytes = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut bytes)
        .await
        .unwrap();
    bytes
}

#[tokio::test]
async fn the_exec_communicator_behaves_like_the_ssh_one() {
    let base = base_image();
    let docker = docker();
    let name = start_sleeper(&docker, &base, Default::default()).await;
    let _cleanup = ContainerCleanup(vec![name.clone()]);
    let comm = DockerCommunicator::connect(&name, vec!["FROM_ENV=yes".to_owned()])
        .await
        .unwrap();
    assert_eq!(comm.target(), format!("container {name}"));

    // A failing command is an exit status, with its output streamed by line.
    let lines = Lines::default();
    let status = comm
        .exec(
            "echo out; echo err >&2; echo \"$FROM_ENV\"; printf 'no newline'; exit 5",
            &lines,
        )
        .await
        .unwrap();
    assert_eq!(status, ExitStatus::Code(5));
    assert_eq!(lines.of(Stream::Stdout), vec!["out", "yes", "no newline"]);
    assert_eq!(lines.of(Stream::Stderr), vec!["err"]);
    let lines = Lines::default();
    assert_eq!(
        comm.exec("no-such-command", &lines).await.unwrap(),
        ExitStatus::Code(127)
    );
    assert!(
        lines
            .of(Stream::Stderr)
            .iter()
            .any(|l| l.contains("not found")),
        "{:?}",
        lines.0
    );

    // Uploads create missing directories; relative paths start in the
    // working directory.
    let archive =
        imgbuild_provisioners::transfer::single_file_archive("hello.txt", b"hello\n", 0o640)
            .unwrap();
    comm.upload_tar("/new/nested/dir", archive).await.unwrap();
    let archive =
        imgbuild_provisioners::transfer::single_file_archive("rel.txt", b"rel\n", 0o644).unwrap();
    comm.upload_tar("relative", archive).await.unwrap();
    let lines = Lines::default();
    let status = comm
        .exec(
            "stat -c '%a %U' /new/nested/dir/hello.txt; cat /relative/rel.txt",
            &lines,
        )
        .await
        .unwrap();
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(lines.of(Stream::Stdout), vec!["640 root", "rel"]);

    // Downloads are named relative to the parent, like `tar -C parent name`.
    let bytes = read_all(
        comm.download_tar("/new/nested/dir/hello.txt")
            .await
            .unwrap(),
    )
    .await;
    let mut archive = tar::Archive::new(std::io::Cursor::new(bytes));
    let mut entries = archive.entries().unwrap();
    let mut entry = entries.next().unwrap().unwrap();
    assert_eq!(entry.path().unwrap(), Path::new("hello.txt"));
    assert_eq!(entry.header().mode().unwrap() & 0o777, 0o640);
    let mut text = String::new();
    std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
    assert_eq!(text, "hello\n");

    let err = comm
        .download_tar("/nothing/here")
        .await
        .err()
        .expect("a missing path fails");
    assert!(
        err.to_string().contains("/nothing/here does not exist"),
        "{err}"
    );
    let archive = imgbuild_provisioners::transfer::single_file_archive("x", b"x", 0o644).unwrap();
    let err = comm.upload_tar("/etc/hostname", archive).await.unwrap_err();
    assert!(
        err.to_string().contains("exists and is not a directory"),
        "{err}"
    );

    // A stopped container is a lost connection, and cannot come back.
    comm.reconnect().await.unwrap();
    docker
        .kill_container(
            &name,
            None::<bollard::query_parameters::KillContainerOptions>,
        )
        .await
        .unwrap();
    let err = comm.exec("true", &Lines::default()).await.unwrap_err();
    assert!(matches!(err, CommError::Disconnected { .. }), "{err:?}");
    let err = comm.reconnect().await.unwrap_err();
    assert!(err.to_string().contains("not running"), "{err}");
}

#[tokio::test]
async fn downloading_a_missing_path_fails_with_a_clear_message() {
    let base = base_image();
    let harness = Harness::new("files");
    let builder = builder(serde_json::json!({"image": base, "pull": false, "discard": true}));
    let request = harness.request(
        image_info("files", "1.0.0"),
        vec![download("/no/such/path", "out/", harness.config_dir.path())],
    );
    let err = builder.build(&request, &harness.cx).await.unwrap_err();
    match err {
        BuildError::Failed { step, message } => {
            assert_eq!(step, "provision");
            assert!(
                message.contains("/no/such/path does not exist"),
                "{message}"
            );
        }
        other => panic!("expected a failed download, got {other:?}"),
    }
    assert!(
        containers_of_run(&docker(), harness.run_id())
            .await
            .is_empty()
    );
    harness.assert_journal_empty();
}

#[tokio::test]
async fn a_downloaded_tree_cannot_reach_outside_its_destination_on_the_host() {
    use std::os::unix::fs::MetadataExt;
    let base = base_image();
    let harness = Harness::new("files");
    let dir = harness.config_dir.path();
    // Stands for ~/.ssh on the host running the build.
    let host = tempfile::tempdir().unwrap();
    let canary = host.path().join("canary");
    std::fs::create_dir(&canary).unwrap();
    std::fs::write(canary.join("authorized_keys"), "the-owner\n").unwrap();
    let canary_state = || {
        let keys = std::fs::symlink_metadata(canary.join("authorized_keys")).unwrap();
        let names: Vec<_> = std::fs::read_dir(&canary)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        (
            names,
            keys.nlink(),
            std::fs::read_to_string(canary.join("authorized_keys")).unwrap(),
        )
    };
    let before = canary_state();

    let builder = builder(serde_json::json!({"image": base, "pull": false, "discard": true}));
    let tree = "/srv/hostile/tree";
    let plant_symlink = format!("ln -s '{}' {tree}/loot", canary.display());
    let provisioners = vec![
        shell(&[
            &format!("mkdir -p {tree} && cd {tree}"),
            &plant_symlink,
            "echo shared > one && ln one two",
            "printf '#!/bin/sh\\n' > run && chmod 4755 run",
        ]),
        download(tree, "got/", dir),
        // The next download tries to write through the symlink it left.
        shell(&[&format!(
            "cd {tree} && rm loot && mkdir loot && echo the-attacker > loot/authorized_keys"
        )]),
        download(tree, "got/", dir),
        shell(&[&format!("mknod {tree}/null c 1 3")]),
        download(tree, "got/", dir),
    ];
    let request = harness.request(image_info("files", "1.0.0"), provisioners);
    let err = builder.build(&request, &harness.cx).await.unwrap_err();

    assert_eq!(canary_state(), before, "the host canary changed");
    match err {
        BuildError::Failed { step, message } => {
            assert_eq!(step, "provision");
            // The device refuses the whole archive, not just itself.
            assert!(
                message.contains("refusing archive entry `tree/null`")
                    && message.contains("character device"),
                "{message}"
            );
        }
        other => panic!("expected the device to be refused, got {other:?}"),
    }
    let got = dir.join("got/tree");
    assert!(!got.join("null").exists(), "the device was unpacked");
    let meta = |name: &str| std::fs::symlink_metadata(got.join(name)).unwrap();
    assert_eq!(meta("run").mode() & 0o7777, 0o755, "setuid survived");
    assert_eq!(meta("one").ino(), meta("two").ino());
    assert_eq!(meta("one").nlink(), 2, "linked to nothing else");
    assert!(meta("loot").is_dir(), "the symlink was not replaced");
    assert_eq!(
        std::fs::read_to_string(got.join("loot/authorized_keys")).unwrap(),
        "the-attacker\n"
    );
    assert!(
        containers_of_run(&docker(), harness.run_id())
            .await
            .is_empty()
    );
    harness.assert_journal_empty();
}

#[tokio::test]
async fn export_path_writes_the_filesystem_as_a_checksummed_tar() {
    let base = base_image();
    let harness = Harness::new("rootfs");
    let builder = builder(
        serde_json::json!({"image": base, "pull": false, "export_path": "out/rootfs-1.0.tar"}),
    );
    let request = harness.request(
        image_info("rootfs", "1.0"),
        vec![shell(&["echo exported > /etc/imgbuild-exported"])],
    );
    let planned = builder.planned_artifact(&request.image, harness.config_dir.path());
    let out_dir = harness.config_dir.path().join("out");
    assert_eq!(
        planned.files,
        vec![
            out_dir.join("rootfs-1.0.tar.sha256"),
            out_dir.join("rootfs-1.0.tar")
        ]
    );

    builder.preflight(&request, &harness.cx).await.unwrap();
    let artifact = builder.build(&request, &harness.cx).await.unwrap();
    let path = std::fs::canonicalize(out_dir.join("rootfs-1.0.tar")).unwrap();
    assert_eq!(artifact.id, path.display().to_string());
    assert_eq!(artifact.files.len(), 1);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(artifact.files[0].size, bytes.len() as u64);
    assert_eq!(
        artifact.files[0].sha256,
        hex::encode(Sha256::digest(&bytes))
    );
    let checksum = std::fs::read_to_string(out_dir.join("rootfs-1.0.tar.sha256")).unwrap();
    assert_eq!(
        checksum,
        format!("{}  rootfs-1.0.tar\n", artifact.files[0].sha256)
    );

    let mut found = None;
    let mut archive = tar::Archive::new(std::io::Cursor::new(&bytes));
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        if name == "etc/imgbuild-exported" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
            found = Some(text);
        }
    }
    assert_eq!(found.as_deref(), Some("exported\n"));
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["rootfs-1.0.tar", "rootfs-1.0.tar.sha256"],
        "no partial file left"
    );
    assert!(
        containers_of_run(&docker(), harness.run_id())
            .await
            .is_empty()
    );
    harness.assert_journal_empty();

    // The file is never overwritten.
    let again = Harness::new("rootfs");
    let request = harness.request(image_info("rootfs", "1.0"), Vec::new());
    let err = builder.preflight(&request, &again.cx).await.unwrap_err();
    assert!(
        matches!(&err, BuildError::Refused(m) if m.contains("already exists")),
        "{err:?}"
    );
}

#[tokio::test]
async fn clean_orphan_removes_what_a_dead_run_left_behind() {
    let base = base_image();
    let docker = docker();
    let repository = unique_repository();
    let _cleanup = ImageCleanup::repository(&repository);
    let state = tempfile::tempdir().unwrap();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let container = format!("imgbuild-{run_id}-orphaned");
    let image = format!("{repository}:imgbuild-{run_id}-orphaned");
    {
        // What a run killed mid-build leaves: journal entries for a running
        // container and an image, and no process holding the journal's lock.
        let journal = Journal::create(state.path(), &run_id, Path::new("image.toml")).unwrap();
        journal
            .record(
                "orphaned",
                Resource::from(DockerResource::Container {
                    name: container.clone(),
                }),
            )
            .unwrap();
        let body = bollard::models::ContainerCreateBody {
            image: Some(base.clone()),
            entrypoint: Some(vec!["sleep".into(), "300".into()]),
            labels: Some([(RUN_ID_LABEL.to_owned(), run_id.clone())].into()),
            ..Default::default()
        };
        let options = bollard::query_parameters::CreateContainerOptions {
            name: Some(container.clone()),
            ..Default::default()
        };
        docker.create_container(Some(options), body).await.unwrap();
        docker.start_container(&container, None).await.unwrap();
        journal
            .record(
                "orphaned",
                Resource::from(DockerResource::Image {
                    reference: image.clone(),
                }),
            )
            .unwrap();
        let (name, tag) = image.rsplit_once(':').unwrap();
        let options = bollard::query_parameters::TagImageOptions {
            repo: Some(name.to_owned()),
            tag: Some(tag.to_owned()),
        };
        docker.tag_image(&base, Some(options)).await.unwrap();
    }

    let mut runs = journal::dead_runs(state.path()).unwrap();
    assert_eq!(runs.len(), 1);
    let mut run = runs.pop().unwrap();
    let outstanding = run.outstanding();
    assert_eq!(outstanding.len(), 2);
    for item in outstanding {
        imgbuild_builders::common::orphans::clean_orphan(&item.resource, &run_id)
            .await
            .unwrap_or_else(|err| panic!("cannot clean {}: {err}", item.resource.describe()));
        run.release(item.id).unwrap();
    }
    assert!(
        run.finish().unwrap(),
        "the journal is gone once everything is removed"
    );

    assert!(containers_of_run(&docker, &run_id).await.is_empty());
    assert!(!image_exists(&docker, &image).await);
    assert!(
        image_exists(&docker, &base).await,
        "the base image only lost a tag"
    );
    // Already gone counts as removed.
    imgbuild_builders::docker::clean_orphan(
        &Resource::from(DockerResource::Container { name: container }),
        &run_id,
    )
    .await
    .unwrap();
    imgbuild_builders::docker::clean_orphan(
        &Resource::from(DockerResource::Image { reference: image }),
        &run_id,
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn missing_base_images_are_reported_clearly() {
    base_image();
    let harness = Harness::new("app");
    let missing = format!("{}:1", unique_repository());
    let builder_without_pull = builder(serde_json::json!({"image": missing, "pull": false}));
    let request = harness.request(image_info("app", "1.0.0"), Vec::new());
    let err = builder_without_pull
        .preflight(&request, &harness.cx)
        .await
        .unwrap_err();
    let BuildError::Refused(message) = err else {
        panic!("expected a refusal, got {err:?}");
    };
    assert!(message.contains("is not in the Docker engine"), "{message}");
    assert!(
        message.contains(&format!("docker pull {missing}")),
        "{message}"
    );

    // Nothing listens on port 1: the pull fails at once.
    let unreachable = "localhost:1/imgbuild/missing:1";
    let builder_with_pull = builder(serde_json::json!({"image": unreachable, "discard": true}));
    let err = builder_with_pull
        .build(&request, &harness.cx)
        .await
        .unwrap_err();
    match err {
        BuildError::Failed { step, message } => {
            assert_eq!(step, "pull");
            assert!(
                message.contains(&format!("cannot pull {unreachable}")),
                "{message}"
            );
            assert!(message.contains("pull = false"), "{message}");
        }
        other => panic!("expected the pull to fail, got {other:?}"),
    }
    harness.assert_journal_empty();
}

#[test]
fn config_problems_name_the_field_and_entry() {
    let dir = tempfile::tempdir().unwrap();
    let builder = builder(serde_json::json!({
        "image": "debian:bookworm",
        "changes": ["ENV OK=1", "RUN apt-get update", "CMD ['x']"],
        "export_path": "out/rootfs.tar",
        "discard": true,
    }));
    let problems = builder.validate(dir.path());
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        vec!["changes[1]", "changes[2]", "discard", "changes"],
        "{problems:?}"
    );
    assert!(
        problems[0].message.contains("`RUN apt-get update`"),
        "{}",
        problems[0].message
    );
    assert!(
        problems[0].message.contains("provisioner"),
        "{}",
        problems[0].message
    );
    assert!(
        problems[1].message.contains("JSON"),
        "{}",
        problems[1].message
    );
    let err = serde_json::from_value::<imgbuild_builders::docker::DockerConfig>(
        serde_json::json!({"image": "x", "pul": false}),
    )
    .unwrap_err();
    assert!(err.to_string().contains("unknown field `pul`"), "{err}");
}

/// Creates (without starting: the state a create cut short by a kill ends
/// in) a container named `name` with the given run-id label.
async fn create_named(docker: &bollard::Docker, base: &str, name: &str, run_label: Option<&str>) {
    let labels = run_label
        .map(|run_id| [(RUN_ID_LABEL.to_owned(), run_id.to_owned())].into())
        .unwrap_or_default();
    let body = bollard::models::ContainerCreateBody {
        image: Some(base.to_owned()),
        entrypoint: Some(vec!["sleep".into(), "300".into()]),
        labels: Some(labels),
        ..Default::default()
    };
    let options = bollard::query_parameters::CreateContainerOptions {
        name: Some(name.to_owned()),
        ..Default::default()
    };
    docker.create_container(Some(options), body).await.unwrap();
}

async fn container_exists(docker: &bollard::Docker, name: &str) -> bool {
    match docker
        .inspect_container(
            name,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
    {
        Ok(_) => true,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => false,
        Err(err) => panic!("cannot inspect {name}: {err}"),
    }
}

/// A run killed while the engine was creating its container: the first
/// clean finds nothing yet and must keep the record; the engine then
/// finishes (here: the container is created only after that clean), and the
/// second clean removes it. A record whose create never completes is let go
/// once no create could still be running.
#[tokio::test]
async fn a_container_the_engine_creates_after_a_first_clean_is_removed_by_the_second() {
    use imgbuild_builders::common::orphans::{Cleaned, clean_outstanding, creation_grace};
    let base = base_image();
    let docker = docker();
    let state = tempfile::tempdir().unwrap();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let name = format!("imgbuild-{run_id}-late");
    let _cleanup = ContainerCleanup(vec![name.clone()]);
    let never = Resource::from(DockerResource::Container {
        name: format!("imgbuild-{run_id}-never"),
    });
    {
        let journal = Journal::create(state.path(), &run_id, Path::new("image.toml")).unwrap();
        journal
            .record(
                "late",
                Resource::from(DockerResource::Container { name: name.clone() }),
            )
            .unwrap();
        journal.record("never", never.clone()).unwrap();
    }
    let now = std::time::SystemTime::now();
    let mut runs = journal::dead_runs(state.path()).unwrap();
    let run = runs.pop().unwrap();
    for item in run.outstanding() {
        let cleaned = clean_outstanding(&item, &run_id, now).await.unwrap();
        assert!(
            matches!(&cleaned, Cleaned::Kept(reason) if reason.contains("may still be being created")),
            "{}: {cleaned:?}",
            item.resource.describe()
        );
    }
    assert!(!run.finish().unwrap(), "the journal stays");

    create_named(&docker, &base, &name, Some(&run_id)).await;

    let mut runs = journal::dead_runs(state.path()).unwrap();
    let mut run = runs.pop().unwrap();
    let outstanding = run.outstanding();
    assert_eq!(outstanding.len(), 2);
    let late = outstanding.iter().find(|o| o.build == "late").unwrap();
    let cleaned = clean_outstanding(late, &run_id, std::time::SystemTime::now())
        .await
        .unwrap();
    assert_eq!(cleaned, Cleaned::Removed);
    assert!(!container_exists(&docker, &name).await);
    run.release(late.id).unwrap();

    // Nothing ever appears for the other one: once the grace is over, it is
    // proven absent.
    let never_item = outstanding.iter().find(|o| o.build == "never").unwrap();
    let later = now + creation_grace(&never) + Duration::from_secs(1);
    let cleaned = clean_outstanding(never_item, &run_id, later).await.unwrap();
    assert_eq!(cleaned, Cleaned::Removed);
    run.release(never_item.id).unwrap();
    assert!(run.finish().unwrap());
}

/// A container under a run's deterministic name is only that run's if it
/// also carries the run's id: one of another run, or without the label, is
/// left alone and reported; the run's own one goes, even only `Created`.
#[tokio::test]
async fn clean_orphan_removes_only_a_container_that_carries_the_runs_id() {
    let base = base_image();
    let docker = docker();
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..16].to_owned();
    let other_run = format!("imgbuild-{run_id}-other");
    let unlabelled = format!("imgbuild-{run_id}-unlabelled");
    let own = format!("imgbuild-{run_id}-own");
    let _cleanup = ContainerCleanup(vec![other_run.clone(), unlabelled.clone(), own.clone()]);
    create_named(&docker, &base, &other_run, Some("0000000000000000")).await;
    create_named(&docker, &base, &unlabelled, None).await;
    create_named(&docker, &base, &own, Some(&run_id)).await;

    for name in [&other_run, &unlabelled] {
        let found = imgbuild_builders::docker::clean_orphan(
            &Resource::from(DockerResource::Container { name: name.clone() }),
            &run_id,
        )
        .await
        .unwrap();
        assert!(
            matches!(&found, imgbuild_builders::docker::Removal::NotOurs(reason) if reason.contains(name.as_str()) && reason.contains("left alone")),
            "{name}: {found:?}"
        );
        assert!(container_exists(&docker, name).await, "{name} was removed");
    }
    let found = imgbuild_builders::docker::clean_orphan(
        &Resource::from(DockerResource::Container { name: own.clone() }),
        &run_id,
    )
    .await
    .unwrap();
    assert_eq!(found, imgbuild_builders::docker::Removal::Removed);
    assert!(!container_exists(&docker, &own).await);
}
