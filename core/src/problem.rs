//! The one shape of a config problem found after deserialization, by a
//! builder or a provisioner: the loader turns it into a diagnostic pointing
//! at the field in the file.

/// A problem with a config table that its types could not catch on their
/// own (two options that exclude each other, a file that does not exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The field within the table, dotted (`ssh.private_key_file`,
    /// `scripts[1]`).
    pub field: String,
    pub message: String,
    /// What to do about it, when the message alone does not say.
    pub help: Option<String>,
}

impl ConfigProblem {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigProblem {
            field: field.into(),
            message: message.into(),
            help: None,
        }
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}
