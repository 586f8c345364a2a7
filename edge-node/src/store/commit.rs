//! The group committer: makes appended outbox entries durable (and thereby
//! publishable) every `flush_interval`, and once more when told to stop.
//!
//! See the module docs of [`crate::store`] for the loss window this bounds.
//! On stop the committer always commits; it leaves the clean-stop marker
//! only when the stop signal says everything buffered upstream was appended
//! first (the agent's shutdown sends `true` after the pipeline and the
//! function host drained). A dropped stop sender counts as an unclean stop.

use tokio::sync::oneshot;
use tokio::time::Duration;

use super::{Store, StoreError};
use crate::clock::Clock;

impl Store {
    /// Commits every `every` while something was appended, until `stop`
    /// resolves; then commits a last time and, if `stop` carried `true`,
    /// marks the stop clean.
    pub async fn run_committer(
        &self,
        clock: Clock,
        every: Duration,
        mut stop: oneshot::Receiver<bool>,
    ) -> Result<(), StoreError> {
        loop {
            let clean = tokio::select! {
                r = &mut stop => Some(r.unwrap_or(false)),
                () = tokio::time::sleep(every) => None,
            };
            let pending = self
                .outboxes()
                .iter()
                .any(|o| o.appended_seq() > o.durable_seq());
            if pending || clean.is_some() {
                self.record_commit_time(clock.now_ms())?;
                self.commit().await?;
            }
            if let Some(clean) = clean {
                if clean {
                    self.mark_clean_stop().await?;
                }
                return Ok(());
            }
        }
    }
}
