//! Card proofs, checked by the gateway itself: the certificate path to the
//! configured card issuers (rustls-webpki), revocation (the gateway's deny
//! list and CRLs), key usage, extended key usage and certificate policies
//! (x509-parser), strong identifiers from the certificate, and the card's
//! signature (aws-lc-rs).
//!
//! Card issuers are their own PKI, never mixed with the service CA.

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use aws_lc_rs::signature::{UnparsedPublicKey, VerificationAlgorithm};
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use rustls::pki_types::TrustAnchor;
use webpki::{CertRevocationList, EndEntityCert, OwnedCertRevocationList, RevocationCheckDepth, UnknownStatusPolicy};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::model::{KeyAlgorithm, Slot};

/// Why a proof or certificate was refused; each has its own code in the
/// API (`pivgate.v1.DenyReason`) and its own audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum Deny {
    UnknownCard,
    UntrustedIssuer,
    CertExpired,
    CertNotYetValid,
    RevokedDenyList,
    RevokedCrl,
    CrlStale,
    WrongKeyUsage,
    WrongEku,
    WrongPolicy,
    MechanismNotAllowed,
    BadSignature,
    ChallengeUnknown,
    ChallengeExpired,
    ChallengeMismatch,
    MalformedSignature,
    UnsupportedAlgorithm,
    IdentityMismatch,
    OperatorDisabled,
    TerminalNotBound,
    NotAuthorized,
    MalformedCertificate,
    NotEndEntity,
    SelfSigned,
    ChallengeReplayed,
    AlgorithmMismatch,
}

impl Deny {
    /// A stable name for logs and audit records.
    pub fn name(self) -> &'static str {
        match self {
            Deny::UnknownCard => "unknown_card",
            Deny::UntrustedIssuer => "untrusted_issuer",
            Deny::CertExpired => "cert_expired",
            Deny::CertNotYetValid => "cert_not_yet_valid",
            Deny::RevokedDenyList => "revoked_deny_list",
            Deny::RevokedCrl => "revoked_crl",
            Deny::CrlStale => "crl_stale",
            Deny::WrongKeyUsage => "wrong_key_usage",
            Deny::WrongEku => "wrong_eku",
            Deny::WrongPolicy => "wrong_policy",
            Deny::MechanismNotAllowed => "mechanism_not_allowed",
            Deny::BadSignature => "bad_signature",
            Deny::ChallengeUnknown => "challenge_unknown",
            Deny::ChallengeExpired => "challenge_expired",
            Deny::ChallengeMismatch => "challenge_mismatch",
            Deny::MalformedSignature => "malformed_signature",
            Deny::UnsupportedAlgorithm => "unsupported_algorithm",
            Deny::IdentityMismatch => "identity_mismatch",
            Deny::OperatorDisabled => "operator_disabled",
            Deny::TerminalNotBound => "terminal_not_bound",
            Deny::NotAuthorized => "not_authorized",
            Deny::MalformedCertificate => "malformed_certificate",
            Deny::NotEndEntity => "not_end_entity",
            Deny::SelfSigned => "self_signed",
            Deny::ChallengeReplayed => "challenge_replayed",
            Deny::AlgorithmMismatch => "algorithm_mismatch",
        }
    }
}

/// id-PIV-cardAuth, the EKU of card-authentication (9E) certificates.
pub const OID_EKU_PIV_CARD_AUTH: &str = "2.16.840.1.101.3.6.8";
/// id-fpki-common-cardAuth, the policy of card-authentication certificates.
pub const OID_POLICY_CARD_AUTH: &str = "2.16.840.1.101.3.2.1.3.17";

/// OID of the pivFASC-N otherName.
const OID_FASCN: &str = "2.16.840.1.101.3.6.6";

/// What the gateway reads from a card certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Card UUID from a `urn:uuid:` SAN URI.
    pub uuid: Option<[u8; 16]>,
    /// FASC-N from the pivFASC-N otherName.
    pub fascn: Option<Vec<u8>>,
    /// The key algorithm.
    pub algorithm: KeyAlgorithm,
    /// DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
    /// SHA-256 of the certificate.
    pub fingerprint: [u8; 32],
}

