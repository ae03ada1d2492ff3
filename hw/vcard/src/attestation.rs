//! PIV attestation as YubiKeys do it: each card holds an attestation key
//! (slot F9) with a certificate from the maker's attestation root, and
//! signs, for any key it generated itself, a certificate saying so, with
//! the key's PIN and touch policies, the card's serial and firmware.
//!
//! The virtual card's root is a test root ([`AttestationCa`]), never
//! Yubico's: a gateway trusts it only where a test configures it.

use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::keys::CardKey;
use pivgate_hw::piv::{Algorithm, Slot};

/// Yubico's attestation extensions (OID arc 1.3.6.1.4.1.41482.3).
pub mod oid {
    /// Firmware version: three bytes.
    pub const FIRMWARE: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 3];
    /// Serial number: a DER INTEGER.
    pub const SERIAL: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 7];
    /// PIN policy and touch policy: two bytes.
    pub const POLICY: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 8];
    /// Form factor: one byte.
    pub const FORM_FACTOR: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 9];
}

/// When a key needs the PIN (the YubiKey PIN policy; SP 800-73-4 itself
/// fixes it per slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinPolicy {
    /// Never: the key signs for whoever holds the card.
    Never,
    /// Once per session (a VERIFY, until reset).
    Once,
    /// A VERIFY before every signature.
    Always,
}

impl PinPolicy {
    /// The byte GENERATE, GET METADATA and attestation use.
    pub fn code(self) -> u8 {
        match self {
            PinPolicy::Never => 1,
            PinPolicy::Once => 2,
            PinPolicy::Always => 3,
        }
    }

    /// From that byte (0: the slot's default).
    pub fn from_code(b: u8, slot: Slot) -> Option<PinPolicy> {
        Some(match b {
            0 => PinPolicy::default_for(slot),
            1 => PinPolicy::Never,
            2 => PinPolicy::Once,
            3 => PinPolicy::Always,
            _ => return None,
        })
    }

    /// The slot's default (SP 800-73-4: 9E needs no PIN, 9C needs it for
    /// each signature).
    pub fn default_for(slot: Slot) -> PinPolicy {
        match slot {
            Slot::CardAuthentication => PinPolicy::Never,
            Slot::Signature => PinPolicy::Always,
            _ => PinPolicy::Once,
        }
    }
}

/// Whether a key needs a touch of the token (recorded and attested; the
/// virtual card has no button and never waits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TouchPolicy {
    /// Never.
    Never,
    /// For every signature.
    Always,
    /// Once every 15 seconds.
    Cached,
}

impl TouchPolicy {
    /// The byte GENERATE, GET METADATA and attestation use.
    pub fn code(self) -> u8 {
        match self {
            TouchPolicy::Never => 1,
            TouchPolicy::Always => 2,
            TouchPolicy::Cached => 3,
        }
    }

    /// From that byte (0: never, the default).
    pub fn from_code(b: u8) -> Option<TouchPolicy> {
        Some(match b {
            0 | 1 => TouchPolicy::Never,
            2 => TouchPolicy::Always,
            3 => TouchPolicy::Cached,
            _ => return None,
        })
    }
}

/// Where a slot's key came from and what it asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyOrigin {
    /// Generated on the card (GENERATE ASYMMETRIC KEY PAIR), never seen
    /// outside it; else put there from outside.
    pub generated: bool,
    /// Its PIN policy.
    pub pin: PinPolicy,
    /// Its touch policy.
    pub touch: TouchPolicy,
}

impl KeyOrigin {
    /// A key put on the card from outside, with the slot's default PIN
    /// policy.
    pub fn imported(slot: Slot) -> KeyOrigin {
        KeyOrigin { generated: false, pin: PinPolicy::default_for(slot), touch: TouchPolicy::Never }
    }
}

/// A test attestation root, standing in for the card maker's.
#[derive(Clone)]
pub struct AttestationCa {
    /// Its certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PKCS#8 PEM.
    pub key_pem: Zeroizing<String>,
}

/// A card's attestation key and its certificate (slot F9).
#[derive(Clone)]
pub struct Attestation {
    /// The attestation key.
    pub key: CardKey,
    /// Its certificate from the attestation root, DER.
    pub certificate: Vec<u8>,
}

