//! Southbound device drivers (see issue 5).
