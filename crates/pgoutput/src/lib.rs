//! pgoutput decoder (stub, being written).
