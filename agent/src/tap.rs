//! The badge tap, as one flow that everyone drives: the agent's terminal
//! worker, the scenario tests, the demo and the benchmarks.
//!
//! ```text
//! identify ─ SELECT, CHUID
//! begin    ─ BeginAuthentication; the certificate once, when asked
//! sign     ─ the message checked (challenge::digest_to_sign) before the
//!            PIN is even asked for; PIN with tries, last-try warning, no
//!            VERIFY to a blocked card; GENERAL AUTHENTICATE
//! complete ─ CompleteAuthentication
//! always   ─ the card's PIN state reset, whatever happened
//! ```
//!
//! [`Tap`] is generic over the card transport (any [`Transport`] under a
//! [`PivClient`]), the [`Gateway`] (domain types here; the gRPC conversion
//! is in [`crate::link`]), where the PIN comes from ([`PinWay`]), what is
//! around the reader ([`Surroundings`]: indicators, the card leaving) and
//! a [`Clock`]. It does no I/O of its own, so the unit tests below run
//! whole taps against the in-process virtual card and a scripted gateway
//! in virtual time.
//!
//! Every step returns either its value or the tap's final [`TapResult`],
//! so a card pulled, a gateway gone or a denial ends the tap at once, with
//! one result.

use std::future::Future;
use std::time::{Duration, Instant};

use pivgate_hw::indicator::Pattern;
use pivgate_hw::keypad::entry::{EntryRules, PinEntry, Progress};
use pivgate_hw::piv::{Algorithm, Chuid, Fascn, PinStatus, PivClient, Slot};
use pivgate_hw::{Clock, Pin, Transport};

use crate::challenge::{self, Expected, Refused};
use crate::keys::KeySource;

/// The contract's words for a denial and a mechanism: plain enums of the
/// gRPC contract, not messages.
pub use pivgate_proto::v1::{DenyReason, Mechanism};

/// What an agent asks the gateway to begin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginRequest {
    /// The terminal.
    pub terminal: String,
    /// The card (CHUID GUID).
    pub card_uuid: [u8; 16],
    /// The CHUID's FASC-N, when the card has one.
    pub fascn: Option<Fascn>,
    /// The certificate, when the gateway asked for it.
    pub certificate: Option<Vec<u8>>,
    /// A mechanism the terminal asks for (card-only readers); the policy
    /// decides otherwise.
    pub requested: Option<Mechanism>,
}

/// A challenge for the card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The gateway's id, sent back with the signature.
    pub id: Vec<u8>,
    /// The whole message the card signs (a hash of it).
    pub message: Vec<u8>,
    /// The key to sign with.
    pub slot: Slot,
    /// Its algorithm.
    pub algorithm: Algorithm,
    /// Whether the card needs the PIN first.
    pub pin_required: bool,
    /// How long the challenge lives.
    pub expires_in: Duration,
}

/// The gateway's answer to a begin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    /// Sign this.
    Challenge(Challenge),
    /// Send the certificate of this slot first.
    CertificateNeeded(Slot),
    /// No.
    Denied(DenyReason),
}

/// What an agent sends to complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompleteRequest {
    /// The challenge's id.
    pub challenge_id: Vec<u8>,
    /// The terminal.
    pub terminal: String,
    /// The card's signature.
    pub signature: Vec<u8>,
}

/// An unlock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The operator.
    pub operator_id: String,
    /// Their display name.
    pub operator_name: String,
    /// Their roles.
    pub roles: Vec<String>,
    /// The unlock event's sequence number.
    pub sequence: u64,
}

/// The gateway's answer to a completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completed {
    /// Unlocked.
    Granted(Grant),
    /// No.
    Denied(DenyReason),
}

/// Why a gateway call gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// Network, TLS or timeout: nothing unlocks, the indicators say so.
    #[error("gateway unreachable: {0}")]
    Unreachable(String),
    /// The gateway refused the call itself (not a denial).
    #[error("gateway: {0}")]
    Refused(String),
    /// An answer this agent cannot use (an unknown key slot or algorithm,
    /// an empty answer): never guessed at.
    #[error("unusable answer from the gateway: {0}")]
    Malformed(String),
}

