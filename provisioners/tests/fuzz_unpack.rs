//! Fuzzing the download unpacker (`transfer::unpack`), which takes a tar
//! stream from the machine under build — an untrusted source — and writes
//! it on the build host. Bolero runs it on the stable toolchain.
//!
//! Archives are generated structurally and written as raw tar headers, so
//! they can say anything a hostile `tar -c` could: names made of `..`, `.`,
//! empty and over-long components or absolute paths (in the header, a GNU
//! long-name entry, a PAX record or the ustar prefix), symlinks and hard
//! links to anywhere (the canary outside the destination, earlier entries),
//! devices, FIFOs, setuid modes, times past the end of time, truncated or
//! corrupted blocks and a stream that fails midway.
//!
//! Each archive is unpacked into `<tmp>/dest`, which already holds symlinks
//! baiting a write outside (`out-link -> ../outside`, an absolute one, one
//! to the canary file, a dangling one), beside a canary tree
//! `<tmp>/outside`. Properties:
//! - no panic, on the calling thread or the unpacking thread;
//! - everything outside `<tmp>/dest` is byte-for-byte as before, and no file
//!   in `dest` shares an inode with one outside (a hard link out);
//! - on success, `dest` holds only directories, regular files and symlinks,
//!   none setuid, setgid or sticky, and no staging directory is left;
//! - on failure, `dest` is exactly as before.
//!
//! `cargo test` runs a short campaign (a few seconds). A long one:
//!
//!   IMGBUILD_FUZZ_SECONDS=600 cargo test --release -p imgbuild-provisioners --test fuzz_unpack
//!
//! A failure prints `BOLERO_RANDOM_SEED=<n>`: setting it replays that input.

use bolero::check;
use bolero::generator::{TypeGenerator, produce};
use imgbuild_provisioners::communicator::ByteStream;
use imgbuild_provisioners::transfer;
use sha2::Digest;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

/// Random archives per `cargo test` run: a few seconds in a debug build.
const DEFAULT_ITERATIONS: usize = 600;

const STAGING_PREFIX: &str = ".imgbuild-download-";

#[derive(Debug, TypeGenerator)]
struct Archive {
    #[generator(produce::<Vec<Entry>>().with().len(0usize..8))]
    entries: Vec<Entry>,
    #[generator(produce::<Vec<Damage>>().with().len(0usize..2))]
    damage: Vec<Damage>,
    /// Whether the archive ends with the two zero blocks.
    terminated: bool,
    /// Whether `damage` applies (one archive in four).
    damaged: u8,
    /// Unpack inside `dest`, or rename the top-level entry to a path there.
    rename: u8,
}

#[derive(Debug, Clone, TypeGenerator)]
struct Entry {
    kind: u8,
    #[generator(produce::<Vec<u8>>().with().len(0usize..5))]
    name: Vec<u8>,
    name_style: u8,
    #[generator(produce::<Vec<u8>>().with().len(0usize..4))]
    link: Vec<u8>,
    link_style: u8,
    format: u8,
    mode: u8,
    mtime: u8,
    size: u8,
}

#[derive(Debug, TypeGenerator)]
enum Damage {
    Truncate {
        at: u16,
    },
    Overwrite {
        at: u16,
        byte: u8,
    },
    /// The stream fails after this many bytes, as a remote tar that dies.
    FailAfter {
        at: u16,
    },
}

/// Path components: mostly plain names and the names of the bait already
/// in `dest` (so archives get accepted and merged), sometimes the dangerous,
/// the odd and the long.
fn component(index: u8) -> String {
    const PLAIN: &[&str] = &[
        "a",
        "b",
        "c",
        "existing",
        "existing-file",
        "out-link",
        "abs-link",
        "canary-link",
        "dangling",
        "outside",
        "é",
        " ",
    ];
    const ODD: &[&str] = &["..", ".", "", "/", "a\nb", "\u{1b}[2J", "-"];
    let index = usize::from(index);
    if index < 192 {
        return PLAIN[index % PLAIN.len()].to_owned();
    }
    match index % (ODD.len() + 2) {
        i if i < ODD.len() => ODD[i].to_owned(),
        i if i == ODD.len() => "l".repeat(101),
        _ => "L".repeat(256),
    }
}

