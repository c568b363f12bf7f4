#![forbid(unsafe_code)]
//! Breakwater: an edge gateway that makes overload explicit and fast.

pub mod config;
