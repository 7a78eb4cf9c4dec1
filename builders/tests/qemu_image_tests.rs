//! `[[test]]` on a QEMU artifact, on real QEMU: the tests run on a fresh
//! boot of the produced image (not the build machine, not an earlier test
//! boot), the artifact is never written, every test runs and reports, and
//! nothing is left afterwards, also when the run is cancelled mid-test.
//!
//! One build and two test boots under TCG: each boot costs about half a
//! minute, so the proofs share them.

use imgbuild_builders::qemu::{QemuBuilder, QemuConfig};
use imgbuild_builders::{BuildError, Builder};
use imgbuild_provisioners::image_test::ImageTest;
use imgbuild_test_support::cli::sha256_of;
use imgbuild_test_support::{common::*, harness::*};
use std::path::Path;
use std::time::Duration;

/// What a test boot leaves on its own disk. A later boot of the artifact
/// must never see it: it would mean the boot wrote the artifact, or reused
/// an earlier boot's disk.
const TRACE: &str = "/var/tmp/imgbuild-test-boot";

fn test(name: &str, commands: &[&str]) -> ImageTest {
    ImageTest {
        name: name.to_owned(),
        shell: shell(commands),
        retries: 0,
        retry_delay: Duration::ZERO,
    }
}

/// Names in `dir`, sorted.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn assert_no_vm(dir: &Path) {
    let left = qemu_processes_mentioning(dir);
    assert!(left.is_empty(), "QEMU processes are left: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tests_run_on_a_fresh_boot_of_the_artifact_which_stays_unchanged() {
    let harness = Harness::new("vm");
    let config_dir = harness.config_dir.path().to_path_buf();
    // The cloud-init fixture, logged into with a key made for the build
    // alone: the build's cloud-init cleanup takes the build user away, so
    // the test boot gets in only through a seed of its own. Uncompressed,
    // so that the artifact itself is what the test boot reads (a zstd one
    // is unpacked to a copy first) and a write to it would show.
    let config: QemuConfig = serde_json::from_value(serde_json::json!({
        "base_image": cloud_vm_image(),
        "accelerator": "tcg",
        "memory": 768,
        "cpus": 1,
        "ssh": {"username": "tester"},
    }))
    .unwrap();
    let builder = QemuBuilder::new(config);
    let request = harness.request(
        image_info("proof", &unique_version()),
        vec![shell(&[
            "echo built-into-the-image | sudo tee /etc/imgbuild-proof",
        ])],
    );
    let artifact = builder
        .build(&request, &harness.cx)
        .await
        .unwrap_or_else(|err| panic!("{err}\n{}", harness.transcript()));
    let image = artifact.files[0].path.clone();
    let output = image.parent().unwrap().to_path_buf();
    let digest = sha256_of(&image);
    let stored = files_in(&output);

    let tests = [
        test(
            "reads what a provisioner wrote",
            &["grep -qx built-into-the-image /etc/imgbuild-proof"],
        ),
        test(
            "fails on purpose",
            &["echo looking for /etc/not-there", "exit 3"],
        ),
        test(
            "starts from the artifact alone",
            &[&format!("test ! -e {TRACE}")],
        ),
        test("leaves a trace", &[&format!("touch {TRACE}")]),
    ];
    let results = builder
        .test_artifact(&request, &artifact, &tests, &harness.cx)
        .await
        .unwrap_or_else(|err| panic!("{err}\n{}", harness.transcript()));
    eprintln!("build and first test run: {}", harness.step_timings());
    let summary: Vec<(&str, bool)> = results
        .iter()
        .map(|r| (r.name.as_str(), r.passed))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("reads what a provisioner wrote", true),
            ("fails on purpose", false),
            ("starts from the artifact alone", true),
            ("leaves a trace", true),
        ],
        "{results:#?}\n{}",
        harness.transcript()
    );
    let failed = &results[1];
    assert_eq!(failed.exit_code, Some(3), "{failed:?}");
    assert_eq!(failed.attempts, 1);
    assert!(
        failed
            .output_tail
            .iter()
            .any(|line| line.contains("looking for /etc/not-there")),
        "{failed:?}"
    );
    assert_eq!(
        sha256_of(&image),
        digest,
        "the test boot wrote the artifact"
    );
    assert_eq!(files_in(&output), stored, "the test run left files");
    assert_no_vm(&config_dir);
    harness.assert_journal_empty();

    // Again, as `imgbuild test` would in a later run: the first test boot's
    // trace must be gone. Only then does the test print the line that
    // cancels the run, so a stale overlay shows as a failed test, not as
    // the cancellation this expects.
    let retest = Harness::with_cancel_on("vm", Some("imgbuild-cancel-now"));
    let request = retest.request(image_info("proof", &request.image.version), Vec::new());
    let cancelled = builder
        .test_artifact(
            &request,
            &artifact,
            &[test(
                "a fresh boot, cancelled",
                &[
                    &format!("if [ -e {TRACE} ]; then echo stale; exit 1; fi"),
                    "echo imgbuild-cancel-now",
                    "sleep 600",
                ],
            )],
            &retest.cx,
        )
        .await;
    assert!(
        matches!(cancelled, Err(BuildError::Cancelled)),
        "{cancelled:?}\n{}",
        retest.transcript()
    );
    assert_eq!(
        sha256_of(&image),
        digest,
        "the test boot wrote the artifact"
    );
    assert_eq!(files_in(&output), stored, "the cancelled run left files");
    assert_no_vm(&config_dir);
    retest.assert_journal_empty();

    builder
        .delete_artifact(&artifact, &harness.cx)
        .await
        .unwrap();
    assert_eq!(files_in(&output), Vec::<String>::new());
}
