//! The set of running device drivers, reconciled with desired state.

use std::collections::BTreeMap;

use protocols::{Device, DeviceStatus, Sample};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::drivers::{self, DeviceHandle};

/// The running drivers, one per desired device.
pub(super) struct DeviceSet {
    running: BTreeMap<String, (Device, DeviceHandle)>,
    transports: drivers::transport::DeviceTransports,
    options: drivers::DriverOptions,
    samples: mpsc::Sender<Vec<Sample>>,
    clock: Clock,
    cancel: CancellationToken,
}

impl DeviceSet {
    /// No drivers yet; new ones run with `options`, send to `samples` and
    /// stop with `cancel`.
    pub(super) fn new(
        transports: drivers::transport::DeviceTransports,
        options: drivers::DriverOptions,
        samples: mpsc::Sender<Vec<Sample>>,
        clock: Clock,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            running: BTreeMap::new(),
            transports,
            options,
            samples,
            clock,
            cancel,
        }
    }

    /// Stops drivers whose device is gone or changed and starts one for
    /// every wanted device that has none.
    pub(super) fn reconcile(&mut self, wanted: &[Device]) {
        let by_id: BTreeMap<&str, &Device> = wanted.iter().map(|d| (d.id.as_str(), d)).collect();
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(id, (spec, _))| by_id.get(id.as_str()) != Some(&spec))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some((_, handle)) = self.running.remove(&id) {
                tokio::spawn(handle.stop());
            }
        }
        for d in wanted {
            if !self.running.contains_key(&d.id) {
                let h = drivers::spawn_routed(
                    d.clone(),
                    self.options.clone(),
                    &self.transports,
                    self.samples.clone(),
                    self.clock,
                    self.cancel.child_token(),
                );
                self.running.insert(d.id.clone(), (d.clone(), h));
            }
        }
    }

    /// Status of every running driver, by device id.
    pub(super) fn statuses(&self) -> BTreeMap<String, DeviceStatus> {
        self.running
            .iter()
            .map(|(id, (_, h))| (id.clone(), h.status()))
            .collect()
    }

    /// Stops every driver and waits for each.
    pub(super) async fn stop_all(&mut self) {
        for (_, (_, h)) in std::mem::take(&mut self.running) {
            h.stop().await;
        }
    }
}
