//! Warm starts end to end, with the real binary, real QEMU and the
//! cloud-init fixture, and a step cache shared through a directory: the
//! first build boots and saves the machine; the next restores it instead of
//! booting, with the host's time, a machine-id of its own, only its own key
//! trusted, nothing of the first build's work, and a network whose DHCP
//! server and DNS relay answer; another restore of the same state draws
//! other random numbers and gets another machine-id; a state whose checksum
//! matches but which QEMU cannot load is discarded on that runner alone,
//! and that build boots and saves a new one; a shared state whose machine
//! rejects its key leaves the shared store; another memory size makes a
//! state of its own; and a runner with an empty cache restores the state
//! another runner shared.

use imgbuild_test_support::{cli::*, common::*};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Logs in as root, whose `authorized_keys` the base already has, so what
/// each build's key left there can be counted.
fn config(version: &str, memory: u32) -> String {
    format!(
        r#"[image]
name = "warm"
version = "{version}"

[variables]
base_image = {{ description = "the cloud-init fixture" }}

[builders.vm]
type = "qemu"
base_image = "{{{{ var.base_image }}}}"
memory = {memory}
cpus = 1

[builders.vm.ssh]
username = "root"
timeout = "10m"

[[provision]]
type = "shell"
script = "provision.sh"
"#
    )
}

/// What each build's machine reports, and the mark it leaves (`@MARK@`).
/// The network part asks QEMU's user-mode network of this start for a
/// lease (with a DHCP client of its own, so the machine's configuration
/// stays) and sends a DNS query to its relay (any answer will do: names
/// are the host's business).
const PROVISION: &str = r#"echo RANDOM $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo GUEST_CLOCK $(date +%s)
echo MACHINE_ID $(cat /etc/machine-id)
grep imgbuild-temporary-key /root/.ssh/authorized_keys | sed 's/^/TRUSTED /'
echo "MARKERS [$(ls /etc/warm-marker-* 2>/dev/null)]"
touch /etc/warm-marker-@MARK@

dev=$(ip -4 route show default | awk '{print $5; exit}')
dhclient -1 -sf /bin/true -lf /tmp/warm.leases -pf /tmp/warm-dhclient.pid "$dev"
dhclient -x -sf /bin/true -pf /tmp/warm-dhclient.pid || true
echo "LEASE $(sed -n 's/^ *fixed-address \(.*\);/\1/p' /tmp/warm.leases)"
python3 - <<'EOF'
import os, socket
name = b"".join(bytes([len(label)]) + label for label in b"deb.debian.org".split(b"."))
query = os.urandom(2) + bytes.fromhex("01000001000000000000") + name + b"\0" + bytes.fromhex("00010001")
relay = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
relay.settimeout(10)
relay.sendto(query, ("10.0.2.3", 53))
try:
    print("DNS", "answered" if relay.recv(512)[:2] == query[:2] else "garbled")
except OSError as err:
    print("DNS silent", err)
EOF
"#;

fn build(workspace: &Workspace, version: &str, marker: &str) -> Outcome {
    build_with_memory(workspace, version, marker, 1024)
}

fn build_with_memory(workspace: &Workspace, version: &str, marker: &str, memory: u32) -> Outcome {
    workspace.write("image.toml", &config(version, memory));
    workspace.write("provision.sh", &PROVISION.replace("@MARK@", marker));
    workspace
        .imgbuild()
        .env("IMGBUILD_NO_CACHE", "false")
        .env("IMGBUILD_CACHE_DIR", workspace.join("steps"))
        .env("IMGBUILD_CACHE_SHARED", workspace.join("shared"))
        .args(["--output", "json", "build", "image.toml", "--var"])
        .arg(format!("base_image={}", cloud_vm_image()))
        .run()
}

/// The values the provisioner printed after `name `.
fn printed(outcome: &Outcome, name: &str) -> Vec<String> {
    let prefix = format!("{name} ");
    outcome
        .events()
        .iter()
        .filter(|e| e["event"] == "output")
        .filter_map(|e| e["line"].as_str())
        .filter_map(|line| line.strip_prefix(&prefix).map(str::to_owned))
        .collect()
}