/// Reads identifiers and the key from a certificate.
pub fn inspect(der: &[u8]) -> Result<CertInfo, Deny> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|_| Deny::MalformedCertificate)?;
    if !rest.is_empty() {
        return Err(Deny::MalformedCertificate);
    }
    let spki = cert.tbs_certificate.subject_pki.raw.to_vec();
    let algorithm = key_algorithm(&cert)?;
    let mut uuid = None;
    let mut fascn = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => {
                    if let Some(s) = u.strip_prefix("urn:uuid:") {
                        uuid = crate::model::parse_uuid(s);
                    }
                }
                GeneralName::OtherName(oid, value) if oid.to_id_string() == OID_FASCN => {
                    fascn = octet_string_in(value);
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo { uuid, fascn, algorithm, spki, fingerprint: Sha256::digest(der).into() })
}

/// The OCTET STRING inside an otherName value (with or without its
/// explicit [0] wrapper).
fn octet_string_in(v: &[u8]) -> Option<Vec<u8>> {
    let (tag, body) = der_tlv(v)?;
    match tag {
        0x04 => Some(body.to_vec()),
        0xA0 => {
            let (t, b) = der_tlv(body)?;
            (t == 0x04).then(|| b.to_vec())
        }
        _ => None,
    }
}

fn der_tlv(v: &[u8]) -> Option<(u8, &[u8])> {
    let tag = *v.first()?;
    let l0 = *v.get(1)?;
    let (len, start) = match l0 {
        0..=0x7F => (usize::from(l0), 2),
        0x81 => (usize::from(*v.get(2)?), 3),
        0x82 => ((usize::from(*v.get(2)?) << 8) | usize::from(*v.get(3)?), 4),
        _ => return None,
    };
    Some((tag, v.get(start..start + len)?))
}

fn key_algorithm(cert: &X509Certificate<'_>) -> Result<KeyAlgorithm, Deny> {
    use x509_parser::public_key::PublicKey;
    let spki = &cert.tbs_certificate.subject_pki;
    match spki.parsed() {
        Ok(PublicKey::RSA(rsa)) if rsa.key_size() == 2048 => Ok(KeyAlgorithm::Rsa2048),
        Ok(PublicKey::EC(_)) => {
            let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
            match curve.as_deref() {
                Some("1.2.840.10045.3.1.7") => Ok(KeyAlgorithm::EcdsaP256),
                Some("1.3.132.0.34") => Ok(KeyAlgorithm::EcdsaP384),
                _ => Err(Deny::UnsupportedAlgorithm),
            }
        }
        Ok(_) => Err(Deny::UnsupportedAlgorithm),
        Err(_) => Err(Deny::MalformedCertificate),
    }
}

/// What the site requires of card certificates, per slot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardPolicy {
    /// Extended key usages, any of which the certificate must carry (dotted
    /// OIDs); empty: not checked.
    pub required_eku: BTreeMap<Slot, Vec<String>>,
    /// Certificate policies, any of which the certificate must carry;
    /// empty: not checked.
    pub required_policies: BTreeMap<Slot, Vec<String>>,
    /// Refuse when the issuer's CRL is past its nextUpdate.
    pub crl_strict: bool,
    /// Refuse when the issuer's CRL was issued longer ago than this.
    pub max_crl_age: Option<Duration>,
    /// Refuse when no CRL is loaded for the issuer.
    pub require_crl: bool,
}

/// A loaded CRL and where it came from.
pub struct LoadedCrl {
    crl: CertRevocationList<'static>,
    /// Where it was read from.
    pub source: String,
    /// Issuer DN (DER), to match certificates.
    pub issuer: Vec<u8>,
    /// thisUpdate.
    pub this_update: SystemTime,
    /// nextUpdate, if set.
    pub next_update: Option<SystemTime>,
}

