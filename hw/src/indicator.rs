//! LEDs and a buzzer: what the person at the terminal sees and hears.
//!
//! A [`Pattern`] is a short timeline of [`Step`]s (pure data, testable). An
//! [`Indicator`] shows patterns: [`SimulatedIndicator`] records them (tests,
//! demos), and on a Pi the `gpio` feature drives real pins with rppal
//! ([`crate::gpio`]). Patterns differ in colour, rhythm and sound, so they
//! can be told apart in a dark room and by someone who cannot see the LEDs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the terminal is telling its user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Nothing to say: LEDs off.
    Idle,
    /// Card read; type the PIN (amber blink, one short beep).
    EnterPin,
    /// Talking to the card or the gateway (amber steady).
    Working,
    /// One PIN try left: be careful (red blink with the amber, two beeps).
    LastTry,
    /// Access granted (green steady, one long beep).
    Granted,
    /// Access denied (red, three short beeps).
    Denied,
    /// The card's PIN is blocked (red fast blink, long low beep).
    PinBlocked,
    /// The gateway cannot be reached: nothing will unlock (red slow blink).
    GatewayUnreachable,
    /// The card was enrolled; the terminal stays locked (green blinks
    /// three times with short beeps, then off).
    Enrolled,
    /// An application asks the operator at the terminal to prove again
    /// (card and PIN) before a risky action (green blinks twice with
    /// beeps, then amber steady).
    StepUp,
}

/// One step of a pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Green LED on.
    pub green: bool,
    /// Red LED on.
    pub red: bool,
    /// Buzzer on.
    pub buzzer: bool,
    /// How long this step lasts.
    pub duration: Duration,
}

fn step(green: bool, red: bool, buzzer: bool, ms: u64) -> Step {
    Step { green, red, buzzer, duration: Duration::from_millis(ms) }
}

impl Pattern {
    /// The steps; the last step holds until the next pattern.
    pub fn steps(self) -> Vec<Step> {
        // Amber is red and green together.
        match self {
            Pattern::Idle => vec![step(false, false, false, 0)],
            Pattern::EnterPin => vec![step(true, true, true, 80), step(true, true, false, 400), step(false, false, false, 400), step(true, true, false, 0)],
            Pattern::Working => vec![step(true, true, false, 0)],
            Pattern::LastTry => vec![step(false, true, true, 80), step(false, false, false, 80), step(false, true, true, 80), step(true, true, false, 0)],
            Pattern::Granted => vec![step(true, false, true, 400), step(true, false, false, 0)],
            Pattern::Denied => vec![
                step(false, true, true, 80),
                step(false, true, false, 80),
                step(false, true, true, 80),
                step(false, true, false, 80),
                step(false, true, true, 80),
                step(false, true, false, 1500),
                step(false, false, false, 0),
            ],
            Pattern::PinBlocked => vec![
                step(false, true, true, 1000),
                step(false, false, false, 100),
                step(false, true, false, 100),
                step(false, false, false, 100),
                step(false, true, false, 0),
            ],
            Pattern::GatewayUnreachable => vec![step(false, true, false, 500), step(false, false, false, 0)],
            Pattern::Enrolled => vec![
                step(true, false, true, 120),
                step(false, false, false, 120),
                step(true, false, true, 120),
                step(false, false, false, 120),
                step(true, false, true, 120),
                step(false, false, false, 0),
            ],
            Pattern::StepUp => vec![step(true, false, true, 80), step(false, false, false, 80), step(true, false, true, 80), step(true, true, false, 0)],
        }
    }
}

/// Something that shows patterns.
pub trait Indicator: Send {
    /// Shows `pattern`, replacing whatever was showing.
    fn show(&mut self, pattern: Pattern);
}

/// Records patterns instead of driving pins.
#[derive(Clone, Default)]
pub struct SimulatedIndicator {
    shown: Arc<Mutex<Vec<Pattern>>>,
}

impl SimulatedIndicator {
    /// Everything shown so far, in order.
    pub fn history(&self) -> Vec<Pattern> {
        self.shown.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Indicator for SimulatedIndicator {
    fn show(&mut self, pattern: Pattern) {
        if let Ok(mut v) = self.shown.lock() {
            v.push(pattern);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_are_distinguishable() {
        let all = [Pattern::EnterPin, Pattern::Working, Pattern::LastTry, Pattern::Granted, Pattern::Denied, Pattern::PinBlocked, Pattern::GatewayUnreachable];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert_ne!(a.steps(), b.steps(), "{a:?} and {b:?} look and sound the same");
            }
            assert!(!a.steps().is_empty());
        }
        // Granted and denied differ in colour, not only rhythm.
        assert!(Pattern::Granted.steps().iter().all(|s| !s.red));
        assert!(Pattern::Denied.steps().iter().all(|s| !s.green));
    }
}
