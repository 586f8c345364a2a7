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
//! - An upload is streamed to its temporary file as it arrives (hashing as
//!   it goes): memory per upload is one chunk, whatever the size. Bounds
//!   ([`ArtifactLimits`]): bytes per artifact, concurrent uploads, bytes in
//!   the store, bytes per uploader (the first uploader of a blob is charged;
//!   `.owners.json` in the store remembers who). Past a bound the upload is
//!   refused with an error that names the limit, and nothing is kept.
//! - Blobs no node's current or previous desired state references can be
//!   deleted ([`ArtifactStore::gc`], `POST /v1/artifacts/gc`), after a
//!   grace period so a blob uploaded for a desired state not yet PUT stays.
//!
//! # Signatures
//! Artifacts are not signed individually (yet): the desired-state document
//! that names an artifact's digest and size is Ed25519-signed, and the edge
//! refuses any blob whose sha256 differs, which gives the same integrity.
//! Per-artifact signatures (for artifacts shared outside desired state) are a
//! possible later addition.
//!
//! [`open`]: ArtifactStore::open

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

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
    /// The upload passed a bound (the message names it).
    #[error("{0}")]
    Refused(String),
    /// Too many uploads at once.
    #[error("{0}")]
    Busy(String),
    /// The upload body could not be read.
    #[error("upload body: {0}")]
    Body(String),
}

/// Bounds of the store (`[limits]` in the hub config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArtifactLimits {
    /// Largest artifact, bytes.
    pub max_artifact_bytes: u64,
    /// Bytes the store holds in all.
    pub max_store_bytes: u64,
    /// Bytes the blobs first uploaded by one uploader may use.
    pub max_bytes_per_uploader: u64,
    /// Uploads in progress at once.
    pub max_concurrent_uploads: usize,
}

impl Default for ArtifactLimits {
    fn default() -> Self {
        Self {
            max_artifact_bytes: protocols::limits::MAX_ARTIFACT_BYTES,
            max_store_bytes: 20 << 30,
            max_bytes_per_uploader: 10 << 30,
            max_concurrent_uploads: 4,
        }
    }
}

/// Who uploaded what, and the sizes charged.
#[derive(Debug, Default)]
struct Usage {
    total: u64,
    /// sha256 → (uploader, size).
    owners: std::collections::BTreeMap<String, (String, u64)>,
}

impl Usage {
    fn of(&self, owner: &str) -> u64 {
        self.owners
            .values()
            .filter(|(o, _)| o == owner)
            .map(|(_, n)| n)
            .sum()
    }
}

pub use protocols::api::ArtifactInfo;

/// The store. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct ArtifactStore {
    dir: PathBuf,
    tmp_counter: AtomicU64,
    limits: ArtifactLimits,
    uploads: Arc<tokio::sync::Semaphore>,
    usage: Mutex<Usage>,
}

const OWNERS: &str = ".owners.json";

/// Whether `s` is a lower-case hex sha256 digest.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError {
    let path = path.to_owned();
    move |source| ArtifactError::Io { op, path, source }
}

impl ArtifactStore {
    /// Opens (creating) the store in `dir` with the default limits.
    /// Blocking: call from `spawn_blocking` or at start-up.
    pub fn open(dir: &Path) -> Result<Self, ArtifactError> {
        Self::open_with(dir, ArtifactLimits::default())
    }

