//! Fuzzing the config loader (`imgbuild::config::load`: TOML parsing,
//! variables, templating, validation) with bolero on the stable toolchain.
//!
//! Random bytes would almost never get past the TOML parser, so inputs are
//! made by editing real configs: every `templates/*.toml`, the benchmark
//! scenarios and the configs in `tests/fuzz/corpus/config/` (taken from the
//! tests, plus any input that once broke the loader). Bolero picks a seed
//! and a short list of edits — insert a token from a dictionary of config
//! keys, values and template snippets, replace a value or a key, delete,
//! duplicate or swap lines, splice lines from another seed — so most inputs
//! stay close to valid and reach validation and templating.
//!
//! Properties: `load` never panics; an accepted config can be turned into
//! what `inspect` shows; a rejected one has at least one problem, and every
//! problem renders (human and JSON) with a location inside the file.
//!
//! `cargo test` runs a short campaign (a few seconds). A long one:
//!
//!   IMGBUILD_FUZZ_SECONDS=600 cargo test --release -p imgbuild --test fuzz_config
//!
//! A failure prints `BOLERO_RANDOM_SEED=<n>`: setting it replays that input.
//! The failing config is also saved under `target/tmp/fuzz-config-failures/`;
//! once fixed, copy it into `tests/fuzz/corpus/config/` as a regression case.

use bolero::check;
use bolero::generator::{TypeGenerator, produce};
use imgbuild::config::{LoadOptions, VariableInputs, load};
use imgbuild_test_support::cli::{self, Workspace, sha256_of};
use imgbuild_test_support::common::repo_root;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Random inputs per `cargo test` run: a few seconds in a debug build.
const DEFAULT_ITERATIONS: usize = 1500;

/// A seed config and the edits made to it.
#[derive(Debug, TypeGenerator)]
struct Case {
    seed: u16,
    #[generator(produce::<Vec<Edit>>().with().len(0usize..6))]
    edits: Vec<Edit>,
    /// Which `--only`/`--except`/`--var`/`--var-file` inputs are given.
    inputs: u8,
}

/// Positions and dictionary indices are taken modulo what they index.
#[derive(Debug, TypeGenerator)]
enum Edit {
    Insert {
        at: u16,
        token: u16,
    },
    Repeat {
        at: u16,
        token: u16,
        times: u8,
    },
    Delete {
        at: u16,
        len: u8,
    },
    ReplaceValue {
        line: u16,
        value: u16,
    },
    ReplaceKey {
        line: u16,
        key: u16,
    },
    InsertAssignment {
        line: u16,
        key: u16,
        value: u16,
    },
    InsertLine {
        line: u16,
        text: u16,
    },
    DeleteLine {
        line: u16,
    },
    DuplicateLine {
        line: u16,
    },
    SwapLines {
        a: u16,
        b: u16,
    },
    Splice {
        seed: u16,
        from: u16,
        count: u8,
        at: u16,
    },
}

