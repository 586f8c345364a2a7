//! The hub's Ed25519 signing key: created on first start, kept in the data dir.

use std::path::Path;

use protocols::signing::SigningKey;
use rand::RngCore as _;

/// Why the key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the key file failed.
    #[error("signing key {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The key file does not hold 64 hex characters.
    #[error("signing key {path}: not 64 hex characters")]
    Malformed {
        /// The file.
        path: String,
    },
}

/// Loads `dir/hub-signing.key`, creating it (mode 0600) if absent.
pub fn load_or_create(dir: &Path) -> Result<SigningKey, KeyError> {
    let path = dir.join("hub-signing.key");
    let shown = path.display().to_string();
    let io = |source| KeyError::Io {
        path: shown.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let bytes: [u8; 32] = hex::decode(text.trim())
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| KeyError::Malformed {
                    path: shown.clone(),
                })?;
            Ok(SigningKey::from_bytes(&bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io)?;
            let mut bytes = [0u8; 32];
            rand::rng().fill_bytes(&mut bytes);
            let tmp = dir.join("hub-signing.key.tmp");
            write_private(&tmp, &hex::encode(bytes)).map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok(SigningKey::from_bytes(&bytes))
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}
