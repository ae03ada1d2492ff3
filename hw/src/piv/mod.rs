//! The PIV Card Application (NIST SP 800-73-4): names from the spec, the
//! objects the card holds, and the client that talks to it.
//!
//! - [`client`]: the card commands, sans-IO over a [`crate::Transport`].
//! - [`objects`]: parsers for what the card returns (APT, CHUID, FASC-N,
//!   Discovery, certificate containers).
//! - `admin` (feature `admin`): what an issuance station does to a card:
//!   management key authentication, key generation, PUT DATA, PIN and PUK
//!   changes, the YubiKey management key and reset extensions.
//!
//! Key references, algorithm identifiers and object tags use the names of
//! SP 800-78-4 and SP 800-73-4 Part 1.

#[cfg(feature = "admin")]
pub mod admin;
pub mod client;
pub mod objects;

pub use client::{Limits, PinStatus, PivClient, Stats};
pub use objects::{ApplicationProperties, Chuid, Discovery, Fascn};

use std::fmt;

/// The full PIV AID: NIST RID A0 00 00 03 08, PIX 00 00 10 00 01 00
/// (SP 800-73-4 Part 1, §2.2).
pub const PIV_AID: [u8; 11] = [0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00];

/// The right-truncated AID that clients use to select any version of the
/// PIV application (SP 800-73-4 Part 2, §3.1.1).
pub const PIV_AID_TRUNCATED: [u8; 9] = [0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00];

/// Key references of the PIV Card Application (SP 800-73-4 Part 1, Table 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    /// 9A: PIV Authentication key; use needs the PIN.
    Authentication,
    /// 9B: Card Management key (symmetric).
    Management,
    /// 9C: Digital Signature key; PIN always, immediately before each use.
    Signature,
    /// 9D: Key Management key; use needs the PIN.
    KeyManagement,
    /// 9E: Card Authentication key; no PIN.
    CardAuthentication,
}

/// What a command's key reference (P2) names (SP 800-73-4 Part 1,
/// Table 4 and Part 2, §3.2): a PIN, the PUK, or a key slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyRef {
    /// 00: the Global PIN (not offered by pivgate's cards).
    GlobalPin,
    /// 80: the PIV Card Application PIN.
    Pin,
    /// 81: the PUK.
    Puk,
    /// 9A to 9E: a key.
    Key(Slot),
}

impl KeyRef {
    /// The key reference byte.
    pub fn code(self) -> u8 {
        match self {
            KeyRef::GlobalPin => 0x00,
            KeyRef::Pin => 0x80,
            KeyRef::Puk => 0x81,
            KeyRef::Key(s) => s.key_ref(),
        }
    }

    /// What a key reference byte names, if anything.
    pub fn from_code(b: u8) -> Option<KeyRef> {
        Some(match b {
            0x00 => KeyRef::GlobalPin,
            0x80 => KeyRef::Pin,
            0x81 => KeyRef::Puk,
            other => KeyRef::Key(Slot::from_key_ref(other)?),
        })
    }
}

impl Slot {
    /// The key reference byte.
    pub fn key_ref(self) -> u8 {
        match self {
            Slot::Authentication => 0x9A,
            Slot::Management => 0x9B,
            Slot::Signature => 0x9C,
            Slot::KeyManagement => 0x9D,
            Slot::CardAuthentication => 0x9E,
        }
    }

    /// The slot for a key reference.
    pub fn from_key_ref(b: u8) -> Option<Slot> {
        Some(match b {
            0x9A => Slot::Authentication,
            0x9B => Slot::Management,
            0x9C => Slot::Signature,
            0x9D => Slot::KeyManagement,
            0x9E => Slot::CardAuthentication,
            _ => return None,
        })
    }

    /// The data object that holds this slot's X.509 certificate
    /// (SP 800-73-4 Part 1, Table 3). The management key has none.
    pub fn certificate_object(self) -> Option<ObjectTag> {
        Some(match self {
            Slot::Authentication => ObjectTag::X509_PIV_AUTHENTICATION,
            Slot::Signature => ObjectTag::X509_DIGITAL_SIGNATURE,
            Slot::KeyManagement => ObjectTag::X509_KEY_MANAGEMENT,
            Slot::CardAuthentication => ObjectTag::X509_CARD_AUTHENTICATION,
            Slot::Management => return None,
        })
    }

    /// Whether the card requires the PIN before this key signs.
    pub fn needs_pin(self) -> bool {
        !matches!(self, Slot::CardAuthentication)
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}", self.key_ref())
    }
}

/// Cryptographic algorithm identifiers (SP 800-78-4, Table 6-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// 0x03: Triple DES (management key).
    TripleDes,
    /// 0x08: AES-128 (management key).
    Aes128,
    /// 0x0A: AES-192 (management key).
    Aes192,
    /// 0x0C: AES-256 (management key).
    Aes256,
    /// 0x07: RSA 2048 with public exponent 65537.
    Rsa2048,
    /// 0x11: ECC curve P-256.
    EccP256,
    /// 0x14: ECC curve P-384.
    EccP384,
}

