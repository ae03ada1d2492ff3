//! Matrix keypads (3x4 and 4x4), scanned over embedded-hal 1.0 pins.
//!
//! Rows are outputs held high; columns are inputs with pull-ups. A scan
//! drives one row low at a time and reads which columns follow it low. A key
//! counts as pressed once it has read the same for `debounce` consecutive
//! scans, and is reported once per press. Two keys down at once (or a
//! ghost) read as nothing, so a palm on the keypad types no digit.
//!
//! The scanner does not own a timer: the caller calls [`MatrixKeypad::scan`]
//! every few milliseconds while a PIN is being entered, and not otherwise.

use embedded_hal::digital::{InputPin, OutputPin};

use super::Key;
use crate::error::{Error, Result};

/// Layout of the common 3x4 telephone keypad.
pub const LAYOUT_3X4: [[char; 3]; 4] = [['1', '2', '3'], ['4', '5', '6'], ['7', '8', '9'], ['*', '0', '#']];
/// Layout of the common 4x4 keypad.
pub const LAYOUT_4X4: [[char; 4]; 4] = [['1', '2', '3', 'A'], ['4', '5', '6', 'B'], ['7', '8', '9', 'C'], ['*', '0', '#', 'D']];

/// A matrix keypad with `R` rows and `C` columns.
pub struct MatrixKeypad<O, I, const R: usize, const C: usize> {
    rows: [O; R],
    cols: [I; C],
    layout: [[char; C]; R],
    debounce: u8,
    candidate: Option<(usize, usize)>,
    stable_for: u8,
    reported: Option<(usize, usize)>,
}

fn gpio<E: core::fmt::Debug>(e: E) -> Error {
    Error::Gpio(format!("{e:?}"))
}

impl<O: OutputPin, I: InputPin, const R: usize, const C: usize> MatrixKeypad<O, I, R, C> {
    /// A keypad over the given pins. Rows are driven high at once.
    /// `debounce` is the number of identical scans that make a press
    /// (at a 5 ms scan interval, 4 gives 20 ms).
    pub fn new(mut rows: [O; R], cols: [I; C], layout: [[char; C]; R], debounce: u8) -> Result<Self> {
        for r in rows.iter_mut() {
            r.set_high().map_err(gpio)?;
        }
        Ok(MatrixKeypad { rows, cols, layout, debounce: debounce.max(1), candidate: None, stable_for: 0, reported: None })
    }

    /// Reads the matrix once, without debounce: the single key down, if
    /// exactly one is.
    fn read_raw(&mut self) -> Result<Option<(usize, usize)>> {
        let mut found = None;
        let mut count = 0;
        for r in 0..R {
            self.rows[r].set_low().map_err(gpio)?;
            for c in 0..C {
                if self.cols[c].is_low().map_err(gpio)? {
                    found = Some((r, c));
                    count += 1;
                }
            }
            self.rows[r].set_high().map_err(gpio)?;
        }
        Ok(if count == 1 { found } else { None })
    }

    /// One scan. Returns a key when a press has just become stable.
    pub fn scan(&mut self) -> Result<Option<Key>> {
        let raw = self.read_raw()?;
        if raw == self.candidate {
            self.stable_for = self.stable_for.saturating_add(1);
        } else {
            self.candidate = raw;
            self.stable_for = 1;
        }
        if self.stable_for >= self.debounce && self.candidate != self.reported {
            self.reported = self.candidate;
            if let Some((r, c)) = self.candidate {
                return Ok(Key::from_legend(self.layout[r][c]));
            }
        }
        Ok(None)
    }

    /// The pins back.
    pub fn release(self) -> ([O; R], [I; C]) {
        (self.rows, self.cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use embedded_hal_mock::eh1::digital::{Mock, State, Transaction as T};

    /// Builds per-pin expectations for a 3x4 keypad across scans in which
    /// `pressed[i]` is the key held during scan i (or bouncing contacts).
    fn expectations(pressed: &[Option<(usize, usize)>]) -> ([Vec<T>; 4], [Vec<T>; 3]) {
        let mut rows: [Vec<T>; 4] = Default::default();
        let mut cols: [Vec<T>; 3] = Default::default();
        for r in rows.iter_mut() {
            r.push(T::set(State::High));
        }
        for p in pressed {
            for (r, row) in rows.iter_mut().enumerate() {
                row.push(T::set(State::Low));
                for (c, col) in cols.iter_mut().enumerate() {
                    let low = *p == Some((r, c));
                    col.push(T::get(if low { State::Low } else { State::High }));
                }
                row.push(T::set(State::High));
            }
        }
        (rows, cols)
    }

    fn run(pressed: &[Option<(usize, usize)>], debounce: u8) -> Vec<Key> {
        let (re, ce) = expectations(pressed);
        let rows = re.map(|e| Mock::new(&e));
        let cols = ce.map(|e| Mock::new(&e));
        let mut kp = MatrixKeypad::new(rows, cols, LAYOUT_3X4, debounce).unwrap();
        let mut keys = vec![];
        for _ in pressed {
            if let Some(k) = kp.scan().unwrap() {
                keys.push(k);
            }
        }
        let (rows, cols) = kp.release();
        for mut p in rows {
            p.done();
        }
        for mut p in cols {
            p.done();
        }
        keys
    }

    #[test]
    fn a_held_key_is_reported_once_after_debounce() {
        let five = Some((1, 1));
        let keys = run(&[None, five, five, five, five, five, None, None, None], 3);
        assert_eq!(keys, vec![Key::Digit(5)]);
    }

    #[test]
    fn bounces_shorter_than_debounce_are_ignored() {
        let one = Some((0, 0));
        let keys = run(&[one, None, one, None, one, one, None], 3);
        assert_eq!(keys, vec![]);
    }

    #[test]
    fn repeated_presses_and_special_keys() {
        let star = Some((3, 0));
        let zero = Some((3, 1));
        let hash = Some((3, 2));
        let keys = run(&[zero, zero, None, None, zero, zero, None, None, star, star, None, None, hash, hash], 2);
        assert_eq!(keys, vec![Key::Digit(0), Key::Digit(0), Key::Clear, Key::Enter]);
    }
}
