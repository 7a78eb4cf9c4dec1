//! What is in a machine: its package database, read over the communicator
//! at the end of provisioning, written as SPDX 2.3 and CycloneDX 1.5 JSON.
//!
//! The machine is untrusted: everything it prints is bounded in size,
//! parsed without panicking, and never put back into a shell command.

pub mod cyclonedx;
pub mod packages;
pub mod spdx;

use crate::communicator::{CommError, Communicator, ExitStatus, OutputSink};
use imgbuild_core::Stream;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use thiserror::Error;

pub use packages::{Database, Distro, Package, PackageList};

/// `sbom = "spdx" | "cyclonedx" | "both" | "none"`: which documents a build
/// writes beside its artifact.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SbomFormats {
    Spdx,
    Cyclonedx,
    /// The default: an image should say what is in it, and consumers differ
    /// in which of the two formats they read.
    #[default]
    Both,
    None,
}

impl SbomFormats {
    pub fn spdx(self) -> bool {
        matches!(self, SbomFormats::Spdx | SbomFormats::Both)
    }

    pub fn cyclonedx(self) -> bool {
        matches!(self, SbomFormats::Cyclonedx | SbomFormats::Both)
    }

    pub fn any(self) -> bool {
        self != SbomFormats::None
    }
}

/// What a document says about the image it describes.
#[derive(Debug, Clone)]
pub struct DocumentInfo {
    /// The image name and version, `<name>-<version>`.
    pub image_name: String,
    pub image_version: String,
    /// The build within the config.
    pub build_name: String,
    /// The builder type: `docker` images are containers, the rest are
    /// operating system images.
    pub builder: String,
    pub run_id: String,
    /// The build time, `YYYY-MM-DDThh:mm:ssZ` (see [`creation_time`]).
    pub created: String,
    /// imgbuild's version, for the documents' creator.
    pub tool_version: String,
}

#[derive(Debug, Error)]
pub enum SbomError {
    #[error("reading the package database on {target} failed: {source}")]
    Comm {
        target: String,
        #[source]
        source: CommError,
    },
    #[error(
        "`{command}` on {target} ended with {status}: {stderr}; the SBOM needs the machine's package database to be readable by the build user"
    )]
    Command {
        command: String,
        target: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error(
        "the {what} printed by {target} exceeds {limit} bytes; the SBOM is not written from a partial list (is the machine printing something else?)"
    )]
    TooLarge {
        what: String,
        target: String,
        limit: usize,
    },
    #[error("cannot write the {format} document: {reason}")]
    Write { format: String, reason: String },
}

/// The most a database listing may print. A Debian desktop's dpkg status
/// is a few MiB; an apk database with file lists rarely over 20.
pub const MAX_DATABASE_BYTES: usize = 64 << 20;
/// The most stderr kept for an error message.
const MAX_STDERR_BYTES: usize = 4096;

/// Collects a command's stdout, up to a limit, and a little of stderr.
struct Collect {
    limit: usize,
    inner: Mutex<Collected>,
}

#[derive(Default)]
struct Collected {
    stdout: String,
    stderr: String,
    overflow: bool,
}

impl Collect {
    fn new(limit: usize) -> Self {
        Collect {
            limit,
            inner: Mutex::new(Collected::default()),
        }
    }

    fn into_inner(self) -> Collected {
        self.inner.into_inner().unwrap_or_else(|p| p.into_inner())
    }
}

impl OutputSink for Collect {
    fn line(&self, stream: Stream, line: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match stream {
            Stream::Stdout => {
                if inner.overflow || inner.stdout.len() + line.len() + 1 > self.limit {
                    inner.overflow = true;
                    inner.stdout.clear();
                    return;
                }
                inner.stdout.push_str(line);
                inner.stdout.push('\n');
            }
            Stream::Stderr => {
                if inner.stderr.len() < MAX_STDERR_BYTES {
                    let room = MAX_STDERR_BYTES - inner.stderr.len();
                    let mut end = line.len().min(room);
                    while !line.is_char_boundary(end) {
                        end -= 1;
                    }
                    inner.stderr.push_str(&line[..end]);
                    inner.stderr.push(' ');
                }
            }
        }
    }
}

