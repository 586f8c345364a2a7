//! edge agent.
pub mod clock;
pub mod drivers;
