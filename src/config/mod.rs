//! Reading `image.toml`: parsing, variables, templating and validation, all
//! before anything is launched. Every problem is reported with its file,
//! line, column and field.

pub mod diagnostic;
mod render;
pub mod variables;

use diagnostic::{Diagnostic, Diagnostics, did_you_mean, explain_serde_message};
use imgbuild_builders::registry::{self as builder_registry, BuilderKindError};
use imgbuild_builders::{Builder, ImageInfo, SbomFormats};
use imgbuild_core::ConfigProblem;
use imgbuild_core::{Redactor, template};
use imgbuild_provisioners::Provisioner;
use imgbuild_provisioners::image_test::ImageTest;
use imgbuild_provisioners::registry::{
    self as provisioner_registry, ParseError, ParseInput, Parsed, ProvisionerKind,
};
use render::{Renderer, join};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};
pub use variables::{Variable, VariableInputs};

const TOP_LEVEL: &[&str] = &[
    "image",
    "variables",
    "builders",
    "provision",
    "test",
    "cache",
];
const SECTIONS_HELP: &str =
    "a config has [image], [variables], [builders.NAME], [[provision]], [[test]] and [cache]";

/// The fields of a `[[test]]` handed to the shell provisioner kind; the
/// others a shell provisioner takes (`expect_disconnect`, `max_retries`,
/// ...) make no sense for a check and are refused.
const TEST_SHELL_FIELDS: &[&str] = &[
    "inline",
    "script",
    "scripts",
    "env",
    "valid_exit_codes",
    "timeout",
];
/// The fields only a `[[test]]` has, handled here.
const TEST_OWN_FIELDS: &[&str] = &["name", "retries", "retry_delay"];

/// What a run was asked for, besides the config file.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub variables: VariableInputs,
    pub run_id: String,
    pub started: time::OffsetDateTime,
    /// `--only`: build just these.
    pub only: Vec<String>,
    /// `--except`: build all but these.
    pub except: Vec<String>,
}

/// A config, fully resolved and validated.
pub struct Config {
    pub path: PathBuf,
    pub dir: PathBuf,
    pub image: ImageInfo,
    pub variables: Vec<Variable>,
    /// The builds selected by `--only`/`--except`, in config order.
    pub builds: Vec<Build>,
    /// Builds left out by `--only`/`--except`.
    pub excluded: Vec<String>,
    /// Masks the values of sensitive variables everywhere.
    pub redactor: Redactor,
    /// What happens to an artifact whose tests fail (`[image]
    /// on_test_failure`).
    pub on_test_failure: OnTestFailure,
    /// `[image] sbom`: which SBOM documents every build writes beside its
    /// artifact (default both).
    pub sbom: SbomFormats,
    /// `[cache]`: where the step cache lives and how large it may grow.
    pub cache: CacheSettings,
    /// This run's `run_id`, `timestamp` and `isotime` as templates render
    /// them: masked, like the version, where `--skip-unchanged` compares.
    pub run_values: Vec<String>,
}

/// `[cache]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    /// The step store's directory (relative to the config); the default is
    /// `IMGBUILD_CACHE_DIR`, else `~/.cache/imgbuild/steps`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// After each run, the least recently used entries go until the rest
    /// fit (also `IMGBUILD_CACHE_MAX_SIZE`).
    #[serde(default)]
    pub max_size: Option<imgbuild_core::ByteSize>,
    /// An object store the step store is shared through with other
    /// runners: `s3://bucket/prefix`, or a directory (relative to the
    /// config) every runner mounts. Also `IMGBUILD_CACHE_SHARED`.
    #[serde(default, deserialize_with = "shared_location")]
    pub shared: Option<String>,
}

fn shared_location<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    let location = String::deserialize(deserializer)?;
    imgbuild_builders::common::object_store::check_location(&location)
        .map_err(serde::de::Error::custom)?;
    Ok(Some(location))
}

/// `[image] on_test_failure`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnTestFailure {
    /// Record the artifact as `failed`; it exists and its version is taken.
    #[default]
    Keep,
    /// Remove the artifact, and record the failure.
    Delete,
}

pub struct Build {
    pub name: String,
    pub builder: Box<dyn Builder>,
    pub provisioners: Vec<Provisioner>,
    /// The provisioners' tables as resolved for this build.
    pub provisioner_configs: Vec<serde_json::Value>,
    /// What each provisioner's step key covers besides its table.
    pub steps: Vec<StepSource>,
    /// With `--skip-unchanged`, a recorded version older than this is
    /// rebuilt even when nothing changed (to pick up package updates).
    pub max_age: Option<Duration>,
    /// Local files the build reads (scripts, uploads, test scripts), for
    /// the inputs hash.
    pub input_files: Vec<PathBuf>,
    /// The `[[test]]`s that apply to this build, in config order.
    pub tests: Vec<ImageTest>,
    /// The tests' tables as resolved for this build.
    pub test_configs: Vec<serde_json::Value>,
    /// The builder's `sbom`, when it overrides `[image] sbom`.
    pub sbom: Option<SbomFormats>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageSection {
    name: String,
    version: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    on_test_failure: OnTestFailure,
    #[serde(default)]
    sbom: SbomFormats,
}

/// What `[image]` sets for every build besides the image's identity.
struct ImageOptions {
    on_test_failure: OnTestFailure,
    sbom: SbomFormats,
}

/// The fields of a `[[test]]` that are not the shell provisioner's.
#[derive(Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct TestOwnFields {
    name: String,
    /// Further attempts after a failure.
    #[serde(default)]
    retries: u32,
    #[serde(default = "default_retry_delay", with = "imgbuild_core::duration")]
    retry_delay: Duration,
}

