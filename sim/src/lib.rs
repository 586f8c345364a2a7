//! fleet simulator (see issue 6).
