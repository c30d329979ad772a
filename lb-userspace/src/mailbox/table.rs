//! The explicit mailbox table: a text file of `mailbox backend-name` lines (`#` starts a
//! comment), like perdition's popmap. It pins mailboxes that must not follow the hash, and it
//! is where `mxlb mailbox move` records a move: the line is replaced in place (comments and
//! order kept) and the file is rewritten atomically.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use super::{normalize, valid_name};

/// Explicit owners by normalised mailbox name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    owners: HashMap<String, String>,
}

/// A table file that cannot be used; names the file and line so the operator can fix it.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("{}: {source}", file.display())]
    Read { file: PathBuf, source: std::io::Error },
    #[error("{}:{line}: {message}", file.display())]
    Line { file: PathBuf, line: usize, message: String },
    #[error(transparent)]
    Write(#[from] crate::statefile::StateError),
}

/// One meaningful line: its mailbox (as written) and back-end.
fn entry(raw: &str) -> Option<(&str, &str, usize)> {
    let content = raw.split('#').next().unwrap_or_default().trim();
    if content.is_empty() {
        return None;
    }
    let fields: Vec<&str> = content.split_whitespace().collect();
    match fields.as_slice() {
        &[m, b] => Some((m, b, 2)),
        _ => Some(("", "", fields.len())),
    }
}

impl Table {
    /// Reads and checks `file`; a missing file is an empty table. `backends` are the names
    /// owners may have.
    pub fn load_or_empty(file: &Path, backends: &[&str]) -> Result<Table, TableError> {
        match std::fs::read_to_string(file) {
            Ok(text) => Table::parse(&text, file, backends),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Table::default()),
            Err(source) => Err(TableError::Read { file: file.to_path_buf(), source }),
        }
    }

    /// Parses table text; `file` only names the source in errors.
    pub fn parse(text: &str, file: &Path, backends: &[&str]) -> Result<Table, TableError> {
        let mut owners = HashMap::new();
        let mut first_line = HashMap::new();
        for (n, raw) in text.lines().enumerate() {
            let line = n + 1;
            let err = |message: String| TableError::Line { file: file.to_path_buf(), line, message };
            let Some((mailbox, backend, fields)) = entry(raw) else { continue };
            if fields != 2 {
                return Err(err(format!("expected `mailbox backend-name`, found {fields} fields")));
            }
            if !valid_name(mailbox) {
                return Err(err(format!("`{mailbox}` is not a mailbox name")));
            }
            if !backends.contains(&backend) {
                return Err(err(format!("no mailbox back-end is named `{backend}`")));
            }
            let key = normalize(mailbox);
            if let Some(prev) = first_line.insert(key.clone(), line) {
                return Err(err(format!("`{mailbox}` is already mapped on line {prev}")));
            }
            owners.insert(key, backend.to_string());
        }
        Ok(Table { owners })
    }

    /// The pinned owner of a normalised mailbox name.
    pub fn owner(&self, key: &str) -> Option<&str> {
        self.owners.get(key).map(String::as_str)
    }

    pub fn mailboxes(&self) -> impl Iterator<Item = &str> {
        self.owners.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.owners.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owners.is_empty()
    }

    /// Sets the owner of `key` (normalised) in `file` and in this table: the mailbox's line is
    /// replaced where it is, or appended; the rest of the file stays as written.
    pub fn set_in_file(&mut self, file: &Path, key: &str, backend: &str) -> Result<(), TableError> {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(TableError::Read { file: file.to_path_buf(), source }),
        };
        let mut out = String::with_capacity(text.len() + key.len() + backend.len() + 2);
        let mut replaced = false;
        for raw in text.lines() {
            match entry(raw) {
                Some((m, _, 2)) if normalize(m) == key => {
                    if !replaced {
                        out.push_str(&format!("{key} {backend}\n"));
                        replaced = true;
                    }
                }
                _ => {
                    out.push_str(raw);
                    out.push('\n');
                }
            }
        }
        if !replaced {
            out.push_str(&format!("{key} {backend}\n"));
        }
        crate::statefile::write_atomic(file, out.as_bytes())?;
        self.owners.insert(key.to_string(), backend.to_string());
        Ok(())
    }
}