fn default_retry_delay() -> Duration {
    Duration::from_secs(5)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionTargets {
    #[serde(default)]
    only: Vec<String>,
    #[serde(default)]
    except: Vec<String>,
}

/// A build name and its builder, parsed.
type NamedBuilder = (String, Box<dyn Builder>);
/// A build name and its builder type, whether or not its config parsed.
type BuilderKind = (String, String);

/// The provisioners that apply to one build, resolved for it.
#[derive(Default)]
struct Provisioning {
    provisioners: Vec<Provisioner>,
    configs: Vec<serde_json::Value>,
    steps: Vec<StepSource>,
}

/// What a provisioner's step key is made of, besides its resolved config.
#[derive(Debug, Clone)]
pub struct StepSource {
    /// The local files it reads (scripts, upload sources, playbooks).
    pub files: Vec<PathBuf>,
    /// Why its result is never reused: `cache = false`, or a per-run value
    /// (`run_id`, `timestamp`, `isotime`, `uuid()`) in its config.
    pub uncacheable: Option<String>,
}

/// The per-run values any string in `value` uses, templates not yet
/// rendered included (`execute_command` is rendered only at run time).
fn per_run_values(
    env: &minijinja::Environment<'static>,
    value: &Spanned<DeValue<'_>>,
) -> Vec<&'static str> {
    fn walk(
        env: &minijinja::Environment<'static>,
        value: &DeValue<'_>,
        found: &mut Vec<&'static str>,
    ) {
        match value {
            DeValue::String(text) => {
                for name in template::per_run_values(env, text) {
                    if !found.contains(&name) {
                        found.push(name);
                    }
                }
            }
            DeValue::Array(items) => items
                .iter()
                .for_each(|item| walk(env, item.get_ref(), found)),
            DeValue::Table(table) => table
                .iter()
                .for_each(|(_, item)| walk(env, item.get_ref(), found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(env, value.get_ref(), &mut found);
    found.sort_by_key(|name| template::PER_RUN_VALUES.iter().position(|n| n == name));
    found
}

/// The tests that apply to one build, resolved for it.
#[derive(Default)]
struct Testing {
    tests: Vec<ImageTest>,
    configs: Vec<serde_json::Value>,
    input_files: Vec<PathBuf>,
}

impl ProvisionTargets {
    fn applies_to(&self, build: &str) -> bool {
        (self.only.is_empty() || self.only.iter().any(|name| name == build))
            && !self.except.iter().any(|name| name == build)
    }
}

struct Loader<'a> {
    file: &'a Path,
    dir: PathBuf,
    source: Arc<str>,
    diagnostics: Diagnostics,
    /// Replaces `image.version` (`imgbuild test --version`).
    version: Option<String>,
    /// Each builder's `max_age`, taken out of its table before its kind
    /// parses it: it is the pipeline's setting, not the builder's.
    max_ages: BTreeMap<String, Duration>,
    /// A builder's own `sbom`, overriding `[image] sbom` for its build.
    sbom_overrides: BTreeMap<String, SbomFormats>,
}

pub fn load(path: &Path, options: &LoadOptions) -> Result<Config, Diagnostics> {
    load_version(path, options, None)
}

/// Loads the config as if its `image.version` were `version` (when given),
/// so that everything rendered from `{{ image.version }}`, a test's
/// expectations included, is about that version: `imgbuild test` of an
/// older recorded version.
pub fn load_version(
    path: &Path,
    options: &LoadOptions,
    version: Option<&str>,
) -> Result<Config, Diagnostics> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        Diagnostics(vec![
            Diagnostic::new(path, format!("cannot read the config: {err}"))
                .help("pass the path of an image.toml; see `imgbuild build --help`"),
        ])
    })?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    let mut loader = Loader {
        file: path,
        dir,
        source: Arc::from(text.as_str()),
        diagnostics: Diagnostics::default(),
        version: version.map(str::to_owned),
        max_ages: BTreeMap::new(),
        sbom_overrides: BTreeMap::new(),
    };
    let config = loader.load(&text, options);
    if loader.diagnostics.is_empty() {
        config
            .ok_or_else(|| Diagnostics(vec![Diagnostic::new(path, "the config could not be read")]))
    } else {
        Err(loader.diagnostics)
    }
}