/// Every key the loader knows, and a few it does not.
const KEYS: &[&str] = &[
    "name",
    "version",
    "description",
    "labels",
    "default",
    "sensitive",
    "type",
    "base_image",
    "base_checksum",
    "base_format",
    "output_dir",
    "format",
    "compression",
    "disk_size",
    "memory",
    "cpus",
    "machine",
    "accelerator",
    "firmware",
    "ovmf_code",
    "ovmf_vars",
    "kernel",
    "initrd",
    "kernel_args",
    "qemu_args",
    "qemu_binary",
    "cloud_init",
    "cloud_init_cleanup",
    "shutdown_command",
    "shutdown_timeout",
    "cache_dir",
    "warm_start",
    "ssh",
    "image",
    "pull",
    "repository",
    "tags",
    "run_command",
    "volumes",
    "env",
    "privileged",
    "platform",
    "changes",
    "author",
    "message",
    "export_path",
    "discard",
    "push",
    "region",
    "endpoint_url",
    "source_ami",
    "source_ami_filter",
    "owners",
    "most_recent",
    "filters",
    "instance_type",
    "subnet_id",
    "vpc_id",
    "associate_public_ip",
    "iam_instance_profile",
    "user_data",
    "user_data_file",
    "root_volume_size",
    "root_volume_type",
    "run_tags",
    "ami_name",
    "ami_description",
    "ami_tags",
    "snapshot_tags",
    "ami_regions",
    "ami_users",
    "ami_groups",
    "encrypt_boot",
    "kms_key_id",
    "region_kms_key_ids",
    "key_pair_name",
    "security_group_ids",
    "ssh_cidrs",
    "ssh_interface",
    "ami_timeout",
    "instance_timeout",
    "username",
    "password",
    "private_key_file",
    "host",
    "port",
    "timeout",
    "connect_timeout",
    "keepalive_interval",
    "inline",
    "script",
    "scripts",
    "execute_command",
    "inline_shebang",
    "remote_folder",
    "valid_exit_codes",
    "expect_disconnect",
    "max_retries",
    "pause_before",
    "source",
    "content",
    "destination",
    "direction",
    "only",
    "except",
    "builders",
    "variables",
    "provision",
    "builders.vm",
    "builders.vm.ssh",
    "image.name",
    "variables.x",
    "memroy",
    "\"\"",
    "\"a b\"",
    "'..'",
    "\"type\"",
    "a.b.c.d",
    "_x",
    "x-y",
    "9",
];

/// Values of every TOML kind, edge cases of the fields' own syntaxes, and
/// templates.
const VALUES: &[&str] = &[
    "\"qemu\"",
    "\"docker\"",
    "\"ec2\"",
    "\"shell\"",
    "\"file\"",
    "\"qemo\"",
    "\"qcow2\"",
    "\"raw\"",
    "\"vmdk\"",
    "\"zstd\"",
    "\"none\"",
    "\"uefi\"",
    "\"bios\"",
    "\"kvm\"",
    "\"tcg\"",
    "\"auto\"",
    "\"always\"",
    "\"missing\"",
    "\"never\"",
    "\"upload\"",
    "\"download\"",
    "\"public_ip\"",
    "\"private_dns\"",
    "0",
    "1",
    "-1",
    "255",
    "256",
    "65535",
    "65536",
    "2147483647",
    "2147483648",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "99999999999999999999",
    "0x7fffffff",
    "0o777",
    "0b1",
    "1_000",
    "1e400",
    "-0.0",
    "nan",
    "inf",
    "-inf",
    "3.5",
    "true",
    "false",
    "1979-05-27T07:32:00Z",
    "07:32:00",
    "1979-05-27",
    "\"\"",
    "\" \"",
    "\"8G\"",
    "\"0G\"",
    "\"20480M\"",
    "\"18446744073709551615T\"",
    "\"8X\"",
    "\"-1G\"",
    "\"5m\"",
    "\"0s\"",
    "\"1ns\"",
    "\"99999999999999999999h\"",
    "\"10 years\"",
    "\"sha256:\"",
    "\"sha256:0000000000000000000000000000000000000000000000000000000000000000\"",
    "\"http://\"",
    "\"https://example.com/x.qcow2\"",
    "\"file:///etc/passwd\"",
    "\"base.qcow2\"",
    "\"provision.sh\"",
    "\"scripts/baseline.sh\"",
    "\"files/motd\"",
    "\"files/app/\"",
    "\"missing.sh\"",
    "\"/\"",
    "\".\"",
    "\"..\"",
    "\"../../etc/passwd\"",
    "\"/etc/shadow\"",
    "\"/tmp/\"",
    "\"~\"",
    "\"a\\u0000b\"",
    "\"\\uD800\"",
    "\"\\U0010FFFF\"",
    "\"\\x41\"",
    "\"é😀\"",
    "\"a\\nb\"",
    "'literal {{ var.x }}'",
    "\"\"\"\nmulti\n\"\"\"",
    "'''\n'''",
    "[]",
    "[\"vm\"]",
    "[\"nosuch\"]",
    "[1, \"a\"]",
    "[[]]",
    "[{}]",
    "{}",
    "{ a = \"b\" }",
    "{ default = \"v\", sensitive = true }",
    "{ description = \"required\" }",
    "{ default = [] }",
    "{ sensitive = \"yes\" }",
    "{ owners = [], filters = {} }",
    "\"ENV A=b\"",
    "\"FROM x\"",
    "\"10.0.0.0/33\"",
    "\"::1/128\"",
    "\"0.0.0.0/0\"",
    "\"debian:bookworm\"",
    "\"UPPER:case\"",
    "\"{{ var.version }}\"",
    "\"{{ var.password }}\"",
    "\"{{ var.nosuch }}\"",
    "\"{{ image.name }}-{{ image.version }}\"",
    "\"{{ build.name }}\"",
    "\"{{ build.type }}\"",
    "\"{{ env('HOME') }}\"",
    "\"{{ env('IMGBUILD_NO_SUCH') }}\"",
    "\"{{ env('IMGBUILD_NO_SUCH', 'd') }}\"",
    "\"{{ uuid() }}\"",
    "\"{{ timestamp }}\"",
    "\"{{ isotime }}\"",
    "\"{{ run_id }}\"",
    "\"{{ git_sha }}\"",
    "\"{{ path }}\"",
    "\"{{ vars }}\"",
    "\"{{\"",
    "\"}}\"",
    "\"{% if true %}\"",
    "\"{{ 1/0 }}\"",
    "\"{{ 9223372036854775807 + 1 }}\"",
    "\"{{ -9223372036854775808 // -1 }}\"",
    "\"{{ 'abc'[::-1] }}\"",
    "\"{{ 'abc'[1:99999999999] }}\"",
    "\"{{ var | tojson }}\"",
    "\"{{ image }}\"",
    "\"{{ nosuch() }}\"",
];

