//! One terminal: its reader, keypad and indicators, on a thread of its own
//! (PC/SC and GPIO block). It turns reader events into badge taps:
//!
//! card in → SELECT, CHUID → BeginAuthentication (the certificate only when
//! the gateway asks) → PIN from the keypad to the card when the gateway's
//! challenge needs it (warning before the last try, no VERIFY to a blocked
//! card) → GENERAL AUTHENTICATE → PIN state reset → CompleteAuthentication
//! → granted or denied on the indicators. Card out → ReportCardRemoved at
//! once.
//!
//! The PIN exists only inside this file's `read_pin` and the card's VERIFY;
//! it is zeroized when dropped and never logged. When the gateway cannot be
//! reached nothing unlocks, and the indicators say so.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pivgate_hw::indicator::{Indicator, Pattern};
use pivgate_hw::keypad::entry::{EntryRules, PinEntry, Progress};
use pivgate_hw::pcsc::{self, PcscCard, PcscTransaction, ReaderEvent};
use pivgate_hw::piv::{Algorithm, PinStatus, PivClient, Slot};
use pivgate_hw::Pin;
use pivgate_proto::v1 as pb;

use crate::keys::KeySource;
use crate::link::Link;
use crate::Error;

/// Called with each tap's result (tests, metrics).
pub type OnResult = Arc<dyn Fn(&str, &TapResult) + Send + Sync>;

/// An indicator shared between the worker and the link watcher.
pub type SharedIndicator = Arc<Mutex<Box<dyn Indicator>>>;

/// What the worker receives.
#[derive(Debug)]
pub enum Input {
    /// From the reader monitor.
    Reader(ReaderEvent),
    /// The gateway locked this terminal.
    Locked,
}

/// How the PIN reaches the card.
pub enum PinSource {
    /// Keys from a keypad, checked by the entry rules, sent with VERIFY.
    Keys(Box<dyn KeySource>),
    /// The reader's own PIN pad (secure PIN entry).
    Pinpad,
}

/// The outcome of one tap, for the log and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TapResult {
    /// Unlocked.
    Granted {
        /// The operator.
        operator: String,
    },
    /// Refused by the gateway.
    Denied(String),
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
    /// The card or reader failed.
    CardError(String),
}

/// A terminal's worker.
pub struct Worker {
    /// Terminal id.
    pub terminal: String,
    /// Card-only request.
    pub card_only: bool,
    /// The gateway.
    pub link: Arc<Link>,
    /// To run gateway calls from this thread.
    pub rt: tokio::runtime::Handle,
    /// PIN input.
    pub pin: PinSource,
    /// LEDs and buzzer.
    pub indicator: SharedIndicator,
    /// Events.
    pub inputs: Receiver<Input>,
    /// PIN entry rules.
    pub rules: EntryRules,
    /// Called with every tap's result (tests, metrics).
    pub on_result: Option<OnResult>,
}

enum PinRead {
    Pin(Pin),
    TimedOut,
    Cancelled,
    CardRemoved,
}

impl Worker {
    fn show(&self, p: Pattern) {
        if let Ok(mut i) = self.indicator.lock() {
            i.show(p);
        }
    }

    /// Runs until the input channel closes.
    pub fn run(mut self) {
        let mut current_card: Option<[u8; 16]> = None;
        while let Ok(input) = self.inputs.recv() {
            match input {
                Input::Reader(ReaderEvent::CardInserted { reader, .. }) => {
                    let (result, uuid) = self.tap(&reader);
                    current_card = uuid;
                    self.finish(&result);
                    if result == TapResult::CardRemoved {
                        self.removed(current_card.take());
                    }
                }
                Input::Reader(ReaderEvent::CardRemoved { .. }) => self.removed(current_card.take()),
                Input::Reader(ReaderEvent::ReaderAdded { .. }) => self.link.report(&self.terminal, |r| r.reader_present = true),
                Input::Reader(ReaderEvent::ReaderRemoved { .. }) => {
                    self.link.report(&self.terminal, |r| *r = Default::default());
                }
                Input::Reader(_) => {}
                Input::Locked => self.show(Pattern::Idle),
            }
        }
    }

