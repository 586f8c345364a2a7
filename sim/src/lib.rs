//! fleet simulator (see issue 6).

pub mod demo;
pub mod devices;
pub mod signal;
pub mod truth;
