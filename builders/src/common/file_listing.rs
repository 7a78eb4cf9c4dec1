//! What `build --check-reproducible` compares: a listing of the machine's
//! files (type, mode, owner, size, content hash, link target, modification
//! time), taken over the communicator at the end of the build, while the
//! machine still runs, and the comparison of two such listings.
//!
//! The listing is read in the guest with GNU `find -printf` and
//! `sha256sum -z`, as root, over the root file system only (`-xdev`): other
//! mounts (`/proc`, `/sys`, `/dev`, `/run`, a container's bind-mounted
//! `/etc/hosts`) are not the image, and `/tmp` and `/var/tmp` are emptied on
//! boot by most systems. A guest without GNU find or coreutils cannot be
//! listed; the check then says so instead of claiming a result.

use crate::common::step_provision::HasCommunicator;
use async_trait::async_trait;
use imgbuild_core::{Step, StepContext, StepError};
use imgbuild_provisioners::CommError;
use imgbuild_provisioners::communicator::Communicator;
use imgbuild_provisioners::communicator::{LogLines, StdoutLines};
use imgbuild_provisioners::shell::shell_quote;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Directories left out of every listing (besides other file systems).
pub const NOT_LISTED: [&str; 6] = ["/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp"];

/// How many differences a comparison keeps by name; the counts are whole.
pub const MAX_NAMED_DIFFERENCES: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// `find`'s `%y`: `f` file, `d` directory, `l` symlink, ...
    pub kind: String,
    /// Permission bits, octal as `find` prints them.
    pub mode: String,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Seconds since the epoch, as `find` prints them (with a fraction).
    pub mtime: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Every listed path of one machine, by absolute path.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileListing {
    pub files: BTreeMap<String, FileEntry>,
    /// Regular files whose content could not be read.
    #[serde(default)]
    pub unreadable: usize,
    /// What the listing leaves out.
    #[serde(default)]
    pub not_listed: Vec<String>,
}

#[derive(Debug, Error)]
pub enum ListingError {
    #[error("cannot list the machine's files: {0}")]
    Remote(String),
    #[error("the machine's file listing is malformed: {0}")]
    Malformed(String),
    #[error("cannot keep the machine's file listing in {path}: {source}")]
    Local {
        path: String,
        source: std::io::Error,
    },
}

const MARK_META: &str = "imgbuild-listing-meta";
const MARK_SUMS: &str = "imgbuild-listing-sums";
const MARK_END: &str = "imgbuild-listing-end";

/// The guest script, to run as root. It prints the listing base64-encoded
/// between marker lines: `meta` (three NUL-terminated fields per path:
/// `device kind mode uid gid size mtime`, link target, path), then `sums`
/// (`sha256sum -z` records). Printed rather than downloaded, so that it can
/// run in one root shell with the QEMU builder's cleanup and shutdown, after
/// which the login user can no longer become root. Its failure does not stop
/// what follows it.
pub fn script() -> String {
    let prune = NOT_LISTED
        .iter()
        .map(|path| format!("-path {path}"))
        .collect::<Vec<_>>()
        .join(" -o ");
    format!(
        "( command -v find >/dev/null && command -v sha256sum >/dev/null && command -v base64 >/dev/null && \
         d=$(mktemp -d /tmp/imgbuild-listing.XXXXXX) && cd / && \
         {{ find / -xdev \\( {prune} \\) -prune -o -printf '%D %y %m %U %G %s %T@\\0%l\\0%p\\0' > \"$d/meta\"; true; }} && \
         {{ find / -xdev \\( {prune} \\) -prune -o -type f -print0 | xargs -0 -r sha256sum -z > \"$d/sums\" 2>/dev/null; true; }} && \
         echo {MARK_META} && base64 < \"$d/meta\" && echo {MARK_SUMS} && base64 < \"$d/sums\" && echo {MARK_END}; \
         rm -rf \"$d\" ) || true"
    )
}

/// Runs `command` as root: directly when the login user is root, through
/// `sudo -n` otherwise.
fn as_root(command: &str) -> String {
    let body = shell_quote(command);
    format!("if [ \"$(id -u)\" = 0 ]; then sh -c {body}; else sudo -n sh -c {body}; fi")
}