    fn finish(&self, result: &TapResult) {
        match result {
            TapResult::Granted { operator } => {
                tracing::info!(terminal = %self.terminal, operator, "access granted");
                self.show(Pattern::Granted);
            }
            TapResult::Denied(why) => {
                tracing::info!(terminal = %self.terminal, reason = %why, "access denied");
                self.show(Pattern::Denied);
            }
            TapResult::WrongPin { tries } => {
                tracing::info!(terminal = %self.terminal, tries_left = tries, "wrong PIN");
                self.show(Pattern::Denied);
            }
            TapResult::PinBlocked => {
                tracing::warn!(terminal = %self.terminal, "the card's PIN is blocked; it needs its PUK or a new card");
                self.show(Pattern::PinBlocked);
            }
            TapResult::NoPin => self.show(Pattern::Idle),
            TapResult::CardRemoved => self.show(Pattern::Idle),
            TapResult::GatewayUnreachable => {
                tracing::warn!(terminal = %self.terminal, "gateway unreachable: not unlocking");
                self.show(Pattern::GatewayUnreachable);
            }
            TapResult::CardError(e) => {
                tracing::warn!(terminal = %self.terminal, error = %e, "card error");
                self.show(Pattern::Denied);
            }
        }
        if let Some(f) = &self.on_result {
            f(&self.terminal, result);
        }
    }

    fn removed(&self, card: Option<[u8; 16]>) {
        self.link.report(&self.terminal, |r| {
            r.card_present = false;
            r.card_uuid = None;
        });
        match self.rt.block_on(self.link.card_removed(&self.terminal, card)) {
            Ok(locked) => tracing::info!(terminal = %self.terminal, locked, "card removed"),
            Err(e) => tracing::warn!(terminal = %self.terminal, error = %e, "card removed; the gateway will learn it on reconnect"),
        }
        self.show(if self.link.connected() { Pattern::Idle } else { Pattern::GatewayUnreachable });
    }

    /// One badge tap. Returns the result and the card's UUID.
    fn tap(&mut self, reader: &str) -> (TapResult, Option<[u8; 16]>) {
        self.link.report(&self.terminal, |r| {
            r.reader_present = true;
            r.card_present = true;
        });
        self.show(Pattern::Working);
        let ctx = match pcsc::establish() {
            Ok(c) => c,
            Err(e) => return (TapResult::CardError(e.to_string()), None),
        };
        let mut card = match PcscCard::connect(&ctx, reader) {
            Ok(c) => c,
            Err(e) => return (TapResult::CardError(e.to_string()), None),
        };
        let features = match &self.pin {
            PinSource::Pinpad => pcsc::pinpad::features(&card).unwrap_or_default(),
            PinSource::Keys(_) => Default::default(),
        };
        let mut uuid = None;
        let result = match card.transaction() {
            Ok(tx) => {
                let mut piv = PivClient::new(tx);
                piv.set_deadline(Some(Instant::now() + Duration::from_secs(90)));
                let r = self.exchange(&mut piv, &features, &mut uuid);
                // Whatever happened, the next person gets no verified PIN.
                let reset = piv.reset_pin_state().unwrap_or(false);
                let tx = piv.into_inner();
                let _ = tx.end(!reset);
                r
            }
            Err(e) => Err(Error::Card(e)),
        };
        let _ = card.disconnect(false);
        match result {
            Ok(r) => (r, uuid),
            Err(Error::Card(pivgate_hw::Error::CardRemoved)) | Err(Error::Card(pivgate_hw::Error::ReaderUnavailable)) => (TapResult::CardRemoved, uuid),
            Err(Error::GatewayUnreachable(_)) => (TapResult::GatewayUnreachable, uuid),
            Err(e) => (TapResult::CardError(e.to_string()), uuid),
        }
    }

