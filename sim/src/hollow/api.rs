//! The hub's REST API as a hollow run uses it.

use std::time::Duration;

use cloud_hub::api::NodeView;
use protocols::signing::{VerifyingKey, key_from_hex};
use protocols::{DesiredState, Topics};
use tokio::time::Instant;

use super::HollowError;

pub(super) struct Api {
    pub(super) http: reqwest::Client,
    pub(super) base: String,
}

impl Api {
    pub(super) fn err(what: &str, e: impl std::fmt::Display) -> HollowError {
        HollowError::Api {
            what: what.into(),
            detail: e.to_string(),
        }
    }

    pub(super) async fn hub_key(&self) -> Result<(VerifyingKey, Topics), HollowError> {
        let what = "GET /v1/hub";
        let v: serde_json::Value = self
            .http
            .get(format!("{}/v1/hub", self.base))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| Self::err(what, e))?
            .json()
            .await
            .map_err(|e| Self::err(what, e))?;
        let key = v["public_key"]
            .as_str()
            .ok_or_else(|| Self::err(what, "no public_key in the answer"))?;
        let key = key_from_hex(key).map_err(|e| Self::err(what, e))?;
        let root = v["topic_root"]
            .as_str()
            .ok_or_else(|| Self::err(what, "no topic_root in the answer"))?;
        Ok((key, Topics::new(root)))
    }

    /// Waits until `GET /readyz` answers 200 (the hub's MQTT session is
    /// subscribed), or returns `false` at once if the hub has no such route.
    pub(super) async fn wait_ready(&self, timeout: Duration) -> Result<bool, HollowError> {
        let what = "GET /readyz";
        let deadline = Instant::now() + timeout;
        loop {
            let r = self
                .http
                .get(format!("{}/readyz", self.base))
                .send()
                .await
                .map_err(|e| Self::err(what, e))?;
            match r.status() {
                s if s.is_success() => return Ok(true),
                reqwest::StatusCode::NOT_FOUND => return Ok(false),
                s if Instant::now() >= deadline => {
                    return Err(HollowError::Timeout(format!(
                        "{what}: hub not ready within {timeout:?} (last answer {s})"
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    pub(super) async fn nodes(&self) -> Result<Vec<NodeView>, HollowError> {
        let what = "GET /v1/nodes";
        self.http
            .get(format!("{}/v1/nodes", self.base))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| Self::err(what, e))?
            .json()
            .await
            .map_err(|e| Self::err(what, e))
    }

    pub(super) async fn put_desired(&self, d: &DesiredState) -> Result<(), String> {
        let r = self
            .http
            .put(format!("{}/v1/nodes/{}/desired", self.base, d.node))
            .json(d)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status().is_success() {
            Ok(())
        } else {
            let status = r.status();
            Err(format!(
                "{status}: {}",
                r.text().await.unwrap_or_default().trim()
            ))
        }
    }
}
