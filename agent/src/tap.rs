//! The badge tap, as one flow that everyone drives: the agent's terminal
//! worker, the scenario tests, the demo and the benchmarks.
//!
//! ```text
//! identify ─ SELECT, CHUID (or GET SERIAL for a card without one; a card
//!            met before by its serial alone)
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
use sha2::Digest;

use crate::challenge::{self, Expected, Refused};
use crate::keys::KeySource;
use crate::memory::{CardMemory, Handle, Memo, TRIES_FULL};

/// The contract's words for a denial and a mechanism: plain enums of the
/// gRPC contract, not messages.
pub use pivgate_proto::v1::{DenyReason, Mechanism};

/// What an agent asks the gateway to begin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginRequest {
    /// The terminal.
    pub terminal: String,
    /// The card as the agent knows it (the id it learned, else the CHUID
    /// GUID); `None` for a card without a CHUID the agent has not met.
    pub card_uuid: Option<[u8; 16]>,
    /// The CHUID's FASC-N, when the card has one.
    pub fascn: Option<Fascn>,
    /// The certificate, when the gateway asked for it.
    pub certificate: Option<Vec<u8>>,
    /// A mechanism the terminal asks for (card-only readers); the policy
    /// decides otherwise.
    pub requested: Option<Mechanism>,
    /// The step-up this proof answers (none: a tap that unlocks).
    pub step_up: Option<[u8; 16]>,
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

/// A card enrolled at the terminal (its enrolment window was open).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    /// The card's id from now on.
    pub card_uuid: [u8; 16],
    /// Its operator.
    pub operator_id: String,
    /// Whether it waits for a second administrator's approval.
    pub awaiting_approval: bool,
}

/// The gateway's answer to a completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completed {
    /// Unlocked.
    Granted(Grant),
    /// Enrolled; the terminal stays locked.
    Enrolled(Enrolled),
    /// A step-up proven, by this operator; the session is unchanged.
    SteppedUp(String),
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
    /// ReportPinFailure: the card refused `wrong` PINs typed for the
    /// challenge, which it never signed.
    fn pin_failed(&mut self, challenge_id: Vec<u8>, terminal: String, wrong: u32) -> impl Future<Output = Result<(), GatewayError>> + Send;
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
    /// The card was enrolled (an enrolment window was open); nothing
    /// unlocked.
    Enrolled(Enrolled),
    /// A step-up was proven (by this operator); the session is unchanged.
    SteppedUp(String),
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

/// The card in the reader, as this tap knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identified {
    /// Its CHUID, when it has one (a new YubiKey has none).
    pub chuid: Option<Chuid>,
    /// Its serial number, when it answered GET SERIAL.
    pub serial: Option<u32>,
    /// What the agent remembers it by.
    pub handle: Option<Handle>,
    /// What the agent remembered about it.
    pub memo: Option<Memo>,
    /// SHA-256 of the certificate read from it during this tap.
    pub certificate_sha256: Option<[u8; 32]>,
}

impl Identified {
    /// The id the gateway is told: the one learned, else the CHUID GUID.
    pub fn hint(&self) -> Option<[u8; 16]> {
        self.memo.map(|m| m.id).or(self.chuid.as_ref().map(|c| c.guid))
    }

