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

/// Feeds lines from `input` to the keypad: each legend character is a key
/// and the end of a line is Enter. Runs until the input ends. A line may be
/// a PIN, so it is zeroized once its keys are sent. For the process's own
/// terminal use [`feed_terminal`]: a `BufRead` keeps its own copy of what
/// was typed.
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

/// Feeds what is typed at this process's terminal (standard input) to the
/// keypad, like [`feed_lines`], read through [`QuietLines`]: not echoed,
/// and never in a buffer that outlives its line.
pub fn feed_terminal(keys: &KeySender) {
    let mut lines = QuietLines::stdin();
    while let Some(line) = lines.next_line() {
        if !(keys.type_legends(line.trim()) && keys.press(Key::Enter)) {
            return;
        }
    }
}

/// Lines typed on standard input, for a PIN typed at a keyboard (demos, a
/// terminal keypad). When standard input is a terminal, echo is off while
/// this lives, so a PIN never appears on the screen (restored on drop). Bytes
/// are read one at a time straight from the descriptor, with no buffer but
/// the line's own, which is zeroized when dropped.
pub struct QuietLines {
    restore: Option<rustix::termios::Termios>,
}

impl QuietLines {
    /// Standard input, with echo off if it is a terminal.
    pub fn stdin() -> QuietLines {
        let fd = rustix::stdio::stdin();
        let restore = if rustix::termios::isatty(fd) {
            rustix::termios::tcgetattr(fd).ok().inspect(|t| {
                let mut quiet = t.clone();
                quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
                // Keep the newline visible, so the next prompt starts on a
                // line of its own.
                quiet.local_modes.insert(rustix::termios::LocalModes::ECHONL);
                let _ = rustix::termios::tcsetattr(fd, rustix::termios::OptionalActions::Now, &quiet);
            })
        } else {
            None
        };
        QuietLines { restore }
    }

    /// The next line without its newline, or `None` at the end of input.
    /// Lines longer than 256 bytes are cut there (no PIN is that long).
    pub fn next_line(&mut self) -> Option<zeroize::Zeroizing<String>> {
        let mut line = zeroize::Zeroizing::new(Vec::with_capacity(64));
        let mut byte = [0u8; 1];
        loop {
            match rustix::io::read(rustix::stdio::stdin(), &mut byte) {
                Ok(0) if line.is_empty() => return None,
                Ok(0) => break,
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if line.len() < 256 => line.push(byte[0]),
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(_) => return None,
            }
        }
        zeroize::Zeroize::zeroize(&mut byte);
        // Move the bytes into the string rather than copy them.
        Some(zeroize::Zeroizing::new(match String::from_utf8(std::mem::take(&mut *line)) {
            Ok(s) => s,
            Err(e) => {
                // Not UTF-8: no PIN; the raw bytes are zeroized on drop.
                let raw = zeroize::Zeroizing::new(e.into_bytes());
                String::from_utf8_lossy(&raw).into_owned()
            }
        }))
    }
}

impl Drop for QuietLines {
    fn drop(&mut self) {
        if let Some(t) = &self.restore {
            let _ = rustix::termios::tcsetattr(rustix::stdio::stdin(), rustix::termios::OptionalActions::Now, t);
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
