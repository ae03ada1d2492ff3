//! One terminal: its reader, keypad and indicators, on a thread of its own
//! (PC/SC and GPIO block). The thin shell around [`crate::tap`]: it turns
//! reader events into taps, opens the PC/SC card and transaction, feeds the
//! flow its keys and the reader's events, and ends the transaction (with a
//! card reset when the PIN state could not be cleared). Card out →
//! ReportCardRemoved at once.
//!
//! The PIN exists only inside the tap flow's entry and the card's VERIFY;
//! it is zeroized when dropped and never logged. When the gateway cannot be
//! reached nothing unlocks, and the indicators say so.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pivgate_hw::indicator::{Indicator, Pattern};
use pivgate_hw::keypad::entry::EntryRules;
use pivgate_hw::pcsc::{self, PcscCard, PcscTransaction, ReaderEvent};
use pivgate_hw::piv::PivClient;
use pivgate_hw::SystemClock;

use crate::keys::KeySource;
use crate::link::{Link, TerminalReport};
pub use crate::tap::TapResult;
use crate::tap::{Mechanism, PinWay, Surroundings, Tap};

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
    /// An application asks the operator here to prove again (card and
    /// PIN) before an action: the next proof at this terminal (the card in
    /// the reader now, or presented before `until`) answers it.
    StepUp {
        /// The step-up.
        id: [u8; 16],
        /// What for, in words.
        action: String,
        /// Until when.
        until: Instant,
    },
}

