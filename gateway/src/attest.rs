//! PIV attestation, checked by the gateway itself: a certificate the
//! token's attestation key signed for one of its keys (the YubiKey F9
//! extension), through the token's attestation certificate to an
//! attestation root the site configured (rustls-webpki), and what it
//! proves: the key was generated on the token and never left it, its PIN
//! policy, its touch policy, the token's serial number.
//!
//! This is what keeps a card-only key, or a key that was imported and may
//! have copies, from standing in for the PIN key: a site can require the
//! 9A key to be attested as generated on the token with a PIN policy other
//! than "never".

use std::time::SystemTime;

use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use webpki::EndEntityCert;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::verify::AnyEku;

/// A key's PIN policy, as attested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PinPolicy {
    /// The key signs without the PIN.
    Never,
    /// Once per session.
    Once,
    /// Before every signature.
    Always,
    /// Another value (a newer token's policy): never taken for "once".
    Other(u8),
}

/// A key's touch policy, as attested.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TouchPolicy {
    /// No touch.
    Never,
    /// A touch for every signature.
    Always,
    /// A touch, good for 15 seconds.
    Cached,
    /// Another value.
    Other(u8),
}

/// What an attestation proved about a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attested {
    /// SHA-256 of the attested SubjectPublicKeyInfo.
    pub key_sha256: [u8; 32],
    /// Generated on the token (the only keys a token attests).
    pub generated: bool,
    /// The key's PIN policy.
    pub pin_policy: PinPolicy,
    /// The key's touch policy.
    pub touch_policy: TouchPolicy,
    /// The token's serial number, when attested.
    pub serial: Option<u32>,
    /// The token's firmware version, when attested.
    pub firmware: Option<String>,
    /// SHA-256 of the attestation certificate.
    pub attestation_sha256: [u8; 32],
}

impl Attested {
    /// Whether this key may stand as the PIN key: generated on the token,
    /// and it asks for the PIN.
    pub fn is_pin_key(&self) -> bool {
        self.generated && matches!(self.pin_policy, PinPolicy::Once | PinPolicy::Always)
    }
}

/// Why an attestation was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationRefusal {
    /// The site configured no attestation roots.
    #[error("no attestation roots are configured (cards.attestation_roots)")]
    NoRoots,
    /// A certificate does not parse.
    #[error("malformed attestation certificate")]
    Malformed,
    /// The chain does not verify to a configured attestation root.
    #[error("the attestation does not verify to a configured attestation root: {0}")]
    Untrusted(String),
    /// It attests another key than the certificate being enrolled.
    #[error("the attestation is for another key than the certificate's")]
    OtherKey,
    /// It carries no PIN and touch policy (not a PIV attestation).
    #[error("the attestation carries no PIN policy")]
    NoPolicy,
}

const OID_FIRMWARE: &str = "1.3.6.1.4.1.41482.3.3";
const OID_SERIAL: &str = "1.3.6.1.4.1.41482.3.7";
const OID_POLICY: &str = "1.3.6.1.4.1.41482.3.8";

/// The attestation roots a site trusts (the token makers').
pub struct AttestationTrust {
    roots: Vec<TrustAnchor<'static>>,
}

impl AttestationTrust {
    /// Trust these roots (DER).
    pub fn new(roots_der: &[Vec<u8>]) -> Result<AttestationTrust, String> {
        let mut roots = Vec::new();
        for der in roots_der {
            let cert = CertificateDer::from(der.as_slice());
            roots.push(webpki::anchor_from_trusted_cert(&cert).map_err(|e| format!("attestation root: {e:?}"))?.to_owned());
        }
        Ok(AttestationTrust { roots })
    }

    /// Checks `attestation` (the certificate the token signed for the key)
    /// through `intermediate` (the token's attestation certificate, slot
    /// F9) to a root, for the key `spki` (DER SubjectPublicKeyInfo).
    pub fn verify(&self, attestation: &[u8], intermediate: &[u8], spki: &[u8], now: SystemTime) -> Result<Attested, AttestationRefusal> {
        if self.roots.is_empty() {
            return Err(AttestationRefusal::NoRoots);
        }
        let (rest, cert) = X509Certificate::from_der(attestation).map_err(|_| AttestationRefusal::Malformed)?;
        if !rest.is_empty() {
            return Err(AttestationRefusal::Malformed);
        }
        let (rest, _) = X509Certificate::from_der(intermediate).map_err(|_| AttestationRefusal::Malformed)?;
        if !rest.is_empty() {
            return Err(AttestationRefusal::Malformed);
        }
        let ee_der = CertificateDer::from(attestation);
        let ee = EndEntityCert::try_from(&ee_der).map_err(|_| AttestationRefusal::Malformed)?;
        let unix = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());
        let intermediates = [CertificateDer::from(intermediate)];
        ee.verify_for_usage(webpki::ALL_VERIFICATION_ALGS, &self.roots, &intermediates, unix, AnyEku, None, None)
            .map_err(|e| AttestationRefusal::Untrusted(format!("{e:?}")))?;
        if cert.tbs_certificate.subject_pki.raw != spki {
            return Err(AttestationRefusal::OtherKey);
        }
        let ext = |oid: &str| cert.extensions().iter().find(|e| e.oid.to_id_string() == oid).map(|e| e.value);
        let policy = ext(OID_POLICY).filter(|v| v.len() >= 2).ok_or(AttestationRefusal::NoPolicy)?;
        let pin_policy = match policy[0] {
            1 => PinPolicy::Never,
            2 => PinPolicy::Once,
            3 => PinPolicy::Always,
            b => PinPolicy::Other(b),
        };
        let touch_policy = match policy[1] {
            1 => TouchPolicy::Never,
            2 => TouchPolicy::Always,
            3 => TouchPolicy::Cached,
            b => TouchPolicy::Other(b),
        };
        let serial = ext(OID_SERIAL).and_then(|v| x509_parser::der_parser::der::parse_der_integer(v).ok()).and_then(|(_, i)| i.as_u32().ok());
        let firmware = ext(OID_FIRMWARE).filter(|v| v.len() == 3).map(|v| format!("{}.{}.{}", v[0], v[1], v[2]));
        Ok(Attested {
            key_sha256: Sha256::digest(spki).into(),
            generated: true,
            pin_policy,
            touch_policy,
            serial,
            firmware,
            attestation_sha256: Sha256::digest(attestation).into(),
        })
    }
}