    /// Opens (creating) the store in `dir`, removes stale temporary files and
    /// counts what is stored. Blocking.
    pub fn open_with(dir: &Path, limits: ArtifactLimits) -> Result<Self, ArtifactError> {
        std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        let recorded: std::collections::BTreeMap<String, String> = std::fs::read(dir.join(OWNERS))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let mut usage = Usage::default();
        for entry in std::fs::read_dir(dir).map_err(io("list", dir))? {
            let entry = entry.map_err(io("list", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".tmp-") {
                let _ = std::fs::remove_file(entry.path());
            } else if is_digest(&name) {
                let size = entry.metadata().map_err(io("stat", &entry.path()))?.len();
                let owner = recorded
                    .get(&name)
                    .cloned()
                    .unwrap_or_else(|| "unknown".into());
                usage.total += size;
                usage.owners.insert(name, (owner, size));
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            tmp_counter: AtomicU64::new(0),
            limits,
            uploads: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_uploads)),
            usage: Mutex::new(usage),
        })
    }

    fn usage(&self) -> std::sync::MutexGuard<'_, Usage> {
        self.usage.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes stored in all, and by `owner`.
    pub fn used(&self, owner: &str) -> (u64, u64) {
        let u = self.usage();
        (u.total, u.of(owner))
    }

    /// Writes `.owners.json` (temp + rename). Called with the usage locked.
    fn save_owners(&self, u: &Usage) -> Result<(), ArtifactError> {
        let map: std::collections::BTreeMap<&str, &str> = u
            .owners
            .iter()
            .map(|(k, (o, _))| (k.as_str(), o.as_str()))
            .collect();
        let bytes = serde_json::to_vec(&map).unwrap_or_default();
        let tmp = self.dir.join(format!(".tmp-owners-{}", std::process::id()));
        std::fs::write(&tmp, bytes).map_err(io("write", &tmp))?;
        std::fs::rename(&tmp, self.dir.join(OWNERS)).map_err(io("rename", &tmp))
    }

    /// Stores an upload streamed from `body` for `owner`, never holding it
    /// whole in memory; refuses past [`ArtifactLimits`].
    pub async fn put_stream<S, E>(
        &self,
        owner: &str,
        body: S,
    ) -> Result<ArtifactInfo, ArtifactError>
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        use futures::StreamExt as _;
        use tokio::io::AsyncWriteExt as _;
        let Ok(_permit) = self.uploads.clone().try_acquire_owned() else {
            return Err(ArtifactError::Busy(format!(
                "{} uploads are in progress (limits.max_concurrent_uploads); retry later",
                self.limits.max_concurrent_uploads
            )));
        };
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self.dir.join(format!(".tmp-{}-{n}", std::process::id()));
        let result = async {
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .map_err(io("create", &tmp))?;
            let mut hasher = sha2::Sha256::new();
            let mut size = 0u64;
            let mut body = body;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| ArtifactError::Body(e.to_string()))?;
                size += chunk.len() as u64;
                if size > self.limits.max_artifact_bytes {
                    return Err(ArtifactError::Refused(format!(
                        "body: more than {} bytes (limits.max_artifact_bytes)",
                        self.limits.max_artifact_bytes
                    )));
                }
                hasher.update(&chunk);
                f.write_all(&chunk).await.map_err(io("write", &tmp))?;
            }
            if size == 0 {
                return Err(ArtifactError::Refused(
                    "body: an artifact must not be empty".into(),
                ));
            }
            f.sync_all().await.map_err(io("sync", &tmp))?;
            Ok((hex::encode(hasher.finalize()), size))
        }
        .await;
        let (sha256, size) = match result {
            Ok(v) => v,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        let committed = self.commit_upload(owner, &tmp, &sha256, size);
        // Refused, failed, or a blob already stored: the upload goes.
        if tokio::fs::try_exists(&tmp).await.unwrap_or(false) {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        committed?;
        Ok(ArtifactInfo { sha256, size })
    }

    /// Checks the quotas and renames the finished upload `tmp` into place
    /// (a blob already stored costs nothing). Synchronous: the usage lock
    /// is never held across an await.
    fn commit_upload(
        &self,
        owner: &str,
        tmp: &Path,
        sha256: &str,
        size: u64,
    ) -> Result<(), ArtifactError> {
        let mut u = self.usage();
        if u.owners.contains_key(sha256) {
            return Ok(());
        }
        if u.total + size > self.limits.max_store_bytes {
            return Err(ArtifactError::Refused(format!(
                "the store holds {} of {} bytes (limits.max_artifact_store_bytes); delete unreferenced artifacts (POST /v1/artifacts/gc)",
                u.total, self.limits.max_store_bytes
            )));
        }
        let mine = u.of(owner);
        if mine + size > self.limits.max_bytes_per_uploader {
            return Err(ArtifactError::Refused(format!(
                "{owner} has uploaded {mine} of {} bytes (limits.max_artifact_bytes_per_uploader)",
                self.limits.max_bytes_per_uploader
            )));
        }
        let dest = self.dir.join(sha256);
        std::fs::rename(tmp, &dest).map_err(io("rename", &dest))?;
        if let Ok(d) = std::fs::File::open(&self.dir) {
            let _ = d.sync_all();
        }
        u.total += size;
        u.owners.insert(sha256.to_owned(), (owner.to_owned(), size));
        self.save_owners(&u)
    }

    /// Deletes blob `digest`.
    pub fn delete(&self, digest: &str) -> Result<(), ArtifactError> {
        let path = self.path_of(digest)?;
        let mut u = self.usage();
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ArtifactError::NotFound(digest.to_owned()));
            }
            Err(e) => return Err(io("delete", &path)(e)),
        }
        if let Some((_, size)) = u.owners.remove(digest) {
            u.total = u.total.saturating_sub(size);
        }
        self.save_owners(&u)
    }

    /// Deletes every blob not in `referenced` whose file is older than
    /// `grace`; returns the deleted digests.
    pub fn gc(
        &self,
        referenced: &std::collections::BTreeSet<String>,
        grace: std::time::Duration,
    ) -> Result<Vec<String>, ArtifactError> {
        let now = std::time::SystemTime::now();
        let candidates: Vec<String> = self
            .usage()
            .owners
            .keys()
            .filter(|d| !referenced.contains(*d))
            .cloned()
            .collect();
        let mut deleted = Vec::new();
        for d in candidates {
            let path = self.path_of(&d)?;
            let old = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .is_ok_and(|t| now.duration_since(t).unwrap_or_default() >= grace);
            if old {
                self.delete(&d)?;
                deleted.push(d);
            }
        }
        Ok(deleted)
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

    /// Stores `bytes` for the local operator (tests, tools): the same path
    /// and bounds as an upload.
    pub async fn put(&self, bytes: Bytes) -> Result<ArtifactInfo, ArtifactError> {
        self.put_stream(
            "local",
            futures::stream::iter([Ok::<_, std::convert::Infallible>(bytes)]),
        )
        .await
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
            .filter(|n| n != OWNERS)
            .collect();
        assert_eq!(names.len(), 1, "one blob and the owners index: {names:?}");
    }
}