fn warnings(outcome: &Outcome) -> Vec<String> {
    outcome
        .events()
        .iter()
        .filter(|e| e["event"] == "message" && e["level"] == "warn")
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .collect()
}

/// The key part (`AAAA...`) of an OpenSSH public key line.
fn key_of(line: &str) -> String {
    line.split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

fn state_records(workspace: &Workspace) -> Vec<PathBuf> {
    std::fs::read_dir(workspace.join("steps"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("-record.layer"))
        .collect()
}

/// The store's files of the one warm state in it: (memory, record).
fn state_files(workspace: &Workspace) -> (PathBuf, PathBuf) {
    let records = state_records(workspace);
    assert_eq!(records.len(), 1, "{records:?}");
    let record = records[0].clone();
    let memory = PathBuf::from(
        record
            .to_string_lossy()
            .replace("-record.layer", "-memory.layer"),
    );
    assert!(memory.exists(), "{}", memory.display());
    (memory, record)
}

/// The public key of the state's own key, as its record keeps it.
fn state_public_key(record: &Path) -> String {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
    let private = record["private_key"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    std::fs::write(&file, private).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let output = std::process::Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&file)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    key_of(&String::from_utf8_lossy(&output.stdout))
}

/// What the artifact's disk holds: the markers, and every temporary key
/// line in root's `authorized_keys`.
fn read_artifact(image: &Path) -> (Vec<String>, Vec<String>) {
    with_mounted_disk(image, |root| {
        let mut markers: Vec<String> = std::fs::read_dir(root.join("etc"))
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter(|name| name.starts_with("warm-marker-"))
            .collect();
        markers.sort();
        let keys = std::fs::read_to_string(root.join("root/.ssh/authorized_keys"))
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("imgbuild-temporary-key"))
            .map(str::to_owned)
            .collect();
        (markers, keys)
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_second_build_restores_the_saved_machine_as_its_own_and_a_state_that_fails_falls_back_to_a_boot()
 {
    let workspace = Workspace::new();

    // 1. Nothing saved yet: the build boots, then saves the machine.
    let first = build(&workspace, "1", "a").exits_with(0);
    assert!(!first.machine_restored(), "{}", first.stderr);
    let (memory, record) = state_files(&workspace);
    let mode = std::fs::metadata(&record).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o077,
        0,
        "the state's key is readable by others"
    );
    let first_keys: Vec<String> = printed(&first, "TRUSTED")
        .iter()
        .map(|l| key_of(l))
        .collect();
    assert_eq!(first_keys.len(), 1, "{first_keys:?}");
    let state_key = state_public_key(&record);
    assert!(!first_keys.contains(&state_key));

    // 2. Restored, and made this build's own before its provisioner ran.
    let before = now();
    let second = build(&workspace, "2", "b").exits_with(0);
    let after = now();
    assert!(second.machine_restored(), "{}", second.stdout);
    assert_network_works(&first);
    assert_network_works(&second);
    let clock: u64 = printed(&second, "GUEST_CLOCK")[0].parse().unwrap();
    assert!(
        before <= clock + 2 && clock <= after + 2,
        "the guest clock read {clock} during a build between {before} and {after}"
    );
    assert_ne!(
        printed(&first, "MACHINE_ID"),
        printed(&second, "MACHINE_ID"),
        "the restored machine kept the saved machine-id"
    );
    let second_keys: Vec<String> = printed(&second, "TRUSTED")
        .iter()
        .map(|l| key_of(l))
        .collect();
    assert_eq!(second_keys.len(), 1, "{second_keys:?}");
    assert!(
        !first_keys.contains(&second_keys[0]) && second_keys[0] != state_key,
        "the restored machine trusts the first build's key or the state's"
    );
    assert_eq!(
        printed(&second, "MARKERS"),
        vec!["[]".to_owned()],
        "the first build's work is in the restored machine"
    );
    let (markers, keys) = read_artifact(&workspace.join("output/warm-2.qcow2"));
    assert_eq!(markers, vec!["warm-marker-b"]);
    assert!(keys.is_empty(), "a temporary key is in the image: {keys:?}");

    // Restored again from the same state: the kernel's random numbers and
    // the machine-id are this machine's own, not the last restore's.
    let again = build(&workspace, "2.1", "b1").exits_with(0);
    assert!(again.machine_restored(), "{}", again.stdout);
    for restored in [&second, &again] {
        let unset: Vec<String> = warnings(restored)
            .into_iter()
            .filter(|w| w.contains("restored machine"))
            .collect();
        assert!(unset.is_empty(), "{unset:?}");
    }
    assert_ne!(
        printed(&again, "RANDOM"),
        printed(&second, "RANDOM"),
        "two machines restored from one state drew the same random bytes"
    );
    assert_ne!(
        printed(&again, "MACHINE_ID"),
        printed(&second, "MACHINE_ID"),
        "two machines restored from one state have the same machine-id"
    );

    // 3. A state whose checksum matches but which QEMU cannot load: this
    //    runner's copy. QEMU's or this runner's fault as much as the
    //    state's, so the shared copy stays.
    let (shared_entry, _) = shared_state_record(&workspace);
    let shared_before = std::fs::read(&shared_entry).unwrap();
    let garbage = workspace.join("garbage.zst");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c 1048576 /dev/urandom | zstd -q > {}",
            garbage.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    replace_entry(&memory, &std::fs::read(&garbage).unwrap());
    edit_record(&record, |record| {
        record["memory_sha256"] = sha256_of(&memory).into();
    });

    let third = build(&workspace, "3", "c").exits_with(0);
    assert_booted_instead(&third, "QEMU could not load it");
    assert_eq!(
        std::fs::read(&shared_entry).unwrap(),
        shared_before,
        "the shared state changed after a failure that may be this runner's alone"
    );
    // Rather than save a state of its own, the runner takes the shared one
    // up again.
    let (_, shared_record) = shared_state_record(&workspace);
    assert_eq!(
        std::fs::read(&record).unwrap(),
        std::fs::read(&shared_record).unwrap()
    );

    // 4. A runner with an empty cache fetches the shared state, which
    //    loads, but whose machine rejects the key its record keeps: the
    //    build logs in once, removes the state from the shared store too,
    //    boots, and shares the state it saves.
    std::fs::remove_dir_all(workspace.join("steps")).unwrap();
    let stranger = workspace.join("stranger");
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "stranger", "-f"])
        .arg(&stranger)
        .status()
        .unwrap();
    assert!(status.success());
    let stranger_key = key_of(&std::fs::read_to_string(stranger.with_extension("pub")).unwrap());
    let rejected = edit_shared_record(&workspace, |record| {
        record["private_key"] = std::fs::read_to_string(&stranger).unwrap().into();
    });

    let fourth = build(&workspace, "4", "d").exits_with(0);
    assert!(fetched(&fourth) >= 3, "{}", fourth.stdout);
    assert_booted_instead(&fourth, "the restored machine did not let the build in");
    assert!(
        !rejected.exists(),
        "the rejected state is still in the shared store"
    );
    let (_, shared_record) = shared_state_record(&workspace);
    assert_ne!(
        state_public_key(&shared_record),
        stranger_key,
        "no new state shared"
    );
    let (_, record) = state_files(&workspace);
    assert_ne!(
        state_public_key(&record),
        stranger_key,
        "no new state saved"
    );

    // 5. Another memory size: no state fits, so the build boots and saves
    //    one of its own beside the first.
    let fifth = build_with_memory(&workspace, "5", "e", 768).exits_with(0);
    assert!(!fifth.machine_restored(), "{}", fifth.stdout);
    assert_eq!(state_records(&workspace).len(), 2);

    // 6. Another runner with an empty cache restores the state the fourth
    //    build shared.
    std::fs::remove_dir_all(workspace.join("steps")).unwrap();
    let sixth = build(&workspace, "6", "f").exits_with(0);
    assert!(fetched(&sixth) >= 3, "{}", sixth.stdout);
    assert!(sixth.machine_restored(), "{}", sixth.stdout);
    assert_network_works(&sixth);
    assert_eq!(printed(&sixth, "MARKERS"), vec!["[]".to_owned()]);
    let (markers, keys) = read_artifact(&workspace.join("output/warm-6.qcow2"));
    assert_eq!(markers, vec!["warm-marker-f"]);
    assert!(keys.is_empty(), "a temporary key is in the image: {keys:?}");

    assert!(workspace.qemu_processes().is_empty());
    assert!(
        workspace.journals().is_empty(),
        "{:?}",
        workspace.journals()
    );
}

/// The machine's user-mode network worked as this QEMU serves it: its
/// DHCP server leased the machine its address, its DNS relay answered.
fn assert_network_works(outcome: &Outcome) {
    assert_eq!(printed(outcome, "LEASE"), ["10.0.2.15"]);
    assert_eq!(printed(outcome, "DNS"), ["answered"]);
}

/// The build gave its saved state up, saying `why`, and booted a machine
/// with none of the earlier builds' work.
fn assert_booted_instead(outcome: &Outcome, why: &str) {
    assert!(!outcome.machine_restored(), "{}", outcome.stdout);
    let warnings = warnings(outcome);
    assert!(
        warnings
            .iter()
            .any(|w| { w.contains("saved machine state cannot be restored") && w.contains(why) }),
        "{warnings:?}"
    );
    assert_eq!(printed(outcome, "MARKERS"), vec!["[]".to_owned()]);
}

/// How many entries the build fetched from the shared store.
fn fetched(outcome: &Outcome) -> usize {
    outcome
        .events()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .filter(|m| m.starts_with("fetched the step cache entry"))
        .count()
}

/// Changes the warm state record `record` (a local store entry) with
/// `change`, keeping its entry consistent.
fn edit_record(record: &Path, change: impl FnOnce(&mut serde_json::Value)) {
    let mut kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
    change(&mut kept);
    replace_entry(record, &serde_json::to_vec(&kept).unwrap());
}

/// The shared store's entry for its one warm state record, and the file
/// holding the record: (`steps/<key>-record.json`, its data file).
fn shared_state_record(workspace: &Workspace) -> (PathBuf, PathBuf) {
    let dir = workspace.join("shared/steps");
    let entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with("-record.json"))
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let entry: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&entries[0]).unwrap()).unwrap();
    let data = dir.join(format!(
        "{}.{}.layer",
        entry["key"].as_str().unwrap(),
        entry["sha256"].as_str().unwrap()
    ));
    assert!(data.exists(), "{}", data.display());
    (entries[0].clone(), data)
}

