//! The seam between PIV logic and whatever carries APDUs.
//!
//! [`Transport`] sends one command APDU and returns one response APDU. The
//! PC/SC reader ([`crate::pcsc`]), the in-process virtual card
//! (`pivgate-vcard`) and scripted test cards implement it; the PIV client
//! knows nothing else about them. [`Clock`] passes time in, so time limits are
//! testable without sleeping.

use std::time::{Instant, SystemTime};

use crate::error::Result;

/// Carries APDUs to a card.
pub trait Transport {
    /// Sends one command APDU and returns the whole response APDU, status
    /// word included. Implementations bound the response size themselves.
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>>;

    /// Whether the card and reader take extended-length APDUs. The client
    /// then sends long commands whole instead of chaining them.
    fn supports_extended(&self) -> bool {
        false
    }

    /// The card's answer to reset, when the transport knows it: the card's
    /// kind (every YubiKey 5 NFC has the same one), never its identity.
    fn atr(&self) -> Option<&[u8]> {
        None
    }
}

impl<T: Transport + ?Sized> Transport for &mut T {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>> {
        (**self).transmit(command)
    }
    fn supports_extended(&self) -> bool {
        (**self).supports_extended()
    }
    fn atr(&self) -> Option<&[u8]> {
        (**self).atr()
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>> {
        (**self).transmit(command)
    }
    fn supports_extended(&self) -> bool {
        (**self).supports_extended()
    }
    fn atr(&self) -> Option<&[u8]> {
        (**self).atr()
    }
}

/// A source of time, passed in so time limits are testable without
/// sleeping.
pub trait Clock: Send + Sync {
    /// Now, monotonic: for time limits.
    fn now(&self) -> Instant;
    /// Now on the calendar: for comparing with times others wrote (a
    /// challenge's timestamp).
    fn wall(&self) -> SystemTime;
}

/// The operating system's monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}
