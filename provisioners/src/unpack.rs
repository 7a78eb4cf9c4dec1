//! Unpacking an archive that a machine under build produced.
//!
//! The machine is not trusted: its `tar -c` (or the Docker Engine's archive
//! of its filesystem) can send any entry it likes. Everything is unpacked
//! into a private staging directory beside the destination first, where
//! this process alone writes and so knows every path it created; only when
//! the whole archive was accepted is it moved into place with renames.
//!
//! Inside the staging directory an entry is placed only below directories
//! this archive created (never through a symlink), hard links only point at
//! files this archive already delivered, and nothing but regular files,
//! directories and links is created. Moving into place merges into existing
//! directories without following any symlink below the destination the
//! user named; that destination itself is theirs and may be a symlink.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};
use thiserror::Error;

/// Only permission bits survive: a machine must not be able to plant a
/// setuid or setgid program on the host that runs the build.
const PERMISSION_BITS: u32 = 0o777;

const STAGING_PREFIX: &str = ".imgbuild-download-";

#[derive(Debug, Error)]
pub enum UnpackError {
    #[error("refusing archive entry `{entry}` from the machine: {reason}; nothing was downloaded")]
    Refused { entry: String, reason: String },
    #[error("cannot place the download at {}: {reason}; nothing was downloaded", .path.display())]
    Conflict { path: PathBuf, reason: String },
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The archive itself could not be read (a broken stream or header).
    #[error("reading the downloaded archive: {0}")]
    Archive(#[source] io::Error),
}

impl UnpackError {
    /// Whether the machine's archive was refused, rather than the transfer
    /// or the local disk failing.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            UnpackError::Refused { .. } | UnpackError::Conflict { .. }
        )
    }
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A path relative to the staged root, as normal components.
type Key = Vec<OsString>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Staged {
    Dir,
    File,
    Symlink,
}

/// Where the staged root goes once the archive is accepted.
enum Target {
    /// Entries are placed inside this directory as they are named.
    Inside(PathBuf),
    /// The archive's top-level entry becomes this path.
    Renamed(PathBuf),
}

pub struct Unpacker {
    staging: tempfile::TempDir,
    /// `staging/root`: stands for the destination directory (`Inside`) or
    /// for the renamed top-level entry (`Renamed`).
    root: PathBuf,
    target: Target,
    staged: HashMap<Key, Staged>,
    /// Directory modes, applied once everything is in place: a read-only
    /// directory must not stop its own entries from being written.
    dir_modes: HashMap<Key, u32>,
    bytes: u64,
}

impl Unpacker {
    /// Prepares to unpack entries inside `dest_dir`, or, with `rename_root`,
    /// the top-level entry as that path.
    pub fn new(dest_dir: &Path, rename_root: Option<&Path>) -> Result<Unpacker, UnpackError> {
        let target = match rename_root {
            Some(root) => Target::Renamed(root.to_path_buf()),
            None => Target::Inside(dest_dir.to_path_buf()),
        };
        // Beside where the entries end up, so that moving them there is a
        // rename on one filesystem (which also keeps hard links linked).
        let staging_parent = match &target {
            Target::Inside(dir) => dir.clone(),
            Target::Renamed(root) if fs::metadata(root).is_ok_and(|m| m.is_dir()) => root.clone(),
            Target::Renamed(root) => imgbuild_core::fsutil::parent_dir(root).to_path_buf(),
        };
        let staging = tempfile::Builder::new()
            .prefix(STAGING_PREFIX)
            .tempdir_in(&staging_parent)
            .map_err(io_error(
                "cannot create a staging directory for the download in",
                &staging_parent,
            ))?;
        let root = staging.path().join("root");
        let mut unpacker = Unpacker {
            staging,
            root,
            target,
            staged: HashMap::new(),
            dir_modes: HashMap::new(),
            bytes: 0,
        };
        if let Target::Inside(_) = unpacker.target {
            fs::create_dir(&unpacker.root).map_err(io_error("cannot create", &unpacker.root))?;
            unpacker.staged.insert(Key::new(), Staged::Dir);
        }
        Ok(unpacker)
    }

