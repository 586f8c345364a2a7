//! Downloads the blobs desired state names (WASM modules, models) from the
//! hub, verifies them, and keeps them content-addressed on disk.
//!
//! Start at [`ArtifactFetcher::run`]: it watches the applied desired state,
//! downloads every missing digest from `{hub.http_url}/v1/artifacts/{sha256}`
//! and signals the function reconciler when a new one is ready.
//!
//! # Invariants
//! - A file `{data_dir}/artifacts/{sha256}` exists only with content whose
//!   sha256 and size match its name and the size desired state gave, and it
//!   is indexed in the store ([`Store::artifact_put`]). Downloads go to
//!   `{sha256}.part`; a partial file is resumed with `Range: bytes=N-`, then
//!   synced, hashed and renamed atomically into place.
//! - A blob that fails verification is deleted, counted in
//!   `artifacts_rejected` and raises a `function-failed` event; it is retried
//!   with backoff (the hub's copy may be repaired) while the functions keep
//!   running their previous versions.
//! - Garbage collection removes only digests referenced by neither the
//!   current nor the previous desired state, so a rollback never needs the
//!   network.
//!
//! Artifacts travel over plain HTTP for now (no TLS feature in the reqwest
//! build); integrity comes from the signed desired state naming the digest.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use protocols::backoff::{Backoff, BackoffPolicy, SplitMix64};
use protocols::{DesiredState, Event, EventKind};
use sha2::Digest as _;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::clock::Clock;
use crate::store::{ArtifactRecord, Store, StoreError};

/// Retry policy of a failed download: 500 ms doubling to 60 s, with up to
/// 20 % removed at random so a fleet does not retry in lockstep.
pub const RETRY: BackoffPolicy = BackoffPolicy {
    initial: Duration::from_millis(500),
    max: Duration::from_secs(60),
    factor: 2.0,
    jitter: 0.2,
};

/// Why one download attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The HTTP request or body transfer failed.
    #[error("downloading artifact {digest}: {source}")]
    Http {
        /// The artifact.
        digest: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The hub answered with an unexpected status.
    #[error("downloading artifact {digest}: hub answered HTTP {status}")]
    Status {
        /// The artifact.
        digest: String,
        /// HTTP status code.
        status: u16,
    },
    /// A local file operation failed.
    #[error("artifact file {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The downloaded bytes do not match the digest or size desired state
    /// names. The partial file has been deleted.
    #[error(
        "artifact {digest} refused: got {actual_size} bytes hashing to {actual_sha256}, expected {expected_size} bytes"
    )]
    Verify {
        /// The digest asked for.
        digest: String,
        /// Size desired state names.
        expected_size: u64,
        /// Bytes received.
        actual_size: u64,
        /// Their sha256.
        actual_sha256: String,
    },
    /// The artifact index could not be updated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A blocking task failed.
    #[error("artifact task failed: {0}")]
    Task(String),
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FetchError {
    let path = path.to_owned();
    move |source| FetchError::Io { op, path, source }
}

/// One blob desired state asks for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Wanted {
    /// sha256, lower-case hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Functions that use it (as module or model), for events.
    pub users: BTreeSet<String>,
}

/// Every blob `desired` names, by digest.
pub fn wanted(desired: &DesiredState) -> BTreeMap<String, Wanted> {
    let mut out: BTreeMap<String, Wanted> = BTreeMap::new();
    let mut add = |sha: &str, size: u64, user: Option<&str>| {
        let w = out.entry(sha.to_owned()).or_insert_with(|| Wanted {
            sha256: sha.to_owned(),
            size,
            users: BTreeSet::new(),
        });
        if let Some(u) = user {
            w.users.insert(u.to_owned());
        }
    };
    for m in &desired.models {
        add(&m.sha256, m.size, None);
    }
    for f in &desired.functions {
        add(&f.module_sha256, f.module_size, Some(&f.name));
        for m in &f.granted_models {
            if let Some(r) = desired.models.iter().find(|r| &r.name == m) {
                add(&r.sha256, r.size, Some(&f.name));
            }
        }
    }
    out
}

/// The current and previous applied desired state, as the fetcher sees them.
#[derive(Debug, Clone, Default)]
pub struct DesiredPair {
    /// What runs now.
    pub current: Option<Arc<DesiredState>>,
    /// What ran before (kept for rollback).
    pub previous: Option<Arc<DesiredState>>,
}

