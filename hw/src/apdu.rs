//! Command and response APDUs (ISO/IEC 7816-4 §5.1) and the status words PIV
//! uses (SP 800-73-4 Part 2, §3 and Table 6).
//!
//! Pure encoding and decoding: no transport, no time.

use std::fmt;

use zeroize::Zeroizing;

use crate::error::{Error, Result};

/// A command APDU before encoding. `data` is zeroized on drop because VERIFY,
/// CHANGE REFERENCE DATA and RESET RETRY COUNTER carry PINs in it.
#[derive(Debug, Clone)]
pub struct Command {
    /// Class byte; the chaining bit (0x10) is set by the encoder, not here.
    pub cla: u8,
    /// Instruction.
    pub ins: Ins,
    /// Parameter 1.
    pub p1: u8,
    /// Parameter 2.
    pub p2: u8,
    /// Command data (Lc bytes).
    pub data: Zeroizing<Vec<u8>>,
    /// Expected response length: `None` for no Le, `Some(n)` with n up to
    /// 256 for short APDUs (256 encodes as 0x00) or 65536 for extended.
    pub le: Option<usize>,
}

impl Command {
    /// A command with no data and no Le.
    pub fn new(ins: Ins, p1: u8, p2: u8) -> Self {
        Command { cla: 0x00, ins, p1, p2, data: Zeroizing::new(Vec::new()), le: None }
    }

    /// Sets the command data.
    pub fn with_data(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.data = Zeroizing::new(data.into());
        self
    }

    /// Sets Le.
    pub fn with_le(mut self, le: usize) -> Self {
        self.le = Some(le);
        self
    }

    /// Encodes as one or more short APDUs, using command chaining (CLA bit
    /// 0x10 on all but the last) when the data exceeds 255 bytes. Each
    /// buffer is zeroized on drop.
    pub fn to_short_apdus(&self) -> Vec<Zeroizing<Vec<u8>>> {
        let chunks: Vec<&[u8]> = if self.data.is_empty() { vec![&[]] } else { self.data.chunks(255).collect() };
        let last = chunks.len() - 1;
        chunks
            .into_iter()
            .enumerate()
            .map(|(i, chunk)| {
                let mut apdu = Zeroizing::new(Vec::with_capacity(chunk.len() + 6));
                let cla = if i < last { self.cla | 0x10 } else { self.cla };
                apdu.extend_from_slice(&[cla, self.ins.code(), self.p1, self.p2]);
                if !chunk.is_empty() {
                    apdu.push(chunk.len() as u8);
                    apdu.extend_from_slice(chunk);
                }
                if i == last {
                    if let Some(le) = self.le {
                        apdu.push(if le >= 256 { 0 } else { le as u8 });
                    }
                }
                apdu
            })
            .collect()
    }

    /// Encodes as a single extended-length APDU (ISO 7816-4 §5.1); only for
    /// cards and readers that announce support.
    pub fn to_extended_apdu(&self) -> Result<Zeroizing<Vec<u8>>> {
        if self.data.len() > 65535 {
            return Err(Error::InvalidInput("command data over 65535 bytes"));
        }
        let mut apdu = Zeroizing::new(Vec::with_capacity(self.data.len() + 9));
        apdu.extend_from_slice(&[self.cla, self.ins.code(), self.p1, self.p2]);
        if !self.data.is_empty() {
            let n = self.data.len();
            apdu.extend_from_slice(&[0, (n >> 8) as u8, n as u8]);
            apdu.extend_from_slice(&self.data);
        }
        if let Some(le) = self.le {
            if self.data.is_empty() {
                apdu.push(0);
            }
            let le = if le >= 65536 { 0 } else { le };
            apdu.extend_from_slice(&[(le >> 8) as u8, le as u8]);
        }
        Ok(apdu)
    }
}

/// Instructions of the PIV Card Application (SP 800-73-4 Part 2, §3.1 to
/// §3.3) and the ISO ones it relies on, with `Other` for the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ins {
    /// SELECT (0xA4), §3.1.1.
    Select,
    /// GET DATA (0xCB), §3.1.2.
    GetData,
    /// VERIFY (0x20), §3.2.1.
    Verify,
    /// CHANGE REFERENCE DATA (0x24), §3.2.2.
    ChangeReferenceData,
    /// RESET RETRY COUNTER (0x2C), §3.2.3.
    ResetRetryCounter,
    /// GENERAL AUTHENTICATE (0x87), §3.2.4.
    GeneralAuthenticate,
    /// PUT DATA (0xDB), §3.3.1.
    PutData,
    /// GENERATE ASYMMETRIC KEY PAIR (0x47), §3.3.2.
    GenerateAsymmetricKeyPair,
    /// GET RESPONSE (0xC0), ISO 7816-4, used for response chaining.
    GetResponse,
    /// Vendor GET VERSION (0xFD), as YubiKeys answer it.
    YubicoGetVersion,
    /// Vendor GET SERIAL (0xF8), as YubiKeys answer it.
    YubicoGetSerial,
    /// Vendor GET METADATA (0xF7), YubiKey 5.3 and later.
    YubicoGetMetadata,
    /// Vendor ATTEST (0xF9): a certificate, signed by the card's
    /// attestation key, for a key generated on the card.
    YubicoAttest,
    /// Vendor SET MANAGEMENT KEY (0xFF).
    YubicoSetManagementKey,
    /// Anything else.
    Other(u8),
}