    /// Stages one entry, or refuses it.
    pub fn add<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let name = entry.path().map_err(UnpackError::Archive)?.into_owned();
        let shown = show(&name);
        let refuse = |reason: String| UnpackError::Refused {
            entry: shown.clone(),
            reason,
        };
        let components = normal_components(&name).map_err(refuse)?;
        let key = self.key_of(&components);
        let header = entry.header();
        let kind = header.entry_type();
        let mode = header.mode().ok();
        let mtime = header.mtime().ok();
        // Old (pre-POSIX) tar marks directories only with a trailing slash.
        let old_style_dir = header.as_ustar().is_none()
            && header.as_gnu().is_none()
            && entry.path_bytes().ends_with(b"/");
        self.bytes += header.size().unwrap_or(0);
        use tar::EntryType as T;
        match kind {
            // Global pax headers only carry metadata for what follows.
            T::XGlobalHeader => Ok(()),
            T::Directory => self.add_dir(key, &components, mode, &shown),
            T::Regular | T::Continuous | T::GNUSparse if old_style_dir => {
                self.add_dir(key, &components, mode, &shown)
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                self.add_file(key, &components, entry, mode, mtime, &shown)
            }
            T::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Archive)?
                    .filter(|target| !target.as_os_str().is_empty())
                    .ok_or_else(|| refuse("it is a symlink to nothing".into()))?
                    .into_owned();
                self.add_symlink(key, &components, &target, mtime, &shown)
            }
            T::Link => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Archive)?
                    .ok_or_else(|| refuse("it is a hard link to nothing".into()))?
                    .into_owned();
                self.add_hard_link(key, &components, &target, &shown)
            }
            other => Err(refuse(format!(
                "it is {}, and downloads only take regular files, directories and links",
                describe_kind(other)
            ))),
        }
    }

    /// Moves the accepted archive into place and returns the bytes of
    /// payload it held.
    pub fn finish(self) -> Result<u64, UnpackError> {
        let (destination, skip) = match &self.target {
            Target::Inside(dir) => (dir.clone(), self.staging_name(dir)),
            Target::Renamed(root) => (root.clone(), self.staging_name(root)),
        };
        if fs::symlink_metadata(&self.root).is_err() {
            return Ok(self.bytes); // an empty archive
        }
        let mut moves = Vec::new();
        self.plan(&self.root, &destination, true, skip.as_deref(), &mut moves)?;
        for step in &moves {
            if step.replace {
                fs::remove_file(&step.to).map_err(io_error("cannot replace", &step.to))?;
            }
            fs::rename(&step.from, &step.to).map_err(io_error("cannot move into", &step.to))?;
        }
        let mut modes: Vec<_> = self.dir_modes.iter().collect();
        // Deepest first, so that a directory losing its write bit comes last.
        modes.sort_by_key(|(key, _)| std::cmp::Reverse(key.len()));
        for (key, mode) in modes {
            if key.is_empty() && matches!(self.target, Target::Inside(_)) {
                continue; // the user's own directory keeps its mode
            }
            let path = key.iter().fold(destination.clone(), |p, part| p.join(part));
            if key.is_empty() {
                // The destination the user named, maybe through a symlink.
                fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
                    .map_err(io_error("cannot set the mode of", &path))?;
            } else {
                set_dir_mode(&path, *mode)?;
            }
        }
        // Whatever is left is empty directories that were merged; failing to
        // remove them leaves a hidden, empty leftover, not a wrong download.
        let _ = self.staging.close();
        Ok(self.bytes)
    }

    /// The staging directory's name when it sits inside `dir`, so that an
    /// entry of the same name is not merged into it.
    fn staging_name(&self, dir: &Path) -> Option<OsString> {
        let parent = self.staging.path().parent()?;
        (parent == dir)
            .then(|| self.staging.path().file_name().map(OsStr::to_os_string))
            .flatten()
    }

    fn key_of(&self, components: &[OsString]) -> Key {
        match self.target {
            // Every top-level name becomes the renamed root, as before.
            Target::Renamed(_) => components.iter().skip(1).cloned().collect(),
            Target::Inside(_) => components.to_vec(),
        }
    }

    /// How the archive names the directory that `key[..depth]` stands for.
    fn archive_name(&self, components: &[OsString], depth: usize) -> String {
        let offset = usize::from(matches!(self.target, Target::Renamed(_)));
        let parts = &components[..(depth + offset).min(components.len())];
        show(&parts.iter().collect::<PathBuf>())
    }

    fn staged_path(&self, key: &[OsString]) -> PathBuf {
        key.iter().fold(self.root.clone(), |p, part| p.join(part))
    }

    /// Makes sure every parent of `key` is a directory this archive has
    /// (creating missing ones), and clears `key` for a new entry of kind
    /// `new`. Returns whether a directory is already there.
    fn prepare(
        &mut self,
        key: &[OsString],
        components: &[OsString],
        new: Staged,
        shown: &str,
    ) -> Result<bool, UnpackError> {
        let refuse = |reason: String| UnpackError::Refused {
            entry: shown.to_owned(),
            reason,
        };
        for depth in 0..key.len() {
            let parent = &key[..depth];
            match self.staged.get(parent) {
                Some(Staged::Dir) => {}
                Some(Staged::Symlink) => {
                    return Err(refuse(format!(
                        "its parent `{}` is a symlink",
                        self.archive_name(components, depth)
                    )));
                }
                Some(Staged::File) => {
                    return Err(refuse(format!(
                        "its parent `{}` is not a directory",
                        self.archive_name(components, depth)
                    )));
                }
                None => {
                    // Archives need not list every directory.
                    let path = self.staged_path(parent);
                    fs::create_dir(&path).map_err(io_error("cannot create", &path))?;
                    self.staged.insert(parent.to_vec(), Staged::Dir);
                }
            }
        }
        match self.staged.get(key) {
            None => Ok(false),
            Some(Staged::Dir) if new == Staged::Dir => Ok(true),
            Some(Staged::Dir) if key.is_empty() => Err(refuse(
                "only a directory can stand for the destination directory".into(),
            )),
            Some(Staged::Dir) => Err(refuse(
                "it would replace a directory the archive already holds".into(),
            )),
            // A later entry of the same name wins, as with tar.
            Some(_) => {
                let path = self.staged_path(key);
                fs::remove_file(&path).map_err(io_error("cannot replace", &path))?;
                self.staged.remove(key);
                Ok(false)
            }
        }
    }

    fn add_dir(
        &mut self,
        key: Key,
        components: &[OsString],
        mode: Option<u32>,
        shown: &str,
    ) -> Result<(), UnpackError> {
        if !self.prepare(&key, components, Staged::Dir, shown)? {
            let path = self.staged_path(&key);
            fs::create_dir(&path).map_err(io_error("cannot create", &path))?;
            self.staged.insert(key.clone(), Staged::Dir);
        }
        self.dir_modes
            .insert(key, mode.unwrap_or(0o755) & PERMISSION_BITS);
        Ok(())
    }

    fn add_file<R: Read>(
        &mut self,
        key: Key,
        components: &[OsString],
        data: &mut R,
        mode: Option<u32>,
        mtime: Option<u64>,
        shown: &str,
    ) -> Result<(), UnpackError> {
        self.prepare(&key, components, Staged::File, shown)?;
        let path = self.staged_path(&key);
        // create_new never opens an existing file or follows a symlink.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_error("cannot create", &path))?;
        self.staged.insert(key, Staged::File);
        io::copy(data, &mut file).map_err(|source| match source.kind() {
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => UnpackError::Io {
                what: "cannot write",
                path: path.clone(),
                source,
            },
            _ => UnpackError::Archive(source),
        })?;
        let mode = mode.unwrap_or(0o644) & PERMISSION_BITS;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_error("cannot set the mode of", &path))?;
        if let Some(mtime) = mtime.map(archive_time) {
            file.set_times(fs::FileTimes::new().set_accessed(mtime).set_modified(mtime))
                .map_err(io_error("cannot set the times of", &path))?;
        }
        Ok(())
    }

    fn add_symlink(
        &mut self,
        key: Key,
        components: &[OsString],
        target: &Path,
        mtime: Option<u64>,
        shown: &str,
    ) -> Result<(), UnpackError> {
        self.prepare(&key, components, Staged::Symlink, shown)?;
        let path = self.staged_path(&key);
        std::os::unix::fs::symlink(target, &path).map_err(io_error("cannot create", &path))?;
        self.staged.insert(key, Staged::Symlink);
        if let Some(mtime) = mtime {
            let mtime = filetime::FileTime::from_system_time(archive_time(mtime));
            filetime::set_symlink_file_times(&path, mtime, mtime)
                .map_err(io_error("cannot set the times of", &path))?;
        }
        Ok(())
    }

    fn add_hard_link(
        &mut self,
        key: Key,
        components: &[OsString],
        target: &Path,
        shown: &str,
    ) -> Result<(), UnpackError> {
        let refuse = |reason: String| UnpackError::Refused {
            entry: shown.to_owned(),
            reason,
        };
        let target_shown = show(target);
        let target_components = normal_components(target).map_err(|reason| {
            refuse(format!(
                "it is a hard link to `{target_shown}`, which {reason}"
            ))
        })?;
        let target_key = self.key_of(&target_components);
        if target_key == key {
            return Err(refuse("it is a hard link to itself".into()));
        }
        if self.staged.get(&target_key) != Some(&Staged::File) {
            return Err(refuse(format!(
                "it is a hard link to `{target_shown}`, which is not a regular file \
                 earlier in the same archive"
            )));
        }
        self.prepare(&key, components, Staged::File, shown)?;
        let (from, to) = (self.staged_path(&target_key), self.staged_path(&key));
        fs::hard_link(&from, &to).map_err(io_error("cannot create", &to))?;
        self.staged.insert(key, Staged::File);
        Ok(())
    }

    /// Lists the renames that put `staged` at `destination`, or refuses
    /// before anything is moved. Only the destination the user named is
    /// followed if it is a symlink (`follow`).
    fn plan(
        &self,
        staged: &Path,
        destination: &Path,
        follow: bool,
        skip: Option<&OsStr>,
        moves: &mut Vec<Move>,
    ) -> Result<(), UnpackError> {
        let staged_is_dir = fs::symlink_metadata(staged)
            .map_err(io_error("cannot read", staged))?
            .is_dir();
        let existing = if follow {
            fs::metadata(destination)
        } else {
            fs::symlink_metadata(destination)
        };
        let existing = match existing {
            Ok(existing) => existing,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                // (A dangling symlink the user named is replaced.)
                let replace = follow && fs::symlink_metadata(destination).is_ok();
                moves.push(Move::new(staged, destination, replace));
                return Ok(());
            }
            Err(err) => return Err(io_error("cannot read", destination)(err)),
        };
        match (existing.is_dir(), staged_is_dir) {
            (true, true) => {
                let mut children: Vec<OsString> = fs::read_dir(staged)
                    .map_err(io_error("cannot read", staged))?
                    .map(|child| child.map(|c| c.file_name()))
                    .collect::<Result<_, _>>()
                    .map_err(io_error("cannot read", staged))?;
                children.sort();
                for name in children {
                    if skip == Some(name.as_os_str()) {
                        return Err(UnpackError::Conflict {
                            path: destination.join(&name),
                            reason: "the machine sent an entry named like the staging directory"
                                .into(),
                        });
                    }
                    self.plan(
                        &staged.join(&name),
                        &destination.join(&name),
                        false,
                        None,
                        moves,
                    )?;
                }
                Ok(())
            }
            (true, false) => Err(UnpackError::Conflict {
                path: destination.to_path_buf(),
                reason: "it is a directory here, and the machine sent a file of that name; \
                         remove the directory or download elsewhere"
                    .into(),
            }),
            // A file or symlink in the way is replaced, never written
            // through: a directory needs it gone first; anything else is
            // swapped for it atomically by the rename.
            (false, staged_is_dir) => {
                moves.push(Move::new(staged, destination, staged_is_dir));
                Ok(())
            }
        }
    }
}

