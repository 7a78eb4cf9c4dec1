//! Parsers for the package databases a machine may have (dpkg's status
//! file, `rpm -qa`, apk's installed database) and for `os-release`, and the
//! package URLs (purl) made from them.
//!
//! The input comes from an untrusted machine: every parser takes any text,
//! never panics, bounds what it keeps, and skips (and counts) entries that
//! cannot be packages instead of failing on them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The package database a package was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Database {
    Dpkg,
    Rpm,
    Apk,
}

impl Database {
    pub fn as_str(self) -> &'static str {
        match self {
            Database::Dpkg => "dpkg",
            Database::Rpm => "rpm",
            Database::Apk => "apk",
        }
    }

    /// The purl type of its packages.
    fn purl_type(self) -> &'static str {
        match self {
            Database::Dpkg => "deb",
            Database::Rpm => "rpm",
            Database::Apk => "apk",
        }
    }
}

/// The distribution, from `/etc/os-release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Distro {
    /// `ID`: `debian`, `fedora`, `alpine`.
    pub id: String,
    /// `VERSION_ID`, else `VERSION_CODENAME`: `12`, `3.19.1`, `trixie`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `PRETTY_NAME`, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretty_name: Option<String>,
}

impl Distro {
    /// The purl `distro` qualifier: `debian-12`.
    fn qualifier(&self) -> Option<String> {
        self.version
            .as_ref()
            .map(|version| format!("{}-{version}", self.id))
    }
}

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Package {
    pub database: Database,
    pub name: String,
    /// As the database spells it: dpkg's `[epoch:]upstream[-revision]`,
    /// rpm's `[epoch:]version-release`, apk's `version-rN`.
    pub version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// The licence as the database declares it (rpm, apk); dpkg keeps none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    /// The source package it was built from (dpkg `Source`, apk origin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub homepage: Option<String>,
    pub purl: String,
}

/// Every package found, sorted, with where they came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageList {
    /// The databases read; empty when the machine has none we know.
    pub databases: Vec<Database>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distro: Option<Distro>,
    pub packages: Vec<Package>,
    /// Entries that could not be packages (no name or version, oversized
    /// fields), left out.
    #[serde(default)]
    pub skipped: usize,
}

impl PackageList {
    /// Sorted and without duplicates, so equal machines give equal lists
    /// (and documents).
    pub fn finish(&mut self) {
        self.databases.sort();
        self.packages.sort();
        self.packages.dedup();
        self.packages.truncate(MAX_PACKAGES);
    }

    /// `dpkg`, `dpkg+rpm`, or `none`, for records and messages.
    pub fn database_names(&self) -> String {
        if self.databases.is_empty() {
            return "none".to_owned();
        }
        self.databases
            .iter()
            .map(|db| db.as_str())
            .collect::<Vec<_>>()
            .join("+")
    }
}

/// What one parser found.
#[derive(Debug, Default)]
pub struct Parsed {
    pub packages: Vec<Package>,
    pub skipped: usize,
}

/// Longer fields are not a package's (a name, a version, a licence line).
const MAX_FIELD_CHARS: usize = 4096;
/// More packages than any distribution installs; a listing past this is
/// cut off rather than held in memory.
pub const MAX_PACKAGES: usize = 200_000;

/// The `rpm` query: one tab-separated line per package. Tags an rpm lacks
/// print `(none)`.
pub const RPM_QUERY: &str = "rpm -qa --queryformat '%{NAME}\\t%{EPOCH}\\t%{VERSION}\\t%{RELEASE}\\t%{ARCH}\\t%{LICENSE}\\t%{SOURCERPM}\\t%{URL}\\n'";

/// A field value as kept: trimmed, none when empty, too long or holding
/// control characters (which no database writes for these fields).
fn field(value: &str) -> Option<String> {
    let value = value.trim();
    let ok = !value.is_empty()
        && value.chars().count() <= MAX_FIELD_CHARS
        && !value.chars().any(char::is_control);
    ok.then(|| value.to_owned())
}

/// A homepage kept only when it is a plain http(s) URL: documents put it
/// where a URI is required.
fn homepage(value: Option<&String>) -> Option<String> {
    let value = value?;
    let plain = (value.starts_with("https://") || value.starts_with("http://"))
        && value.chars().all(|c| {
            c.is_ascii_graphic()
                && !matches!(c, '"' | '<' | '>' | '\\' | '^' | '`' | '{' | '|' | '}')
        });
    plain.then(|| value.clone())
}

