//! Checks of SBOM documents by independent implementations: the SPDX and
//! CycloneDX reference libraries (tests/validate_sbom.py, in the virtualenv
//! tests/setup.sh makes), and dpkg's own reading of a package database.

use crate::common::repo_root;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The SBOM virtualenv's Python: `IMGBUILD_SBOM_VENV`, else the default
/// tests/setup.sh installs into.
fn python() -> PathBuf {
    let venv = std::env::var_os("IMGBUILD_SBOM_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/imgbuild/sbom-venv")
        });
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `bash tests/setup.sh` (it installs spdx-tools and cyclonedx-python-lib)",
        python.display()
    );
    python
}

/// The packages both documents list, as sorted `name version` lines, once
/// spdx-tools and cyclonedx-python-lib have parsed and validated them
/// (panics with their findings otherwise). The two lists must agree.
pub fn validated_packages(spdx: &Path, cyclonedx: &Path) -> Vec<String> {
    let output = Command::new(python())
        .arg(repo_root().join("tests/validate_sbom.py"))
        .arg("--spdx")
        .arg(spdx)
        .arg("--cyclonedx")
        .arg(cyclonedx)
        .output()
        .expect("run tests/validate_sbom.py");
    assert!(
        output.status.success(),
        "the reference libraries reject the SBOM ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let list = |format: &str| -> Vec<String> {
        result[format]
            .as_array()
            .unwrap_or_else(|| panic!("no {format} list in {result}"))
            .iter()
            .map(|line| line.as_str().unwrap().to_owned())
            .collect()
    };
    let spdx = list("spdx");
    assert_eq!(spdx, list("cyclonedx"), "the two documents disagree");
    spdx
}

/// The `dpkg-query` format whose output [`present_packages`] reads.
pub const DPKG_QUERY_FORMAT: &str = "${db:Status-Status} ${Package} ${Version}\\n";

/// Sorted `name version` lines of the packages whose files are present
/// (every state but not-installed and config-files), from the output of
/// `dpkg-query -W -f=DPKG_QUERY_FORMAT`.
pub fn present_packages(dpkg_query_output: &str) -> Vec<String> {
    let mut packages: Vec<String> = dpkg_query_output
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(state, _)| !matches!(*state, "not-installed" | "config-files"))
        .map(|(_, package)| package.to_owned())
        .collect();
    packages.sort();
    packages
}
