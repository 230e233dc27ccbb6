//! What operators run beside (or instead of) the relay loop: `setup`, `status`, the outbox
//! purge, `replay` and `verify`.

pub mod purge;
pub mod replay;
pub mod setup;
pub mod status;
pub mod verify;
