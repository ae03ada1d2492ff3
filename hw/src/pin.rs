//! The PIN as its own type.
//!
//! A [`Pin`] exists between the keypad and the card's VERIFY and nowhere
//! else. It is zeroized when dropped, prints as `Pin(***)`, has no
//! `Display`, no `Clone` and no serde implementation, so it cannot reach a
//! log line, a gRPC message or a config file by accident.

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{Error, Result};

/// Shortest PIN SP 800-73-4 allows (Part 2, §2.4.3).
pub const MIN_PIN_LEN: usize = 6;
/// Longest PIN; VERIFY pads to this length with 0xFF.
pub const MAX_PIN_LEN: usize = 8;

/// A PIV Card Application PIN: 6 to 8 ASCII digits.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct Pin {
    digits: [u8; MAX_PIN_LEN],
    len: u8,
}

impl Pin {
    /// Takes the digits as ASCII bytes (`b"123456"`). Anything other than
    /// 6 to 8 digits is refused, and the error does not echo the input.
    pub fn new(ascii_digits: &[u8]) -> Result<Pin> {
        if !(MIN_PIN_LEN..=MAX_PIN_LEN).contains(&ascii_digits.len()) {
            return Err(Error::InvalidInput("a PIN has 6 to 8 digits"));
        }
        if !ascii_digits.iter().all(u8::is_ascii_digit) {
            return Err(Error::InvalidInput("a PIN has only digits"));
        }
        let mut digits = [0u8; MAX_PIN_LEN];
        digits[..ascii_digits.len()].copy_from_slice(ascii_digits);
        Ok(Pin { digits, len: ascii_digits.len() as u8 })
    }

    /// How many digits.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Always false: a `Pin` has at least six digits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The VERIFY data field: the digits padded with 0xFF to eight bytes
    /// (SP 800-73-4 Part 2, §2.4.3), in a buffer zeroized on drop.
    pub fn padded(&self) -> Zeroizing<[u8; MAX_PIN_LEN]> {
        let mut out = Zeroizing::new([0xFFu8; MAX_PIN_LEN]);
        out[..self.len()].copy_from_slice(&self.digits[..self.len()]);
        out
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pin(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_with_ff_and_hides_digits() {
        let pin = Pin::new(b"123456").unwrap();
        assert_eq!(&pin.padded()[..], b"123456\xFF\xFF");
        assert_eq!(format!("{pin:?}"), "Pin(***)");
        assert_eq!(&Pin::new(b"12345678").unwrap().padded()[..], b"12345678");
    }

    #[test]
    fn refuses_bad_pins_without_echoing_them() {
        for bad in [&b"12345"[..], b"123456789", b"12345a", b""] {
            let err = Pin::new(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)));
            assert!(!err.to_string().contains("1234"));
        }
    }
}