/// Takes the output of a command that ran `script()`: collects its
/// standard output, passes its errors to the build log.
pub struct ListingOutput<'a> {
    errors: LogLines<'a>,
}

impl<'a> ListingOutput<'a> {
    pub fn new(log: &'a imgbuild_core::BuildLog) -> Self {
        ListingOutput {
            errors: LogLines(log),
        }
    }

    /// Runs `command` (which runs `script()`) on `comm`, then decodes the
    /// listing, leaves out `also_skipped`, and writes it, as JSON, to
    /// `to`. Returns how many paths it holds. A command that ends the
    /// connection (a shutdown after the listing) is no error.
    pub async fn run(
        &self,
        comm: &dyn Communicator,
        command: &str,
        to: &Path,
        also_skipped: &[&str],
    ) -> Result<usize, ListingError> {
        let output = StdoutLines::new(Some(&self.errors));
        match comm.exec(command, &output).await {
            Ok(_) | Err(CommError::Disconnected { .. }) => {}
            Err(err) => return Err(ListingError::Remote(err.to_string())),
        }
        finish(&output.into_lines(), to, also_skipped)
    }
}

/// Decodes the listing in `lines`, leaves out `also_skipped`, and writes
/// it, as JSON, to `to`. Returns how many paths it holds.
fn finish(lines: &[String], to: &Path, also_skipped: &[&str]) -> Result<usize, ListingError> {
    let lines: Vec<String> = lines
        .iter()
        .map(|line| line.trim_end().to_owned())
        .collect();
    let mut listing = decode(&lines)?;
    for path in also_skipped {
        listing.files.remove(*path);
    }
    listing.not_listed = NOT_LISTED
        .iter()
        .chain(also_skipped)
        .map(|path| (*path).to_owned())
        .chain(std::iter::once("other file systems".to_owned()))
        .collect();
    let json = serde_json::to_vec(&listing).expect("listings serialize");
    imgbuild_core::fsutil::write_atomic(to, &json).map_err(|source| ListingError::Local {
        path: to.display().to_string(),
        source,
    })?;
    Ok(listing.files.len())
}

/// The listing between the markers in `lines`; other lines (a shutdown
/// command's output) are passed over.
fn decode(lines: &[String]) -> Result<FileListing, ListingError> {
    use base64::Engine as _;
    let position = |mark: &str| lines.iter().position(|line| line == mark);
    let (Some(meta), Some(sums), Some(end)) =
        (position(MARK_META), position(MARK_SUMS), position(MARK_END))
    else {
        return Err(ListingError::Remote(
            "the listing command printed no complete listing (it needs GNU find, sha256sum and base64, and root or passwordless sudo)".into(),
        ));
    };
    if !(meta < sums && sums < end) {
        return Err(ListingError::Malformed("its parts are out of order".into()));
    }
    let part = |from: usize, to: usize| {
        base64::engine::general_purpose::STANDARD
            .decode(lines[from + 1..to].concat())
            .map_err(|err| ListingError::Malformed(format!("bad base64: {err}")))
    };
    parse(&part(meta, sums)?, &part(sums, end)?)
}

/// Lists the machine's files, but for the files `also_skipped`, and writes
/// the listing, as JSON, to `to`. Returns how many paths it holds.
pub async fn take(
    comm: &dyn Communicator,
    to: &Path,
    also_skipped: &[&str],
    log: &imgbuild_core::BuildLog,
) -> Result<usize, ListingError> {
    ListingOutput::new(log)
        .run(comm, &as_root(&script()), to, also_skipped)
        .await
}

/// Lists the machine's files after provisioning, for a builder with
/// nothing to undo in the machine before its snapshot (the QEMU builder
/// lists from its shutdown step instead, after removing the build key).
///
/// Uses `state.communicator()`. Produces the listing file `to`.
pub struct StepListFiles {
    to: PathBuf,
    also_skipped: &'static [&'static str],
}