impl Loader<'_> {
    fn error(&self, message: impl Into<String>, span: Range<usize>, field: &str) -> Diagnostic {
        Diagnostic::new(self.file, message)
            .at(&self.source, span)
            .field(field)
    }

    fn serde_error(
        &mut self,
        err: &toml::de::Error,
        fallback: Range<usize>,
        root: &Spanned<DeValue<'_>>,
        path: &str,
    ) {
        let (message, help) = explain_serde_message(err.message());
        let span = err.span().unwrap_or(fallback);
        let field = field_at(root, &span, path);
        let mut diagnostic = self.error(message, span, &field);
        if let Some(help) = help {
            diagnostic = diagnostic.help(help);
        }
        self.diagnostics.push(diagnostic);
    }

    fn load(&mut self, text: &str, options: &LoadOptions) -> Option<Config> {
        let document = match DeTable::parse(text) {
            Ok(document) => document,
            Err(err) => {
                let diagnostic = self
                    .error(
                        format!("invalid TOML: {}", err.message().trim()),
                        err.span().unwrap_or(0..0),
                        "",
                    )
                    .help("see https://toml.io for the syntax");
                self.diagnostics.push(diagnostic);
                return None;
            }
        };
        let top = document.get_ref();
        for (key, _) in top.iter() {
            let name: &str = key.get_ref();
            if !TOP_LEVEL.contains(&name) {
                let mut diagnostic =
                    self.error(format!("unknown section `{name}`"), key.span(), name);
                diagnostic = match did_you_mean(name, TOP_LEVEL.iter().copied()) {
                    Some(best) => {
                        diagnostic.help(format!("did you mean `{best}`? {SECTIONS_HELP}"))
                    }
                    None => diagnostic.help(SECTIONS_HELP),
                };
                self.diagnostics.push(diagnostic);
            }
        }

        let before_variables = self.diagnostics.len();
        let variables = variables::resolve(
            self.file,
            &self.source,
            top.get("variables"),
            &options.variables,
            &mut self.diagnostics,
        );
        if self.diagnostics.len() > before_variables {
            // Every template using a missing variable would fail too; those
            // echoes would bury the cause.
            return None;
        }
        let redactor = Redactor::new();
        for variable in variables.iter().filter(|v| v.sensitive) {
            redactor.add(variable.value.clone());
        }

        let env = template::environment();
        let git_sha = git_head(&self.dir);
        let mut context = serde_json::json!({
            "var": variables.iter().map(|v| (v.name.clone(), serde_json::Value::String(v.value.clone()))).collect::<serde_json::Map<_, _>>(),
            "timestamp": options.started.unix_timestamp(),
            "isotime": options.started.format(time::macros::format_description!("[year][month][day]T[hour][minute][second]Z")).unwrap_or_default(),
            "run_id": options.run_id,
        });
        if let Some(sha) = &git_sha {
            context["git_sha"] = sha.clone().into();
        }

        let image = self.image(top, &env, &context, options, git_sha.clone());
        if let Some((image, _)) = &image {
            context["image"] = serde_json::json!({"name": image.name, "version": image.version});
        }

        let (builders, kinds) = self.builders(top, &env, &context);
        let builder_names: Vec<String> = kinds.iter().map(|(name, _)| name.clone()).collect();
        let provisioners = self.provisioners(top, &env, &context, &kinds);
        let tests = self.tests(top, &env, &context, &kinds);

        // --only / --except must name builders that exist.
        for (flag, names) in [("--only", &options.only), ("--except", &options.except)] {
            for name in names {
                if !builder_names.contains(name) {
                    let mut diagnostic = Diagnostic::new(
                        self.file,
                        format!("{flag} names `{name}`, which is not a builder in this config"),
                    );
                    diagnostic = match did_you_mean(name, builder_names.iter().map(String::as_str))
                    {
                        Some(best) => diagnostic.help(format!("did you mean `{best}`?")),
                        None => diagnostic.help(format!("builders: {}", builder_names.join(", "))),
                    };
                    self.diagnostics.push(diagnostic);
                }
            }
        }
        let declared_builders = match top.get("builders").map(|b| b.get_ref()) {
            Some(DeValue::Table(table)) => table.len(),
            _ => 0,
        };
        if declared_builders == 0 && top.get("builders").is_some() {
            self.diagnostics.push(
                Diagnostic::new(self.file, "the config defines no builders")
                    .help("add a [builders.NAME] table with a `type`"),
            );
        }
        if top.get("builders").is_none() {
            self.diagnostics.push(
                Diagnostic::new(self.file, "the config has no [builders.NAME] table").help(
                    "add for example:\n[builders.vm]\ntype = \"qemu\"\nbase_image = \"base.qcow2\"",
                ),
            );
        }
        let cache = self.cache_section(top, &env, &context);
        let (
            image,
            ImageOptions {
                on_test_failure,
                sbom,
            },
        ) = image?;
        self.refuse_shared_claims(top, &builders, &image);
        self.refuse_untestable(top, &builders, &tests);
        if !self.diagnostics.is_empty() {
            return None;
        }
        for (_, builder) in &builders {
            for secret in builder.secrets() {
                redactor.add(secret);
            }
        }

        let mut provisioners_by_build = provisioners;
        let mut tests_by_build = tests;
        let mut builds = Vec::new();
        let mut excluded = Vec::new();
        for (name, builder) in builders {
            let selected = (options.only.is_empty() || options.only.contains(&name))
                && !options.except.contains(&name);
            if !selected {
                excluded.push(name);
                continue;
            }
            let provisioning = provisioners_by_build.remove(&name).unwrap_or_default();
            let testing = tests_by_build.remove(&name).unwrap_or_default();
            let mut input_files: Vec<PathBuf> = provisioning
                .steps
                .iter()
                .flat_map(|step| step.files.iter().cloned())
                .collect();
            input_files.extend(testing.input_files);
            builds.push(Build {
                max_age: self.max_ages.get(&name).copied(),
                sbom: self.sbom_overrides.get(&name).copied(),
                name,
                builder,
                provisioners: provisioning.provisioners,
                provisioner_configs: provisioning.configs,
                steps: provisioning.steps,
                input_files,
                tests: testing.tests,
                test_configs: testing.configs,
            });
        }
        if builds.is_empty() {
            self.diagnostics.push(Diagnostic::new(
                self.file,
                "--only/--except leave no build to run",
            ));
            return None;
        }
        Some(Config {
            path: self.file.to_path_buf(),
            dir: self.dir.clone(),
            image,
            variables,
            builds,
            excluded,
            redactor,
            on_test_failure,
            sbom,
            cache: cache.unwrap_or_default(),
            run_values: ["timestamp", "isotime", "run_id"]
                .iter()
                .filter_map(|name| match &context[*name] {
                    serde_json::Value::String(text) => Some(text.clone()),
                    serde_json::Value::Number(number) => Some(number.to_string()),
                    _ => None,
                })
                .collect(),
        })
    }

    fn image(
        &mut self,
        top: &DeTable<'_>,
        env: &minijinja::Environment<'static>,
        context: &serde_json::Value,
        options: &LoadOptions,
        revision: Option<String>,
    ) -> Option<(ImageInfo, ImageOptions)> {
        let Some(section) = top.get("image") else {
            self.diagnostics.push(
                Diagnostic::new(self.file, "the config has no [image] table")
                    .help("add:\n[image]\nname = \"my-image\"\nversion = \"1.0.0\""),
            );
            return None;
        };
        let mut section = section.clone();
        let before = self.diagnostics.len();
        let source = self.source.clone();
        let renderer = Renderer {
            env,
            context: &minijinja::Value::from_serialize(context),
            file: self.file,
            source: &source,
        };
        renderer.render_tree(&mut section, "image", &mut self.diagnostics);
        if self.diagnostics.len() > before {
            return None;
        }
        let mut parsed = match ImageSection::deserialize(ValueDeserializer::from(section.clone())) {
            Ok(parsed) => parsed,
            Err(err) => {
                self.serde_error(&err, section.span(), &section, "image");
                return None;
            }
        };
        if let Some(version) = &self.version {
            parsed.version = version.clone();
        }
        let mut ok = true;
        // What the build stamps as the image's creation time (labels, SBOM),
        // so that equal inputs give equal stamps.
        let source_date_epoch = match imgbuild_core::reproducible::source_date_epoch() {
            Ok(epoch) => epoch,
            Err(message) => {
                self.diagnostics.push(
                    Diagnostic::new(self.file, message)
                        .help("it sets the creation time imgbuild writes into labels and SBOMs, and is passed to shell provisioners"),
                );
                ok = false;
                None
            }
        };
        for (field, value) in [("name", &parsed.name), ("version", &parsed.version)] {
            if !is_artifact_word(value) {
                let span = find_span(&section, field).unwrap_or(section.span());
                let diagnostic = self
                    .error(format!("`{value}` cannot be used as an image {field}"), span, &format!("image.{field}"))
                    .help("use letters, digits, `.`, `_` and `-`, starting with a letter or digit: it becomes part of file names, tags and AMI names");
                self.diagnostics.push(diagnostic);
                ok = false;
            }
        }
        ok.then(|| {
            let image = ImageInfo {
                name: parsed.name,
                version: parsed.version,
                description: parsed.description,
                labels: parsed.labels,
                revision,
                created: source_date_epoch
                    .unwrap_or(options.started)
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            };
            let options = ImageOptions {
                on_test_failure: parsed.on_test_failure,
                sbom: parsed.sbom,
            };
            (image, options)
        })
    }

    /// `[cache]`, templates rendered; its `dir` made absolute.
    fn cache_section(
        &mut self,
        top: &DeTable<'_>,
        env: &minijinja::Environment<'static>,
        context: &serde_json::Value,
    ) -> Option<CacheSettings> {
        let mut section = top.get("cache")?.clone();
        let source = self.source.clone();
        let renderer = Renderer {
            env,
            context: &minijinja::Value::from_serialize(context),
            file: self.file,
            source: &source,
        };
        let before = self.diagnostics.len();
        renderer.render_tree(&mut section, "cache", &mut self.diagnostics);
        if self.diagnostics.len() > before {
            return None;
        }
        match CacheSettings::deserialize(ValueDeserializer::from(section.clone())) {
            Ok(mut settings) => {
                settings.dir = settings.dir.map(|dir| self.dir.join(dir));
                settings.shared = settings.shared.map(|shared| {
                    if shared.starts_with("s3://") {
                        shared
                    } else {
                        self.dir.join(shared).display().to_string()
                    }
                });
                Some(settings)
            }
            Err(err) => {
                self.serde_error(&err, section.span(), &section, "cache");
                None
            }
        }
    }

    /// Two builds that would write one output file, tag or AMI name would
    /// race for it at the end of the build; refused here instead, at the
    /// second build's table.
    fn refuse_shared_claims(
        &mut self,
        top: &DeTable<'_>,
        builders: &[NamedBuilder],
        image: &ImageInfo,
    ) {
        let mut claimed_by: BTreeMap<String, &str> = BTreeMap::new();
        for (name, builder) in builders {
            for claim in builder.claims(image, &self.dir) {
                let Some(first) = claimed_by.get(&claim).copied() else {
                    claimed_by.insert(claim, name);
                    continue;
                };
                if first == name {
                    // One build naming its own output twice (a tag equal to
                    // the version) writes it once; there is no race.
                    continue;
                }
                let span = match top.get("builders").map(|b| b.get_ref()) {
                    Some(DeValue::Table(table)) => table
                        .iter()
                        .find(|(key, _)| key.get_ref() == name)
                        .map(|(key, _)| key.span()),
                    _ => None,
                }
                .unwrap_or(0..0);
                let diagnostic = self
                    .error(
                        format!("builds `{first}` and `{name}` would both write {claim}"),
                        span,
                        &format!("builders.{name}"),
                    )
                    .help("give each build its own output (`output_dir`, `repository`, `tags`, `ami_name`)");
                self.diagnostics.push(diagnostic);
            }
        }
    }

    /// A `[[test]]` on a build that keeps nothing to start a machine from
    /// could only fail after the whole build; refused here, at the
    /// builder's field that makes it so.
    fn refuse_untestable(
        &mut self,
        top: &DeTable<'_>,
        builders: &[NamedBuilder],
        tests: &BTreeMap<String, Testing>,
    ) {
        let tables = match top.get("builders").map(|b| b.get_ref()) {
            Some(DeValue::Table(table)) => table,
            _ => return,
        };
        for (name, builder) in builders {
            let Some(test) = tests.get(name).and_then(|t| t.tests.first()) else {
                continue;
            };
            let Some(mut problem) = builder.untestable(&self.dir) else {
                continue;
            };
            let Some((key, table)) = tables.iter().find(|(key, _)| key.get_ref() == name) else {
                continue;
            };
            problem.message = format!(
                "test `{}` applies to build `{name}`, which keeps nothing to test: {}",
                test.name, problem.message
            );
            let leave_out = format!("leave `{name}` out of the test with `except = [\"{name}\"]`");
            problem.help = Some(match problem.help.take() {
                Some(help) => format!("{help}, or {leave_out}"),
                None => leave_out,
            });
            self.push_problems(
                vec![problem],
                table,
                key.span(),
                &format!("builders.{name}"),
            );
        }
    }

    fn builders(
        &mut self,
        top: &DeTable<'_>,
        env: &minijinja::Environment<'static>,
        context: &serde_json::Value,
    ) -> (Vec<NamedBuilder>, Vec<BuilderKind>) {
        let Some(section) = top.get("builders") else {
            return (Vec::new(), Vec::new());
        };
        let DeValue::Table(table) = section.get_ref() else {
            let diagnostic = self.error(
                "`builders` must be a table of named builders",
                section.span(),
                "builders",
            );
            self.diagnostics.push(diagnostic);
            return (Vec::new(), Vec::new());
        };
        let mut builders = Vec::new();
        // Every builder with a known name and type, valid or not, so the
        // provisioners' checks still run against it.
        let mut kinds = Vec::new();
        let known = builder_registry::names().join(", ");
        for (key, value) in table.iter() {
            let name = key.get_ref().to_string();
            let field = format!("builders.{name}");
            if !is_build_name(&name) {
                let diagnostic = self
                    .error(
                        format!("`{name}` cannot be used as a builder name"),
                        key.span(),
                        &field,
                    )
                    .help("use letters, digits, `_` and `-`, starting with a letter or digit");
                self.diagnostics.push(diagnostic);
                continue;
            }
            let DeValue::Table(builder_table) = value.get_ref() else {
                let diagnostic = self.error("a builder must be a table", value.span(), &field);
                self.diagnostics.push(diagnostic);
                continue;
            };
            let kind = match builder_table.get("type").map(|v| (v.get_ref(), v.span())) {
                Some((DeValue::String(kind), _)) => kind.to_string(),
                Some((_, span)) => {
                    let diagnostic =
                        self.error("`type` must be a string", span, &format!("{field}.type"));
                    self.diagnostics.push(diagnostic);
                    continue;
                }
                None => {
                    let diagnostic = self
                        .error(
                            format!("builder `{name}` has no `type`"),
                            key.span(),
                            &field,
                        )
                        .help(format!("add `type = \"...\"` with one of: {known}"));
                    self.diagnostics.push(diagnostic);
                    continue;
                }
            };
            let type_span = builder_table
                .get("type")
                .map(|v| v.span())
                .unwrap_or(key.span());
            let found = builder_registry::find(&kind);
            if found.is_some() {
                kinds.push((name.clone(), kind.clone()));
            }
            let mut rendered = value.clone();
            if let DeValue::Table(inner) = rendered.get_mut() {
                inner.remove("type");
                match inner
                    .remove("max_age")
                    .map(|v| (v.get_ref().clone(), v.span()))
                {
                    None => {}
                    Some((DeValue::String(text), span)) => {
                        match imgbuild_core::duration::parse(&text) {
                            Ok(age) => {
                                self.max_ages.insert(name.clone(), age);
                            }
                            Err(message) => {
                                let diagnostic =
                                    self.error(message, span, &format!("{field}.max_age"));
                                self.diagnostics.push(diagnostic);
                            }
                        }
                    }
                    Some((_, span)) => {
                        let diagnostic = self
                            .error("`max_age` must be a duration like \"30d\"", span, &format!("{field}.max_age"))
                            .help("with --skip-unchanged, a version older than this is rebuilt even when nothing changed");
                        self.diagnostics.push(diagnostic);
                    }
                }
            }
            if let DeValue::Table(inner) = rendered.get_mut()
                && let Some(value) = inner.remove("sbom")
            {
                match SbomFormats::deserialize(ValueDeserializer::from(value.clone())) {
                    Ok(formats) => {
                        self.sbom_overrides.insert(name.clone(), formats);
                    }
                    Err(_) => {
                        let diagnostic = self
                            .error(
                                "`sbom` must be \"spdx\", \"cyclonedx\", \"both\" or \"none\"",
                                value.span(),
                                &format!("{field}.sbom"),
                            )
                            .help("it overrides `[image] sbom` for this build");
                        self.diagnostics.push(diagnostic);
                    }
                }
            }
            let mut build_context = context.clone();
            build_context["build"] = serde_json::json!({"name": name, "type": kind});
            let source = self.source.clone();
            let renderer = Renderer {
                env,
                context: &minijinja::Value::from_serialize(&build_context),
                file: self.file,
                source: &source,
            };
            let before = self.diagnostics.len();
            renderer.render_tree(&mut rendered, &field, &mut self.diagnostics);
            if self.diagnostics.len() > before {
                continue;
            }
            let Some(found) = found else {
                let mut diagnostic = self.error(
                    format!("unknown builder type `{kind}`"),
                    type_span,
                    &format!("{field}.type"),
                );
                diagnostic = match did_you_mean(&kind, builder_registry::names()) {
                    Some(best) => {
                        diagnostic.help(format!("did you mean `{best}`? builder types: {known}"))
                    }
                    None => diagnostic.help(format!("builder types: {known}")),
                };
                self.diagnostics.push(diagnostic);
                continue;
            };
            match found.parse(&rendered) {
                Ok(builder) => {
                    self.push_problems(builder.validate(&self.dir), value, key.span(), &field);
                    builders.push((name, builder));
                }
                Err(BuilderKindError::NotCompiledIn(message)) => {
                    let diagnostic = self.error(message, type_span, &format!("{field}.type"));
                    self.diagnostics.push(diagnostic);
                }
                Err(BuilderKindError::Invalid(err)) => {
                    self.serde_error(&err, value.span(), value, &field)
                }
            }
        }
        (builders, kinds)
    }

    fn provisioners(
        &mut self,
        top: &DeTable<'_>,
        env: &minijinja::Environment<'static>,
        context: &serde_json::Value,
        builders: &[(String, String)],
    ) -> BTreeMap<String, Provisioning> {
        let mut by_build: BTreeMap<String, Provisioning> = BTreeMap::new();
        let Some(items) = self.table_array(
            top,
            "provision",
            "write each provisioner as a [[provision]] table",
        ) else {
            return by_build;
        };
        let names: Vec<&str> = builders.iter().map(|(name, _)| name.as_str()).collect();
        for (index, item) in items.iter().enumerate() {
            let field = format!("provision[{index}]");
            let DeValue::Table(table) = item.get_ref() else {
                let diagnostic = self.error("a provisioner must be a table", item.span(), &field);
                self.diagnostics.push(diagnostic);
                continue;
            };
            let known = provisioner_registry::names().join(", ");
            let kind = match table.get("type").map(|v| (v.get_ref(), v.span())) {
                Some((DeValue::String(name), span)) => match provisioner_registry::find(name) {
                    Some(kind) => kind,
                    None => {
                        let mut diagnostic = self.error(
                            format!("unknown provisioner type `{name}`"),
                            span,
                            &format!("{field}.type"),
                        );
                        diagnostic = match did_you_mean(name, provisioner_registry::names()) {
                            Some(best) => diagnostic
                                .help(format!("did you mean `{best}`? provisioner types: {known}")),
                            None => diagnostic.help(format!("provisioner types: {known}")),
                        };
                        self.diagnostics.push(diagnostic);
                        continue;
                    }
                },
                Some((_, span)) => {
                    let diagnostic =
                        self.error("`type` must be a string", span, &format!("{field}.type"));
                    self.diagnostics.push(diagnostic);
                    continue;
                }
                None => {
                    let diagnostic = self
                        .error("provisioner has no `type`", item.span(), &field)
                        .help(format!("add `type = \"...\"` with one of: {known}"));
                    self.diagnostics.push(diagnostic);
                    continue;
                }
            };
            let mut body = item.clone();
            if let DeValue::Table(inner) = body.get_mut() {
                inner.remove("type");
            }
            let Some(targets) = self.targets(item, &mut body, &field, &names) else {
                continue;
            };
            let Some(cache) = self.cache_flag(item, &mut body, &field) else {
                continue;
            };
            let uncacheable = if cache {
                let per_run = per_run_values(env, &body);
                (!per_run.is_empty()).then(|| {
                    format!(
                        "its config uses {}, which differ on every run",
                        per_run.join(", ")
                    )
                })
            } else {
                Some("`cache = false`".to_owned())
            };
            let parsed =
                self.parse_for_builds(kind, item, &body, &field, &targets, builders, env, context);
            for (build, parsed) in parsed {
                let entry = by_build.entry(build).or_default();
                entry.provisioners.push(parsed.provisioner);
                entry.configs.push(parsed.resolved);
                entry.steps.push(StepSource {
                    files: parsed.input_files,
                    uncacheable: uncacheable.clone(),
                });
            }
        }
        by_build
    }

    /// The array of tables under `key` (`[[provision]]`, `[[test]]`);
    /// `None` when there is none, or when `key` is something else
    /// (reported, with `help`).
    fn table_array<'a, 'i>(
        &mut self,
        top: &'a DeTable<'i>,
        key: &str,
        help: &str,
    ) -> Option<&'a toml::de::DeArray<'i>> {
        let section = top.get(key)?;
        let DeValue::Array(items) = section.get_ref() else {
            let diagnostic = self
                .error(
                    format!("`{key}` must be a list of tables"),
                    section.span(),
                    key,
                )
                .help(help);
            self.diagnostics.push(diagnostic);
            return None;
        };
        Some(items)
    }

    /// Takes `only`/`except` out of `body` (a `[[provision]]` or `[[test]]`
    /// table) and checks them against the config's builds. `None` when
    /// they cannot be used at all (reported); names that are not builds are
    /// reported but the rest still apply, so later checks still run.
    fn targets(
        &mut self,
        item: &Spanned<DeValue<'_>>,
        body: &mut Spanned<DeValue<'_>>,
        field: &str,
        names: &[&str],
    ) -> Option<ProvisionTargets> {
        let mut targets_table = DeTable::new();
        if let DeValue::Table(inner) = body.get_mut() {
            for key in ["only", "except"] {
                if let Some((k, v)) = inner.remove_entry(key) {
                    targets_table.insert(k, v);
                }
            }
        }
        let targets_value = Spanned::new(item.span(), DeValue::Table(targets_table));
        let targets =
            match ProvisionTargets::deserialize(ValueDeserializer::from(targets_value.clone())) {
                Ok(targets) => targets,
                Err(err) => {
                    self.serde_error(&err, item.span(), item, field);
                    return None;
                }
            };
        if !targets.only.is_empty() && !targets.except.is_empty() {
            let span = find_span(item, "except").unwrap_or(item.span());
            let diagnostic = self
                .error(
                    "`only` and `except` exclude each other",
                    span,
                    &format!("{field}.except"),
                )
                .help("list the builds it runs on in `only`, or those it skips in `except`");
            self.diagnostics.push(diagnostic);
            return None;
        }
        for (list_name, list) in [("only", &targets.only), ("except", &targets.except)] {
            for name in list {
                if !names.contains(&name.as_str()) {
                    let span = find_span(item, list_name).unwrap_or(item.span());
                    let mut diagnostic = self.error(
                        format!("`{name}` is not a builder in this config"),
                        span,
                        &format!("{field}.{list_name}"),
                    );
                    diagnostic = match did_you_mean(name, names.iter().copied()) {
                        Some(best) => diagnostic.help(format!("did you mean `{best}`?")),
                        None => diagnostic.help(format!("builders: {}", names.join(", "))),
                    };
                    self.diagnostics.push(diagnostic);
                }
            }
        }
        Some(targets)
    }

    /// Takes `cache` out of a `[[provision]]` table: `false` keeps the
    /// step (and every later one) from ever being reused. `None` when it
    /// is not a boolean (reported).
    fn cache_flag(
        &mut self,
        item: &Spanned<DeValue<'_>>,
        body: &mut Spanned<DeValue<'_>>,
        field: &str,
    ) -> Option<bool> {
        let DeValue::Table(inner) = body.get_mut() else {
            return Some(true);
        };
        match inner
            .remove("cache")
            .map(|v| (v.get_ref().clone(), v.span()))
        {
            None => Some(true),
            Some((DeValue::Boolean(cache), _)) => Some(cache),
            Some((_, span)) => {
                let _ = item;
                let diagnostic = self
                    .error("`cache` must be true or false", span, &format!("{field}.cache"))
                    .help("`cache = false` runs this provisioner on every build, and every one after it");
                self.diagnostics.push(diagnostic);
                None
            }
        }
    }

    /// `[[test]]` tables: shell checks run on each build's artifact. The
    /// shell part is parsed by the `shell` provisioner kind, so a test's
    /// commands, scripts, env and templates follow exactly its rules.
    fn tests(
        &mut self,
        top: &DeTable<'_>,
        env: &minijinja::Environment<'static>,
        context: &serde_json::Value,
        builders: &[(String, String)],
    ) -> BTreeMap<String, Testing> {
        let mut by_build: BTreeMap<String, Testing> = BTreeMap::new();
        let Some(items) = self.table_array(
            top,
            "test",
            "write each test as a [[test]] table with a `name`",
        ) else {
            return by_build;
        };
        let shell = provisioner_registry::find("shell")
            .expect("the shell provisioner kind is always compiled in");
        let names: Vec<&str> = builders.iter().map(|(name, _)| name.as_str()).collect();
        let mut seen_names: BTreeMap<String, usize> = BTreeMap::new();
        for (index, item) in items.iter().enumerate() {
            let field = format!("test[{index}]");
            let DeValue::Table(table) = item.get_ref() else {
                let diagnostic = self.error("a test must be a table", item.span(), &field);
                self.diagnostics.push(diagnostic);
                continue;
            };
            let mut unknown = false;
            for (key, _) in table.iter() {
                let key_name: &str = key.get_ref();
                let known = TEST_SHELL_FIELDS.contains(&key_name)
                    || TEST_OWN_FIELDS.contains(&key_name)
                    || matches!(key_name, "only" | "except");
                if known {
                    continue;
                }
                unknown = true;
                let all = TEST_SHELL_FIELDS
                    .iter()
                    .chain(TEST_OWN_FIELDS)
                    .chain(&["only", "except"])
                    .copied();
                let listing = all.clone().collect::<Vec<_>>().join(", ");
                let help = match key_name {
                    "type" => "a test is always shell commands: remove `type`".to_owned(),
                    "max_retries" => {
                        "a test retries with `retries` (and waits `retry_delay` between attempts)"
                            .to_owned()
                    }
                    "on_test_failure" => {
                        "`on_test_failure` applies to the whole image: set it in [image]".to_owned()
                    }
                    _ => match did_you_mean(key_name, all) {
                        Some(best) => format!("did you mean `{best}`? a [[test]] takes: {listing}"),
                        None => format!("a [[test]] takes: {listing}"),
                    },
                };
                let diagnostic = self
                    .error(
                        format!("unknown field `{key_name}` in a test"),
                        key.span(),
                        &format!("{field}.{key_name}"),
                    )
                    .help(help);
                self.diagnostics.push(diagnostic);
            }
            if unknown {
                continue;
            }

            let mut own_table = DeTable::new();
            let mut body = item.clone();
            if let DeValue::Table(inner) = body.get_mut() {
                for key in TEST_OWN_FIELDS {
                    if let Some((k, v)) = inner.remove_entry(*key) {
                        own_table.insert(k, v);
                    }
                }
            }
            let own_value = Spanned::new(item.span(), DeValue::Table(own_table));
            let own = match TestOwnFields::deserialize(ValueDeserializer::from(own_value)) {
                Ok(own) => own,
                Err(err) => {
                    self.serde_error(&err, item.span(), item, &field);
                    continue;
                }
            };
            let name_span = find_span(item, "name").unwrap_or(item.span());
            if own.name.trim().is_empty() {
                let diagnostic = self
                    .error(
                        "a test's name must not be empty",
                        name_span,
                        &format!("{field}.name"),
                    )
                    .help(
                        "name it after what it checks: results are reported and recorded by name",
                    );
                self.diagnostics.push(diagnostic);
                continue;
            }
            if let Some(first) = seen_names.insert(own.name.clone(), index) {
                let diagnostic = self
                    .error(
                        format!("test[{first}] is already named `{}`", own.name),
                        name_span,
                        &format!("{field}.name"),
                    )
                    .help("give each test its own name: results are reported and recorded by name");
                self.diagnostics.push(diagnostic);
                continue;
            }
            let Some(targets) = self.targets(item, &mut body, &field, &names) else {
                continue;
            };
            let parsed =
                self.parse_for_builds(shell, item, &body, &field, &targets, builders, env, context);
            for (build, parsed) in parsed {
                let mut resolved = match serde_json::to_value(&own) {
                    Ok(serde_json::Value::Object(fields)) => fields,
                    _ => serde_json::Map::new(),
                };
                if let serde_json::Value::Object(shell_fields) = parsed.resolved {
                    resolved.extend(shell_fields);
                }
                let entry = by_build.entry(build).or_default();
                entry.tests.push(ImageTest {
                    name: own.name.clone(),
                    shell: parsed.provisioner,
                    retries: own.retries,
                    retry_delay: own.retry_delay,
                });
                entry.configs.push(serde_json::Value::Object(resolved));
                entry.input_files.extend(parsed.input_files);
            }
        }
        by_build
    }

    /// `body` (a `[[provision]]` or `[[test]]` table without `type`, `only`
    /// and `except`) rendered for each build it applies to and parsed by
    /// `kind`, in config order. Stops at the first problem: the same one
    /// would repeat for every build.
    #[allow(clippy::too_many_arguments)]
    fn parse_for_builds(
        &mut self,
        kind: &dyn ProvisionerKind,
        item: &Spanned<DeValue<'_>>,
        body: &Spanned<DeValue<'_>>,
        field: &str,
        targets: &ProvisionTargets,
        builders: &[(String, String)],
        env: &minijinja::Environment<'static>,
        context: &serde_json::Value,
    ) -> Vec<(String, Parsed)> {
        let mut parsed_by_build = Vec::new();
        for (build, kind_of_build) in builders {
            if !targets.applies_to(build) {
                continue;
            }
            let mut build_context = context.clone();
            build_context["build"] = serde_json::json!({"name": build, "type": kind_of_build});
            let source = self.source.clone();
            let renderer = Renderer {
                env,
                context: &minijinja::Value::from_serialize(&build_context),
                file: self.file,
                source: &source,
            };
            let mut rendered = body.clone();
            let before = self.diagnostics.len();
            renderer.render_tree(&mut rendered, field, &mut self.diagnostics);
            if self.diagnostics.len() > before {
                break;
            }
            let parsed = kind.parse(ParseInput {
                table: &rendered,
                config_dir: &self.dir,
                template_context: &build_context,
            });
            match parsed {
                Ok(parsed) => parsed_by_build.push((build.clone(), parsed)),
                Err(ParseError::Invalid(err)) => {
                    self.serde_error(&err, item.span(), item, field);
                    break;
                }
                Err(ParseError::Problems(problems)) => {
                    self.push_problems(problems, item, item.span(), field);
                    break;
                }
            }
        }
        parsed_by_build
    }

    /// Problems a builder or provisioner found in its table, each pointing
    /// at its field (or at the table when the field is not written).
    fn push_problems(
        &mut self,
        problems: Vec<ConfigProblem>,
        table: &Spanned<DeValue<'_>>,
        fallback: Range<usize>,
        path: &str,
    ) {
        for problem in problems {
            let span = find_span(table, &problem.field).unwrap_or(fallback.clone());
            let mut diagnostic =
                self.error(problem.message, span, &format!("{path}.{}", problem.field));
            if let Some(help) = problem.help {
                diagnostic = diagnostic.help(help);
            }
            self.diagnostics.push(diagnostic);
        }
    }
}

