//! The ordered stop of the agent, as one function.
//!
//! Each task that takes part in the order is a [`Stage`]: a stop signal it
//! watches and a signal that it returned (its result still goes to the
//! agent's `JoinSet`). [`run`] walks the order:
//! 1. stop the drivers (no new samples) and announce the node offline;
//! 2. stop the pipeline, which appends what it buffered and closes the
//!    function host's input; wait until both returned (at most
//!    [`DRAIN_TIMEOUT`]);
//! 3. let the committer make everything durable; it leaves the clean-stop
//!    marker only if step 2 finished in time;
//! 4. stop the uplink, then close the MQTT link.
//!
//! # Invariants
//! - The clean-stop marker is written only after every sample the pipeline
//!   and the function host held was appended and then committed.
//! - A stage whose [`Stage`] is dropped without [`run`] (a panicking control
//!   task) is told to stop all the same, so the agent never hangs.

use std::future::Future;

use tokio::sync::oneshot;
use tokio::time::Duration;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::Tasks;
use super::control::Control;

/// How long the pipeline and the function host may take to append what
/// they hold on a stop.
pub(super) const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// One task in the stop order.
pub(super) struct Stage {
    /// Cancels the task's token when dropped.
    stop: DropGuard,
    /// Resolves (with an error: the sender is dropped) when the task returned.
    done: oneshot::Receiver<()>,
}

impl Stage {
    /// Spawns `task(stop)` into `tasks`.
    pub(super) fn spawn<F, Fut>(tasks: &mut Tasks, task: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), super::AgentError>> + Send + 'static,
    {
        let token = CancellationToken::new();
        let (done_tx, done) = oneshot::channel::<()>();
        let fut = task(token.clone());
        tasks.spawn(async move {
            let _returned = done_tx;
            fut.await
        });
        Self {
            stop: token.drop_guard(),
            done,
        }
    }

    /// Tells the task to stop and waits until it returned.
    async fn stop(self) {
        let Self { stop, done } = self;
        drop(stop);
        let _ = done.await;
    }

    /// Waits until the task returned by itself.
    async fn finished(self) {
        let Self { stop, done } = self;
        let _ = done.await;
        drop(stop);
    }
}

/// The stages in the order they stop.
pub(super) struct Stages {
    /// Appends buffered raw samples, then returns.
    pub pipeline: Stage,
    /// Returns when the pipeline closed its input.
    pub host: Stage,
    /// Told whether the stop is clean; commits a last time and returns.
    pub committer: (oneshot::Sender<bool>, Stage),
    /// Stops publishing.
    pub uplink: Stage,
    /// Closes the MQTT connection.
    pub link: Stage,
}

/// Stops the agent in order (see the module docs).
pub(super) async fn run(control: &mut Control, stages: Stages) {
    let Stages {
        pipeline,
        host,
        committer: (clean, committer),
        uplink,
        link,
    } = stages;
    control.devices.stop_all().await;
    control.announce_offline().await;
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        pipeline.stop().await;
        host.finished().await;
    })
    .await
    .is_ok();
    let _ = clean.send(drained);
    committer.finished().await;
    uplink.stop().await;
    link.stop().await;
}