    fn exchange(
        &mut self,
        piv: &mut PivClient<PcscTransaction<'_>>,
        features: &pcsc::pinpad::Features,
        uuid: &mut Option<[u8; 16]>,
    ) -> Result<TapResult, Error> {
        piv.select()?;
        let chuid = piv.read_chuid()?;
        *uuid = Some(chuid.guid);
        self.link.report(&self.terminal, |r| r.card_uuid = Some(chuid.guid));
        let mut req = pb::BeginAuthenticationRequest {
            terminal_id: self.terminal.clone(),
            card_uuid: chuid.guid.to_vec(),
            fascn: chuid.fascn.map(|f| f.0.to_vec()).unwrap_or_default(),
            certificate: vec![],
            requested_mechanism: if self.card_only { pb::Mechanism::CardOnly as i32 } else { 0 },
        };
        use pb::begin_authentication_response::Outcome as B;
        let challenge = loop {
            match self.rt.block_on(self.link.begin(req.clone()))? {
                B::Challenge(c) => break c,
                B::Denied(d) => return Ok(TapResult::Denied(deny_name(d.reason))),
                B::CertificateNeeded(slot) if req.certificate.is_empty() => {
                    let Some(slot) = slot_of(slot) else { return Ok(TapResult::Denied("the gateway asked for an unknown key slot".into())) };
                    req.certificate = piv.read_certificate(slot)?;
                }
                B::CertificateNeeded(_) => return Ok(TapResult::Denied("certificate requested twice".into())),
            }
        };
        let Some(slot) = slot_of(challenge.slot) else { return Ok(TapResult::Denied("the gateway named an unknown key slot".into())) };
        let alg = match pb::SignatureAlgorithm::try_from(challenge.algorithm) {
            Ok(pb::SignatureAlgorithm::EcdsaP256Sha256) => Algorithm::EccP256,
            Ok(pb::SignatureAlgorithm::EcdsaP384Sha384) => Algorithm::EccP384,
            Ok(pb::SignatureAlgorithm::Rsa2048Pkcs1Sha256) => Algorithm::Rsa2048,
            _ => return Ok(TapResult::Denied("unknown signature algorithm".into())),
        };
        // The card signs only a pivgate message for this very tap; checked
        // before the PIN is even asked for.
        let expected = crate::challenge::Expected {
            agent: self.link.name(),
            terminal: &self.terminal,
            card_uuid: chuid.guid,
            now: std::time::SystemTime::now(),
            max_skew: self.link.max_clock_skew(),
        };
        let digest = match crate::challenge::digest_to_sign(&challenge.message, slot, alg, &expected) {
            Ok(d) => d,
            Err(why) => {
                tracing::error!(terminal = %self.terminal, reason = %why, "the gateway asked the card to sign something that is not this tap's challenge; refused");
                return Ok(TapResult::Denied(format!("refused to sign: {why}")));
            }
        };
        if challenge.pin_required != (slot == Slot::Authentication) {
            tracing::error!(terminal = %self.terminal, "the challenge's PIN requirement does not match its key slot; refused");
            return Ok(TapResult::Denied("refused to sign: PIN requirement does not match the key slot".into()));
        }
        let expires = Instant::now() + Duration::from_millis(u64::from(challenge.expires_in_ms));
        if challenge.pin_required {
            if let Some(r) = self.verify_pin(piv, features, expires)? {
                return Ok(r);
            }
        }
        self.show(Pattern::Working);
        let signature = piv.sign(slot, alg, &digest)?;
        use pb::complete_authentication_response::Outcome as C;
        let done = self.rt.block_on(self.link.complete(pb::CompleteAuthenticationRequest {
            challenge_id: challenge.challenge_id,
            terminal_id: self.terminal.clone(),
            signature,
        }))?;
        Ok(match done {
            C::Granted(g) => TapResult::Granted { operator: g.operator_id },
            C::Denied(d) => TapResult::Denied(deny_name(d.reason)),
        })
    }

