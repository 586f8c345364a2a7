//! fleet simulator (see issue 6).

pub mod devices;
pub mod signal;
