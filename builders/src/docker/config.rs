//! The `[builders.NAME] type = "docker"` table, and the checks that need no
//! engine: reference syntax, `changes` instructions, volume specs.

use crate::ConfigProblem;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DockerConfig {
    /// The base image ("debian:bookworm", "registry.example.com/base@sha256:...").
    pub image: String,
    /// Whether to pull `image` before the build: `true`/`"always"` (so a
    /// moved tag is followed), `"missing"` (only when the engine lacks it),
    /// `false`/`"never"` (the engine must already have it).
    #[serde(default)]
    pub pull: PullPolicy,
    /// Repository of the committed image; the `[image]` name by default.
    /// The image is tagged `<repository>:<version>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// Tags besides the version (`latest`, `1.4`). Unlike the version tag
    /// these may move from an older image to the new one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// What the build container runs while provisioners work in it. It must
    /// keep running until the container is saved, and should exit on
    /// SIGTERM (it gets SIGKILL 10 s later). The default is a shell loop that
    /// does both on any image with `/bin/sh`, with no init needed.
    #[serde(default = "default_run_command")]
    pub run_command: Vec<String>,
    /// Mounts for the build container, `SOURCE:/path/in/container[:OPTIONS]`.
    /// A SOURCE starting with `/`, `./` or `../` is a host path (relative to
    /// the config file) and must exist; any other SOURCE names a Docker
    /// volume. Mounted content is never part of the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeSpec>,
    /// Environment for every command provisioners run in the container. It
    /// is not written into the image; use `changes = ["ENV NAME=value"]`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Runs the build container with all capabilities and devices.
    #[serde(default)]
    pub privileged: bool,
    /// `os/arch[/variant]` to pull and run, e.g. `linux/arm64`; the
    /// engine's own platform by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Dockerfile instructions applied to the committed image's config:
    /// `ENV`, `LABEL`, `EXPOSE`, `CMD`, `ENTRYPOINT`, `USER`, `WORKDIR`,
    /// `VOLUME`. They change metadata only; files are changed by provisioners.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<String>,
    /// The committed image's author.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// The committed image's commit message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Write the container's filesystem as a tar file here (relative to the
    /// config file) instead of committing an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_path: Option<PathBuf>,
    /// Keep nothing: provision, then throw the container away. For checking
    /// that provisioning works.
    #[serde(default)]
    pub discard: bool,
    /// Deliver the committed image once its `[[test]]`s passed: `true`
    /// pushes `<repository>:<version>` and `tags` to the repository's own
    /// registry; a list of repositories (`["registry.example.com/team/app"]`)
    /// tags the image into each and pushes the version and `tags` there.
    #[serde(default, skip_serializing_if = "Push::is_off")]
    pub push: Push,
}

/// Where the committed image is pushed. Written as a boolean or a list of
/// repositories, each checked as it is read so a typo is reported at its
/// line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Push {
    #[default]
    Off,
    /// The build's own repository.
    Own,
    /// These repositories (registry host included), in order.
    To(Vec<String>),
}

impl Push {
    pub fn is_off(&self) -> bool {
        matches!(self, Push::Off)
    }

    /// The repositories pushed to, the build's own being `repository`.
    pub fn repositories(&self, repository: &str) -> Vec<String> {
        match self {
            Push::Off => Vec::new(),
            Push::Own => vec![repository.to_owned()],
            Push::To(repositories) => repositories.clone(),
        }
    }
}