const MODES: &[u32] = &[
    0o644, 0o755, 0o4755, 0o2755, 0o1777, 0o7777, 0o000, 0o777, 0o600, 0o4000,
];
const MTIMES: &[u64] = &[
    0,
    1,
    1_700_000_000,
    0o77_777_777_777,
    u32::MAX as u64,
    i64::MAX as u64,
    u64::MAX,
];
const SIZES: &[usize] = &[0, 1, 6, 511, 512, 513, 3000];

/// Where a generated archive is unpacked, and what is there before.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Scene {
        let dir = tempfile::Builder::new()
            .prefix("imgbuild-fuzz-unpack-")
            .tempdir()
            .expect("a temporary directory");
        let root = dir.path();
        let outside = root.join("outside");
        std::fs::create_dir_all(outside.join("dir")).unwrap();
        std::fs::write(outside.join("canary.txt"), "canary").unwrap();
        std::fs::write(outside.join("dir/inner.txt"), "inner").unwrap();
        std::fs::set_permissions(
            outside.join("canary.txt"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let dest = root.join("dest");
        std::fs::create_dir_all(dest.join("existing")).unwrap();
        std::fs::write(dest.join("existing/file.txt"), "mine").unwrap();
        std::fs::write(dest.join("existing-file"), "mine too").unwrap();
        std::os::unix::fs::symlink("../outside", dest.join("out-link")).unwrap();
        std::os::unix::fs::symlink(&outside, dest.join("abs-link")).unwrap();
        std::os::unix::fs::symlink("../outside/canary.txt", dest.join("canary-link")).unwrap();
        std::os::unix::fs::symlink("../outside/new.txt", dest.join("dangling")).unwrap();
        Scene { dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn dest(&self) -> PathBuf {
        self.root().join("dest")
    }

    fn outside(&self) -> PathBuf {
        self.root().join("outside")
    }
}

/// One entry of a tree listing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        sha256: String,
        inode: (u64, u64),
    },
    Symlink {
        target: PathBuf,
    },
    Other {
        mode: u32,
    },
}

