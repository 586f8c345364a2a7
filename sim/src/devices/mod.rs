//! Simulated field devices: Modbus ([`modbus`]) and OPC UA ([`opcua`])
//! servers and MQTT-native devices publishing to a broker ([`mqtt`]), whose
//! values come from [`signal`](crate::signal) models, with fault injection
//! and a log of every value served (the simulator's ground truth).

pub mod modbus;
pub mod mqtt;
pub mod opcua;
