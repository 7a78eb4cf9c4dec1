//! CycloneDX 1.5 JSON, through the CycloneDX project's own Rust model
//! (`cyclonedx-bom`), which writes each spec version's schema.

use super::{DocumentInfo, PackageList, SbomError};
use cyclonedx_bom::models::component::Classification;
use cyclonedx_bom::models::license::{License, LicenseChoice, Licenses};
use cyclonedx_bom::models::property::{Properties, Property};
use cyclonedx_bom::models::tool::{Tool, Tools};
use cyclonedx_bom::prelude::*;
use std::collections::BTreeSet;
use std::str::FromStr;

/// A serial number that is the same for the same build and run, so the
/// document is reproducible from its inputs.
fn serial(info: &DocumentInfo) -> UrnUuid {
    let name = format!(
        "imgbuild:{}:{}:{}:{}",
        info.image_name, info.image_version, info.build_name, info.run_id
    );
    UrnUuid::from(uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        name.as_bytes(),
    ))
}

fn licences(licence: Option<&str>) -> Option<Licenses> {
    let licence = licence?;
    let choice = match SpdxExpression::try_from(licence.to_owned()) {
        Ok(expression) => LicenseChoice::Expression(expression),
        Err(_) => LicenseChoice::License(License::named_license(licence)),
    };
    Some(Licenses(vec![choice]))
}

fn property(name: &str, value: &str) -> Property {
    Property {
        name: name.to_owned(),
        value: NormalizedString::new(value),
    }
}

/// The CycloneDX 1.5 JSON document for `list`.
pub fn document(list: &PackageList, info: &DocumentInfo) -> Result<Vec<u8>, SbomError> {
    let write_error = |reason: String| SbomError::Write {
        format: "CycloneDX".to_owned(),
        reason,
    };
    let classification = if info.builder == "docker" {
        Classification::Container
    } else {
        Classification::OperatingSystem
    };
    let mut image = Component::new(
        classification,
        &info.image_name,
        &info.image_version,
        Some(format!("image:{}-{}", info.image_name, info.image_version)),
    );
    let mut image_properties = vec![
        property("imgbuild:build", &info.build_name),
        property("imgbuild:run-id", &info.run_id),
        property("imgbuild:package-database", &list.database_names()),
    ];
    if list.databases.is_empty() {
        image_properties.push(property(
            "imgbuild:note",
            "no package database found on the machine",
        ));
    }
    if let Some(distro) = &list.distro {
        image_properties.push(property("imgbuild:distro", &distro.id));
    }
    image.properties = Some(Properties(image_properties));

    let mut refs = BTreeSet::new();
    let components = list
        .packages
        .iter()
        .enumerate()
        .map(|(index, package)| {
            // A bom-ref must be unique; a purl is, unless the database
            // held something odd.
            let bom_ref = if refs.insert(package.purl.clone()) {
                package.purl.clone()
            } else {
                format!("{}#{index}", package.purl)
            };
            let mut component = Component::new(
                Classification::Library,
                &package.name,
                &package.version,
                Some(bom_ref),
            );
            component.purl = Purl::from_str(&package.purl).ok();
            component.licenses = licences(package.license.as_deref());
            let mut properties = vec![property(
                "imgbuild:package-database",
                package.database.as_str(),
            )];
            if let Some(source) = &package.source {
                properties.push(property("imgbuild:source-package", source));
            }
            component.properties = Some(Properties(properties));
            component
        })
        .collect();

    let timestamp = DateTime::try_from(info.created.clone())
        .map_err(|err| write_error(format!("creation time {}: {err}", info.created)))?;
    let bom = Bom {
        version: 1,
        serial_number: Some(serial(info)),
        metadata: Some(Metadata {
            timestamp: Some(timestamp),
            tools: Some(Tools::List(vec![Tool::new(
                "imgbuild",
                "imgbuild",
                &info.tool_version,
            )])),
            component: Some(image),
            ..Metadata::default()
        }),
        components: Some(Components(components)),
        spec_version: SpecVersion::V1_5,
        ..Bom::default()
    };
    let mut out = Vec::new();
    bom.output_as_json_v1_5(&mut out)
        .map_err(|err| write_error(err.to_string()))?;
    out.push(b'\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sbom::packages::parse_apk_installed;

    #[test]
    fn the_document_passes_the_models_own_validation_and_is_deterministic() {
        let parsed = parse_apk_installed(
            "P:musl\nV:1.2.4-r4\nA:x86_64\nL:MIT\no:musl\n\nP:odd name+\nV:1\nL:GPLv2+ or whatever\n",
            None,
        );
        let mut list = PackageList {
            databases: vec![crate::sbom::Database::Apk],
            distro: None,
            packages: parsed.packages,
            skipped: 0,
        };
        list.finish();
        let info = DocumentInfo {
            image_name: "baseline".into(),
            image_version: "1.0.0".into(),
            build_name: "box".into(),
            builder: "docker".into(),
            run_id: "run1".into(),
            created: "2026-12-01T16:12:38Z".into(),
            tool_version: "0.1.0".into(),
        };
        let first = document(&list, &info).unwrap();
        assert_eq!(first, document(&list, &info).unwrap());
        let bom = Bom::parse_from_json_v1_5(first.as_slice()).unwrap();
        let result = bom.validate_version(SpecVersion::V1_5);
        assert!(result.passed(), "{result:?}");
        let json: serde_json::Value = serde_json::from_slice(&first).unwrap();
        assert_eq!(json["specVersion"], "1.5");
        assert_eq!(json["metadata"]["timestamp"], "2026-12-01T16:12:38Z");
        let purls: Vec<&str> = json["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["purl"].as_str().unwrap())
            .collect();
        assert_eq!(
            purls,
            vec![
                "pkg:apk/alpine/musl@1.2.4-r4?arch=x86_64",
                "pkg:apk/alpine/odd%20name%2B@1"
            ]
        );
        assert_eq!(
            json["components"][0]["licenses"],
            serde_json::json!([{"expression": "MIT"}])
        );
        assert_eq!(
            json["components"][1]["licenses"],
            serde_json::json!([{"license": {"name": "GPLv2+ or whatever"}}])
        );
    }
}
