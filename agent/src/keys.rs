//! Where a terminal's keys come from: a GPIO keypad, the terminal, or a
//! test. Keys only; digits become a PIN in `hw::keypad::entry`.

use std::time::Duration;
#[cfg(feature = "gpio")]
use std::time::Instant;

use pivgate_hw::keypad::sim::SimulatedKeypad;
use pivgate_hw::keypad::Key;

/// A source of key presses.
pub trait KeySource: Send {
    /// The next key, waiting at most `timeout`.
    fn next_key(&mut self, timeout: Duration) -> Option<Key>;
    /// Drops keys typed before the prompt (typed ahead into nothing).
    fn drain(&mut self) {
        while self.next_key(Duration::ZERO).is_some() {}
    }
}

impl KeySource for SimulatedKeypad {
    fn next_key(&mut self, timeout: Duration) -> Option<Key> {
        SimulatedKeypad::next_key(self, timeout)
    }
}

/// A matrix keypad scanned every 5 ms while a PIN is asked for, and not
/// otherwise.
#[cfg(feature = "gpio")]
pub struct MatrixKeys<K>(pub K);

#[cfg(feature = "gpio")]
impl<O, I, const R: usize, const C: usize> KeySource for MatrixKeys<pivgate_hw::keypad::matrix::MatrixKeypad<O, I, R, C>>
where
    O: embedded_hal_alias::OutputPin + Send,
    I: embedded_hal_alias::InputPin + Send,
{
    fn next_key(&mut self, timeout: Duration) -> Option<Key> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.0.scan() {
                Ok(Some(k)) => return Some(k),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "keypad scan failed");
                    return None;
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(feature = "gpio")]
impl KeySource for pivgate_hw::gpio::WiegandKeypad {
    fn next_key(&mut self, timeout: Duration) -> Option<Key> {
        pivgate_hw::gpio::WiegandKeypad::next_key(self, timeout)
    }
}

/// A terminal without a keypad.
pub struct NoKeys;

impl KeySource for NoKeys {
    fn next_key(&mut self, timeout: Duration) -> Option<Key> {
        std::thread::sleep(timeout);
        None
    }
}

#[cfg(feature = "gpio")]
mod embedded_hal_alias {
    pub use pivgate_hw::embedded_hal::digital::{InputPin, OutputPin};
}
