//! Parsers for what a PIV card returns: the Application Property Template,
//! the CHUID, the FASC-N, the Discovery object and certificate containers
//! (SP 800-73-4 Part 1, §3 and Appendix A; TIG SCEPACS for the FASC-N).
//!
//! Each parser takes bytes from the card and returns a typed value or an
//! [`Error::Malformed`]; sizes are bounded by the caller's [`Limits`].
//!
//! [`Limits`]: super::Limits

use std::fmt;
use std::io::Read;

use crate::error::{Error, Result};
use crate::tlv::{self, TlvError};

use super::{Algorithm, PIV_AID};

fn bad(command: &'static str) -> impl Fn(TlvError) -> Error {
    move |e| Error::malformed(command, e.reason())
}

/// What SELECT returns: the Application Property Template (tag 0x61,
/// SP 800-73-4 Part 2, Table 3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplicationProperties {
    /// The application identifier or its PIX, as the card gave it.
    pub aid: Vec<u8>,
    /// Application label, if any.
    pub label: Option<String>,
    /// Algorithms the card lists under tag 0xAC.
    pub algorithms: Vec<Algorithm>,
}

impl ApplicationProperties {
    /// Parses the SELECT response data. An empty response (older cards)
    /// gives the default: PIV was selected but said nothing about itself.
    pub fn parse(data: &[u8]) -> Result<Self> {
        const CMD: &str = "SELECT";
        if data.is_empty() {
            return Ok(Self::default());
        }
        let apt =
            tlv::expect_single(data, 0x61).map_err(bad(CMD))?.ok_or_else(|| Error::malformed(CMD, "response is not one application property template (61)"))?;
        let mut props = ApplicationProperties::default();
        for t in tlv::iter(apt) {
            let t = t.map_err(bad(CMD))?;
            match t.tag {
                0x4F => props.aid = t.value.to_vec(),
                0x50 => props.label = Some(String::from_utf8_lossy(t.value).into_owned()),
                0xAC => {
                    for a in tlv::iter(t.value) {
                        let a = a.map_err(bad(CMD))?;
                        if a.tag == 0x80 && a.value.len() == 1 {
                            if let Some(alg) = Algorithm::from_id(a.value[0]) {
                                props.algorithms.push(alg);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        // The AID field holds the PIX (00 00 10 00 01 00) or the whole AID;
        // either way it must name PIV, or another application answered.
        let pix = &PIV_AID[5..];
        let names_piv = props.aid.starts_with(&pix[..4]) || props.aid.starts_with(&PIV_AID[..9]);
        if !names_piv {
            return Err(Error::malformed(CMD, "template names another application"));
        }
        Ok(props)
    }
}

/// The Card Holder Unique Identifier (SP 800-73-4 Part 1, Table 9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chuid {
    /// The FASC-N (tag 0x30), 25 bytes, when present.
    pub fascn: Option<Fascn>,
    /// The card's GUID / card UUID (tag 0x34), 16 bytes.
    pub guid: [u8; 16],
    /// Expiration date (tag 0x35) as YYYYMMDD.
    pub expiry: Option<String>,
    /// Cardholder UUID (tag 0x36), when present.
    pub cardholder_uuid: Option<[u8; 16]>,
    /// Whether the issuer's asymmetric signature (tag 0x3E) is present.
    pub signed: bool,
}

impl Chuid {
    /// Parses the contents of the CHUID container (inside tag 0x53).
    pub fn parse(data: &[u8]) -> Result<Self> {
        const CMD: &str = "GET DATA CHUID";
        let mut fascn = None;
        let mut guid = None;
        let mut expiry = None;
        let mut cardholder_uuid = None;
        let mut signed = false;
        for t in tlv::iter(data) {
            let t = t.map_err(bad(CMD))?;
            match t.tag {
                0x30 => {
                    let raw: [u8; 25] = t.value.try_into().map_err(|_| Error::malformed(CMD, "FASC-N is not 25 bytes"))?;
                    fascn = Some(Fascn(raw));
                }
                0x34 => {
                    guid = Some(t.value.try_into().map_err(|_| Error::malformed(CMD, "GUID is not 16 bytes"))?);
                }
                0x35 => {
                    if t.value.len() != 8 || !t.value.iter().all(u8::is_ascii_digit) {
                        return Err(Error::malformed(CMD, "expiration date is not YYYYMMDD"));
                    }
                    expiry = Some(String::from_utf8_lossy(t.value).into_owned());
                }
                0x36 => {
                    cardholder_uuid = Some(t.value.try_into().map_err(|_| Error::malformed(CMD, "cardholder UUID is not 16 bytes"))?);
                }
                0x3E => signed = !t.value.is_empty(),
                _ => {}
            }
        }
        let guid = guid.ok_or_else(|| Error::malformed(CMD, "no GUID (tag 34)"))?;
        Ok(Chuid { fascn, guid, expiry, cardholder_uuid, signed })
    }

    /// Encodes a CHUID container's contents (for the virtual card). The
    /// issuer signature is left empty, as on unsigned test cards.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(f) = &self.fascn {
            tlv::write(&mut out, 0x30, &f.0);
        }
        tlv::write(&mut out, 0x34, &self.guid);
        if let Some(e) = &self.expiry {
            tlv::write(&mut out, 0x35, e.as_bytes());
        }
        if let Some(u) = &self.cardholder_uuid {
            tlv::write(&mut out, 0x36, u);
        }
        tlv::write(&mut out, 0x3E, &[]);
        tlv::write(&mut out, 0xFE, &[]);
        out
    }

    /// The card UUID in its canonical text form
    /// (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`), as certificates carry it
    /// in a `urn:uuid:` subject alternative name.
    pub fn uuid_string(&self) -> String {
        uuid_string(&self.guid)
    }
}

/// Formats 16 bytes as a canonical lowercase UUID.
pub fn uuid_string(b: &[u8; 16]) -> String {
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// A raw 25-byte FASC-N (TIG SCEPACS, 200 bits: 40 five-bit characters).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fascn(pub [u8; 25]);

/// The fields of a decoded FASC-N.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FascnFields {
    /// Agency code, 4 digits.
    pub agency: String,
    /// System code, 4 digits.
    pub system: String,
    /// Credential number, 6 digits.
    pub credential: String,
    /// Credential series, 1 digit.
    pub series: String,
    /// Individual credential issue, 1 digit.
    pub issue: String,
    /// Person identifier, 10 digits.
    pub person: String,
    /// Organizational category, 1 digit.
    pub org_category: String,
    /// Organizational identifier, 4 digits.
    pub org_id: String,
    /// Person/organization association category, 1 digit.
    pub association: String,
}

const SS: u8 = 0xB;
const FS: u8 = 0xD;
const ES: u8 = 0xF;
const LAYOUT: [(u8, usize); 11] = [(SS, 0), (0, 4), (FS, 0), (0, 4), (FS, 0), (0, 6), (FS, 0), (0, 1), (FS, 0), (0, 1), (FS, 0)];

impl Fascn {
    /// Decodes the 40 characters, checking each parity bit, the sentinels,
    /// the separators and the longitudinal redundancy check.
    pub fn decode(&self) -> Result<FascnFields> {
        const CMD: &str = "FASC-N";
        let mut chars = [0u8; 40];
        for (i, c) in chars.iter_mut().enumerate() {
            let mut v = 0u8;
            let mut ones = 0;
            for bit in 0..5 {
                let pos = i * 5 + bit;
                let b = (self.0[pos / 8] >> (7 - pos % 8)) & 1;
                ones += b;
                if bit < 4 {
                    v |= b << bit;
                }
            }
            if ones % 2 == 0 {
                return Err(Error::malformed(CMD, "character parity"));
            }
            *c = v;
        }
        let lrc = chars[..39].iter().fold(0u8, |a, &c| a ^ c);
        if lrc != chars[39] {
            return Err(Error::malformed(CMD, "LRC mismatch"));
        }
        let digits = |r: std::ops::Range<usize>| -> Result<String> {
            chars[r].iter().map(|&c| if c <= 9 { Ok(char::from(b'0' + c)) } else { Err(Error::malformed(CMD, "digit expected")) }).collect()
        };
        let expect = |i: usize, v: u8| if chars[i] == v { Ok(()) } else { Err(Error::malformed(CMD, "sentinel or separator")) };
        expect(0, SS)?;
        expect(5, FS)?;
        expect(10, FS)?;
        expect(17, FS)?;
        expect(19, FS)?;
        expect(21, FS)?;
        expect(38, ES)?;
        Ok(FascnFields {
            agency: digits(1..5)?,
            system: digits(6..10)?,
            credential: digits(11..17)?,
            series: digits(18..19)?,
            issue: digits(20..21)?,
            person: digits(22..32)?,
            org_category: digits(32..33)?,
            org_id: digits(33..37)?,
            association: digits(37..38)?,
        })
    }

    /// Encodes fields (each all digits, of the lengths in [`FascnFields`]).
    pub fn encode(f: &FascnFields) -> Result<Fascn> {
        let mut chars = Vec::with_capacity(40);
        let fields = [&f.agency, &f.system, &f.credential, &f.series, &f.issue];
        let mut fi = 0;
        for (sep, n) in LAYOUT {
            if n == 0 {
                chars.push(sep);
                continue;
            }
            let field = fields[fi];
            fi += 1;
            push_digits(&mut chars, field, n)?;
        }
        push_digits(&mut chars, &f.person, 10)?;
        push_digits(&mut chars, &f.org_category, 1)?;
        push_digits(&mut chars, &f.org_id, 4)?;
        push_digits(&mut chars, &f.association, 1)?;
        chars.push(ES);
        let lrc = chars.iter().fold(0u8, |a, &c| a ^ c);
        chars.push(lrc);
        let mut out = [0u8; 25];
        for (i, &c) in chars.iter().enumerate() {
            let parity = (c.count_ones() % 2 == 0) as u8;
            let bits = [c & 1, (c >> 1) & 1, (c >> 2) & 1, (c >> 3) & 1, parity];
            for (bit, b) in bits.into_iter().enumerate() {
                let pos = i * 5 + bit;
                out[pos / 8] |= b << (7 - pos % 8);
            }
        }
        Ok(Fascn(out))
    }
}

fn push_digits(chars: &mut Vec<u8>, s: &str, n: usize) -> Result<()> {
    if s.len() != n || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::InvalidInput("FASC-N field has the wrong number of digits"));
    }
    chars.extend(s.bytes().map(|b| b - b'0'));
    Ok(())
}

impl fmt::Debug for Fascn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fascn({})", hex::encode(self.0))
    }
}

