//! Whole taps against the in-process virtual card and a scripted gateway,
//! in virtual time: each runs in milliseconds, with no pcscd.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use p256::ecdsa::signature::hazmat::PrehashVerifier;
use pivgate_hw::apdu::Ins;
use pivgate_hw::indicator::Pattern;
use pivgate_hw::keypad::entry::EntryRules;
use pivgate_hw::keypad::Key;
use pivgate_hw::piv::{Algorithm, PivClient, Slot};
use pivgate_hw::{Clock, Transport};
use pivgate_proto::card_message::{CardMessage, MECHANISM_CARD_AND_PIN, MECHANISM_CARD_ONLY};
use pivgate_vcard::{Profile, ProfileOptions, VirtualCard};
use sha2::Digest;

use super::*;
use crate::challenge::Refused;
use crate::keys::KeySource;
use crate::memory::{CardMemory, Handle};

const AGENT: &str = "pi-1";
const TERMINAL: &str = "dispatch-01";
/// The id the scripted gateway gives a card it found by its key.
const ENROLLED_KEY_ID: [u8; 16] = [0xE7; 16];

/// Virtual time: moves only when a test (or its keypad) moves it.
#[derive(Clone)]
struct VirtualClock(Arc<Mutex<(Instant, SystemTime)>>);

impl VirtualClock {
    fn new() -> Self {
        VirtualClock(Arc::new(Mutex::new((Instant::now(), SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)))))
    }
    fn advance(&self, d: Duration) {
        let mut t = self.0.lock().unwrap();
        t.0 += d;
        t.1 += d;
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Instant {
        self.0.lock().unwrap().0
    }
    fn wall(&self) -> SystemTime {
        self.0.lock().unwrap().1
    }
}

