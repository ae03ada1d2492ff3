//! A virtual PIV card, faithful to SP 800-73-4, for tests, demos and
//! integrators without hardware. Its own crate: the agent on a Pi carries
//! none of its key generation and crypto (`pivgate-hw` is the client side
//! only).
//!
//! - [`card`]: the card itself, sans-IO: APDU in, APDU out, plus the time a
//!   real card would take.
//! - [`attestation`]: where its keys came from (generated or put there),
//!   their PIN and touch policies, and PIV attestation (YubiKey F9) under a
//!   test attestation root.
//! - [`keys`]: its asymmetric slot keys (P-256, P-384, RSA-2048) and the
//!   management key (3DES or AES).
//! - [`profile`]: what it holds, generated (with a throwaway issuing CA) or
//!   loaded from a folder.
//! - [`vpcd`]: the connector that puts it into a real pcscd reader through
//!   vsmartcard's vpcd driver.
//!
//! The card implements [`Transport`] too, so unit tests can talk to it in
//! process. A [`Latency`] model lets benchmarks stand in for a real card, and
//! [`Fault`]s make it hostile on purpose.

#![forbid(unsafe_code)]

pub mod attestation;
pub mod card;
pub mod error;
pub mod keys;
pub mod profile;
pub mod vpcd;

use std::time::Duration;

pub use attestation::{Attestation, AttestationCa, KeyOrigin, PinPolicy, TouchPolicy};
pub use card::{AidMatch, Answer, CardContents, VirtualCard, ATR, ATR_EXTENDED};
pub use error::{Error, Result};
pub use keys::{CardKey, ManagementKey, DEFAULT_MANAGEMENT_KEY};
pub use profile::{IssuingCa, Profile, ProfileOptions, Validity};

use pivgate_hw::Transport;

/// How long the card takes, modelled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    /// Fixed cost of each APDU round trip (reader, protocol, card OS).
    pub per_apdu: Duration,
    /// Cost of each byte each way on the wire.
    pub per_byte: Duration,
    /// Cost of a private-key operation.
    pub per_signature: Duration,
    /// Cost of a PIN comparison (VERIFY and friends).
    pub per_verify: Duration,
}

impl Latency {
    /// A typical contact card in a USB CCID reader: about 4 ms per APDU
    /// round trip, 25 µs per byte (T=1 at roughly 400 kbit/s with
    /// framing), 50 ms per ECDSA P-256 signature (modern cards take 25 to
    /// 75 ms) and 15 ms per PIN check.
    pub fn typical_contact() -> Latency {
        Latency {
            per_apdu: Duration::from_millis(4),
            per_byte: Duration::from_micros(25),
            per_signature: Duration::from_millis(50),
            per_verify: Duration::from_millis(15),
        }
    }

    /// A contactless card: each round trip costs tens of milliseconds.
    pub fn typical_contactless() -> Latency {
        Latency {
            per_apdu: Duration::from_millis(20),
            per_byte: Duration::from_micros(40),
            per_signature: Duration::from_millis(70),
            per_verify: Duration::from_millis(20),
        }
    }
}

/// Hostile behaviour on purpose, for tests of everything that reads a card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer commands with instruction `ins` (and, when `object` is set,
    /// only GET DATA for that object) with exactly these bytes.
    Respond {
        /// Instruction byte to intercept.
        ins: u8,
        /// Object tag to intercept (GET DATA only).
        object: Option<u32>,
        /// The raw response APDU to send instead.
        response: Vec<u8>,
    },
    /// Answer every GET RESPONSE with 256 bytes and 61 00, forever.
    EndlessChain,
    /// Take this much longer on every APDU.
    Slow(Duration),
    /// Leave the reader (drop the vpcd connection) when the Nth APDU since
    /// creation arrives, instead of answering it.
    DropAt(usize),
}

/// In-process transport: the card answers directly, sleeping for its
/// modelled latency (zero by default).
impl Transport for VirtualCard {
    fn transmit(&mut self, command: &[u8]) -> pivgate_hw::Result<Vec<u8>> {
        let answer = self.process(command);
        if !answer.delay.is_zero() {
            std::thread::sleep(answer.delay);
        }
        if answer.disconnect {
            return Err(pivgate_hw::Error::CardRemoved);
        }
        Ok(answer.response)
    }

    fn atr(&self) -> Option<&[u8]> {
        Some(VirtualCard::atr(self))
    }
}