/// The Discovery Object (tag 0x7E, SP 800-73-4 Part 1, §3.3.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// The PIV AID it names.
    pub aid: Vec<u8>,
    /// PIN Usage Policy, two bytes.
    pub pin_usage_policy: [u8; 2],
}

impl Discovery {
    /// Parses a whole Discovery object (`7E L ...`).
    pub fn parse(data: &[u8]) -> Result<Self> {
        const CMD: &str = "GET DATA Discovery";
        let inner = tlv::expect_single(data, 0x7E).map_err(bad(CMD))?.ok_or_else(|| Error::malformed(CMD, "not a discovery object (7E)"))?;
        let aid = tlv::find(inner, 0x4F).map_err(bad(CMD))?.ok_or_else(|| Error::malformed(CMD, "no AID (4F)"))?;
        let policy = tlv::find(inner, 0x5F2F).map_err(bad(CMD))?.ok_or_else(|| Error::malformed(CMD, "no PIN usage policy (5F2F)"))?;
        let pin_usage_policy = policy.try_into().map_err(|_| Error::malformed(CMD, "PIN usage policy is not 2 bytes"))?;
        Ok(Discovery { aid: aid.to_vec(), pin_usage_policy })
    }

    /// Encodes the object, as the virtual card stores it.
    pub fn encode(&self) -> Vec<u8> {
        let mut inner = Vec::new();
        tlv::write(&mut inner, 0x4F, &self.aid);
        tlv::write(&mut inner, 0x5F2F, &self.pin_usage_policy);
        tlv::encode(0x7E, &inner)
    }

