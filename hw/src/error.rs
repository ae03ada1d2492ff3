//! The one error type of this crate.
//!
//! Everything a card, a reader, pcscd or a keypad can do wrong ends here as a
//! typed value: nothing a card sends may panic the process. Variants say what
//! happened in terms the agent can act on (`WrongPin { tries }`, `PinBlocked`,
//! `CardRemoved`) rather than raw status words, which stay available in
//! [`Error::Status`] for everything else.

use std::time::Duration;

use crate::apdu::StatusWord;

/// Errors from the PIV client, the PC/SC layer, keypads and the virtual card.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The card answered a command with a status word that the operation
    /// does not expect (SP 800-73-4 Part 2, Table 6 lists the usual ones).
    #[error("card answered {sw} to {command}")]
    Status {
        /// What the client was doing.
        command: &'static str,
        /// The status word the card sent.
        sw: StatusWord,
    },

    /// VERIFY failed: the PIN was wrong and the card has `tries` left
    /// (status 63Cx). With `tries == 0` the card is now blocked.
    #[error("wrong PIN, {tries} tries left")]
    WrongPin {
        /// Tries the card says remain before it blocks.
        tries: u8,
    },

    /// The PIN is blocked (status 6983, or a retry counter of zero). The
    /// client sends no further VERIFY to this card.
    #[error("PIN blocked")]
    PinBlocked,

    /// The card refused a key operation because the PIN has not been
    /// verified (status 6982).
    #[error("security status not satisfied: {command} needs the PIN first")]
    SecurityStatusNotSatisfied {
        /// What the client was doing.
        command: &'static str,
    },

    /// SELECT of the PIV application failed: this is not a PIV card.
    #[error("the card has no PIV application")]
    NoPivApplication,

    /// A data object is not on the card (status 6A82 to GET DATA).
    #[error("data object {tag:06X} is not on the card")]
    ObjectNotFound {
        /// The BER-TLV tag of the object.
        tag: u32,
    },

    /// The card sent bytes that do not parse as what the command returns.
    #[error("malformed response to {command}: {reason}")]
    Malformed {
        /// What the client was doing.
        command: &'static str,
        /// What was wrong with the bytes.
        reason: &'static str,
    },

    /// A response, an object or a decompressed certificate grew past the
    /// configured limit; the rest was not read.
    #[error("{what} exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Which limit was hit.
        what: &'static str,
        /// The limit in bytes.
        limit: usize,
    },

    /// The card kept answering 61xx (or 6Cxx) past the allowed number of
    /// rounds.
    #[error("card kept chaining responses past {rounds} rounds")]
    ChainTooLong {
        /// Rounds sent before giving up.
        rounds: usize,
    },

    /// An APDU or the whole exchange took longer than allowed.
    #[error("card too slow: {what} took {elapsed:?}, limit {limit:?}")]
    Timeout {
        /// "APDU" or "exchange".
        what: &'static str,
        /// How long it took.
        elapsed: Duration,
        /// The bound that was exceeded.
        limit: Duration,
    },

    /// The caller passed something the protocol cannot carry (a PIN that is
    /// not 6 to 8 digits, a digest of the wrong length for the algorithm).
    #[error("invalid input: {0}")]
    InvalidInput(&'static str),

    /// The key slot holds a key for another algorithm than requested, or the
    /// algorithm is not one PIV defines.
    #[error("unsupported or mismatched algorithm {0:#04x}")]
    Algorithm(u8),

    /// The card was removed (or reset by someone else) during an exchange.
    #[error("card removed")]
    CardRemoved,

    /// The reader went away (unplugged, or pcscd lost it).
    #[error("reader unavailable")]
    ReaderUnavailable,

    /// pcscd is not running or stopped answering.
    #[error("PC/SC service unavailable")]
    ServiceUnavailable,

    /// Any other PC/SC error, as pcsc-lite reported it.
    #[error("PC/SC: {0}")]
    Pcsc(#[from] pcsc::Error),

    /// The reader has no secure PIN entry (no FEATURE_VERIFY_PIN_DIRECT).
    #[error("reader has no PIN pad")]
    NoPinPad,

    /// The person at the PIN pad cancelled or let the entry time out
    /// (status 6401 / 6400 from the reader).
    #[error("PIN entry on the reader {0}")]
    PinPadEntry(&'static str),

    /// A Wiegand frame that is not a keypad key (a 26-bit card frame, a
    /// bad check nibble, noise).
    #[error("Wiegand: {0}")]
    Wiegand(&'static str),

    /// A GPIO pin could not be read or driven.
    #[error("GPIO: {0}")]
    Gpio(String),

    /// An I/O failure of a reader, keypad or terminal.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Shorthand for results in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn malformed(command: &'static str, reason: &'static str) -> Self {
        Error::Malformed { command, reason }
    }
}
