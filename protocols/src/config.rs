//! The configuration loading skeleton shared by the hub and the edge node:
//! built-in defaults < a config file < environment variables, into a typed
//! config, with one [`ConfigError`] whose message names the file, the
//! variable or the field that is wrong.
//!
//! No I/O here: the caller passes the file reader (`std::fs::read_to_string`),
//! the text parser (`toml::from_str`) and the environment lookup (a function
//! from a variable name to its value, so tests need not touch the process
//! environment). Start at [`load`]; [`env_parse`] turns one variable into a
//! typed value. Checks both configs share ([`check_topic_root`],
//! [`check_cache_capacity`]) keep their messages in one place.

use std::error::Error;
use std::fmt::Display;
use std::path::{Path as FsPath, PathBuf};
use std::str::FromStr;

use crate::validate::{Collector, Path, ValidationErrors};

/// A config text parser's error (e.g. `toml::de::Error`, whose message names
/// the field).
pub type ParseError = Box<dyn Error + Send + Sync>;

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not fit the schema (the message names the field).
    #[error("config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: ParseError,
    },
    /// An environment variable has a value of the wrong type.
    #[error("environment variable {name}={value:?}: {reason}")]
    Env {
        /// Variable name.
        name: String,
        /// Its value.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// Values parse but are invalid.
    #[error("invalid configuration: {0}")]
    Invalid(#[from] ValidationErrors),
}

/// Parses the text of config file `path` with `parse`.
pub fn parse_file<T, E>(
    path: &FsPath,
    text: &str,
    parse: impl FnOnce(&str) -> Result<T, E>,
) -> Result<T, ConfigError>
where
    E: Error + Send + Sync + 'static,
{
    parse(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(e),
    })
}

/// Loads `T::default()`, or the file (if given) read by `read` and parsed by
/// `parse`, then lets `apply_env` override fields from the environment.
pub fn load<T, E>(
    file: Option<&FsPath>,
    read: impl FnOnce(&FsPath) -> std::io::Result<String>,
    parse: impl FnOnce(&str) -> Result<T, E>,
    apply_env: impl FnOnce(&mut T) -> Result<(), ConfigError>,
) -> Result<T, ConfigError>
where
    T: Default,
    E: Error + Send + Sync + 'static,
{
    let mut cfg = match file {
        Some(path) => {
            let text = read(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            parse_file(path, &text, parse)?
        }
        None => T::default(),
    };
    apply_env(&mut cfg)?;
    Ok(cfg)
}

/// The variable `name` from `env` parsed as a `T`; `None` when unset.
pub fn env_parse<T>(
    env: &impl Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<T>, ConfigError>
where
    T: FromStr,
    T::Err: Display,
{
    let Some(value) = env(name) else {
        return Ok(None);
    };
    match value.parse() {
        Ok(v) => Ok(Some(v)),
        Err(e) => Err(ConfigError::Env {
            name: name.to_owned(),
            reason: e.to_string(),
            value,
        }),
    }
}

/// Smallest sled page cache either process accepts.
pub const MIN_CACHE_CAPACITY_BYTES: u64 = 1024 * 1024;

/// The MQTT topic root must be non-empty and free of wildcards.
pub fn check_topic_root(c: &mut Collector, path: &Path<'_>, root: &str) {
    if root.is_empty() || root.contains(['+', '#']) {
        c.push(
            path,
            format!("{root:?} must be non-empty and free of + and #"),
        );
    }
}

/// The sled page cache must be at least [`MIN_CACHE_CAPACITY_BYTES`].
pub fn check_cache_capacity(c: &mut Collector, path: &Path<'_>, bytes: u64) {
    if bytes < MIN_CACHE_CAPACITY_BYTES {
        c.push(path, format!("must be at least {MIN_CACHE_CAPACITY_BYTES}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, PartialEq)]
    struct Cfg {
        name: String,
        port: u16,
    }

    /// `name=port` — a stand-in for a real format.
    fn parse(text: &str) -> Result<Cfg, std::num::ParseIntError> {
        let (name, port) = text.trim().split_once('=').unwrap_or((text, ""));
        Ok(Cfg {
            name: name.to_owned(),
            port: port.parse()?,
        })
    }

    fn env(k: &str) -> Option<String> {
        match k {
            "PORT" => Some("7".into()),
            "BAD" => Some("x".into()),
            _ => None,
        }
    }

    fn file(text: &'static str) -> impl FnOnce(&FsPath) -> std::io::Result<String> {
        move |_| Ok(text.to_owned())
    }

    #[test]
    fn defaults_then_file_then_environment() {
        let none = load(None, file("a=1"), parse, |_| Ok(())).unwrap();
        assert_eq!(none, Cfg::default());
        let path = FsPath::new("c.conf");
        let from_file = load(Some(path), file("a=1"), parse, |_| Ok(())).unwrap();
        assert_eq!(
            from_file,
            Cfg {
                name: "a".into(),
                port: 1
            }
        );
        let over = load(Some(path), file("a=1"), parse, |c: &mut Cfg| {
            if let Some(p) = env_parse(&env, "PORT")? {
                c.port = p;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(
            over,
            Cfg {
                name: "a".into(),
                port: 7
            }
        );
    }

    #[test]
    fn errors_name_the_file_or_the_variable() {
        let path = FsPath::new("c.conf");
        let missing = |_: &FsPath| -> std::io::Result<String> {
            Err(std::io::Error::new(std::io::ErrorKind::NotFound, "gone"))
        };
        let e = load(Some(path), missing, parse, |_| Ok(())).unwrap_err();
        assert_eq!(e.to_string(), "cannot read config file c.conf: gone");
        let e = load(Some(path), file("a=z"), parse, |_| Ok(())).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "config file c.conf: invalid digit found in string"
        );
        assert!(e.source().is_some(), "the parser's error is the source");
        let e = env_parse::<u16>(&env, "BAD").unwrap_err().to_string();
        assert_eq!(
            e,
            "environment variable BAD=\"x\": invalid digit found in string"
        );
        assert_eq!(env_parse::<u16>(&env, "UNSET").unwrap(), None);
    }

    #[test]
    fn shared_checks_name_the_field() {
        let mut c = Collector::new();
        let root = Path::Root;
        check_topic_root(&mut c, &root.field("topic_root"), "a/+/b");
        check_topic_root(&mut c, &root.field("ok"), "edgefleet/v1");
        check_cache_capacity(&mut c, &root.field("cache_capacity_bytes"), 1024);
        check_cache_capacity(&mut c, &root.field("fine"), MIN_CACHE_CAPACITY_BYTES);
        let errors = c.finish().unwrap_err();
        assert_eq!(errors.errors().len(), 2, "{errors}");
        let e = errors.to_string();
        assert!(
            e.contains("topic_root: \"a/+/b\" must be non-empty and free of + and #"),
            "{e}"
        );
        assert!(
            e.contains("cache_capacity_bytes: must be at least 1048576"),
            "{e}"
        );
    }
}
