//! Wiegand keypads, decoded from edge timestamps.
//!
//! A Wiegand keypad sends each key as a burst of pulses: a pulse on D0 is a
//! 0 bit, on D1 a 1 bit, about 2 ms apart. A burst ends when the lines stay
//! idle longer than the frame gap (25 ms here). Keypads send 4 bits per key
//! (the key value, 10 for `*`/ESC and 11 for `#`/ENT) or 8 bits (the
//! complement of the value in the high nibble, then the value). The decoder
//! takes falling edges with their times, so it runs the same on a Pi's GPIO
//! interrupts and in tests.

use std::time::{Duration, Instant};

use super::Key;
use crate::error::{Error, Result};

/// Which data line pulsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line {
    /// D0: a 0 bit.
    D0,
    /// D1: a 1 bit.
    D1,
}

/// A complete burst of bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The bits, first received in the most significant position.
    pub bits: u64,
    /// How many bits.
    pub len: u8,
}

/// Assembles pulses into frames.
#[derive(Debug)]
pub struct WiegandDecoder {
    gap: Duration,
    bits: u64,
    len: u8,
    overflow: bool,
    last: Option<Instant>,
}

/// Most bits in a frame; longer bursts are noise.
const MAX_BITS: u8 = 64;

impl Default for WiegandDecoder {
    fn default() -> Self {
        WiegandDecoder::new(Duration::from_millis(25))
    }
}

impl WiegandDecoder {
    /// A decoder that ends a frame after `gap` of silence.
    pub fn new(gap: Duration) -> Self {
        WiegandDecoder { gap, bits: 0, len: 0, overflow: false, last: None }
    }

    /// Feeds one pulse (the falling edge of D0 or D1) at time `at`. If the
    /// pulse comes after a gap, the previous frame is complete and returned.
    pub fn pulse(&mut self, line: Line, at: Instant) -> Option<Result<Frame>> {
        let done = self.poll(at);
        if self.len >= MAX_BITS {
            self.overflow = true;
        } else {
            self.bits = (self.bits << 1) | u64::from(line == Line::D1);
            self.len += 1;
        }
        self.last = Some(at);
        done
    }

    /// Completes the current frame if the line has been idle past the gap.
    pub fn poll(&mut self, now: Instant) -> Option<Result<Frame>> {
        let last = self.last?;
        if now.saturating_duration_since(last) <= self.gap {
            return None;
        }
        let frame = Frame { bits: self.bits, len: self.len };
        let overflow = self.overflow;
        self.bits = 0;
        self.len = 0;
        self.overflow = false;
        self.last = None;
        Some(if overflow { Err(Error::Wiegand("burst longer than 64 bits")) } else { Ok(frame) })
    }
}

/// Decodes a keypad frame into a key.
pub fn decode_key(frame: Frame) -> Result<Key> {
    let value = match frame.len {
        4 => (frame.bits & 0x0F) as u8,
        8 => {
            let hi = ((frame.bits >> 4) & 0x0F) as u8;
            let lo = (frame.bits & 0x0F) as u8;
            if hi != !lo & 0x0F {
                return Err(Error::Wiegand("8-bit key with a bad check nibble"));
            }
            lo
        }
        26 | 34 | 37 => return Err(Error::Wiegand("card number frame, not a key")),
        _ => return Err(Error::Wiegand("frame length is not a keypad key")),
    };
    match value {
        0..=9 => Ok(Key::Digit(value)),
        10 => Ok(Key::Clear),
        11 => Ok(Key::Enter),
        _ => Err(Error::Wiegand("key value outside 0 to 11")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pulses for `bits` (MSB first) starting at `t`, 2 ms apart.
    fn burst(d: &mut WiegandDecoder, t: &mut Instant, value: u64, len: u8) -> Vec<Result<Frame>> {
        let mut out = vec![];
        for i in (0..len).rev() {
            let line = if i < 64 && (value >> i) & 1 == 1 { Line::D1 } else { Line::D0 };
            out.extend(d.pulse(line, *t));
            *t += Duration::from_millis(2);
        }
        *t += Duration::from_millis(40);
        out
    }

    #[test]
    fn decodes_four_bit_keys() {
        let mut d = WiegandDecoder::default();
        let mut t = Instant::now();
        let mut keys = vec![];
        for v in [1u64, 2, 3, 10, 11] {
            keys.extend(burst(&mut d, &mut t, v, 4));
        }
        keys.extend(d.poll(t));
        let keys: Vec<Key> = keys.into_iter().map(|f| decode_key(f.unwrap()).unwrap()).collect();
        assert_eq!(keys, vec![Key::Digit(1), Key::Digit(2), Key::Digit(3), Key::Clear, Key::Enter]);
    }

    #[test]
    fn decodes_eight_bit_keys_and_checks_the_nibble() {
        let mut d = WiegandDecoder::default();
        let mut t = Instant::now();
        let mut frames = burst(&mut d, &mut t, 0xF0, 8); // key 0: F0
        frames.extend(burst(&mut d, &mut t, 0x87, 8)); // key 7: 87
        frames.extend(burst(&mut d, &mut t, 0x77, 8)); // bad check
        frames.extend(d.poll(t));
        let r: Vec<_> = frames.into_iter().map(|f| decode_key(f.unwrap())).collect();
        assert_eq!(r[0].as_ref().unwrap(), &Key::Digit(0));
        assert_eq!(r[1].as_ref().unwrap(), &Key::Digit(7));
        assert!(r[2].is_err());
    }

    #[test]
    fn card_frames_and_noise_are_errors() {
        let mut d = WiegandDecoder::default();
        let mut t = Instant::now();
        let mut frames = burst(&mut d, &mut t, 0x2AA_AAAA, 26);
        frames.extend(burst(&mut d, &mut t, 0, 3));
        frames.extend(burst(&mut d, &mut t, 0, 70));
        frames.extend(d.poll(t));
        assert!(matches!(&frames[0], Ok(f) if decode_key(*f).is_err()));
        assert!(matches!(&frames[1], Ok(f) if decode_key(*f).is_err()));
        assert!(frames[2].is_err(), "a 70-bit burst overflows");
    }

    #[test]
    fn a_frame_waits_for_the_gap() {
        let mut d = WiegandDecoder::default();
        let t = Instant::now();
        assert!(d.pulse(Line::D1, t).is_none());
        assert!(d.poll(t + Duration::from_millis(10)).is_none());
        assert_eq!(d.poll(t + Duration::from_millis(30)).unwrap().unwrap(), Frame { bits: 1, len: 1 });
        assert!(d.poll(t + Duration::from_millis(60)).is_none());
    }
}
