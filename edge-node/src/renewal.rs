//! Automatic renewal of the node's certificate, without a restart.
//!
//! Once `[identity] renew_after` (default 0.66) of the certificate's
//! validity has passed, the agent makes a **new** key (it never leaves the
//! gateway), sends a CSR to `POST /v1/renew` authenticated by its current
//! certificate, checks that the answer belongs to the new key, writes both
//! through [`Identity::write_rotated`] (tmp + fsync + rename, key 0600) and
//! swaps them into the shared [`ClientCertSlot`]: every TLS config of the
//! agent asks that slot at each handshake. Then it tells the MQTT link to
//! reconnect ([`crate::link::run_event_loop`]'s rotation signal, the same
//! path as a lost connection: persistent session, in-flight publishes kept,
//! the outbox resends past the last ack) and drops the artifact fetcher's
//! pooled connections.
//!
//! Failures are retried with jittered backoff (`retry_min`..`retry_max`),
//! counted (`cert_renewal_failures`; successes in `cert_renewals`) and
//! logged; an expired certificate is logged as an error that says to
//! re-join. [`renew_at`] is the pure schedule.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use protocols::backoff::{Backoff, BackoffPolicy};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::artifacts::ArtifactFetcher;
use crate::clock::Clock;
use crate::config::IdentityConfig;
use crate::identity::{ClientCertSlot, Identity, IdentityError};
use crate::metrics::Counters;

/// Why one renewal attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    /// The identity (current or new) could not be read, made or written.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The request failed.
    #[error("renew {url}: {detail}")]
    Request {
        /// The URL.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// The hub answered an error (401: revoked or expired certificate).
    #[error("renew {url}: the hub refused: {status}: {body}")]
    Refused {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The hub's message.
        body: String,
    },
}

/// When a certificate valid from `not_before` to `not_after` is due for
/// renewal: after `fraction` of its validity.
pub fn renew_at(not_before: SystemTime, not_after: SystemTime, fraction: f64) -> SystemTime {
    let validity = not_after.duration_since(not_before).unwrap_or_default();
    not_before + validity.mul_f64(fraction.clamp(0.0, 1.0))
}

/// What the hub answers a renewal (`protocols::api::RenewAnswer`).
#[derive(serde::Deserialize)]
struct Answer {
    cert_pem: String,
}

/// The renewal task's inputs.
#[derive(Debug)]
pub struct Renewal {
    /// The node (for the log).
    pub node: String,
    /// `{data_dir}`: where the identity lives.
    pub data_dir: PathBuf,
    /// The hub's REST API (`hub.http_url`).
    pub hub_url: String,
    /// The identity as loaded at start.
    pub identity: Identity,
    /// The slot every TLS config of the agent presents from.
    pub slot: Arc<ClientCertSlot>,
    /// `[identity]`.
    pub config: IdentityConfig,
    /// Bumped after each swap: the MQTT link reconnects on it.
    pub rotated: watch::Sender<u64>,
    /// Its pooled connections are dropped after each swap.
    pub fetcher: Option<Arc<ArtifactFetcher>>,
    /// `cert_renewals`, `cert_renewal_failures`.
    pub counters: Arc<Counters>,
    /// Wall time.
    pub clock: Clock,
}

fn wall(clock: Clock) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(clock.now_ms())
}