impl Serialize for Push {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Push::Off => serializer.serialize_bool(false),
            Push::Own => serializer.serialize_bool(true),
            Push::To(repositories) => repositories.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Push {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Push;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "true, false, or a list of repositories like [\"registry.example.com/team/app\"]",
                )
            }
            fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<Push, E> {
                Ok(if value { Push::Own } else { Push::Off })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Push, A::Error> {
                let mut repositories: Vec<String> = Vec::new();
                while let Some(repository) = seq.next_element::<String>()? {
                    check_push_repository(&repository).map_err(serde::de::Error::custom)?;
                    if repositories.contains(&repository) {
                        return Err(serde::de::Error::custom(format!(
                            "`{repository}` is listed twice; list each repository once"
                        )));
                    }
                    repositories.push(repository);
                }
                if repositories.is_empty() {
                    return Err(serde::de::Error::custom(
                        "the list of repositories to push to is empty; list at least one, or write `push = false`",
                    ));
                }
                Ok(Push::To(repositories))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A repository to push to: a name without tag or digest (the tags come
/// from the version and `tags`).
fn check_push_repository(repository: &str) -> Result<(), String> {
    let last = repository.rsplit('/').next().unwrap_or_default();
    if repository.contains('@') || last.contains(':') {
        return Err(format!(
            "`{repository}` names a tag or digest; write the repository alone, like \"registry.example.com/team/app\": the version and `tags` are pushed to it"
        ));
    }
    check_repository(repository)
}

/// When to pull the base image. Written as a boolean or as the words of
/// `docker run --pull`, which also lets a template choose it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PullPolicy {
    #[default]
    Always,
    Missing,
    Never,
}

impl<'de> Deserialize<'de> for PullPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = PullPolicy;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("true, false, \"always\", \"missing\" or \"never\"")
            }
            fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<PullPolicy, E> {
                Ok(if value {
                    PullPolicy::Always
                } else {
                    PullPolicy::Never
                })
            }
            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<PullPolicy, E> {
                match value {
                    "always" | "true" => Ok(PullPolicy::Always),
                    "missing" => Ok(PullPolicy::Missing),
                    "never" | "false" => Ok(PullPolicy::Never),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

pub fn default_run_command() -> Vec<String> {
    // `sleep & wait` rather than a bare `sleep`: a shell runs its traps
    // only between commands, but interrupts `wait` for them.
    [
        "/bin/sh",
        "-c",
        "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done",
    ]
    .map(String::from)
    .to_vec()
}

/// What the build produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Commit and tag an image (the default).
    Commit,
    /// Write the filesystem as a tar file.
    Export(PathBuf),
    Discard,
}

impl DockerConfig {
    pub fn output(&self, config_dir: &Path) -> Output {
        match (&self.export_path, self.discard) {
            (Some(path), _) => Output::Export(config_dir.join(path)),
            (None, true) => Output::Discard,
            (None, false) => Output::Commit,
        }
    }

    /// The repository the image is tagged in.
    pub fn repository(&self, image_name: &str) -> String {
        self.repository
            .clone()
            .unwrap_or_else(|| image_name.to_owned())
    }

    /// `KEY=value` pairs for the exec API.
    pub fn exec_env(&self) -> Vec<String> {
        self.env
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect()
    }

    /// Bind and volume specs for the engine, host paths made absolute.
    pub fn binds(&self, config_dir: &Path) -> Vec<String> {
        self.volumes
            .iter()
            .map(|volume| {
                if !volume.is_host_path {
                    return volume.to_string();
                }
                let host = config_dir.join(&volume.source);
                let host = std::fs::canonicalize(&host).unwrap_or(host);
                let mut bind = format!("{}:{}", host.display(), volume.target);
                if let Some(options) = &volume.options {
                    bind.push(':');
                    bind.push_str(options);
                }
                bind
            })
            .collect()
    }

    pub fn problems(&self, config_dir: &Path) -> Vec<ConfigProblem> {
        let mut problems = Vec::new();
        if let Err(message) = check_image_reference(&self.image) {
            problems.push(ConfigProblem::new("image", message));
        }
        if let Some(repository) = &self.repository
            && let Err(message) = check_repository(repository)
        {
            problems.push(ConfigProblem::new("repository", message));
        }
        for (index, tag) in self.tags.iter().enumerate() {
            if let Err(message) = check_tag(tag) {
                problems.push(ConfigProblem::new(format!("tags[{index}]"), message));
            }
        }
        match self.run_command.first() {
            None => problems.push(ConfigProblem::new(
                "run_command",
                "must name a program that keeps running, e.g. [\"/bin/sh\", \"-c\", \"while :; do sleep 3600; done\"]",
            )),
            Some(program) if program.trim().is_empty() => problems.push(ConfigProblem::new(
                "run_command[0]",
                "the program to run must not be empty",
            )),
            Some(_) => {}
        }
        for (index, volume) in self.volumes.iter().enumerate() {
            if !volume.is_host_path {
                continue;
            }
            let host = config_dir.join(&volume.source);
            if !host.exists() {
                problems.push(ConfigProblem::new(
                    format!("volumes[{index}]"),
                    format!(
                        "the host path {} does not exist; create it first (the engine would otherwise create an empty root-owned directory)",
                        host.display()
                    ),
                ));
            }
        }
        for name in self.env.keys() {
            if name.is_empty() || name.contains('=') || name.contains(char::is_whitespace) {
                problems.push(ConfigProblem::new(
                    "env",
                    format!("`{name}` is not a usable environment variable name (it must be non-empty, without `=` or spaces)"),
                ));
            }
        }
        if let Some(platform) = &self.platform
            && let Err(message) = check_platform(platform)
        {
            problems.push(ConfigProblem::new("platform", message));
        }
        for (index, change) in self.changes.iter().enumerate() {
            if let Err(message) = check_change(change) {
                problems.push(ConfigProblem::new(
                    format!("changes[{index}]"),
                    format!("`{change}`: {message}"),
                ));
            }
        }
        if let Some(path) = &self.export_path {
            if self.discard {
                problems.push(ConfigProblem::new(
                    "discard",
                    "`discard = true` and `export_path` contradict each other: keep one (an image is committed when neither is set)",
                ));
            }
            if path.as_os_str().is_empty()
                || path.file_name().is_none()
                || path.to_string_lossy().ends_with('/')
            {
                problems.push(ConfigProblem::new(
                    "export_path",
                    format!(
                        "`{}` does not name a file; write it like \"output/rootfs.tar\"",
                        path.display()
                    ),
                ));
            }
        }
        if self.export_path.is_some() || self.discard {
            let mode = if self.discard {
                "`discard = true`"
            } else {
                "`export_path`"
            };
            let commit_only: [(&str, bool); 6] = [
                ("push", !self.push.is_off()),
                ("repository", self.repository.is_some()),
                ("tags", !self.tags.is_empty()),
                ("changes", !self.changes.is_empty()),
                ("author", self.author.is_some()),
                ("message", self.message.is_some()),
            ];
            for (field, set) in commit_only {
                if set {
                    problems.push(ConfigProblem::new(
                        field,
                        format!("`{field}` only applies to a committed image, and with {mode} nothing is committed; remove one of them"),
                    ));
                }
            }
        }
        problems
    }
}

/// A `volumes` entry, `SOURCE:/path/in/container[:OPTIONS]`, taken apart
/// when the config is read. Serializes back to the text as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeSpec {
    text: String,
    pub source: String,
    pub target: String,
    pub options: Option<String>,
    /// A SOURCE starting with `/`, `./` or `../` (or `.`, `..`), relative
    /// to the config file; any other SOURCE names a Docker volume.
    pub is_host_path: bool,
}

impl TryFrom<String> for VolumeSpec {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        VolumeSpec::parse(&text)
    }
}