impl StepListFiles {
    /// The step for `request`, when it asks for a listing. `also_skipped`
    /// are files the machine has that its image does not keep.
    pub fn for_request<S: HasCommunicator + Send>(
        request: &crate::BuildRequest,
        also_skipped: &'static [&'static str],
    ) -> Option<Box<dyn Step<S>>> {
        let to = request.list_files.clone()?;
        Some(Box::new(StepListFiles { to, also_skipped }))
    }
}

#[async_trait]
impl<S: HasCommunicator + Send> Step<S> for StepListFiles {
    fn name(&self) -> &'static str {
        "list-files"
    }

    async fn run(&mut self, state: &mut S, cx: &StepContext) -> Result<(), StepError> {
        let comm = state
            .communicator()
            .ok_or_else(|| StepError::failed("no machine ran, so its files cannot be listed"))?;
        take_logged(comm.as_ref(), &self.to, self.also_skipped, &cx.log).await
    }
}

/// `take`, with the progress and result said in the build log.
pub async fn take_logged(
    comm: &dyn Communicator,
    to: &Path,
    also_skipped: &[&str],
    log: &imgbuild_core::BuildLog,
) -> Result<(), StepError> {
    log.info("listing the machine's files and their hashes, to compare with the other build");
    let listed = take(comm, to, also_skipped, log)
        .await
        .map_err(|err| StepError::failed(err.to_string()))?;
    log.info(format!("listed {listed} paths"));
    Ok(())
}

/// Reads the listing written by `take`.
pub fn read(path: &Path) -> Result<FileListing, ListingError> {
    let bytes = std::fs::read(path).map_err(|source| ListingError::Local {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|err| ListingError::Malformed(err.to_string()))
}

/// Parses the guest script's two files. Paths on another device than `/`
/// (bind mounts, other file systems' mount points) are left out.
pub fn parse(meta: &[u8], sums: &[u8]) -> Result<FileListing, ListingError> {
    let mut hashes = BTreeMap::new();
    for record in sums.split(|b| *b == 0).filter(|r| !r.is_empty()) {
        let record = String::from_utf8_lossy(record);
        // `<64 hex><space><space or *><path>`
        let (hash, rest) = record.split_at_checked(64).ok_or_else(|| {
            ListingError::Malformed(format!("a checksum line is too short: {record:?}"))
        })?;
        let path = rest.get(2..).unwrap_or_default();
        if !hash.bytes().all(|b| b.is_ascii_hexdigit()) || path.is_empty() {
            return Err(ListingError::Malformed(format!(
                "not a checksum line: {record:?}"
            )));
        }
        hashes.insert(path.to_owned(), hash.to_owned());
    }
    let fields: Vec<&[u8]> = meta.split(|b| *b == 0).collect();
    // A complete listing ends with a NUL, which leaves one empty field.
    if fields.last().is_none_or(|last| !last.is_empty()) || fields.len() % 3 != 1 {
        return Err(ListingError::Malformed(
            "the listing was cut short (its records are incomplete)".into(),
        ));
    }
    let mut listing = FileListing::default();
    let mut root_device = None;
    for record in fields[..fields.len() - 1].chunks(3) {
        let stat = String::from_utf8_lossy(record[0]);
        let target = String::from_utf8_lossy(record[1]).into_owned();
        let path = String::from_utf8_lossy(record[2]).into_owned();
        let parts: Vec<&str> = stat.split(' ').collect();
        let [device, kind, mode, uid, gid, size, mtime] = parts[..] else {
            return Err(ListingError::Malformed(format!(
                "`{stat}` for {path:?} is not `device kind mode uid gid size mtime`"
            )));
        };
        let number = |text: &str| -> Result<u64, ListingError> {
            text.parse().map_err(|_| {
                ListingError::Malformed(format!("`{text}` for {path:?} is not a number"))
            })
        };
        if path == "/" {
            root_device = Some(device.to_owned());
        }
        if root_device.as_deref().is_some_and(|root| root != device) {
            continue;
        }
        let sha256 = if kind == "f" {
            let hash = hashes.get(&path).cloned();
            if hash.is_none() {
                listing.unreadable += 1;
            }
            hash
        } else {
            None
        };
        listing.files.insert(
            path.clone(),
            FileEntry {
                kind: kind.to_owned(),
                mode: mode.to_owned(),
                uid: number(uid)? as u32,
                gid: number(gid)? as u32,
                size: number(size)?,
                mtime: mtime.to_owned(),
                sha256,
                target: (kind == "l").then_some(target),
            },
        );
    }
    if root_device.is_none() {
        return Err(ListingError::Malformed("`/` itself is not listed".into()));
    }
    Ok(listing)
}

/// One path the two listings disagree on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDifference {
    pub path: String,
    /// What differs: "only in the first build", "content", "mode 644 → 600", ...
    pub differs: Vec<String>,
}