impl LoadedCrl {
    /// Parses a DER CRL. Its signature is checked against the issuer when
    /// used, by webpki.
    pub fn from_der(der: &[u8], source: String) -> Result<LoadedCrl, String> {
        let (_, parsed) = x509_parser::revocation_list::CertificateRevocationList::from_der(der).map_err(|e| e.to_string())?;
        let to_time = |t: x509_parser::time::ASN1Time| SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64);
        let this_update = to_time(parsed.last_update());
        let next_update = parsed.next_update().map(to_time);
        let issuer = parsed.tbs_cert_list.issuer.as_raw().to_vec();
        let crl = OwnedCertRevocationList::from_der(der).map_err(|e| format!("{e:?}"))?;
        Ok(LoadedCrl { crl: crl.into(), source, issuer, this_update, next_update })
    }
}

/// What a successful validation learned, for the audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Validation {
    /// "deny-list" or "deny-list+crl:SOURCE".
    pub revocation_source: String,
    /// Age of the CRL used, seconds.
    pub crl_age_s: Option<u64>,
}

/// The card issuers the site trusts, their CRLs and the policy.
pub struct CardTrust {
    anchors: Vec<TrustAnchor<'static>>,
    anchor_subjects: Vec<Vec<u8>>,
    crls: RwLock<Vec<LoadedCrl>>,
    policy: CardPolicy,
}

struct AnyEku;

impl webpki::ExtendedKeyUsageValidator for AnyEku {
    // EKU is checked on the leaf against the site's policy, below; webpki
    // would otherwise apply it to intermediates too.
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for k in iter {
            k?;
        }
        Ok(())
    }
}

impl CardTrust {
    /// Trust these issuer certificates (DER) with this policy.
    pub fn new(anchors_der: &[Vec<u8>], policy: CardPolicy) -> Result<CardTrust, String> {
        let mut anchors = Vec::new();
        let mut anchor_subjects = Vec::new();
        for der in anchors_der {
            let cert = CertificateDer::from(der.as_slice());
            let ta = webpki::anchor_from_trusted_cert(&cert).map_err(|e| format!("trust anchor: {e:?}"))?.to_owned();
            anchors.push(ta);
            let (_, c) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
            anchor_subjects.push(c.subject().as_raw().to_vec());
        }
        Ok(CardTrust { anchors, anchor_subjects, crls: RwLock::new(Vec::new()), policy })
    }

    /// Replaces the loaded CRLs, keeping the previous CRL of every source
    /// in `failed` (a failed refresh must not drop revocation data).
    ///
    /// A source never goes back to an older CRL than it had (a replayed
    /// CRL would un-revoke certificates), and of several CRLs for one
    /// issuer only the newest is used.
    pub fn set_crls(&self, fresh: Vec<LoadedCrl>, failed: &[String]) {
        let Ok(mut g) = self.crls.write() else { return };
        let old = std::mem::take(&mut *g);
        let mut next: Vec<LoadedCrl> = Vec::new();
        let mut fresh = fresh;
        for prev in old {
            let newer = fresh.iter().position(|c| c.source == prev.source && c.issuer == prev.issuer);
            match newer {
                Some(i) if fresh[i].this_update < prev.this_update => {
                    tracing::warn!(source = %prev.source, "refusing a CRL older than the one held; keeping the newer");
                    fresh.remove(i);
                    next.push(prev);
                }
                Some(_) => {}
                None if failed.contains(&prev.source) => next.push(prev),
                None => {}
            }
        }
        next.extend(fresh);
        // Newest first, then keep one per issuer.
        next.sort_by_key(|c| std::cmp::Reverse(c.this_update));
        let mut seen: Vec<Vec<u8>> = Vec::new();
        next.retain(|c| {
            if seen.contains(&c.issuer) {
                false
            } else {
                seen.push(c.issuer.clone());
                true
            }
        });
        *g = next;
    }

    /// The oldest CRL age, seconds (for metrics).
    pub fn crl_ages(&self, now: SystemTime) -> Vec<(String, u64)> {
        self.crls
            .read()
            .map(|g| g.iter().map(|c| (c.source.clone(), now.duration_since(c.this_update).unwrap_or_default().as_secs())).collect())
            .unwrap_or_default()
    }

    /// The policy.
    pub fn policy(&self) -> &CardPolicy {
        &self.policy
    }