impl From<VolumeSpec> for String {
    fn from(volume: VolumeSpec) -> String {
        volume.text
    }
}

impl std::fmt::Display for VolumeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

const VOLUME_OPTIONS: &[&str] = &[
    "ro",
    "rw",
    "z",
    "Z",
    "nocopy",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "private",
    "rprivate",
    "delegated",
    "cached",
    "consistent",
];

impl VolumeSpec {
    pub fn parse(spec: &str) -> Result<VolumeSpec, String> {
        let parts: Vec<&str> = spec.split(':').collect();
        let (source, target, options) = match parts.as_slice() {
            [source, target] => (*source, *target, None),
            [source, target, options] => (*source, *target, Some(*options)),
            _ => {
                return Err(format!(
                    "`{spec}` is not SOURCE:/path/in/container[:OPTIONS] (host paths start with `/`, `./` or `../`)"
                ));
            }
        };
        if source.is_empty() {
            return Err(format!("`{spec}` has no SOURCE before the `:`"));
        }
        if !target.starts_with('/') {
            return Err(format!(
                "`{spec}`: the path in the container, `{target}`, must be absolute"
            ));
        }
        if let Some(options) = options {
            for option in options.split(',') {
                if !VOLUME_OPTIONS.contains(&option) {
                    return Err(format!(
                        "`{spec}`: unknown mount option `{option}`; use {}",
                        VOLUME_OPTIONS.join(", ")
                    ));
                }
            }
        }
        let is_host_path = source.starts_with('/')
            || source.starts_with("./")
            || source.starts_with("../")
            || source == "."
            || source == "..";
        Ok(VolumeSpec {
            text: spec.to_owned(),
            source: source.to_owned(),
            target: target.to_owned(),
            options: options.map(str::to_owned),
            is_host_path,
        })
    }
}