/// Counters of the fetcher (merged into reported-state `counters`).
#[derive(Debug, Default)]
pub struct FetchCounters {
    /// Artifacts downloaded and verified.
    pub artifacts_fetched: AtomicU64,
    /// Bytes received.
    pub artifact_bytes_fetched: AtomicU64,
    /// Downloads that resumed a partial file.
    pub artifacts_resumed: AtomicU64,
    /// Downloads refused by verification (digest or size).
    pub artifacts_rejected: AtomicU64,
    /// Attempts that failed otherwise (network, hub, disk).
    pub artifact_fetch_errors: AtomicU64,
    /// Artifacts garbage-collected.
    pub artifacts_collected: AtomicU64,
}

impl FetchCounters {
    /// All counters by name.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        [
            ("artifacts_fetched", &self.artifacts_fetched),
            ("artifact_bytes_fetched", &self.artifact_bytes_fetched),
            ("artifacts_resumed", &self.artifacts_resumed),
            ("artifacts_rejected", &self.artifacts_rejected),
            ("artifact_fetch_errors", &self.artifact_fetch_errors),
            ("artifacts_collected", &self.artifacts_collected),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.load(Ordering::Relaxed)))
        .collect()
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Downloads, verifies and indexes artifacts. Cheap to share in an `Arc`.
#[derive(Debug)]
pub struct ArtifactFetcher {
    /// Swapped by [`ArtifactFetcher::reset_connections`] after a renewal.
    http: std::sync::RwLock<reqwest::Client>,
    tls: Option<rustls::ClientConfig>,
    base_url: String,
    dir: PathBuf,
    store: Store,
    clock: Clock,
    counters: FetchCounters,
}

fn http_client(tls: Option<&rustls::ClientConfig>) -> Result<reqwest::Client, FetchError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(30));
    if let Some(tls) = tls {
        builder = builder.use_preconfigured_tls(tls.clone());
    }
    builder.build().map_err(|source| FetchError::Http {
        digest: String::new(),
        source,
    })
}

