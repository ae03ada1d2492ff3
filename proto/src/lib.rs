//! The pivgate gRPC contract, package `pivgate.v1`.
//!
//! This crate will hold the `.proto` files and the tonic code generated from
//! them, and nothing else: every other crate converts to its own types at
//! the boundary. It is filled by the gateway issue; until then it holds only
//! this comment so the workspace layout is real.
#![forbid(unsafe_code)]
