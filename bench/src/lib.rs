//! Shared helpers for weft benchmarks.

#![forbid(unsafe_code)]
