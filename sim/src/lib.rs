//! fleet simulator (see issue 6).

pub mod demo;
pub mod devices;
pub mod hollow;
pub mod signal;