    /// Gets the PIN to the card. Returns `Some(result)` when the tap ends
    /// here, `None` when the card accepted the PIN.
    fn verify_pin(
        &mut self,
        piv: &mut PivClient<PcscTransaction<'_>>,
        features: &pcsc::pinpad::Features,
        expires: Instant,
    ) -> Result<Option<TapResult>, Error> {
        let mut last_wrong = None;
        loop {
            let tries = match piv.pin_status()? {
                PinStatus::Verified => return Ok(None),
                PinStatus::Blocked => return Ok(Some(TapResult::PinBlocked)),
                PinStatus::TriesLeft(n) => n,
            };
            if Instant::now() >= expires {
                return Ok(Some(last_wrong.map(|tries| TapResult::WrongPin { tries }).unwrap_or(TapResult::NoPin)));
            }
            // Keys pressed before the prompt are not the PIN; keys pressed
            // once it shows are, however soon after.
            if let PinSource::Keys(keys) = &mut self.pin {
                keys.drain();
            }
            if tries == 1 {
                tracing::warn!(terminal = %self.terminal, "one PIN try left before the card blocks");
                self.show(Pattern::LastTry);
            }
            self.show(Pattern::EnterPin);
            let outcome = match &mut self.pin {
                PinSource::Pinpad => pcsc::pinpad::verify_pin_direct(piv.transport(), features, 30),
                PinSource::Keys(_) => match self.read_pin(expires) {
                    PinRead::Pin(pin) => piv.verify_pin(&pin),
                    PinRead::TimedOut | PinRead::Cancelled => {
                        return Ok(Some(last_wrong.map(|tries| TapResult::WrongPin { tries }).unwrap_or(TapResult::NoPin)));
                    }
                    PinRead::CardRemoved => return Ok(Some(TapResult::CardRemoved)),
                },
            };
            match outcome {
                Ok(()) => return Ok(None),
                Err(pivgate_hw::Error::WrongPin { tries }) => {
                    tracing::info!(terminal = %self.terminal, tries_left = tries, "wrong PIN");
                    self.show(Pattern::Denied);
                    last_wrong = Some(tries);
                    if let Some(f) = &self.on_result {
                        f(&self.terminal, &TapResult::WrongPin { tries });
                    }
                }
                Err(pivgate_hw::Error::PinBlocked) => return Ok(Some(TapResult::PinBlocked)),
                Err(pivgate_hw::Error::PinPadEntry(_)) => return Ok(Some(TapResult::NoPin)),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads a PIN from the keys, watching for the card leaving.
    fn read_pin(&mut self, expires: Instant) -> PinRead {
        let indicator = self.indicator.clone();
        let PinSource::Keys(keys) = &mut self.pin else { return PinRead::Cancelled };
        let mut entry = PinEntry::new(self.rules, Instant::now());
        loop {
            match self.inputs.try_recv() {
                Ok(Input::Reader(ReaderEvent::CardRemoved { .. })) | Ok(Input::Reader(ReaderEvent::ReaderRemoved { .. })) => {
                    return PinRead::CardRemoved;
                }
                Ok(Input::Reader(ReaderEvent::ServiceLost)) => return PinRead::CardRemoved,
                _ => {}
            }
            let now = Instant::now();
            if now >= expires {
                return PinRead::TimedOut;
            }
            let wait = entry.deadline().min(expires).saturating_duration_since(now).min(Duration::from_millis(100));
            match keys.next_key(wait) {
                Some(k) => match entry.key(k, Instant::now()) {
                    Progress::Done(pin) => return PinRead::Pin(pin),
                    Progress::Cancelled => return PinRead::Cancelled,
                    Progress::TimedOut => return PinRead::TimedOut,
                    Progress::TooShort => {
                        if let Ok(mut i) = indicator.lock() {
                            i.show(Pattern::EnterPin);
                        }
                    }
                    Progress::Digit(_) | Progress::Refused | Progress::Cleared => {}
                },
                None => {
                    if entry.poll(Instant::now()).is_some() {
                        return PinRead::TimedOut;
                    }
                }
            }
        }
    }
}

fn slot_of(s: i32) -> Option<Slot> {
    match pb::KeySlot::try_from(s) {
        Ok(pb::KeySlot::PivAuthentication) => Some(Slot::Authentication),
        Ok(pb::KeySlot::CardAuthentication) => Some(Slot::CardAuthentication),
        _ => None,
    }
}

fn deny_name(r: i32) -> String {
    pb::DenyReason::try_from(r).map(|r| r.as_str_name().trim_start_matches("DENY_REASON_").to_lowercase()).unwrap_or_else(|_| format!("reason {r}"))
}
