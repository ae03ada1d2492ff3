//! PIN-pad readers: secure PIN entry on the reader itself (PC/SC Part 10,
//! CCID §6.1.11), so the PIN never passes through the Pi.
//!
//! [`features`] asks the reader for its Part 10 features with
//! CM_IOCTL_GET_FEATURE_REQUEST; [`verify_pin_direct`] sends the PIV VERIFY
//! through FEATURE_VERIFY_PIN_DIRECT, and the reader fills in the digits the
//! person types on its keys.

use crate::error::{Error, Result};

use super::ReaderControl;

/// CM_IOCTL_GET_FEATURE_REQUEST, SCARD_CTL_CODE(3400) (PC/SC Part 10, §2.2).
pub fn get_feature_request() -> u32 {
    ::pcsc::ctl_code(3400) as u32
}

/// FEATURE_VERIFY_PIN_DIRECT tag (PC/SC Part 10, §2.3).
pub const FEATURE_VERIFY_PIN_DIRECT: u8 = 0x06;
/// FEATURE_MODIFY_PIN_DIRECT tag.
pub const FEATURE_MODIFY_PIN_DIRECT: u8 = 0x07;

/// The Part 10 features a reader announced: (tag, control code) pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Features(pub Vec<(u8, u32)>);

impl Features {
    /// Parses the GET_FEATURE_REQUEST response: repeated tag (1 byte),
    /// length (1 byte, always 4), control code (4 bytes, big-endian).
    pub fn parse(data: &[u8]) -> Result<Features> {
        let mut out = Vec::new();
        let mut rest = data;
        while !rest.is_empty() {
            if rest.len() < 6 || rest[1] != 4 {
                return Err(Error::malformed("GET_FEATURE_REQUEST", "feature TLV is not tag, 4, code"));
            }
            out.push((rest[0], u32::from_be_bytes([rest[2], rest[3], rest[4], rest[5]])));
            rest = &rest[6..];
        }
        Ok(Features(out))
    }

    /// The control code for a feature, if announced.
    pub fn get(&self, tag: u8) -> Option<u32> {
        self.0.iter().find(|(t, _)| *t == tag).map(|(_, c)| *c)
    }

    /// Whether the reader can take a PIN on its own keys.
    pub fn has_pin_pad(&self) -> bool {
        self.get(FEATURE_VERIFY_PIN_DIRECT).is_some()
    }
}

/// Asks the reader for its features. A reader that does not understand the
/// request (vpcd, most plain readers) has none.
pub fn features(card: &impl ReaderControl) -> Result<Features> {
    match card.control(get_feature_request(), &[]) {
        Ok(data) => Features::parse(&data),
        Err(Error::Pcsc(_)) => Ok(Features::default()),
        Err(e) => Err(e),
    }
}

/// PIN_VERIFY_STRUCTURE (PC/SC Part 10, §2.5.2) for the PIV Card
/// Application PIN: ASCII digits, left-justified in an 8-byte block padded
/// with 0xFF (the reader fills 0xFF where no digit was typed), 6 to 8
/// digits, validated with the OK key, around `VERIFY 00 20 00 80 08`.
pub fn piv_verify_structure(timeout_secs: u8) -> Vec<u8> {
    let apdu = [0x00, 0x20, 0x00, 0x80, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
    let mut s = Vec::with_capacity(19 + apdu.len());
    s.push(timeout_secs); // bTimerOut
    s.push(timeout_secs); // bTimerOut2
    s.push(0x82); // bmFormatString: bytes, position 0, left-justified, ASCII
    s.push(0x08); // bmPINBlockString: no length field, 8-byte block
    s.push(0x00); // bmPINLengthFormat: no length in the APDU
    s.extend_from_slice(&[0x08, 0x06]); // wPINMaxExtraDigit: min 6, max 8 (little-endian 0x0608)
    s.push(0x02); // bEntryValidationCondition: validation key pressed
    s.push(0x01); // bNumberMessage
    s.extend_from_slice(&[0x09, 0x04]); // wLangId 0x0409
    s.push(0x00); // bMsgIndex
    s.extend_from_slice(&[0, 0, 0]); // bTeoPrologue
    s.extend_from_slice(&(apdu.len() as u32).to_le_bytes()); // ulDataLength
    s.extend_from_slice(&apdu);
    s
}

/// Maps the reader's two status bytes after a PIN-pad VERIFY.
pub fn verify_result(sw: &[u8]) -> Result<()> {
    match sw {
        [0x90, 0x00] => Ok(()),
        [0x64, 0x00] => Err(Error::PinPadEntry("timed out")),
        [0x64, 0x01] => Err(Error::PinPadEntry("was cancelled")),
        [0x64, 0x02] => Err(Error::PinPadEntry("had mismatching entries")),
        [0x69, 0x83] => Err(Error::PinBlocked),
        [0x63, x] if x & 0xF0 == 0xC0 && x & 0x0F == 0 => Err(Error::PinBlocked),
        [0x63, x] if x & 0xF0 == 0xC0 => Err(Error::WrongPin { tries: x & 0x0F }),
        [a, b] => Err(Error::Status { command: "VERIFY (PIN pad)", sw: crate::apdu::StatusWord(u16::from_be_bytes([*a, *b])) }),
        _ => Err(Error::malformed("VERIFY (PIN pad)", "reader answer is not two status bytes")),
    }
}

/// VERIFY with the PIN typed on the reader's own keys.
pub fn verify_pin_direct(card: &impl ReaderControl, features: &Features, timeout_secs: u8) -> Result<()> {
    let code = features.get(FEATURE_VERIFY_PIN_DIRECT).ok_or(Error::NoPinPad)?;
    let out = card.control(code, &piv_verify_structure(timeout_secs))?;
    verify_result(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_feature_list() {
        let f = Features::parse(&[0x06, 4, 0x42, 0x33, 0x00, 0x12, 0x12, 4, 0x42, 0x33, 0x00, 0x20]).unwrap();
        assert!(f.has_pin_pad());
        assert_eq!(f.get(FEATURE_VERIFY_PIN_DIRECT), Some(0x4233_0012));
        assert!(Features::parse(&[0x06, 2, 0, 0]).is_err());
        assert!(!Features::parse(&[]).unwrap().has_pin_pad());
    }

    #[test]
    fn verify_structure_layout() {
        let s = piv_verify_structure(30);
        assert_eq!(s.len(), 19 + 13);
        assert_eq!(&s[15..19], &[13, 0, 0, 0]);
        assert_eq!(&s[19..24], &[0x00, 0x20, 0x00, 0x80, 0x08]);
        assert_eq!(s[2], 0x82);
    }

    #[test]
    fn maps_reader_answers() {
        assert!(verify_result(&[0x90, 0x00]).is_ok());
        assert!(matches!(verify_result(&[0x63, 0xC2]), Err(Error::WrongPin { tries: 2 })));
        assert!(matches!(verify_result(&[0x63, 0xC0]), Err(Error::PinBlocked)));
        assert!(matches!(verify_result(&[0x64, 0x01]), Err(Error::PinPadEntry(_))));
        assert!(verify_result(&[0x90]).is_err());
    }
}