/// What the operator does at the keypad once asked.
enum Act {
    Keys(&'static str),
    Wait(Duration),
}

/// A keypad played from a script in virtual time: waiting moves the clock.
struct ScriptedKeys {
    clock: VirtualClock,
    script: VecDeque<Act>,
    pending: VecDeque<Key>,
}

impl ScriptedKeys {
    fn new(clock: &VirtualClock, script: Vec<Act>) -> Self {
        ScriptedKeys { clock: clock.clone(), script: script.into(), pending: VecDeque::new() }
    }
}

impl KeySource for ScriptedKeys {
    fn next_key(&mut self, timeout: Duration) -> Option<Key> {
        loop {
            if let Some(k) = self.pending.pop_front() {
                self.clock.advance(Duration::from_millis(200));
                return Some(k);
            }
            match self.script.pop_front() {
                Some(Act::Keys(s)) => self.pending.extend(s.chars().map(|c| Key::from_legend(c).expect("a key legend"))),
                Some(Act::Wait(d)) if d <= timeout => self.clock.advance(d),
                Some(Act::Wait(d)) => {
                    self.clock.advance(timeout);
                    self.script.push_front(Act::Wait(d - timeout));
                    return None;
                }
                None => {
                    self.clock.advance(timeout.max(Duration::from_millis(1)));
                    return None;
                }
            }
        }
    }
    // The script is what the operator types once asked: nothing is typed
    // ahead, so nothing is drained.
    fn drain(&mut self) {}
}

/// What the scripted gateway does.
#[derive(Clone, Copy, PartialEq)]
enum Plan {
    Grant,
    DenyAtBegin,
    DenyAtComplete,
    Unreachable,
    /// Sends a challenge naming another terminal.
    ForeignTerminal,
}

/// A gateway in a box: challenges built as the real one builds them, on
/// the virtual clock; signatures checked against the card's certificate.
struct ScriptedGateway {
    plan: Plan,
    want_certificate: Option<Slot>,
    pin_required: bool,
    clock: VirtualClock,
    begins: Vec<BeginRequest>,
    completions: Vec<CompleteRequest>,
    pin_failures: Vec<u32>,
    verifying_keys: std::collections::BTreeMap<Slot, p256::ecdsa::VerifyingKey>,
    last: Option<(Slot, Vec<u8>)>,
}

impl ScriptedGateway {
    fn new(plan: Plan, clock: &VirtualClock, profile: &Profile) -> Self {
        let verifying_keys = profile
            .certificates
            .iter()
            .map(|(slot, cert)| {
                let (_, x) = x509_parser::parse_x509_certificate(cert).unwrap();
                (*slot, p256::ecdsa::VerifyingKey::from_sec1_bytes(&x.public_key().subject_public_key.data).unwrap())
            })
            .collect();
        ScriptedGateway {
            plan,
            want_certificate: None,
            pin_required: true,
            clock: clock.clone(),
            begins: vec![],
            completions: vec![],
            pin_failures: vec![],
            verifying_keys,
            last: None,
        }
    }
}

impl Gateway for ScriptedGateway {
    fn agent_name(&self) -> &str {
        AGENT
    }
    fn max_clock_skew(&self) -> Duration {
        Duration::from_secs(60)
    }
    async fn begin(&mut self, req: BeginRequest) -> Result<Begun, GatewayError> {
        self.begins.push(req.clone());
        match self.plan {
            Plan::Unreachable => return Err(GatewayError::Unreachable("connection refused".into())),
            Plan::DenyAtBegin => return Ok(Begun::Denied(DenyReason::UnknownCard)),
            _ => {}
        }
        let card_only = req.requested == Some(Mechanism::CardOnly);
        // A card it cannot name (no CHUID, not met before) is found by its
        // certificate, as the gateway does for enrolled-key cards.
        let unnamed = req.card_uuid.is_none().then_some(if card_only { Slot::CardAuthentication } else { Slot::Authentication });
        if let Some(slot) = self.want_certificate.or(unnamed) {
            if req.certificate.is_none() {
                return Ok(Begun::CertificateNeeded(slot));
            }
        }
        let pin_required = self.pin_required && !card_only;
        let unix_ms = self.clock.wall().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64;
        let terminal = if self.plan == Plan::ForeignTerminal { "vault-door".to_string() } else { req.terminal.clone() };
        let message = CardMessage {
            challenge_id: [7; 16],
            nonce: [8; 32],
            gateway_id: [9; 32],
            agent: AGENT,
            terminal: &terminal,
            card_uuid: req.card_uuid.unwrap_or(ENROLLED_KEY_ID),
            mechanism: if pin_required { MECHANISM_CARD_AND_PIN } else { MECHANISM_CARD_ONLY },
            certificate_sha256: req.certificate.as_ref().map(|c| sha2::Sha256::digest(c).into()).unwrap_or([5; 32]),
            unix_ms,
        }
        .encode();
        let slot = if pin_required { Slot::Authentication } else { Slot::CardAuthentication };
        self.last = Some((slot, message.clone()));
        Ok(Begun::Challenge(Challenge { id: vec![7; 16], message, slot, algorithm: Algorithm::EccP256, pin_required, expires_in: Duration::from_secs(30) }))
    }
    async fn pin_failed(&mut self, challenge_id: Vec<u8>, terminal: String, wrong: u32) -> Result<(), GatewayError> {
        assert_eq!((challenge_id.as_slice(), terminal.as_str()), ([7; 16].as_slice(), TERMINAL));
        self.pin_failures.push(wrong);
        Ok(())
    }

