//! The capabilities a guest gets: its key-value store ([`super::kv`]), OTA models, reads of
//! the latest value of a point; and the component bytes for the runtime.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use device_runtime::{
    BoxError, CapabilityError, DeviceReader, KvStore, ModelSource, ModuleSource, PointRef,
    PointValue, RegisterKind,
};
use protocols::{Quality, Sample};

use super::kv::GuestKv;
use crate::artifacts::read_blob;

/// Shared, swappable state behind the capability traits.
#[derive(Debug, Default)]
pub(super) struct CapState {
    /// Model name -> digest.
    pub(super) models: HashMap<String, String>,
    /// (device, point name) -> node-wide index.
    pub(super) points: HashMap<PointRef, u32>,
    /// Latest sample of every point a function consumes.
    pub(super) latest: HashMap<u32, Sample>,
}

pub(super) struct EdgeCaps {
    /// Guest key-value state with its quota.
    pub(super) kv: Arc<GuestKv>,
    pub(super) artifacts_dir: PathBuf,
    pub(super) state: Arc<Mutex<CapState>>,
}

impl EdgeCaps {
    fn state(&self) -> std::sync::MutexGuard<'_, CapState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl KvStore for EdgeCaps {
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, CapabilityError> {
        self.kv.get(namespace, key)
    }
    fn put(&self, namespace: &str, key: &str, value: &[u8]) -> Result<(), CapabilityError> {
        self.kv.put(namespace, key, value)
    }
    fn delete(&self, namespace: &str, key: &str) -> Result<(), CapabilityError> {
        self.kv.delete(namespace, key)
    }
}

impl ModelSource for EdgeCaps {
    fn read_model(&self, name: &str) -> Result<Vec<u8>, CapabilityError> {
        let digest = self
            .state()
            .models
            .get(name)
            .cloned()
            .ok_or(CapabilityError::NotFound)?;
        read_blob(&self.artifacts_dir, &digest).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => CapabilityError::NotFound,
            _ => CapabilityError::Unavailable(e.to_string()),
        })
    }
}

impl DeviceReader for EdgeCaps {
    fn read_point(&self, point: &PointRef) -> Result<PointValue, CapabilityError> {
        let st = self.state();
        let idx = st.points.get(point).ok_or(CapabilityError::NotFound)?;
        let s = st.latest.get(idx).ok_or(CapabilityError::NotFound)?;
        Ok(PointValue {
            timestamp_ms: s.ts_ms,
            value: s.value,
            quality: quality_class(s.quality),
        })
    }
    fn read_registers(
        &self,
        device: &str,
        _kind: RegisterKind,
        _address: u16,
        _count: u16,
    ) -> Result<Vec<u16>, CapabilityError> {
        Err(CapabilityError::Unavailable(format!(
            "raw register reads of {device} are not supported by this edge-node yet"
        )))
    }
    fn read_node(&self, device: &str, node_id: &str) -> Result<f64, CapabilityError> {
        Err(CapabilityError::Unavailable(format!(
            "raw OPC UA reads ({device}, {node_id}) are not supported by this edge-node yet"
        )))
    }
}

/// Guest quality: 0 good, 1 uncertain, 2 bad.
fn quality_class(q: Quality) -> u8 {
    if q.is_good() {
        0
    } else if q.is_bad() {
        2
    } else {
        1
    }
}

/// Component bytes from the artifact directory (called on the blocking pool).
pub(super) struct BlobModules(pub(super) PathBuf);

impl ModuleSource for BlobModules {
    fn module_bytes(&self, digest: &str) -> Result<Vec<u8>, BoxError> {
        read_blob(&self.0, digest).map_err(|e| Box::new(e) as BoxError)
    }
}
