//! Safe bindings to the subset of librados and librbd that tcmu-rbd uses.
//!
//! All `unsafe` code that crosses into C lives in this crate.
