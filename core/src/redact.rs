//! Sensitive values (passwords, tokens) must never reach a log line, an event
//! or the manifest. Every text that leaves the process passes through one
//! shared [`Redactor`].

use std::borrow::Cow;
use std::sync::{Arc, RwLock};

pub const MASK: &str = "<sensitive>";

#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Arc<RwLock<Vec<String>>>,
}

impl Redactor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a value to be masked, together with the encoded forms it
    /// takes on its way to the machine (see [`encoded_forms`]). Values
    /// shorter than 3 characters are ignored: masking every "a" or "1" in the
    /// output would make it unreadable while protecting nothing.
    pub fn add(&self, secret: impl Into<String>) {
        let secret = secret.into();
        if secret.chars().count() < 3 {
            return;
        }
        let mut secrets = self.secrets.write().expect("redactor lock poisoned");
        for form in encoded_forms(&secret) {
            if !secrets.contains(&form) {
                secrets.push(form);
            }
        }
        // Longest first, so a secret containing another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }

    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let secrets = self.secrets.read().expect("redactor lock poisoned");
        let mut result = Cow::Borrowed(text);
        for secret in secrets.iter() {
            if result.contains(secret.as_str()) {
                result = Cow::Owned(result.replace(secret.as_str(), MASK));
            }
        }
        result
    }

    /// Masks every string value inside a JSON value. Keys are structure
    /// (field names), not data, and stay as they are.
    pub fn redact_json(&self, value: &mut serde_json::Value) {
        match value {
            serde_json::Value::String(text) => {
                if let Cow::Owned(masked) = self.redact(text) {
                    *text = masked;
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| self.redact_json(v)),
            serde_json::Value::Object(map) => map.values_mut().for_each(|v| self.redact_json(v)),
            _ => {}
        }
    }

    /// As [`Self::redact_json`], but each sensitive value is replaced by
    /// what `replace` makes of it (a hash, for a cache key that must change
    /// when a password does without containing it).
    pub fn replace_json(&self, value: &mut serde_json::Value, replace: &dyn Fn(&str) -> String) {
        match value {
            serde_json::Value::String(text) => {
                let secrets = self.secrets.read().expect("redactor lock poisoned");
                for secret in secrets.iter() {
                    if text.contains(secret.as_str()) {
                        *text = text.replace(secret.as_str(), &replace(secret));
                    }
                }
            }
            serde_json::Value::Array(items) => {
                items.iter_mut().for_each(|v| self.replace_json(v, replace))
            }
            serde_json::Value::Object(map) => {
                map.values_mut().for_each(|v| self.replace_json(v, replace))
            }
            _ => {}
        }
    }

    pub fn is_empty(&self) -> bool {
        self.secrets
            .read()
            .expect("redactor lock poisoned")
            .is_empty()
    }
}

/// A secret as written in every encoding imgbuild itself puts it in before
/// it can reach a log line: raw; inside a single-quoted shell word (`'` as
/// `'\''`, as the shell provisioner's `{{ vars }}` writes it); inside a JSON
/// or YAML double-quoted string (the cloud-init seed, API bodies echoed in
/// errors); percent-encoded (a URL).
fn encoded_forms(secret: &str) -> Vec<String> {
    let json = serde_json::to_string(secret).expect("strings serialize");
    let json_inner = json[1..json.len() - 1].to_owned();
    let percent: String = secret
        .bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(byte).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect();
    let mut forms = vec![
        secret.to_owned(),
        secret.replace('\'', r"'\''"),
        json_inner,
        percent,
    ];
    forms.sort();
    forms.dedup();
    forms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_secrets_in_json_strings_with_what_the_caller_makes_of_them() {
        let redactor = Redactor::new();
        redactor.add("hunter2");
        let mut value =
            serde_json::json!({"env": {"PW": "pw=hunter2"}, "n": 1, "list": ["hunter2"]});
        redactor.replace_json(&mut value, &|secret| format!("<{}>", secret.len()));
        assert_eq!(
            value,
            serde_json::json!({"env": {"PW": "pw=<7>"}, "n": 1, "list": ["<7>"]})
        );
    }

    #[test]
    fn masks_every_occurrence_and_longest_first() {
        let redactor = Redactor::new();
        redactor.add("hunter2");
        redactor.add("hunter2-extended");
        assert_eq!(
            redactor.redact("pw=hunter2-extended and hunter2"),
            "pw=<sensitive> and <sensitive>"
        );
    }

    #[test]
    fn masks_the_forms_a_secret_takes_on_its_way_to_the_machine() {
        let redactor = Redactor::new();
        redactor.add(r#"it's "quoted" & a\path"#);
        for text in [
            r#"PW='it'\''s "quoted" & a\path' sh /tmp/x.sh"#,
            r#"{"password": "it's \"quoted\" & a\\path"}"#,
            "https://host/base?token=it%27s%20%22quoted%22%20%26%20a%5Cpath",
        ] {
            let masked = redactor.redact(text);
            assert!(masked.contains(MASK), "{text} -> {masked}");
            assert!(!masked.contains("quoted"), "{text} -> {masked}");
        }
    }

    #[test]
    fn ignores_trivially_short_values() {
        let redactor = Redactor::new();
        redactor.add("ab");
        assert_eq!(redactor.redact("abc"), "abc");
        assert!(redactor.is_empty());
    }

    #[test]
    fn masks_json_string_values_but_not_field_names() {
        let redactor = Redactor::new();
        redactor.add("s3cret");
        let mut value = serde_json::json!({"a": ["x s3cret"], "s3cret_field": "s3cret"});
        redactor.redact_json(&mut value);
        assert_eq!(
            value,
            serde_json::json!({"a": ["x <sensitive>"], "s3cret_field": "<sensitive>"})
        );
    }
}