impl Algorithm {
    /// The algorithm identifier byte.
    pub fn id(self) -> u8 {
        match self {
            Algorithm::TripleDes => 0x03,
            Algorithm::Aes128 => 0x08,
            Algorithm::Aes192 => 0x0A,
            Algorithm::Aes256 => 0x0C,
            Algorithm::Rsa2048 => 0x07,
            Algorithm::EccP256 => 0x11,
            Algorithm::EccP384 => 0x14,
        }
    }

    /// The algorithm for an identifier byte.
    pub fn from_id(b: u8) -> Option<Algorithm> {
        Some(match b {
            0x03 => Algorithm::TripleDes,
            0x08 => Algorithm::Aes128,
            0x0A => Algorithm::Aes192,
            0x0C => Algorithm::Aes256,
            0x07 => Algorithm::Rsa2048,
            0x11 => Algorithm::EccP256,
            0x14 => Algorithm::EccP384,
            _ => return None,
        })
    }

    /// Whether this is an asymmetric (signing) algorithm.
    pub fn is_asymmetric(self) -> bool {
        matches!(self, Algorithm::Rsa2048 | Algorithm::EccP256 | Algorithm::EccP384)
    }

    /// The digest length the card expects for ECDSA (SHA-256 for P-256,
    /// SHA-384 for P-384, SP 800-78-4 Table 3-2).
    pub fn ecdsa_digest_len(self) -> Option<usize> {
        match self {
            Algorithm::EccP256 => Some(32),
            Algorithm::EccP384 => Some(48),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Algorithm::TripleDes => "3DES",
            Algorithm::Aes128 => "AES-128",
            Algorithm::Aes192 => "AES-192",
            Algorithm::Aes256 => "AES-256",
            Algorithm::Rsa2048 => "RSA-2048",
            Algorithm::EccP256 => "ECC P-256",
            Algorithm::EccP384 => "ECC P-384",
        })
    }
}

/// A PIV data object tag (SP 800-73-4 Part 1, Table 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectTag(pub u32);

impl ObjectTag {
    /// Card Capability Container.
    pub const CCC: ObjectTag = ObjectTag(0x5FC107);
    /// Card Holder Unique Identifier.
    pub const CHUID: ObjectTag = ObjectTag(0x5FC102);
    /// X.509 Certificate for PIV Authentication (9A).
    pub const X509_PIV_AUTHENTICATION: ObjectTag = ObjectTag(0x5FC105);
    /// X.509 Certificate for Digital Signature (9C).
    pub const X509_DIGITAL_SIGNATURE: ObjectTag = ObjectTag(0x5FC10A);
    /// X.509 Certificate for Key Management (9D).
    pub const X509_KEY_MANAGEMENT: ObjectTag = ObjectTag(0x5FC10B);
    /// X.509 Certificate for Card Authentication (9E).
    pub const X509_CARD_AUTHENTICATION: ObjectTag = ObjectTag(0x5FC101);
    /// Printed Information (PIN to read).
    pub const PRINTED_INFORMATION: ObjectTag = ObjectTag(0x5FC109);
    /// Cardholder Facial Image (PIN to read).
    pub const FACIAL_IMAGE: ObjectTag = ObjectTag(0x5FC108);
    /// Security Object.
    pub const SECURITY_OBJECT: ObjectTag = ObjectTag(0x5FC106);
    /// Key History Object.
    pub const KEY_HISTORY: ObjectTag = ObjectTag(0x5FC10C);
    /// Discovery Object (one-byte tag).
    pub const DISCOVERY: ObjectTag = ObjectTag(0x7E);

    /// The tag list encoding for GET DATA's `5C` field.
    pub fn encoded(self) -> Vec<u8> {
        let mut out = Vec::with_capacity(3);
        crate::tlv::write_tag(&mut out, self.0);
        out
    }

    /// Whether reading this object needs the PIN (SP 800-73-4 Part 1,
    /// Table 3 "Access Rule for Read").
    pub fn read_needs_pin(self) -> bool {
        matches!(self, ObjectTag::PRINTED_INFORMATION | ObjectTag::FACIAL_IMAGE) || (0x5FC103..=0x5FC104).contains(&self.0)
    }
}

impl fmt::Display for ObjectTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_references_read_back() {
        for b in 0..=255u8 {
            if let Some(k) = KeyRef::from_code(b) {
                assert_eq!(k.code(), b);
            }
        }
        assert_eq!(KeyRef::from_code(0x80), Some(KeyRef::Pin));
        assert_eq!(KeyRef::from_code(0x9E), Some(KeyRef::Key(Slot::CardAuthentication)));
        assert_eq!(KeyRef::from_code(0x99), None);
    }
}