/// The span of a dotted field (`ssh.password`, `scripts[1]`) below `value`.
fn find_span(value: &Spanned<DeValue<'_>>, dotted: &str) -> Option<Range<usize>> {
    let mut current = value;
    for part in dotted.split('.') {
        let (key, index) = match part.split_once('[') {
            Some((key, rest)) => (key, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let DeValue::Table(table) = current.get_ref() else {
            return None;
        };
        current = table.get(key)?;
        if let Some(index) = index {
            let DeValue::Array(items) = current.get_ref() else {
                return None;
            };
            current = items.get(index)?;
        }
    }
    Some(current.span())
}

/// The dotted name of the deepest field whose key or value holds `span`.
fn field_at(value: &Spanned<DeValue<'_>>, span: &Range<usize>, path: &str) -> String {
    match value.get_ref() {
        DeValue::Table(table) => {
            for (key, item) in table.iter() {
                let inside = |range: Range<usize>| {
                    range.start <= span.start && span.start < range.end.max(range.start + 1)
                };
                let field = join(path, key.get_ref());
                if inside(key.span()) || inside(item.span()) {
                    return field_at(item, span, &field);
                }
                // A table written under its own header (`[builders.vm.ssh]`)
                // spans only the header, not the keys below it.
                if matches!(item.get_ref(), DeValue::Table(_)) {
                    let inner = field_at(item, span, &field);
                    if inner != field {
                        return inner;
                    }
                }
            }
            path.to_owned()
        }
        DeValue::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                let range = item.span();
                if range.start <= span.start && span.start < range.end {
                    return field_at(item, span, &format!("{path}[{index}]"));
                }
            }
            path.to_owned()
        }
        _ => path.to_owned(),
    }
}