/// The gateway, as a tap sees it.
pub trait Gateway {
    /// This agent's name as the gateway knows it (from its certificate):
    /// every challenge must name it.
    fn agent_name(&self) -> &str;
    /// How far a challenge's time may be from this agent's clock.
    fn max_clock_skew(&self) -> Duration;
    /// BeginAuthentication.
    fn begin(&mut self, req: BeginRequest) -> impl Future<Output = Result<Begun, GatewayError>> + Send;
    /// CompleteAuthentication.
    fn complete(&mut self, req: CompleteRequest) -> impl Future<Output = Result<Completed, GatewayError>> + Send;
}

/// What is around the reader: the indicators, and whether the card is
/// still there while the operator types.
pub trait Surroundings {
    /// Shows a pattern on the LEDs and buzzer.
    fn show(&mut self, pattern: Pattern);
    /// The card in the reader has been read.
    fn identified(&mut self, _card: [u8; 16]) {}
    /// Whether the card (or its reader) left; polled during PIN entry.
    fn card_gone(&mut self) -> bool {
        false
    }
}

/// Surroundings with nothing in them (tests, benchmarks).
#[derive(Debug, Default)]
pub struct Nothing;

impl Surroundings for Nothing {
    fn show(&mut self, _: Pattern) {}
}

/// How the PIN reaches the card.
pub enum PinWay<'a, T> {
    /// Keys from a keypad, checked by the entry rules, sent with VERIFY.
    Keys {
        /// The keys.
        keys: &'a mut dyn KeySource,
        /// Time limits of one entry.
        rules: EntryRules,
    },
    /// The reader's own PIN pad (secure PIN entry): the PIN never leaves
    /// the reader. Called with the transport to send the reader's VERIFY.
    Pad(&'a mut (dyn FnMut(&T) -> pivgate_hw::Result<()> + Send)),
}

/// The outcome of one tap, for the indicators, the log and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapResult {
    /// Unlocked.
    Granted(Grant),
    /// Refused by the gateway.
    Denied(DenyReason),
    /// The agent refused to let the card sign what the gateway sent.
    Refused(Refused),
    /// The PIN was wrong and the operator gave up or ran out of time.
    WrongPin {
        /// Tries left.
        tries: u8,
    },
    /// The card's PIN is blocked.
    PinBlocked,
    /// No PIN typed in time, or cancelled.
    NoPin,
    /// The card left during the tap.
    CardRemoved,
    /// The gateway could not be reached.
    GatewayUnreachable,
    /// The gateway refused the call or answered something unusable.
    GatewayError(String),
    /// The card or reader failed.
    CardError(String),
}

impl From<pivgate_hw::Error> for TapResult {
    fn from(e: pivgate_hw::Error) -> Self {
        match e {
            pivgate_hw::Error::CardRemoved | pivgate_hw::Error::ReaderUnavailable => TapResult::CardRemoved,
            pivgate_hw::Error::PinBlocked => TapResult::PinBlocked,
            e => TapResult::CardError(e.to_string()),
        }
    }
}

impl From<GatewayError> for TapResult {
    fn from(e: GatewayError) -> Self {
        match e {
            GatewayError::Unreachable(_) => TapResult::GatewayUnreachable,
            e => TapResult::GatewayError(e.to_string()),
        }
    }
}

/// A tap's result, with what the shell needs after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// What happened.
    pub result: TapResult,
    /// The card, once read.
    pub card: Option<[u8; 16]>,
    /// Whether the card's PIN state is known clear: nothing was verified,
    /// or the card confirmed the reset (else the shell resets the card).
    pub pin_reset: bool,
}

/// Each step gives its value or ends the tap with a result.
pub type Step<T> = Result<T, TapResult>;

/// One badge tap at one terminal.
pub struct Tap<'a, T, G, C: ?Sized, S: ?Sized> {
    /// The terminal.
    pub terminal: &'a str,
    /// A mechanism this terminal asks for (card-only readers).
    pub requested: Option<Mechanism>,
    /// The gateway.
    pub gateway: &'a mut G,
    /// Where the PIN comes from.
    pub pin: PinWay<'a, T>,
    /// Indicators and the card leaving.
    pub around: &'a mut S,
    /// Time.
    pub clock: &'a C,
}

