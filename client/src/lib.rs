//! The reference client of the Secure Messenger API: the HTTP calls (`api`), the message
//! envelope of `shared/ENVELOPE.md` (`envelope`, `keys`), the profile store (`store`), the
//! inbox's judgement of each message (`inbox`), and the commands of the `messenger` CLI (`app`).

pub mod api;
pub mod app;
pub mod envelope;
pub mod inbox;
pub mod keys;
pub mod olm;
pub mod store;