/// Text inserted anywhere: structure, escapes, template syntax.
const TOKENS: &[&str] = &[
    "\"",
    "'",
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    "=",
    ",",
    ".",
    "#",
    "\\",
    "\n",
    "\r\n",
    "\t",
    " ",
    "\u{0}",
    "\u{feff}",
    "\u{7f}",
    "é",
    "😀",
    "\\u0000",
    "\\U0010FFFF",
    "\\uD800",
    "\\",
    "\"\"\"",
    "'''",
    "{{",
    "}}",
    "{%",
    "%}",
    "{#",
    "#}",
    "{{ var.version }}",
    "{{ var.x }}",
    "{{ var }}",
    "{{ image.name }}",
    "{{ build.name }}",
    "{{ env('HOME') }}",
    "{{ uuid() }}",
    "{{ loop.index }}",
    "{% for i in range(3) %}",
    "{% endfor %}",
    "{% if build.type == 'qemu' %}",
    "{% else %}",
    "{% endif %}",
    "{% raw %}",
    "{% endraw %}",
    "{% set x = 1 %}",
    "{% macro m() %}",
    "{% endmacro %}",
    "{% include 'x' %}",
    "{% extends 'x' %}",
    "{% filter upper %}",
    "{% endfilter %}",
    "{% with a = 1 %}",
    "{% endwith %}",
    "{{ 1 % 0 }}",
    "{{ x | default(1) }}",
    "| upper",
    "| join(',')",
    "~",
    "[builders.vm]",
    "[builders.vm.ssh]",
    "[builders.c]\ntype = \"docker\"\nimage = \"x\"\n",
    "[[provision]]\ntype = \"shell\"\ninline = [\"true\"]\n",
    "[image]",
    "[variables]",
    "[builders]",
    "[provision]",
    "[[builders.vm]]",
    "type = \"docker\"",
    "memory = 99999999999999999999",
    "x = 1",
    "9999999999",
    "-",
    "+",
    "0x",
    "e",
    "sha256:",
    "http://",
    "../",
    "/",
    "-v",
    "only = [\"vm\"]",
    "except = [\"vm\"]",
];