/// Splits deb822-style text (dpkg status) into stanzas of fields, folding
/// continuation lines into their field.
fn deb822_stanzas(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut stanzas = Vec::new();
    let mut current: BTreeMap<String, String> = BTreeMap::new();
    let mut last: Option<String> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                stanzas.push(std::mem::take(&mut current));
            }
            last = None;
            continue;
        }
        if line.starts_with([' ', '\t']) {
            // Multi-line values (descriptions, conffiles) are not kept.
            if let Some(key) = &last
                && let Some(value) = current.get_mut(key)
                && value.len() < MAX_FIELD_CHARS
            {
                value.push('\n');
                value.push_str(line.trim());
            }
            continue;
        }
        match line.split_once(':') {
            Some((key, value)) if !key.is_empty() && key.len() < 64 => {
                let key = key.to_ascii_lowercase();
                current.insert(key.clone(), value.trim().to_owned());
                last = Some(key);
            }
            _ => last = None,
        }
    }
    if !current.is_empty() {
        stanzas.push(current);
    }
    stanzas
}

/// dpkg states whose package's files are on the machine: all but
/// `not-installed` and `config-files`.
const PRESENT: &[&str] = &[
    "installed",
    "unpacked",
    "half-configured",
    "half-installed",
    "triggers-awaited",
    "triggers-pending",
];

/// `/var/lib/dpkg/status`.
pub fn parse_dpkg_status(text: &str, distro: Option<&Distro>) -> Parsed {
    let mut parsed = Parsed::default();
    for stanza in deb822_stanzas(text) {
        if parsed.packages.len() >= MAX_PACKAGES {
            break;
        }
        let state = stanza
            .get("status")
            .and_then(|status| status.split_whitespace().nth(2));
        if !state.is_some_and(|state| PRESENT.contains(&state)) {
            continue;
        }
        let name = stanza.get("package").and_then(|v| field(v));
        let version = stanza.get("version").and_then(|v| field(v));
        let (Some(name), Some(version)) = (name, version) else {
            parsed.skipped += 1;
            continue;
        };
        let arch = stanza.get("architecture").and_then(|v| field(v));
        // `Source: name` or `Source: name (version)`.
        let source = stanza
            .get("source")
            .and_then(|v| v.split_whitespace().next())
            .and_then(field);
        let homepage = homepage(stanza.get("homepage").and_then(|v| field(v)).as_ref());
        let namespace = distro.map_or("debian", |d| d.id.as_str());
        let purl = purl(
            Database::Dpkg,
            Some(namespace),
            &name,
            &version,
            &[
                ("arch", arch.clone()),
                ("distro", distro.and_then(Distro::qualifier)),
            ],
        );
        parsed.packages.push(Package {
            database: Database::Dpkg,
            name,
            version,
            arch,
            license: None,
            source,
            homepage,
            purl,
        });
    }
    parsed
}