enum PinRead {
    Pin(Pin),
    Gave(TapResult),
}

impl<T: Transport, G: Gateway, C: Clock + ?Sized, S: Surroundings + ?Sized> Tap<'_, T, G, C, S> {
    /// The whole tap. The PIN state is reset at the end whatever happened,
    /// so the next person gets no verified PIN.
    ///
    /// A tap whose challenge never asked for the PIN (card only, a denial
    /// at begin, a gateway out of reach) sent no VERIFY, so there is nothing
    /// to clear and no reset is sent: a known card-only tap is three APDUs
    /// (SELECT, CHUID, GENERAL AUTHENTICATE).
    pub async fn run(&mut self, piv: &mut PivClient<T>) -> Outcome {
        let (mut card, mut pin_asked) = (None, false);
        let result = match self.steps(piv, &mut card, &mut pin_asked).await {
            Ok(grant) => TapResult::Granted(grant),
            Err(r) => r,
        };
        let pin_reset = !pin_asked || piv.reset_pin_state().unwrap_or(false);
        Outcome { result, card, pin_reset }
    }

    async fn steps(&mut self, piv: &mut PivClient<T>, card: &mut Option<[u8; 16]>, pin_asked: &mut bool) -> Step<Grant> {
        let chuid = self.identify(piv)?;
        *card = Some(chuid.guid);
        let challenge = self.begin(piv, &chuid).await?;
        // From here the card may hold a verified PIN: it is reset at the end.
        *pin_asked = challenge.pin_required;
        let signature = self.sign(piv, &chuid, &challenge)?;
        match self.complete(&challenge, signature).await? {
            Completed::Granted(g) => Ok(g),
            Completed::Denied(d) => Err(TapResult::Denied(d)),
        }
    }

    /// SELECT and CHUID.
    pub fn identify(&mut self, piv: &mut PivClient<T>) -> Step<Chuid> {
        self.around.show(Pattern::Working);
        piv.select()?;
        let chuid = piv.read_chuid()?;
        self.around.identified(chuid.guid);
        Ok(chuid)
    }

    /// BeginAuthentication, sending the certificate of the slot the gateway
    /// names, once.
    pub async fn begin(&mut self, piv: &mut PivClient<T>, chuid: &Chuid) -> Step<Challenge> {
        let mut req =
            BeginRequest { terminal: self.terminal.to_string(), card_uuid: chuid.guid, fascn: chuid.fascn, certificate: None, requested: self.requested };
        loop {
            match self.gateway.begin(req.clone()).await? {
                Begun::Challenge(c) => return Ok(c),
                Begun::Denied(d) => return Err(TapResult::Denied(d)),
                Begun::CertificateNeeded(slot) if req.certificate.is_none() => req.certificate = Some(piv.read_certificate(slot)?),
                Begun::CertificateNeeded(_) => return Err(GatewayError::Malformed("the certificate was asked for twice".into()).into()),
            }
        }
    }

    /// Checks the challenge is this tap's, gets the PIN to the card when the
    /// challenge needs it, and has the card sign.
    pub fn sign(&mut self, piv: &mut PivClient<T>, chuid: &Chuid, challenge: &Challenge) -> Step<Vec<u8>> {
        // The card signs only a pivgate message for this very tap; checked
        // before the PIN is even asked for.
        let expected = Expected {
            agent: self.gateway.agent_name(),
            terminal: self.terminal,
            card_uuid: chuid.guid,
            now: self.clock.wall(),
            max_skew: self.gateway.max_clock_skew(),
        };
        let digest = match challenge::digest_to_sign(&challenge.message, challenge.slot, challenge.algorithm, &expected) {
            Ok(d) => d,
            Err(why) => {
                tracing::error!(terminal = %self.terminal, reason = %why, "the gateway asked the card to sign something that is not this tap's challenge; refused");
                return Err(TapResult::Refused(why));
            }
        };
        if challenge.pin_required != (challenge.slot == Slot::Authentication) {
            tracing::error!(terminal = %self.terminal, "the challenge's PIN requirement does not match its key slot; refused");
            return Err(TapResult::Refused(Refused::PinRequirement));
        }
        if challenge.pin_required {
            self.verify_pin(piv, self.clock.now() + challenge.expires_in)?;
        }
        self.around.show(Pattern::Working);
        Ok(piv.sign(challenge.slot, challenge.algorithm, &digest)?)
    }

    /// CompleteAuthentication.
    pub async fn complete(&mut self, challenge: &Challenge, signature: Vec<u8>) -> Step<Completed> {
        Ok(self.gateway.complete(CompleteRequest { challenge_id: challenge.id.clone(), terminal: self.terminal.to_string(), signature }).await?)
    }

    /// Gets the PIN to the card before `expires`: asks again after a wrong
    /// PIN, warns before the last try, never sends VERIFY to a blocked card.
    fn verify_pin(&mut self, piv: &mut PivClient<T>, expires: Instant) -> Step<()> {
        let mut last_wrong = None;
        let gave_up = |last_wrong: Option<u8>| last_wrong.map(|tries| TapResult::WrongPin { tries }).unwrap_or(TapResult::NoPin);
        loop {
            let tries = match piv.pin_status()? {
                PinStatus::Verified => return Ok(()),
                PinStatus::Blocked => return Err(TapResult::PinBlocked),
                PinStatus::TriesLeft(n) => n,
            };
            if self.clock.now() >= expires {
                return Err(gave_up(last_wrong));
            }
            if let PinWay::Keys { keys, .. } = &mut self.pin {
                // Keys pressed before the prompt are not the PIN; keys
                // pressed once it shows are, however soon after.
                keys.drain();
            }
            if tries == 1 {
                tracing::warn!(terminal = %self.terminal, "one PIN try left before the card blocks");
                self.around.show(Pattern::LastTry);
            }
            self.around.show(Pattern::EnterPin);
            let outcome = match &mut self.pin {
                PinWay::Pad(verify) => verify(piv.transport()),
                PinWay::Keys { .. } => match self.read_pin(expires) {
                    PinRead::Pin(pin) => piv.verify_pin(&pin),
                    PinRead::Gave(TapResult::NoPin) => return Err(gave_up(last_wrong)),
                    PinRead::Gave(r) => return Err(r),
                },
            };
            match outcome {
                Ok(()) => return Ok(()),
                Err(pivgate_hw::Error::WrongPin { tries }) => {
                    tracing::info!(terminal = %self.terminal, tries_left = tries, "wrong PIN");
                    self.around.show(Pattern::Denied);
                    last_wrong = Some(tries);
                }
                Err(pivgate_hw::Error::PinPadEntry(_)) => return Err(TapResult::NoPin),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads a PIN from the keys, watching for the card leaving.
    fn read_pin(&mut self, expires: Instant) -> PinRead {
        let PinWay::Keys { keys, rules } = &mut self.pin else { return PinRead::Gave(TapResult::NoPin) };
        let mut entry = PinEntry::new(*rules, self.clock.now());
        loop {
            if self.around.card_gone() {
                return PinRead::Gave(TapResult::CardRemoved);
            }
            let now = self.clock.now();
            if now >= expires {
                return PinRead::Gave(TapResult::NoPin);
            }
            // Short waits, so a card pulled mid-entry is seen at once.
            let wait = entry.deadline().min(expires).saturating_duration_since(now).min(Duration::from_millis(100));
            match keys.next_key(wait) {
                Some(k) => match entry.key(k, self.clock.now()) {
                    Progress::Done(pin) => return PinRead::Pin(pin),
                    Progress::Cancelled | Progress::TimedOut => return PinRead::Gave(TapResult::NoPin),
                    Progress::TooShort => self.around.show(Pattern::EnterPin),
                    Progress::Digit(_) | Progress::Refused | Progress::Cleared => {}
                },
                None => {
                    if entry.poll(self.clock.now()).is_some() {
                        return PinRead::Gave(TapResult::NoPin);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "tap_tests.rs"]
mod tests;