/// Whole lines: headers and assignments as a person writes them.
const LINES: &[&str] = &[
    "[image]",
    "[variables]",
    "[builders.vm]",
    "[builders.vm.ssh]",
    "[builders.c]",
    "[builders.ami]",
    "[builders.ami.ssh]",
    "[builders.\"a b\"]",
    "[builders.\"\"]",
    "[builders.vm.ssh.extra]",
    "[[provision]]",
    "[[variables]]",
    "[image.labels]",
    "[builders.vm.qemu_args]",
    "name = \"web\"",
    "version = \"1.2.3\"",
    "version = \"1.2.3/../x\"",
    "type = \"qemu\"",
    "type = \"docker\"",
    "type = \"ec2\"",
    "type = \"shell\"",
    "type = \"file\"",
    "base_image = \"base.qcow2\"",
    "image = \"debian:bookworm\"",
    "region = \"us-east-1\"",
    "source_ami = \"ami-0123456789abcdef0\"",
    "instance_type = \"t3.micro\"",
    "username = \"admin\"",
    "password = \"{{ var.password }}\"",
    "inline = [\"echo {{ image.version }}\"]",
    "script = \"provision.sh\"",
    "source = \"files/motd\"",
    "destination = \"/tmp/x\"",
    "direction = \"download\"",
    "only = [\"vm\"]",
    "except = [\"container\"]",
    "cloud_init = false",
    "x = { default = \"v\", sensitive = true }",
    "y = { description = \"needed\" }",
    "ssh = { username = \"root\" }",
    "builders.vm.type = \"qemu\"",
    "",
    "# a comment",
    "a = 1\na = 2",
];

/// The seed configs, by name.
fn seeds() -> Vec<(String, Vec<u8>)> {
    let root = repo_root();
    let mut paths: Vec<PathBuf> = Vec::new();
    for (dir, depth) in [
        (root.join("templates"), 1),
        (root.join("bench/scenarios"), 2),
        (root.join("tests/fuzz/corpus/config"), 1),
    ] {
        for entry in walkdir::WalkDir::new(&dir)
            .min_depth(depth)
            .max_depth(depth)
        {
            let path = entry.expect("a readable seed directory").into_path();
            let is_seed = path.extension().is_some_and(|e| e == "toml")
                && (depth == 1 || path.file_name().is_some_and(|n| n == "imgbuild.toml"));
            if is_seed {
                paths.push(path);
            }
        }
    }
    paths.sort();
    let seeds: Vec<_> = paths
        .into_iter()
        .map(|path| {
            let name = path
                .strip_prefix(&root)
                .unwrap_or(&path)
                .display()
                .to_string();
            let text = std::fs::read(&path).expect("a readable seed config");
            (name, text)
        })
        .collect();
    assert!(seeds.len() >= 10, "too few seed configs: {seeds:?}");
    seeds
}

/// A directory holding every file the seeds refer to, and the inputs a run
/// can be given.
struct Fixture {
    workspace: Workspace,
    config: PathBuf,
    environment: BTreeMap<String, String>,
}

impl Fixture {
    fn new() -> Fixture {
        let workspace = Workspace::with_templates();
        workspace.write("base.qcow2", "not really a disk, but a file");
        workspace.write("provision.sh", "#!/bin/sh\necho provisioned\n");
        workspace.write("payload.bin", "payload");
        workspace.write("id_ed25519", "not really a key");
        workspace.write("vars.toml", "version = \"2.0.0\"\n");
        // The bench cache scenario's steps (bench/scenarios/cache/scripts/).
        for script in ["work.sh", "finish.sh"] {
            workspace.write(&format!("scripts/{script}"), "#!/bin/sh\ntrue\n");
        }
        let base_sha256 = sha256_of(&workspace.join("base.qcow2"));
        // Values for the variables the seeds declare without a default; an
        // environment value for a variable a config does not declare is
        // ignored, so one set serves every seed.
        let environment = [
            ("base_image", "base.qcow2".to_owned()),
            ("base_vm_image", "base.qcow2".to_owned()),
            ("base_checksum", format!("sha256:{base_sha256}")),
            ("base_sha256", base_sha256),
            ("docker_image", "debian:bookworm".to_owned()),
            ("private_key_file", "id_ed25519".to_owned()),
            ("payload_vm", "payload.bin".to_owned()),
            ("payload_container", "payload.bin".to_owned()),
        ]
        .into_iter()
        .map(|(name, value)| (format!("IMGBUILD_VAR_{name}"), value))
        .collect();
        let config = workspace.join("image.toml");
        Fixture {
            workspace,
            config,
            environment,
        }
    }

