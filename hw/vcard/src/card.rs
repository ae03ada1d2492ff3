//! The card side of SP 800-73-4 Part 2, sans-IO.
//!
//! [`VirtualCard::process`] takes one command APDU and returns the response
//! APDU together with how long a real card would have taken (the latency
//! model). The caller decides whether to sleep: the vpcd connector does, the
//! in-process transport may not. Every command is parsed into a [`Cmd`]
//! first; the handlers act only on parsed values.

use std::collections::BTreeMap;
use std::time::Duration;

use rand_core::{CryptoRngCore, OsRng};
use zeroize::Zeroizing;

use pivgate_hw::apdu::{Ins, StatusWord};
use pivgate_hw::piv::{Algorithm, KeyRef, ObjectTag, Slot, PIV_AID, PIV_AID_TRUNCATED};
use pivgate_hw::tlv;

use super::attestation::{Attestation, KeyOrigin, PinPolicy, TouchPolicy};
use super::keys::{CardKey, ManagementKey};
use super::{Fault, Latency};

/// The ATR the virtual card presents: a PIV card with the PIV AID in its
/// historical bytes (compact-TLV F9), so middleware treats it as a plain
/// PIV card with no vendor quirks.
pub const ATR: [u8; 16] = [0x3B, 0x8B, 0x80, 0x01, 0x80, 0xF9, 0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0xC8];

/// The ATR of a virtual card that takes extended-length APDUs: [`ATR`]
/// with card capabilities (compact-TLV 73: command chaining and extended
/// Lc/Le, ISO/IEC 7816-4 §12.1.1.9) in its historical bytes.
pub const ATR_EXTENDED: [u8; 20] = [0x3B, 0x8F, 0x80, 0x01, 0x80, 0xF9, 0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x73, 0x00, 0x00, 0xC0, 0x7F];

/// The object holding the attestation key's certificate (YubiKey).
pub const ATTESTATION_OBJECT: u32 = 0x5FFF01;

/// The firmware version the card reports (GET VERSION) and attests.
pub const FIRMWARE: [u8; 3] = [5, 4, 3];

/// Retry counter for PIN and PUK after personalisation.
pub const DEFAULT_TRIES: u8 = 3;

/// What the card holds: keys, data objects and reference data.
#[derive(Clone)]
pub struct CardContents {
    /// Asymmetric keys by slot.
    pub keys: BTreeMap<Slot, CardKey>,
    /// Data objects: the contents of each `53` container, by tag; the
    /// Discovery object is stored whole (`7E ...`).
    pub objects: BTreeMap<u32, Vec<u8>>,
    /// The PIN, padded with 0xFF to 8 bytes.
    pub pin: Zeroizing<[u8; 8]>,
    /// The PUK, padded with 0xFF to 8 bytes.
    pub puk: Zeroizing<[u8; 8]>,
    /// The card management key.
    pub management_key: ManagementKey,
    /// Serial number (vendor GET SERIAL).
    pub serial: u32,
    /// PIN tries before it blocks.
    pub pin_tries_max: u8,
    /// Where each slot's key came from and its PIN and touch policies; a
    /// slot not listed holds a key put there from outside
    /// ([`KeyOrigin::imported`]).
    pub origins: BTreeMap<Slot, KeyOrigin>,
    /// The attestation key and certificate (slot F9), when the card can
    /// attest (YubiKeys can; most Java Card applets cannot).
    pub attestation: Option<Attestation>,
}

impl CardContents {
    /// Where the key in `slot` came from.
    pub fn origin(&self, slot: Slot) -> KeyOrigin {
        self.origins.get(&slot).copied().unwrap_or_else(|| KeyOrigin::imported(slot))
    }
}

impl CardContents {
    /// A token as it leaves the factory (a new YubiKey in PIV mode): no
    /// keys, no data objects (no CHUID), PIN 123456, PUK 12345678, the
    /// well-known default 3DES management key.
    pub fn blank(serial: u32) -> CardContents {
        let padded = |s: &[u8]| {
            let mut out = Zeroizing::new([0xFFu8; 8]);
            out[..s.len()].copy_from_slice(s);
            out
        };
        CardContents {
            keys: BTreeMap::new(),
            objects: BTreeMap::new(),
            pin: padded(b"123456"),
            puk: padded(b"12345678"),
            management_key: ManagementKey::TripleDes(Zeroizing::new(super::keys::DEFAULT_MANAGEMENT_KEY)),
            serial,
            pin_tries_max: DEFAULT_TRIES,
            origins: BTreeMap::new(),
            attestation: None,
        }
    }
}

/// Which AIDs a card's SELECT accepts. SP 800-73-4 lets a client select by
/// the right-truncated AID (`A0 00 00 03 08 00 00 10 00`), and most cards
/// take any prefix of the whole AID; some Java Card applets match only the
/// whole 11-byte AID, and some tokens only the 9-byte truncation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AidMatch {
    /// Any prefix of the whole AID of at least 5 bytes (the RID).
    #[default]
    Prefix,
    /// The whole 11-byte AID only.
    FullOnly,
    /// The 9-byte truncation only.
    TruncatedOnly,
}

/// One answer: the response APDU and the time a real card would take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Response data and status word.
    pub response: Vec<u8>,
    /// Modelled card time.
    pub delay: Duration,
    /// The card leaves the reader instead of answering (fault mode).
    pub disconnect: bool,
}

/// A command after parsing (ISO 7816-4 cases 1 to 4, short or extended).
struct Apdu<'a> {
    cla: u8,
    ins: u8,
    p1: u8,
    p2: u8,
    data: &'a [u8],
    le: Option<usize>,
}