/// Two listings side by side.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListingComparison {
    /// Paths in either listing.
    pub compared: usize,
    /// Paths that differ in more than their modification time.
    pub differing: usize,
    /// Paths equal but for their modification time.
    pub timestamps_only: usize,
    /// The first `MAX_NAMED_DIFFERENCES` differing paths, in path order.
    pub differences: Vec<FileDifference>,
    /// Up to `MAX_NAMED_DIFFERENCES` of the paths whose time alone differs.
    pub timestamp_examples: Vec<String>,
}

impl ListingComparison {
    pub fn identical(&self) -> bool {
        self.differing == 0
    }
}

/// What differs between `first` and `second`. A directory's size is not
/// compared: it depends on the history of its entries, not on them.
pub fn compare(first: &FileListing, second: &FileListing) -> ListingComparison {
    let mut comparison = ListingComparison::default();
    let mut paths: Vec<&String> = first.files.keys().chain(second.files.keys()).collect();
    paths.sort();
    paths.dedup();
    comparison.compared = paths.len();
    for path in paths {
        let differs = match (first.files.get(path), second.files.get(path)) {
            (Some(_), None) => vec!["only in the first build".to_owned()],
            (None, Some(_)) => vec!["only in the second build".to_owned()],
            (Some(a), Some(b)) => entry_differences(a, b),
            (None, None) => unreachable!("the path comes from one of the listings"),
        };
        if !differs.is_empty() {
            comparison.differing += 1;
            if comparison.differences.len() < MAX_NAMED_DIFFERENCES {
                comparison.differences.push(FileDifference {
                    path: path.clone(),
                    differs,
                });
            }
        } else if first.files[path].mtime != second.files[path].mtime {
            comparison.timestamps_only += 1;
            if comparison.timestamp_examples.len() < MAX_NAMED_DIFFERENCES {
                comparison.timestamp_examples.push(path.clone());
            }
        }
    }
    comparison
}