fn rc(e: rcgen::Error) -> Error {
    Error::Profile(format!("attestation certificate: {e}"))
}

fn serial_number() -> rcgen::SerialNumber {
    let mut b = [0u8; 16];
    OsRng.fill_bytes(&mut b);
    b[0] &= 0x7F;
    rcgen::SerialNumber::from_slice(&b)
}

fn long_validity(p: &mut rcgen::CertificateParams) {
    p.not_before = time::OffsetDateTime::from_unix_timestamp(1_451_606_400).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    p.not_after = time::OffsetDateTime::from_unix_timestamp(2_524_608_000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
}

impl AttestationCa {
    /// A new test attestation root (P-256).
    pub fn generate(name: &str) -> Result<AttestationCa> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc)?;
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        p.serial_number = Some(serial_number());
        long_validity(&mut p);
        let cert = p.self_signed(&key).map_err(rc)?;
        Ok(AttestationCa { cert_pem: cert.pem(), key_pem: Zeroizing::new(key.serialize_pem()) })
    }

    /// A card's attestation key and certificate, as the maker writes them
    /// at manufacture.
    pub fn device(&self, serial: u32) -> Result<Attestation> {
        let key = CardKey::generate(Algorithm::EccP256, &mut OsRng)?;
        let root_key = rcgen::KeyPair::from_pem(&self.key_pem).map_err(rc)?;
        let root = rcgen::Issuer::from_ca_cert_pem(&self.cert_pem, root_key).map_err(rc)?;
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, format!("Virtual PIV Attestation {serial}"));
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        p.serial_number = Some(serial_number());
        long_validity(&mut p);
        let spki = rcgen::SubjectPublicKeyInfo::from_der(&key.spki_der()?).map_err(rc)?;
        let cert = p.signed_by(&spki, &root).map_err(rc)?;
        Ok(Attestation { key, certificate: cert.der().to_vec() })
    }
}

/// The minimal DER INTEGER for a serial number.
fn der_integer(n: u32) -> Vec<u8> {
    let mut b: Vec<u8> = n.to_be_bytes().to_vec();
    while b.len() > 1 && b[0] == 0 && b[1] & 0x80 == 0 {
        b.remove(0);
    }
    if b[0] & 0x80 != 0 {
        b.insert(0, 0);
    }
    let mut out = vec![0x02, b.len() as u8];
    out.extend(b);
    out
}

impl Attestation {
    /// The certificate the card signs for the key in `slot`.
    pub fn attest(&self, slot: Slot, key: &CardKey, origin: &KeyOrigin, serial: u32, firmware: [u8; 3]) -> Result<Vec<u8>> {
        let pem = self.key.to_pem()?;
        let signer = rcgen::KeyPair::from_pem(&pem).map_err(rc)?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&crate::profile::pem_encode("CERTIFICATE", &self.certificate), signer).map_err(rc)?;
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, format!("YubiKey PIV Attestation {slot}"));
        p.serial_number = Some(serial_number());
        long_validity(&mut p);
        p.custom_extensions = vec![
            rcgen::CustomExtension::from_oid_content(oid::FIRMWARE, firmware.to_vec()),
            rcgen::CustomExtension::from_oid_content(oid::SERIAL, der_integer(serial)),
            rcgen::CustomExtension::from_oid_content(oid::POLICY, vec![origin.pin.code(), origin.touch.code()]),
            rcgen::CustomExtension::from_oid_content(oid::FORM_FACTOR, vec![0x81]),
        ];
        let spki = rcgen::SubjectPublicKeyInfo::from_der(&key.spki_der()?).map_err(rc)?;
        let cert = p.signed_by(&spki, &issuer).map_err(rc)?;
        Ok(cert.der().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_numbers_are_minimal_positive_integers() {
        assert_eq!(der_integer(0), [2, 1, 0]);
        assert_eq!(der_integer(0x7F), [2, 1, 0x7F]);
        assert_eq!(der_integer(0x80), [2, 2, 0, 0x80]);
        assert_eq!(der_integer(10_000_001), [2, 4, 0, 0x98, 0x96, 0x81]);
        assert_eq!(der_integer(0x0100), [2, 2, 1, 0]);
        assert_eq!(der_integer(u32::MAX), [2, 5, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
    }
}