fn check_platform(platform: &str) -> Result<(), String> {
    let parts: Vec<&str> = platform.split('/').collect();
    let well_formed = (2..=3).contains(&parts.len())
        && parts.iter().all(|part| {
            !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
    if well_formed {
        Ok(())
    } else {
        Err(format!(
            "`{platform}` is not a platform; write it as os/arch[/variant], e.g. \"linux/amd64\" or \"linux/arm64/v8\""
        ))
    }
}

// ---------------------------------------------------------------------------
// Image references, after the grammar in distribution/reference: a name of
// lowercase path components, optionally behind a registry host, then an
// optional `:tag` and an optional `@digest`.

const COMPONENT_RULE: &str =
    "path components are lowercase letters and digits, joined by `.`, `_`, `__` or dashes";

/// Splits a reference into its name and the tag or digest to pull. No tag
/// means `latest`: the pull API would otherwise fetch every tag.
pub fn split_reference(reference: &str) -> (String, String) {
    if let Some((name, digest)) = reference.split_once('@') {
        return (name.to_owned(), digest.to_owned());
    }
    let last_slash = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last_slash..].rfind(':') {
        Some(colon) => {
            let colon = last_slash + colon;
            (
                reference[..colon].to_owned(),
                reference[colon + 1..].to_owned(),
            )
        }
        None => (reference.to_owned(), "latest".to_owned()),
    }
}

pub fn check_image_reference(reference: &str) -> Result<(), String> {
    if reference.trim().is_empty() {
        return Err(
            "the base image must not be empty; write it like \"debian:bookworm\"".to_owned(),
        );
    }
    let (name, digest) = match reference.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (reference, None),
    };
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name[last_slash..].rfind(':') {
        Some(colon) => (
            &name[..last_slash + colon],
            Some(&name[last_slash + colon + 1..]),
        ),
        None => (name, None),
    };
    check_repository(name)
        .map_err(|message| format!("`{reference}` is not an image reference: {message}"))?;
    if let Some(tag) = tag {
        check_tag(tag)
            .map_err(|message| format!("`{reference}` is not an image reference: {message}"))?;
    }
    if let Some(digest) = digest {
        let valid = match digest.split_once(':') {
            Some((algorithm, hex)) => {
                !algorithm.is_empty()
                    && algorithm
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                    && hex.len() >= 32
                    && hex.chars().all(|c| c.is_ascii_hexdigit())
            }
            None => false,
        };
        if !valid {
            return Err(format!(
                "`{reference}` is not an image reference: `{digest}` is not a digest (sha256:<64 hex digits>)"
            ));
        }
    }
    Ok(())
}

/// A repository name without tag or digest.
pub fn check_repository(repository: &str) -> Result<(), String> {
    if repository.is_empty() {
        return Err("the repository name is empty".to_owned());
    }
    if repository.len() > 255 {
        return Err(format!("`{repository}` is longer than 255 characters"));
    }
    let mut components: Vec<&str> = repository.split('/').collect();
    // The first component is a registry host when it looks like one, as the
    // Docker CLI decides.
    if components.len() > 1 {
        let first = components[0];
        if first.contains('.') || first.contains(':') || first == "localhost" {
            check_registry_host(first).map_err(|message| format!("`{repository}`: {message}"))?;
            components.remove(0);
        }
    }
    for component in components {
        if !is_path_component(component) {
            let hint = if component.chars().any(|c| c.is_ascii_uppercase()) {
                " (uppercase letters are not allowed)"
            } else {
                ""
            };
            return Err(format!(
                "`{repository}` is not a valid repository name: `{component}` is not a path component{hint}; {COMPONENT_RULE}"
            ));
        }
    }
    Ok(())
}

fn check_registry_host(host: &str) -> Result<(), String> {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let name_ok = !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    let port_ok = port.is_none_or(|port| !port.is_empty() && port.parse::<u16>().is_ok());
    if name_ok && port_ok {
        Ok(())
    } else {
        Err(format!("`{host}` is not a registry host[:port]"))
    }
}