/// `rpm -qa` with [`RPM_QUERY`].
pub fn parse_rpm(text: &str, distro: Option<&Distro>) -> Parsed {
    let mut parsed = Parsed::default();
    for line in text.lines() {
        if parsed.packages.len() >= MAX_PACKAGES {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != 8 {
            parsed.skipped += 1;
            continue;
        }
        let tag = |index: usize| field(fields[index]).filter(|v| v != "(none)");
        let (Some(name), Some(upstream), Some(release)) = (tag(0), tag(2), tag(3)) else {
            parsed.skipped += 1;
            continue;
        };
        // The GPG key pseudo-packages are not software.
        if name == "gpg-pubkey" {
            continue;
        }
        let epoch = tag(1).filter(|e| e.chars().all(|c| c.is_ascii_digit()));
        let arch = tag(4);
        let bare_version = format!("{upstream}-{release}");
        let version = match &epoch {
            Some(epoch) => format!("{epoch}:{bare_version}"),
            None => bare_version.clone(),
        };
        // `glibc-2.38-16.fc39.src.rpm`: the source name is what precedes
        // the version and release.
        let source = tag(6).and_then(|srpm| {
            srpm.strip_suffix(&format!("-{bare_version}.src.rpm"))
                .or_else(|| srpm.strip_suffix(&format!("-{bare_version}.nosrc.rpm")))
                .map(str::to_owned)
        });
        let namespace = distro.map(|d| d.id.as_str());
        let purl = purl(
            Database::Rpm,
            namespace,
            &name,
            &bare_version,
            &[
                ("arch", arch.clone()),
                ("distro", distro.and_then(Distro::qualifier)),
                ("epoch", epoch),
            ],
        );
        parsed.packages.push(Package {
            database: Database::Rpm,
            name,
            version,
            arch,
            license: tag(5),
            source,
            homepage: homepage(tag(7).as_ref()),
            purl,
        });
    }
    parsed
}

/// `/lib/apk/db/installed`: stanzas of `X:value` lines, blank-line
/// separated; `P` name, `V` version, `A` arch, `L` licence, `o` origin,
/// `U` URL. The many file lines (`F`, `R`, `Z`, ...) are passed over.
pub fn parse_apk_installed(text: &str, distro: Option<&Distro>) -> Parsed {
    let mut parsed = Parsed::default();
    let mut stanza: BTreeMap<char, String> = BTreeMap::new();
    let flush = |stanza: &mut BTreeMap<char, String>, parsed: &mut Parsed| {
        if stanza.is_empty() || parsed.packages.len() >= MAX_PACKAGES {
            stanza.clear();
            return;
        }
        let get = |key: char| stanza.get(&key).and_then(|v| field(v));
        let (Some(name), Some(version)) = (get('P'), get('V')) else {
            parsed.skipped += 1;
            stanza.clear();
            return;
        };
        let arch = get('A');
        let namespace = distro.map_or("alpine", |d| d.id.as_str());
        let purl = purl(
            Database::Apk,
            Some(namespace),
            &name,
            &version,
            &[
                ("arch", arch.clone()),
                ("distro", distro.and_then(Distro::qualifier)),
            ],
        );
        parsed.packages.push(Package {
            database: Database::Apk,
            name,
            version,
            arch,
            license: get('L'),
            source: get('o'),
            homepage: homepage(get('U').as_ref()),
            purl,
        });
        stanza.clear();
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            flush(&mut stanza, &mut parsed);
            continue;
        }
        let mut chars = line.chars();
        if let (Some(key), Some(':')) = (chars.next(), chars.next())
            && matches!(key, 'P' | 'V' | 'A' | 'L' | 'o' | 'U')
        {
            stanza.insert(key, chars.as_str().to_owned());
        }
    }
    flush(&mut stanza, &mut parsed);
    parsed
}

/// `/etc/os-release`: `KEY=value` lines, values optionally quoted.
pub fn parse_os_release(text: &str) -> Option<Distro> {
    let mut values = BTreeMap::new();
    for line in text.lines().take(200) {
        let Some((key, value)) = line.trim().split_once('=') else {
            continue;
        };
        if matches!(
            key,
            "ID" | "VERSION_ID" | "VERSION_CODENAME" | "PRETTY_NAME"
        ) {
            values.insert(key, unquote(value));
        }
    }
    // The ID names the purl namespace: keep it to what os-release allows
    // (lower-case letters, digits, `_ . -`).
    let id = values.get("ID")?.to_ascii_lowercase();
    let id_ok = !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !id_ok {
        return None;
    }
    let version = values
        .get("VERSION_ID")
        .or_else(|| values.get("VERSION_CODENAME"))
        .and_then(|v| field(v))
        .filter(|v| v.len() <= 64);
    Some(Distro {
        id,
        version,
        pretty_name: values.get("PRETTY_NAME").and_then(|v| field(v)),
    })
}

fn unquote(value: &str) -> String {
    let value = value.trim();
    let quoted = |q: char| value.len() >= 2 && value.starts_with(q) && value.ends_with(q);
    if quoted('"') {
        let inner = &value[1..value.len() - 1];
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.extend(chars.next()),
                c => out.push(c),
            }
        }
        out
    } else if quoted('\'') {
        value[1..value.len() - 1].to_owned()
    } else {
        value.to_owned()
    }
}