struct Move {
    from: PathBuf,
    to: PathBuf,
    /// Remove what is at `to` first (rename cannot replace it by a directory).
    replace: bool,
}

impl Move {
    fn new(from: &Path, to: &Path, replace: bool) -> Move {
        Move {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            replace,
        }
    }
}

/// Sets a directory's mode without following a symlink to it.
fn set_dir_mode(path: &Path, mode: u32) -> Result<(), UnpackError> {
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_error("cannot open", path))?;
    dir.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_error("cannot set the mode of", path))
}

/// The normal components of an archive path, or why it is refused.
fn normal_components(path: &Path) -> Result<Vec<OsString>, String> {
    let mut components = Vec::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => components.push(part.to_os_string()),
            Component::CurDir => {}
            Component::ParentDir => return Err("it climbs out of the destination with `..`".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("it is an absolute path".into());
            }
        }
    }
    Ok(components)
}

/// A time from an archive header. Zero becomes one second, as the tar crate
/// did, since some tools take a zero mtime for "unknown".
/// An entry's mtime as a time this system can hold: the machine writes the
/// header, and a date past what `SystemTime` reaches (a GNU header holds up
/// to 2^64 seconds) becomes the latest date a file system stores.
fn archive_time(seconds: u64) -> SystemTime {
    const LATEST: u64 = i64::MAX as u64 / 1_000_000_000;
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_secs(seconds.clamp(1, LATEST)))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn describe_kind(kind: tar::EntryType) -> String {
    use tar::EntryType as T;
    match kind {
        T::Char => "a character device".into(),
        T::Block => "a block device".into(),
        T::Fifo => "a FIFO".into(),
        other => format!("of an unsupported type ({:?})", other.as_byte() as char),
    }
}

