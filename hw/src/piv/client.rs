//! The PIV client: the card commands of SP 800-73-4 Part 2, sans-IO.
//!
//! [`PivClient`] builds command APDUs, sends them through a
//! [`Transport`], and parses the answers into types. It handles response
//! chaining (61xx then GET RESPONSE), wrong-Le retries (6Cxx), command
//! chaining (CLA 0x10) and extended length where the transport allows, and
//! bounds everything a card controls: response size, chaining rounds, time
//! per APDU and per exchange. It does no I/O of its own and reads time only
//! from the [`Clock`] it is given.
//!
//! It deliberately does not decide anything: which slot to use, whether a
//! PIN is needed, or whether a signature is good are the caller's (and
//! ultimately the gateway's) business.

use std::time::{Duration, Instant};

use crate::apdu::{Command, Ins, Response, StatusWord};
use crate::error::{Error, Result};
use crate::pin::Pin;
use crate::tlv;
use crate::transport::{Clock, SystemClock, Transport};

use super::objects::{self, ApplicationProperties, Chuid, Discovery};
use super::{Algorithm, KeyRef, ObjectTag, Slot, PIV_AID, PIV_AID_TRUNCATED};

/// Bounds on what a card may make the client do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest reassembled response (after GET RESPONSE chaining).
    pub max_response: usize,
    /// Largest certificate after decompression.
    pub max_certificate: usize,
    /// Most GET RESPONSE (or wrong-Le) rounds in one exchange.
    pub max_chain_rounds: usize,
    /// Longest a single APDU may take.
    pub apdu_timeout: Duration,
    /// Longest one client operation (all its APDUs) may take.
    pub exchange_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // SP 800-73-4 objects top out near 12 KB (facial image); a
            // certificate container is under 2 KB. 64 KiB leaves room.
            max_response: 64 * 1024,
            max_certificate: 16 * 1024,
            max_chain_rounds: 300,
            // Slow contact cards sign RSA-2048 in well under 2 s.
            apdu_timeout: Duration::from_secs(5),
            exchange_timeout: Duration::from_secs(15),
        }
    }
}

/// What an empty VERIFY says about the PIN (SP 800-73-4 Part 2, §3.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinStatus {
    /// The PIN is verified in the current session.
    Verified,
    /// Not verified; this many tries remain.
    TriesLeft(u8),
    /// No tries remain.
    Blocked,
}

/// Counters of what went over the wire, for benchmarks and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// APDUs sent, GET RESPONSE and chained parts included.
    pub apdus: usize,
    /// Command bytes sent.
    pub bytes_sent: usize,
    /// Response bytes received, status words included.
    pub bytes_received: usize,
}

/// Talks PIV to one card through a transport.
pub struct PivClient<T> {
    transport: T,
    clock: Box<dyn Clock>,
    limits: Limits,
    deadline: Option<Instant>,
    pin_blocked: bool,
    stats: Stats,
}

impl<T: Transport> PivClient<T> {
    /// A client with default limits and the system clock.
    pub fn new(transport: T) -> Self {
        PivClient { transport, clock: Box::new(SystemClock), limits: Limits::default(), deadline: None, pin_blocked: false, stats: Stats::default() }
    }