    /// Validates a card certificate for `slot` at `now`: path, validity,
    /// revocation by CRL, key usage, EKU and policies. The deny list is the
    /// caller's (it lives in the database).
    pub fn validate(&self, der: &[u8], slot: Slot, now: SystemTime) -> Result<Validation, Deny> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|_| Deny::MalformedCertificate)?;
        if let Ok(Some(bc)) = cert.basic_constraints() {
            if bc.value.ca {
                return Err(Deny::NotEndEntity);
            }
        }
        let issuer = cert.issuer().as_raw();
        if issuer == cert.subject().as_raw() && !self.anchor_subjects.iter().any(|s| s == issuer) {
            return Err(Deny::SelfSigned);
        }
        let ee_der = CertificateDer::from(der);
        let ee = EndEntityCert::try_from(&ee_der).map_err(|_| Deny::MalformedCertificate)?;
        let unix = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());

        let crls = self.crls.read().map_err(|_| Deny::UntrustedIssuer)?;
        let matching: Vec<&LoadedCrl> = crls.iter().filter(|c| c.issuer == issuer).collect();
        let crl_refs: Vec<&CertRevocationList<'static>> = matching.iter().map(|c| &c.crl).collect();
        let revocation = if crl_refs.is_empty() {
            None
        } else {
            webpki::RevocationOptionsBuilder::new(&crl_refs).ok().map(|b| {
                b.with_depth(RevocationCheckDepth::EndEntity)
                    .with_status_policy(UnknownStatusPolicy::Allow)
                    .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
                    .build()
            })
        };
        ee.verify_for_usage(webpki::ALL_VERIFICATION_ALGS, &self.anchors, &[], unix, AnyEku, revocation, None)
            .map_err(map_webpki)?;

        // Freshness of the revocation source.
        let (revocation_source, crl_age_s) = match matching.first() {
            Some(c) => {
                let age = now.duration_since(c.this_update).unwrap_or_default();
                if self.policy.crl_strict && c.next_update.is_some_and(|n| now > n) {
                    return Err(Deny::CrlStale);
                }
                if self.policy.max_crl_age.is_some_and(|max| age > max) {
                    return Err(Deny::CrlStale);
                }
                (format!("deny-list+crl:{}", c.source), Some(age.as_secs()))
            }
            None if self.policy.require_crl => return Err(Deny::CrlStale),
            None => ("deny-list".to_string(), None),
        };
        drop(crls);

        // Key usage: digitalSignature must be there.
        match cert.key_usage() {
            Ok(Some(ku)) if ku.value.digital_signature() => {}
            _ => return Err(Deny::WrongKeyUsage),
        }
        let ekus: Vec<String> = match cert.extended_key_usage() {
            Ok(Some(eku)) => {
                let v = &eku.value;
                let mut out: Vec<String> = v.other.iter().map(|o| o.to_id_string()).collect();
                if v.client_auth {
                    out.push("1.3.6.1.5.5.7.3.2".into());
                }
                if v.server_auth {
                    out.push("1.3.6.1.5.5.7.3.1".into());
                }
                if v.any {
                    out.push("2.5.29.37.0".into());
                }
                out
            }
            _ => vec![],
        };
        let policies: Vec<String> = cert
            .extensions()
            .iter()
            .filter_map(|e| match e.parsed_extension() {
                ParsedExtension::CertificatePolicies(p) => Some(p.iter().map(|i| i.policy_id.to_id_string()).collect::<Vec<_>>()),
                _ => None,
            })
            .flatten()
            .collect();
        // A card-authentication (9E, no PIN) certificate never stands in for
        // the PIN-protected 9A one, whatever the site configured.
        if slot == Slot::PivAuthentication {
            if ekus.iter().any(|e| e == OID_EKU_PIV_CARD_AUTH) {
                return Err(Deny::WrongEku);
            }
            if policies.iter().any(|p| p == OID_POLICY_CARD_AUTH) {
                return Err(Deny::WrongPolicy);
            }
        }
        if let Some(required) = self.policy.required_eku.get(&slot).filter(|r| !r.is_empty()) {
            if !required.iter().any(|r| ekus.contains(r)) {
                return Err(Deny::WrongEku);
            }
        }
        if let Some(required) = self.policy.required_policies.get(&slot).filter(|r| !r.is_empty()) {
            if !required.iter().any(|r| policies.contains(r)) {
                return Err(Deny::WrongPolicy);
            }
        }
        Ok(Validation { revocation_source, crl_age_s })
    }
}