    async fn complete(&mut self, req: CompleteRequest) -> Result<Completed, GatewayError> {
        self.completions.push(req.clone());
        if self.plan == Plan::DenyAtComplete {
            return Ok(Completed::Denied(DenyReason::RevokedCrl));
        }
        // The signature must be over this tap's message, by the key of
        // the slot the challenge named.
        let (slot, message) = self.last.as_ref().expect("a challenge was sent");
        let sig = p256::ecdsa::Signature::from_der(&req.signature).map_err(|e| GatewayError::Refused(e.to_string()))?;
        if self.verifying_keys[slot].verify_prehash(&sha2::Sha256::digest(message), &sig).is_err() {
            return Ok(Completed::Denied(DenyReason::BadSignature));
        }
        Ok(Completed::Granted(Grant { operator_id: "op-1".into(), operator_name: "Operator One".into(), roles: vec![], sequence: 1 }))
    }
}

/// Indicators that remember, and a card that can be pulled.
#[derive(Default)]
struct Watched {
    shown: Vec<Pattern>,
    identified: Option<[u8; 16]>,
    /// The card leaves once the PIN is asked for this many times.
    pull_at_prompt: Option<usize>,
}

impl Surroundings for Watched {
    fn show(&mut self, p: Pattern) {
        self.shown.push(p);
    }
    fn identified(&mut self, card: [u8; 16]) {
        self.identified = Some(card);
    }
    fn card_gone(&mut self) -> bool {
        self.pull_at_prompt.is_some_and(|n| self.shown.iter().filter(|p| **p == Pattern::EnterPin).count() >= n)
    }
}

/// The virtual card, which can leave the reader right after its PIN is
/// verified.
struct Reader {
    card: VirtualCard,
    pull_after_verify: bool,
    pulled: bool,
    /// The instruction byte of each command, in order.
    apdus: Vec<u8>,
}

impl Transport for Reader {
    fn transmit(&mut self, command: &[u8]) -> pivgate_hw::Result<Vec<u8>> {
        if self.pulled {
            return Err(pivgate_hw::Error::CardRemoved);
        }
        let r = self.card.transmit(command)?;
        self.apdus.push(command.get(1).copied().unwrap_or(0));
        let verified = command.get(1) == Some(&Ins::Verify.code()) && command.len() > 5 && r.ends_with(&[0x90, 0x00]);
        if verified && self.pull_after_verify {
            self.pulled = true;
        }
        Ok(r)
    }
    fn atr(&self) -> Option<&[u8]> {
        Some(self.card.atr())
    }
}

struct Run {
    outcome: Outcome,
    gateway: ScriptedGateway,
    around: Watched,
    card: VirtualCard,
    elapsed: Duration,
    apdus: Vec<u8>,
}

struct Setup {
    plan: Plan,
    keys: Vec<Act>,
    card: Option<VirtualCard>,
    requested: Option<Mechanism>,
    want_certificate: Option<Slot>,
    pull_at_prompt: Option<usize>,
    pull_after_verify: bool,
}

impl Setup {
    fn new(plan: Plan, keys: Vec<Act>) -> Setup {
        Setup { plan, keys, card: None, requested: None, want_certificate: None, pull_at_prompt: None, pull_after_verify: false }
    }
}

fn profile() -> &'static Profile {
    static P: std::sync::OnceLock<Profile> = std::sync::OnceLock::new();
    P.get_or_init(|| Profile::generate(&ProfileOptions::default()).expect("a virtual card profile"))
}

fn run(s: Setup) -> Run {
    run_remembering(s, &CardMemory::new())
}