    /// Whether the PIV Card Application PIN satisfies the PIV access
    /// control rules (bit 7 of the first byte).
    pub fn piv_pin_usable(&self) -> bool {
        self.pin_usage_policy[0] & 0x40 != 0
    }
}

/// CertInfo bit: the certificate is gzip-compressed (SP 800-73-4 Part 1,
/// Table 10 and §3.3.1).
pub const CERTINFO_GZIP: u8 = 0x01;

/// Extracts the DER certificate from a certificate container's contents
/// (tags 70 certificate, 71 CertInfo, FE error detection code),
/// decompressing it when CertInfo says so. Decompression stops at `limit`
/// bytes: a gzip bomb costs at most that much memory.
pub fn certificate_from_container(data: &[u8], limit: usize) -> Result<Vec<u8>> {
    const CMD: &str = "GET DATA certificate";
    let mut cert = None;
    let mut info = 0u8;
    for t in tlv::iter(data) {
        let t = t.map_err(bad(CMD))?;
        match t.tag {
            0x70 => cert = Some(t.value),
            0x71 => {
                info = *t.value.first().ok_or_else(|| Error::malformed(CMD, "empty CertInfo"))?;
            }
            _ => {}
        }
    }
    let cert = cert.ok_or_else(|| Error::malformed(CMD, "no certificate (70)"))?;
    if cert.is_empty() {
        return Err(Error::malformed(CMD, "empty certificate"));
    }
    if info & CERTINFO_GZIP == 0 {
        if cert.len() > limit {
            return Err(Error::TooLarge { what: "certificate", limit });
        }
        return Ok(cert.to_vec());
    }
    let mut out = Vec::new();
    let mut reader = flate2::read::GzDecoder::new(cert).take(limit as u64 + 1);
    reader.read_to_end(&mut out).map_err(|_| Error::malformed(CMD, "compressed certificate is not valid gzip"))?;
    if out.len() > limit {
        return Err(Error::TooLarge { what: "decompressed certificate", limit });
    }
    if out.is_empty() {
        return Err(Error::malformed(CMD, "compressed certificate is empty"));
    }
    Ok(out)
}