fn is_path_component(component: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if component.is_empty()
        || !component.starts_with(alnum)
        || !component.ends_with(alnum)
        || !component
            .chars()
            .all(|c| alnum(c) || matches!(c, '.' | '_' | '-'))
    {
        return false;
    }
    component
        .split(alnum)
        .filter(|separator| !separator.is_empty())
        .all(|separator| {
            matches!(separator, "." | "_" | "__") || separator.chars().all(|c| c == '-')
        })
}

/// A tag: up to 128 of letters, digits, `_`, `.`, `-`, not starting with
/// `.` or `-`.
pub fn check_tag(tag: &str) -> Result<(), String> {
    let valid = !tag.is_empty()
        && tag.len() <= 128
        && tag.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "`{tag}` is not a valid tag: up to 128 letters, digits, `_`, `.` and `-`, not starting with `.` or `-`"
        ))
    }
}

// ---------------------------------------------------------------------------
// `changes`: the engine applies them (with Dockerfile semantics, variable
// expansion included) while committing. They are checked here so a typo is
// reported by `imgbuild validate`, not after a long provisioning run.

pub const SUPPORTED_CHANGES: &str = "ENV, LABEL, EXPOSE, CMD, ENTRYPOINT, USER, WORKDIR, VOLUME";

pub fn check_change(change: &str) -> Result<(), String> {
    let change = change.trim();
    if change.is_empty() {
        return Err("the instruction is empty".to_owned());
    }
    // The engine joins all changes into one Dockerfile; these would merge
    // entries or hide them.
    if change.contains(['\n', '\r']) {
        return Err("must be a single line; give each instruction as its own entry".to_owned());
    }
    if change.ends_with('\\') {
        return Err(
            "must not end with a `\\` line continuation; give each instruction as its own entry"
                .to_owned(),
        );
    }
    if change.starts_with('#') {
        return Err("is a Dockerfile comment and would be ignored; remove it".to_owned());
    }
    let (keyword, arguments) = match change.split_once(char::is_whitespace) {
        Some((keyword, arguments)) => (keyword, arguments.trim()),
        None => (change, ""),
    };
    match keyword.to_ascii_uppercase().as_str() {
        "ENV" => check_name_values("ENV", arguments, "ENV NAME=value"),
        "LABEL" => check_name_values("LABEL", arguments, "LABEL key=value"),
        "EXPOSE" => check_expose(arguments),
        "CMD" | "ENTRYPOINT" => check_command(&keyword.to_ascii_uppercase(), arguments),
        "USER" => {
            let words = split_words(arguments)?;
            match words.as_slice() {
                [user] if !user.is_empty() => Ok(()),
                _ => Err("USER takes one user, `user[:group]` or `uid[:gid]`".to_owned()),
            }
        }
        "WORKDIR" => {
            if arguments.is_empty() {
                Err("WORKDIR needs a path".to_owned())
            } else {
                Ok(())
            }
        }
        "VOLUME" => {
            if arguments.starts_with('[') {
                let paths = parse_json_array("VOLUME", arguments)?;
                if paths.is_empty() || paths.iter().any(|p| p.trim().is_empty()) {
                    return Err("VOLUME needs at least one non-empty path".to_owned());
                }
                Ok(())
            } else if split_words(arguments)?.is_empty() {
                Err("VOLUME needs at least one path".to_owned())
            } else {
                Ok(())
            }
        }
        "RUN" | "COPY" | "ADD" => Err(format!(
            "{keyword} changes files, which `changes` cannot do; use a shell or file provisioner instead (supported here: {SUPPORTED_CHANGES})"
        )),
        _ => Err(format!(
            "`{keyword}` cannot be applied to a committed image; supported instructions: {SUPPORTED_CHANGES}"
        )),
    }
}

