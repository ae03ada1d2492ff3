//! The pivgate gateway: issues challenges, verifies every card signature,
//! certificate path, revocation state and enrolment itself, keeps terminal
//! sessions and the audit log in sled, and streams lock and unlock events
//! over gRPC with mutual TLS.
//!
//! Not built yet (see the gateway issue); this crate holds only this comment
//! so the workspace layout is real.
#![forbid(unsafe_code)]
