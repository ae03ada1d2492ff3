//! Keypads and the rules for typing a PIN.
//!
//! - [`matrix`]: 3x4 and 4x4 matrix keypads scanned over embedded-hal 1.0
//!   pins, with debounce (rppal pins on a Pi, mock pins in tests).
//! - [`wiegand`]: Wiegand keypads (4-bit and 8-bit bursts per key on
//!   D0/D1), decoded from edge timestamps.
//! - [`entry`]: PIN entry as a state machine over keys and time.
//! - [`sim`]: a simulated keypad fed from a channel or a terminal.
//!
//! Keypads only report keys. Digits become a [`crate::Pin`] in [`entry`]
//! and nowhere else.

pub mod entry;
pub mod matrix;
pub mod sim;
pub mod wiegand;

use std::fmt;

/// A key on a PIN keypad.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    /// 0 to 9.
    Digit(u8),
    /// Clear / cancel (`*` on most keypads, ESC on Wiegand ones).
    Clear,
    /// Enter / OK (`#` on most keypads, ENT on Wiegand ones).
    Enter,
    /// Letter keys of 4x4 keypads (A to D); ignored in PIN entry.
    Function(char),
}

impl Key {
    /// The key for a keypad legend character (`0`-`9`, `*`, `#`, `A`-`D`).
    pub fn from_legend(c: char) -> Option<Key> {
        Some(match c {
            '0'..='9' => Key::Digit(c as u8 - b'0'),
            '*' => Key::Clear,
            '#' => Key::Enter,
            'A'..='D' => Key::Function(c),
            _ => return None,
        })
    }
}

/// Keys print without their digit, so a debug log of key events cannot
/// spell out a PIN.
impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Digit(_) => f.write_str("Digit(*)"),
            Key::Clear => f.write_str("Clear"),
            Key::Enter => f.write_str("Enter"),
            Key::Function(c) => write!(f, "Function({c})"),
        }
    }
}