    fn known_ids(&self) -> Vec<[u8; 16]> {
        self.memo.map(|m| m.id).into_iter().chain(self.chuid.as_ref().map(|c| c.guid)).collect()
    }
}

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
    /// What the agent remembers about cards.
    pub memory: &'a CardMemory,
    /// The step-up this tap answers, if any: always card and PIN, and the
    /// card signs only that step-up's message.
    pub step_up: Option<[u8; 16]>,
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
        let mut id = None;
        let result = match self.steps(piv, &mut card, &mut pin_asked, &mut id).await {
            Ok(grant) => TapResult::Granted(grant),
            Err(r) => r,
        };
        // A memory that did not end in a grant is not kept: a card that
        // answered another card's serial or GUID, or reported tries of its
        // own, leaves nothing behind for the real card's next tap.
        if let Some(id) = id.filter(|_| !matches!(result, TapResult::Granted(_) | TapResult::SteppedUp(_))) {
            self.forget(&id);
        }
        let pin_reset = !pin_asked || piv.reset_pin_state().unwrap_or(false);
        Outcome { result, card, pin_reset }
    }

    async fn steps(&mut self, piv: &mut PivClient<T>, card: &mut Option<[u8; 16]>, pin_asked: &mut bool, seen: &mut Option<Identified>) -> Step<Grant> {
        let mut id = self.identify(piv)?;
        *seen = Some(id.clone());
        *card = id.hint();
        let challenge = self.begin(piv, &mut id).await?;
        // From here the card may hold a verified PIN: it is reset at the end.
        *pin_asked = challenge.pin_required;
        let mut wrong = 0;
        let signed = self.sign_for(piv, &id, &challenge, &mut wrong);
        // The gateway counts wrong PINs too (its throttle is the second
        // line behind the card's counter), for a challenge never signed.
        if signed.is_err() && wrong > 0 {
            if let Err(e) = self.gateway.pin_failed(challenge.id.clone(), self.terminal.to_string(), wrong).await {
                tracing::warn!(terminal = %self.terminal, error = %e, "could not report wrong PINs to the gateway");
            }
        }
        let (signature, named) = signed?;
        *card = Some(named);
        let tries = challenge.pin_required.then_some(TRIES_FULL);
        match self.complete(&challenge, signature).await? {
            Completed::Granted(g) => {
                // The id the gateway bound the grant to is the card's from
                // now on (for an enrolled-key card: not its CHUID GUID).
                if let Some(h) = id.handle {
                    self.memory.remember(h, named, tries);
                }
                Ok(g)
            }
            Completed::Enrolled(e) => Err(TapResult::Enrolled(e)),
            Completed::SteppedUp(who) => Err(TapResult::SteppedUp(who)),
            Completed::Denied(d) => {
                self.forget(&id);
                Err(TapResult::Denied(d))
            }
        }
    }

    fn forget(&self, id: &Identified) {
        if let (Some(h), Some(_)) = (id.handle, id.memo) {
            self.memory.forget(h);
        }
    }

    /// SELECT, then the card's CHUID, or for a card without one its serial
    /// number (GET SERIAL, the YubiKey extension). Cards of a kind (ATR)
    /// that had no CHUID are asked for their serial first, and a serial the
    /// agent remembers spares the CHUID: a known card costs one APDU here
    /// either way.
    pub fn identify(&mut self, piv: &mut PivClient<T>) -> Step<Identified> {
        self.around.show(Pattern::Working);
        piv.select()?;
        let atr = piv.transport().atr().map(<[u8]>::to_vec);
        let mut id = Identified::default();
        let serial_first = self.memory.serial_first(atr.as_deref());
        if serial_first {
            id.serial = serial(piv)?;
            id.memo = id.serial.and_then(|s| self.memory.card(Handle::Serial(s)));
        }
        if id.memo.is_none() {
            id.chuid = match piv.read_chuid() {
                Ok(c) => Some(c),
                Err(pivgate_hw::Error::ObjectNotFound { .. }) => None,
                Err(e) => return Err(e.into()),
            };
            if id.chuid.is_none() && !serial_first {
                id.serial = serial(piv)?;
                if id.serial.is_some() {
                    self.memory.learn_serial_first(atr.as_deref());
                }
            }
        }
        id.handle = id.serial.map(Handle::Serial).or(id.chuid.as_ref().map(|c| Handle::Guid(c.guid)));
        if id.memo.is_none() {
            id.memo = id.handle.and_then(|h| self.memory.card(h));
        }
        if let Some(card) = id.hint() {
            self.around.identified(card);
        }
        Ok(id)
    }

    /// BeginAuthentication, sending the certificate of the slot the gateway
    /// names, once.
    pub async fn begin(&mut self, piv: &mut PivClient<T>, id: &mut Identified) -> Step<Challenge> {
        let mut req = BeginRequest {
            terminal: self.terminal.to_string(),
            card_uuid: id.hint(),
            fascn: id.chuid.as_ref().and_then(|c| c.fascn),
            certificate: None,
            // A step-up is card and PIN, whatever this reader offers.
            requested: if self.step_up.is_some() { None } else { self.requested },
            step_up: self.step_up,
        };
        loop {
            match self.gateway.begin(req.clone()).await? {
                Begun::Challenge(c) => return Ok(c),
                Begun::Denied(d) => {
                    self.forget(id);
                    return Err(TapResult::Denied(d));
                }
                Begun::CertificateNeeded(slot) if req.certificate.is_none() => {
                    let der = piv.read_certificate(slot)?;
                    id.certificate_sha256 = Some(sha2::Sha256::digest(&der).into());
                    req.certificate = Some(der);
                }
                Begun::CertificateNeeded(_) => return Err(GatewayError::Malformed("the certificate was asked for twice".into()).into()),
            }
        }
    }

    /// Checks the challenge is this tap's, gets the PIN to the card when the
    /// challenge needs it, and has the card sign.
    pub fn sign(&mut self, piv: &mut PivClient<T>, id: &Identified, challenge: &Challenge) -> Step<Vec<u8>> {
        self.sign_for(piv, id, challenge, &mut 0).map(|(s, _)| s)
    }

    /// [`Tap::sign`], also returning the card id the message names.
    fn sign_for(&mut self, piv: &mut PivClient<T>, id: &Identified, challenge: &Challenge, wrong: &mut u32) -> Step<(Vec<u8>, [u8; 16])> {
        // The card signs only a pivgate message for this very tap; checked
        // before the PIN is even asked for.
        let known = id.known_ids();
        let expected = Expected {
            agent: self.gateway.agent_name(),
            terminal: self.terminal,
            cards: &known,
            certificate_sha256: id.certificate_sha256,
            now: self.clock.wall(),
            max_skew: self.gateway.max_clock_skew(),
            step_up: self.step_up,
        };
        let to_sign = match challenge::digest_to_sign(&challenge.message, challenge.slot, challenge.algorithm, &expected) {
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
        if id.memo.map(|m| m.id) != Some(to_sign.card) {
            self.around.identified(to_sign.card);
        }
        if challenge.pin_required {
            let remembered = id.memo.and_then(|m| m.pin_tries);
            let verified = self.verify_pin(piv, remembered, self.clock.now() + challenge.expires_in, wrong);
            if let Some(h) = id.handle {
                match &verified {
                    Ok(()) => self.memory.pin_tries(h, TRIES_FULL),
                    Err(TapResult::WrongPin { tries }) => self.memory.pin_tries(h, *tries),
                    Err(TapResult::PinBlocked) => self.memory.pin_tries(h, 0),
                    Err(_) => {}
                }
            }
            verified?;
        }
        self.around.show(Pattern::Working);
        Ok((piv.sign(challenge.slot, challenge.algorithm, &to_sign.digest)?, to_sign.card))
    }

    /// CompleteAuthentication.
    pub async fn complete(&mut self, challenge: &Challenge, signature: Vec<u8>) -> Step<Completed> {
        Ok(self.gateway.complete(CompleteRequest { challenge_id: challenge.id.clone(), terminal: self.terminal.to_string(), signature }).await?)
    }

    /// Gets the PIN to the card before `expires`: asks again after a wrong
    /// PIN, warns before the last try, sends no VERIFY to a card it knows
    /// is blocked.
    ///
    /// The tries are asked of the card (an empty VERIFY) unless known: from
    /// a wrong PIN just now, or remembered from this card's last tap at
    /// this agent when at least two were left. A card whose PIN was tried
    /// wrongly elsewhere since may then block on a wrong PIN without the
    /// last-try warning; the card still counts, so nothing is lost but the
    /// warning.
    fn verify_pin(&mut self, piv: &mut PivClient<T>, remembered: Option<u8>, expires: Instant, wrong: &mut u32) -> Step<()> {
        let mut last_wrong = None;
        let mut known = remembered.filter(|t| *t >= 2);
        let gave_up = |last_wrong: Option<u8>| last_wrong.map(|tries| TapResult::WrongPin { tries }).unwrap_or(TapResult::NoPin);
        loop {
            let tries = match known.take() {
                Some(n) => n,
                None => match piv.pin_status()? {
                    PinStatus::Verified => return Ok(()),
                    PinStatus::Blocked => return Err(TapResult::PinBlocked),
                    PinStatus::TriesLeft(n) => n,
                },
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
                    *wrong += 1;
                    tracing::info!(terminal = %self.terminal, tries_left = tries, "wrong PIN");
                    self.around.show(Pattern::Denied);
                    last_wrong = Some(tries);
                    known = Some(tries);
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

/// GET SERIAL, as a hint: a card that fails it otherwise than by leaving
/// simply has no serial.
fn serial<T: Transport>(piv: &mut PivClient<T>) -> Step<Option<u32>> {
    match piv.serial() {
        Ok(s) => Ok(s),
        Err(e @ (pivgate_hw::Error::CardRemoved | pivgate_hw::Error::ReaderUnavailable)) => Err(e.into()),
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
#[path = "tap_tests.rs"]
mod tests;
