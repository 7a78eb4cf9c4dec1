//! Templating of config strings: `{{ var.region }}`, `{{ env("HOME") }}`,
//! `{{ timestamp }}`, `{{ uuid() }}`, `{{ image.version }}`, `{{ build.name }}`,
//! `{{ git_sha }}`.
//!
//! Values land in shell commands and file paths, so nothing is ever escaped,
//! and anything undefined is an error rather than an empty string.

use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior, Value};
use std::ops::Range;

/// A template that failed to compile or render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    pub message: String,
    /// Byte range within the template text, when the engine knows it.
    pub range: Option<Range<usize>>,
}

impl std::fmt::Display for TemplateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_keep_trailing_newline(true);
    env.add_function("env", env_lookup);
    env.add_function("uuid", || uuid::Uuid::new_v4().to_string());
    env
}

fn env_lookup(name: String, default: Option<String>) -> Result<String, Error> {
    match (std::env::var(&name), default) {
        (Ok(value), _) => Ok(value),
        (Err(_), Some(default)) => Ok(default),
        (Err(_), None) => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!(
                "environment variable {name} is not set (give a default: env(\"{name}\", \"value\"))"
            ),
        )),
    }
}

/// Template values that differ on every run. A step whose config uses one
/// produces something different each time, so its result is never reused.
pub const PER_RUN_VALUES: &[&str] = &["run_id", "timestamp", "isotime", "uuid"];

/// The per-run values `text` refers to, in [`PER_RUN_VALUES`] order. A
/// template that does not compile refers to none (rendering reports it).
pub fn per_run_values(env: &Environment<'_>, text: &str) -> Vec<&'static str> {
    if !is_template(text) {
        return Vec::new();
    }
    let Ok(template) = env.template_from_str(text) else {
        return Vec::new();
    };
    let used = template.undeclared_variables(false);
    PER_RUN_VALUES
        .iter()
        .copied()
        .filter(|name| used.contains(*name))
        .collect()
}

/// Whether `text` contains template syntax at all; plain strings skip the
/// engine entirely.
pub fn is_template(text: &str) -> bool {
    text.contains("{{") || text.contains("{%") || text.contains("{#")
}

pub fn render(env: &Environment<'_>, text: &str, context: &Value) -> Result<String, TemplateError> {
    if !is_template(text) {
        return Ok(text.to_owned());
    }
    env.render_str(text, context)
        .map_err(|err| describe(err, text))
}

fn describe(err: Error, text: &str) -> TemplateError {
    let range = err.range().filter(|r| r.end <= text.len());
    let mut message = match err.kind() {
        ErrorKind::UndefinedError => {
            let what = range
                .clone()
                .map(|r| text[r].trim().to_owned())
                .unwrap_or_default();
            if what.is_empty() {
                "undefined value in template".to_owned()
            } else {
                format!("`{what}` is not defined")
            }
        }
        ErrorKind::UnknownFunction => "unknown function in template".to_owned(),
        _ => err
            .detail()
            .map(str::to_owned)
            .unwrap_or_else(|| err.kind().to_string()),
    };
    if let Some(detail) = err.detail()
        && !message.contains(detail)
    {
        message = format!("{message}: {detail}");
    }
    TemplateError { message, range }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Value {
        Value::from_serialize(serde_json::json!({"var": {"name": "a&b"}, "build": {"name": "vm"}}))
    }

    #[test]
    fn finds_per_run_values_in_expressions_and_calls_but_not_in_plain_text() {
        let env = environment();
        assert_eq!(
            per_run_values(
                &env,
                "echo {{ uuid() }}-{{ run_id | upper }} at {{ timestamp }}"
            ),
            vec!["run_id", "timestamp", "uuid"]
        );
        assert_eq!(
            per_run_values(&env, "{% if isotime %}x{% endif %}"),
            vec!["isotime"]
        );
        assert!(per_run_values(&env, "echo run_id {{ image.version }} {{ var.uuid }}").is_empty());
    }

    #[test]
    fn never_escapes() {
        let env = environment();
        assert_eq!(
            render(&env, "echo '{{ var.name }}' <{{ build.name }}>", &ctx()).unwrap(),
            "echo 'a&b' <vm>"
        );
    }

    #[test]
    fn undefined_names_are_errors_with_a_range() {
        let env = environment();
        let err = render(&env, "x {{ var.nope }} y", &ctx()).unwrap_err();
        assert!(err.message.contains("var.nope"), "{err:?}");
        let range = err.range.unwrap();
        assert_eq!(&"x {{ var.nope }} y"[range], "var.nope");
    }

    #[test]
    fn unknown_functions_are_errors() {
        let env = environment();
        let err = render(&env, "{{ nope() }}", &ctx()).unwrap_err();
        assert!(err.message.contains("unknown function"), "{err:?}");
    }

    #[test]
    fn env_lookup_with_and_without_default() {
        let env = environment();
        let home = std::env::var("PATH").unwrap();
        assert_eq!(render(&env, "{{ env('PATH') }}", &ctx()).unwrap(), home);
        assert_eq!(
            render(&env, "{{ env('IMGBUILD_SURELY_UNSET', 'dflt') }}", &ctx()).unwrap(),
            "dflt"
        );
        let err = render(&env, "{{ env('IMGBUILD_SURELY_UNSET') }}", &ctx()).unwrap_err();
        assert!(
            err.message.contains("IMGBUILD_SURELY_UNSET is not set"),
            "{err:?}"
        );
    }

    #[test]
    fn plain_strings_pass_through() {
        let env = environment();
        assert_eq!(
            render(&env, "no braces } here", &ctx()).unwrap(),
            "no braces } here"
        );
    }
}