fn parse_apdu(raw: &[u8]) -> Result<Apdu<'_>, StatusWord> {
    if raw.len() < 4 {
        return Err(StatusWord::WRONG_LENGTH);
    }
    let (cla, ins, p1, p2) = (raw[0], raw[1], raw[2], raw[3]);
    let body = &raw[4..];
    let short_le = |b: u8| if b == 0 { 256 } else { usize::from(b) };
    let ext_le = |hi: u8, lo: u8| match u16::from_be_bytes([hi, lo]) {
        0 => 65536,
        n => usize::from(n),
    };
    let (data, le) = match body.len() {
        0 => (&[][..], None),
        1 => (&[][..], Some(short_le(body[0]))),
        _ if body[0] != 0 => {
            let lc = usize::from(body[0]);
            match body.len() - 1 {
                n if n == lc => (&body[1..], None),
                n if n == lc + 1 => (&body[1..=lc], Some(short_le(body[lc + 1]))),
                _ => return Err(StatusWord::WRONG_LENGTH),
            }
        }
        // Extended length: 00, then Le or Lc in two bytes.
        2 => return Err(StatusWord::WRONG_LENGTH),
        3 => (&[][..], Some(ext_le(body[1], body[2]))),
        _ => {
            let lc = usize::from(u16::from_be_bytes([body[1], body[2]]));
            match body.len() - 3 {
                n if n == lc && lc > 0 => (&body[3..], None),
                n if n == lc + 2 && lc > 0 => (&body[3..3 + lc], Some(ext_le(body[3 + lc], body[4 + lc]))),
                _ => return Err(StatusWord::WRONG_LENGTH),
            }
        }
    };
    Ok(Apdu { cla, ins, p1, p2, data, le })
}

/// The commands the card understands, parsed from an APDU.
enum Cmd<'a> {
    Select { aid: &'a [u8] },
    GetData { tag: u32 },
    PutData { tag: u32, contents: &'a [u8] },
    VerifyStatus,
    Verify { pin: &'a [u8] },
    VerifyReset,
    ChangeReference { puk: bool, old: &'a [u8], new: &'a [u8] },
    ResetRetryCounter { puk: &'a [u8], new_pin: &'a [u8] },
    GeneralAuthenticate { alg: u8, key: KeyRef, template: &'a [u8] },
    GenerateKeyPair { slot: Slot, alg: u8, pin: PinPolicy, touch: TouchPolicy },
    Attest { slot: Slot },
    SetManagementKey { alg: u8, key: &'a [u8] },
    ResetApplication,
    GetResponse,
    GetVersion,
    GetSerial,
    GetMetadata { key: KeyRef },
}

/// P1 P2 of GET DATA and PUT DATA (SP 800-73-4 Part 2, §3.1.2, §3.3.1).
const DATA_P1P2: (u8, u8) = (0x3F, 0xFF);
/// P1 of VERIFY: 00 verifies, FF resets the security status.
const VERIFY_CHECK: u8 = 0x00;
const VERIFY_RESET: u8 = 0xFF;
/// A PIN or PUK as VERIFY and CHANGE REFERENCE DATA carry it: 8 bytes,
/// padded with FF.
const PADDED_LEN: usize = 8;

/// The object tag of a GET DATA / PUT DATA tag list (5C), 1 to 3 bytes.
fn object_tag(v: &[u8]) -> Result<u32, StatusWord> {
    if v.is_empty() || v.len() > 3 {
        return Err(StatusWord::INCORRECT_DATA);
    }
    Ok(v.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)))
}

fn parse_cmd<'a>(a: &Apdu<'a>) -> Result<Cmd<'a>, StatusWord> {
    let p1p2 = (a.p1, a.p2);
    let key = KeyRef::from_code(a.p2);
    Ok(match Ins::from_code(a.ins) {
        Ins::Select if p1p2 == (0x04, 0x00) => Cmd::Select { aid: a.data },
        Ins::Select => return Err(StatusWord::INCORRECT_P1P2),
        Ins::GetData | Ins::PutData if p1p2 != DATA_P1P2 => return Err(StatusWord::INCORRECT_P1P2),
        Ins::GetData => {
            let v = tlv::expect_single(a.data, 0x5C).ok().flatten().ok_or(StatusWord::INCORRECT_DATA)?;
            Cmd::GetData { tag: object_tag(v)? }
        }
        Ins::PutData => {
            let (t, rest) = tlv::parse_one(a.data).map_err(|_| StatusWord::INCORRECT_DATA)?;
            if t.tag != 0x5C {
                return Err(StatusWord::INCORRECT_DATA);
            }
            let tag = object_tag(t.value)?;
            let contents = tlv::expect_single(rest, 0x53).ok().flatten().ok_or(StatusWord::INCORRECT_DATA)?;
            Cmd::PutData { tag, contents }
        }
        Ins::Verify => match (a.p1, key, a.data.len()) {
            (VERIFY_CHECK, Some(KeyRef::Pin), 0) => Cmd::VerifyStatus,
            (VERIFY_CHECK, Some(KeyRef::Pin), PADDED_LEN) => Cmd::Verify { pin: a.data },
            (VERIFY_RESET, Some(KeyRef::Pin), 0) => Cmd::VerifyReset,
            (VERIFY_CHECK | VERIFY_RESET, Some(KeyRef::Pin), _) => return Err(StatusWord::INCORRECT_DATA),
            // No Global PIN on this card.
            (_, Some(KeyRef::GlobalPin), _) => return Err(StatusWord::REFERENCE_NOT_FOUND),
            _ => return Err(StatusWord::INCORRECT_P1P2),
        },
        Ins::ChangeReferenceData | Ins::ResetRetryCounter if a.p1 != 0 => return Err(StatusWord::INCORRECT_P1P2),
        Ins::ChangeReferenceData if a.data.len() != 2 * PADDED_LEN => return Err(StatusWord::INCORRECT_DATA),
        Ins::ChangeReferenceData => match key {
            Some(k @ (KeyRef::Pin | KeyRef::Puk)) => Cmd::ChangeReference { puk: k == KeyRef::Puk, old: &a.data[..PADDED_LEN], new: &a.data[PADDED_LEN..] },
            _ => return Err(StatusWord::REFERENCE_NOT_FOUND),
        },
        Ins::ResetRetryCounter if key != Some(KeyRef::Pin) => return Err(StatusWord::REFERENCE_NOT_FOUND),
        Ins::ResetRetryCounter if a.data.len() != 2 * PADDED_LEN => return Err(StatusWord::INCORRECT_DATA),
        Ins::ResetRetryCounter => Cmd::ResetRetryCounter { puk: &a.data[..PADDED_LEN], new_pin: &a.data[PADDED_LEN..] },
        Ins::GeneralAuthenticate => {
            let template = tlv::expect_single(a.data, 0x7C).ok().flatten().ok_or(StatusWord::INCORRECT_DATA)?;
            match key {
                Some(key @ KeyRef::Key(_)) => Cmd::GeneralAuthenticate { alg: a.p1, key, template },
                _ => return Err(StatusWord::INCORRECT_P1P2),
            }
        }
        Ins::GenerateAsymmetricKeyPair => {
            let slot = match key {
                Some(KeyRef::Key(s)) if a.p1 == 0 && s != Slot::Management => s,
                _ => return Err(StatusWord::INCORRECT_P1P2),
            };
            let ac = tlv::expect_single(a.data, 0xAC).ok().flatten().ok_or(StatusWord::INCORRECT_DATA)?;
            let alg = tlv::find(ac, 0x80).ok().flatten().filter(|v| v.len() == 1).ok_or(StatusWord::INCORRECT_DATA)?;
            // YubiKey extensions: AA the PIN policy, AB the touch policy.
            let byte = |tag| match tlv::find(ac, tag) {
                Ok(Some([b])) => Ok(*b),
                Ok(None) => Ok(0),
                _ => Err(StatusWord::INCORRECT_DATA),
            };
            let pin = PinPolicy::from_code(byte(0xAA)?, slot).ok_or(StatusWord::INCORRECT_DATA)?;
            let touch = TouchPolicy::from_code(byte(0xAB)?).ok_or(StatusWord::INCORRECT_DATA)?;
            Cmd::GenerateKeyPair { slot, alg: alg[0], pin, touch }
        }
        Ins::GetResponse => Cmd::GetResponse,
        // Vendor commands that YubiKey-aware tools send; harmless to others.
        Ins::YubicoGetVersion => Cmd::GetVersion,
        Ins::YubicoGetSerial => Cmd::GetSerial,
        Ins::YubicoGetMetadata => Cmd::GetMetadata { key: key.ok_or(StatusWord::REFERENCE_NOT_FOUND)? },
        Ins::Other(0xFB) if (a.p1, a.p2) == (0, 0) => Cmd::ResetApplication,
        // P1 FF; P2 FF (no touch) or FE (touch); data: algorithm, 9B, key.
        Ins::YubicoSetManagementKey => match (a.p1, a.p2, a.data) {
            (0xFF, 0xFE | 0xFF, [alg, 0x9B, len, key @ ..]) if usize::from(*len) == key.len() => Cmd::SetManagementKey { alg: *alg, key },
            (0xFF, 0xFE | 0xFF, _) => return Err(StatusWord::INCORRECT_DATA),
            _ => return Err(StatusWord::INCORRECT_P1P2),
        },
        Ins::YubicoAttest => match Slot::from_key_ref(a.p1) {
            Some(s) if s != Slot::Management && a.p2 == 0 => Cmd::Attest { slot: s },
            _ => return Err(StatusWord::INCORRECT_P1P2),
        },
        Ins::Other(_) => return Err(StatusWord::INS_NOT_SUPPORTED),
    })
}

