//! `[variables]`: declared names with defaults, given values from var files,
//! the environment (`IMGBUILD_VAR_<name>`) and `--var`, in rising priority.

use super::diagnostic::{Diagnostic, Diagnostics, did_you_mean, explain_serde_message};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

pub const ENV_PREFIX: &str = "IMGBUILD_VAR_";

/// Where a variable's value came from, for `inspect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueSource {
    Default,
    Environment,
    VarFile(PathBuf),
    CommandLine,
}

#[derive(Debug, Clone, Serialize)]
pub struct Variable {
    pub name: String,
    pub value: String,
    pub sensitive: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub source: ValueSource,
}

struct Declared {
    name: String,
    default: Option<String>,
    sensitive: bool,
    description: Option<String>,
    span: Range<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VariableTable {
    #[serde(default)]
    default: Option<Scalar>,
    #[serde(default)]
    sensitive: bool,
    #[serde(default)]
    description: Option<String>,
}

/// Variables are text once resolved: they end up in strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
}

impl Scalar {
    fn into_text(self) -> String {
        match self {
            Scalar::Text(text) => text,
            Scalar::Integer(number) => number.to_string(),
            Scalar::Float(number) => number.to_string(),
            Scalar::Boolean(flag) => flag.to_string(),
        }
    }
}

