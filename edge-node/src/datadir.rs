//! The agent's directories and their permissions (L6, L4).
//!
//! Everything the agent keeps lives under `data_dir`: the sled database
//! (`db/`), downloaded artifacts (`artifacts/`), the wasmtime compiled-code
//! cache ([`WASM_CACHE`]: loaded as native code, not re-verified), the node
//! identity ([`IDENTITY`]: its key and the trust anchors) and the OPC UA
//! client PKI ([`OPCUA_PKI`]: its key and the trusted servers). Whoever can
//! write there can make the agent run their code or trust their servers.
//! So [`prepare`], called before anything else at start:
//! - creates `data_dir` (and missing parents) and the private
//!   subdirectories owner-only, mode 0700;
//! - warns when an existing `data_dir` is writable by group or others (it
//!   may be a mount point the site chose: the agent leaves its mode alone);
//! - tightens an existing private subdirectory that group or others may
//!   use to 0700, with a warning; the compiled-code cache, which cannot be
//!   trusted once others could write to it, is also emptied (its modules
//!   are compiled again from the digest-checked artifacts).
//!
//! The identity directory is created only by `edge-node join`
//! ([`crate::identity::Identity::write`], through [`create_private`]): its
//! existence tells the agent to use it.
//!
//! On non-Unix systems directories are created with the platform's
//! defaults and nothing is checked.

use std::path::{Path, PathBuf};

/// The wasmtime compiled-code cache, under `data_dir`.
pub const WASM_CACHE: &str = "wasm-cache";
/// The node identity written by `edge-node join`, under `data_dir`.
pub const IDENTITY: &str = "identity";
/// The OPC UA client PKI (own certificate and key, trusted and rejected
/// servers), under `data_dir`.
pub const OPCUA_PKI: &str = "opcua-pki";

/// A directory could not be created or fixed.
#[derive(Debug, thiserror::Error)]
#[error("data_dir: cannot {what} {}: {source}", path.display())]
pub struct DataDirError {
    /// What was being done (`create`, `restrict`, `empty`, `inspect`).
    pub what: &'static str,
    /// The directory.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}

fn err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError {
    let path = path.to_path_buf();
    move |source| DataDirError { what, path, source }
}

/// Creates `path` and its missing parents owner-only (0700). An existing
/// directory is left as it is.
pub fn create_private(path: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        b.mode(0o700);
    }
    b.create(path)
}

/// Permission bits of `path`, `None` if it does not exist (or not on Unix).
fn mode(path: &Path) -> std::io::Result<Option<u32>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        match std::fs::metadata(path) {
            Ok(m) => Ok(Some(m.permissions().mode() & 0o7777)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(None)
    }
}

#[cfg(unix)]
fn restrict(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
}

#[cfg(not(unix))]
fn restrict(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Group- or other-writable.
const WRITABLE_BY_OTHERS: u32 = 0o022;
/// Any group or other permission.
const OPEN_TO_OTHERS: u32 = 0o077;

/// Makes `data_dir` and its private subdirectories safe to use (see the
/// module doc). Returns the warnings to log, one per directory that was
/// not private.
pub fn prepare(data_dir: &Path) -> Result<Vec<String>, DataDirError> {
    let mut warnings = Vec::new();
    match mode(data_dir).map_err(err("inspect", data_dir))? {
        None => create_private(data_dir).map_err(err("create", data_dir))?,
        Some(m) if m & WRITABLE_BY_OTHERS != 0 => warnings.push(format!(
            "data_dir {} is writable by group or others (mode {m:o}): anyone who can write it can \
             replace the compiled-code cache, artifacts and trust anchors; make it 0700",
            data_dir.display()
        )),
        Some(_) => {}
    }
    for name in [WASM_CACHE, OPCUA_PKI, IDENTITY] {
        let dir = data_dir.join(name);
        match mode(&dir).map_err(err("inspect", &dir))? {
            None if name == IDENTITY => {}
            None => create_private(&dir).map_err(err("create", &dir))?,
            Some(m) if m & OPEN_TO_OTHERS != 0 => {
                let mut w = format!(
                    "{} was open to group or others (mode {m:o}); restricted to 0700",
                    dir.display()
                );
                if name == WASM_CACHE && m & WRITABLE_BY_OTHERS != 0 {
                    // Native code someone else could have written: discard it.
                    std::fs::remove_dir_all(&dir).map_err(err("empty", &dir))?;
                    create_private(&dir).map_err(err("create", &dir))?;
                    w.push_str("; its compiled code was discarded and will be recompiled");
                } else {
                    restrict(&dir).map_err(err("restrict", &dir))?;
                }
                warnings.push(w);
            }
            Some(_) => {}
        }
    }
    Ok(warnings)
}

#[cfg(all(test, unix))]
#[allow(clippy::unwrap_used, reason = "test code")]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    fn set_mode(p: &Path, m: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }

    #[test]
    fn a_fresh_data_dir_and_its_private_dirs_are_owner_only() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("a/b/data");
        assert!(prepare(&data).unwrap().is_empty());
        assert_eq!(mode_of(&data), 0o700);
        for d in [WASM_CACHE, OPCUA_PKI] {
            assert_eq!(mode_of(&data.join(d)), 0o700, "{d}");
        }
        // The identity directory only comes from `edge-node join`.
        assert!(!data.join(IDENTITY).exists());
        // ... which creates it owner-only too.
        create_private(&data.join(IDENTITY)).unwrap();
        assert_eq!(mode_of(&data.join(IDENTITY)), 0o700);
        // Idempotent.
        assert!(prepare(&data).unwrap().is_empty());
    }

    #[test]
    fn loose_directories_are_reported_tightened_and_the_cache_discarded() {
        let t = tempfile::tempdir().unwrap();
        let data = t.path().join("data");
        prepare(&data).unwrap();
        let cache = data.join(WASM_CACHE);
        let planted = cache.join("planted-native-code");
        std::fs::write(&planted, b"\x7fELF").unwrap();
        set_mode(&cache, 0o777);
        let pki = data.join(OPCUA_PKI);
        set_mode(&pki, 0o755);
        let id = data.join(IDENTITY);
        create_private(&id).unwrap();
        std::fs::write(id.join("hub.pub"), b"k").unwrap();
        set_mode(&id, 0o775);
        set_mode(&data, 0o777);

        let w = prepare(&data).unwrap();
        assert_eq!(w.len(), 4, "{w:?}");
        assert!(w[0].contains("writable by group or others"), "{w:?}");
        // The data dir itself is the site's choice: warned about, not changed.
        assert_eq!(mode_of(&data), 0o777);
        for d in [&cache, &pki, &id] {
            assert_eq!(mode_of(d), 0o700, "{}", d.display());
        }
        assert!(!planted.exists(), "a cache others could write is discarded");
        assert!(w[1].contains("recompiled"), "{w:?}");
        // The identity is kept (only its directory's mode changes).
        assert!(id.join("hub.pub").exists());
        set_mode(&data, 0o700);
        assert!(prepare(&data).unwrap().is_empty());
    }
}