/// A name from the machine, fit for a log line: control characters (which
/// could rewrite the terminal) are escaped.
fn show(path: &Path) -> String {
    path.to_string_lossy()
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_paths_must_stay_relative() {
        assert_eq!(
            normal_components(Path::new("./a//b/")).unwrap(),
            [OsString::from("a"), OsString::from("b")]
        );
        assert!(normal_components(Path::new("./")).unwrap().is_empty());
        assert!(normal_components(Path::new("a/../../etc")).is_err());
        assert!(normal_components(Path::new("/etc/passwd")).is_err());
    }

    fn unpack_into(dest: &Path, entries: &[(&str, &str)]) -> Result<u64, UnpackError> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, content) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_mode(0o644);
            header.set_size(content.len() as u64);
            builder
                .append_data(&mut header, name, content.as_bytes())
                .unwrap();
        }
        let bytes = builder.into_inner().unwrap();
        let mut unpacker = Unpacker::new(dest, None)?;
        for entry in tar::Archive::new(bytes.as_slice()).entries().unwrap() {
            unpacker.add(&mut entry.unwrap())?;
        }
        unpacker.finish()
    }

    #[test]
    fn a_file_over_an_existing_directory_moves_nothing() {
        let dest = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dest.path().join("tree/x/inner")).unwrap();
        let err = unpack_into(dest.path(), &[("tree/a", "a"), ("tree/x", "file")]).unwrap_err();
        assert!(matches!(err, UnpackError::Conflict { .. }), "{err}");
        assert!(err.to_string().contains("tree/x"), "{err}");
        let left: Vec<_> = walkdir::WalkDir::new(dest.path())
            .min_depth(1)
            .sort_by_file_name()
            .into_iter()
            .map(|e| {
                e.unwrap()
                    .path()
                    .strip_prefix(dest.path())
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            left,
            [
                Path::new("tree"),
                Path::new("tree/x"),
                Path::new("tree/x/inner")
            ]
        );
    }

    #[test]
    fn names_from_the_machine_cannot_carry_terminal_controls() {
        assert_eq!(show(Path::new("a\u{1b}[2Jb\n")), "a\\u{1b}[2Jb\\n");
    }
}