    /// Mostly the plain inputs every seed is valid with; one time in eight,
    /// `inputs` chooses extra or missing ones (most of which a given config
    /// rejects, so they are kept rare).
    fn options(&self, inputs: u8) -> LoadOptions {
        let pick = |bit: u8| inputs & 0b111 == 0 && inputs & (1 << bit) != 0;
        let names = ["vm", "container", "ami", "nosuch"];
        let name = names[usize::from(inputs >> 6)].to_owned();
        LoadOptions {
            variables: VariableInputs {
                cli: if pick(3) {
                    vec![("version".to_owned(), "9.9.9".to_owned())]
                } else {
                    Vec::new()
                },
                var_files: if pick(4) {
                    vec![self.workspace.join("vars.toml")]
                } else {
                    Vec::new()
                },
                environment: if pick(5) {
                    BTreeMap::new()
                } else {
                    self.environment.clone()
                },
            },
            run_id: "0123456789abcdef0123456789ab".to_owned(),
            started: time::OffsetDateTime::UNIX_EPOCH,
            only: if pick(6) {
                vec![name.clone()]
            } else {
                Vec::new()
            },
            except: if pick(7) { vec![name] } else { Vec::new() },
        }
    }
}

fn pick<'a>(list: &[&'a str], index: u16) -> &'a str {
    list[usize::from(index) % list.len()]
}

/// Moves `at` back onto a UTF-8 character boundary, so that edits keep a
/// valid file valid UTF-8 (a file that is not is refused at once).
fn boundary(text: &[u8], at: u16) -> usize {
    let mut at = usize::from(at) % (text.len() + 1);
    while at > 0 && at < text.len() && text[at] & 0xC0 == 0x80 {
        at -= 1;
    }
    at
}

fn lines(text: &[u8]) -> Vec<Vec<u8>> {
    text.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
}

fn unlines(lines: &[Vec<u8>]) -> Vec<u8> {
    lines.join(&b'\n')
}

/// The indices of the lines holding a `key = value` assignment.
fn assignments(lines: &[Vec<u8>]) -> Vec<usize> {
    (0..lines.len())
        .filter(|&i| lines[i].contains(&b'=') && !lines[i].starts_with(b"["))
        .collect()
}

impl Case {
    fn text(&self, seeds: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut text = seeds[usize::from(self.seed) % seeds.len()].1.clone();
        for edit in &self.edits {
            text = edit.apply(text, seeds);
        }
        text
    }
}