/// Percent-encodes everything but the purl spec's unreserved characters
/// (and `:`, which the spec leaves as is in versions and qualifiers).
fn encode(text: &str, keep_colon: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        let keep = byte.is_ascii_alphanumeric()
            || matches!(byte, b'.' | b'-' | b'_' | b'~')
            || (keep_colon && byte == b':');
        if keep {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `pkg:<type>/<namespace>/<name>@<version>?<qualifiers>`, qualifiers
/// sorted by key and left out when empty, as the purl spec's canonical form
/// has them.
pub fn purl(
    database: Database,
    namespace: Option<&str>,
    name: &str,
    version: &str,
    qualifiers: &[(&str, Option<String>)],
) -> String {
    let mut purl = format!("pkg:{}/", database.purl_type());
    if let Some(namespace) = namespace.filter(|ns| !ns.is_empty()) {
        purl.push_str(&encode(&namespace.to_ascii_lowercase(), false));
        purl.push('/');
    }
    purl.push_str(&encode(name, false));
    purl.push('@');
    purl.push_str(&encode(version, true));
    let mut present: Vec<(&str, &String)> = qualifiers
        .iter()
        .filter_map(|(key, value)| value.as_ref().map(|v| (*key, v)))
        .filter(|(_, value)| !value.is_empty())
        .collect();
    present.sort();
    for (index, (key, value)) in present.into_iter().enumerate() {
        purl.push(if index == 0 { '?' } else { '&' });
        purl.push_str(key);
        purl.push('=');
        purl.push_str(&encode(value, true));
    }
    purl
}

#[cfg(test)]
mod tests {
    use super::*;

    fn debian() -> Distro {
        Distro {
            id: "debian".into(),
            version: Some("12".into()),
            pretty_name: Some("Debian GNU/Linux 12 (bookworm)".into()),
        }
    }

    const DPKG_STATUS: &str = "\
Package: libstdc++6
Status: install ok installed
Priority: optional
Section: libs
Installed-Size: 2630
Maintainer: Debian GCC Maintainers <debian-gcc@lists.debian.org>
Architecture: amd64
Multi-Arch: same
Source: gcc-12 (12.2.0-14)
Version: 12.2.0-14
Depends: gcc-12-base (= 12.2.0-14), libc6 (>= 2.36), libgcc-s1 (>= 4.2)
Description: GNU Standard C++ Library v3
 This package contains an additional runtime library for C++ programs
 built with the GNU compiler.
Homepage: http://gcc.gnu.org/

Package: removed-but-configured
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0-1
Conffiles:
 /etc/removed.conf 0123456789abcdef0123456789abcdef

Package: tzdata
Status: install ok installed
Architecture: all
Version: 2024a-0+deb12u1
Homepage: javascript:alert(1)

Package: bash
Status: install ok unpacked
Architecture: amd64
Version: 5.2.15-2+b2
Source: bash (5.2.15-2)
";

    #[test]
    fn dpkg_status_lists_present_packages_with_purls() {
        let parsed = parse_dpkg_status(DPKG_STATUS, Some(&debian()));
        assert_eq!(parsed.skipped, 0);
        let got: Vec<(&str, &str, &str)> = parsed
            .packages
            .iter()
            .map(|p| (p.name.as_str(), p.version.as_str(), p.purl.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "libstdc++6",
                    "12.2.0-14",
                    "pkg:deb/debian/libstdc%2B%2B6@12.2.0-14?arch=amd64&distro=debian-12"
                ),
                (
                    "tzdata",
                    "2024a-0+deb12u1",
                    "pkg:deb/debian/tzdata@2024a-0%2Bdeb12u1?arch=all&distro=debian-12"
                ),
                (
                    "bash",
                    "5.2.15-2+b2",
                    "pkg:deb/debian/bash@5.2.15-2%2Bb2?arch=amd64&distro=debian-12"
                ),
            ]
        );
        let libstdcxx = &parsed.packages[0];
        assert_eq!(libstdcxx.source.as_deref(), Some("gcc-12"));
        assert_eq!(libstdcxx.homepage.as_deref(), Some("http://gcc.gnu.org/"));
        assert_eq!(libstdcxx.license, None);
        // Not a URL a document may carry.
        assert_eq!(parsed.packages[1].homepage, None);
    }

    #[test]
    fn dpkg_epochs_stay_in_the_version_and_odd_names_are_encoded() {
        let status = "Package: we ird/näme?x#y@z\nStatus: install ok installed\nVersion: 1:2.0~rc1-3\nArchitecture: amd64\n";
        let parsed = parse_dpkg_status(status, None);
        assert_eq!(
            parsed.packages[0].purl,
            "pkg:deb/debian/we%20ird%2Fn%C3%A4me%3Fx%23y%40z@1:2.0~rc1-3?arch=amd64"
        );
    }

    #[test]
    fn hostile_dpkg_status_never_panics_and_skips_what_is_no_package() {
        let long = "x".repeat(MAX_FIELD_CHARS + 1);
        let inputs = [
            String::new(),
            "\n\n\n".into(),
            ":\n::\n: :\n".into(),
            " continuation before any field\n".into(),
            "Status: install ok installed\nVersion: 1\n".into(),
            "Package: p\nStatus: install ok installed\n".into(),
            format!("Package: {long}\nStatus: install ok installed\nVersion: 1\n"),
            "Package: p\u{7}\nStatus: install ok installed\nVersion: 1\n".into(),
            "Package: p\nStatus: install\nVersion: 1\n".into(),
            "Package: ok\nStatus: install ok installed\nVersion: 1\nArchitecture: amd64\n".into(),
            "\u{feff}Package\u{0}: \u{202e}\r\n\r\n".into(),
            "Package: é\nStatus: install ok installed\nVersion: ü\nSource: (\n".into(),
        ];
        for input in &inputs {
            let _ = parse_dpkg_status(input, None);
        }
        let parsed = parse_dpkg_status(&inputs.join("\n\n"), None);
        let names: Vec<&str> = parsed.packages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["ok", "é"]);
        assert_eq!(parsed.skipped, 4);
    }

    /// `rpm -qa --queryformat` as Fedora 39 prints it for a few packages.
    const RPM_OUTPUT: &str = "\
bash\t(none)\t5.2.21\t1.fc39\tx86_64\tGPL-3.0-or-later\tbash-5.2.21-1.fc39.src.rpm\thttps://www.gnu.org/software/bash
gpg-pubkey\t(none)\t18b8e74c\t62f2920f\t(none)\tpubkey\t(none)\t(none)
openssl-libs\t1\t3.1.1\t4.fc39\tx86_64\tApache-2.0\topenssl-3.1.1-4.fc39.src.rpm\thttp://www.openssl.org/
tzdata\t(none)\t2024a\t1.fc39\tnoarch\tLicenseRef-Fedora-Public-Domain AND BSD-3-Clause\ttzdata-2024a-1.fc39.src.rpm\thttps://www.iana.org/time-zones
glibc\t(none)\t2.38\t16.fc39\tx86_64\tLGPLv2+ and LGPLv2+ with exceptions and GPLv2+\tglibc-2.38-16.fc39.src.rpm\thttp://www.gnu.org/software/glibc/
";

    #[test]
    fn rpm_lines_give_versions_with_epochs_licences_and_purls() {
        let fedora = Distro {
            id: "fedora".into(),
            version: Some("39".into()),
            pretty_name: None,
        };
        let parsed = parse_rpm(RPM_OUTPUT, Some(&fedora));
        assert_eq!(parsed.skipped, 0);
        let got: Vec<(&str, &str, Option<&str>, &str)> = parsed
            .packages
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.version.as_str(),
                    p.license.as_deref(),
                    p.purl.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "bash",
                    "5.2.21-1.fc39",
                    Some("GPL-3.0-or-later"),
                    "pkg:rpm/fedora/bash@5.2.21-1.fc39?arch=x86_64&distro=fedora-39"
                ),
                (
                    "openssl-libs",
                    "1:3.1.1-4.fc39",
                    Some("Apache-2.0"),
                    "pkg:rpm/fedora/openssl-libs@3.1.1-4.fc39?arch=x86_64&distro=fedora-39&epoch=1"
                ),
                (
                    "tzdata",
                    "2024a-1.fc39",
                    Some("LicenseRef-Fedora-Public-Domain AND BSD-3-Clause"),
                    "pkg:rpm/fedora/tzdata@2024a-1.fc39?arch=noarch&distro=fedora-39"
                ),
                (
                    "glibc",
                    "2.38-16.fc39",
                    Some("LGPLv2+ and LGPLv2+ with exceptions and GPLv2+"),
                    "pkg:rpm/fedora/glibc@2.38-16.fc39?arch=x86_64&distro=fedora-39"
                ),
            ]
        );
        assert_eq!(parsed.packages[1].source.as_deref(), Some("openssl"));
    }

    #[test]
    fn hostile_rpm_lines_are_skipped_without_panicking() {
        let text = "a\tb\nx\t\t\t\t\t\t\t\nname\t(none)\t(none)\t1\tx\tl\ts\tu\nname\tx\t1\t2\ta\tl\ts\tu\textra\n\u{0}\t\u{0}\n";
        let parsed = parse_rpm(text, None);
        assert!(parsed.packages.is_empty());
        assert_eq!(parsed.skipped, 5);
        // Without a distro there is no namespace, and a non-numeric epoch
        // is dropped rather than passed on.
        let parsed = parse_rpm("n\tx1\t1\t2\t(none)\t(none)\t(none)\t(none)\n", None);
        assert_eq!(parsed.packages[0].purl, "pkg:rpm/n@1-2");
        assert_eq!(parsed.packages[0].version, "1-2");
    }

    /// `/lib/apk/db/installed` from Alpine 3.19, two packages, abridged.
    const APK_INSTALLED: &str = "\
C:Q1Ut9lmgpPq6DGn7kcWcb3XzibM1k=
P:musl
V:1.2.4_git20230717-r4
A:x86_64
S:407447
I:667648
T:the musl c library (libc) implementation
U:https://musl.libc.org/
L:MIT
o:musl
m:Timo Teräs <timo.teras@iki.fi>
t:1705599164
c:1f2c1e3bc9e1d1e2e1df5a4dbc4bb3ee7c8ac43b
F:lib
R:ld-musl-x86_64.so.1
a:0:0:755
Z:Q1ESjvBqK3gCzp9R0ZqyxgTkcfeqQ=
R:libc.musl-x86_64.so.1
a:0:0:777
Z:Q17yJ3JFNypA4mxhJJr0ou6CzsJVI=

