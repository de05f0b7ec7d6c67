//! Shared helpers for weft benchmarks.
