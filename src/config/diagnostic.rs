//! Config errors that point at the file, line, column and field, show the
//! offending line, and say what is expected.

use annotate_snippets::{AnnotationKind, Group, Level, Renderer, Snippet};
use serde::Serialize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One problem with an input file (the config, or a var file).
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub file: PathBuf,
    /// The file's text, when the problem has a location in it.
    pub source: Option<Arc<str>>,
    pub span: Option<Range<usize>>,
    /// Dotted path of the offending field: `builders.debian.memory`.
    pub field: Option<String>,
    pub message: String,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(file: &Path, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_path_buf(),
            source: None,
            span: None,
            field: None,
            message: message.into(),
            help: None,
        }
    }

    pub fn at(mut self, source: &Arc<str>, span: Range<usize>) -> Self {
        // Spans can come from byte counts that know nothing of UTF-8 (a
        // template engine's one-byte error range at an emoji); widened to
        // whole characters so the snippet renderer can slice the line.
        let start = source.floor_char_boundary(span.start.min(source.len()));
        let end = source.ceil_char_boundary(span.end.clamp(start, source.len()));
        self.source = Some(source.clone());
        self.span = Some(start..end);
        self
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        let field = field.into();
        if !field.is_empty() {
            self.field = Some(field);
        }
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// 1-based line and column of the start of the span.
    pub fn line_column(&self) -> Option<(usize, usize)> {
        let (source, span) = (self.source.as_ref()?, self.span.as_ref()?);
        let start = span.start.min(source.len());
        let before = &source[..start];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = source[line_start..start].chars().count() + 1;
        Some((line, column))
    }

    pub fn render(&self, color: bool) -> String {
        let title = match &self.field {
            Some(field) => format!("{}: {}", field, self.message),
            None => self.message.clone(),
        };
        let path = self.file.display().to_string();
        let renderer = if color {
            Renderer::styled()
        } else {
            Renderer::plain()
        };
        let mut report = Vec::new();
        match (&self.source, &self.span) {
            (Some(source), Some(span)) => {
                let span = clamp(source, span.clone());
                report.push(
                    Level::ERROR.primary_title(title).element(
                        Snippet::source(&**source)
                            .path(path)
                            .annotation(AnnotationKind::Primary.span(span).label(self.label())),
                    ),
                );
            }
            _ => {
                // Without a snippet the renderer has nothing to anchor the
                // path to; a plain rustc-like layout reads best.
                let (error_label, help_label, bold) = if color {
                    ("\x1b[1;31merror\x1b[0m", "\x1b[1;36mhelp\x1b[0m", "\x1b[1m")
                } else {
                    ("error", "help", "")
                };
                let reset = if color { "\x1b[0m" } else { "" };
                let mut text = format!("{error_label}: {bold}{title}{reset}\n  --> {path}");
                if let Some(help) = &self.help {
                    text.push_str(&format!("\n{help_label}: {help}"));
                }
                return text;
            }
        }
        if let Some(help) = &self.help {
            report.push(Group::with_title(Level::HELP.secondary_title(help.clone())));
        }
        renderer.render(&report)
    }

    fn label(&self) -> String {
        self.field
            .as_deref()
            .and_then(|f| f.rsplit('.').next())
            .map(|f| format!("in `{f}`"))
            .unwrap_or_default()
    }

    pub fn to_json(&self) -> DiagnosticJson {
        let (line, column) = self
            .line_column()
            .map_or((None, None), |(l, c)| (Some(l), Some(c)));
        DiagnosticJson {
            file: self.file.display().to_string(),
            line,
            column,
            field: self.field.clone(),
            message: self.message.clone(),
            help: self.help.clone(),
        }
    }
}

fn clamp(source: &str, span: Range<usize>) -> Range<usize> {
    let start = span.start.min(source.len());
    let end = span.end.clamp(start, source.len());
    start..end
}

#[derive(Debug, Serialize)]
pub struct DiagnosticJson {
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub help: Option<String>,
}

/// Every problem found in one load, so a user fixes them in one round.
#[derive(Debug, Clone, Default)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, diagnostic: Diagnostic) {
        self.0.push(diagnostic);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter()
    }

    pub fn render(&self, color: bool) -> String {
        let mut text = String::new();
        for diagnostic in &self.0 {
            text.push_str(&diagnostic.render(color));
            text.push_str("\n\n");
        }
        let count = self.0.len();
        text.push_str(&format!(
            "{count} problem{} in the configuration; nothing was built",
            if count == 1 { "" } else { "s" }
        ));
        text
    }
}

impl std::fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render(false))
    }
}

impl std::error::Error for Diagnostics {}

/// The closest candidate to a misspelt word, if any is close enough to be
/// what was meant.
pub fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    // Similar spelling (jaro-winkler) catches typos in long names; a small
    // edit distance catches swapped letters in short ones ("mv" for "vm").
    let allowed_edits = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|candidate| (candidate, strsim::jaro_winkler(word, candidate)))
        .filter(|(candidate, score)| {
            *score >= 0.8 || strsim::damerau_levenshtein(word, candidate) <= allowed_edits
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(candidate, _)| candidate)
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" into a
/// message and a "did you mean" help.
pub fn explain_serde_message(message: &str) -> (String, Option<String>) {
    let message = message.trim();
    for (prefix, noun) in [("unknown field `", "field"), ("unknown variant `", "value")] {
        let Some(rest) = message.strip_prefix(prefix) else {
            continue;
        };
        let Some((word, expected)) = rest.split_once('`') else {
            continue;
        };
        let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        let headline = format!("unknown {noun} `{word}`");
        let listing = if candidates.is_empty() {
            None
        } else {
            Some(
                candidates
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        };
        let help = match (did_you_mean(word, candidates.iter().copied()), listing) {
            (Some(best), Some(listing)) => {
                Some(format!("did you mean `{best}`? expected one of {listing}"))
            }
            (None, Some(listing)) => Some(format!("expected one of {listing}")),
            _ => None,
        };
        return (headline, help);
    }
    (message.to_owned(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_line_and_column() {
        let source: Arc<str> = Arc::from("a = 1\nbb = 2\n");
        let diagnostic = Diagnostic::new(Path::new("x.toml"), "bad").at(&source, 6..8);
        assert_eq!(diagnostic.line_column(), Some((2, 1)));
        let rendered = diagnostic.field("bb").render(false);
        assert!(rendered.contains("x.toml:2:1"), "{rendered}");
        assert!(rendered.contains("bb = 2"), "{rendered}");
    }

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(did_you_mean("memroy", ["memory", "cpus"]), Some("memory"));
        assert_eq!(did_you_mean("zzz", ["memory", "cpus"]), None);
        assert_eq!(did_you_mean("mv", ["vm", "docker"]), Some("vm"));
    }

    #[test]
    fn explains_unknown_fields() {
        let (message, help) =
            explain_serde_message("unknown field `memroy`, expected one of `memory`, `cpus`");
        assert_eq!(message, "unknown field `memroy`");
        assert_eq!(
            help.unwrap(),
            "did you mean `memory`? expected one of `memory`, `cpus`"
        );
        let (message, help) =
            explain_serde_message("unknown variant `qcow3`, expected `qcow2` or `raw`");
        assert_eq!(message, "unknown value `qcow3`");
        assert!(help.unwrap().starts_with("did you mean `qcow2`?"));
    }
}
