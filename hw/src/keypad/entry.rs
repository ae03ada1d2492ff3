//! PIN entry as a state machine over keys and time (no I/O, no clock of its
//! own).
//!
//! Rules: digits only; Enter submits 6 to 8 digits; Enter with fewer is
//! refused and the digits are cleared; a ninth digit is refused (the keypad
//! should beep) and not stored; Clear erases what was typed, and Clear on an
//! empty entry cancels it; the entry times out when no key comes for
//! `idle_timeout` or when the whole entry takes longer than
//! `total_timeout`. The digits live in a zeroizing buffer and leave only as
//! a [`Pin`].

use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::Key;
use crate::pin::{Pin, MAX_PIN_LEN, MIN_PIN_LEN};

/// Time limits for one PIN entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRules {
    /// Longest wait between two keys.
    pub idle_timeout: Duration,
    /// Longest the whole entry may take.
    pub total_timeout: Duration,
}

impl Default for EntryRules {
    fn default() -> Self {
        EntryRules { idle_timeout: Duration::from_secs(10), total_timeout: Duration::from_secs(30) }
    }
}

/// What a key (or the passing of time) did to the entry. Equality compares
/// the kind of progress; two `Done` are equal whatever their PINs.
#[derive(Debug)]
pub enum Progress {
    /// A digit was taken; this many are entered.
    Digit(usize),
    /// The key was refused (too many digits, a letter key); nothing changed.
    Refused,
    /// Enter with fewer than six digits: the digits were cleared.
    TooShort,
    /// Clear erased the digits.
    Cleared,
    /// Clear on an empty entry: the person gave up.
    Cancelled,
    /// Nothing typed for too long, or the entry took too long.
    TimedOut,
    /// Enter with a valid PIN.
    Done(Pin),
}

impl PartialEq for Progress {
    fn eq(&self, other: &Self) -> bool {
        use Progress::*;
        match (self, other) {
            (Digit(a), Digit(b)) => a == b,
            (Done(_), Done(_)) => true,
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }
}

/// One PIN entry in progress.
pub struct PinEntry {
    rules: EntryRules,
    started: Instant,
    last_key: Instant,
    digits: Zeroizing<[u8; MAX_PIN_LEN]>,
    len: usize,
    finished: bool,
}

impl PinEntry {
    /// Starts an entry at `now`.
    pub fn new(rules: EntryRules, now: Instant) -> Self {
        PinEntry { rules, started: now, last_key: now, digits: Zeroizing::new([0; MAX_PIN_LEN]), len: 0, finished: false }
    }

    /// How many digits are entered (for the indicator, never the digits).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is entered.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// When [`PinEntry::poll`] should next be called to notice a timeout.
    pub fn deadline(&self) -> Instant {
        (self.last_key + self.rules.idle_timeout).min(self.started + self.rules.total_timeout)
    }

    fn clear(&mut self) {
        *self.digits = [0; MAX_PIN_LEN];
        self.len = 0;
    }

    /// Checks the time limits at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Progress> {
        if self.finished {
            return None;
        }
        if now >= self.deadline() {
            self.clear();
            self.finished = true;
            return Some(Progress::TimedOut);
        }
        None
    }

    /// Applies one key pressed at `now`.
    pub fn key(&mut self, key: Key, now: Instant) -> Progress {
        if self.finished {
            return Progress::Refused;
        }
        if let Some(p) = self.poll(now) {
            return p;
        }
        self.last_key = now;
        match key {
            Key::Digit(d) if d <= 9 => {
                if self.len == MAX_PIN_LEN {
                    return Progress::Refused;
                }
                self.digits[self.len] = b'0' + d;
                self.len += 1;
                Progress::Digit(self.len)
            }
            Key::Digit(_) | Key::Function(_) => Progress::Refused,
            Key::Clear if self.len == 0 => {
                self.finished = true;
                Progress::Cancelled
            }
            Key::Clear => {
                self.clear();
                Progress::Cleared
            }
            Key::Enter if self.len < MIN_PIN_LEN => {
                self.clear();
                Progress::TooShort
            }
            Key::Enter => match Pin::new(&self.digits[..self.len]) {
                Ok(pin) => {
                    self.clear();
                    self.finished = true;
                    Progress::Done(pin)
                }
                Err(_) => {
                    self.clear();
                    Progress::TooShort
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(keys: &str, entry: &mut PinEntry, t: &mut Instant) -> Vec<Progress> {
        keys.chars()
            .map(|c| {
                *t += Duration::from_millis(300);
                entry.key(Key::from_legend(c).unwrap(), *t)
            })
            .collect()
    }

    #[test]
    fn six_to_eight_digits_then_enter() {
        for pin in ["123456", "1234567", "12345678"] {
            let mut t = Instant::now();
            let mut e = PinEntry::new(EntryRules::default(), t);
            let out = typed(&format!("{pin}#"), &mut e, &mut t);
            match out.last().unwrap() {
                Progress::Done(p) => assert_eq!(&p.padded()[..pin.len()], pin.as_bytes()),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn short_entry_clear_cancel_and_ninth_digit() {
        let mut t = Instant::now();
        let mut e = PinEntry::new(EntryRules::default(), t);
        let out = typed("12345#", &mut e, &mut t);
        assert_eq!(out.last().unwrap(), &Progress::TooShort);
        assert!(e.is_empty());
        let out = typed("123456789", &mut e, &mut t);
        assert_eq!(out.last().unwrap(), &Progress::Refused);
        assert_eq!(e.len(), 8);
        assert_eq!(typed("*", &mut e, &mut t), vec![Progress::Cleared]);
        assert_eq!(typed("A", &mut e, &mut t), vec![Progress::Refused]);
        assert_eq!(typed("*", &mut e, &mut t), vec![Progress::Cancelled]);
        assert_eq!(typed("1", &mut e, &mut t), vec![Progress::Refused], "a finished entry takes no more keys");
    }

    #[test]
    fn idle_and_total_timeouts() {
        let rules = EntryRules { idle_timeout: Duration::from_secs(5), total_timeout: Duration::from_secs(14) };
        let t0 = Instant::now();
        let mut e = PinEntry::new(rules, t0);
        assert_eq!(e.key(Key::Digit(1), t0 + Duration::from_secs(4)), Progress::Digit(1));
        assert_eq!(e.poll(t0 + Duration::from_secs(8)), None);
        assert_eq!(e.poll(t0 + Duration::from_secs(9)), Some(Progress::TimedOut));
        assert!(e.is_empty());

        let mut e = PinEntry::new(rules, t0);
        let mut t = t0;
        for _ in 0..3 {
            t += Duration::from_secs(4);
            assert!(matches!(e.key(Key::Digit(2), t), Progress::Digit(_)));
        }
        assert_eq!(e.key(Key::Digit(2), t0 + Duration::from_secs(14)), Progress::TimedOut);
    }
}