/// Everything below `dir` (not following symlinks), except `skip`.
fn listing(dir: &Path, skip: Option<&Path>) -> BTreeMap<PathBuf, Node> {
    let mut nodes = BTreeMap::new();
    let walk = walkdir::WalkDir::new(dir).follow_links(false).into_iter();
    for entry in walk.filter_entry(|e| Some(e.path()) != skip) {
        let entry = entry.expect("a readable tree");
        let metadata = entry.path().symlink_metadata().expect("readable metadata");
        let mode = metadata.permissions().mode() & 0o7777;
        let kind = metadata.file_type();
        let node = if kind.is_dir() {
            Node::Dir { mode }
        } else if kind.is_file() {
            let content = std::fs::read(entry.path()).expect("a readable file");
            Node::File {
                mode,
                sha256: hex(&sha2::Sha256::digest(&content)),
                inode: (metadata.dev(), metadata.ino()),
            }
        } else if kind.is_symlink() {
            Node::Symlink {
                target: std::fs::read_link(entry.path()).expect("a readable symlink"),
            }
        } else {
            Node::Other { mode }
        };
        let relative = entry.path().strip_prefix(dir).unwrap().to_path_buf();
        nodes.insert(relative, node);
    }
    nodes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn path_bytes(entry_components: &[u8]) -> Vec<u8> {
    let parts: Vec<String> = entry_components.iter().map(|&c| component(c)).collect();
    parts.join("/").into_bytes()
}

impl Archive {
    /// `entries` as a whole, well-formed archive, unpacked without renaming.
    fn intact(entries: Vec<Entry>) -> Archive {
        Archive {
            entries,
            damage: Vec::new(),
            terminated: true,
            damaged: 255,
            rename: 0,
        }
    }

    /// The archive as bytes, and after how many bytes the stream fails.
    fn bytes(&self, scene: &Scene) -> (Vec<u8>, Option<usize>) {
        let mut out = Vec::new();
        let names: Vec<Vec<u8>> = self
            .entries
            .iter()
            .map(|entry| entry.name_bytes())
            .collect();
        for (index, entry) in self.entries.iter().enumerate() {
            entry.write(&mut out, index, &names, scene);
        }
        if self.terminated {
            out.extend_from_slice(&[0; 1024]);
        }
        let mut fail_after = None;
        let damage = if self.damaged < 64 {
            &self.damage[..]
        } else {
            &[]
        };
        for damage in damage {
            match *damage {
                Damage::Truncate { at } => out.truncate(usize::from(at) % (out.len() + 1)),
                Damage::Overwrite { at, byte } => {
                    if !out.is_empty() {
                        let at = usize::from(at) % out.len();
                        out[at] = byte;
                    }
                }
                Damage::FailAfter { at } => {
                    fail_after = Some(usize::from(at) % (out.len() + 1));
                }
            }
        }
        (out, fail_after)
    }

    fn rename_root(&self, scene: &Scene) -> Option<PathBuf> {
        // Only names that are not symlinks: a destination the user names
        // may be a symlink on purpose, and is then followed.
        match self.rename % 4 {
            0 | 1 => None,
            2 => Some(scene.dest().join("new")),
            _ => Some(
                scene
                    .dest()
                    .join(["existing", "existing-file"][usize::from(self.rename / 4) % 2]),
            ),
        }
    }
}

impl Entry {
    fn type_flag(&self) -> u8 {
        // Mostly what downloads hold; now and then anything else.
        const KINDS: &[u8] = b"00000\x005555522211173456SxgLKVMZ";
        KINDS[usize::from(self.kind) % KINDS.len()]
    }

    fn name_bytes(&self) -> Vec<u8> {
        let mut name = path_bytes(&self.name);
        if self.name_style & 0x10 != 0 {
            name.push(b'/');
        }
        if self.name_style & 0xe0 == 0xe0 {
            name.insert(0, b'/');
        }
        name
    }

    fn link_bytes(&self, index: usize, names: &[Vec<u8>], scene: &Scene) -> Vec<u8> {
        match self.link_style % 6 {
            // An earlier (or this, or a later) entry's name: hard links
            // within the archive are allowed.
            0 | 1 if !names.is_empty() => {
                names[(index + usize::from(self.link_style / 6)) % names.len()].clone()
            }
            2 => scene
                .outside()
                .join("canary.txt")
                .into_os_string()
                .into_encoded_bytes(),
            3 => scene.outside().into_os_string().into_encoded_bytes(),
            4 => b"../outside/canary.txt".to_vec(),
            _ => path_bytes(&self.link),
        }
    }

    fn write(&self, out: &mut Vec<u8>, index: usize, names: &[Vec<u8>], scene: &Scene) {
        let name = &names[index];
        let link = self.link_bytes(index, names, scene);
        let flag = self.type_flag();
        let mut header = match self.format % 3 {
            0 => tar::Header::new_gnu(),
            1 => tar::Header::new_ustar(),
            _ => tar::Header::new_old(),
        };
        // How a long name is carried: 0 the name field alone (cut at 100
        // bytes), 1 a GNU long-name entry, 2 a PAX record, 3 the ustar
        // prefix field.
        let style = self.name_style % 4;
        let link_style = (self.link_style / 2) % 3;
        let mut pax = Vec::new();
        if style == 1 {
            write_extension(out, b'L', name);
        } else if style == 2 {
            pax.extend(pax_record("path", name));
        }
        if matches!(flag, b'1' | b'2') {
            if link_style == 1 {
                write_extension(out, b'K', &link);
            } else if link_style == 2 {
                pax.extend(pax_record("linkpath", &link));
            }
        }
        if !pax.is_empty() {
            write_extension(out, b'x', &pax);
        }
        let old = header.as_old_mut();
        let (prefix, short) = match name.iter().rposition(|&b| b == b'/') {
            Some(split) if style == 3 && split > 0 => (&name[..split], &name[split + 1..]),
            _ => (&name[..0], &name[..]),
        };
        copy_field(&mut old.name, short);
        copy_field(&mut old.linkname, &link);
        if let Some(ustar) = header.as_ustar_mut() {
            copy_field(&mut ustar.prefix, prefix);
        }
        header.set_entry_type(tar::EntryType::new(flag));
        header.set_mode(MODES[usize::from(self.mode) % MODES.len()]);
        header.set_mtime(MTIMES[usize::from(self.mtime) % MTIMES.len()]);
        let size = match flag {
            b'0' | b'\0' | b'7' | b'S' | b'x' | b'g' | b'L' | b'K' | b'Z' => {
                SIZES[usize::from(self.size) % SIZES.len()]
            }
            _ => 0,
        };
        header.set_size(size as u64);
        let _ = header.set_device_major(8);
        let _ = header.set_device_minor(1);
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        let data: Vec<u8> = if flag == b'x' || flag == b'g' {
            pax_record("path", b"g/pax")
        } else {
            Vec::new()
        };
        let mut data: Vec<u8> = data
            .into_iter()
            .chain(std::iter::repeat(b'd'))
            .take(size)
            .collect();
        data.resize(size.div_ceil(512) * 512, 0);
        out.extend_from_slice(&data);
    }
}

fn copy_field(field: &mut [u8], value: &[u8]) {
    let len = value.len().min(field.len());
    field[..len].copy_from_slice(&value[..len]);
}

/// A PAX extended-header record: `<length> <key>=<value>\n`, where the
/// length counts itself.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let rest = key.len() + value.len() + 3;
    let mut length = rest + 1;
    while length.to_string().len() + rest != length {
        length += 1;
    }
    let mut record = format!("{length} {key}=").into_bytes();
    record.extend_from_slice(value);
    record.push(b'\n');
    record
}