impl Ins {
    /// The instruction byte.
    pub fn code(self) -> u8 {
        match self {
            Ins::Select => 0xA4,
            Ins::GetData => 0xCB,
            Ins::Verify => 0x20,
            Ins::ChangeReferenceData => 0x24,
            Ins::ResetRetryCounter => 0x2C,
            Ins::GeneralAuthenticate => 0x87,
            Ins::PutData => 0xDB,
            Ins::GenerateAsymmetricKeyPair => 0x47,
            Ins::GetResponse => 0xC0,
            Ins::YubicoGetVersion => 0xFD,
            Ins::YubicoGetSerial => 0xF8,
            Ins::YubicoGetMetadata => 0xF7,
            Ins::YubicoAttest => 0xF9,
            Ins::YubicoSetManagementKey => 0xFF,
            Ins::Other(b) => b,
        }
    }

    /// The instruction for a byte.
    pub fn from_code(b: u8) -> Self {
        match b {
            0xA4 => Ins::Select,
            0xCB => Ins::GetData,
            0x20 => Ins::Verify,
            0x24 => Ins::ChangeReferenceData,
            0x2C => Ins::ResetRetryCounter,
            0x87 => Ins::GeneralAuthenticate,
            0xDB => Ins::PutData,
            0x47 => Ins::GenerateAsymmetricKeyPair,
            0xC0 => Ins::GetResponse,
            0xFD => Ins::YubicoGetVersion,
            0xF8 => Ins::YubicoGetSerial,
            0xF7 => Ins::YubicoGetMetadata,
            0xF9 => Ins::YubicoAttest,
            0xFF => Ins::YubicoSetManagementKey,
            other => Ins::Other(other),
        }
    }
}

/// A status word (SW1 SW2).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct StatusWord(pub u16);

impl StatusWord {
    /// 9000: normal completion.
    pub const SUCCESS: StatusWord = StatusWord(0x9000);
    /// 6982: security status not satisfied.
    pub const SECURITY_STATUS_NOT_SATISFIED: StatusWord = StatusWord(0x6982);
    /// 6983: authentication method blocked.
    pub const AUTH_METHOD_BLOCKED: StatusWord = StatusWord(0x6983);
    /// 6A80: incorrect parameter in the command data field.
    pub const INCORRECT_DATA: StatusWord = StatusWord(0x6A80);
    /// 6A81: function not supported.
    pub const FUNCTION_NOT_SUPPORTED: StatusWord = StatusWord(0x6A81);
    /// 6A82: data object or application not found.
    pub const NOT_FOUND: StatusWord = StatusWord(0x6A82);
    /// 6A84: not enough memory.
    pub const NOT_ENOUGH_MEMORY: StatusWord = StatusWord(0x6A84);
    /// 6A86: incorrect P1 or P2.
    pub const INCORRECT_P1P2: StatusWord = StatusWord(0x6A86);
    /// 6A88: referenced data or reference data not found.
    pub const REFERENCE_NOT_FOUND: StatusWord = StatusWord(0x6A88);
    /// 6700: wrong length.
    pub const WRONG_LENGTH: StatusWord = StatusWord(0x6700);
    /// 6985: conditions of use not satisfied.
    pub const CONDITIONS_NOT_SATISFIED: StatusWord = StatusWord(0x6985);
    /// 6D00: instruction not supported.
    pub const INS_NOT_SUPPORTED: StatusWord = StatusWord(0x6D00);
    /// 6E00: class not supported.
    pub const CLA_NOT_SUPPORTED: StatusWord = StatusWord(0x6E00);
    /// 6884: command chaining not supported.
    pub const CHAINING_NOT_SUPPORTED: StatusWord = StatusWord(0x6884);
    /// 6F00: no precise diagnosis.
    pub const UNKNOWN: StatusWord = StatusWord(0x6F00);

    /// 63Cx: verification failed, `tries` left (at most 15 can be said).
    pub fn verify_failed(tries: u8) -> StatusWord {
        StatusWord(0x63C0 | u16::from(tries.min(15)))
    }

    /// 61xx: more data, `n` bytes of it (0: 256 or more).
    pub fn more_data_available(n: u8) -> StatusWord {
        StatusWord(0x6100 | u16::from(n))
    }

    /// 6Cxx: wrong Le, ask for exactly `n` bytes.
    pub fn wrong_le_exactly(n: u8) -> StatusWord {
        StatusWord(0x6C00 | u16::from(n))
    }

