//! Real pins on a Raspberry Pi, through rppal (feature `gpio`).
//!
//! Builds on any Linux; opening pins works only where `/dev/gpiomem` is.
//! Pin numbers are BCM GPIO numbers.

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rppal::gpio::{Gpio, InputPin, OutputPin, Trigger};

use crate::error::{Error, Result};
use crate::indicator::{Indicator, Pattern};
use crate::keypad::matrix::{MatrixKeypad, LAYOUT_3X4, LAYOUT_4X4};
use crate::keypad::wiegand::{decode_key, Line, WiegandDecoder};
use crate::keypad::Key;

fn gpio_err(e: rppal::gpio::Error) -> Error {
    Error::Gpio(e.to_string())
}

fn outputs<const N: usize>(gpio: &Gpio, pins: [u8; N]) -> Result<[OutputPin; N]> {
    let v: Vec<OutputPin> = pins.iter().map(|&p| gpio.get(p).map(|p| p.into_output_high())).collect::<std::result::Result<_, _>>().map_err(gpio_err)?;
    v.try_into().map_err(|_| Error::Gpio("pin count".into()))
}

fn inputs<const N: usize>(gpio: &Gpio, pins: [u8; N]) -> Result<[InputPin; N]> {
    let v: Vec<InputPin> = pins.iter().map(|&p| gpio.get(p).map(|p| p.into_input_pullup())).collect::<std::result::Result<_, _>>().map_err(gpio_err)?;
    v.try_into().map_err(|_| Error::Gpio("pin count".into()))
}

/// A 3x4 matrix keypad on the given row and column pins.
pub fn matrix_3x4(rows: [u8; 4], cols: [u8; 3], debounce: u8) -> Result<MatrixKeypad<OutputPin, InputPin, 4, 3>> {
    let gpio = Gpio::new().map_err(gpio_err)?;
    MatrixKeypad::new(outputs(&gpio, rows)?, inputs(&gpio, cols)?, LAYOUT_3X4, debounce)
}

/// A 4x4 matrix keypad on the given row and column pins.
pub fn matrix_4x4(rows: [u8; 4], cols: [u8; 4], debounce: u8) -> Result<MatrixKeypad<OutputPin, InputPin, 4, 4>> {
    let gpio = Gpio::new().map_err(gpio_err)?;
    MatrixKeypad::new(outputs(&gpio, rows)?, inputs(&gpio, cols)?, LAYOUT_4X4, debounce)
}

/// The decoder and the (Instant, kernel timestamp) pair that anchors
/// kernel timestamps to instants.
type Anchored = (WiegandDecoder, Option<(Instant, Duration)>);

/// A Wiegand keypad on D0 and D1: falling edges arrive as interrupts with
/// kernel timestamps and are decoded into keys.
pub struct WiegandKeypad {
    _d0: InputPin,
    _d1: InputPin,
    decoder: Arc<Mutex<Anchored>>,
    keys: std::sync::mpsc::Receiver<Key>,
}

impl WiegandKeypad {
    /// Opens D0 and D1 (BCM numbers) with pull-ups.
    pub fn open(d0: u8, d1: u8) -> Result<WiegandKeypad> {
        let gpio = Gpio::new().map_err(gpio_err)?;
        let decoder = Arc::new(Mutex::new((WiegandDecoder::default(), None)));
        let (tx, keys) = channel();
        let mut pins = Vec::new();
        for (pin, line) in [(d0, Line::D0), (d1, Line::D1)] {
            let mut p = gpio.get(pin).map_err(gpio_err)?.into_input_pullup();
            let dec = decoder.clone();
            let tx = tx.clone();
            p.set_async_interrupt(Trigger::FallingEdge, None, move |ev| {
                let Ok(mut g) = dec.lock() else { return };
                // Kernel timestamps are durations since boot; anchor the
                // first one to an Instant, only differences matter.
                let anchor = *g.1.get_or_insert((Instant::now(), ev.timestamp));
                let at = anchor.0 + ev.timestamp.saturating_sub(anchor.1);
                if let Some(Ok(frame)) = g.0.pulse(line, at) {
                    if let Ok(k) = decode_key(frame) {
                        let _ = tx.send(k);
                    }
                }
            })
            .map_err(gpio_err)?;
            pins.push(p);
        }
        let d1p = pins.pop().ok_or(Error::Gpio("D1".into()))?;
        let d0p = pins.pop().ok_or(Error::Gpio("D0".into()))?;
        Ok(WiegandKeypad { _d0: d0p, _d1: d1p, decoder, keys })
    }

    /// Waits up to `timeout` for the next key. The last key of a burst is
    /// complete once the line has been idle for the frame gap.
    pub fn next_key(&self, timeout: Duration) -> Option<Key> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(k) = self.keys.try_recv() {
                return Some(k);
            }
            if let Ok(mut g) = self.decoder.lock() {
                let now = g.1.map(|(i, _)| i).map(|_| Instant::now());
                if let Some(Ok(frame)) = now.and_then(|n| g.0.poll(n)) {
                    if let Ok(k) = decode_key(frame) {
                        return Some(k);
                    }
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// LEDs and a buzzer on GPIO, played by a thread of their own.
pub struct GpioIndicator {
    tx: Sender<Pattern>,
}

impl GpioIndicator {
    /// Opens the green LED, red LED and buzzer pins (BCM numbers).
    pub fn open(green: u8, red: u8, buzzer: u8) -> Result<GpioIndicator> {
        let gpio = Gpio::new().map_err(gpio_err)?;
        let [mut g, mut r, mut b] = outputs(&gpio, [green, red, buzzer])?;
        for p in [&mut g, &mut r, &mut b] {
            p.set_low();
        }
        let (tx, rx) = channel::<Pattern>();
        std::thread::Builder::new().name("indicator".into()).spawn(move || {
            let mut current = Pattern::Idle;
            loop {
                for step in current.steps() {
                    g.write(step.green.into());
                    r.write(step.red.into());
                    b.write(step.buzzer.into());
                    // A zero-length step holds until the next pattern.
                    let next = if step.duration.is_zero() { rx.recv().map_err(|_| RecvTimeoutError::Disconnected) } else { rx.recv_timeout(step.duration) };
                    match next {
                        Ok(p) => {
                            current = p;
                            break;
                        }
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            }
        })?;
        Ok(GpioIndicator { tx })
    }
}

impl Indicator for GpioIndicator {
    fn show(&mut self, pattern: Pattern) {
        let _ = self.tx.send(pattern);
    }
}