/// An entry carrying metadata for the next one: GNU long name (`L`) or link
/// (`K`), or a PAX extended header (`x`).
fn write_extension(out: &mut Vec<u8>, flag: u8, data: &[u8]) {
    let mut header = tar::Header::new_gnu();
    copy_field(&mut header.as_old_mut().name, b"././@LongLink");
    header.set_entry_type(tar::EntryType::new(flag));
    header.set_mode(0o644);
    let mut data = data.to_vec();
    if flag != b'x' {
        data.push(0);
    }
    header.set_size(data.len() as u64);
    header.set_cksum();
    out.extend_from_slice(header.as_bytes());
    data.resize(data.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&data);
}

/// Serves the archive, then fails like a remote `tar` that died.
struct Source {
    data: Vec<u8>,
    position: usize,
    fail_after: Option<usize>,
}

impl AsyncRead for Source {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let end = self.fail_after.unwrap_or(self.data.len());
        if self.position >= end {
            if self.fail_after.is_some() {
                return Poll::Ready(Err(std::io::Error::other("the machine's tar died")));
            }
            return Poll::Ready(Ok(()));
        }
        // Small reads, so that entries straddle them.
        let count = buf.remaining().min(end - self.position).min(700);
        let start = self.position;
        buf.put_slice(&self.data[start..start + count]);
        self.position += count;
        Poll::Ready(Ok(()))
    }
}

/// Panics anywhere in the process, including the blocking thread the
/// unpacker runs on (whose panic reaches the caller only as an error).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

#[derive(Default)]
struct Tally {
    unpacked: AtomicUsize,
    refused: AtomicUsize,
}

/// Held while an archive is checked, so that the panic count of one test
/// does not include another's.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn check_archive(runtime: &tokio::runtime::Runtime, archive: &Archive, tally: &Tally) {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let scene = Scene::new();
    let dest = scene.dest();
    let outside_before = listing(scene.root(), Some(&dest));
    let dest_before = listing(&dest, None);
    let (data, fail_after) = archive.bytes(&scene);
    let stream: ByteStream = Box::new(Source {
        data,
        position: 0,
        fail_after,
    });
    let panics_before = PANICS.load(Ordering::SeqCst);
    let result = runtime.block_on(transfer::unpack(
        stream,
        dest.clone(),
        archive.rename_root(&scene),
    ));
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        panics_before,
        "the unpacker panicked (see above); it returned {result:?}"
    );

    let outside_after = listing(scene.root(), Some(&dest));
    assert_eq!(
        outside_after, outside_before,
        "the archive changed files outside the destination (returned {result:?})"
    );
    let outside_inodes: BTreeSet<(u64, u64)> = outside_after
        .values()
        .filter_map(|node| match node {
            Node::File { inode, .. } => Some(*inode),
            _ => None,
        })
        .collect();
    let dest_after = listing(&dest, None);
    for (path, node) in &dest_after {
        if let Node::File { inode, .. } = node {
            assert!(
                !outside_inodes.contains(inode),
                "dest/{} is a hard link to a file outside the destination",
                path.display()
            );
        }
    }
    let leftovers: Vec<_> = dest_after
        .keys()
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with(STAGING_PREFIX))
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "a staging directory was left behind: {leftovers:?} (returned {result:?})"
    );
    match result {
        Ok(_) => {
            tally.unpacked.fetch_add(1, Ordering::Relaxed);
            for (path, node) in &dest_after {
                match node {
                    Node::Dir { mode } | Node::File { mode, .. } => assert_eq!(
                        mode & 0o7000,
                        0,
                        "dest/{} kept a setuid, setgid or sticky bit: {mode:o}",
                        path.display()
                    ),
                    Node::Symlink { .. } => {}
                    Node::Other { .. } => {
                        panic!("dest/{} is a device, FIFO or socket", path.display())
                    }
                }
            }
        }
        Err(err) => {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            assert_eq!(
                dest_after, dest_before,
                "the download failed ({err}) but changed the destination"
            );
        }
    }
}