impl Renewal {
    /// Renews whenever due until cancelled. Never fails: every failure is
    /// counted, logged and retried.
    pub async fn run(mut self, cancel: CancellationToken) {
        let policy = BackoffPolicy {
            initial: self.config.retry_min,
            max: self.config.retry_max,
            factor: 2.0,
            jitter: 0.3,
        };
        let mut backoff = Backoff::new(policy, rand::random());
        loop {
            let wait = match self.identity.validity() {
                Ok((nb, na)) => {
                    let now = wall(self.clock);
                    if now >= na {
                        error!(node = %self.node, not_after = ?na, "the node certificate has expired: the hub refuses it and it cannot be renewed; re-join: `edge-node join --hub URL --token T` with a token from POST /v1/nodes/{{node}}/bootstrap");
                    }
                    let due = renew_at(nb, na, self.config.renew_after);
                    due.duration_since(now).unwrap_or_default()
                }
                Err(e) => {
                    error!(node = %self.node, error = %e, "node certificate unreadable; renewing now");
                    Duration::ZERO
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            match self.renew_once().await {
                Ok(()) => {
                    backoff.reset();
                    Counters::add(&self.counters.cert_renewals, 1);
                    let until = self.identity.validity().map(|(_, na)| na).ok();
                    info!(node = %self.node, not_after = ?until, "node certificate renewed and swapped in");
                    // A certificate that is due at once (its validity is
                    // shorter than the time it took, or the clocks
                    // disagree) must not make a renewal storm.
                    if let Ok((nb, na)) = self.identity.validity()
                        && renew_at(nb, na, self.config.renew_after) <= wall(self.clock)
                    {
                        warn!(node = %self.node, "the renewed certificate is already due; waiting retry_min");
                        tokio::select! {
                            () = cancel.cancelled() => return,
                            () = tokio::time::sleep(self.config.retry_min) => {}
                        }
                    }
                }
                Err(e) => {
                    Counters::add(&self.counters.cert_renewal_failures, 1);
                    let delay = backoff.next_delay();
                    warn!(node = %self.node, error = %e, retry_in = ?delay, "certificate renewal failed");
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One renewal: new key, CSR, `POST /v1/renew`, check, write, swap,
    /// signal.
    async fn renew_once(&mut self) -> Result<(), RenewError> {
        let (key, csr) = crate::identity::new_key_and_csr()?;
        let url = format!("{}/v1/renew", self.hub_url.trim_end_matches('/'));
        let req_err = |detail: String| RenewError::Request {
            url: url.clone(),
            detail,
        };
        let tls = self.identity.tls_config_with(self.slot.clone())?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| req_err(e.to_string()))?;
        let resp = http
            .post(&url)
            .json(&serde_json::json!({ "csr_pem": csr }))
            .send()
            .await
            .map_err(|e| req_err(chain(&e)))?;
        let status = resp.status();
        let body = resp.text().await.map_err(|e| req_err(e.to_string()))?;
        if !status.is_success() {
            return Err(RenewError::Refused {
                url,
                status: status.as_u16(),
                body,
            });
        }
        let answer: Answer =
            serde_json::from_str(&body).map_err(|e| req_err(format!("unexpected answer: {e}")))?;
        let renewed = Identity {
            key_pem: key.serialize_pem(),
            cert_pem: answer.cert_pem,
            ..self.identity.clone()
        };
        // Refuse an answer that is not a certificate for the new key
        // before anything is written.
        renewed.certified_key()?;
        renewed.validity()?;
        let (dir, to_write) = (self.data_dir.clone(), renewed.clone());
        tokio::task::spawn_blocking(move || to_write.write_rotated(&dir))
            .await
            .map_err(|e| req_err(format!("writing the identity: {e}")))??;
        self.slot.replace(&renewed)?;
        self.identity = renewed;
        self.rotated.send_modify(|g| *g += 1);
        if let Some(f) = &self.fetcher
            && let Err(e) = f.reset_connections()
        {
            warn!(node = %self.node, error = %e, "artifact fetcher keeps its old connections");
        }
        Ok(())
    }
}

/// An error with its sources (reqwest hides the TLS reason in them).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_after_the_fraction_of_the_validity() {
        let nb = UNIX_EPOCH + Duration::from_secs(1_000);
        let na = nb + Duration::from_secs(300);
        assert_eq!(renew_at(nb, na, 0.66), nb + Duration::from_secs(198));
        assert_eq!(renew_at(nb, na, 0.5), nb + Duration::from_secs(150));
        // A certificate whose end lies before its start is due at once.
        assert_eq!(renew_at(na, nb, 0.66), na);
    }
}
