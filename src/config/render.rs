//! Renders the templates in every string of a parsed TOML tree, keeping
//! spans so a template error points at the config line.

use super::diagnostic::{Diagnostic, Diagnostics};
use imgbuild_core::template;
use minijinja::{Environment, Value};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use toml::Spanned;
use toml::de::DeValue;

/// Fields rendered later, when their values exist: `execute_command` needs
/// the uploaded script's path.
pub const DEFERRED_FIELDS: &[&str] = &["execute_command"];

pub struct Renderer<'a> {
    pub env: &'a Environment<'static>,
    pub context: &'a Value,
    pub file: &'a Path,
    pub source: &'a Arc<str>,
}

impl Renderer<'_> {
    /// Renders every string below `value` in place; `path` is the dotted
    /// field name of `value`.
    pub fn render_tree(
        &self,
        value: &mut Spanned<DeValue<'_>>,
        path: &str,
        diagnostics: &mut Diagnostics,
    ) {
        let span = value.span();
        match value.get_mut() {
            DeValue::String(text) => match template::render(self.env, text, self.context) {
                Ok(rendered) => {
                    if rendered != **text {
                        *text = rendered.into();
                    }
                }
                Err(err) => diagnostics.push(self.template_error(&err, text, span, path)),
            },
            DeValue::Array(items) => {
                for (index, item) in items.iter_mut().enumerate() {
                    self.render_tree(item, &format!("{path}[{index}]"), diagnostics);
                }
            }
            DeValue::Table(table) => {
                for (key, item) in table.iter_mut() {
                    let field = join(path, key.get_ref());
                    if DEFERRED_FIELDS.contains(&key.get_ref().as_ref()) {
                        continue;
                    }
                    self.render_tree(item, &field, diagnostics);
                }
            }
            _ => {}
        }
    }

    pub fn template_error(
        &self,
        err: &template::TemplateError,
        text: &str,
        value_span: Range<usize>,
        path: &str,
    ) -> Diagnostic {
        let span = err
            .range
            .as_ref()
            .and_then(|range| {
                locate_in_literal(self.source, value_span.clone(), text, range.clone())
            })
            .unwrap_or(value_span);
        Diagnostic::new(self.file, format!("template error: {}", err.message))
            .at(self.source, span)
            .field(path)
            .help(
                "templates can use var.NAME, env(\"NAME\"), timestamp, isotime, uuid(), run_id, git_sha, image.name, image.version, build.name and build.type",
            )
    }
}

pub fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Maps a range inside a string's value to a range in the file, when the
/// literal spells the value out unchanged (no escapes).
fn locate_in_literal(
    source: &str,
    span: Range<usize>,
    text: &str,
    range: Range<usize>,
) -> Option<Range<usize>> {
    let raw = source.get(span.clone())?;
    for quote in ["\"\"\"", "'''", "\"", "'"] {
        if let Some(inner) = raw.strip_prefix(quote).and_then(|r| r.strip_suffix(quote)) {
            let (inner, skipped) = match inner.strip_prefix('\n') {
                Some(rest) if quote.len() == 3 => (rest, 1),
                _ => (inner, 0),
            };
            if inner == text {
                let start = span.start + quote.len() + skipped;
                return Some(start + range.start..start + range.end);
            }
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_template_ranges_in_plain_literals() {
        let source = r#"x = "a {{ nope }} b""#;
        let span = 4..source.len();
        let text = "a {{ nope }} b";
        let range = 5..9;
        let mapped = locate_in_literal(source, span, text, range).unwrap();
        assert_eq!(&source[mapped], "nope");
    }

    #[test]
    fn gives_up_on_escaped_literals() {
        let source = r#"x = "a\t{{ nope }}""#;
        assert!(locate_in_literal(source, 4..source.len(), "a\t{{ nope }}", 5..9).is_none());
    }
}
