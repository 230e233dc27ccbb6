//! Test harness (stub, being written).
