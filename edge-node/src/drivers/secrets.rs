//! Device secrets: the CA and password files desired state names for MQTT
//! and OPC UA devices, looked up only in the gateway's device-secrets
//! directory (`[devices] secrets_dir`), so a document can only pick among
//! files the gateway's operator put there (M10, L4).
//!
//! A password file must be private: one that group or others can reach and
//! read (its mode lets them read it *and* its directory lets them in), or
//! in a secrets directory they can write (so they could swap the file), is
//! refused with an error naming the field, not merely warned about. A
//! secret others can read is no longer a secret, and a refused device is
//! visible at once in its status; a warning in a log is easily missed while
//! the password keeps being used. A 0644 file in a 0700 directory (the
//! agent creates its data dir 0700) is private and accepted: refusing it
//! would refuse a safe set-up. CA files are public material and are not
//! checked.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// `{secrets_dir}/{name}` for a plain file name (checked again here: a
/// driver may be started without desired-state validation). `Err` names
/// `protocol.{field}`.
pub(crate) fn secret_path(
    secrets_dir: Option<&Path>,
    field: &str,
    name: &str,
) -> Result<PathBuf, String> {
    let plain = matches!(
        Path::new(name).components().collect::<Vec<_>>()[..],
        [std::path::Component::Normal(_)]
    ) && !name.starts_with('.');
    if !plain {
        return Err(format!(
            "protocol.{field}: {name:?} is not a plain file name in the device secrets directory"
        ));
    }
    let dir = secrets_dir.ok_or_else(|| {
        format!(
            "protocol.{field}: this gateway has no device secrets directory ([devices] secrets_dir)"
        )
    })?;
    Ok(dir.join(name))
}

/// The first line of password file `name` (field `protocol.{field}`),
/// after checking that only its owner can read it and only its owner can
/// write the directory it is in.
pub(crate) fn read_password(
    secrets_dir: Option<&Path>,
    field: &str,
    name: &str,
) -> Result<String, String> {
    let path = secret_path(secrets_dir, field, name)?;
    let bad = |e: &dyn std::fmt::Display| format!("protocol.{field} {}: {e}", path.display());
    check_private(&path).map_err(|e| bad(&e))?;
    let text = std::fs::read_to_string(&path).map_err(|e| bad(&e))?;
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(|e| e.to_string())?
        .permissions()
        .mode();
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    let dmode = std::fs::metadata(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .permissions()
        .mode();
    if dmode & 0o022 != 0 {
        return Err(format!(
            "its directory {} has mode {:04o}: group or others could replace the file; chmod 700 it",
            dir.display(),
            dmode & 0o7777
        ));
    }
    // Group (others) can read it if they may read the file and enter the dir.
    let group_reads = mode & 0o040 != 0 && dmode & 0o010 != 0;
    let others_read = mode & 0o004 != 0 && dmode & 0o001 != 0;
    if group_reads || others_read {
        return Err(format!(
            "mode {:04o} in a directory of mode {:04o} lets group or others read the password; chmod 600 it",
            mode & 0o7777,
            dmode & 0o7777
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path) -> Result<(), String> {
    Ok(())
}

/// Whether `host` is a loopback address or `localhost` (names are taken as
/// written, not resolved).
pub(crate) fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_password_others_can_read_or_replace_is_refused_naming_the_field() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let pw = d.join("ua.pw");
        std::fs::write(&pw, "s3cret\nrest\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            read_password(Some(d), "password_file", "ua.pw").unwrap(),
            "s3cret"
        );

        // Readable by all, but nobody else can enter the directory: private.
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_password(Some(d), "password_file", "ua.pw").is_ok());
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o750)).unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_password(Some(d), "password_file", "ua.pw").unwrap_err();
        assert!(e.starts_with("protocol.password_file "), "{e}");
        assert!(
            e.contains("mode 0640 in a directory of mode 0750 lets group or others read"),
            "{e}"
        );
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_password(Some(d), "password_file", "ua.pw").is_ok());

        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = read_password(Some(d), "password_file", "ua.pw").unwrap_err();
        assert!(
            e.contains("mode 0777: group or others could replace"),
            "{e}"
        );
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();

        let e = read_password(Some(d), "password_file", "../x").unwrap_err();
        assert!(e.contains("is not a plain file name"), "{e}");
        let e = read_password(None, "password_file", "ua.pw").unwrap_err();
        assert!(e.contains("no device secrets directory"), "{e}");
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "127.0.0.1",
            "127.9.0.1",
            "::1",
            "[::1]",
            "localhost",
            "LOCALHOST",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["10.0.0.5", "fd00::1", "plc.local", "127.0.0.1.evil", ""] {
            assert!(!is_loopback(h), "{h}");
        }
    }
}