    /// SW1.
    pub fn sw1(self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// SW2.
    pub fn sw2(self) -> u8 {
        self.0 as u8
    }

    /// 61xx: more data available; returns how many (0 means 256 or more).
    pub fn more_data(self) -> Option<u8> {
        (self.sw1() == 0x61).then(|| self.sw2())
    }

    /// 6Cxx: wrong Le; returns the exact length to ask for.
    pub fn wrong_le(self) -> Option<u8> {
        (self.sw1() == 0x6C).then(|| self.sw2())
    }

    /// 63Cx: verification failed, x tries left.
    pub fn tries_left(self) -> Option<u8> {
        (self.sw1() == 0x63 && self.sw2() & 0xF0 == 0xC0).then(|| self.sw2() & 0x0F)
    }
}

impl fmt::Display for StatusWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04X}", self.0)
    }
}

impl fmt::Debug for StatusWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SW({:04X})", self.0)
    }
}

/// A response APDU split into data and status word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Response data, without the status word.
    pub data: Vec<u8>,
    /// SW1 SW2.
    pub sw: StatusWord,
}

impl Response {
    /// Splits a raw response. A response shorter than the two status bytes is
    /// malformed.
    pub fn parse(mut raw: Vec<u8>) -> Result<Response> {
        let n = raw.len();
        if n < 2 {
            return Err(Error::malformed("transmit", "response shorter than a status word"));
        }
        let sw = StatusWord(u16::from_be_bytes([raw[n - 2], raw[n - 1]]));
        raw.truncate(n - 2);
        Ok(Response { data: raw, sw })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_encoding_cases() {
        let c = Command::new(Ins::Verify, 0x00, 0x80);
        assert_eq!(&c.to_short_apdus()[0][..], &[0x00, 0x20, 0x00, 0x80]);
        let c = Command::new(Ins::GetData, 0x3F, 0xFF).with_data(vec![0x5C, 1, 0x7E]).with_le(256);
        assert_eq!(&c.to_short_apdus()[0][..], &[0x00, 0xCB, 0x3F, 0xFF, 3, 0x5C, 1, 0x7E, 0x00]);
    }

    #[test]
    fn chains_long_data() {
        let c = Command::new(Ins::GeneralAuthenticate, 0x07, 0x9A).with_data(vec![0xAB; 600]).with_le(256);
        let apdus = c.to_short_apdus();
        assert_eq!(apdus.len(), 3);
        assert_eq!(apdus[0][0], 0x10);
        assert_eq!(apdus[0][4], 255);
        assert_eq!(apdus[1][0], 0x10);
        assert_eq!(apdus[2][0], 0x00);
        assert_eq!(apdus[2][4], 90);
        assert_eq!(*apdus[2].last().unwrap(), 0x00);
        assert_eq!(apdus[2].len(), 5 + 90 + 1);
    }

    #[test]
    fn extended_encoding() {
        let c = Command::new(Ins::GeneralAuthenticate, 0x07, 0x9A).with_data(vec![1; 300]).with_le(65536);
        let a = c.to_extended_apdu().unwrap();
        assert_eq!(&a[4..7], &[0, 0x01, 0x2C]);
        assert_eq!(&a[a.len() - 2..], &[0, 0]);
        let c = Command::new(Ins::GetResponse, 0, 0).with_le(300);
        assert_eq!(&c.to_extended_apdu().unwrap()[..], &[0, 0xC0, 0, 0, 0, 0x01, 0x2C]);
    }

    #[test]
    fn status_word_helpers() {
        assert_eq!(StatusWord(0x63C2).tries_left(), Some(2));
        assert_eq!(StatusWord(0x6300).tries_left(), None);
        assert_eq!(StatusWord(0x6110).more_data(), Some(0x10));
        assert_eq!(StatusWord(0x6C08).wrong_le(), Some(8));
        assert!(Response::parse(vec![0x90]).is_err());
        let r = Response::parse(vec![1, 2, 0x90, 0x00]).unwrap();
        assert_eq!((r.data, r.sw), (vec![1, 2], StatusWord::SUCCESS));
    }

    #[test]
    fn named_status_words_read_back() {
        for n in 0..=15 {
            assert_eq!(StatusWord::verify_failed(n).tries_left(), Some(n));
        }
        assert_eq!(StatusWord::verify_failed(200), StatusWord(0x63CF), "more tries than 63Cx can say");
        assert_eq!(StatusWord::more_data_available(0x20).more_data(), Some(0x20));
        assert_eq!(StatusWord::wrong_le_exactly(9).wrong_le(), Some(9));
    }

    #[test]
    fn every_instruction_byte_reads_back() {
        for b in 0..=255u8 {
            assert_eq!(Ins::from_code(b).code(), b);
        }
        assert_eq!(Ins::from_code(0xF7), Ins::YubicoGetMetadata);
    }
}
