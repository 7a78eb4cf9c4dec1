//! The SBOM of a real Docker build: the fixture's Debian rootfs, with a
//! package the provisioner installs, read through the Engine's exec API;
//! the documents checked by the SPDX and CycloneDX reference libraries and
//! against `dpkg-query` run in a fresh container of the committed image.

use imgbuild_builders::SbomFormats;
use imgbuild_test_support::sbom::{DPKG_QUERY_FORMAT, present_packages, validated_packages};
use imgbuild_test_support::{docker::*, harness::*};
use std::process::Command;
use std::time::Instant;

/// Builds a package in the container and installs it: the SBOM must show
/// the machine after provisioning, epoch and `+` included.
const INSTALL_PROBE: &[&str] = &[
    "mkdir -p /tmp/probe/DEBIAN",
    "printf 'Package: imgbuild-probe\\nVersion: 1:2.0+b1\\nArchitecture: all\\nMaintainer: imgbuild tests <tests@example.invalid>\\nDescription: probe\\n' > /tmp/probe/DEBIAN/control",
    "dpkg-deb --build /tmp/probe /tmp/probe.deb >/dev/null",
    "dpkg -i /tmp/probe.deb >/dev/null",
    "rm -rf /tmp/probe /tmp/probe.deb",
];

#[tokio::test]
async fn a_docker_build_writes_valid_documents_listing_what_dpkg_query_lists() {
    let base = base_image();
    let repository = unique_repository();
    let mut cleanup = ImageCleanup::repository(&repository);
    let harness = Harness::new("app");
    let builder = builder(serde_json::json!({
        "image": base,
        "pull": false,
        "repository": repository,
    }));
    let mut request = harness.request(image_info("app", "1.0.0"), vec![shell(INSTALL_PROBE)]);
    request.sbom = SbomFormats::Both;

    let started = Instant::now();
    builder.preflight(&request, &harness.cx).await.unwrap();
    let artifact = builder
        .build(&request, &harness.cx)
        .await
        .unwrap_or_else(|err| panic!("{err}\n{}", harness.transcript()));
    cleanup.add(artifact.id.clone());
    eprintln!(
        "build took {:.1}s ({})",
        started.elapsed().as_secs_f64(),
        harness.step_timings()
    );
    harness.assert_journal_empty();

    // An image tag is no file: the documents go to the config's output/,
    // named by image, version and build.
    let output = harness.config_dir.path().join("output");
    let spdx = output
        .join("app-1.0.0.app.spdx.json")
        .canonicalize()
        .unwrap();
    let cdx = output
        .join("app-1.0.0.app.cdx.json")
        .canonicalize()
        .unwrap();
    let sbom = &artifact.details["sbom"];
    assert_eq!(sbom["spdx"], spdx.display().to_string(), "{sbom}");
    assert_eq!(sbom["cyclonedx"], cdx.display().to_string(), "{sbom}");
    assert_eq!(sbom["database"], "dpkg");
    assert_eq!(sbom["distro"]["id"], "debian");
    for path in [&spdx, &cdx] {
        let listed = artifact
            .files
            .iter()
            .find(|file| &file.path == path)
            .unwrap_or_else(|| panic!("{} is not in the artifact's files", path.display()));
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(listed.size, bytes.len() as u64);
        assert_eq!(listed.sha256, sha256_hex(&bytes));
    }

    let packages = validated_packages(&spdx, &cdx);
    assert_eq!(sbom["packages"], packages.len());
    assert!(
        packages.contains(&"imgbuild-probe 1:2.0+b1".to_owned()),
        "{packages:?}"
    );

    // dpkg's own reading, in a fresh container of the committed image.
    let listed = Command::new("docker")
        .args(["run", "--rm", "--entrypoint", "dpkg-query"])
        .arg(&artifact.id)
        .args(["-W", &format!("-f={DPKG_QUERY_FORMAT}")])
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert_eq!(
        packages,
        present_packages(&String::from_utf8_lossy(&listed.stdout))
    );

    let cyclonedx: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cdx).unwrap()).unwrap();
    let probe = cyclonedx["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "imgbuild-probe")
        .unwrap();
    assert!(
        probe["purl"]
            .as_str()
            .unwrap()
            .starts_with("pkg:deb/debian/imgbuild-probe@1:2.0%2Bb1?arch=all&distro=debian-"),
        "{probe}"
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}