/// Builds a certificate container (for the virtual card).
pub fn certificate_container(der: &[u8], compressed: bool) -> Vec<u8> {
    let mut out = Vec::new();
    tlv::write(&mut out, 0x70, der);
    tlv::write(&mut out, 0x71, &[if compressed { CERTINFO_GZIP } else { 0 }]);
    tlv::write(&mut out, 0xFE, &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_fields() -> FascnFields {
        FascnFields {
            agency: "9999".into(),
            system: "0001".into(),
            credential: "123456".into(),
            series: "1".into(),
            issue: "1".into(),
            person: "0000000042".into(),
            org_category: "1".into(),
            org_id: "9999".into(),
            association: "1".into(),
        }
    }

    #[test]
    fn fascn_round_trips_and_detects_corruption() {
        let f = Fascn::encode(&sample_fields()).unwrap();
        assert_eq!(f.decode().unwrap(), sample_fields());
        // SS 0 0 0 0 FS: 11010 00001 00001 00001 00001 10110 (bits, LSB first, odd parity).
        let zero = FascnFields {
            agency: "0000".into(),
            system: "0000".into(),
            credential: "000000".into(),
            series: "0".into(),
            issue: "0".into(),
            person: "0000000000".into(),
            org_category: "0".into(),
            org_id: "0000".into(),
            association: "0".into(),
        };
        assert_eq!(&Fascn::encode(&zero).unwrap().0[..3], &[0xD0, 0x42, 0x10]);
        for byte in 0..25 {
            let mut bad = f;
            bad.0[byte] ^= 0x04;
            assert!(bad.decode().is_err(), "flip in byte {byte} went unnoticed");
        }
    }

    #[test]
    fn chuid_round_trips() {
        let c = Chuid {
            fascn: Some(Fascn::encode(&sample_fields()).unwrap()),
            guid: [0x11; 16],
            expiry: Some("20301231".into()),
            cardholder_uuid: None,
            signed: false,
        };
        assert_eq!(Chuid::parse(&c.encode()).unwrap(), c);
        assert_eq!(c.uuid_string(), "11111111-1111-1111-1111-111111111111");
        assert!(Chuid::parse(&[0x30, 0x01, 0x00]).is_err());
        assert!(Chuid::parse(&[0x35, 0x08, b'2', b'0', b'3', b'0', b'1', b'2', b'3', b'1']).is_err());
    }

    #[test]
    fn gzip_bomb_is_capped() {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![0u8; 10 << 20]).unwrap();
        let gz = enc.finish().unwrap();
        assert!(gz.len() < 20_000);
        let container = certificate_container(&gz, true);
        let err = certificate_from_container(&container, 16 * 1024).unwrap_err();
        assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    }

    #[test]
    fn apt_must_name_piv() {
        let mut apt = Vec::new();
        tlv::write(&mut apt, 0x4F, &PIV_AID[5..]);
        tlv::write(&mut apt, 0xAC, &[0x80, 0x01, 0x11, 0x06, 0x01, 0x00]);
        let props = ApplicationProperties::parse(&tlv::encode(0x61, &apt)).unwrap();
        assert_eq!(props.algorithms, vec![Algorithm::EccP256]);
        let other = tlv::encode(0x61, &tlv::encode(0x4F, &[0xD2, 0x76, 0, 1, 0x24, 1]));
        assert!(ApplicationProperties::parse(&other).is_err());
    }
}