#[cfg(test)]
mod bound_tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    fn chunks(
        n: usize,
        size: usize,
    ) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> + Unpin {
        futures::stream::iter((0..n).map(move |i| Ok(Bytes::from(vec![i as u8; size]))))
    }

    fn store(dir: &Path, limits: ArtifactLimits) -> ArtifactStore {
        ArtifactStore::open_with(dir, limits).unwrap()
    }

    #[tokio::test]
    async fn uploads_past_the_bounds_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let limits = ArtifactLimits {
            max_artifact_bytes: 1_000,
            max_store_bytes: 2_500,
            max_bytes_per_uploader: 1_500,
            max_concurrent_uploads: 1,
        };
        let s = store(dir.path(), limits);
        let e = s.put_stream("alice", chunks(11, 100)).await.unwrap_err();
        assert!(e.to_string().contains("limits.max_artifact_bytes"), "{e}");
        s.put_stream("alice", chunks(10, 100)).await.unwrap();
        let e = s.put_stream("alice", chunks(6, 100)).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("limits.max_artifact_bytes_per_uploader"),
            "{e}"
        );
        s.put_stream("bob", chunks(9, 100)).await.unwrap();
        let e = s.put_stream("carol", chunks(7, 100)).await.unwrap_err();
        assert!(
            e.to_string().contains("limits.max_artifact_store_bytes"),
            "{e}"
        );
        // The same bytes again are free (idempotent, no charge).
        s.put_stream("carol", chunks(10, 100)).await.unwrap();
        assert_eq!(s.used("alice"), (1_900, 1_000));
        assert_eq!(s.used("carol"), (1_900, 0));
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        assert_eq!(files.len(), 2, "{files:?}");
        // Owners survive a reopen.
        drop(s);
        let s = store(dir.path(), limits);
        assert_eq!(s.used("bob"), (1_900, 900));
    }

    #[tokio::test]
    async fn a_second_concurrent_upload_is_told_to_retry() {
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(store(
            dir.path(),
            ArtifactLimits {
                max_concurrent_uploads: 1,
                ..ArtifactLimits::default()
            },
        ));
        let (tx, rx) =
            futures::channel::mpsc::unbounded::<Result<Bytes, std::convert::Infallible>>();
        let slow = {
            let s = s.clone();
            tokio::spawn(async move { s.put_stream("a", rx).await })
        };
        tx.unbounded_send(Ok(Bytes::from_static(b"part"))).unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let e = s.put(Bytes::from_static(b"x")).await.unwrap_err();
        assert!(matches!(e, ArtifactError::Busy(_)), "{e}");
        assert!(
            e.to_string().contains("limits.max_concurrent_uploads"),
            "{e}"
        );
        drop(tx);
        slow.await.unwrap().unwrap();
        s.put(Bytes::from_static(b"x")).await.unwrap();
    }

    #[tokio::test]
    async fn gc_deletes_only_unreferenced_blobs_past_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), ArtifactLimits::default());
        let keep = s.put(Bytes::from_static(b"keep")).await.unwrap();
        let drop_me = s.put(Bytes::from_static(b"drop")).await.unwrap();
        let referenced = std::collections::BTreeSet::from([keep.sha256.clone()]);
        assert!(
            s.gc(&referenced, std::time::Duration::from_secs(3600))
                .unwrap()
                .is_empty(),
            "within the grace"
        );
        assert_eq!(
            s.gc(&referenced, std::time::Duration::ZERO).unwrap(),
            vec![drop_me.sha256.clone()]
        );
        assert_eq!(s.size(&keep.sha256).await.unwrap(), 4);
        assert!(matches!(
            s.size(&drop_me.sha256).await,
            Err(ArtifactError::NotFound(_))
        ));
        assert_eq!(s.used("local"), (4, 4));
    }
}