type Reply = Result<Vec<u8>, StatusWord>;

enum MgmtState {
    None,
    /// A witness was sent encrypted; the host must return it decrypted.
    Witness(Vec<u8>),
    /// A challenge was sent; the host must return it encrypted.
    Challenge(Vec<u8>),
}

/// A PIV card in memory.
pub struct VirtualCard {
    contents: CardContents,
    pin_tries: u8,
    puk_tries: u8,
    pin_verified: bool,
    mgmt_authenticated: bool,
    mgmt: MgmtState,
    pending: Vec<u8>,
    chain: Option<([u8; 4], Vec<u8>)>,
    latency: Latency,
    aid_match: AidMatch,
    extended_atr: bool,
    verify_reset: bool,
    vendor_commands: bool,
    warm_resets: u32,
    faults: Vec<Fault>,
    rng: Box<dyn CryptoRngCore + Send>,
    apdus: usize,
    /// Command APDUs seen, by instruction byte (what a test asks the card
    /// later: "was it ever asked to sign?").
    by_ins: Box<[u32; 256]>,
}

const MAX_CHAIN: usize = 64 * 1024;

impl VirtualCard {
    /// A card with the given contents, full retry counters, no latency and
    /// no faults, drawing randomness from the OS.
    pub fn new(contents: CardContents) -> Self {
        let tries = contents.pin_tries_max;
        VirtualCard {
            contents,
            pin_tries: tries,
            puk_tries: DEFAULT_TRIES,
            pin_verified: false,
            mgmt_authenticated: false,
            mgmt: MgmtState::None,
            pending: Vec::new(),
            chain: None,
            latency: Latency::default(),
            aid_match: AidMatch::default(),
            extended_atr: false,
            verify_reset: true,
            vendor_commands: true,
            warm_resets: 0,
            faults: Vec::new(),
            rng: Box::new(OsRng),
            apdus: 0,
            by_ins: Box::new([0; 256]),
        }
    }