fn check_name_values(instruction: &str, arguments: &str, example: &str) -> Result<(), String> {
    let words = split_words(arguments)?;
    let Some(first) = words.first() else {
        return Err(format!(
            "{instruction} needs at least one pair; write `{example}`"
        ));
    };
    if first.contains('=') {
        for word in &words {
            match word.split_once('=') {
                Some((name, _)) if !name.is_empty() => {}
                Some(_) => {
                    return Err(format!(
                        "`{word}` has no name before the `=`; write `{example}`"
                    ));
                }
                None => {
                    return Err(format!(
                        "`{word}` is not name=value (quote values that contain spaces); write `{example}`"
                    ));
                }
            }
        }
        Ok(())
    } else if words.len() < 2 {
        Err(format!(
            "{instruction} `{first}` has no value; write `{example}`"
        ))
    } else {
        // The legacy `ENV NAME value with spaces` form.
        Ok(())
    }
}

fn check_expose(arguments: &str) -> Result<(), String> {
    let words = split_words(arguments)?;
    if words.is_empty() {
        return Err("EXPOSE needs at least one port, e.g. `EXPOSE 8080/tcp`".to_owned());
    }
    for word in &words {
        // Left to the engine, which expands variables first.
        if word.contains('$') {
            continue;
        }
        let (ports, protocol) = match word.split_once('/') {
            Some((ports, protocol)) => (ports, Some(protocol)),
            None => (word.as_str(), None),
        };
        if let Some(protocol) = protocol
            && !matches!(
                protocol.to_ascii_lowercase().as_str(),
                "tcp" | "udp" | "sctp"
            )
        {
            return Err(format!("`{word}`: the protocol must be tcp, udp or sctp"));
        }
        let port = |text: &str| text.parse::<u16>().ok().filter(|p| *p > 0);
        let valid = match ports.split_once('-') {
            Some((low, high)) => {
                matches!((port(low), port(high)), (Some(low), Some(high)) if low <= high)
            }
            None => port(ports).is_some(),
        };
        if !valid {
            return Err(format!(
                "`{word}` is not a port: write PORT[/PROTOCOL] or LOW-HIGH[/PROTOCOL], ports 1-65535"
            ));
        }
    }
    Ok(())
}

fn check_command(instruction: &str, arguments: &str) -> Result<(), String> {
    if arguments.starts_with('[') {
        parse_json_array(instruction, arguments).map(|_| ())
    } else if arguments.is_empty() {
        Err(format!(
            "{instruction} needs a command: `{instruction} [\"executable\", \"arg\"]` (or `{instruction} []` to clear it)"
        ))
    } else {
        Ok(())
    }
}

/// The exec form. The engine silently runs malformed JSON (single quotes, a
/// missing comma) as a shell command instead, which is never what was meant.
fn parse_json_array(instruction: &str, arguments: &str) -> Result<Vec<String>, String> {
    serde_json::from_str::<Vec<String>>(arguments).map_err(|err| {
        format!(
            "{instruction} looks like the exec form but is not a JSON array of strings ({err}); write it as [\"executable\", \"arg\"] with double quotes, or drop the brackets for the shell form"
        )
    })
}

