//! In-memory [`KvStore`], [`ModelSource`] and [`DeviceReader`] for tests,
//! benches and examples.
//!
//! The real implementations live in `edge-node` (sled-backed kv, OTA model
//! store, Modbus/OPC UA drivers) and cannot be used from this crate, which
//! must not depend on them. Do not use these in production: nothing here is
//! persistent.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use crate::capability::{
    Capabilities, CapabilityError, DeviceReader, KvStore, ModelSource, PointValue, RegisterKind,
};
use crate::spec::PointRef;

/// A `BTreeMap` per namespace behind a mutex.
#[derive(Debug, Default)]
pub struct MemoryKv {
    data: Mutex<BTreeMap<(String, String), Vec<u8>>>,
}

impl MemoryKv {
    /// Snapshot of one namespace.
    pub fn namespace(&self, namespace: &str) -> BTreeMap<String, Vec<u8>> {
        let data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        data.iter()
            .filter(|((ns, _), _)| ns == namespace)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect()
    }
}

impl KvStore for MemoryKv {
    fn get(&self, namespace: &str, key: &str) -> Result<Option<Vec<u8>>, CapabilityError> {
        let data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(data.get(&(namespace.to_owned(), key.to_owned())).cloned())
    }

    fn put(&self, namespace: &str, key: &str, value: &[u8]) -> Result<(), CapabilityError> {
        let mut data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        data.insert((namespace.to_owned(), key.to_owned()), value.to_vec());
        Ok(())
    }

    fn delete(&self, namespace: &str, key: &str) -> Result<(), CapabilityError> {
        let mut data = self.data.lock().unwrap_or_else(PoisonError::into_inner);
        data.remove(&(namespace.to_owned(), key.to_owned()));
        Ok(())
    }
}

/// Models by name.
#[derive(Debug, Default)]
pub struct MemoryModels {
    models: Mutex<HashMap<String, Vec<u8>>>,
}

impl MemoryModels {
    /// Stores (or replaces) model `name`, as an OTA push would.
    pub fn insert(&self, name: impl Into<String>, bytes: impl Into<Vec<u8>>) {
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        models.insert(name.into(), bytes.into());
    }
}

impl ModelSource for MemoryModels {
    fn read_model(&self, name: &str) -> Result<Vec<u8>, CapabilityError> {
        let models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        models.get(name).cloned().ok_or(CapabilityError::NotFound)
    }
}

/// One device access, as recorded by [`MemoryDevices`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceAccess {
    /// `read_point`.
    Point(PointRef),
    /// `read_registers`.
    Registers {
        /// Device id.
        device: String,
        /// First register.
        address: u16,
        /// Register count.
        count: u16,
    },
    /// `read_node`.
    Node {
        /// Device id.
        device: String,
        /// OPC UA node id.
        node_id: String,
    },
}

/// Fixed device contents plus a log of every access, so tests can prove that
/// a refused call never reached the device.
#[derive(Debug, Default)]
pub struct MemoryDevices {
    points: Mutex<HashMap<PointRef, PointValue>>,
    registers: Mutex<HashMap<String, Vec<u16>>>,
    nodes: Mutex<HashMap<(String, String), f64>>,
    accesses: Mutex<Vec<DeviceAccess>>,
}

impl MemoryDevices {
    /// Sets a point value.
    pub fn set_point(&self, point: PointRef, value: PointValue) {
        let mut points = self.points.lock().unwrap_or_else(PoisonError::into_inner);
        points.insert(point, value);
    }

    /// Sets the register image of `device` (address 0 first).
    pub fn set_registers(&self, device: impl Into<String>, registers: Vec<u16>) {
        let mut map = self
            .registers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.insert(device.into(), registers);
    }

    /// Sets an OPC UA node value.
    pub fn set_node(&self, device: impl Into<String>, node_id: impl Into<String>, value: f64) {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes.insert((device.into(), node_id.into()), value);
    }

    /// Every access so far, in order.
    pub fn accesses(&self) -> Vec<DeviceAccess> {
        self.accesses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(&self, access: DeviceAccess) {
        self.accesses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(access);
    }
}

impl DeviceReader for MemoryDevices {
    fn read_point(&self, point: &PointRef) -> Result<PointValue, CapabilityError> {
        self.record(DeviceAccess::Point(point.clone()));
        let points = self.points.lock().unwrap_or_else(PoisonError::into_inner);
        points.get(point).copied().ok_or(CapabilityError::NotFound)
    }

    fn read_registers(
        &self,
        device: &str,
        _kind: RegisterKind,
        address: u16,
        count: u16,
    ) -> Result<Vec<u16>, CapabilityError> {
        self.record(DeviceAccess::Registers {
            device: device.to_owned(),
            address,
            count,
        });
        let map = self
            .registers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let regs = map.get(device).ok_or(CapabilityError::NotFound)?;
        let start = usize::from(address);
        let end = start + usize::from(count);
        regs.get(start..end)
            .map(<[u16]>::to_vec)
            .ok_or(CapabilityError::NotFound)
    }

    fn read_node(&self, device: &str, node_id: &str) -> Result<f64, CapabilityError> {
        self.record(DeviceAccess::Node {
            device: device.to_owned(),
            node_id: node_id.to_owned(),
        });
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes
            .get(&(device.to_owned(), node_id.to_owned()))
            .copied()
            .ok_or(CapabilityError::NotFound)
    }
}

/// The three in-memory stores, kept typed so tests can inspect them.
#[derive(Debug, Clone, Default)]
pub struct MemoryCapabilities {
    /// Key-value store.
    pub kv: Arc<MemoryKv>,
    /// Models.
    pub models: Arc<MemoryModels>,
    /// Devices.
    pub devices: Arc<MemoryDevices>,
}

impl MemoryCapabilities {
    /// The bundle to hand to [`DeviceRuntime::new`](crate::DeviceRuntime::new).
    pub fn capabilities(&self) -> Capabilities {
        Capabilities {
            kv: self.kv.clone(),
            models: self.models.clone(),
            devices: self.devices.clone(),
        }
    }
}
