//! What operators run beside (or instead of) the relay loop: `setup`, `status`, the outbox
//! purge, `replay` and `verify`; [`positions`] checks the WAL positions they are given.

pub mod positions;
pub mod purge;
pub mod replay;
pub mod setup;
pub mod status;
pub mod verify;