/// How the PIN reaches the card.
pub enum PinSource {
    /// Keys from a keypad, checked by the entry rules, sent with VERIFY.
    Keys(Box<dyn KeySource>),
    /// The reader's own PIN pad (secure PIN entry).
    Pinpad,
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
    /// What the agent remembers about cards (shared by its terminals).
    pub memory: Arc<crate::memory::CardMemory>,
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
        // The reader holding a card now (a contact reader keeps it in).
        let mut card_in: Option<String> = None;
        let mut step_up: Option<([u8; 16], Instant)> = None;
        // Step-ups already acted on: each is answered once, whatever the
        // heartbeats repeat.
        let mut done: std::collections::VecDeque<[u8; 16]> = Default::default();
        while let Ok(input) = self.inputs.recv() {
            match input {
                Input::Reader(ReaderEvent::CardInserted { reader, .. }) => {
                    card_in = Some(reader.clone());
                    match step_up.take().filter(|(_, until)| Instant::now() < *until) {
                        Some((id, until)) => {
                            if self.step_up(&reader, id, &mut done, &mut card_in, &mut current_card) {
                                step_up = Some((id, until));
                                self.show(Pattern::StepUp);
                            }
                        }
                        None => {
                            let (result, uuid) = self.tap(&reader, None);
                            current_card = uuid;
                            self.finish(&result);
                            if result == TapResult::CardRemoved {
                                card_in = None;
                                self.removed(current_card.take());
                            }
                        }
                    }
                }
                Input::StepUp { id, action, until } => {
                    if done.contains(&id) || step_up.is_some_and(|(s, _)| s == id) {
                        continue;
                    }
                    // No PIN can be typed here: the gateway asks none of
                    // these (the agent reports it), and one asked anyway
                    // is left to time out rather than prompted for.
                    if self.card_only {
                        tracing::warn!(terminal = %self.terminal, action = %action, "step-up asked of a terminal without PIN entry: not prompting");
                        continue;
                    }
                    tracing::info!(terminal = %self.terminal, action = %action, "step-up asked: prove again with card and PIN");
                    match card_in.clone() {
                        // The card is in the reader: ask for its PIN now. If
                        // it has just left (its removal not yet seen here),
                        // the step-up waits for the next card.
                        Some(reader) if !self.step_up(&reader, id, &mut done, &mut card_in, &mut current_card) => {}
                        _ => {
                            step_up = Some((id, until));
                            self.show(Pattern::StepUp);
                        }
                    }
                }
                Input::Reader(ReaderEvent::CardRemoved { .. }) => {
                    card_in = None;
                    self.removed(current_card.take())
                }
                Input::Reader(ReaderEvent::ReaderAdded { .. }) => self.link.report(&self.terminal, |r| r.reader_present = true),
                Input::Reader(ReaderEvent::ReaderRemoved { .. }) => {
                    card_in = None;
                    self.link.report(&self.terminal, |r| *r = TerminalReport { no_pin_entry: r.no_pin_entry, ..Default::default() });
                }
                Input::Reader(_) => {}
                // A lock ends any step-up: the terminal is no longer the
                // operator's, and the next card is an unlock.
                Input::Locked => {
                    step_up = None;
                    self.show(Pattern::Idle)
                }
            }
        }
    }

    /// A step-up tap at `reader`, answering step-up `id` once. Returns true
    /// when the card had left before the gateway heard anything, so the
    /// step-up still waits for a card.
    fn step_up(
        &mut self,
        reader: &str,
        id: [u8; 16],
        done: &mut std::collections::VecDeque<[u8; 16]>,
        card_in: &mut Option<String>,
        current: &mut Option<[u8; 16]>,
    ) -> bool {
        self.show(Pattern::StepUp);
        let (result, _) = self.tap(reader, Some(id));
        // Answered for good (proven, refused, or declined at the PIN) unless
        // nothing reached the gateway (the card pulled, the link down, a
        // card error): the heartbeats' repeat asks again.
        if !matches!(result, TapResult::CardRemoved | TapResult::GatewayUnreachable | TapResult::CardError(_)) {
            if done.len() >= 64 {
                done.pop_front();
            }
            done.push_back(id);
        }
        if result == TapResult::CardRemoved {
            *card_in = None;
            self.removed(current.take());
            return true;
        }
        self.finish(&result);
        false
    }

    fn finish(&self, result: &TapResult) {
        match result {
            TapResult::SteppedUp(who) => {
                tracing::info!(terminal = %self.terminal, operator = %who, "step-up proven");
                self.show(Pattern::Granted);
            }
            TapResult::Granted(g) => {
                tracing::info!(terminal = %self.terminal, operator = %g.operator_id, "access granted");
                self.show(Pattern::Granted);
            }
            TapResult::Enrolled(e) => {
                tracing::info!(terminal = %self.terminal, operator = %e.operator_id, awaiting_approval = e.awaiting_approval, "card enrolled");
                self.show(Pattern::Enrolled);
            }
            TapResult::Denied(why) => {
                tracing::info!(terminal = %self.terminal, reason = why.as_str_name(), "access denied");
                self.show(Pattern::Denied);
            }
            TapResult::Refused(why) => {
                tracing::warn!(terminal = %self.terminal, reason = %why, "refused to let the card sign");
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
            TapResult::GatewayError(e) => {
                tracing::warn!(terminal = %self.terminal, error = %e, "gateway error: not unlocking");
                self.show(Pattern::Denied);
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
    fn tap(&mut self, reader: &str, step_up: Option<[u8; 16]>) -> (TapResult, Option<[u8; 16]>) {
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
            Err(e) => return (e.into(), None),
        };
        let features = match &self.pin {
            PinSource::Pinpad => pcsc::pinpad::features(&card).unwrap_or_default(),
            PinSource::Keys(_) => Default::default(),
        };
        let outcome = match card.transaction() {
            Ok(tx) => {
                let mut piv = PivClient::new(tx);
                piv.set_deadline(Some(Instant::now() + Duration::from_secs(90)));
                let mut pad = |tx: &PcscTransaction<'_>| pcsc::pinpad::verify_pin_direct(tx, &features, 30);
                let pin = match &mut self.pin {
                    PinSource::Keys(keys) => PinWay::Keys { keys: &mut **keys, rules: self.rules },
                    PinSource::Pinpad => PinWay::Pad(&mut pad),
                };
                let mut gateway = self.link.calls();
                let mut around = Around { terminal: &self.terminal, link: &self.link, indicator: &self.indicator, inputs: &self.inputs };
                let mut tap = Tap {
                    terminal: &self.terminal,
                    requested: self.card_only.then_some(Mechanism::CardOnly),
                    gateway: &mut gateway,
                    pin,
                    around: &mut around,
                    clock: &SystemClock,
                    memory: &self.memory,
                    step_up,
                };
                let outcome = self.rt.block_on(tap.run(&mut piv));
                // Whatever happened, the next person gets no verified PIN:
                // a card that did not confirm the reset is reset.
                let _ = piv.into_inner().end(!outcome.pin_reset);
                outcome
            }
            Err(e) => crate::tap::Outcome { result: e.into(), card: None, pin_reset: false },
        };
        let _ = card.disconnect(false);
        (outcome.result, outcome.card)
    }
}

/// What is around one terminal's reader, for the tap flow.
struct Around<'a> {
    terminal: &'a str,
    link: &'a Link,
    indicator: &'a SharedIndicator,
    inputs: &'a Receiver<Input>,
}

impl Surroundings for Around<'_> {
    fn show(&mut self, p: Pattern) {
        if let Ok(mut i) = self.indicator.lock() {
            i.show(p);
        }
    }

    fn identified(&mut self, card: [u8; 16]) {
        self.link.report(self.terminal, |r| r.card_uuid = Some(card));
    }

    fn card_gone(&mut self) -> bool {
        // Other events during a tap (a lock pushed, a reader added) change
        // nothing the tap does.
        while let Ok(input) = self.inputs.try_recv() {
            if let Input::Reader(ReaderEvent::CardRemoved { .. } | ReaderEvent::ReaderRemoved { .. } | ReaderEvent::ServiceLost) = input {
                return true;
            }
        }
        false
    }
}
