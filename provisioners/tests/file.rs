//! The file provisioner against a real OpenSSH server on loopback: what a
//! `[[provision]] type = "file"` table puts on, or fetches from, a machine.

use imgbuild_core::Event;
use imgbuild_provisioners::file::Direction;
use imgbuild_provisioners::{ProvisionError, Provisioner};
use imgbuild_test_support::common::provision_context;
use imgbuild_test_support::harness::file;
use imgbuild_test_support::sshd::{self, Machine};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

const MIB: usize = 1024 * 1024;

/// What these tests look at on a [`Machine`] (a type of the support crate).
trait Inspect {
    async fn tree(&self, dir: &str) -> Vec<String>;
    async fn cat(&self, path: &str) -> Vec<String>;
    async fn modes(&self, dir: &str, paths: &[&str]) -> Vec<String>;
    async fn make_tree(&self) -> String;
}

impl Inspect for Machine {
    /// Everything under `dir` on the machine, as `type ./relative/path`
    /// lines (`d` directory, `f` file, `l` symlink), sorted.
    async fn tree(&self, dir: &str) -> Vec<String> {
        self.sh(&format!(
            "cd '{dir}' && find . -mindepth 1 -printf '%y %p\\n' | LC_ALL=C sort"
        ))
        .await
    }

    async fn cat(&self, path: &str) -> Vec<String> {
        self.sh(&format!("cat '{path}'")).await
    }

    /// `mode path` of each path, modes in octal as `stat` prints them.
    async fn modes(&self, dir: &str, paths: &[&str]) -> Vec<String> {
        self.sh(&format!(
            "cd '{dir}' && stat -c '%a %n' {}",
            paths.join(" ")
        ))
        .await
    }

    /// Creates a tree on the machine for downloads:
    /// `tree/{run.sh (0755), secret.txt (0600), nested/deeper/file.txt, link -> run.sh}`.
    async fn make_tree(&self) -> String {
        let tree = self.path("tree");
        self.sh(&format!(
            "mkdir -p '{tree}/nested/deeper' && cd '{tree}' && \
             printf '#!/bin/sh\\necho hi\\n' > run.sh && chmod 0755 run.sh && \
             printf 's3cret\\n' > secret.txt && chmod 0600 secret.txt && \
             printf 'deep\\n' > nested/deeper/file.txt && ln -s run.sh link"
        ))
        .await;
        tree
    }
}

fn upload(source: &str, destination: &str, base_dir: &Path) -> Provisioner {
    file(Some(source), None, destination, Direction::Upload, base_dir)
}

fn download(source: &str, destination: &str, base_dir: &Path) -> Provisioner {
    file(
        Some(source),
        None,
        destination,
        Direction::Download,
        base_dir,
    )
}

async fn provision(machine: &Machine, provisioner: &Provisioner) -> Result<(), ProvisionError> {
    provision_logged(machine, provisioner).await.0
}

async fn provision_logged(
    machine: &Machine,
    provisioner: &Provisioner,
) -> (Result<(), ProvisionError>, Vec<Event>) {
    let (cx, sink) = provision_context();
    let result = provisioner.run(machine.comm.as_ref(), &cx).await;
    (result, sink.events())
}

/// `(task, done, total)` of each progress event.
fn progress(events: &[Event]) -> Vec<(String, u64, Option<u64>)> {
    events
        .iter()
        .filter_map(|event| match event {
            Event::Progress {
                task, done, total, ..
            } => Some((task.clone(), *done, *total)),
            _ => None,
        })
        .collect()
}

/// Everything under `dir` locally, in the format of [`Machine::tree`].
fn local_tree(dir: &Path) -> Vec<String> {
    let mut lines: Vec<String> = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .map(|entry| {
            let entry = entry.unwrap();
            let kind = if entry.file_type().is_symlink() {
                'l'
            } else if entry.file_type().is_dir() {
                'd'
            } else {
                'f'
            };
            let relative = entry.path().strip_prefix(dir).unwrap();
            format!("{kind} ./{}", relative.display())
        })
        .collect();
    lines.sort();
    lines
}