fn scalar_text(value: &DeValue<'_>) -> Option<String> {
    match value {
        DeValue::String(text) => Some(text.to_string()),
        DeValue::Integer(number) => Some(number.as_str().to_owned()),
        DeValue::Float(number) => Some(number.as_str().to_owned()),
        DeValue::Boolean(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// Command-line and environment inputs for variables.
#[derive(Debug, Clone, Default)]
pub struct VariableInputs {
    /// `--var NAME=VALUE`, in order.
    pub cli: Vec<(String, String)>,
    pub var_files: Vec<PathBuf>,
    /// The environment to read `IMGBUILD_VAR_*` from.
    pub environment: BTreeMap<String, String>,
}

impl VariableInputs {
    pub fn from_process_env(cli: Vec<(String, String)>, var_files: Vec<PathBuf>) -> Self {
        VariableInputs {
            cli,
            var_files,
            environment: std::env::vars()
                .filter(|(k, _)| k.starts_with(ENV_PREFIX))
                .collect(),
        }
    }
}

pub fn resolve(
    file: &Path,
    source: &Arc<str>,
    section: Option<&Spanned<DeValue<'_>>>,
    inputs: &VariableInputs,
    diagnostics: &mut Diagnostics,
) -> Vec<Variable> {
    let declared = declarations(file, source, section, diagnostics);
    let names: Vec<&str> = declared.iter().map(|d| d.name.as_str()).collect();
    let mut values: BTreeMap<String, (String, ValueSource)> = BTreeMap::new();

    for var_file in &inputs.var_files {
        for (name, value) in read_var_file(var_file, &names, diagnostics) {
            values.insert(name, (value, ValueSource::VarFile(var_file.clone())));
        }
    }
    for (key, value) in &inputs.environment {
        let Some(name) = key.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        // The environment is shared with other tools: an unknown name there
        // is not this config's error.
        if names.contains(&name) && !values.contains_key(name) {
            values.insert(name.to_owned(), (value.clone(), ValueSource::Environment));
        }
    }
    for (name, value) in &inputs.cli {
        if !names.contains(&name.as_str()) {
            let mut diagnostic = Diagnostic::new(
                Path::new("--var"),
                format!("`{name}` is not a variable of {}", file.display()),
            );
            diagnostic = match did_you_mean(name, names.iter().copied()) {
                Some(best) => diagnostic.help(format!("did you mean `{best}`?")),
                None => diagnostic.help(declared_list(&names)),
            };
            diagnostics.push(diagnostic);
            continue;
        }
        values.insert(name.clone(), (value.clone(), ValueSource::CommandLine));
    }

    let mut variables = Vec::new();
    for declared in declared {
        let (value, origin) = match values.remove(&declared.name) {
            Some(given) => given,
            None => match declared.default.clone() {
                Some(default) => (default, ValueSource::Default),
                None => {
                    diagnostics.push(
                        Diagnostic::new(file, format!("variable `{}` has no default and no value was given", declared.name))
                            .at(source, declared.span.clone())
                            .field(format!("variables.{}", declared.name))
                            .help(format!(
                                "pass --var {0}=VALUE, put `{0} = \"...\"` in a --var-file, or set {ENV_PREFIX}{0}",
                                declared.name
                            )),
                    );
                    continue;
                }
            },
        };
        variables.push(Variable {
            name: declared.name,
            value,
            sensitive: declared.sensitive,
            description: declared.description,
            source: origin,
        });
    }
    variables
}

fn declared_list(names: &[&str]) -> String {
    if names.is_empty() {
        "the config declares no variables; add them under [variables]".to_owned()
    } else {
        format!("declared variables: {}", names.join(", "))
    }
}

fn declarations(
    file: &Path,
    source: &Arc<str>,
    section: Option<&Spanned<DeValue<'_>>>,
    diagnostics: &mut Diagnostics,
) -> Vec<Declared> {
    let Some(section) = section else {
        return Vec::new();
    };
    let DeValue::Table(table) = section.get_ref() else {
        diagnostics.push(
            Diagnostic::new(file, "`variables` must be a table of variable declarations")
                .at(source, section.span())
                .field("variables"),
        );
        return Vec::new();
    };
    let mut declared = Vec::new();
    for (key, value) in table.iter() {
        let name = key.get_ref().to_string();
        let field = format!("variables.{name}");
        if !is_variable_name(&name) {
            diagnostics.push(
                Diagnostic::new(file, format!("`{name}` is not a valid variable name"))
                    .at(source, key.span())
                    .field(&field)
                    .help("use letters, digits and _, starting with a letter or _"),
            );
            continue;
        }
        if let Some(text) = scalar_text(value.get_ref()) {
            declared.push(Declared {
                name,
                default: Some(text),
                sensitive: false,
                description: None,
                span: key.span(),
            });
            continue;
        }
        match VariableTable::deserialize(ValueDeserializer::from(value.clone())) {
            Ok(table) => declared.push(Declared {
                name,
                default: table.default.map(Scalar::into_text),
                sensitive: table.sensitive,
                description: table.description,
                span: key.span(),
            }),
            Err(err) => {
                let (message, help) = explain_serde_message(err.message());
                let mut diagnostic = Diagnostic::new(file, message)
                    .at(source, err.span().unwrap_or_else(|| value.span()))
                    .field(&field);
                if let Some(help) = help {
                    diagnostic = diagnostic.help(help);
                }
                diagnostics.push(diagnostic);
            }
        }
    }
    declared
}

pub fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn read_var_file(
    path: &Path,
    names: &[&str],
    diagnostics: &mut Diagnostics,
) -> Vec<(String, String)> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) => {
            diagnostics.push(Diagnostic::new(
                path,
                format!("cannot read the var file: {err}"),
            ));
            return Vec::new();
        }
    };
    let source: Arc<str> = Arc::from(text.as_str());
    let table: Spanned<DeTable<'_>> = match DeTable::parse(&text) {
        Ok(table) => table,
        Err(err) => {
            diagnostics.push(
                Diagnostic::new(path, err.message().to_owned())
                    .at(&source, err.span().unwrap_or(0..0)),
            );
            return Vec::new();
        }
    };
    let mut values = Vec::new();
    for (key, value) in table.get_ref().iter() {
        let name = key.get_ref().to_string();
        if !names.contains(&name.as_str()) {
            let mut diagnostic =
                Diagnostic::new(path, format!("`{name}` is not a declared variable"))
                    .at(&source, key.span())
                    .field(&name);
            diagnostic = match did_you_mean(&name, names.iter().copied()) {
                Some(best) => diagnostic.help(format!("did you mean `{best}`?")),
                None => diagnostic.help(declared_list(names)),
            };
            diagnostics.push(diagnostic);
            continue;
        }
        match scalar_text(value.get_ref()) {
            Some(text) => values.push((name, text)),
            None => diagnostics.push(
                Diagnostic::new(
                    path,
                    "a variable's value must be a string, number or boolean",
                )
                .at(&source, value.span())
                .field(&name),
            ),
        }
    }
    values
}