impl Edit {
    fn apply(&self, mut text: Vec<u8>, seeds: &[(String, Vec<u8>)]) -> Vec<u8> {
        match *self {
            Edit::Insert { at, token } => {
                let at = boundary(&text, at);
                text.splice(at..at, pick(TOKENS, token).bytes());
                text
            }
            Edit::Repeat { at, token, times } => {
                let at = boundary(&text, at);
                let token = pick(TOKENS, token).repeat(usize::from(times % 64) + 1);
                text.splice(at..at, token.bytes());
                text
            }
            Edit::Delete { at, len } => {
                let start = boundary(&text, at);
                let mut end = (start + usize::from(len)).min(text.len());
                while end > start && end < text.len() && text[end] & 0xC0 == 0x80 {
                    end -= 1;
                }
                text.drain(start..end);
                text
            }
            Edit::ReplaceValue { line, value } => {
                let mut lines = lines(&text);
                let candidates = assignments(&lines);
                if let Some(&index) = candidates.get(usize::from(line) % candidates.len().max(1)) {
                    let target = &mut lines[index];
                    let eq = target.iter().position(|&b| b == b'=').unwrap_or(0);
                    target.truncate(eq + 1);
                    target.push(b' ');
                    target.extend_from_slice(pick(VALUES, value).as_bytes());
                }
                unlines(&lines)
            }
            Edit::ReplaceKey { line, key } => {
                let mut lines = lines(&text);
                let candidates = assignments(&lines);
                if let Some(&index) = candidates.get(usize::from(line) % candidates.len().max(1)) {
                    let target = &mut lines[index];
                    let eq = target.iter().position(|&b| b == b'=').unwrap_or(0);
                    let mut replaced = pick(KEYS, key).as_bytes().to_vec();
                    replaced.push(b' ');
                    replaced.extend_from_slice(&target[eq..]);
                    *target = replaced;
                }
                unlines(&lines)
            }
            Edit::InsertAssignment { line, key, value } => {
                let mut lines = lines(&text);
                let at = usize::from(line) % (lines.len() + 1);
                let assignment = format!("{} = {}", pick(KEYS, key), pick(VALUES, value));
                lines.insert(at, assignment.into_bytes());
                unlines(&lines)
            }
            Edit::InsertLine { line, text: which } => {
                let mut lines = lines(&text);
                let at = usize::from(line) % (lines.len() + 1);
                lines.insert(at, pick(LINES, which).as_bytes().to_vec());
                unlines(&lines)
            }
            Edit::DeleteLine { line } => {
                let mut lines = lines(&text);
                lines.remove(usize::from(line) % lines.len());
                unlines(&lines)
            }
            Edit::DuplicateLine { line } => {
                let mut lines = lines(&text);
                let index = usize::from(line) % lines.len();
                lines.insert(index, lines[index].clone());
                unlines(&lines)
            }
            Edit::SwapLines { a, b } => {
                let mut lines = lines(&text);
                let count = lines.len();
                lines.swap(usize::from(a) % count, usize::from(b) % count);
                unlines(&lines)
            }
            Edit::Splice {
                seed,
                from,
                count,
                at,
            } => {
                let other = lines(&seeds[usize::from(seed) % seeds.len()].1);
                let from = usize::from(from) % other.len();
                let to = (from + usize::from(count % 16) + 1).min(other.len());
                let mut lines = lines(&text);
                let at = usize::from(at) % (lines.len() + 1);
                lines.splice(at..at, other[from..to].iter().cloned());
                unlines(&lines)
            }
        }
    }
}

#[derive(Default)]
struct Tally {
    accepted: AtomicUsize,
    rejected: AtomicUsize,
}

/// Loads `text` as the fixture's config and checks every property; panics
/// (through bolero) on a violation. Returns whether the config was accepted.
fn check_config(fixture: &Fixture, text: &[u8], options: &LoadOptions, tally: &Tally) -> bool {
    std::fs::write(&fixture.config, text).expect("writing the config under test");
    match std::panic::catch_unwind(|| check_loaded(fixture, options, tally)) {
        Ok(accepted) => accepted,
        Err(panic) => {
            save_failure(text);
            std::panic::resume_unwind(panic);
        }
    }
}

fn check_loaded(fixture: &Fixture, options: &LoadOptions, tally: &Tally) -> bool {
    match load(&fixture.config, options) {
        Ok(config) => {
            tally.accepted.fetch_add(1, Ordering::Relaxed);
            assert!(!config.builds.is_empty(), "an accepted config has a build");
            // What `imgbuild inspect` shows.
            let document = imgbuild::cli::inspect::document(&config);
            serde_json::to_string_pretty(&document).expect("an accepted config serializes");
            true
        }
        Err(diagnostics) => {
            tally.rejected.fetch_add(1, Ordering::Relaxed);
            assert!(!diagnostics.is_empty(), "a rejected config names a problem");
            for diagnostic in diagnostics.iter() {
                if let (Some(source), Some(span)) = (&diagnostic.source, &diagnostic.span) {
                    assert!(
                        span.start <= span.end
                            && span.end <= source.len()
                            && source.is_char_boundary(span.start)
                            && source.is_char_boundary(span.end),
                        "problem `{}` points at {span:?}, not whole characters within the file's {} bytes",
                        diagnostic.message,
                        source.len()
                    );
                    assert!(diagnostic.line_column().is_some());
                }
                serde_json::to_string(&diagnostic.to_json()).expect("a problem serializes");
            }
            diagnostics.render(false);
            diagnostics.render(true);
            false
        }
    }
}

