//! edge agent.