/// Splits like the Dockerfile parser: whitespace separates words, quotes
/// group them, a backslash escapes the next character.
fn split_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') | (None, '\\') => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
                in_word = true;
            }
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if let Some(q) = quote {
        return Err(format!("unterminated {q} quote"));
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> DockerConfig {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn pull_takes_booleans_and_docker_words() {
        let pull = |value: serde_json::Value| {
            serde_json::from_value::<DockerConfig>(serde_json::json!({"image": "x", "pull": value}))
                .map(|c| c.pull)
        };
        assert_eq!(pull(true.into()).unwrap(), PullPolicy::Always);
        assert_eq!(pull(false.into()).unwrap(), PullPolicy::Never);
        assert_eq!(pull("missing".into()).unwrap(), PullPolicy::Missing);
        assert_eq!(pull("false".into()).unwrap(), PullPolicy::Never);
        assert!(pull("sometimes".into()).is_err());
    }

    #[test]
    fn push_takes_a_boolean_or_repositories_checked_as_read() {
        let push = |value: serde_json::Value| {
            serde_json::from_value::<DockerConfig>(serde_json::json!({"image": "x", "push": value}))
                .map(|c| c.push)
                .map_err(|err| err.to_string())
        };
        assert_eq!(push(false.into()).unwrap(), Push::Off);
        assert_eq!(push(true.into()).unwrap(), Push::Own);
        assert_eq!(
            push(serde_json::json!([
                "registry.example.com:5000/team/app",
                "team/app"
            ]))
            .unwrap(),
            Push::To(vec![
                "registry.example.com:5000/team/app".into(),
                "team/app".into()
            ])
        );
        assert_eq!(
            Push::Own.repositories("web"),
            vec!["web".to_owned()],
            "true pushes the build's own repository"
        );
        for (value, message) in [
            (
                serde_json::json!(["r.example.com/app:1.0"]),
                "names a tag or digest",
            ),
            (
                serde_json::json!(["r.example.com/app@sha256:00"]),
                "names a tag or digest",
            ),
            (serde_json::json!(["r.example.com/App"]), "uppercase"),
            (serde_json::json!(["a/b", "a/b"]), "listed twice"),
            (serde_json::json!([]), "is empty"),
            (serde_json::json!("yes"), "a list of repositories"),
        ] {
            let err = push(value.clone()).unwrap_err();
            assert!(err.contains(message), "{value}: {err}");
        }
        // Written back as it was read, for `inspect`.
        let config: DockerConfig =
            serde_json::from_value(serde_json::json!({"image": "x", "push": ["r.example.com/a"]}))
                .unwrap();
        assert_eq!(
            serde_json::to_value(&config).unwrap()["push"],
            serde_json::json!(["r.example.com/a"])
        );
        let exported = config_with_push_and_export();
        let fields: Vec<String> = exported
            .problems(Path::new("/cfg"))
            .into_iter()
            .map(|p| p.field)
            .collect();
        assert_eq!(fields, vec!["push"]);
    }

    fn config_with_push_and_export() -> DockerConfig {
        config(serde_json::json!({"image": "x", "push": true, "export_path": "out/fs.tar"}))
    }

    #[test]
    fn defaults_and_unknown_fields() {
        let c = config(serde_json::json!({"image": "debian:bookworm"}));
        assert_eq!(c.pull, PullPolicy::Always);
        assert_eq!(c.run_command, default_run_command());
        assert_eq!(c.output(Path::new("/cfg")), Output::Commit);
        assert!(c.problems(Path::new("/cfg")).is_empty());
        let err = serde_json::from_value::<DockerConfig>(
            serde_json::json!({"image": "x", "commit": true}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `commit`"), "{err}");
    }

    #[test]
    fn references_follow_the_docker_grammar() {
        for good in [
            "debian",
            "debian:bookworm",
            "library/debian:12.5-slim",
            "registry.example.com:5000/team/app_x__y:1",
            "localhost/app",
            "ghcr.io/o/a@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "a-b---c.d_e",
        ] {
            assert!(check_image_reference(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Debian",
            "debian:",
            "debian:-x",
            "a..b",
            "a___b",
            "-a",
            "a@sha256:xyz",
            "re g",
        ] {
            assert!(check_image_reference(bad).is_err(), "{bad}");
        }
        assert!(
            check_repository("My/App")
                .unwrap_err()
                .contains("uppercase")
        );
    }

    #[test]
    fn references_split_into_name_and_tag() {
        let split = |r: &str| split_reference(r);
        assert_eq!(split("debian"), ("debian".into(), "latest".into()));
        assert_eq!(split("debian:12"), ("debian".into(), "12".into()));
        assert_eq!(
            split("localhost:5000/app"),
            ("localhost:5000/app".into(), "latest".into())
        );
        assert_eq!(
            split("localhost:5000/app:v1"),
            ("localhost:5000/app".into(), "v1".into())
        );
        assert_eq!(split("app@sha256:abc"), ("app".into(), "sha256:abc".into()));
    }

    #[test]
    fn changes_are_checked_one_by_one() {
        for good in [
            "ENV A=1 B=\"two words\"",
            "ENV LEGACY value with spaces",
            "env lower=case",
            "LABEL org.example.team=infra",
            "EXPOSE 80 443/tcp 5000-5010/udp $PORT",
            "CMD [\"/usr/bin/app\", \"--serve\"]",
            "CMD []",
            "CMD app --serve",
            "ENTRYPOINT [\"/entry\"]",
            "USER app:app",
            "WORKDIR /srv",
            "VOLUME /data /logs",
            "VOLUME [\"/data\"]",
        ] {
            assert!(
                check_change(good).is_ok(),
                "{good}: {:?}",
                check_change(good)
            );
        }
        let message = |change: &str| check_change(change).unwrap_err();
        assert!(message("RUN apt-get update").contains("provisioner"));
        assert!(message("FROM debian").contains("supported instructions"));
        assert!(message("ENV").contains("at least one"));
        assert!(message("ENV FOO").contains("no value"));
        assert!(message("ENV =x").contains("no name"));
        assert!(message("ENV A=1 B").contains("not name=value"));
        assert!(message("LABEL a=\"open").contains("unterminated"));
        assert!(message("EXPOSE 99999").contains("not a port"));
        assert!(message("EXPOSE 80/http").contains("protocol"));
        assert!(message("CMD ['app']").contains("JSON"));
        assert!(message("CMD").contains("needs a command"));
        assert!(message("USER a b").contains("one user"));
        assert!(message("WORKDIR").contains("path"));
        assert!(message("ENV A=1 \\").contains("continuation"));
        assert!(message("ENV A=1\nRUN x").contains("single line"));
        assert!(message("# ENV A=1").contains("comment"));
    }

    #[test]
    fn problems_name_the_bad_entry() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let c = config(serde_json::json!({
            "image": "debian:bookworm",
            "tags": ["latest", "-bad"],
            "changes": ["ENV OK=1", "EXPOSE 80/http"],
            "volumes": ["./data:/data:ro", "./missing:/m", "cache:/var/cache"],
            "platform": "linux",
            "run_command": [],
        }));
        let problems = c.problems(dir.path());
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "tags[1]",
                "run_command",
                "volumes[1]",
                "platform",
                "changes[1]"
            ],
            "{problems:?}"
        );
        let change = problems.iter().find(|p| p.field == "changes[1]").unwrap();
        assert!(
            change.message.starts_with("`EXPOSE 80/http`"),
            "{}",
            change.message
        );
    }

    #[test]
    fn volume_specs_are_checked_when_read() {
        let volumes = |specs: serde_json::Value| {
            serde_json::from_value::<DockerConfig>(
                serde_json::json!({"image": "x", "volumes": specs}),
            )
            .map(|c| c.volumes)
        };
        let good = volumes(serde_json::json!([
            "./data:/data:ro,z",
            "cache:/cache",
            "/:/host"
        ]))
        .unwrap();
        assert_eq!(
            (
                good[0].source.as_str(),
                good[0].target.as_str(),
                good[0].options.as_deref()
            ),
            ("./data", "/data", Some("ro,z"))
        );
        assert!(good[0].is_host_path && !good[1].is_host_path && good[2].is_host_path);
        assert_eq!(good[1].options, None);
        let config = serde_json::from_value::<DockerConfig>(
            serde_json::json!({"image": "x", "volumes": ["./data:/data:ro"]}),
        )
        .unwrap();
        assert_eq!(
            serde_json::to_value(&config).unwrap()["volumes"],
            serde_json::json!(["./data:/data:ro"])
        );
        for (spec, message) in [
            ("nocolon", "is not SOURCE:/path/in/container[:OPTIONS]"),
            (":/data", "has no SOURCE"),
            ("cache:data", "must be absolute"),
            ("cache:/data:rw,bogus", "unknown mount option `bogus`"),
        ] {
            let err = volumes(serde_json::json!([spec])).unwrap_err().to_string();
            assert!(err.contains(message), "{spec}: {err}");
        }
    }

    #[test]
    fn exactly_one_output() {
        let c = config(serde_json::json!({
            "image": "debian", "export_path": "out/rootfs.tar", "discard": true,
            "tags": ["latest"], "changes": ["ENV A=1"],
        }));
        let problems = c.problems(Path::new("/cfg"));
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, vec!["discard", "tags", "changes"], "{problems:?}");
        assert_eq!(
            c.output(Path::new("/cfg")),
            Output::Export("/cfg/out/rootfs.tar".into())
        );
    }

    #[test]
    fn host_paths_in_volumes_are_resolved_against_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let c = config(
            serde_json::json!({"image": "x", "volumes": ["./data:/data:ro", "cache:/cache"]}),
        );
        let binds = c.binds(dir.path());
        let canonical = std::fs::canonicalize(dir.path().join("data")).unwrap();
        assert_eq!(binds[0], format!("{}:/data:ro", canonical.display()));
        assert_eq!(binds[1], "cache:/cache");
    }
}
