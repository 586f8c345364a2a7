//! Semantic validation with errors that name the offending field.
//!
//! Parsing (see [`crate::codec`]) catches wrong types and unknown fields; this
//! module catches values that parse but make no sense: out-of-range addresses,
//! duplicate names, empty intervals. Every error carries a path in the form a
//! user would write it: `devices[3].points[7].address`.

use std::fmt;

/// One thing wrong with a document, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path to the field, e.g. `devices[3].points[7].address`.
    pub path: String,
    /// What is wrong with it, e.g. `70000 is out of range 0..=65535`.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Everything wrong with a document (never empty when returned as an error).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl ValidationErrors {
    /// The individual field errors, in document order.
    pub fn errors(&self) -> &[FieldError] {
        &self.0
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects field errors while walking a document.
///
/// Paths are built with [`Path::field`] / [`Path::index`], which return
/// a child collector sharing the same error list.
#[derive(Debug, Default)]
pub struct Collector {
    errors: Vec<FieldError>,
}

impl Collector {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records an error at `path`.
    pub fn push(&mut self, path: &Path<'_>, message: impl Into<String>) {
        self.errors.push(FieldError {
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// `Ok(())` when nothing was recorded.
    pub fn finish(self) -> Result<(), ValidationErrors> {
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.errors))
        }
    }
}

/// A field path, built without allocating until an error is recorded.
#[derive(Debug, Clone, Copy)]
pub enum Path<'a> {
    /// The document root.
    Root,
    /// `parent.name`
    Field(&'a Path<'a>, &'a str),
    /// `parent[i]`
    Index(&'a Path<'a>, usize),
}

impl<'a> Path<'a> {
    /// `self.name`
    pub fn field(&'a self, name: &'a str) -> Path<'a> {
        Path::Field(self, name)
    }

    /// `self[i]`
    pub fn index(&'a self, i: usize) -> Path<'a> {
        Path::Index(self, i)
    }
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Root => Ok(()),
            Path::Field(parent, name) => {
                if matches!(parent, Path::Root) {
                    f.write_str(name)
                } else {
                    write!(f, "{parent}.{name}")
                }
            }
            Path::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// Checks a name used as an MQTT topic level or a map key: 1..=64 characters of
/// `[A-Za-z0-9._-]`, so it can never inject `/`, `+` or `#` into a topic.
pub fn check_name(c: &mut Collector, path: &Path<'_>, value: &str) {
    if value.is_empty() {
        c.push(path, "must not be empty");
    } else if value.len() > 64 {
        c.push(path, format!("{value:?} is longer than 64 characters"));
    } else if let Some(bad) = value
        .chars()
        .find(|ch| !(ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-')))
    {
        c.push(
            path,
            format!("{value:?} contains {bad:?}; allowed are A-Z a-z 0-9 . _ -"),
        );
    }
}

/// Returns whether `value` passes [`check_name`].
pub fn is_valid_name(value: &str) -> bool {
    let mut c = Collector::new();
    check_name(&mut c, &Path::Root, value);
    c.errors.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_render_like_a_user_writes_them() {
        let root = Path::Root;
        let devices = root.field("devices");
        let d3 = devices.index(3);
        let points = d3.field("points");
        let p7 = points.index(7);
        let addr = p7.field("address");
        assert_eq!(addr.to_string(), "devices[3].points[7].address");
    }

    #[test]
    fn names_reject_topic_metacharacters() {
        for bad in ["", "a/b", "a+b", "#", "é", &"x".repeat(65)] {
            assert!(!is_valid_name(bad), "{bad:?} should be rejected");
        }
        for good in ["node-1", "line_3.press", "A9"] {
            assert!(is_valid_name(good), "{good:?} should be accepted");
        }
    }
}
