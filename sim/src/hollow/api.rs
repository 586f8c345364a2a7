//! The hub's REST API as a hollow run uses it: the typed
//! [`HubClient`] with errors turned into [`HollowError::Api`].

use std::time::Duration;

use cloud_hub::api::NodeView;
use cloud_hub::client::{ClientError, HubClient};
use protocols::signing::{VerifyingKey, key_from_hex};
use protocols::{DesiredState, Topics};
use tokio::time::Instant;

use super::HollowError;

pub(super) struct Api {
    client: HubClient,
}

impl Api {
    /// A client of the hub at `base`; `timeout` bounds each request.
    /// With the hub's local `data_dir`, it authenticates as its admin.
    pub(super) fn new(
        base: &str,
        data_dir: Option<&std::path::Path>,
        timeout: Duration,
    ) -> Result<Self, HollowError> {
        let client = match data_dir {
            Some(d) => HubClient::local_admin(base, d, timeout),
            None => HubClient::with_timeout(base, timeout),
        }
        .map_err(|e| Self::err("client", e))?;
        Ok(Self { client })
    }

    /// The typed client itself.
    pub(super) fn client(&self) -> &HubClient {
        &self.client
    }

    fn err(what: &str, e: impl std::fmt::Display) -> HollowError {
        HollowError::Api {
            what: what.into(),
            detail: e.to_string(),
        }
    }

    pub(super) async fn hub_key(&self) -> Result<(VerifyingKey, Topics), HollowError> {
        let what = "GET /v1/hub";
        let info = self
            .client
            .hub_info()
            .await
            .map_err(|e| Self::err(what, detail(e)))?;
        let key = key_from_hex(&info.public_key).map_err(|e| Self::err(what, e))?;
        Ok((key, Topics::new(&info.topic_root)))
    }

    /// Waits until `GET /readyz` answers 200 (the hub's MQTT session is
    /// subscribed), or returns `false` at once if the hub has no such route.
    pub(super) async fn wait_ready(&self, timeout: Duration) -> Result<bool, HollowError> {
        let what = "GET /readyz";
        let deadline = Instant::now() + timeout;
        loop {
            let s = match self.client.ready().await {
                Ok(true) => return Ok(true),
                Ok(false) => status_text(503),
                Err(ClientError::Status { status: 404, .. }) => return Ok(false),
                Err(ClientError::Status { status, .. }) => status_text(status),
                Err(e) => return Err(Self::err(what, detail(e))),
            };
            if Instant::now() >= deadline {
                return Err(HollowError::Timeout(format!(
                    "{what}: hub not ready within {timeout:?} (last answer {s})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(super) async fn nodes(&self) -> Result<Vec<NodeView>, HollowError> {
        self.client
            .nodes()
            .await
            .map_err(|e| Self::err("GET /v1/nodes", detail(e)))
    }

    /// `Err` is the status and the hub's message, or why there was no
    /// answer.
    pub(super) async fn put_desired(&self, d: &DesiredState) -> Result<(), String> {
        self.client.put_desired(d).await.map(drop).map_err(detail)
    }
}

/// What went wrong, without the method and path the caller already names:
/// `"{status}: {message}"` for an error answer.
fn detail(e: ClientError) -> String {
    match e {
        ClientError::Status {
            status, message, ..
        } => format!("{}: {}", status_text(status), message.trim()),
        ClientError::Transport { source, .. } => source.to_string(),
        ClientError::Decode { source, .. } => source.to_string(),
        ClientError::BadUrl(_) | ClientError::Credentials(_) => e.to_string(),
    }
}

/// `404 Not Found` for 404.
fn status_text(status: u16) -> String {
    reqwest::StatusCode::from_u16(status).map_or_else(|_| status.to_string(), |s| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_keep_status_and_hub_message() {
        let e = ClientError::Status {
            method: "PUT",
            path: "/v1/nodes/n/desired".into(),
            status: 409,
            message: " revision 3 is not newer than 4\n".into(),
        };
        assert_eq!(detail(e), "409 Conflict: revision 3 is not newer than 4");
        assert_eq!(status_text(503), "503 Service Unavailable");
        assert_eq!(status_text(99), "99");
    }
}