    /// How many command APDUs with instruction byte `ins` the card has
    /// received (0x87: GENERAL AUTHENTICATE, 0x20: VERIFY).
    pub fn commands_seen(&self, ins: u8) -> u32 {
        self.by_ins[usize::from(ins)]
    }

    /// Sets the latency model.
    pub fn set_latency(&mut self, latency: Latency) {
        self.latency = latency;
    }

    /// Sets which AIDs SELECT accepts (cards differ: see [`AidMatch`]).
    pub fn set_aid_match(&mut self, aid_match: AidMatch) {
        self.aid_match = aid_match;
    }

    /// Adds a fault (hostile behaviour) for tests.
    pub fn add_fault(&mut self, fault: Fault) {
        self.faults.push(fault);
    }

    /// Removes all faults.
    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// Replaces the randomness source (tests make it deterministic).
    pub fn set_rng(&mut self, rng: Box<dyn CryptoRngCore + Send>) {
        self.rng = rng;
    }

    /// The card's contents.
    pub fn contents(&self) -> &CardContents {
        &self.contents
    }

    /// Mutable contents, to plant objects (including hostile ones).
    pub fn contents_mut(&mut self) -> &mut CardContents {
        &mut self.contents
    }

    /// PIN tries left.
    pub fn pin_tries(&self) -> u8 {
        self.pin_tries
    }

    /// Whether the PIN is verified in this session.
    pub fn pin_verified(&self) -> bool {
        self.pin_verified
    }

    /// APDUs processed since creation.
    pub fn apdu_count(&self) -> usize {
        self.apdus
    }