    /// Replaces the limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Replaces the clock (tests step it by hand).
    pub fn with_clock(mut self, clock: Box<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Sets an overall deadline across operations (for a whole badge tap).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// What has gone over the wire so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The transport, for reader control codes (PIN pads).
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The transport back.
    pub fn into_inner(self) -> T {
        self.transport
    }

    /// SELECT the PIV Card Application by its truncated AID and parse the
    /// Application Property Template (SP 800-73-4 Part 2, §3.1.1).
    ///
    /// A card that does not know the truncation (some Java Card applets
    /// match only the whole AID) is asked again with the whole 11-byte AID:
    /// one APDU for most cards, two for those.
    pub fn select(&mut self) -> Result<ApplicationProperties> {
        match self.select_aid(&PIV_AID_TRUNCATED) {
            Err(Error::NoPivApplication) => self.select_aid(&PIV_AID),
            r => r,
        }
    }

    fn select_aid(&mut self, aid: &[u8]) -> Result<ApplicationProperties> {
        const CMD: &str = "SELECT";
        let cmd = Command::new(Ins::Select, 0x04, 0x00).with_data(aid.to_vec()).with_le(256);
        let r = self.exchange(CMD, &cmd)?;
        self.pin_blocked = false;
        match r.sw {
            StatusWord::SUCCESS => ApplicationProperties::parse(&r.data),
            StatusWord::NOT_FOUND => Err(Error::NoPivApplication),
            sw => Err(Error::Status { command: CMD, sw }),
        }
    }

    /// GET DATA (SP 800-73-4 Part 2, §3.1.2): returns the contents of the
    /// object's `53` container, or for the Discovery object the whole
    /// `7E` object.
    pub fn get_data(&mut self, tag: ObjectTag) -> Result<Vec<u8>> {
        const CMD: &str = "GET DATA";
        let le = if self.transport.supports_extended() { 65536 } else { 256 };
        let cmd = Command::new(Ins::GetData, 0x3F, 0xFF).with_data(tlv::encode(0x5C, &tag.encoded())).with_le(le);
        let r = self.exchange(CMD, &cmd)?;
        match r.sw {
            StatusWord::SUCCESS => {}
            StatusWord::NOT_FOUND => return Err(Error::ObjectNotFound { tag: tag.0 }),
            sw => return Err(status_error(CMD, sw)),
        }
        if tag == ObjectTag::DISCOVERY {
            return Ok(r.data);
        }
        let inner = tlv::expect_single(&r.data, 0x53)
            .map_err(|e| Error::malformed(CMD, e.reason()))?
            .ok_or_else(|| Error::malformed(CMD, "object is not one 53 container"))?;
        Ok(inner.to_vec())
    }

    /// Reads and parses the CHUID.
    pub fn read_chuid(&mut self) -> Result<Chuid> {
        let data = self.get_data(ObjectTag::CHUID)?;
        Chuid::parse(&data)
    }

    /// The card's serial number through the YubiKey GET SERIAL extension
    /// (INS F8), or `None` from a card that does not know the command.
    /// A lookup hint only: any card can answer any number.
    pub fn serial(&mut self) -> Result<Option<u32>> {
        const CMD: &str = "GET SERIAL";
        let r = self.exchange(CMD, &Command::new(Ins::YubicoGetSerial, 0x00, 0x00).with_le(256))?;
        match r.sw {
            StatusWord::SUCCESS => {
                let b: [u8; 4] = r.data.as_slice().try_into().map_err(|_| Error::malformed(CMD, "a serial number is 4 bytes"))?;
                Ok(Some(u32::from_be_bytes(b)))
            }
            StatusWord::INS_NOT_SUPPORTED | StatusWord::INCORRECT_P1P2 | StatusWord(0x6E00) | StatusWord(0x6A81) | StatusWord::NOT_FOUND => Ok(None),
            sw => Err(status_error(CMD, sw)),
        }
    }

    /// A certificate for the key in `slot`, signed by the card's
    /// attestation key (the YubiKey ATTEST extension, INS F9): proof the
    /// key was generated on the card, with its PIN and touch policies.
    /// `None` from a card that cannot attest, or for a key it did not
    /// generate (it was put there from outside).
    pub fn attest(&mut self, slot: Slot) -> Result<Option<Vec<u8>>> {
        const CMD: &str = "ATTEST";
        let r = self.exchange(CMD, &Command::new(Ins::YubicoAttest, slot.key_ref(), 0x00).with_le(256))?;
        match r.sw {
            StatusWord::SUCCESS if r.data.len() > self.limits.max_certificate => {
                Err(Error::TooLarge { what: "attestation certificate", limit: self.limits.max_certificate })
            }
            StatusWord::SUCCESS => Ok(Some(r.data)),
            StatusWord::INS_NOT_SUPPORTED | StatusWord::INCORRECT_DATA | StatusWord::INCORRECT_P1P2 | StatusWord::NOT_FOUND | StatusWord(0x6E00) => Ok(None),
            sw => Err(status_error(CMD, sw)),
        }
    }

    /// The attestation key's own certificate (YubiKey object 5FFF01, the
    /// link from an attestation to the maker's root), if the card has one.
    pub fn attestation_certificate(&mut self) -> Result<Option<Vec<u8>>> {
        match self.get_data(ObjectTag(0x5F_FF01)) {
            Ok(data) => Ok(Some(objects::certificate_from_container(&data, self.limits.max_certificate)?)),
            Err(Error::ObjectNotFound { .. }) => Ok(None),
            Err(Error::Status { sw, .. }) if sw == StatusWord::INCORRECT_DATA || sw == StatusWord::INCORRECT_P1P2 => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Reads and parses the Discovery object.
    pub fn read_discovery(&mut self) -> Result<Discovery> {
        let data = self.get_data(ObjectTag::DISCOVERY)?;
        Discovery::parse(&data)
    }

    /// Reads the certificate for `slot` as DER, decompressing it when the
    /// card stored it gzip-compressed.
    pub fn read_certificate(&mut self, slot: Slot) -> Result<Vec<u8>> {
        let tag = slot.certificate_object().ok_or(Error::InvalidInput("the management key has no certificate"))?;
        let data = self.get_data(tag)?;
        objects::certificate_from_container(&data, self.limits.max_certificate)
    }

    /// The PIN's state, read with an empty VERIFY that spends no try.
    pub fn pin_status(&mut self) -> Result<PinStatus> {
        const CMD: &str = "VERIFY (status)";
        let r = self.exchange(CMD, &Command::new(Ins::Verify, 0x00, KeyRef::Pin.code()))?;
        let status = match r.sw {
            StatusWord::SUCCESS => PinStatus::Verified,
            StatusWord::AUTH_METHOD_BLOCKED => PinStatus::Blocked,
            sw => match sw.tries_left() {
                Some(0) => PinStatus::Blocked,
                Some(n) => PinStatus::TriesLeft(n),
                None => return Err(status_error(CMD, sw)),
            },
        };
        self.pin_blocked = status == PinStatus::Blocked;
        Ok(status)
    }

    /// VERIFY the PIV Card Application PIN (key reference 80), padded with
    /// 0xFF. Refuses without touching the card once the card said the PIN
    /// is blocked.
    pub fn verify_pin(&mut self, pin: &Pin) -> Result<()> {
        const CMD: &str = "VERIFY";
        if self.pin_blocked {
            return Err(Error::PinBlocked);
        }
        let cmd = Command::new(Ins::Verify, 0x00, KeyRef::Pin.code()).with_data(pin.padded().to_vec());
        let r = self.exchange(CMD, &cmd)?;
        match r.sw {
            StatusWord::SUCCESS => Ok(()),
            StatusWord::AUTH_METHOD_BLOCKED => {
                self.pin_blocked = true;
                Err(Error::PinBlocked)
            }
            sw => match sw.tries_left() {
                Some(0) => {
                    self.pin_blocked = true;
                    Err(Error::PinBlocked)
                }
                Some(tries) => Err(Error::WrongPin { tries }),
                None => Err(status_error(CMD, sw)),
            },
        }
    }

    /// Resets the PIN's verified state with VERIFY P1=FF (SP 800-73-4
    /// Part 2, §3.2.1), so the next person cannot use it. Returns `false`
    /// when the card does not support that; the caller must then reset the
    /// card (end the PC/SC transaction with a reset).
    pub fn reset_pin_state(&mut self) -> Result<bool> {
        const CMD: &str = "VERIFY (reset)";
        let r = self.exchange(CMD, &Command::new(Ins::Verify, 0xFF, KeyRef::Pin.code()))?;
        match r.sw {
            StatusWord::SUCCESS => Ok(true),
            StatusWord::INCORRECT_P1P2 | StatusWord::INS_NOT_SUPPORTED | StatusWord(0x6B00) => Ok(false),
            sw => Err(status_error(CMD, sw)),
        }
    }

    /// GENERAL AUTHENTICATE with an asymmetric key (SP 800-73-4 Part 2,
    /// §3.2.4, "internal authenticate" / signature use).
    ///
    /// For ECC, `digest` is the hash the card signs (32 bytes for P-256,
    /// 48 for P-384) and the result is a DER ECDSA-Sig-Value. For RSA,
    /// `digest` is a SHA-256, SHA-384 or SHA-512 hash; the client builds
    /// the EMSA-PKCS1-v1_5 block itself, since cards sign raw, and the
    /// result is the 256-byte signature.
    pub fn sign(&mut self, slot: Slot, algorithm: Algorithm, digest: &[u8]) -> Result<Vec<u8>> {
        const CMD: &str = "GENERAL AUTHENTICATE";
        let input = match algorithm {
            Algorithm::EccP256 | Algorithm::EccP384 => {
                if Some(digest.len()) != algorithm.ecdsa_digest_len() {
                    return Err(Error::InvalidInput("digest length does not match the curve"));
                }
                digest.to_vec()
            }
            Algorithm::Rsa2048 => pkcs1_v15_block(digest, 256)?,
            other => return Err(Error::Algorithm(other.id())),
        };
        let mut inner = Vec::with_capacity(input.len() + 8);
        tlv::write(&mut inner, 0x82, &[]);
        tlv::write(&mut inner, 0x81, &input);
        let le = if self.transport.supports_extended() { 65536 } else { 256 };
        let cmd = Command::new(Ins::GeneralAuthenticate, algorithm.id(), slot.key_ref()).with_data(tlv::encode(0x7C, &inner)).with_le(le);
        let r = self.exchange(CMD, &cmd)?;
        if r.sw != StatusWord::SUCCESS {
            return Err(status_error(CMD, r.sw));
        }
        let template = tlv::expect_single(&r.data, 0x7C)
            .map_err(|e| Error::malformed(CMD, e.reason()))?
            .ok_or_else(|| Error::malformed(CMD, "response is not one dynamic authentication template (7C)"))?;
        let sig = tlv::find(template, 0x82)
            .map_err(|e| Error::malformed(CMD, e.reason()))?
            .ok_or_else(|| Error::malformed(CMD, "no response (82) in the template"))?;
        match algorithm {
            Algorithm::Rsa2048 if sig.len() != 256 => Err(Error::malformed(CMD, "RSA-2048 signature is not 256 bytes")),
            Algorithm::EccP256 => check_ecdsa_der(sig, 32).map(|()| sig.to_vec()),
            Algorithm::EccP384 => check_ecdsa_der(sig, 48).map(|()| sig.to_vec()),
            _ => Ok(sig.to_vec()),
        }
    }

    /// Sends one command, following command chaining out and response
    /// chaining back, within the limits.
    pub(crate) fn exchange(&mut self, what: &'static str, cmd: &Command) -> Result<Response> {
        let started = self.clock.now();
        let mut deadline = started + self.limits.exchange_timeout;
        if let Some(d) = self.deadline {
            deadline = deadline.min(d);
        }
        let long = cmd.data.len() > 255 || cmd.le.is_some_and(|le| le > 256);
        let apdus = if long && self.transport.supports_extended() { vec![cmd.to_extended_apdu()?] } else { cmd.to_short_apdus() };
        let mut last = None;
        let n = apdus.len();
        for (i, apdu) in apdus.iter().enumerate() {
            let r = self.send(apdu, started, deadline)?;
            if i + 1 < n && r.sw != StatusWord::SUCCESS {
                return Err(status_error(what, r.sw));
            }
            last = Some(r);
        }
        let mut r = last.ok_or(Error::InvalidInput("empty command"))?;
        let mut data = std::mem::take(&mut r.data);
        let mut rounds = 0;
        loop {
            if data.len() > self.limits.max_response {
                return Err(Error::TooLarge { what: "response", limit: self.limits.max_response });
            }
            let next = if let Some(le) = r.sw.wrong_le() {
                // 6Cxx: the same command again with the exact Le (ISO 7816-3
                // §12.2.2); only meaningful for a single short APDU.
                if n != 1 {
                    return Err(status_error(what, r.sw));
                }
                data.clear();
                let mut again = cmd.clone();
                again.le = Some(if le == 0 { 256 } else { usize::from(le) });
                again.to_short_apdus().swap_remove(0)
            } else if let Some(more) = r.sw.more_data() {
                let le = if more == 0 { 256 } else { usize::from(more) };
                Command::new(Ins::GetResponse, 0, 0).with_le(le).to_short_apdus().swap_remove(0)
            } else {
                break;
            };
            rounds += 1;
            if rounds > self.limits.max_chain_rounds {
                return Err(Error::ChainTooLong { rounds: self.limits.max_chain_rounds });
            }
            r = self.send(&next, started, deadline)?;
            data.extend_from_slice(&r.data);
        }
        Ok(Response { data, sw: r.sw })
    }

    fn send(&mut self, apdu: &[u8], started: Instant, deadline: Instant) -> Result<Response> {
        let before = self.clock.now();
        if before >= deadline {
            return Err(Error::Timeout { what: "exchange", elapsed: before - started, limit: deadline.saturating_duration_since(started) });
        }
        let raw = self.transport.transmit(apdu)?;
        let took = self.clock.now().saturating_duration_since(before);
        self.stats.apdus += 1;
        self.stats.bytes_sent += apdu.len();
        self.stats.bytes_received += raw.len();
        if took > self.limits.apdu_timeout {
            return Err(Error::Timeout { what: "APDU", elapsed: took, limit: self.limits.apdu_timeout });
        }
        // One APDU carries at most 65536 data bytes (extended) or 256
        // (short); a transport that returns more is broken or hostile.
        let max = if self.transport.supports_extended() { 65536 } else { 256 };
        if raw.len() > max + 2 {
            return Err(Error::TooLarge { what: "single response APDU", limit: max + 2 });
        }
        Response::parse(raw)
    }
}

pub(crate) fn status_error(command: &'static str, sw: StatusWord) -> Error {
    match sw {
        StatusWord::SECURITY_STATUS_NOT_SATISFIED => Error::SecurityStatusNotSatisfied { command },
        sw => Error::Status { command, sw },
    }
}

/// DigestInfo prefixes (RFC 8017 §9.2, note 1) by digest length.
fn digest_info_prefix(len: usize) -> Option<&'static [u8]> {
    const SHA256: &[u8] = &[0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20];
    const SHA384: &[u8] = &[0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30];
    const SHA512: &[u8] = &[0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40];
    match len {
        32 => Some(SHA256),
        48 => Some(SHA384),
        64 => Some(SHA512),
        _ => None,
    }
}

/// EMSA-PKCS1-v1_5 encoding (RFC 8017 §9.2) of a SHA-2 digest for a
/// `k`-byte modulus: `00 01 FF.. 00 DigestInfo`.
pub fn pkcs1_v15_block(digest: &[u8], k: usize) -> Result<Vec<u8>> {
    let prefix = digest_info_prefix(digest.len()).ok_or(Error::InvalidInput("RSA digest must be SHA-256, -384 or -512"))?;
    let t_len = prefix.len() + digest.len();
    if k < t_len + 11 {
        return Err(Error::InvalidInput("modulus too short for the digest"));
    }
    let mut block = Vec::with_capacity(k);
    block.extend_from_slice(&[0x00, 0x01]);
    block.resize(k - t_len - 1, 0xFF);
    block.push(0x00);
    block.extend_from_slice(prefix);
    block.extend_from_slice(digest);
    Ok(block)
}

/// Checks that `sig` is a DER `SEQUENCE { INTEGER r, INTEGER s }` whose
/// integers fit the curve. Whether it verifies is the gateway's question.
fn check_ecdsa_der(sig: &[u8], coord: usize) -> Result<()> {
    const CMD: &str = "GENERAL AUTHENTICATE";
    let bad = || Error::malformed(CMD, "signature is not a DER ECDSA-Sig-Value");
    let seq = tlv::expect_single(sig, 0x30).map_err(|_| bad())?.ok_or_else(bad)?;
    let (r, rest) = tlv::parse_one(seq).map_err(|_| bad())?;
    let (s, rest) = tlv::parse_one(rest).map_err(|_| bad())?;
    let ok = |t: tlv::Tlv<'_>| t.tag == 0x02 && !t.value.is_empty() && t.value.len() <= coord + 1;
    if !rest.is_empty() || !ok(r) || !ok(s) {
        return Err(bad());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A card that plays back canned responses and records commands.
    struct Script {
        responses: VecDeque<Vec<u8>>,
        sent: Vec<Vec<u8>>,
    }

    impl Transport for Script {
        fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>> {
            self.sent.push(command.to_vec());
            Ok(self.responses.pop_front().unwrap_or_else(|| vec![0x6F, 0x00]))
        }
    }

    fn script(responses: &[&[u8]]) -> PivClient<Script> {
        PivClient::new(Script { responses: responses.iter().map(|r| r.to_vec()).collect(), sent: vec![] })
    }

    #[test]
    fn follows_get_response_chaining() {
        let mut obj = vec![0x53, 0x82, 0x01, 0x2C];
        obj.extend(std::iter::repeat_n(0xAA, 300));
        let mut first = obj[..256].to_vec();
        first.extend_from_slice(&[0x61, 48]);
        let mut second = obj[256..].to_vec();
        second.extend_from_slice(&[0x90, 0x00]);
        let mut c = script(&[&first, &second]);
        let data = c.get_data(ObjectTag::CHUID).unwrap();
        assert_eq!(data.len(), 300);
        let t = c.into_inner();
        assert_eq!(t.sent[1], vec![0x00, 0xC0, 0x00, 0x00, 48]);
    }

    #[test]
    fn retries_with_the_le_the_card_asks_for() {
        let mut c = script(&[&[0x6C, 0x05], &[0x53, 0x03, 1, 2, 3, 0x90, 0x00]]);
        assert_eq!(c.get_data(ObjectTag::CHUID).unwrap(), vec![1, 2, 3]);
        let t = c.into_inner();
        assert_eq!(*t.sent[1].last().unwrap(), 0x05);
        assert_eq!(t.sent[0][..t.sent[0].len() - 1], t.sent[1][..t.sent[1].len() - 1]);
    }

    #[test]
    fn verify_reports_tries_and_stops_at_blocked() {
        let mut c = script(&[&[0x63, 0xC2], &[0x63, 0xC0]]);
        let pin = Pin::new(b"000000").unwrap();
        assert!(matches!(c.verify_pin(&pin), Err(Error::WrongPin { tries: 2 })));
        assert!(matches!(c.verify_pin(&pin), Err(Error::PinBlocked)));
        assert!(matches!(c.verify_pin(&pin), Err(Error::PinBlocked)));
        let t = c.into_inner();
        assert_eq!(t.sent.len(), 2, "no VERIFY may reach a blocked card");
        assert_eq!(&t.sent[0][..], &[0x00, 0x20, 0x00, 0x80, 0x08, b'0', b'0', b'0', b'0', b'0', b'0', 0xFF, 0xFF]);
    }

    #[test]
    fn rsa_block_is_pkcs1_v15() {
        let b = pkcs1_v15_block(&[7u8; 32], 256).unwrap();
        assert_eq!(b.len(), 256);
        assert_eq!(&b[..3], &[0, 1, 0xFF]);
        assert_eq!(b[256 - 32 - 19 - 1], 0);
        assert_eq!(&b[256 - 32..], &[7u8; 32]);
        assert!(pkcs1_v15_block(&[0u8; 20], 256).is_err());
    }

    struct SteppingClock(std::sync::Mutex<Instant>, Duration);
    impl Clock for SteppingClock {
        fn now(&self) -> Instant {
            let mut t = self.0.lock().unwrap();
            *t += self.1;
            *t
        }
        fn wall(&self) -> std::time::SystemTime {
            std::time::SystemTime::UNIX_EPOCH
        }
    }

    #[test]
    fn slow_apdus_time_out_in_virtual_time() {
        let clock = SteppingClock(std::sync::Mutex::new(Instant::now()), Duration::from_secs(6));
        let mut c = script(&[&[0x90, 0x00]]).with_clock(Box::new(clock));
        assert!(matches!(c.select(), Err(Error::Timeout { what: "APDU", .. })));
    }
}