impl ArtifactFetcher {
    fn http(&self) -> reqwest::Client {
        self.http
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Drops the pooled connections (a new client with the same TLS
    /// config): after a certificate renewal, so the next download
    /// handshakes with the new certificate.
    pub fn reset_connections(&self) -> Result<(), FetchError> {
        let fresh = http_client(self.tls.as_ref())?;
        *self
            .http
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
        Ok(())
    }
    /// A fetcher storing blobs in `dir` (created if missing), downloading
    /// from `base_url` (e.g. `http://127.0.0.1:8080`).
    pub fn new(
        base_url: &str,
        dir: PathBuf,
        store: Store,
        clock: Clock,
    ) -> Result<Self, FetchError> {
        Self::with_tls(base_url, dir, store, clock, None)
    }

    /// [`ArtifactFetcher::new`] over HTTPS with `tls` (the node identity's
    /// [`crate::identity::Identity::tls_config`]: the hub CA as the only
    /// root, the node certificate as client identity).
    pub fn with_tls(
        base_url: &str,
        dir: PathBuf,
        store: Store,
        clock: Clock,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<Self, FetchError> {
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        let http = std::sync::RwLock::new(http_client(tls.as_ref())?);
        Ok(Self {
            tls,
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            dir,
            store,
            clock,
            counters: FetchCounters::default(),
        })
    }

    /// Counters.
    pub fn counters(&self) -> &FetchCounters {
        &self.counters
    }

    /// Where the verified blob `sha256` lives (whether or not it exists).
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(sha256)
    }

    /// The blob directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `sha256` is stored, verified and indexed.
    pub fn has(&self, sha256: &str) -> bool {
        matches!(self.store.artifact_get(sha256), Ok(Some(_))) && self.path(sha256).is_file()
    }

    /// Makes sure `want` is on disk: resumes or starts the download,
    /// verifies digest and size, renames into place and indexes it. Returns
    /// `true` if something was downloaded.
    pub async fn fetch(&self, want: &Wanted) -> Result<bool, FetchError> {
        if self.has(&want.sha256) {
            return Ok(false);
        }
        let part = self.dir.join(format!("{}.part", want.sha256));
        let mut have = match tokio::fs::metadata(&part).await {
            Ok(m) => m.len(),
            Err(_) => 0,
        };
        if have > want.size {
            let _ = tokio::fs::remove_file(&part).await;
            have = 0;
        }
        if have < want.size {
            self.download(want, &part, have).await?;
        }
        self.verify_and_install(want, &part).await?;
        Ok(true)
    }

    async fn download(&self, want: &Wanted, part: &Path, have: u64) -> Result<(), FetchError> {
        let digest = &want.sha256;
        let http_err = |source| FetchError::Http {
            digest: digest.clone(),
            source,
        };
        let url = format!("{}/v1/artifacts/{digest}", self.base_url);
        let mut req = self.http().get(&url);
        if have > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let mut resp = req.send().await.map_err(http_err)?;
        let mut file_opts = tokio::fs::OpenOptions::new();
        file_opts.create(true);
        let mut written = match resp.status().as_u16() {
            206 if have > 0 => {
                add(&self.counters.artifacts_resumed, 1);
                file_opts.append(true);
                have
            }
            200 => {
                file_opts.write(true).truncate(true);
                0
            }
            // Our partial file is already complete (or longer): verify it.
            416 => return Ok(()),
            status => {
                return Err(FetchError::Status {
                    digest: digest.clone(),
                    status,
                });
            }
        };
        let mut file = file_opts.open(part).await.map_err(io("open", part))?;
        while let Some(chunk) = resp.chunk().await.map_err(http_err)? {
            add(&self.counters.artifact_bytes_fetched, chunk.len() as u64);
            written += chunk.len() as u64;
            file.write_all(&chunk).await.map_err(io("write", part))?;
            if written > want.size {
                // More than desired state promised: stop reading; verification refuses it.
                break;
            }
        }
        file.flush().await.map_err(io("flush", part))?;
        file.sync_all().await.map_err(io("sync", part))?;
        Ok(())
    }

    async fn verify_and_install(&self, want: &Wanted, part: &Path) -> Result<(), FetchError> {
        let p = part.to_owned();
        let hashed = tokio::task::spawn_blocking(move || hash_file(&p))
            .await
            .map_err(|e| FetchError::Task(e.to_string()))??;
        let (actual_size, actual_sha256) = hashed;
        if actual_size < want.size {
            // Transfer ended early (connection closed): resume next attempt.
            return Err(FetchError::Io {
                op: "download (short)",
                path: part.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{actual_size} of {} bytes", want.size),
                ),
            });
        }
        if actual_size != want.size || actual_sha256 != want.sha256 {
            let _ = tokio::fs::remove_file(part).await;
            return Err(FetchError::Verify {
                digest: want.sha256.clone(),
                expected_size: want.size,
                actual_size,
                actual_sha256,
            });
        }
        let dest = self.path(&want.sha256);
        tokio::fs::rename(part, &dest)
            .await
            .map_err(io("rename", &dest))?;
        let dir = self.dir.clone();
        let _ = tokio::task::spawn_blocking(move || {
            std::fs::File::open(&dir).and_then(|d| d.sync_all())
        })
        .await;
        self.store
            .artifact_put(
                &want.sha256,
                ArtifactRecord {
                    size: want.size,
                    stored_at_ms: self.clock.now_ms(),
                },
            )
            .await?;
        add(&self.counters.artifacts_fetched, 1);
        Ok(())
    }

    /// Deletes every stored blob (and partial download) whose digest is not
    /// in `keep`. Returns how many blobs were removed.
    pub async fn collect_garbage(&self, keep: &BTreeSet<String>) -> Result<u64, FetchError> {
        let mut removed = 0;
        for (digest, _) in self.store.artifacts()? {
            if !keep.contains(&digest) {
                self.store.artifact_remove(&digest)?;
                let _ = tokio::fs::remove_file(self.path(&digest)).await;
                removed += 1;
            }
        }
        let mut rd = tokio::fs::read_dir(&self.dir)
            .await
            .map_err(io("list", &self.dir))?;
        while let Some(e) = rd.next_entry().await.map_err(io("list", &self.dir))? {
            let name = e.file_name().to_string_lossy().into_owned();
            let digest = name.strip_suffix(".part").unwrap_or(&name);
            if !keep.contains(digest) {
                let _ = tokio::fs::remove_file(e.path()).await;
            }
        }
        add(&self.counters.artifacts_collected, removed);
        Ok(removed)
    }

    /// Runs until `cancel`: on every change of `desired`, downloads what is
    /// missing (retrying failures with the [`RETRY`] backoff, 500 ms to 60 s),
    /// bumps `ready` after each new artifact, and garbage-collects blobs
    /// neither the current nor the previous desired state names.
    pub async fn run(
        self: Arc<Self>,
        mut desired: watch::Receiver<DesiredPair>,
        ready: watch::Sender<u64>,
        events: mpsc::UnboundedSender<Event>,
        node: String,
        cancel: CancellationToken,
    ) -> Result<(), FetchError> {
        // digest -> (its backoff, next try)
        let mut retry: BTreeMap<String, (Backoff, tokio::time::Instant)> = BTreeMap::new();
        // One random draw per run seeds the jitter of every digest.
        let mut seeds = SplitMix64::new(rand::random());
        let mut pair = desired.borrow_and_update().clone();
        loop {
            let want = pair.current.as_deref().map(wanted).unwrap_or_default();
            retry.retain(|d, _| want.contains_key(d));
            let now = tokio::time::Instant::now();
            for w in want.values() {
                if cancel.is_cancelled() {
                    return Ok(());
                }
                if retry.get(&w.sha256).is_some_and(|(_, at)| *at > now) {
                    continue;
                }
                match self.fetch(w).await {
                    Ok(fetched) => {
                        retry.remove(&w.sha256);
                        if fetched {
                            info!(digest = %w.sha256, size = w.size, "artifact downloaded and verified");
                            ready.send_modify(|v| *v += 1);
                        }
                    }
                    Err(e) => {
                        let (backoff, at) = retry
                            .entry(w.sha256.clone())
                            .or_insert_with(|| (Backoff::new(RETRY, seeds.next_u64()), now));
                        let delay = backoff.next_delay();
                        *at = now + delay;
                        let attempt = backoff.attempt();
                        warn!(digest = %w.sha256, attempt, retry_in = ?delay, error = %e, "artifact download failed");
                        if let FetchError::Verify { .. } = e {
                            add(&self.counters.artifacts_rejected, 1);
                            let users: Vec<String> = if w.users.is_empty() {
                                vec!["artifact".to_owned()]
                            } else {
                                w.users.iter().cloned().collect()
                            };
                            for function in users {
                                let _ = events.send(Event {
                                    node: node.clone(),
                                    at_ms: self.clock.now_ms(),
                                    kind: EventKind::FunctionFailed { function },
                                    message: format!("{e}; the previous version keeps running"),
                                });
                            }
                        } else {
                            add(&self.counters.artifact_fetch_errors, 1);
                        }
                    }
                }
            }
            if pair.current.is_some() && retry.is_empty() {
                let mut keep: BTreeSet<String> = want.keys().cloned().collect();
                if let Some(prev) = pair.previous.as_deref() {
                    keep.extend(wanted(prev).into_keys());
                }
                match self.collect_garbage(&keep).await {
                    Ok(0) => {}
                    Ok(n) => info!(removed = n, "old artifacts garbage-collected"),
                    Err(e) => warn!(error = %e, "artifact garbage collection failed"),
                }
            }
            let next = retry.values().map(|(_, at)| *at).min();
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                r = desired.changed() => {
                    if r.is_err() {
                        return Ok(());
                    }
                    pair = desired.borrow_and_update().clone();
                }
                () = sleep_until(next) => {}
            }
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn hash_file(path: &Path) -> Result<(u64, String), FetchError> {
    let mut f = std::fs::File::open(path).map_err(io("open", path))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).map_err(io("read", path))?;
        if k == 0 {
            break;
        }
        h.update(buf.get(..k).unwrap_or_default());
        n += k as u64;
    }
    Ok((n, hex::encode(h.finalize())))
}

/// Whether `s` is a lower-case hex sha256 digest.
pub fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Reads the verified blob `sha256` from `dir` (blocking).
pub fn read_blob(dir: &Path, sha256: &str) -> std::io::Result<Vec<u8>> {
    if !is_digest(sha256) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a digest",
        ));
    }
    std::fs::read(dir.join(sha256))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code")]
    use super::*;
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;

    fn store(dir: &Path) -> Store {
        Store::open(&crate::store::StoreConfig {
            path: dir.join("db"),
            cache_capacity_bytes: 1 << 20,
            outbox: crate::store::OutboxLimits {
                max_bytes: 1 << 20,
                max_age: Duration::from_secs(3600),
                policy: crate::store::OverflowPolicy::DropOldest,
            },
        })
        .unwrap()
    }

    /// A tiny artifact server: serves `body` for any digest, honours
    /// `Range: bytes=N-`, and records the ranges asked for.
    async fn serve(body: Vec<u8>, ranges: Arc<std::sync::Mutex<Vec<Option<String>>>>) -> String {
        let app = axum::Router::new().route(
            "/v1/artifacts/{sha}",
            axum::routing::get(move |headers: HeaderMap| {
                let body = body.clone();
                let ranges = ranges.clone();
                async move {
                    let r = headers
                        .get(header::RANGE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    ranges.lock().unwrap().push(r.clone());
                    match r.and_then(|r| {
                        r.strip_prefix("bytes=")?
                            .strip_suffix('-')?
                            .parse::<usize>()
                            .ok()
                    }) {
                        Some(start) => (
                            StatusCode::PARTIAL_CONTENT,
                            [(
                                header::CONTENT_RANGE,
                                format!("bytes {start}-{}/{}", body.len() - 1, body.len()),
                            )],
                            body[start..].to_vec(),
                        )
                            .into_response(),
                        None => (StatusCode::OK, body).into_response(),
                    }
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        format!("http://{addr}")
    }

    #[test]
    fn retries_start_at_half_a_second_and_stay_within_a_minute() {
        let mut b = Backoff::new(RETRY, 3);
        let first = b.next_delay();
        assert!(
            (Duration::from_millis(400)..=Duration::from_millis(500)).contains(&first),
            "{first:?}"
        );
        let later: Vec<Duration> = (0..20).map(|_| b.next_delay()).collect();
        assert!(
            later.iter().all(|d| *d <= Duration::from_secs(60)),
            "{later:?}"
        );
        // From the 8th failure on the nominal delay is capped at 60 s.
        assert!(
            later[8..].iter().all(|d| *d >= Duration::from_secs(48)),
            "{later:?}"
        );
    }

    fn sha(b: &[u8]) -> String {
        hex::encode(sha2::Sha256::digest(b))
    }

    #[tokio::test]
    async fn resumes_a_partial_download_with_range() {
        let dir = tempfile::tempdir().unwrap();
        let body: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let digest = sha(&body);
        let ranges = Arc::new(std::sync::Mutex::new(Vec::new()));
        let base = serve(body.clone(), ranges.clone()).await;
        let f = ArtifactFetcher::new(
            &base,
            dir.path().join("artifacts"),
            store(dir.path()),
            Clock::system(),
        )
        .unwrap();
        // A previous attempt left the first 40 000 bytes.
        std::fs::write(f.dir().join(format!("{digest}.part")), &body[..40_000]).unwrap();
        let want = Wanted {
            sha256: digest.clone(),
            size: body.len() as u64,
            users: BTreeSet::new(),
        };
        let fetched = tokio::time::timeout(Duration::from_secs(10), f.fetch(&want))
            .await
            .unwrap()
            .unwrap();
        assert!(fetched);
        assert_eq!(
            ranges.lock().unwrap().as_slice(),
            &[Some("bytes=40000-".to_owned())]
        );
        assert_eq!(std::fs::read(f.path(&digest)).unwrap(), body);
        assert!(!f.dir().join(format!("{digest}.part")).exists());
        assert!(f.has(&digest));
        assert_eq!(f.counters().artifacts_resumed.load(Ordering::Relaxed), 1);
        assert_eq!(
            f.counters().artifact_bytes_fetched.load(Ordering::Relaxed),
            60_000
        );
        // Second call: nothing to do, no request.
        assert!(!f.fetch(&want).await.unwrap());
        assert_eq!(ranges.lock().unwrap().len(), 1);

        // Garbage collection keeps what is referenced, removes the rest.
        assert_eq!(
            f.collect_garbage(&BTreeSet::from([digest.clone()]))
                .await
                .unwrap(),
            0
        );
        assert!(f.has(&digest));
        assert_eq!(f.collect_garbage(&BTreeSet::new()).await.unwrap(), 1);
        assert!(!f.path(&digest).exists());
    }

    #[tokio::test]
    async fn refuses_bytes_that_do_not_match_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let body = b"not the module you asked for".to_vec();
        let base = serve(body.clone(), Arc::default()).await;
        let f = ArtifactFetcher::new(
            &base,
            dir.path().join("artifacts"),
            store(dir.path()),
            Clock::system(),
        )
        .unwrap();
        let want = Wanted {
            sha256: sha(b"something else"),
            size: body.len() as u64,
            users: BTreeSet::new(),
        };
        let e = tokio::time::timeout(Duration::from_secs(10), f.fetch(&want))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, FetchError::Verify { .. }), "{e}");
        assert!(!f.has(&want.sha256));
        assert_eq!(
            std::fs::read_dir(f.dir()).unwrap().count(),
            0,
            "partial file deleted"
        );
        // Wrong size is refused too.
        let want = Wanted {
            sha256: sha(&body),
            size: 5,
            users: BTreeSet::new(),
        };
        let e = f.fetch(&want).await.unwrap_err();
        assert!(
            matches!(
                e,
                FetchError::Verify {
                    actual_size: 6..,
                    ..
                }
            ),
            "{e}"
        );
    }
}
