//! Content-addressed artifact store: WASM modules and models.
//!
//! Blobs live as files `{data_dir}/artifacts/{sha256}`; the name *is* the
//! digest of the content, so there is no index to keep consistent. Desired
//! state names artifacts by digest and size only; edge nodes download them
//! with `GET /v1/artifacts/{sha256}` (HTTP `Range: bytes=N-` resumes a
//! partial download) and verify the digest themselves.
//!
//! # Invariants
//! - A file named `{sha256}` in the store always holds exactly the bytes
//!   that hash to that name: uploads are written to a unique temporary file
//!   (`.tmp-*`), synced, hashed, and only then renamed into place. A crash
//!   leaves at most a stale temporary file, removed on the next [`open`].
//! - Uploading the same bytes twice is a no-op (idempotent).
//!
//! # Signatures
//! Artifacts are not signed individually (yet): the desired-state document
//! that names an artifact's digest and size is Ed25519-signed, and the edge
//! refuses any blob whose sha256 differs, which gives the same integrity.
//! Per-artifact signatures (for artifacts shared outside desired state) are a
//! possible later addition.
//!
//! [`open`]: ArtifactStore::open

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use sha2::Digest as _;

/// Why an artifact operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// A file operation failed (disk full, permissions…).
    #[error("artifact store {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The digest is not 64 lower-case hex characters.
    #[error("{0:?} is not a lower-case hex sha256 digest (64 characters)")]
    BadDigest(String),
    /// No artifact with that digest is stored.
    #[error("artifact {0} is not stored")]
    NotFound(String),
    /// A blocking task panicked or was cancelled.
    #[error("artifact task failed: {0}")]
    Task(String),
}

pub use protocols::api::ArtifactInfo;

/// The store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct ArtifactStore {
    dir: PathBuf,
    tmp_counter: AtomicU64,
}

/// Whether `s` is a lower-case hex sha256 digest.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError {
    let path = path.to_owned();
    move |source| ArtifactError::Io { op, path, source }
}

impl ArtifactStore {
    /// Opens (creating) the store in `dir` and removes stale temporary files.
    /// Blocking: call from `spawn_blocking` or at start-up.
    pub fn open(dir: &Path) -> Result<Self, ArtifactError> {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
            let entry = entry.map_err(io("list", dir))?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            tmp_counter: AtomicU64::new(0),
        })
    }

    /// The directory blobs live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the blob `digest` (whether or not it exists).
    pub fn path_of(&self, digest: &str) -> Result<PathBuf, ArtifactError> {
        if !is_digest(digest) {
            return Err(ArtifactError::BadDigest(digest.to_owned()));
        }
        Ok(self.dir.join(digest))
    }

    /// Stores `bytes` (hashing and file I/O on the blocking pool).
    pub async fn put(&self, bytes: Bytes) -> Result<ArtifactInfo, ArtifactError> {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(".tmp-{}-{n}", std::process::id()));
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || put_blocking(&dir, &tmp, &bytes))
            .await
            .map_err(|e| ArtifactError::Task(e.to_string()))?
    }

    /// Size of artifact `digest`.
    pub async fn size(&self, digest: &str) -> Result<u64, ArtifactError> {
        let path = self.path_of(digest)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ArtifactError::NotFound(digest.to_owned()))
            }
            Err(e) => Err(io("stat", &path)(e)),
        }
    }

    /// Opens artifact `digest` positioned at `offset`; returns the file and
    /// the artifact's total size.
    pub async fn open_at(
        &self,
        digest: &str,
        offset: u64,
    ) -> Result<(tokio::fs::File, u64), ArtifactError> {
        use tokio::io::AsyncSeekExt as _;
        let path = self.path_of(digest)?;
        let mut f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ArtifactError::NotFound(digest.to_owned()));
            }
            Err(e) => return Err(io("open", &path)(e)),
        };
        let size = f.metadata().await.map_err(io("stat", &path))?.len();
        if offset > 0 {
            f.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(io("seek", &path))?;
        }
        Ok((f, size))
    }
}

/// sha256 of `bytes`, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

fn put_blocking(dir: &Path, tmp: &Path, bytes: &[u8]) -> Result<ArtifactInfo, ArtifactError> {
    let sha256 = sha256_hex(bytes);
    let size = bytes.len() as u64;
    let dest = dir.join(&sha256);
    if std::fs::metadata(&dest).is_ok_and(|m| m.len() == size) {
        return Ok(ArtifactInfo { sha256, size });
    }
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(tmp);
        return Err(io("write", tmp)(e));
    }
    if let Err(e) = std::fs::rename(tmp, &dest) {
        let _ = std::fs::remove_file(tmp);
        return Err(io("rename", &dest)(e));
    }
    // Make the rename itself durable.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(ArtifactInfo { sha256, size })
}

/// A parsed `Range` header, for a resource of known size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No (usable) range: send everything, 200.
    Full,
    /// Send bytes `start..=end`, 206.
    Partial {
        /// First byte.
        start: u64,
        /// Last byte (inclusive).
        end: u64,
    },
    /// The range starts at or past the end: 416.
    Unsatisfiable,
}

/// Interprets `Range: bytes=N-` or `bytes=N-M` against `size`. Anything else
/// (other units, suffix ranges, several ranges, garbage) is ignored, which
/// RFC 9110 allows: the whole resource is sent with 200.
pub fn parse_range(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeRequest::Full;
    };
    let Ok(start) = a.trim().parse::<u64>() else {
        return RangeRequest::Full;
    };
    let end = match b.trim() {
        "" => u64::MAX,
        b => match b.parse::<u64>() {
            Ok(e) if e >= start => e,
            _ => return RangeRequest::Full,
        },
    };
    if start >= size {
        return RangeRequest::Unsatisfiable;
    }
    RangeRequest::Partial {
        start,
        end: end.min(size - 1),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), RangeRequest::Full);
        assert_eq!(
            parse_range(Some("bytes=3-"), 10),
            RangeRequest::Partial { start: 3, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=3-4"), 10),
            RangeRequest::Partial { start: 3, end: 4 }
        );
        assert_eq!(
            parse_range(Some("bytes=3-400"), 10),
            RangeRequest::Partial { start: 3, end: 9 }
        );
        assert_eq!(
            parse_range(Some("bytes=10-"), 10),
            RangeRequest::Unsatisfiable
        );
        assert_eq!(parse_range(Some("bytes=-5"), 10), RangeRequest::Full);
        assert_eq!(parse_range(Some("bytes=1-2,4-5"), 10), RangeRequest::Full);
        assert_eq!(parse_range(Some("items=1-"), 10), RangeRequest::Full);
        assert_eq!(parse_range(Some("bytes=5-3"), 10), RangeRequest::Full);
    }

    #[tokio::test]
    async fn put_is_idempotent_and_content_addressed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".tmp-stale"), b"x").unwrap();
        let s = ArtifactStore::open(dir.path()).unwrap();
        assert!(!dir.path().join(".tmp-stale").exists());
        let a = s.put(Bytes::from_static(b"hello")).await.unwrap();
        let b = s.put(Bytes::from_static(b"hello")).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a.sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(s.size(&a.sha256).await.unwrap(), 5);
        assert!(matches!(
            s.size(&"0".repeat(64)).await,
            Err(ArtifactError::NotFound(_))
        ));
        assert!(matches!(
            s.size("../etc/passwd").await,
            Err(ArtifactError::BadDigest(_))
        ));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }
}