/// Keeps a config that broke the loader where it survives the test run.
fn save_failure(text: &[u8]) {
    use sha2::Digest;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-config-failures");
    let name = format!("{}.toml", hex::encode(&sha2::Sha256::digest(text)[..8]));
    if std::fs::create_dir_all(&dir).is_ok() && std::fs::write(dir.join(&name), text).is_ok() {
        eprintln!(
            "the config that broke the loader is {}; once fixed, add it to tests/fuzz/corpus/config/",
            dir.join(name).display()
        );
    }
}

/// The seeds themselves load, and the valid ones are accepted: otherwise the
/// fuzzer would only explore the error paths of a broken fixture.
#[test]
fn every_seed_config_loads() {
    let fixture = Fixture::new();
    let tally = Tally::default();
    for (name, text) in seeds() {
        let accepted = check_config(&fixture, &text, &fixture.options(0), &tally);
        let expect_valid = !name.contains("invalid-") && !name.contains("regression-");
        if expect_valid && !accepted {
            let problems = load(&fixture.config, &fixture.options(0))
                .err()
                .map(|diagnostics| diagnostics.render(false))
                .unwrap_or_default();
            panic!("seed {name} should be valid:\n{problems}");
        }
    }
}

#[test]
fn the_config_loader_survives_edited_configs() {
    let seeds = seeds();
    let fixture = Fixture::new();
    let tally = Tally::default();
    let mut target = check!().with_type::<Case>();
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
    target.for_each(|case: &Case| {
        let text = case.text(&seeds);
        check_config(&fixture, &text, &fixture.options(case.inputs), &tally);
    });
    let (accepted, rejected) = (
        tally.accepted.load(Ordering::Relaxed),
        tally.rejected.load(Ordering::Relaxed),
    );
    eprintln!("config fuzzing: {accepted} edited configs accepted, {rejected} rejected");
}

// What the fuzzer found, through the command a person runs.

/// A template syntax error right before a multi-byte character used to
/// panic while the problem was rendered (exit 101, no message).
#[test]
fn a_template_error_beside_an_emoji_is_reported() {
    let workspace = Workspace::new();
    workspace.write("base.qcow2", "not really a disk, but a file");
    let config = std::fs::read_to_string(
        repo_root().join("tests/fuzz/corpus/config/regression-template-error-at-emoji.toml"),
    )
    .unwrap();
    workspace.write("image.toml", &config);
    workspace
        .imgbuild()
        .args(["validate", "image.toml"])
        .run()
        .exits_with(cli::EXIT_USAGE)
        .stderr_has("builders.vm.ssh.password: template error")
        .stderr_has("image.toml:15:15");
}

/// A Docker build whose `tags` repeat the version tag writes that tag once;
/// it used to be refused as racing with itself.
#[test]
fn a_docker_tag_equal_to_the_version_is_not_a_conflict() {
    let workspace = Workspace::new();
    workspace.write(
        "image.toml",
        "[image]\nname = \"app\"\nversion = \"1.0.0\"\n\n[builders.container]\ntype = \"docker\"\nimage = \"debian:bookworm\"\ntags = [\"latest\", \"{{ image.version }}\"]\n",
    );
    workspace
        .imgbuild()
        .args(["validate", "image.toml"])
        .run()
        .exits_with(cli::EXIT_OK)
        .stdout_has("image.toml is valid");
}