/// `NAME=VALUE` from `--var`.
pub fn parse_cli_assignment(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if is_variable_name(name) => Ok((name.to_owned(), value.to_owned())),
        Some((name, _)) => Err(format!("`{name}` is not a valid variable name")),
        None => Err(format!("expected NAME=VALUE, got `{text}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve_text(config: &str, inputs: &VariableInputs) -> (Vec<Variable>, Diagnostics) {
        let source: Arc<str> = Arc::from(config);
        let table = DeTable::parse(config).unwrap();
        let mut diagnostics = Diagnostics::default();
        let variables = resolve(
            Path::new("image.toml"),
            &source,
            table.get_ref().get("variables"),
            inputs,
            &mut diagnostics,
        );
        (variables, diagnostics)
    }

    const CONFIG: &str = r#"
[variables]
region = "eu-west-1"
count = 3
password = { sensitive = true }
mirror = { default = "http://deb", description = "apt mirror" }
"#;

    #[test]
    fn priorities_are_default_env_file_cli() {
        let dir = tempfile::tempdir().unwrap();
        let var_file = dir.path().join("vars.toml");
        std::fs::write(
            &var_file,
            "region = \"us-east-1\"\npassword = \"from-file\"\n",
        )
        .unwrap();
        let inputs = VariableInputs {
            cli: vec![("password".into(), "from-cli".into())],
            var_files: vec![var_file.clone()],
            environment: [
                ("IMGBUILD_VAR_region".to_owned(), "from-env".to_owned()),
                (
                    "IMGBUILD_VAR_mirror".to_owned(),
                    "http://env-mirror".to_owned(),
                ),
                ("IMGBUILD_VAR_unrelated".to_owned(), "x".to_owned()),
            ]
            .into(),
        };
        let (variables, diagnostics) = resolve_text(CONFIG, &inputs);
        assert!(diagnostics.is_empty(), "{diagnostics}");
        let get = |name: &str| variables.iter().find(|v| v.name == name).unwrap();
        assert_eq!(get("region").value, "us-east-1");
        assert_eq!(get("region").source, ValueSource::VarFile(var_file));
        assert_eq!(get("count").value, "3");
        assert_eq!(get("password").value, "from-cli");
        assert!(get("password").sensitive);
        assert_eq!(get("mirror").value, "http://env-mirror");
        assert_eq!(get("mirror").source, ValueSource::Environment);
    }

    #[test]
    fn missing_required_and_unknown_given_names_are_reported() {
        let inputs = VariableInputs {
            cli: vec![("regoin".into(), "x".into())],
            ..VariableInputs::default()
        };
        let (_, diagnostics) = resolve_text(CONFIG, &inputs);
        let messages: Vec<String> = diagnostics.iter().map(|d| d.message.clone()).collect();
        assert!(
            messages
                .iter()
                .any(|m| m.contains("`regoin` is not a variable")),
            "{messages:?}"
        );
        assert!(
            diagnostics
                .iter()
                .any(|d| d.help.as_deref() == Some("did you mean `region`?")),
            "{diagnostics}"
        );
        let missing = diagnostics
            .iter()
            .find(|d| d.message.contains("`password` has no default"))
            .unwrap();
        assert_eq!(missing.line_column(), Some((5, 1)));
    }

    #[test]
    fn unknown_fields_in_a_declaration_are_rejected() {
        let (_, diagnostics) = resolve_text(
            "[variables]\nx = { defualt = \"a\" }\n",
            &VariableInputs::default(),
        );
        let diagnostic = diagnostics.iter().next().unwrap();
        assert_eq!(diagnostic.message, "unknown field `defualt`");
        assert!(
            diagnostic
                .help
                .as_deref()
                .unwrap()
                .starts_with("did you mean `default`?")
        );
        assert_eq!(diagnostic.line_column(), Some((2, 7)));
    }

    #[test]
    fn cli_assignments_parse() {
        assert_eq!(
            parse_cli_assignment("a=b=c").unwrap(),
            ("a".into(), "b=c".into())
        );
        assert!(parse_cli_assignment("novalue").is_err());
        assert!(parse_cli_assignment("1x=2").is_err());
    }
}