/// A tap at an agent that remembers what earlier taps taught it.
fn run_remembering(s: Setup, memory: &CardMemory) -> Run {
    let clock = VirtualClock::new();
    let started = clock.now();
    let mut gateway = ScriptedGateway::new(s.plan, &clock, profile());
    gateway.want_certificate = s.want_certificate;
    let mut keys = ScriptedKeys::new(&clock, s.keys);
    let mut around = Watched { pull_at_prompt: s.pull_at_prompt, ..Default::default() };
    let mut reader = Reader { card: s.card.unwrap_or_else(|| profile().card()), pull_after_verify: s.pull_after_verify, pulled: false, apdus: vec![] };
    let outcome = {
        let mut piv = PivClient::new(&mut reader);
        let mut tap = Tap {
            terminal: TERMINAL,
            requested: s.requested,
            gateway: &mut gateway,
            pin: PinWay::Keys { keys: &mut keys, rules: EntryRules::default() },
            around: &mut around,
            clock: &clock,
            memory,
            step_up: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(tap.run(&mut piv))
    };
    Run { outcome, gateway, around, card: reader.card, elapsed: clock.now() - started, apdus: reader.apdus }
}

fn card_tries(piv: &mut PivClient<&mut VirtualCard>) -> u8 {
    match piv.pin_status().unwrap() {
        pivgate_hw::piv::PinStatus::TriesLeft(n) => n,
        _ => 0,
    }
}

fn verifies(card: &VirtualCard) -> u32 {
    card.commands_seen(Ins::Verify.code())
}

#[test]
fn the_right_pin_unlocks_and_leaves_no_verified_pin() {
    let r = run(Setup::new(Plan::Grant, vec![Act::Keys("123456#")]));
    assert!(matches!(&r.outcome.result, TapResult::Granted(g) if g.operator_id == "op-1"), "{:?}", r.outcome.result);
    assert_eq!(r.outcome.card, Some(profile().chuid.guid));
    assert_eq!(r.around.identified, Some(profile().chuid.guid));
    assert!(r.outcome.pin_reset);
    assert!(!r.card.pin_verified(), "the next person would find the PIN verified");
    assert_eq!(r.card.pin_tries(), 3);
    assert_eq!(r.gateway.completions.len(), 1);
    let b = &r.gateway.begins[0];
    assert_eq!((b.terminal.as_str(), b.certificate.is_none(), b.requested), (TERMINAL, true, None));
}

#[test]
fn a_wrong_pin_asks_again_and_the_tries_left_come_back() {
    let r = run(Setup::new(Plan::Grant, vec![Act::Keys("654321#"), Act::Keys("*")]));
    assert_eq!(r.outcome.result, TapResult::WrongPin { tries: 2 });
    assert_eq!(r.card.pin_tries(), 2);
    assert_eq!(r.around.shown.iter().filter(|p| **p == Pattern::EnterPin).count(), 2, "{:?}", r.around.shown);
    assert!(r.gateway.completions.is_empty(), "a signature went to the gateway without a PIN");
    // The gateway hears of the wrong PIN, for the challenge never signed.
    assert_eq!(r.gateway.pin_failures, [1]);
}

#[test]
fn a_wrong_pin_then_the_right_one_unlocks() {
    let r = run(Setup::new(Plan::Grant, vec![Act::Keys("000000#"), Act::Keys("123456#")]));
    assert!(matches!(r.outcome.result, TapResult::Granted(_)), "{:?}", r.outcome.result);
    assert_eq!(r.card.pin_tries(), 3, "a right PIN resets the counter");
    assert!(r.gateway.pin_failures.is_empty(), "a challenge that was signed is not reported");
}

#[test]
fn the_last_try_is_warned_and_then_the_card_blocks() {
    let r = run(Setup::new(Plan::Grant, vec![Act::Keys("000000#"), Act::Keys("000000#"), Act::Keys("000000#")]));
    assert_eq!(r.outcome.result, TapResult::PinBlocked);
    assert_eq!(r.card.pin_tries(), 0);
    let last_try = r.around.shown.iter().position(|p| *p == Pattern::LastTry).expect("no warning before the last try");
    assert_eq!(r.around.shown.iter().skip(last_try).filter(|p| **p == Pattern::EnterPin).count(), 1, "{:?}", r.around.shown);
}

#[test]
fn a_blocked_card_gets_no_verify_and_no_prompt() {
    let mut card = profile().card();
    {
        let mut piv = PivClient::new(&mut card);
        piv.select().unwrap();
        let wrong = pivgate_hw::Pin::new(b"000000").unwrap();
        for _ in 0..3 {
            let _ = piv.verify_pin(&wrong);
        }
        assert_eq!(card_tries(&mut piv), 0);
    }
    let r = run(Setup { card: Some(card), ..Setup::new(Plan::Grant, vec![Act::Keys("123456#")]) });
    assert_eq!(r.outcome.result, TapResult::PinBlocked);
    assert!(!r.around.shown.contains(&Pattern::EnterPin), "asked for a PIN the card cannot take");
    // The only VERIFY is the empty one that reads the status (and the reset).
    assert!(r.gateway.completions.is_empty());
    assert_eq!(r.card.pin_tries(), 0);
}

#[test]
fn no_pin_typed_ends_the_tap_at_the_idle_timeout() {
    let r = run(Setup::new(Plan::Grant, vec![]));
    assert_eq!(r.outcome.result, TapResult::NoPin);
    let idle = EntryRules::default().idle_timeout;
    assert!(r.elapsed >= idle && r.elapsed < idle + Duration::from_secs(1), "took {:?}", r.elapsed);
    assert_eq!(r.card.pin_tries(), 3);
}

#[test]
fn a_challenge_that_expires_while_the_operator_types_sends_no_pin() {
    // Slow typing: each pause under the idle limit, the whole over the
    // challenge's 30 s and the entry's total.
    let r = run(Setup::new(
        Plan::Grant,
        vec![
            Act::Keys("12"),
            Act::Wait(Duration::from_secs(9)),
            Act::Keys("34"),
            Act::Wait(Duration::from_secs(9)),
            Act::Keys("5"),
            Act::Wait(Duration::from_secs(9)),
            Act::Keys("6"),
            Act::Wait(Duration::from_secs(9)),
            Act::Keys("#"),
        ],
    ));
    assert_eq!(r.outcome.result, TapResult::NoPin);
    assert_eq!(r.card.pin_tries(), 3, "the PIN went to the card after the challenge expired");
    assert!(r.gateway.completions.is_empty());
    assert!(r.elapsed <= Duration::from_secs(31), "took {:?}", r.elapsed);
}

#[test]
fn a_card_pulled_while_the_pin_is_typed_ends_the_tap_before_verify() {
    let r = run(Setup { pull_at_prompt: Some(1), ..Setup::new(Plan::Grant, vec![Act::Keys("123456#")]) });
    assert_eq!(r.outcome.result, TapResult::CardRemoved);
    assert_eq!(r.card.pin_tries(), 3);
    assert!(!r.card.pin_verified());
    assert!(r.gateway.completions.is_empty());
}

#[test]
fn a_card_pulled_after_verify_signs_nothing() {
    let r = run(Setup { pull_after_verify: true, ..Setup::new(Plan::Grant, vec![Act::Keys("123456#")]) });
    assert_eq!(r.outcome.result, TapResult::CardRemoved);
    assert_eq!(r.card.commands_seen(Ins::GeneralAuthenticate.code()), 0);
    assert!(r.gateway.completions.is_empty());
    assert!(!r.outcome.pin_reset, "the shell must reset a card whose PIN state it could not clear");
}

#[test]
fn an_unreachable_gateway_unlocks_nothing_and_asks_no_pin() {
    let r = run(Setup::new(Plan::Unreachable, vec![Act::Keys("123456#")]));
    assert_eq!(r.outcome.result, TapResult::GatewayUnreachable);
    assert!(!r.around.shown.contains(&Pattern::EnterPin));
    assert_eq!(r.card.commands_seen(Ins::GeneralAuthenticate.code()), 0);
}

#[test]
fn the_certificate_is_sent_once_when_asked() {
    let r = run(Setup { want_certificate: Some(Slot::Authentication), ..Setup::new(Plan::Grant, vec![Act::Keys("123456#")]) });
    assert!(matches!(r.outcome.result, TapResult::Granted(_)), "{:?}", r.outcome.result);
    assert_eq!(r.gateway.begins.len(), 2);
    assert_eq!(r.gateway.begins[1].certificate.as_deref(), Some(&profile().certificates[&Slot::Authentication][..]));
}

const SELECT: u8 = 0xA4;
const GET_DATA: u8 = 0xCB;
const GET_RESPONSE: u8 = 0xC0;
const GET_SERIAL: u8 = 0xF8;
const VERIFY: u8 = 0x20;
const SIGN: u8 = 0x87;

#[test]
fn a_known_card_costs_five_apdus_with_the_pin_and_three_without() {
    let memory = CardMemory::new();
    let pin = || Setup::new(Plan::Grant, vec![Act::Keys("123456#")]);
    // Met for the first time: SELECT, CHUID, VERIFY (status), VERIFY,
    // GENERAL AUTHENTICATE, VERIFY (reset).
    let r = run_remembering(pin(), &memory);
    assert!(matches!(r.outcome.result, TapResult::Granted(_)));
    assert_eq!(r.apdus, [SELECT, GET_DATA, VERIFY, VERIFY, SIGN, VERIFY]);
    // Known: its tries are remembered from the last tap, no status asked.
    let r = run_remembering(pin(), &memory);
    assert!(matches!(r.outcome.result, TapResult::Granted(_)));
    assert_eq!(r.apdus, [SELECT, GET_DATA, VERIFY, SIGN, VERIFY]);
    assert!(r.outcome.pin_reset && !r.card.pin_verified());
    // SELECT, CHUID, GENERAL AUTHENTICATE: no VERIFY was sent, none is
    // reset.
    let r = run_remembering(Setup { requested: Some(Mechanism::CardOnly), ..Setup::new(Plan::Grant, vec![]) }, &memory);
    assert!(matches!(r.outcome.result, TapResult::Granted(_)));
    assert_eq!(r.apdus, [SELECT, GET_DATA, SIGN]);
    assert!(r.outcome.pin_reset && !r.card.pin_verified());
    // A card the gateway does not know yet: its 9A certificate too (one
    // GET DATA and the GET RESPONSE rounds of a ~600-byte certificate).
    let r = run(Setup { want_certificate: Some(Slot::Authentication), ..pin() });
    assert!(matches!(r.outcome.result, TapResult::Granted(_)));
    let cert = profile().certificates[&Slot::Authentication].len() + 8;
    assert_eq!(r.card.apdu_count(), 6 + cert.div_ceil(256), "a {cert}-byte certificate container");
}

#[test]
fn a_wrong_pin_elsewhere_is_found_out_by_the_card_not_the_memory() {
    // The memory says full tries; the card was tried wrongly twice at
    // another agent since. The card counts: a wrong PIN now blocks it, and
    // the next tap knows it is blocked without asking.
    let memory = CardMemory::new();
    let r = run_remembering(Setup::new(Plan::Grant, vec![Act::Keys("123456#")]), &memory);
    assert!(matches!(r.outcome.result, TapResult::Granted(_)));
    let mut card = profile().card();
    {
        let mut piv = PivClient::new(&mut card);
        piv.select().unwrap();
        for _ in 0..2 {
            let _ = piv.verify_pin(&pivgate_hw::Pin::new(b"000000").unwrap());
        }
        assert_eq!(card_tries(&mut piv), 1);
    }
    let r = run_remembering(Setup { card: Some(card), ..Setup::new(Plan::Grant, vec![Act::Keys("999999#")]) }, &memory);
    assert_eq!(r.outcome.result, TapResult::PinBlocked);
    assert_eq!(r.card.pin_tries(), 0);
    assert_eq!(memory.card(Handle::Guid(profile().chuid.guid)), None, "a tap that was not granted leaves no memory");
    let r = run_remembering(Setup { card: Some(r.card), ..Setup::new(Plan::Grant, vec![Act::Keys("123456#")]) }, &memory);
    assert_eq!(r.outcome.result, TapResult::PinBlocked);
    assert_eq!(r.apdus, [SELECT, GET_DATA, VERIFY, VERIFY], "status asked (tries under 2 are never assumed), no VERIFY with a PIN");
}

/// A YubiKey as the site's IT provisioned it: keys and certificates, no
/// CHUID.
fn without_chuid() -> VirtualCard {
    let mut c = profile().card();
    c.contents_mut().objects.remove(&pivgate_hw::piv::ObjectTag::CHUID.0);
    c
}

#[test]
fn a_card_without_a_chuid_is_found_by_its_certificate_then_known_by_its_serial() {
    let memory = CardMemory::new();
    let pin = || Setup { card: Some(without_chuid()), ..Setup::new(Plan::Grant, vec![Act::Keys("123456#")]) };
    let r = run_remembering(pin(), &memory);
    assert!(matches!(r.outcome.result, TapResult::Granted(_)), "{:?}", r.outcome.result);
    assert_eq!(r.gateway.begins[0].card_uuid, None, "nothing to name it by");
    assert!(r.gateway.begins[1].certificate.is_some());
    assert_eq!(&r.apdus[..4], [SELECT, GET_DATA, GET_SERIAL, GET_DATA], "CHUID missing, serial, certificate");
    assert_eq!(r.outcome.card, Some(ENROLLED_KEY_ID));
    assert_eq!(r.around.identified, Some(ENROLLED_KEY_ID), "presence reports the id the gateway knows");
    // Known by its serial: no CHUID asked, no certificate read.
    let r = run_remembering(pin(), &memory);
    assert!(matches!(r.outcome.result, TapResult::Granted(_)), "{:?}", r.outcome.result);
    assert_eq!(r.gateway.begins.len(), 1);
    assert_eq!(r.gateway.begins[0].card_uuid, Some(ENROLLED_KEY_ID));
    assert_eq!(r.apdus, [SELECT, GET_SERIAL, VERIFY, SIGN, VERIFY]);
    let r = run_remembering(Setup { card: Some(without_chuid()), requested: Some(Mechanism::CardOnly), ..Setup::new(Plan::Grant, vec![]) }, &memory);
    assert!(matches!(r.outcome.result, TapResult::Granted(_)), "{:?}", r.outcome.result);
    assert_eq!(r.apdus, [SELECT, GET_SERIAL, SIGN]);
    // A card of the same kind with another serial is not taken for it.
    let mut other = without_chuid();
    other.contents_mut().serial += 1;
    let r = run_remembering(Setup { card: Some(other), ..Setup::new(Plan::Grant, vec![Act::Keys("123456#")]) }, &memory);
    assert_eq!(r.gateway.begins[0].card_uuid, None);
    assert_eq!(&r.apdus[..3], [SELECT, GET_SERIAL, GET_DATA], "serial first, unknown, so its CHUID is looked for");
}

#[test]
fn a_card_without_a_chuid_or_a_serial_reads_its_certificate_every_tap() {
    let memory = CardMemory::new();
    let java_card = || {
        let mut c = without_chuid();
        c.set_vendor_commands(false);
        Setup { card: Some(c), ..Setup::new(Plan::Grant, vec![Act::Keys("123456#")]) }
    };
    for _ in 0..2 {
        let r = run_remembering(java_card(), &memory);
        assert!(matches!(r.outcome.result, TapResult::Granted(_)), "{:?}", r.outcome.result);
        assert_eq!(r.gateway.begins[0].card_uuid, None);
        assert!(r.gateway.begins[1].certificate.is_some());
        let rounds = r.apdus.iter().filter(|i| **i == GET_RESPONSE).count();
        assert_eq!(r.apdus.len(), 3 + 1 + rounds + 4, "SELECT, CHUID, GET SERIAL; the certificate; VERIFY x2, sign, reset");
    }
    assert_eq!(memory.cards(), 0, "nothing to remember it by");
}

#[test]
fn a_card_answering_another_cards_serial_leaves_nothing_behind() {
    // A hostile card answers a known card's serial and reports tries of
    // its own: the tap is not granted, and the real card's next tap starts
    // afresh (no planted id, no planted tries).
    let memory = CardMemory::new();
    let pin = |plan| Setup { card: Some(without_chuid()), ..Setup::new(plan, vec![Act::Keys("123456#")]) };
    assert!(matches!(run_remembering(pin(Plan::Grant), &memory).outcome.result, TapResult::Granted(_)));
    let serial = profile().card().contents().serial;
    let r = run_remembering(Setup { card: Some(without_chuid()), ..Setup::new(Plan::Grant, vec![Act::Keys("999999#"), Act::Keys("*")]) }, &memory);
    assert!(matches!(r.outcome.result, TapResult::WrongPin { .. }), "{:?}", r.outcome.result);
    assert!(memory.card(Handle::Serial(serial)).is_none(), "a tap that was not granted left a memory");
}

#[test]
fn a_remembered_card_that_is_denied_is_forgotten() {
    // Another card with the same CHUID GUID, or a card revoked since: the
    // memory costs one denied tap, then the card is looked up afresh.
    let memory = CardMemory::new();
    let pin = |plan| Setup { card: Some(without_chuid()), ..Setup::new(plan, vec![Act::Keys("123456#")]) };
    assert!(matches!(run_remembering(pin(Plan::Grant), &memory).outcome.result, TapResult::Granted(_)));
    let serial = profile().card().contents().serial;
    assert!(memory.card(Handle::Serial(serial)).is_some());
    let r = run_remembering(pin(Plan::DenyAtComplete), &memory);
    assert_eq!(r.outcome.result, TapResult::Denied(DenyReason::RevokedCrl));
    assert!(memory.card(Handle::Serial(serial)).is_none());
    let r = run_remembering(pin(Plan::Grant), &memory);
    assert!(matches!(r.outcome.result, TapResult::Granted(_)));
    assert_eq!(r.gateway.begins[0].card_uuid, None, "looked up afresh");
}

#[test]
fn card_only_signs_with_9e_and_no_pin() {
    let r = run(Setup { requested: Some(Mechanism::CardOnly), ..Setup::new(Plan::Grant, vec![]) });
    assert!(matches!(r.outcome.result, TapResult::Granted(_)), "{:?}", r.outcome.result);
    assert_eq!(r.gateway.begins[0].requested, Some(Mechanism::CardOnly));
    assert!(!r.around.shown.contains(&Pattern::EnterPin));
    assert_eq!(r.elapsed, Duration::ZERO);
}

#[test]
fn a_denial_at_begin_asks_no_pin_and_signs_nothing() {
    let r = run(Setup::new(Plan::DenyAtBegin, vec![Act::Keys("123456#")]));
    assert_eq!(r.outcome.result, TapResult::Denied(DenyReason::UnknownCard));
    assert!(!r.around.shown.contains(&Pattern::EnterPin));
    assert_eq!(r.card.commands_seen(Ins::GeneralAuthenticate.code()), 0);
}

#[test]
fn a_denial_at_completion_is_the_result_and_the_pin_is_reset() {
    let r = run(Setup::new(Plan::DenyAtComplete, vec![Act::Keys("123456#")]));
    assert_eq!(r.outcome.result, TapResult::Denied(DenyReason::RevokedCrl));
    assert!(!r.card.pin_verified());
}

#[test]
fn a_challenge_for_another_terminal_is_refused_before_the_pin() {
    let r = run(Setup::new(Plan::ForeignTerminal, vec![Act::Keys("123456#")]));
    assert!(matches!(r.outcome.result, TapResult::Refused(Refused::OtherTerminal(_))), "{:?}", r.outcome.result);
    assert!(!r.around.shown.contains(&Pattern::EnterPin));
    assert_eq!(verifies(&r.card), 1, "only the reset's VERIFY");
    assert_eq!(r.card.commands_seen(Ins::GeneralAuthenticate.code()), 0);
}

#[test]
fn a_card_that_cannot_reset_its_pin_state_is_left_to_the_shell_to_reset() {
    // Cards made to SP 800-73-3 refuse VERIFY P1=FF; the flow says so and
    // the terminal shell resets the card.
    let mut card = profile().card();
    card.set_verify_reset(false);
    let r = run(Setup { card: Some(card), ..Setup::new(Plan::Grant, vec![Act::Keys("123456#")]) });
    assert!(matches!(r.outcome.result, TapResult::Granted(_)), "{:?}", r.outcome.result);
    assert!(!r.outcome.pin_reset);
    assert!(r.card.pin_verified(), "the in-process card is not reset by the flow itself");
}

#[test]
fn a_pin_always_key_signs_because_the_pin_comes_right_before() {
    // A token whose 9A key asks for the PIN before every signature (the
    // YubiKey "always" policy): the flow's VERIFY directly precedes GENERAL
    // AUTHENTICATE, every tap.
    let memory = CardMemory::new();
    let mut card = profile().card();
    card.contents_mut().origins.insert(
        Slot::Authentication,
        pivgate_vcard::KeyOrigin { generated: true, pin: pivgate_vcard::PinPolicy::Always, touch: pivgate_vcard::TouchPolicy::Never },
    );
    let mut r = run_remembering(Setup { card: Some(card), ..Setup::new(Plan::Grant, vec![Act::Keys("123456#")]) }, &memory);
    for _ in 0..2 {
        assert!(matches!(r.outcome.result, TapResult::Granted(_)), "{:?}", r.outcome.result);
        assert!(!r.card.pin_verified());
        r = run_remembering(Setup { card: Some(r.card), ..Setup::new(Plan::Grant, vec![Act::Keys("123456#")]) }, &memory);
    }
}