fn is_artifact_word(text: &str) -> bool {
    let mut chars = text.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && text.len() <= 128
}

fn is_build_name(text: &str) -> bool {
    let mut chars = text.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        && text.len() <= 64
}

/// The commit checked out where the config lives, if it is in a git
/// repository.
pub fn git_head(dir: &Path) -> Option<String> {
    let output = std::process::Command::new("git")
        .args(["rev-parse", "--verify", "--quiet", "HEAD"])
        .current_dir(dir)
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let sha = String::from_utf8(output.stdout).ok()?.trim().to_owned();
    (output.status.success() && sha.len() >= 40).then_some(sha)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_builders_sbom_overrides_the_images_and_a_bad_one_names_its_field() {
        let dir = tempfile::tempdir().unwrap();
        let text = |setting: &str| {
            format!(
                "[image]\nname = \"web\"\nversion = \"1\"\nsbom = \"spdx\"\n\n[builders.a]\ntype = \"docker\"\nimage = \"debian:12\"\n{setting}\n[builders.b]\ntype = \"docker\"\nimage = \"debian:12\"\nrepository = \"other\"\n"
            )
        };
        let config =
            load_text(dir.path(), &text("sbom = \"none\"")).unwrap_or_else(|d| panic!("{d:?}"));
        assert_eq!(config.sbom, SbomFormats::Spdx);
        assert_eq!(config.builds[0].sbom, Some(SbomFormats::None));
        assert_eq!(config.builds[1].sbom, None);
        let Err(diagnostics) = load_text(dir.path(), &text("sbom = \"xml\"")) else {
            panic!("an unknown format loads");
        };
        let shown = format!("{diagnostics:?}");
        assert!(shown.contains("builders.a.sbom"), "{shown}");
    }

    #[test]
    fn steps_with_per_run_values_or_cache_false_are_never_cached_and_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let config = load_text(
            dir.path(),
            r#"
[image]
name = "web"
version = "1"

[builders.a]
type = "docker"
image = "debian:12"

[[provision]]
type = "shell"
inline = ["echo {{ image.version }}"]

[[provision]]
type = "shell"
inline = ["echo {{ uuid() }} at {{ timestamp }}"]

[[provision]]
type = "shell"
inline = ["apt-get upgrade -y"]
cache = false
"#,
        )
        .unwrap_or_else(|d| panic!("{d:?}"));
        let steps = &config.builds[0].steps;
        assert_eq!(steps[0].uncacheable, None);
        let why = steps[1].uncacheable.as_deref().unwrap();
        assert!(why.contains("timestamp, uuid"), "{why}");
        assert_eq!(steps[2].uncacheable.as_deref(), Some("`cache = false`"));
        // `cache` is the pipeline's, not the shell kind's: not in its table.
        assert!(
            config.builds[0].provisioner_configs[2]
                .get("cache")
                .is_none()
        );
        assert_eq!(config.run_values, ["0", "19700101T000000Z", "run"]);

        let refused = load_text(
            dir.path(),
            r#"
[image]
name = "web"
version = "1"

[builders.a]
type = "docker"
image = "debian:12"

[[provision]]
type = "shell"
inline = ["true"]
cache = "no"
"#,
        );
        let diagnostics = refused.err().expect("a non-boolean cache is refused");
        assert!(
            format!("{diagnostics:?}").contains("provision[0].cache"),
            "{diagnostics:?}"
        );
    }

    fn load_text(dir: &Path, text: &str) -> Result<Config, Diagnostics> {
        let path = dir.join("image.toml");
        std::fs::write(&path, text).unwrap();
        let options = LoadOptions {
            variables: VariableInputs {
                cli: Vec::new(),
                var_files: Vec::new(),
                environment: BTreeMap::new(),
            },
            run_id: "run".into(),
            started: time::OffsetDateTime::UNIX_EPOCH,
            only: Vec::new(),
            except: Vec::new(),
        };
        load(&path, &options)
    }

    #[test]
    fn a_shared_step_cache_is_an_s3_url_or_a_directory_beside_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let with = |shared: &str| {
            load_text(
                dir.path(),
                &format!(
                    "[image]\nname = \"web\"\nversion = \"1\"\n\n[cache]\nshared = \"{shared}\"\n\n[builders.a]\ntype = \"docker\"\nimage = \"debian:12\"\n"
                ),
            )
        };
        let config = with("s3://runners/steps").unwrap_or_else(|d| panic!("{d:?}"));
        assert_eq!(config.cache.shared.as_deref(), Some("s3://runners/steps"));
        let config = with("mounted/steps").unwrap_or_else(|d| panic!("{d:?}"));
        assert_eq!(
            config.cache.shared,
            Some(dir.path().join("mounted/steps").display().to_string())
        );
        for (bad, why) in [
            ("ftp://host/steps", "the only URL scheme supported is s3://"),
            ("s3:///steps", "it names no bucket"),
            ("", "it is empty"),
        ] {
            let Err(problems) = with(bad) else {
                panic!("{bad:?} was accepted")
            };
            let problems = problems.0;
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(
                problems[0].field.as_deref(),
                Some("cache.shared"),
                "{problems:?}"
            );
            assert!(problems[0].message.contains(why), "{bad}: {problems:?}");
            assert!(problems[0].span.is_some(), "{problems:?}");
        }
    }

    #[test]
    fn tests_resolve_per_build_with_their_scripts_as_inputs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("checks")).unwrap();
        std::fs::write(dir.path().join("checks/release.sh"), "true\n").unwrap();
        let config = load_text(
            dir.path(),
            r#"
[image]
name = "web"
version = "1"

[builders.a]
type = "docker"
image = "debian:12"

[builders.b]
type = "docker"
image = "debian:12"
repository = "web-b"

[[test]]
name = "release"
script = "checks/release.sh"
retries = 2
retry_delay = "1m"

[[test]]
name = "only b"
inline = ["true"]
only = ["b"]
"#,
        )
        .unwrap_or_else(|d| panic!("{}", d.render(false)));
        assert_eq!(config.on_test_failure, OnTestFailure::Keep);
        let a = &config.builds[0];
        let b = &config.builds[1];
        let names = |build: &Build| {
            build
                .tests
                .iter()
                .map(|t| t.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(a), ["release"]);
        assert_eq!(names(b), ["release", "only b"]);
        assert_eq!(a.tests[0].retries, 2);
        assert_eq!(a.tests[0].retry_delay, Duration::from_secs(60));
        assert_eq!(b.tests[1].retries, 0);
        assert_eq!(b.tests[1].retry_delay, Duration::from_secs(5));
        let script = std::fs::canonicalize(dir.path())
            .unwrap()
            .join("checks/release.sh");
        assert!(a.input_files.contains(&script), "{:?}", a.input_files);
        assert_eq!(a.test_configs[0]["retry_delay"], "1m");
    }
    #[test]
    fn sbom_defaults_to_both_formats_and_a_wrong_value_is_refused_at_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let config = |sbom: &str| {
            format!(
                "[image]\nname = \"web\"\nversion = \"1\"\n{sbom}\n\n[builders.a]\ntype = \"docker\"\nimage = \"debian:12\"\n"
            )
        };
        let loaded =
            load_text(dir.path(), &config("")).unwrap_or_else(|d| panic!("{}", d.render(false)));
        assert_eq!(loaded.sbom, SbomFormats::Both);
        let loaded = load_text(dir.path(), &config("sbom = \"cyclonedx\""))
            .unwrap_or_else(|d| panic!("{}", d.render(false)));
        assert_eq!(loaded.sbom, SbomFormats::Cyclonedx);
        let refused = match load_text(dir.path(), &config("sbom = \"xml\"")) {
            Ok(_) => panic!("sbom = \"xml\" was accepted"),
            Err(diagnostics) => diagnostics.render(false),
        };
        assert!(refused.contains("image.toml:4"), "{refused}");
        assert!(
            refused.contains("spdx") && refused.contains("none"),
            "{refused}"
        );
    }
}
