//! cloud hub.