/// Runs one of this module's fixed commands (never one built from the
/// machine's data) and returns its bounded stdout.
async fn run(
    comm: &dyn Communicator,
    command: &str,
    what: &str,
    must_succeed: bool,
) -> Result<String, SbomError> {
    let sink = Collect::new(MAX_DATABASE_BYTES);
    let status = comm
        .exec(command, &sink)
        .await
        .map_err(|source| SbomError::Comm {
            target: comm.target(),
            source,
        })?;
    let collected = sink.into_inner();
    if collected.overflow {
        return Err(SbomError::TooLarge {
            what: what.to_owned(),
            target: comm.target(),
            limit: MAX_DATABASE_BYTES,
        });
    }
    if must_succeed && status != ExitStatus::Code(0) {
        return Err(SbomError::Command {
            command: command.to_owned(),
            target: comm.target(),
            status,
            stderr: collected.stderr.trim().to_owned(),
        });
    }
    Ok(collected.stdout)
}

/// Which databases exist. `rpm` counts only with its database directory:
/// Debian ships an `rpm` tool whose database is empty.
const DETECT: &str = "[ -r /var/lib/dpkg/status ] && echo dpkg; \
     command -v rpm >/dev/null 2>&1 && { [ -d /var/lib/rpm ] || [ -d /usr/lib/sysimage/rpm ]; } && echo rpm; \
     [ -r /lib/apk/db/installed ] && echo apk; true";
const OS_RELEASE: &str =
    "cat /etc/os-release 2>/dev/null || cat /usr/lib/os-release 2>/dev/null || true";
const DPKG: &str = "cat /var/lib/dpkg/status";
const APK: &str = "cat /lib/apk/db/installed";

/// Reads every package database on the machine. None found is not an
/// error: the list says so, with no packages.
pub async fn read_packages(comm: &dyn Communicator) -> Result<PackageList, SbomError> {
    let os_release = run(comm, OS_RELEASE, "os-release file", false).await?;
    let distro = packages::parse_os_release(&os_release);
    // A machine that cannot run the probe (no shell) has no database we
    // can read: recorded as none, like one without any.
    let found = run(comm, DETECT, "database probe", false).await?;
    let mut list = PackageList {
        databases: Vec::new(),
        distro,
        packages: Vec::new(),
        skipped: 0,
    };
    for line in found.lines() {
        let (database, parsed) = match line.trim() {
            "dpkg" => (
                Database::Dpkg,
                packages::parse_dpkg_status(
                    &run(comm, DPKG, "dpkg status database", true).await?,
                    list.distro.as_ref(),
                ),
            ),
            "rpm" => (
                Database::Rpm,
                packages::parse_rpm(
                    &run(comm, packages::RPM_QUERY, "rpm package list", true).await?,
                    list.distro.as_ref(),
                ),
            ),
            "apk" => (
                Database::Apk,
                packages::parse_apk_installed(
                    &run(comm, APK, "apk installed database", true).await?,
                    list.distro.as_ref(),
                ),
            ),
            _ => continue,
        };
        if list.databases.contains(&database) {
            continue;
        }
        list.databases.push(database);
        list.packages.extend(parsed.packages);
        list.skipped += parsed.skipped;
    }
    list.finish();
    Ok(list)
}

/// The creation time the documents carry: `SOURCE_DATE_EPOCH` when set (so
/// that two builds of equal inputs write equal documents), else the build's
/// start (`started`, RFC 3339), in the form SPDX requires.
pub fn creation_time(started: &str, source_date_epoch: Option<&str>) -> String {
    use time::format_description::well_known::Rfc3339;
    let when = source_date_epoch
        .and_then(|epoch| epoch.trim().parse::<i64>().ok())
        .and_then(|epoch| time::OffsetDateTime::from_unix_timestamp(epoch).ok())
        .or_else(|| time::OffsetDateTime::parse(started, &Rfc3339).ok())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
        .to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        when.year(),
        u8::from(when.month()),
        when.day(),
        when.hour(),
        when.minute(),
        when.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creation_time_prefers_source_date_epoch_and_drops_fractions() {
        assert_eq!(
            creation_time("2026-12-01T16:12:38.123456789Z", None),
            "2026-12-01T16:12:38Z"
        );
        assert_eq!(
            creation_time("2026-12-01T18:12:38+02:00", Some("garbage")),
            "2026-12-01T16:12:38Z"
        );
        assert_eq!(
            creation_time("2026-12-01T16:12:38Z", Some("1700000000")),
            "2023-11-14T22:13:20Z"
        );
    }

    #[test]
    fn the_collector_refuses_past_its_limit_and_keeps_little_stderr() {
        let sink = Collect::new(10);
        sink.line(Stream::Stdout, "12345");
        sink.line(Stream::Stdout, "67890");
        sink.line(Stream::Stderr, &"e".repeat(10_000));
        let collected = sink.into_inner();
        assert!(collected.overflow);
        assert!(collected.stdout.is_empty());
        assert!(collected.stderr.len() <= MAX_STDERR_BYTES + 1);
    }
}