fn local_mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// A local tree to upload:
/// `site/{index.html, css/app.css, bin/run.sh (0755), secret.key (0600), current -> index.html}`.
fn site(parent: &Path) -> PathBuf {
    let site = parent.join("site");
    std::fs::create_dir_all(site.join("css")).unwrap();
    std::fs::create_dir_all(site.join("bin")).unwrap();
    std::fs::write(site.join("index.html"), "<h1>hi</h1>\n").unwrap();
    std::fs::write(site.join("css/app.css"), "body {}\n").unwrap();
    std::fs::write(site.join("bin/run.sh"), "#!/bin/sh\necho run\n").unwrap();
    std::fs::set_permissions(site.join("bin/run.sh"), PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(site.join("secret.key"), "k\n").unwrap();
    std::fs::set_permissions(site.join("secret.key"), PermissionsExt::from_mode(0o600)).unwrap();
    symlink("index.html", site.join("current")).unwrap();
    site
}

const SITE_TREE: [&str; 7] = [
    "d ./bin",
    "d ./css",
    "f ./bin/run.sh",
    "f ./css/app.css",
    "f ./index.html",
    "f ./secret.key",
    "l ./current",
];

fn sorted(lines: &[&str]) -> Vec<String> {
    let mut lines: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    lines.sort();
    lines
}

#[tokio::test]
async fn uploads_a_file_to_an_explicit_path_creating_its_directory() {
    let machine = Machine::start().await;
    let local = tempfile::tempdir().unwrap();
    std::fs::write(local.path().join("app.conf"), "port = 80\n").unwrap();
    let destination = machine.path("etc/app/renamed.conf");
    provision(&machine, &upload("app.conf", &destination, local.path()))
        .await
        .unwrap();
    assert_eq!(
        machine.tree(&machine.path("etc")).await,
        ["d ./app", "f ./app/renamed.conf"]
    );
    assert_eq!(machine.cat(&destination).await, ["port = 80"]);
}

#[tokio::test]
async fn uploading_to_an_existing_file_replaces_it() {
    let machine = Machine::start().await;
    let local = tempfile::tempdir().unwrap();
    let destination = machine.path("motd");
    machine
        .sh(&format!(
            "mkdir -p '{}' && echo old > '{destination}'",
            machine.dir.display()
        ))
        .await;
    std::fs::write(local.path().join("motd"), "new\n").unwrap();
    provision(&machine, &upload("motd", &destination, local.path()))
        .await
        .unwrap();
    assert_eq!(machine.cat(&destination).await, ["new"]);
}

#[tokio::test]
async fn uploads_a_file_into_a_directory_when_the_destination_ends_in_a_slash() {
    let machine = Machine::start().await;
    let local = tempfile::tempdir().unwrap();
    std::fs::write(local.path().join("app.conf"), "port = 80\n").unwrap();
    let destination = format!("{}/", machine.path("conf.d"));
    provision(&machine, &upload("app.conf", &destination, local.path()))
        .await
        .unwrap();
    assert_eq!(
        machine.tree(&machine.path("conf.d")).await,
        ["f ./app.conf"]
    );
    assert_eq!(
        machine.cat(&machine.path("conf.d/app.conf")).await,
        ["port = 80"]
    );
}

#[tokio::test]
async fn uploads_content_as_a_file() {
    let machine = Machine::start().await;
    let base = tempfile::tempdir().unwrap();
    let destination = machine.path("motd.d/welcome");
    let content = "Welcome to $HOSTNAME\nit's `built`\n";
    provision(
        &machine,
        &file(
            None,
            Some(content),
            &destination,
            Direction::Upload,
            base.path(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(&destination).unwrap(),
        content,
        "content arrives byte for byte"
    );
    assert_eq!(
        machine.modes(&machine.path("motd.d"), &["welcome"]).await,
        ["644 welcome"]
    );
}

#[tokio::test]
async fn a_directory_source_ending_in_a_slash_uploads_its_contents() {
    let machine = Machine::start().await;
    let local = tempfile::tempdir().unwrap();
    site(local.path());
    let destination = machine.path("www");
    provision(&machine, &upload("site/", &destination, local.path()))
        .await
        .unwrap();
    assert_eq!(machine.tree(&destination).await, sorted(&SITE_TREE));
    assert_eq!(
        machine.cat(&format!("{destination}/css/app.css")).await,
        ["body {}"]
    );
}

#[tokio::test]
async fn a_directory_source_without_a_slash_uploads_the_directory_itself() {
    let machine = Machine::start().await;
    let local = tempfile::tempdir().unwrap();
    site(local.path());
    let destination = machine.path("www");
    // With or without a slash on the destination: the directory goes inside.
    provision(&machine, &upload("site", &destination, local.path()))
        .await
        .unwrap();
    let mut expected = vec!["d ./site".to_owned()];
    expected.extend(SITE_TREE.iter().map(|l| l.replace("./", "./site/")));
    expected.sort();
    assert_eq!(machine.tree(&destination).await, expected);

    let other = format!("{}/", machine.path("www2"));
    provision(&machine, &upload("site", &other, local.path()))
        .await
        .unwrap();
    assert_eq!(machine.tree(&other).await, expected);
}

#[tokio::test]
async fn uploads_keep_file_modes_and_symlinks() {
    let machine = Machine::start().await;
    let local = tempfile::tempdir().unwrap();
    site(local.path());
    let destination = machine.path("www");
    provision(&machine, &upload("site/", &destination, local.path()))
        .await
        .unwrap();
    assert_eq!(
        machine
            .modes(&destination, &["bin/run.sh", "secret.key", "index.html"])
            .await,
        ["755 bin/run.sh", "600 secret.key", "644 index.html"]
    );
    assert_eq!(
        machine
            .sh(&format!(
                "readlink '{destination}/current' && cat '{destination}/current'"
            ))
            .await,
        ["index.html", "<h1>hi</h1>"]
    );
    assert_eq!(
        machine.sh(&format!("'{destination}/bin/run.sh'")).await,
        ["run"],
        "the executable bit is usable"
    );
}

#[tokio::test]
async fn downloads_a_file_to_a_path() {
    let machine = Machine::start().await;
    let tree = machine.make_tree().await;
    let local = tempfile::tempdir().unwrap();
    provision(
        &machine,
        &download(&format!("{tree}/secret.txt"), "out/copy.txt", local.path()),
    )
    .await
    .unwrap();
    assert_eq!(local_tree(local.path()), ["d ./out", "f ./out/copy.txt"]);
    let copy = local.path().join("out/copy.txt");
    assert_eq!(std::fs::read_to_string(&copy).unwrap(), "s3cret\n");
    assert_eq!(local_mode(&copy), 0o600);
}

#[tokio::test]
async fn downloads_a_file_into_a_directory() {
    let machine = Machine::start().await;
    let tree = machine.make_tree().await;
    let local = tempfile::tempdir().unwrap();
    // Into an existing directory, and into a new one named with a slash.
    std::fs::create_dir(local.path().join("existing")).unwrap();
    provision(
        &machine,
        &download(&format!("{tree}/run.sh"), "existing", local.path()),
    )
    .await
    .unwrap();
    provision(
        &machine,
        &download(&format!("{tree}/run.sh"), "new/", local.path()),
    )
    .await
    .unwrap();
    assert_eq!(
        local_tree(local.path()),
        [
            "d ./existing",
            "d ./new",
            "f ./existing/run.sh",
            "f ./new/run.sh"
        ]
    );
    assert_eq!(local_mode(&local.path().join("new/run.sh")), 0o755);
}

#[tokio::test]
async fn downloads_a_directory_into_an_existing_local_directory() {
    let machine = Machine::start().await;
    let tree = machine.make_tree().await;
    let local = tempfile::tempdir().unwrap();
    std::fs::create_dir(local.path().join("fetched")).unwrap();
    provision(&machine, &download(&tree, "fetched", local.path()))
        .await
        .unwrap();
    let fetched = local.path().join("fetched");
    assert_eq!(
        local_tree(&fetched),
        sorted(&[
            "d ./tree",
            "d ./tree/nested",
            "d ./tree/nested/deeper",
            "f ./tree/nested/deeper/file.txt",
            "f ./tree/run.sh",
            "f ./tree/secret.txt",
            "l ./tree/link",
        ])
    );
    assert_eq!(local_mode(&fetched.join("tree/run.sh")), 0o755);
    assert_eq!(local_mode(&fetched.join("tree/secret.txt")), 0o600);
    assert_eq!(
        std::fs::read_link(fetched.join("tree/link")).unwrap(),
        Path::new("run.sh")
    );
    assert_eq!(
        std::fs::read_to_string(fetched.join("tree/nested/deeper/file.txt")).unwrap(),
        "deep\n"
    );
}

#[tokio::test]
async fn downloads_a_directory_s_contents_when_the_source_ends_in_a_slash() {
    let machine = Machine::start().await;
    let tree = machine.make_tree().await;
    let local = tempfile::tempdir().unwrap();
    provision(
        &machine,
        &download(&format!("{tree}/"), "copy", local.path()),
    )
    .await
    .unwrap();
    let copy = local.path().join("copy");
    assert_eq!(
        local_tree(&copy),
        sorted(&[
            "d ./nested",
            "d ./nested/deeper",
            "f ./nested/deeper/file.txt",
            "f ./run.sh",
            "f ./secret.txt",
            "l ./link",
        ])
    );
    assert_eq!(local_mode(&copy.join("secret.txt")), 0o600);

    // The same into a directory that already exists: still the contents.
    std::fs::create_dir(local.path().join("existing")).unwrap();
    provision(
        &machine,
        &download(&format!("{tree}/"), "existing", local.path()),
    )
    .await
    .unwrap();
    assert_eq!(
        local_tree(&local.path().join("existing")),
        local_tree(&copy)
    );
}

#[tokio::test]
async fn downloading_a_missing_remote_source_fails_naming_it() {
    let machine = Machine::start().await;
    machine
        .sh(&format!("mkdir -p '{}'", machine.dir.display()))
        .await;
    let missing = machine.path("no-such-file");
    let local = tempfile::tempdir().unwrap();
    let err = provision(&machine, &download(&missing, "out", local.path()))
        .await
        .unwrap_err();
    let text = err.to_string();
    eprintln!("{text}");
    assert!(text.contains(&missing), "{text}");
    assert!(text.contains("No such file or directory"), "{text}");
    assert!(
        !text.contains("cannot write"),
        "blames the destination: {text}"
    );
    assert!(!local.path().join("out").exists(), "nothing was created");
}

#[tokio::test]
async fn uploading_a_missing_local_source_fails_naming_it() {
    let machine = Machine::start().await;
    let local = tempfile::tempdir().unwrap();
    let err = provision(
        &machine,
        &upload("absent.conf", &machine.path("x"), local.path()),
    )
    .await
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ProvisionError::Read { .. }), "{text}");
    assert!(
        text.contains(&local.path().join("absent.conf").display().to_string()),
        "{text}"
    );
    assert!(text.contains("No such file or directory"), "{text}");
}

#[tokio::test]
async fn a_large_upload_reports_progress_ending_at_the_total() {
    let machine = Machine::start().await;
    let local = tempfile::tempdir().unwrap();
    let size = 2 * MIB + 12_345;
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    std::fs::write(local.path().join("big.bin"), &data).unwrap();
    let destination = machine.path("big.bin");
    let (result, events) =
        provision_logged(&machine, &upload("big.bin", &destination, local.path())).await;
    result.unwrap();
    assert_eq!(std::fs::read(&destination).unwrap(), data);

    let progress = progress(&events);
    eprintln!("{} progress events", progress.len());
    let total = Some(size as u64);
    assert_eq!(
        progress.first().unwrap(),
        &("upload big.bin".to_owned(), 0, total)
    );
    assert_eq!(
        progress.last().unwrap(),
        &("upload big.bin".to_owned(), size as u64, total)
    );
    for pair in progress.windows(2) {
        assert!(
            pair[0].1 <= pair[1].1,
            "progress went backwards: {progress:?}"
        );
    }
    assert!(
        progress
            .iter()
            .all(|(_, done, total)| Some(*done) <= *total),
        "{progress:?}"
    );
}

#[tokio::test]
async fn a_small_upload_reports_no_progress() {
    let machine = Machine::start().await;
    let local = tempfile::tempdir().unwrap();
    std::fs::write(local.path().join("small.txt"), "tiny\n").unwrap();
    let (result, events) = provision_logged(
        &machine,
        &upload("small.txt", &machine.path("small.txt"), local.path()),
    )
    .await;
    result.unwrap();
    assert_eq!(progress(&events), []);
    assert_eq!(machine.cat(&machine.path("small.txt")).await, ["tiny"]);
}

#[tokio::test]
async fn a_large_download_reports_progress_ending_complete() {
    let machine = Machine::start().await;
    let size = 2 * MIB + 777;
    let remote = machine.path("big.bin");
    machine
        .sh(&format!(
            "mkdir -p '{}' && head -c {size} /dev/urandom > '{remote}'",
            machine.dir.display()
        ))
        .await;
    let local = tempfile::tempdir().unwrap();
    let (result, events) =
        provision_logged(&machine, &download(&remote, "big.bin", local.path())).await;
    result.unwrap();
    assert_eq!(
        std::fs::read(local.path().join("big.bin")).unwrap(),
        std::fs::read(&remote).unwrap()
    );

    let progress = progress(&events);
    eprintln!("{} progress events", progress.len());
    let (task, done, total) = progress.last().expect("no progress reported");
    assert_eq!(task, &format!("download {remote}"));
    // The size is only known at the end; the stream counts tar's headers.
    assert_eq!(*total, Some(*done), "{progress:?}");
    assert!(*done >= size as u64, "{progress:?}");
}

/// Archives as a hostile machine could send them, entry by entry, including
/// names tar's own builder refuses to write (`..`, absolute paths).
struct Crafted(tar::Builder<Vec<u8>>);

/// The mtime every crafted entry carries.
const CRAFTED_MTIME: u64 = 1_700_000_000;

impl Crafted {
    fn new() -> Crafted {
        Crafted(tar::Builder::new(Vec::new()))
    }

    fn append(
        mut self,
        kind: tar::EntryType,
        name: &str,
        link: Option<&str>,
        data: &[u8],
        mode: u32,
    ) -> Crafted {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(data.len() as u64);
        header.set_mtime(CRAFTED_MTIME);
        if let Some(link) = link {
            header.set_link_name_literal(link).unwrap();
        }
        if name.len() < 100 {
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.set_cksum();
            self.0.append(&header, data).unwrap();
        } else {
            // A GNU long-name entry precedes this one.
            self.0.append_data(&mut header, name, data).unwrap();
        }
        self
    }

    fn dir(self, name: &str) -> Crafted {
        self.append(tar::EntryType::Directory, name, None, b"", 0o755)
    }

    fn file(self, name: &str, content: &str) -> Crafted {
        self.file_mode(name, content, 0o644)
    }

    fn file_mode(self, name: &str, content: &str, mode: u32) -> Crafted {
        self.append(
            tar::EntryType::Regular,
            name,
            None,
            content.as_bytes(),
            mode,
        )
    }

    fn symlink(self, name: &str, target: &str) -> Crafted {
        self.append(tar::EntryType::Symlink, name, Some(target), b"", 0o777)
    }

    fn hard_link(self, name: &str, target: &str) -> Crafted {
        self.append(tar::EntryType::Link, name, Some(target), b"", 0o644)
    }

    fn special(self, kind: tar::EntryType, name: &str) -> Crafted {
        self.append(kind, name, None, b"", 0o666)
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// A machine whose `tar` ignores what it is asked to archive and sends
/// whatever archive the test serves, as a compromised guest could.
struct HostileMachine {
    machine: Machine,
    fake: tempfile::TempDir,
}

impl HostileMachine {
    async fn start() -> HostileMachine {
        let fake = tempfile::tempdir().unwrap();
        let bin = fake.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let archive = fake.path().join("archive.tar");
        std::fs::write(
            bin.join("tar"),
            format!("#!/bin/sh\nexec cat '{}'\n", archive.display()),
        )
        .unwrap();
        std::fs::set_permissions(bin.join("tar"), PermissionsExt::from_mode(0o755)).unwrap();
        // sshd takes only the first SetEnv line, so this one also does the
        // harness's SHLVL=1 (see `ServerOptions::skip_shell_rc`).
        let options = sshd::ServerOptions {
            skip_shell_rc: false,
            extra_config: vec![format!(
                "SetEnv SHLVL=1 PATH={}:/usr/bin:/bin",
                bin.display()
            )],
            ..Default::default()
        };
        let machine = Machine::start_with(options).await;
        HostileMachine { machine, fake }
    }

    fn serve(&self, archive: Vec<u8>) {
        std::fs::write(self.fake.path().join("archive.tar"), archive).unwrap();
    }

    async fn download(&self, destination: &str, base_dir: &Path) -> Result<(), ProvisionError> {
        // The fake tar sends its archive whatever the source.
        provision(&self.machine, &download("/srv/tree", destination, base_dir)).await
    }
}

/// Stands for `~/.ssh` on the host running the build: what a hostile archive
/// aims at.
fn canary(parent: &Path) -> PathBuf {
    let canary = parent.join("canary");
    std::fs::create_dir(&canary).unwrap();
    std::fs::write(
        canary.join("authorized_keys"),
        "ssh-ed25519 AAAA the-owner\n",
    )
    .unwrap();
    canary
}

/// Everything under `dir` that an attack could change: kind, name, mode,
/// link count (a hard link to a file raises it) and content.
fn snapshot(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut lines: Vec<String> = walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|entry| {
            let entry = entry.unwrap();
            let meta = entry.path().symlink_metadata().unwrap();
            let content = if meta.is_file() {
                std::fs::read_to_string(entry.path()).unwrap()
            } else {
                String::new()
            };
            format!(
                "{} {:o} nlink={} {content:?}",
                entry.path().display(),
                meta.mode(),
                meta.nlink()
            )
        })
        .collect();
    lines.sort();
    lines
}

#[tokio::test]
async fn hostile_archives_are_refused_naming_the_entry_and_leave_no_trace() {
    let hostile = HostileMachine::start().await;
    let host = tempfile::tempdir().unwrap();
    let canary = canary(host.path());
    let keys = canary.join("authorized_keys");
    let (canary_s, keys_s) = (canary.display().to_string(), keys.display().to_string());
    let downloads = host.path().join("dl");
    std::fs::create_dir(&downloads).unwrap();
    std::fs::write(downloads.join("keep.txt"), "already here\n").unwrap();

    use tar::EntryType::{Block, Char, Fifo};
    // Each starts with harmless entries, which must not be left behind.
    let benign = || Crafted::new().dir("tree").file("tree/ok.txt", "fine\n");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "a file through a symlink it planted",
            benign()
                .symlink("tree/loot", &canary_s)
                .file(
                    "tree/loot/authorized_keys",
                    "ssh-ed25519 AAAA the-attacker\n",
                )
                .bytes(),
            "tree/loot/authorized_keys",
        ),
        (
            "a directory through a symlink it planted",
            benign()
                .symlink("tree/loot", &canary_s)
                .dir("tree/loot/planted")
                .bytes(),
            "tree/loot/planted",
        ),
        (
            "a name climbing out with ..",
            benign()
                .file("tree/../../canary/authorized_keys", "attacker\n")
                .bytes(),
            "tree/../../canary/authorized_keys",
        ),
        (
            "an absolute name",
            benign().file(&keys_s, "attacker\n").bytes(),
            &keys_s,
        ),
        (
            "a hard link to an absolute host path",
            benign().hard_link("tree/keys", &keys_s).bytes(),
            "tree/keys",
        ),
        (
            "a hard link climbing out with ..",
            benign()
                .hard_link("tree/keys", "tree/../../canary/authorized_keys")
                .bytes(),
            "tree/keys",
        ),
        (
            "a hard link through a symlink it planted",
            benign()
                .symlink("tree/loot", &canary_s)
                .hard_link("tree/keys", "tree/loot/authorized_keys")
                .bytes(),
            "tree/keys",
        ),
        (
            "a hard link to an entry that comes later",
            benign()
                .hard_link("tree/early", "tree/later")
                .file("tree/later", "x\n")
                .bytes(),
            "tree/early",
        ),
        (
            "a character device",
            benign().special(Char, "tree/null").bytes(),
            "tree/null",
        ),
        (
            "a block device",
            benign().special(Block, "tree/disk").bytes(),
            "tree/disk",
        ),
        (
            "a FIFO",
            benign().special(Fifo, "tree/pipe").bytes(),
            "tree/pipe",
        ),
    ];

    let canary_before = snapshot(&canary);
    let downloads_before = local_tree(&downloads);
    let mut failures = Vec::new();
    for (case, archive, entry) in cases {
        hostile.serve(archive);
        // Into an existing directory, and as a new path inside it.
        for destination in ["dl", "dl/copy"] {
            let mut problems = Vec::new();
            match hostile.download(destination, host.path()).await {
                Ok(()) => problems.push("the download succeeded".to_owned()),
                Err(err) => {
                    let text = err.to_string();
                    if !text.contains(&format!("refusing archive entry `{entry}`")) {
                        problems.push(format!("the error does not name `{entry}`: {text}"));
                    }
                }
            }
            if snapshot(&canary) != canary_before {
                problems.push(format!("the canary changed: {:?}", snapshot(&canary)));
            }
            let after = local_tree(&downloads);
            if after != downloads_before {
                problems.push(format!("the destination changed: {after:?}"));
            }
            if !problems.is_empty() {
                failures.push(format!("{case} -> {destination}: {}", problems.join("; ")));
            }
            // Leave the next case a clean slate even when this one failed.
            for stray in std::fs::read_dir(&downloads).unwrap() {
                let stray = stray.unwrap().path();
                if stray.file_name().unwrap() != "keep.txt" {
                    let _ =
                        std::fs::remove_dir_all(&stray).or_else(|_| std::fs::remove_file(&stray));
                }
            }
            std::fs::write(&keys, "ssh-ed25519 AAAA the-owner\n").unwrap();
            for planted in std::fs::read_dir(&canary).unwrap() {
                let planted = planted.unwrap().path();
                if planted != keys {
                    let _ = std::fs::remove_dir_all(&planted)
                        .or_else(|_| std::fs::remove_file(&planted));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn a_symlink_left_by_an_earlier_download_is_replaced_not_followed() {
    let hostile = HostileMachine::start().await;
    let host = tempfile::tempdir().unwrap();
    let canary = canary(host.path());
    let canary_before = snapshot(&canary);
    std::fs::create_dir(host.path().join("dl")).unwrap();

    // Symlinks themselves are fine to download...
    hostile.serve(
        Crafted::new()
            .dir("tree")
            .symlink("tree/loot", &canary.display().to_string())
            .bytes(),
    );
    hostile.download("dl", host.path()).await.unwrap();
    let loot = host.path().join("dl/tree/loot");
    assert_eq!(std::fs::read_link(&loot).unwrap(), canary);

    // ...but the next download does not write through one.
    hostile.serve(
        Crafted::new()
            .file(
                "tree/loot/authorized_keys",
                "ssh-ed25519 AAAA the-attacker\n",
            )
            .bytes(),
    );
    hostile.download("dl", host.path()).await.unwrap();
    assert_eq!(snapshot(&canary), canary_before);
    assert!(loot.symlink_metadata().unwrap().is_dir(), "still a symlink");
    assert_eq!(
        std::fs::read_to_string(loot.join("authorized_keys")).unwrap(),
        "ssh-ed25519 AAAA the-attacker\n"
    );
}

#[tokio::test]
async fn ordinary_archives_keep_hard_links_long_names_and_times_but_drop_setuid() {
    use std::os::unix::fs::MetadataExt;
    let hostile = HostileMachine::start().await;
    let host = tempfile::tempdir().unwrap();
    let long_name = format!("tree/{}/{}.txt", "d".repeat(80), "n".repeat(80));
    hostile.serve(
        Crafted::new()
            .dir("tree")
            .file("tree/a.txt", "shared\n")
            .hard_link("tree/b.txt", "tree/a.txt")
            .file_mode("tree/suid", "#!/bin/sh\n", 0o4755)
            .append(tar::EntryType::Directory, "tree/shared", None, b"", 0o3775)
            .symlink("tree/link", "a.txt")
            .file(&long_name, "long\n")
            .bytes(),
    );
    // Before, hard links were resolved against the working directory.
    for (destination, tree) in [("dl/", "dl/tree"), ("copy", "copy")] {
        hostile.download(destination, host.path()).await.unwrap();
        let tree = host.path().join(tree);
        let meta = |name: &str| std::fs::symlink_metadata(tree.join(name)).unwrap();
        assert_eq!(
            std::fs::read_to_string(tree.join("b.txt")).unwrap(),
            "shared\n"
        );
        assert_eq!(meta("a.txt").ino(), meta("b.txt").ino());
        assert_eq!(meta("a.txt").nlink(), 2, "linked to nothing else");
        assert_eq!(meta("suid").mode() & 0o7777, 0o755);
        assert_eq!(meta("shared").mode() & 0o7777, 0o775);
        assert_eq!(
            std::fs::read_to_string(tree.join(long_name.strip_prefix("tree/").unwrap())).unwrap(),
            "long\n"
        );
        assert_eq!(
            std::fs::read_link(tree.join("link")).unwrap(),
            Path::new("a.txt")
        );
        assert_eq!(meta("a.txt").mtime() as u64, CRAFTED_MTIME);
        assert_eq!(meta("link").mtime() as u64, CRAFTED_MTIME);
    }
}
