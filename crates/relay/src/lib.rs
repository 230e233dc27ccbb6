//! relay (stub).