fn map_webpki(e: webpki::Error) -> Deny {
    use webpki::Error as E;
    match e {
        E::CertExpired { .. } => Deny::CertExpired,
        E::CertNotValidYet { .. } => Deny::CertNotYetValid,
        E::CertRevoked => Deny::RevokedCrl,
        E::CrlExpired { .. } => Deny::CrlStale,
        E::CaUsedAsEndEntity => Deny::NotEndEntity,
        E::BadDer | E::BadDerTime | E::TrailingData(_) => Deny::MalformedCertificate,
        E::UnsupportedSignatureAlgorithmContext(_) | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => Deny::UnsupportedAlgorithm,
        _ => Deny::UntrustedIssuer,
    }
}

/// Checks a card signature over `message` (the gateway's encoding; the card
/// signed its hash) with the certificate's key.
pub fn verify_signature(alg: KeyAlgorithm, spki: &[u8], message: &[u8], sig: &[u8]) -> Result<(), Deny> {
    let looks_der = looks_like_ecdsa_der(sig);
    let verifier: &'static dyn VerificationAlgorithm = match alg {
        KeyAlgorithm::EcdsaP256 | KeyAlgorithm::EcdsaP384 => {
            if !looks_der {
                return Err(if sig.len() == 256 { Deny::AlgorithmMismatch } else { Deny::MalformedSignature });
            }
            if alg == KeyAlgorithm::EcdsaP256 {
                &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1
            } else {
                &aws_lc_rs::signature::ECDSA_P384_SHA384_ASN1
            }
        }
        KeyAlgorithm::Rsa2048 => {
            if sig.len() != 256 {
                return Err(if looks_der { Deny::AlgorithmMismatch } else { Deny::MalformedSignature });
            }
            &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256
        }
    };
    UnparsedPublicKey::new(verifier, spki).verify(message, sig).map_err(|_| Deny::BadSignature)
}

fn looks_like_ecdsa_der(sig: &[u8]) -> bool {
    let Some((0x30, body)) = der_tlv(sig) else { return false };
    if body.len() + 2 > sig.len() || sig.len() > body.len() + 4 {
        return false;
    }
    let Some((0x02, r)) = der_tlv(body) else { return false };
    let hdr = if r.len() < 0x80 { 2 } else { 3 };
    let Some((0x02, s)) = body.get(hdr + r.len()..).and_then(der_tlv) else { return false };
    !r.is_empty() && !s.is_empty()
}

/// The domain-separated message whose hash the card signs. Every field is
/// length-prefixed, so no two different inputs encode alike.
pub fn challenge_message(fields: &[&[u8]]) -> Vec<u8> {
    let mut m = b"pivgate.v1 card authentication\0".to_vec();
    for f in fields {
        m.extend_from_slice(&(f.len() as u32).to_be_bytes());
        m.extend_from_slice(f);
    }
    m
}

/// The digest of `message` for the card: SHA-384 for P-384, else SHA-256.
pub fn card_digest(alg: KeyAlgorithm, message: &[u8]) -> Vec<u8> {
    match alg {
        KeyAlgorithm::EcdsaP384 => sha2::Sha384::digest(message).to_vec(),
        _ => Sha256::digest(message).to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_encoding_is_injective_on_field_boundaries() {
        assert_ne!(challenge_message(&[b"ab", b"c"]), challenge_message(&[b"a", b"bc"]));
        assert_ne!(challenge_message(&[b"", b"x"]), challenge_message(&[b"x", b""]));
    }

    #[test]
    fn der_shape_check() {
        assert!(looks_like_ecdsa_der(&[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01]));
        assert!(!looks_like_ecdsa_der(&[0x30, 0x06, 0x02, 0x01, 0x01]));
        assert!(!looks_like_ecdsa_der(&[0x04; 64]));
    }
}