/// The harness reaches both outcomes: an archive of plain files is
/// unpacked, and one climbing out with `..` is refused. A fuzzer whose
/// archives were all malformed would test nothing.
#[test]
fn the_scene_accepts_a_plain_archive_and_refuses_a_climbing_one() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let plain = Entry {
        kind: 0,
        name: vec![3, 4],
        name_style: 0,
        link: Vec::new(),
        link_style: 5,
        format: 0,
        mode: 0,
        mtime: 2,
        size: 2,
    };
    let climbing = Entry {
        name: vec![198, 9, 0],
        ..plain.clone()
    };
    for (entries, unpacked, refused) in [(vec![plain], 1, 0), (vec![climbing], 0, 1)] {
        let tally = Tally::default();
        let archive = Archive::intact(entries);
        check_archive(&runtime, &archive, &tally);
        assert_eq!(
            tally.unpacked.load(Ordering::Relaxed),
            unpacked,
            "{archive:?}"
        );
        assert_eq!(
            tally.refused.load(Ordering::Relaxed),
            refused,
            "{archive:?}"
        );
    }
}

/// Found by the fuzzer: a time past what `SystemTime` can hold (a GNU
/// header stores up to 2^64 - 1 seconds) must not panic the unpacking
/// thread, for a file or a symlink.
#[test]
fn an_entry_dated_past_the_end_of_time_is_not_a_panic() {
    count_panics();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let far_future = MTIMES.iter().position(|&t| t == u64::MAX).unwrap() as u8;
    let file = Entry {
        kind: 0,
        name: vec![0],
        name_style: 0,
        link: Vec::new(),
        link_style: 5,
        format: 0,
        mode: 0,
        mtime: far_future,
        size: 2,
    };
    let symlink = Entry {
        kind: 11, // `2` in KINDS
        name: vec![1],
        link: vec![0],
        ..file.clone()
    };
    assert_eq!(symlink.type_flag(), b'2');
    for entries in [vec![file], vec![symlink]] {
        let archive = Archive::intact(entries);
        check_archive(&runtime, &archive, &Tally::default());
    }
}

#[test]
fn the_unpacker_confines_generated_archives() {
    count_panics();
    let runtime = std::panic::AssertUnwindSafe(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
    );
    let tally = Tally::default();
    let mut target = check!().with_type::<Archive>();
    target = match std::env::var("IMGBUILD_FUZZ_SECONDS") {
        Ok(seconds) => {
            let seconds = seconds
                .parse()
                .expect("IMGBUILD_FUZZ_SECONDS is a number of seconds");
            target
                .with_test_time(std::time::Duration::from_secs(seconds))
                .with_iterations(usize::MAX)
        }
        Err(_) => target.with_iterations(DEFAULT_ITERATIONS),
    };
    target.for_each(|archive: &Archive| check_archive(&runtime, archive, &tally));
    eprintln!(
        "unpack fuzzing: {} archives unpacked, {} refused",
        tally.unpacked.load(Ordering::Relaxed),
        tally.refused.load(Ordering::Relaxed)
    );
}