    /// The ATR.
    pub fn atr(&self) -> &'static [u8] {
        if self.extended_atr {
            &ATR_EXTENDED
        } else {
            &ATR
        }
    }

    /// Whether VERIFY with P1 FF resets the PIN's security status
    /// (SP 800-73-4); cards made to SP 800-73-3 refuse it with 6A86, and
    /// only a card reset clears their PIN.
    pub fn set_verify_reset(&mut self, supported: bool) {
        self.verify_reset = supported;
    }

    /// Whether the card answers the YubiKey extensions (GET VERSION, GET
    /// SERIAL, GET METADATA), as YubiKeys do; Java Card PIV applets and
    /// government cards refuse them with 6D00.
    pub fn set_vendor_commands(&mut self, answered: bool) {
        self.vendor_commands = answered;
    }

    /// A warm reset from the reader (an application ending its
    /// transaction with SCARD_RESET_CARD): the card's state is cleared as
    /// at power-on, and counted.
    pub fn warm_reset(&mut self) {
        self.warm_resets += 1;
        self.reset();
    }

    /// How many warm resets the reader asked for.
    pub fn warm_resets(&self) -> u32 {
        self.warm_resets
    }

    /// Announces extended-length APDUs in the ATR ([`ATR_EXTENDED`]), as
    /// cards that take them do; the card parses both forms either way.
    pub fn set_extended_length(&mut self, announce: bool) {
        self.extended_atr = announce;
    }

    /// Power-up or warm reset: volatile state goes, counters stay. PIV is
    /// selected by default after reset, as on most PIV cards.
    pub fn reset(&mut self) {
        self.pin_verified = false;
        self.mgmt_authenticated = false;
        self.mgmt = MgmtState::None;
        self.pending.clear();
        self.chain = None;
    }

    /// Processes one command APDU.
    pub fn process(&mut self, raw: &[u8]) -> Answer {
        self.apdus += 1;
        if let Some(&ins) = raw.get(1) {
            self.by_ins[usize::from(ins)] = self.by_ins[usize::from(ins)].saturating_add(1);
        }
        let mut delay = self.latency.per_apdu + self.latency.per_byte * (raw.len() as u32 + 2);
        for f in &self.faults {
            match f {
                Fault::DropAt(n) if *n == self.apdus => {
                    return Answer { response: vec![], delay, disconnect: true };
                }
                Fault::Slow(d) => delay += *d,
                _ => {}
            }
        }
        if let Some(resp) = self.fault_response(raw) {
            delay += self.latency.per_byte * resp.len() as u32;
            return Answer { response: resp, delay, disconnect: false };
        }
        let (response, extra) = self.process_inner(raw);
        delay += extra + self.latency.per_byte * response.len() as u32;
        Answer { response, delay, disconnect: false }
    }

    fn fault_response(&mut self, raw: &[u8]) -> Option<Vec<u8>> {
        let ins = *raw.get(1)?;
        for f in &self.faults {
            match f {
                Fault::Respond { ins: i, object, response } if *i == ins => {
                    let matches = match object {
                        None => true,
                        Some(tag) => {
                            let want = tlv::encode(0x5C, &ObjectTag(*tag).encoded());
                            raw.windows(want.len()).any(|w| w == want.as_slice())
                        }
                    };
                    if matches {
                        return Some(response.clone());
                    }
                }
                Fault::EndlessChain if Ins::from_code(ins) == Ins::GetResponse => {
                    let mut r = vec![0x5A; 256];
                    r.extend_from_slice(&[0x61, 0x00]);
                    return Some(r);
                }
                _ => {}
            }
        }
        None
    }

    fn process_inner(&mut self, raw: &[u8]) -> (Vec<u8>, Duration) {
        let apdu = match parse_apdu(raw) {
            Ok(a) => a,
            Err(sw) => return (sw_only(sw), Duration::ZERO),
        };
        if apdu.cla & !0x10 != 0 {
            return (sw_only(StatusWord::CLA_NOT_SUPPORTED), Duration::ZERO);
        }
        // Any command other than GET RESPONSE discards pending output.
        if apdu.ins != 0xC0 {
            self.pending.clear();
        }
        // Command chaining (ISO 7816-4 §5.1.1.1): collect until the last part.
        let header = [apdu.cla & !0x10, apdu.ins, apdu.p1, apdu.p2];
        let mut joined: Option<Vec<u8>> = None;
        if let Some((h, buf)) = self.chain.take() {
            if h == header {
                let mut buf = buf;
                buf.extend_from_slice(apdu.data);
                if buf.len() > MAX_CHAIN {
                    return (sw_only(StatusWord::WRONG_LENGTH), Duration::ZERO);
                }
                if apdu.cla & 0x10 != 0 {
                    self.chain = Some((h, buf));
                    return (sw_only(StatusWord::SUCCESS), Duration::ZERO);
                }
                joined = Some(buf);
            }
        }
        if joined.is_none() && apdu.cla & 0x10 != 0 {
            use Ins::*;
            if !matches!(Ins::from_code(apdu.ins), GeneralAuthenticate | PutData | GenerateAsymmetricKeyPair | ChangeReferenceData | ResetRetryCounter) {
                return (sw_only(StatusWord::CHAINING_NOT_SUPPORTED), Duration::ZERO);
            }
            self.chain = Some((header, apdu.data.to_vec()));
            return (sw_only(StatusWord::SUCCESS), Duration::ZERO);
        }
        let data = joined.as_deref().unwrap_or(apdu.data);
        let full = Apdu { data, ..apdu };
        let le = full.le.unwrap_or(256);
        let (reply, extra) = match parse_cmd(&full) {
            // Nothing pending: refused (6985), as real cards do, not 9000.
            Ok(Cmd::GetResponse) if !self.pending.is_empty() => return (self.take_pending(le), Duration::ZERO),
            Ok(cmd) => self.execute(cmd),
            Err(sw) => (Err(sw), Duration::ZERO),
        };
        let out = match reply {
            Ok(body) => {
                self.pending = body;
                self.take_pending(le)
            }
            Err(sw) => sw_only(sw),
        };
        (out, extra)
    }

    /// Returns up to `le` bytes of pending output with 61xx while more
    /// remains, or 9000 with the last part.
    fn take_pending(&mut self, le: usize) -> Vec<u8> {
        let n = le.min(self.pending.len());
        let mut out: Vec<u8> = self.pending.drain(..n).collect();
        let left = self.pending.len();
        if left == 0 {
            out.extend_from_slice(&[0x90, 0x00]);
        } else {
            out.extend_from_slice(&[0x61, if left >= 256 { 0 } else { left as u8 }]);
        }
        out
    }

    fn execute(&mut self, cmd: Cmd<'_>) -> (Reply, Duration) {
        let z = Duration::ZERO;
        match cmd {
            Cmd::Select { aid } => (self.select(aid), z),
            Cmd::GetData { tag } => (self.get_data(tag), z),
            Cmd::PutData { tag, contents } => (self.put_data(tag, contents), z),
            Cmd::VerifyStatus => (self.verify_status(), z),
            Cmd::Verify { pin } => (self.verify(pin), self.latency.per_verify),
            Cmd::VerifyReset if !self.verify_reset => (Err(StatusWord::INCORRECT_P1P2), z),
            Cmd::VerifyReset => {
                self.pin_verified = false;
                (Ok(vec![]), z)
            }
            Cmd::ChangeReference { puk, old, new } => (self.change_reference(puk, old, new), self.latency.per_verify),
            Cmd::ResetRetryCounter { puk, new_pin } => (self.reset_retry_counter(puk, new_pin), self.latency.per_verify),
            Cmd::GeneralAuthenticate { alg, key, template } => self.general_authenticate(alg, key, template),
            Cmd::GetVersion | Cmd::GetSerial | Cmd::GetMetadata { .. } | Cmd::Attest { .. } | Cmd::SetManagementKey { .. } if !self.vendor_commands => {
                (Err(StatusWord::INS_NOT_SUPPORTED), z)
            }
            Cmd::SetManagementKey { alg, key } => (self.set_management_key(alg, key), z),
            Cmd::ResetApplication if !self.vendor_commands => (Err(StatusWord::INS_NOT_SUPPORTED), z),
            Cmd::ResetApplication => (self.reset_application(), z),
            Cmd::GenerateKeyPair { slot, alg, pin, touch } => (self.generate(slot, alg, pin, touch), self.latency.per_signature * 4),
            Cmd::Attest { slot } => (self.attest(slot), self.latency.per_signature),
            Cmd::GetResponse => (Err(StatusWord::CONDITIONS_NOT_SATISFIED), z),
            Cmd::GetVersion => (Ok(FIRMWARE.to_vec()), z),
            Cmd::GetSerial => (Ok(self.contents.serial.to_be_bytes().to_vec()), z),
            Cmd::GetMetadata { key } => (self.metadata(key), z),
        }
    }

    /// SELECT by full or right-truncated AID (SP 800-73-4 Part 2, §3.1.1).
    /// Re-selecting PIV keeps the security status, as cards do.
    fn select(&mut self, aid: &[u8]) -> Reply {
        let accepted = match self.aid_match {
            AidMatch::Prefix => aid.len() >= 5 && PIV_AID.starts_with(aid),
            AidMatch::FullOnly => aid == PIV_AID,
            AidMatch::TruncatedOnly => aid == PIV_AID_TRUNCATED,
        };
        if !accepted {
            return Err(StatusWord::NOT_FOUND);
        }
        let mut apt = Vec::new();
        tlv::write(&mut apt, 0x4F, &PIV_AID[5..]);
        let mut authority = Vec::new();
        tlv::write(&mut authority, 0x4F, &PIV_AID[..5]);
        tlv::write(&mut apt, 0x79, &authority);
        tlv::write(&mut apt, 0x50, b"pivgate virtual PIV card");
        let mut algs = Vec::new();
        for a in [Algorithm::TripleDes, Algorithm::Aes128, Algorithm::Aes192, Algorithm::Aes256, Algorithm::Rsa2048, Algorithm::EccP256, Algorithm::EccP384] {
            tlv::write(&mut algs, 0x80, &[a.id()]);
        }
        tlv::write(&mut algs, 0x06, &[0x00]);
        tlv::write(&mut apt, 0xAC, &algs);
        Ok(tlv::encode(0x61, &apt))
    }

    fn get_data(&mut self, tag: u32) -> Reply {
        if ObjectTag(tag).read_needs_pin() && !self.pin_verified {
            return Err(StatusWord::SECURITY_STATUS_NOT_SATISFIED);
        }
        // The attestation certificate (YubiKey object 5FFF01), when the
        // card can attest.
        if tag == ATTESTATION_OBJECT {
            let att = self.contents.attestation.as_ref().ok_or(StatusWord::NOT_FOUND)?;
            return Ok(tlv::encode(0x53, &pivgate_hw::piv::objects::certificate_container(&att.certificate, false)));
        }
        let stored = self.contents.objects.get(&tag).ok_or(StatusWord::NOT_FOUND)?;
        if tag == ObjectTag::DISCOVERY.0 {
            return Ok(stored.clone());
        }
        Ok(tlv::encode(0x53, stored))
    }

    fn put_data(&mut self, tag: u32, contents: &[u8]) -> Reply {
        if !self.mgmt_authenticated {
            return Err(StatusWord::SECURITY_STATUS_NOT_SATISFIED);
        }
        if !(0x5FC101..=0x5FC123).contains(&tag) {
            return Err(StatusWord::NOT_FOUND);
        }
        if contents.is_empty() {
            self.contents.objects.remove(&tag);
        } else {
            self.contents.objects.insert(tag, contents.to_vec());
        }
        Ok(vec![])
    }

    fn verify_status(&self) -> Reply {
        if self.pin_tries == 0 {
            Err(StatusWord::AUTH_METHOD_BLOCKED)
        } else if self.pin_verified {
            Ok(vec![])
        } else {
            Err(StatusWord::verify_failed(self.pin_tries))
        }
    }

    fn verify(&mut self, pin: &[u8]) -> Reply {
        if self.pin_tries == 0 {
            return Err(StatusWord::AUTH_METHOD_BLOCKED);
        }
        if !padded_pin_ok(pin) {
            return Err(StatusWord::INCORRECT_DATA);
        }
        if ct_eq(pin, &self.contents.pin[..]) {
            self.pin_tries = self.contents.pin_tries_max;
            self.pin_verified = true;
            Ok(vec![])
        } else {
            self.pin_tries -= 1;
            self.pin_verified = false;
            Err(StatusWord::verify_failed(self.pin_tries))
        }
    }

    fn change_reference(&mut self, puk: bool, old: &[u8], new: &[u8]) -> Reply {
        let tries = if puk { self.puk_tries } else { self.pin_tries };
        if tries == 0 {
            return Err(StatusWord::AUTH_METHOD_BLOCKED);
        }
        if !padded_pin_ok(new) && !puk {
            return Err(StatusWord::INCORRECT_DATA);
        }
        let current = if puk { &self.contents.puk } else { &self.contents.pin };
        if !ct_eq(old, &current[..]) {
            let t = if puk { &mut self.puk_tries } else { &mut self.pin_tries };
            *t -= 1;
            return Err(StatusWord::verify_failed(*t));
        }
        let mut value = Zeroizing::new([0u8; 8]);
        value.copy_from_slice(new);
        if puk {
            self.contents.puk = value;
            self.puk_tries = DEFAULT_TRIES;
        } else {
            self.contents.pin = value;
            self.pin_tries = self.contents.pin_tries_max;
            self.pin_verified = true;
        }
        Ok(vec![])
    }

    fn reset_retry_counter(&mut self, puk: &[u8], new_pin: &[u8]) -> Reply {
        if self.puk_tries == 0 {
            return Err(StatusWord::AUTH_METHOD_BLOCKED);
        }
        if !padded_pin_ok(new_pin) {
            return Err(StatusWord::INCORRECT_DATA);
        }
        if !ct_eq(puk, &self.contents.puk[..]) {
            self.puk_tries -= 1;
            return Err(StatusWord::verify_failed(self.puk_tries));
        }
        self.puk_tries = DEFAULT_TRIES;
        let mut value = Zeroizing::new([0u8; 8]);
        value.copy_from_slice(new_pin);
        self.contents.pin = value;
        self.pin_tries = self.contents.pin_tries_max;
        Ok(vec![])
    }

    /// GENERAL AUTHENTICATE (SP 800-73-4 Part 2, §3.2.4 and Appendix A.1).
    fn general_authenticate(&mut self, alg: u8, key: KeyRef, template: &[u8]) -> (Reply, Duration) {
        let z = Duration::ZERO;
        let fields = match parse_template(template) {
            Ok(f) => f,
            Err(sw) => return (Err(sw), z),
        };
        let slot = match key {
            KeyRef::Key(Slot::Management) => return (self.management_auth(alg, &fields), z),
            KeyRef::Key(slot) => slot,
            _ => return (Err(StatusWord::INCORRECT_P1P2), z),
        };
        let Some(key) = self.contents.keys.get(&slot) else {
            return (Err(StatusWord::REFERENCE_NOT_FOUND), z);
        };
        if Algorithm::from_id(alg) != Some(key.algorithm()) {
            return (Err(StatusWord::INCORRECT_P1P2), z);
        }
        // Signature: 82 empty (response requested) and 81 the input.
        let (Some(input), Some(resp)) = (fields.challenge, fields.response) else {
            return (Err(StatusWord::INCORRECT_DATA), z);
        };
        if !resp.is_empty() || input.is_empty() {
            return (Err(StatusWord::INCORRECT_DATA), z);
        }
        let pin = self.contents.origin(slot).pin;
        if pin != PinPolicy::Never && !self.pin_verified {
            return (Err(StatusWord::SECURITY_STATUS_NOT_SATISFIED), z);
        }
        let sig = match key.sign_raw(input, &mut *self.rng) {
            Ok(s) => s,
            Err(sw) => return (Err(sw), z),
        };
        if pin == PinPolicy::Always {
            // PIN always: the next signature needs a fresh VERIFY.
            self.pin_verified = false;
        }
        let mut inner = Vec::new();
        tlv::write(&mut inner, 0x82, &sig);
        (Ok(tlv::encode(0x7C, &inner)), self.latency.per_signature)
    }

    /// Card management key authentication: single (challenge/response) or
    /// mutual (witness then challenge), SP 800-73-4 Part 2, Appendix A.1.
    fn management_auth(&mut self, alg: u8, f: &Template<'_>) -> Reply {
        let key = self.contents.management_key.clone();
        // Algorithm 00 is the legacy identifier for 3DES.
        let alg_ok = alg == key.algorithm().id() || (alg == 0x00 && key.algorithm() == Algorithm::TripleDes);
        if !alg_ok {
            return Err(StatusWord::INCORRECT_P1P2);
        }
        let block = key.block_len();
        let state = std::mem::replace(&mut self.mgmt, MgmtState::None);
        let mut random = || {
            let mut b = vec![0u8; block];
            self.rng.fill_bytes(&mut b);
            b
        };
        match (f.witness, f.challenge, f.response) {
            // Step 1 of mutual: send an encrypted witness.
            (Some([]), None, None) => {
                let plain = random();
                let enc = key.crypt_block(&plain, false).ok_or(StatusWord::UNKNOWN)?;
                self.mgmt = MgmtState::Witness(plain);
                self.mgmt_authenticated = false;
                Ok(tlv::encode(0x7C, &tlv::encode(0x80, &enc)))
            }
            // Step 2 of mutual: check the decrypted witness, answer the challenge.
            (Some(w), Some(c), None) if !w.is_empty() && c.len() == block => match state {
                MgmtState::Witness(expected) if ct_eq(w, &expected) => {
                    let enc = key.crypt_block(c, false).ok_or(StatusWord::UNKNOWN)?;
                    self.mgmt_authenticated = true;
                    Ok(tlv::encode(0x7C, &tlv::encode(0x82, &enc)))
                }
                _ => Err(StatusWord::SECURITY_STATUS_NOT_SATISFIED),
            },
            // Single authentication, step 1: a challenge for the host.
            (None, Some([]), None) => {
                let plain = random();
                self.mgmt = MgmtState::Challenge(plain.clone());
                self.mgmt_authenticated = false;
                Ok(tlv::encode(0x7C, &tlv::encode(0x81, &plain)))
            }
            // Single authentication, step 2: the host's encryption of it.
            (None, None, Some(r)) if !r.is_empty() => match state {
                MgmtState::Challenge(plain) => {
                    let expected = key.crypt_block(&plain, false).ok_or(StatusWord::UNKNOWN)?;
                    if ct_eq(r, &expected) {
                        self.mgmt_authenticated = true;
                        Ok(vec![])
                    } else {
                        Err(StatusWord::SECURITY_STATUS_NOT_SATISFIED)
                    }
                }
                _ => Err(StatusWord::SECURITY_STATUS_NOT_SATISFIED),
            },
            _ => Err(StatusWord::INCORRECT_DATA),
        }
    }

    /// GENERATE ASYMMETRIC KEY PAIR (SP 800-73-4 Part 2, §3.3.2).
    fn generate(&mut self, slot: Slot, alg: u8, pin: PinPolicy, touch: TouchPolicy) -> Reply {
        if !self.mgmt_authenticated {
            return Err(StatusWord::SECURITY_STATUS_NOT_SATISFIED);
        }
        let alg = Algorithm::from_id(alg).filter(|a| a.is_asymmetric()).ok_or(StatusWord::INCORRECT_DATA)?;
        let key = CardKey::generate(alg, &mut *self.rng).map_err(|_| StatusWord::UNKNOWN)?;
        let template = tlv::encode(0x7F49, &key.public_template());
        self.contents.keys.insert(slot, key);
        self.contents.origins.insert(slot, KeyOrigin { generated: true, pin, touch });
        Ok(template)
    }

    /// Vendor RESET (YubiKey): back to the factory state, keeping the
    /// serial number and the attestation key. Only once the PIN and the
    /// PUK are both blocked (6985 otherwise), as YubiKeys do.
    fn reset_application(&mut self) -> Reply {
        if self.pin_tries != 0 || self.puk_tries != 0 {
            return Err(StatusWord::CONDITIONS_NOT_SATISFIED);
        }
        let mut fresh = CardContents::blank(self.contents.serial);
        fresh.attestation = self.contents.attestation.take();
        self.contents = fresh;
        self.pin_tries = self.contents.pin_tries_max;
        self.puk_tries = DEFAULT_TRIES;
        self.reset();
        Ok(vec![])
    }

    /// Vendor SET MANAGEMENT KEY, after management key authentication.
    fn set_management_key(&mut self, alg: u8, key: &[u8]) -> Reply {
        if !self.mgmt_authenticated {
            return Err(StatusWord::SECURITY_STATUS_NOT_SATISFIED);
        }
        let alg = Algorithm::from_id(alg).ok_or(StatusWord::INCORRECT_DATA)?;
        self.contents.management_key = ManagementKey::new(alg, key).map_err(|_| StatusWord::INCORRECT_DATA)?;
        Ok(vec![])
    }

    /// Vendor ATTEST: a certificate for a key this card generated, signed
    /// by its attestation key. A key put there from outside is refused
    /// (6A80), as YubiKeys do: nobody can vouch where it has been.
    fn attest(&self, slot: Slot) -> Reply {
        let att = self.contents.attestation.as_ref().ok_or(StatusWord::INS_NOT_SUPPORTED)?;
        let key = self.contents.keys.get(&slot).ok_or(StatusWord::REFERENCE_NOT_FOUND)?;
        let origin = self.contents.origin(slot);
        if !origin.generated {
            return Err(StatusWord::INCORRECT_DATA);
        }
        att.attest(slot, key, &origin, self.contents.serial, FIRMWARE).map_err(|_| StatusWord::UNKNOWN)
    }

    /// Vendor GET METADATA (as YubiKey 5.3+): algorithm and retry counters.
    fn metadata(&self, key: KeyRef) -> Reply {
        let mut out = Vec::new();
        match key {
            KeyRef::Pin | KeyRef::Puk => {
                let (max, left) = if key == KeyRef::Pin { (self.contents.pin_tries_max, self.pin_tries) } else { (DEFAULT_TRIES, self.puk_tries) };
                tlv::write(&mut out, 0x01, &[0xFF]);
                tlv::write(&mut out, 0x06, &[max, left]);
            }
            KeyRef::GlobalPin => return Err(StatusWord::REFERENCE_NOT_FOUND),
            KeyRef::Key(Slot::Management) => tlv::write(&mut out, 0x01, &[self.contents.management_key.algorithm().id()]),
            KeyRef::Key(slot) => {
                let key = self.contents.keys.get(&slot).ok_or(StatusWord::REFERENCE_NOT_FOUND)?;
                let origin = self.contents.origin(slot);
                tlv::write(&mut out, 0x01, &[key.algorithm().id()]);
                tlv::write(&mut out, 0x02, &[origin.pin.code(), origin.touch.code()]);
                tlv::write(&mut out, 0x03, &[if origin.generated { 1 } else { 2 }]);
                tlv::write(&mut out, 0x04, &key.public_template());
            }
        }
        Ok(out)
    }
}

