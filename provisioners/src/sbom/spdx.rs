//! SPDX 2.3 JSON.
//!
//! Written from serde structs of our own: the Rust SPDX crate (`spdx-rs`)
//! models SPDX 2.2 and is made for reading documents, and the subset an
//! image SBOM needs (one package per installed package, DESCRIBES and
//! CONTAINS relationships, extracted licences) is small enough to follow
//! the 2.3 schema field by field. The documents are checked against the
//! reference implementation (spdx-tools) in the tests.

use super::{DocumentInfo, PackageList, SbomError};
use cyclonedx_bom::external_models::spdx::SpdxExpression;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    spdx_version: &'static str,
    data_license: &'static str,
    #[serde(rename = "SPDXID")]
    spdx_id: &'static str,
    name: String,
    document_namespace: String,
    creation_info: CreationInfo,
    document_describes: Vec<String>,
    packages: Vec<SpdxPackage>,
    relationships: Vec<Relationship>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    has_extracted_licensing_infos: Vec<ExtractedLicence>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CreationInfo {
    created: String,
    creators: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpdxPackage {
    #[serde(rename = "SPDXID")]
    spdx_id: String,
    name: String,
    version_info: String,
    download_location: &'static str,
    files_analyzed: bool,
    license_concluded: &'static str,
    license_declared: String,
    copyright_text: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    homepage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source_info: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    primary_package_purpose: Option<&'static str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    external_refs: Vec<ExternalRef>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExternalRef {
    reference_category: &'static str,
    reference_type: &'static str,
    reference_locator: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Relationship {
    spdx_element_id: String,
    relationship_type: &'static str,
    related_spdx_element: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExtractedLicence {
    license_id: String,
    extracted_text: String,
    name: String,
}

/// Letters, digits, `.` and `-`: what an SPDX identifier may hold.
fn id_part(text: &str) -> String {
    let part: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(100)
        .collect();
    if part.is_empty() {
        "x".to_owned()
    } else {
        part
    }
}

/// Percent-encodes a path segment of the document namespace URI.
fn uri_segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Licence texts the databases give that are no valid SPDX expression
/// (`GPLv2+`), each named by a `LicenseRef-` of its own.
#[derive(Default)]
struct Licences {
    refs: BTreeMap<String, String>,
}

impl Licences {
    fn declared(&mut self, licence: Option<&str>) -> String {
        let Some(licence) = licence else {
            return "NOASSERTION".to_owned();
        };
        if SpdxExpression::try_from(licence.to_owned()).is_ok() {
            return licence.to_owned();
        }
        let count = self.refs.len();
        self.refs
            .entry(licence.to_owned())
            .or_insert_with(|| format!("LicenseRef-{}-{count}", id_part(licence)))
            .clone()
    }

    fn extracted(self) -> Vec<ExtractedLicence> {
        let mut extracted: Vec<ExtractedLicence> = self
            .refs
            .into_iter()
            .map(|(text, id)| ExtractedLicence {
                license_id: id,
                extracted_text: text.clone(),
                name: text,
            })
            .collect();
        extracted.sort_by(|a, b| a.license_id.cmp(&b.license_id));
        extracted
    }
}

/// The SPDX 2.3 JSON document for `list`.
pub fn document(list: &PackageList, info: &DocumentInfo) -> Result<Vec<u8>, SbomError> {
    let image_id = "SPDXRef-Image".to_owned();
    let mut licences = Licences::default();
    let mut packages = vec![SpdxPackage {
        spdx_id: image_id.clone(),
        name: info.image_name.clone(),
        version_info: info.image_version.clone(),
        download_location: "NOASSERTION",
        files_analyzed: false,
        license_concluded: "NOASSERTION",
        license_declared: "NOASSERTION".to_owned(),
        copyright_text: "NOASSERTION",
        homepage: None,
        source_info: Some(format!(
            "build {} ({} builder) of imgbuild run {}",
            info.build_name, info.builder, info.run_id
        )),
        primary_package_purpose: Some(if info.builder == "docker" {
            "CONTAINER"
        } else {
            "OPERATING-SYSTEM"
        }),
        external_refs: Vec::new(),
    }];
    let mut relationships = vec![Relationship {
        spdx_element_id: "SPDXRef-DOCUMENT".to_owned(),
        relationship_type: "DESCRIBES",
        related_spdx_element: image_id.clone(),
    }];
    for (index, package) in list.packages.iter().enumerate() {
        // The index keeps ids unique whatever the names sanitize to.
        let spdx_id = format!(
            "SPDXRef-Package-{}-{}-{index}",
            package.database.as_str(),
            id_part(&package.name)
        );
        relationships.push(Relationship {
            spdx_element_id: image_id.clone(),
            relationship_type: "CONTAINS",
            related_spdx_element: spdx_id.clone(),
        });
        packages.push(SpdxPackage {
            spdx_id,
            name: package.name.clone(),
            version_info: package.version.clone(),
            download_location: "NOASSERTION",
            files_analyzed: false,
            license_concluded: "NOASSERTION",
            license_declared: licences.declared(package.license.as_deref()),
            copyright_text: "NOASSERTION",
            homepage: package.homepage.clone(),
            source_info: package
                .source
                .as_ref()
                .map(|source| format!("built from source package {source}")),
            primary_package_purpose: None,
            external_refs: vec![ExternalRef {
                reference_category: "PACKAGE-MANAGER",
                reference_type: "purl",
                reference_locator: package.purl.clone(),
            }],
        });
    }
    let comment = match (&list.distro, list.databases.is_empty()) {
        (_, true) => Some("no package database found on the machine".to_owned()),
        (Some(distro), false) => Some(format!(
            "packages read from the {} database of {}",
            list.database_names(),
            distro.pretty_name.as_deref().unwrap_or(&distro.id)
        )),
        (None, false) => Some(format!(
            "packages read from the {} database",
            list.database_names()
        )),
    };
    let document = Document {
        spdx_version: "SPDX-2.3",
        data_license: "CC0-1.0",
        spdx_id: "SPDXRef-DOCUMENT",
        name: format!("{}-{}", info.image_name, info.image_version),
        document_namespace: format!(
            "https://imgbuild.invalid/spdx/{}/{}/{}/{}",
            uri_segment(&info.image_name),
            uri_segment(&info.image_version),
            uri_segment(&info.build_name),
            uri_segment(&info.run_id)
        ),
        creation_info: CreationInfo {
            created: info.created.clone(),
            creators: vec![format!("Tool: imgbuild-{}", info.tool_version)],
            comment,
        },
        document_describes: vec![image_id],
        packages,
        relationships,
        has_extracted_licensing_infos: licences.extracted(),
    };
    let mut out = serde_json::to_vec_pretty(&document).map_err(|err| SbomError::Write {
        format: "SPDX".to_owned(),
        reason: err.to_string(),
    })?;
    out.push(b'\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sbom::packages::{Database, Package};

    pub(crate) fn info() -> DocumentInfo {
        DocumentInfo {
            image_name: "baseline".into(),
            image_version: "1.0.0".into(),
            build_name: "vm".into(),
            builder: "qemu".into(),
            run_id: "0123abcd".into(),
            created: "2026-12-01T16:12:38Z".into(),
            tool_version: "0.1.0".into(),
        }
    }

    fn package(name: &str, license: Option<&str>) -> Package {
        Package {
            database: Database::Rpm,
            name: name.into(),
            version: "1-1".into(),
            arch: Some("x86_64".into()),
            license: license.map(str::to_owned),
            source: None,
            homepage: None,
            purl: format!("pkg:rpm/{name}@1-1"),
        }
    }

    #[test]
    fn licences_that_are_no_spdx_expression_get_an_extracted_licence() {
        let list = PackageList {
            databases: vec![Database::Rpm],
            distro: None,
            packages: vec![
                package("a", Some("GPL-2.0-only OR MIT")),
                package("b", Some("GPLv2+")),
                package("c", None),
                package("d", Some("GPLv2+")),
            ],
            skipped: 0,
        };
        let doc: serde_json::Value =
            serde_json::from_slice(&document(&list, &info()).unwrap()).unwrap();
        let declared: Vec<&str> = doc["packages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["licenseDeclared"].as_str().unwrap())
            .collect();
        assert_eq!(
            declared,
            vec![
                "NOASSERTION",
                "GPL-2.0-only OR MIT",
                "LicenseRef-GPLv2--0",
                "NOASSERTION",
                "LicenseRef-GPLv2--0"
            ]
        );
        assert_eq!(
            doc["hasExtractedLicensingInfos"],
            serde_json::json!([{"licenseId": "LicenseRef-GPLv2--0", "extractedText": "GPLv2+", "name": "GPLv2+"}])
        );
        assert_eq!(doc["relationships"].as_array().unwrap().len(), 5);
        assert_eq!(
            doc["documentNamespace"],
            "https://imgbuild.invalid/spdx/baseline/1.0.0/vm/0123abcd"
        );
    }
}