/// Changes the shared store's one warm state record with `change`, as
/// another runner sharing it that way would have; returns the file that
/// now holds it.
fn edit_shared_record(
    workspace: &Workspace,
    change: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    let (entry_file, data) = shared_state_record(workspace);
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&data).unwrap()).unwrap();
    change(&mut record);
    let bytes = serde_json::to_vec(&record).unwrap();
    std::fs::remove_file(&data).unwrap();
    let mut entry: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&entry_file).unwrap()).unwrap();
    let changed = data.with_file_name("changed");
    std::fs::write(&changed, &bytes).unwrap();
    entry["sha256"] = sha256_of(&changed).into();
    entry["size"] = bytes.len().into();
    let data = data.with_file_name(format!(
        "{}.{}.layer",
        entry["key"].as_str().unwrap(),
        entry["sha256"].as_str().unwrap()
    ));
    std::fs::rename(&changed, &data).unwrap();
    std::fs::write(&entry_file, serde_json::to_vec(&entry).unwrap()).unwrap();
    data
}

/// Puts `bytes` in the store's entry `layer` and makes its checksum and size
/// match, as a damaged or foreign file with a consistent record would.
fn replace_entry(layer: &Path, bytes: &[u8]) {
    std::fs::write(layer, bytes).unwrap();
    let metadata = PathBuf::from(layer.to_string_lossy().replace(".layer", ".json"));
    let mut entry: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&metadata).unwrap()).unwrap();
    entry["sha256"] = sha256_of(layer).into();
    entry["size"] = bytes.len().into();
    std::fs::write(&metadata, serde_json::to_vec(&entry).unwrap()).unwrap();
}