/// The fields of a dynamic authentication template (7C).
struct Template<'a> {
    witness: Option<&'a [u8]>,
    challenge: Option<&'a [u8]>,
    response: Option<&'a [u8]>,
}

fn parse_template(t: &[u8]) -> Result<Template<'_>, StatusWord> {
    let mut out = Template { witness: None, challenge: None, response: None };
    for item in tlv::iter(t) {
        let item = item.map_err(|_| StatusWord::INCORRECT_DATA)?;
        match item.tag {
            0x80 => out.witness = Some(item.value),
            0x81 => out.challenge = Some(item.value),
            0x82 => out.response = Some(item.value),
            // 0x85 (key agreement) is not implemented by this card.
            _ => return Err(StatusWord::INCORRECT_DATA),
        }
    }
    Ok(out)
}

fn sw_only(sw: StatusWord) -> Vec<u8> {
    vec![sw.sw1(), sw.sw2()]
}

/// A VERIFY data field: 6 to 8 digits, then 0xFF padding.
fn padded_pin_ok(p: &[u8]) -> bool {
    let digits = p.iter().take_while(|b| b.is_ascii_digit()).count();
    p.len() == 8 && digits >= 6 && p[digits..].iter().all(|&b| b == 0xFF)
}

/// Constant-time comparison, so the card leaks no PIN prefix by timing.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extended_atr_says_so_and_checks_out() {
        assert_eq!(ATR_EXTENDED[1..].iter().fold(0, |a, b| a ^ b), 0);
        assert!(pivgate_hw::pcsc::atr_supports_extended(&ATR_EXTENDED));
        assert!(!pivgate_hw::pcsc::atr_supports_extended(&ATR));
    }

    #[test]
    fn atr_checksum_is_valid() {
        // TCK: XOR of T0..TCK is zero (ISO 7816-3 §8.2.5).
        assert_eq!(ATR[1..].iter().fold(0, |a, b| a ^ b), 0);
    }

    #[test]
    fn parses_all_apdu_cases() {
        assert_eq!(parse_apdu(&[0, 0x20, 0, 0x80]).unwrap().le, None);
        assert_eq!(parse_apdu(&[0, 0xC0, 0, 0, 0]).unwrap().le, Some(256));
        let a = parse_apdu(&[0, 0xCB, 0x3F, 0xFF, 3, 0x5C, 1, 0x7E, 0]).unwrap();
        assert_eq!((a.data.len(), a.le), (3, Some(256)));
        let a = parse_apdu(&[0, 0xCB, 0x3F, 0xFF, 0, 0, 3, 0x5C, 1, 0x7E, 0, 0]).unwrap();
        assert_eq!((a.data.len(), a.le), (3, Some(65536)));
        assert!(parse_apdu(&[0, 0xCB, 0x3F, 0xFF, 9, 1]).is_err());
        assert!(parse_apdu(&[0, 0xCB]).is_err());
    }

    #[test]
    fn pin_padding_rules() {
        assert!(padded_pin_ok(b"123456\xFF\xFF"));
        assert!(padded_pin_ok(b"12345678"));
        assert!(!padded_pin_ok(b"12345\xFF\xFF\xFF"));
        assert!(!padded_pin_ok(b"123456\xFF1"));
    }
}