C:Q1NXtAIyd0RKrZI7PdHbOyWqOTIrw=
P:busybox-binsh
V:1.36.1-r15
A:x86_64
S:1538
I:1
T:busybox ash /bin/sh
U:https://busybox.net/
L:GPL-2.0-only
o:busybox
D:busybox=1.36.1-r15
F:bin
R:sh
";

    #[test]
    fn apk_installed_database_gives_licences_origins_and_purls() {
        let alpine = parse_os_release(
            "NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.19.1\nPRETTY_NAME=\"Alpine Linux v3.19\"\n",
        );
        let parsed = parse_apk_installed(APK_INSTALLED, alpine.as_ref());
        assert_eq!(parsed.skipped, 0);
        #[allow(clippy::type_complexity)]
        let got: Vec<(&str, &str, Option<&str>, Option<&str>, &str)> = parsed
            .packages
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.version.as_str(),
                    p.license.as_deref(),
                    p.source.as_deref(),
                    p.purl.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "musl",
                    "1.2.4_git20230717-r4",
                    Some("MIT"),
                    Some("musl"),
                    "pkg:apk/alpine/musl@1.2.4_git20230717-r4?arch=x86_64&distro=alpine-3.19.1"
                ),
                (
                    "busybox-binsh",
                    "1.36.1-r15",
                    Some("GPL-2.0-only"),
                    Some("busybox"),
                    "pkg:apk/alpine/busybox-binsh@1.36.1-r15?arch=x86_64&distro=alpine-3.19.1"
                ),
            ]
        );
    }

    #[test]
    fn hostile_apk_databases_never_panic() {
        let inputs = [
            "P:\nV:\n".to_owned(),
            "P:only-a-name\n".into(),
            "V:1\n\nP:x\n".into(),
            "PV:1\n:\n\u{0}:\u{0}\nP\n".into(),
            format!("P:{}\nV:1\n", "n".repeat(MAX_FIELD_CHARS * 2)),
            "P:ok\nV:1\nP:ok-again-overrides\n".into(),
        ];
        let parsed = parse_apk_installed(&inputs.join("\n\n"), None);
        let names: Vec<&str> = parsed.packages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["ok-again-overrides"]);
        assert_eq!(parsed.skipped, 5);
    }

    #[test]
    fn os_release_is_unquoted_and_its_id_checked() {
        let distro = parse_os_release(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\nID=debian\n",
        )
        .unwrap();
        assert_eq!(distro, debian());
        let testing = parse_os_release("ID='debian'\nVERSION_CODENAME=trixie\n").unwrap();
        assert_eq!(testing.version.as_deref(), Some("trixie"));
        assert_eq!(parse_os_release("ID=\"../../etc\"\n"), None);
        assert_eq!(parse_os_release("ID=a b\n"), None);
        assert_eq!(parse_os_release("NAME=x\n"), None);
        assert_eq!(parse_os_release("ID=\"\\\n"), None);
    }

    #[test]
    fn a_list_is_sorted_and_deduplicated() {
        let parsed = parse_dpkg_status(
            "Package: b\nStatus: install ok installed\nVersion: 1\n\nPackage: a\nStatus: install ok installed\nVersion: 1\n\nPackage: b\nStatus: install ok installed\nVersion: 1\n",
            None,
        );
        let mut list = PackageList {
            databases: vec![Database::Dpkg],
            distro: None,
            packages: parsed.packages,
            skipped: 0,
        };
        list.finish();
        let names: Vec<&str> = list.packages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["a", "b"]);
        assert_eq!(list.database_names(), "dpkg");
    }
}
