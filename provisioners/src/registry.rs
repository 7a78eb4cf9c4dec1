//! Every provisioner kind imgbuild knows, in one list. Adding a provisioner
//! is one module implementing [`ProvisionerKind`] plus one line in
//! [`PROVISIONERS`]; the config loader, `inspect` and the help text all read
//! the list and hold no per-kind code.

use crate::provisioner::Provisioner;
use imgbuild_core::ConfigProblem;
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// The provisioner kinds, in the order help lists them.
pub static PROVISIONERS: &[&dyn ProvisionerKind] = &[
    &crate::shell::ShellKind,
    &crate::file::FileKind,
    &crate::ansible::AnsibleKind,
    &crate::ansible_local::AnsibleLocalKind,
];

/// One `type = "..."` of a `[[provision]]` table.
pub trait ProvisionerKind: Sync {
    /// The `type` in the config.
    fn name(&self) -> &'static str;

    /// One line for help and error messages.
    fn summary(&self) -> &'static str;

    /// Builds the provisioner from its table (templates already rendered,
    /// `type`, `only` and `except` removed). Everything the provisioner
    /// will need is checked here, before any machine exists: a step never
    /// parses its config again.
    fn parse(&self, input: ParseInput<'_>) -> Result<Parsed, ParseError>;
}

/// What a kind parses.
pub struct ParseInput<'a> {
    pub table: &'a toml::Spanned<toml::de::DeValue<'a>>,
    /// Relative paths in the config are relative to this directory.
    pub config_dir: &'a Path,
    /// The values templates evaluated at run time may use (`build.name`,
    /// `var.*`, ...), for kinds that render templates late.
    pub template_context: &'a serde_json::Value,
}

/// A provisioner ready to run, with what the loader records about it.
pub struct Parsed {
    pub provisioner: Provisioner,
    /// The config as resolved, for `inspect` and the inputs hash.
    pub resolved: serde_json::Value,
    /// Local files the provisioner reads, for the inputs hash.
    pub input_files: Vec<PathBuf>,
}

#[derive(Debug)]
pub enum ParseError {
    /// The table does not deserialize: an unknown field, a wrong type.
    Invalid(toml::de::Error),
    /// It deserialized, but these fields are wrong.
    Problems(Vec<ConfigProblem>),
}

/// The kind named `name`, if imgbuild has it.
pub fn find(name: &str) -> Option<&'static dyn ProvisionerKind> {
    PROVISIONERS
        .iter()
        .copied()
        .find(|kind| kind.name() == name)
}

/// Every kind's name, in registry order.
pub fn names() -> Vec<&'static str> {
    PROVISIONERS.iter().map(|kind| kind.name()).collect()
}

/// Deserializes a kind's config type, the first thing every kind does.
pub fn deserialize<T: DeserializeOwned>(input: &ParseInput<'_>) -> Result<T, ParseError> {
    T::deserialize(toml::de::ValueDeserializer::from(input.table.clone()))
        .map_err(ParseError::Invalid)
}

/// `Err` with the problems found, if any.
pub fn refuse(problems: Vec<ConfigProblem>) -> Result<(), ParseError> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ParseError::Problems(problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_unique() {
        let mut names = names();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "a provisioner kind is listed twice");
    }
}
