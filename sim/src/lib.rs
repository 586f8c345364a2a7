//! # sim — the fleet simulator: real hub, real agents, fake devices, ground truth
//!
//! Start here: [`scenario`] (the TOML schema of a run), [`run`] (executes a
//! scenario against the real hub and real edge agents and writes a
//! [`report::Report`]), [`devices`] (simulated Modbus / OPC UA servers that
//! log every value they serve — the ground truth), [`proxy`] (link faults
//! between an agent and the broker), [`signal`] (seeded signal models),
//! [`demo`] (one hub + one node on embedded defaults), [`virtual_time`] (a
//! node on its own paused clock for long outages), [`hollow`] (thousands of
//! device-less nodes that drive the agent's own sans-IO sync session,
//! `edge_node::session::Session`, to measure the hub at fleet scale).

pub mod demo;
pub mod devices;
pub mod hollow;
pub mod proxy;
pub mod report;
pub mod run;
pub mod scenario;
pub mod signal;
pub mod truth;
pub mod virtual_time;