fn entry_differences(a: &FileEntry, b: &FileEntry) -> Vec<String> {
    let mut differs = Vec::new();
    if a.kind != b.kind {
        differs.push(format!("type {} → {}", a.kind, b.kind));
        return differs;
    }
    if a.sha256 != b.sha256 || (a.kind == "f" && a.sha256.is_none()) {
        differs.push("content".to_owned());
    } else if a.kind != "d" && a.size != b.size {
        differs.push(format!("size {} → {}", a.size, b.size));
    }
    if a.target != b.target {
        differs.push("link target".to_owned());
    }
    if a.mode != b.mode {
        differs.push(format!("mode {} → {}", a.mode, b.mode));
    }
    if (a.uid, a.gid) != (b.uid, b.gid) {
        differs.push(format!("owner {}:{} → {}:{}", a.uid, a.gid, b.uid, b.gid));
    }
    differs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(records: &[(&str, &str, &str)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (stat, target, path) in records {
            for field in [stat, target, path] {
                bytes.extend_from_slice(field.as_bytes());
                bytes.push(0);
            }
        }
        bytes
    }

    const HASH_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const HASH_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn sums(lines: &[(&str, &str)]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for (hash, path) in lines {
            bytes.extend_from_slice(format!("{hash}  {path}").as_bytes());
            bytes.push(0);
        }
        bytes
    }

    fn listing(etc_hash: &str, mode: &str, mtime: &str) -> FileListing {
        parse(
            &meta(&[
                ("2049 d 755 0 0 4096 1.0", "", "/"),
                ("2049 d 755 0 0 4096 1.0", "", "/etc"),
                (&format!("2049 f {mode} 0 0 5 {mtime}"), "", "/etc/motd"),
                ("2049 l 777 0 0 7 1.0", "usr/bin", "/bin"),
            ]),
            &sums(&[(etc_hash, "/etc/motd")]),
        )
        .unwrap()
    }

    #[test]
    fn parses_paths_with_spaces_and_newlines_and_skips_other_devices() {
        let parsed = parse(
            &meta(&[
                ("2049 d 755 0 0 4096 1.5", "", "/"),
                ("2049 f 644 1000 1000 3 2.25", "", "/home/a b\nc"),
                ("77 f 644 0 0 12 3.0", "", "/etc/hosts"),
                ("2049 l 777 0 0 7 1.0", "usr/lib", "/lib"),
            ]),
            &sums(&[(HASH_A, "/home/a b\nc")]),
        )
        .unwrap();
        assert_eq!(
            parsed.files.keys().collect::<Vec<_>>(),
            ["/", "/home/a b\nc", "/lib"]
        );
        let file = &parsed.files["/home/a b\nc"];
        assert_eq!(file.sha256.as_deref(), Some(HASH_A));
        assert_eq!((file.uid, file.mode.as_str()), (1000, "644"));
        assert_eq!(parsed.files["/lib"].target.as_deref(), Some("usr/lib"));
        assert_eq!(parsed.unreadable, 0);
    }

    #[test]
    fn a_cut_or_garbled_listing_is_refused() {
        let whole = meta(&[("2049 d 755 0 0 4096 1.5", "", "/")]);
        assert!(parse(&whole[..whole.len() - 1], b"").is_err());
        assert!(parse(&meta(&[("2049 d 755 0 0", "", "/")]), b"").is_err());
        assert!(parse(&whole, b"short  /x\0").is_err());
        // Without `/` the device filter has nothing to go by.
        assert!(parse(&meta(&[("2049 f 644 0 0 1 1.0", "", "/a")]), b"").is_err());
    }

    #[test]
    fn a_file_without_a_hash_is_unreadable_and_never_equal() {
        let parsed = parse(
            &meta(&[
                ("2049 d 755 0 0 4096 1.5", "", "/"),
                ("2049 f 600 0 0 3 1.5", "", "/etc/shadow"),
            ]),
            b"",
        )
        .unwrap();
        assert_eq!(parsed.unreadable, 1);
        assert_eq!(compare(&parsed, &parsed).differing, 1);
    }

    #[test]
    fn equal_listings_are_identical_and_times_alone_are_counted_apart() {
        let first = listing(HASH_A, "644", "10.0");
        assert!(compare(&first, &first.clone()).identical());
        let later = listing(HASH_A, "644", "20.0");
        let comparison = compare(&first, &later);
        assert!(comparison.identical());
        assert_eq!(comparison.timestamps_only, 1);
        assert_eq!(comparison.timestamp_examples, ["/etc/motd"]);
    }

    #[test]
    fn content_mode_and_presence_differences_are_named() {
        let first = listing(HASH_A, "644", "10.0");
        let mut second = listing(HASH_B, "600", "10.0");
        second.files.remove("/bin");
        let comparison = compare(&first, &second);
        assert!(!comparison.identical());
        assert_eq!(comparison.compared, 4);
        assert_eq!(comparison.differing, 2);
        assert_eq!(
            comparison.differences,
            [
                FileDifference {
                    path: "/bin".into(),
                    differs: vec!["only in the first build".into()],
                },
                FileDifference {
                    path: "/etc/motd".into(),
                    differs: vec!["content".into(), "mode 644 → 600".into()],
                },
            ]
        );
    }

    #[test]
    fn the_script_prunes_the_volatile_directories_and_runs_as_root() {
        let command = as_root(&script());
        for path in NOT_LISTED {
            assert!(command.contains(&format!("-path {path}")), "{command}");
        }
        assert!(command.contains("sudo -n sh -c"), "{command}");
    }
}
