//! The pivgate gRPC contract, package `pivgate.v1`.
//!
//! The `.proto` files in `proto/pivgate/v1/` are the contract integrators
//! read; this crate holds them and the tonic code generated from them (with
//! protox, so no system protoc is needed), and the one definition of the
//! bytes a card signs ([`card_message`]), which gateway and agent share.
//! Every other crate converts to its own types at the boundary.
//!
//! - `pivgate.v1.AgentService`: agents (presence, begin/complete
//!   authentication, card removal).
//! - `pivgate.v1.AccessService`: applications (terminal state, event stream
//!   with resume).
//! - `pivgate.v1.AdminService`: administrators.
#![forbid(unsafe_code)]

pub mod card_message;

/// Generated messages and services of `pivgate.v1`.
#[allow(missing_docs, clippy::all)]
pub mod v1 {
    tonic::include_proto!("pivgate.v1");
}

/// The encoded `FileDescriptorSet` of every pivgate proto file (imports
/// included), for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("pivgate_descriptor");
