//! A simulated keypad for demos and tests: keys arrive over a channel,
//! typed by a test or read from a terminal.

use std::io::BufRead;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use super::Key;

/// The receiving end, where the agent reads keys.
pub struct SimulatedKeypad {
    rx: Receiver<Key>,
}

/// The sending end, where a test or a terminal types.
#[derive(Clone)]
pub struct KeySender {
    tx: Sender<Key>,
}

/// A connected keypad and sender.
pub fn simulated() -> (KeySender, SimulatedKeypad) {
    let (tx, rx) = channel();
    (KeySender { tx }, SimulatedKeypad { rx })
}

impl KeySender {
    /// Presses one key. Returns false once the keypad is gone.
    pub fn press(&self, key: Key) -> bool {
        self.tx.send(key).is_ok()
    }

    /// Types keypad legends (`0`-`9`, `*`, `#`, `A`-`D`); other characters
    /// are skipped.
    pub fn type_legends(&self, s: &str) -> bool {
        s.chars().filter_map(Key::from_legend).all(|k| self.press(k))
    }
}

impl SimulatedKeypad {
    /// Waits up to `timeout` for the next key; `None` on timeout or when
    /// every sender is gone.
    pub fn next_key(&self, timeout: Duration) -> Option<Key> {
        match self.rx.recv_timeout(timeout) {
            Ok(k) => Some(k),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => None,
        }
    }
}

/// Feeds lines from `input` (a terminal) to the keypad: each legend
/// character is a key and the end of a line is Enter. Runs until the input
/// ends.
/// A line may be a PIN, so it is zeroized once its keys are sent.
pub fn feed_lines(input: impl BufRead, keys: &KeySender) {
    use zeroize::Zeroize;
    for line in input.lines() {
        let Ok(mut line) = line else { return };
        let sent = keys.type_legends(line.trim()) && keys.press(Key::Enter);
        line.zeroize();
        if !sent {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_become_keys_and_enter() {
        let (tx, kp) = simulated();
        feed_lines(&b"12 3\n*\n"[..], &tx);
        let got: Vec<Key> = std::iter::from_fn(|| kp.next_key(Duration::from_millis(10))).collect();
        assert_eq!(got, vec![Key::Digit(1), Key::Digit(2), Key::Digit(3), Key::Enter, Key::Clear, Key::Enter]);
    }
}
