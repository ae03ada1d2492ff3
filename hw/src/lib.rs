//! pivgate-hw: the card and the pins.
//!
//! Everything between a PIV card or a keypad and the agent's logic:
//!
//! - [`piv`]: the PIV client (SP 800-73-4), sans-IO over a [`Transport`].
//! - [`apdu`], [`tlv`]: the encodings it speaks.
//! - [`pcsc`]: the PC/SC transport, reader monitor and PIN-pad readers,
//!   over pcsc-lite (pcscd).
//! - [`keypad`]: matrix and Wiegand keypads and the PIN-entry rules.
//! - [`indicator`]: LEDs and buzzer patterns.
//!
//! The virtual PIV card that sits in a real pcscd reader through vpcd (or
//! answers in process) is the crate `pivgate-vcard` beside this one: the
//! card side, with its key generation and crypto, stays out of the agent.
//!
//! This is the only crate of the workspace that links pcsc-lite or rppal and
//! the only one that may contain `unsafe` (it has none today). It makes no
//! decisions about access: it reports what cards and keypads did.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod apdu;
pub mod error;
#[cfg(feature = "gpio")]
pub mod gpio;
pub mod indicator;
pub mod keypad;
pub mod pcsc;
pub mod pin;
pub mod piv;
pub mod tlv;
pub mod transport;

pub use embedded_hal;
pub use error::{Error, Result};
pub use pin::Pin;
pub use transport::{Clock, SystemClock, Transport};
