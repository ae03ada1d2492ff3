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
use rustls::pki_types::TrustAnchor;
use rustls::pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use webpki::{CertRevocationList, EndEntityCert, OwnedCertRevocationList, RevocationCheckDepth, UnknownStatusPolicy};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

pub use crate::model::IdentityRule;
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
    KeyNotAttested,
    CardSuspended,
    CardExpired,
    /// The card waits for a second administrator's approval (its operator
    /// holds a privileged role).
    CardPending,
    /// A card tapped into an enrolment window could not be enrolled.
    EnrolmentRefused,
    /// Outside the terminal's hours.
    OutsideHours,
    /// A step-up proven by a card of another operator than the one at the
    /// terminal, or the terminal no longer theirs.
    StepUpOtherOperator,
    /// The step-up is no longer waiting.
    StepUpUnknown,
    /// Too many failed proofs lately: wait (see `throttle.rs`).
    Throttled,
    /// The operator is locked out after consecutive failures, until an
    /// administrator lifts it.
    LockedOut,
    BreakGlassEnded,
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
            Deny::KeyNotAttested => "key_not_attested",
            Deny::CardSuspended => "card_suspended",
            Deny::CardExpired => "card_expired",
            Deny::CardPending => "card_pending",
            Deny::EnrolmentRefused => "enrolment_refused",
            Deny::OutsideHours => "outside_hours",
            Deny::StepUpOtherOperator => "step_up_other_operator",
            Deny::StepUpUnknown => "step_up_unknown",
            Deny::Throttled => "throttled",
            Deny::LockedOut => "locked_out",
            Deny::BreakGlassEnded => "break_glass_ended",
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
    /// SHA-256 of the SubjectPublicKeyInfo: the key, whatever certificate
    /// carries it.
    pub key_sha256: [u8; 32],
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
    let key_sha256 = Sha256::digest(&spki).into();
    Ok(CertInfo { uuid, fascn, algorithm, spki, key_sha256, fingerprint: Sha256::digest(der).into() })
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
    /// Refuse when a CRL that covers a certificate of the path is past its
    /// nextUpdate.
    pub crl_strict: bool,
    /// Refuse when a CRL that covers a certificate of the path was issued
    /// longer ago than this.
    pub max_crl_age: Option<Duration>,
    /// Refuse a certificate of the path that no loaded CRL covers.
    pub require_crl: bool,
    /// How far in the future a CRL's thisUpdate may be (clock skew between
    /// the issuer and this gateway).
    pub crl_future_skew: Duration,
}

/// Which CRL a CRL replaces: its issuer and its issuing distribution point
/// (RFC 5280 5.2.5). Partitioned CRLs of one issuer have different keys and
/// all count; a newer CRL replaces only the CRL of its own key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CrlKey {
    /// Issuer name (DER).
    pub issuer: Vec<u8>,
    /// The IssuingDistributionPoint extension value (DER), empty if none.
    pub idp: Vec<u8>,
}

impl CrlKey {
    /// A stable identifier (hex SHA-256), for storage and audit records.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update((self.issuer.len() as u32).to_be_bytes());
        h.update(&self.issuer);
        h.update(&self.idp);
        hex::encode(h.finalize())
    }
}

/// Which certificates a CRL speaks for (from its IssuingDistributionPoint).
#[derive(Debug, Clone, PartialEq, Eq)]
struct CrlScope {
    /// Covers end-entity certificates.
    end_entities: bool,
    /// Covers CA certificates.
    cas: bool,
    /// Distribution point URIs it is the CRL of (empty: any).
    uris: Vec<String>,
}

/// Why a CRL was refused. The CRL held before stays in force.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CrlRefusal {
    /// It does not parse, or uses a feature pivgate does not support
    /// (indirect CRLs, reason partitions, attribute certificates).
    Malformed(String),
    /// No trust anchor or configured intermediate has its issuer's name.
    UnknownIssuer,
    /// Its signature does not verify with the key of any certificate that
    /// carries its issuer's name.
    BadSignature,
    /// It is signed with SHA-1.
    WeakAlgorithm,
    /// The issuer certificate's key usage does not allow CRL signing.
    IssuerMayNotSignCrls,
    /// thisUpdate lies further in the future than the allowed skew.
    FromTheFuture,
    /// nextUpdate is before thisUpdate.
    NextUpdateBeforeThisUpdate,
    /// Older than the CRL held (or last accepted, across restarts) for the
    /// same issuer and distribution point: a replayed CRL would un-revoke.
    Rollback,
    /// Past its nextUpdate, for an issuer and distribution point no CRL was
    /// ever accepted for: an old CRL under a scope nobody publishes any more
    /// could only make that scope stale for good.
    Expired,
}

impl CrlRefusal {
    /// A stable name for metrics and audit records.
    pub fn name(&self) -> &'static str {
        match self {
            CrlRefusal::Malformed(_) => "malformed",
            CrlRefusal::UnknownIssuer => "unknown_issuer",
            CrlRefusal::BadSignature => "bad_signature",
            CrlRefusal::WeakAlgorithm => "weak_algorithm",
            CrlRefusal::IssuerMayNotSignCrls => "issuer_may_not_sign_crls",
            CrlRefusal::FromTheFuture => "this_update_in_the_future",
            CrlRefusal::NextUpdateBeforeThisUpdate => "next_update_before_this_update",
            CrlRefusal::Rollback => "rollback",
            CrlRefusal::Expired => "expired",
        }
    }
}

impl std::fmt::Display for CrlRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CrlRefusal::Malformed(why) => write!(f, "malformed CRL: {why}"),
            CrlRefusal::UnknownIssuer => f.write_str("no trusted card issuer or intermediate has the CRL's issuer name"),
            CrlRefusal::BadSignature => f.write_str("the CRL's signature does not verify with its issuer's key"),
            CrlRefusal::WeakAlgorithm => f.write_str("the CRL is signed with SHA-1"),
            CrlRefusal::IssuerMayNotSignCrls => f.write_str("the issuer's key usage does not allow CRL signing"),
            CrlRefusal::FromTheFuture => f.write_str("the CRL's thisUpdate is in the future"),
            CrlRefusal::NextUpdateBeforeThisUpdate => f.write_str("the CRL's nextUpdate is before its thisUpdate"),
            CrlRefusal::Rollback => f.write_str("the CRL is older than the one already accepted for this issuer and distribution point"),
            CrlRefusal::Expired => f.write_str("the CRL is past its nextUpdate and no CRL was ever accepted for its issuer and distribution point"),
        }
    }
}

/// A CRL whose signature checked out against a trusted issuer: ready to be
/// installed with [`CardTrust::install_crl`].
pub struct Crl {
    crl: CertRevocationList<'static>,
    scope: CrlScope,
    /// Issuer and distribution point.
    pub key: CrlKey,
    /// Where it was read from.
    pub source: String,
    /// thisUpdate.
    pub this_update: SystemTime,
    /// nextUpdate, if set.
    pub next_update: Option<SystemTime>,
    /// cRLNumber (hex), if set.
    pub number: Option<String>,
    /// How many certificates it revokes.
    pub revoked: usize,
    /// SHA-256 of the DER.
    pub sha256: [u8; 32],
}

/// A trusted card issuer: its certificate (DER) and its identity rule.
#[derive(Debug, Clone)]
pub struct Anchor {
    /// The issuer's certificate, DER.
    pub der: Vec<u8>,
    /// How its cards are told apart.
    pub identity: IdentityRule,
}

impl Anchor {
    /// A FIPS 201 issuer.
    pub fn fips201(der: Vec<u8>) -> Anchor {
        Anchor { der, identity: IdentityRule::Fips201 }
    }
}

/// What a successful validation learned, for the audit record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Validation {
    /// The identity rule of the issuer the path ends at.
    pub identity: IdentityRule,
    /// "deny-list" or "deny-list+crl:SOURCE[,SOURCE...]" (the CRLs that
    /// cover the card's certificate).
    pub revocation_source: String,
    /// Age of the oldest CRL relied on, seconds.
    pub crl_age_s: Option<u64>,
}

/// A certificate that may sign card certificates or CRLs: a trust anchor
/// or a configured intermediate.
struct IssuerCert {
    der: Vec<u8>,
    subject: Vec<u8>,
    may_sign_crls: bool,
}

impl IssuerCert {
    fn parse(der: &[u8]) -> Result<(IssuerCert, bool), String> {
        let (rest, c) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        if !rest.is_empty() {
            return Err("trailing data after the certificate".into());
        }
        let is_ca = matches!(c.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
        let may_sign_crls = match c.key_usage() {
            Ok(Some(ku)) => ku.value.crl_sign(),
            Ok(None) => true,
            Err(_) => false,
        };
        Ok((IssuerCert { der: der.to_vec(), subject: c.subject().as_raw().to_vec(), may_sign_crls }, is_ca))
    }
}

/// The card issuers the site trusts, the intermediates between them and
/// the cards, the CRLs in force, and the policy.
pub struct CardTrust {
    anchors: Vec<TrustAnchor<'static>>,
    /// The identity rule of each anchor, in the same order.
    rules: Vec<IdentityRule>,
    intermediates: Vec<CertificateDer<'static>>,
    /// Anchors and intermediates, as possible signers of CRLs.
    issuers: Vec<IssuerCert>,
    crls: RwLock<BTreeMap<CrlKey, Crl>>,
    /// Bumped whenever the CRLs in force change: a decision taken under an
    /// older generation is re-checked before it is committed.
    generation: std::sync::atomic::AtomicU64,
    policy: CardPolicy,
}

/// Accepts any EKU: card EKUs are checked on the leaf against the site's
/// policy (webpki would otherwise apply them to intermediates too), and
/// attestation certificates carry none.
pub(crate) struct AnyEku;

impl webpki::ExtendedKeyUsageValidator for AnyEku {
    fn validate(&self, iter: webpki::KeyPurposeIdIter<'_, '_>) -> Result<(), webpki::Error> {
        for k in iter {
            k?;
        }
        Ok(())
    }
}

fn to_system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

/// SHA-1 based signature algorithms (RSA and ECDSA).
const SHA1_SIGNATURES: [&str; 3] = ["1.2.840.113549.1.1.5", "1.3.14.3.2.29", "1.2.840.10045.4.1"];

fn uris_of(names: &[GeneralName<'_>]) -> Vec<String> {
    names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect()
}

/// The CRL distribution point URIs a certificate names (None: it names
/// none, so any CRL of its issuer whose scope includes it may speak for it).
fn distribution_points(cert: &X509Certificate<'_>) -> Option<Vec<String>> {
    cert.extensions().iter().find_map(|e| match e.parsed_extension() {
        ParsedExtension::CRLDistributionPoints(dps) => Some(
            dps.points
                .iter()
                .filter(|p| p.crl_issuer.is_none() && p.reasons.is_none())
                .filter_map(|p| match &p.distribution_point {
                    Some(x509_parser::extensions::DistributionPointName::FullName(names)) => Some(uris_of(names)),
                    _ => None,
                })
                .flatten()
                .collect(),
        ),
        _ => None,
    })
}

impl Crl {
    /// Whether this CRL speaks for `cert` (RFC 5280 6.3.3 (b), as
    /// rustls-webpki decides it): same issuer, scope includes the
    /// certificate's kind, and a distribution point name in common.
    fn covers(&self, cert: &X509Certificate<'_>, is_ca: bool) -> bool {
        if self.key.issuer != cert.issuer().as_raw() {
            return false;
        }
        if (is_ca && !self.scope.cas) || (!is_ca && !self.scope.end_entities) {
            return false;
        }
        if self.scope.uris.is_empty() && self.key.idp.is_empty() {
            return true;
        }
        match distribution_points(cert) {
            None => true,
            Some(dps) => dps.iter().any(|u| self.scope.uris.contains(u)),
        }
    }
}

impl CardTrust {
    /// Trust these issuers, with these intermediates (DER; each must chain
    /// to an anchor) and this policy.
    pub fn new(trusted: &[Anchor], intermediates_der: &[Vec<u8>], policy: CardPolicy) -> Result<CardTrust, String> {
        let mut anchors = Vec::new();
        let mut rules = Vec::new();
        let mut issuers = Vec::new();
        for a in trusted {
            let cert = CertificateDer::from(a.der.as_slice());
            let ta = webpki::anchor_from_trusted_cert(&cert).map_err(|e| format!("trust anchor: {e:?}"))?.to_owned();
            if let Some(i) = anchors.iter().position(|t: &TrustAnchor<'_>| t.subject_public_key_info == ta.subject_public_key_info) {
                if rules[i] != a.identity {
                    return Err(format!("trust anchor {} is listed with two identity rules", subject_text(&a.der)));
                }
                continue;
            }
            anchors.push(ta);
            rules.push(a.identity);
            issuers.push(IssuerCert::parse(&a.der).map_err(|e| format!("trust anchor: {e}"))?.0);
        }
        // Each intermediate must be a CA certificate signed by an anchor or
        // by another intermediate that is.
        let mut pending: Vec<(IssuerCert, Vec<u8>)> = Vec::new();
        for der in intermediates_der {
            let (ic, is_ca) = IssuerCert::parse(der).map_err(|e| format!("intermediate: {e}"))?;
            if !is_ca {
                return Err(format!("intermediate {} is not a CA certificate", subject_text(der)));
            }
            pending.push((ic, der.clone()));
        }
        let mut intermediates = Vec::new();
        while !pending.is_empty() {
            let before = pending.len();
            let mut i = 0;
            while i < pending.len() {
                if signed_by_any(&pending[i].1, &issuers) {
                    let (ic, der) = pending.remove(i);
                    intermediates.push(CertificateDer::from(der));
                    issuers.push(ic);
                } else {
                    i += 1;
                }
            }
            if pending.len() == before {
                return Err(format!("intermediate {} does not chain to a trusted card issuer", subject_text(&pending[0].1)));
            }
        }
        Ok(CardTrust { anchors, rules, intermediates, issuers, crls: RwLock::new(BTreeMap::new()), generation: Default::default(), policy })
    }

    /// Checks a CRL before it may count: parsed, signed by a trust anchor
    /// or a configured intermediate whose name it carries (and whose key
    /// usage allows CRL signing), not SHA-1, thisUpdate no further in the
    /// future than the allowed skew, nextUpdate not before thisUpdate.
    /// Rollback is checked at [`CardTrust::install_crl`] and against the
    /// store by the caller.
    pub fn examine_crl(&self, der: &[u8], source: &str, now: SystemTime) -> Result<Crl, CrlRefusal> {
        use x509_parser::revocation_list::CertificateRevocationList;
        let (rest, parsed) = CertificateRevocationList::from_der(der).map_err(|e| CrlRefusal::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CrlRefusal::Malformed("trailing data after the CRL".into()));
        }
        // webpki refuses what it cannot apply correctly (indirect CRLs,
        // reason partitions, attribute-certificate CRLs, unknown critical
        // extensions).
        let owned = OwnedCertRevocationList::from_der(der).map_err(|e| CrlRefusal::Malformed(format!("{e:?}")))?;
        let issuer = parsed.issuer().as_raw();
        let candidates: Vec<&IssuerCert> = self.issuers.iter().filter(|i| i.subject == issuer).collect();
        if candidates.is_empty() {
            return Err(CrlRefusal::UnknownIssuer);
        }
        if SHA1_SIGNATURES.contains(&parsed.signature_algorithm.algorithm.to_id_string().as_str()) {
            return Err(CrlRefusal::WeakAlgorithm);
        }
        let signer =
            candidates.into_iter().find(|c| X509Certificate::from_der(&c.der).is_ok_and(|(_, cert)| parsed.verify_signature(cert.public_key()).is_ok()));
        let Some(signer) = signer else { return Err(CrlRefusal::BadSignature) };
        if !signer.may_sign_crls {
            return Err(CrlRefusal::IssuerMayNotSignCrls);
        }
        let this_update = to_system_time(parsed.last_update());
        let next_update = parsed.next_update().map(to_system_time);
        if this_update > now + self.policy.crl_future_skew {
            return Err(CrlRefusal::FromTheFuture);
        }
        if next_update.is_some_and(|n| n < this_update) {
            return Err(CrlRefusal::NextUpdateBeforeThisUpdate);
        }
        let mut scope = CrlScope { end_entities: true, cas: true, uris: vec![] };
        let mut idp = Vec::new();
        for e in parsed.extensions() {
            if let ParsedExtension::IssuingDistributionPoint(p) = e.parsed_extension() {
                idp = e.value.to_vec();
                if p.only_contains_ca_certs {
                    scope.end_entities = false;
                }
                if p.only_contains_user_certs {
                    scope.cas = false;
                }
                if let Some(x509_parser::extensions::DistributionPointName::FullName(names)) = &p.distribution_point {
                    scope.uris = uris_of(names);
                }
            }
        }
        Ok(Crl {
            revoked: parsed.iter_revoked_certificates().count(),
            number: parsed.crl_number().map(|n| hex::encode(n.to_bytes_be())),
            crl: owned.into(),
            scope,
            key: CrlKey { issuer: issuer.to_vec(), idp },
            source: source.to_string(),
            this_update,
            next_update,
            sha256: Sha256::digest(der).into(),
        })
    }

    /// The thisUpdate of the CRL in force for `key`, if any.
    pub fn held(&self, key: &CrlKey) -> Option<SystemTime> {
        self.crls.read().ok()?.get(key).map(|c| c.this_update)
    }

    /// Puts an examined CRL in force, replacing the CRL of the same issuer
    /// and distribution point unless that one is newer. Returns whether
    /// anything changed.
    pub fn install_crl(&self, crl: Crl) -> Result<bool, CrlRefusal> {
        let mut g = self.crls.write().map_err(|_| CrlRefusal::Malformed("CRL lock poisoned".into()))?;
        if let Some(held) = g.get(&crl.key) {
            if crl.this_update < held.this_update {
                return Err(CrlRefusal::Rollback);
            }
            if held.sha256 == crl.sha256 {
                // The same CRL from another source (or its source after a
                // restart served it from the cache): name its source.
                if let Some(h) = g.get_mut(&crl.key) {
                    h.source = crl.source;
                }
                return Ok(false);
            }
        }
        g.insert(crl.key.clone(), crl);
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(true)
    }

    /// Changes whenever the CRLs in force change.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Each CRL in force: source and age in seconds (for metrics).
    pub fn crl_ages(&self, now: SystemTime) -> Vec<(String, u64)> {
        self.crls
            .read()
            .map(|g| g.values().map(|c| (c.source.clone(), now.duration_since(c.this_update).unwrap_or_default().as_secs())).collect())
            .unwrap_or_default()
    }

    /// Validates a card certificate for `slot` at `now`: the path through
    /// configured intermediates to a trusted issuer, each certificate's
    /// validity, revocation of each by every CRL that covers it, CRL
    /// freshness, key usage, EKU and policies. The deny list is the
    /// caller's (it lives in the database).
    pub fn validate(&self, der: &[u8], slot: Slot, now: SystemTime) -> Result<Validation, Deny> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|_| Deny::MalformedCertificate)?;
        if let Ok(Some(bc)) = cert.basic_constraints() {
            if bc.value.ca {
                return Err(Deny::NotEndEntity);
            }
        }
        let issuer = cert.issuer().as_raw();
        if issuer == cert.subject().as_raw() && !self.issuers.iter().any(|s| s.subject == issuer) {
            return Err(Deny::SelfSigned);
        }
        let ee_der = CertificateDer::from(der);
        let ee = EndEntityCert::try_from(&ee_der).map_err(|_| Deny::MalformedCertificate)?;
        let unix = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default());

        let crls = self.crls.read().map_err(|_| Deny::UntrustedIssuer)?;
        let crl_refs: Vec<&CertRevocationList<'static>> = crls.values().map(|c| &c.crl).collect();
        let revocation = if crl_refs.is_empty() {
            None
        } else {
            webpki::RevocationOptionsBuilder::new(&crl_refs).ok().map(|b| {
                b.with_depth(RevocationCheckDepth::Chain)
                    .with_status_policy(UnknownStatusPolicy::Allow)
                    .with_expiration_policy(webpki::ExpirationPolicy::Ignore)
                    .build()
            })
        };
        let path =
            ee.verify_for_usage(webpki::ALL_VERIFICATION_ALGS, &self.anchors, &self.intermediates, unix, AnyEku, revocation, None).map_err(map_webpki)?;
        let identity = self
            .anchors
            .iter()
            .position(|a| a.subject_public_key_info == path.anchor().subject_public_key_info && a.subject == path.anchor().subject)
            .and_then(|i| self.rules.get(i).copied())
            .ok_or(Deny::UntrustedIssuer)?;

        // webpki consults the first CRL that speaks for each certificate;
        // every CRL that covers it counts here (partitioned CRLs, a full
        // CRL beside a delta of scope), and each must be fresh enough.
        let mut sources: Vec<String> = Vec::new();
        let mut oldest: Option<Duration> = None;
        let chain: Vec<(Vec<u8>, bool)> =
            std::iter::once((der.to_vec(), false)).chain(path.intermediate_certificates().map(|c| (c.der().to_vec(), true))).collect();
        let parsed: Vec<(X509Certificate<'_>, bool)> = chain
            .iter()
            .map(|(link, is_ca)| X509Certificate::from_der(link).map(|(_, c)| (c, *is_ca)).map_err(|_| Deny::MalformedCertificate))
            .collect::<Result<_, _>>()?;
        // Revocation first, by every covering CRL of every certificate of
        // the path: a stale CRL must not hide a revocation another lists.
        for (c, is_ca) in &parsed {
            for l in crls.values().filter(|l| l.covers(c, *is_ca)) {
                if l.crl.find_serial(c.raw_serial()).ok().flatten().is_some() {
                    return Err(Deny::RevokedCrl);
                }
            }
        }
        // Then coverage and freshness.
        for (c, is_ca) in &parsed {
            let covering: Vec<&Crl> = crls.values().filter(|l| l.covers(c, *is_ca)).collect();
            if covering.is_empty() && self.policy.require_crl {
                return Err(Deny::CrlStale);
            }
            for l in covering {
                let age = now.duration_since(l.this_update).unwrap_or_default();
                if self.policy.crl_strict && l.next_update.is_some_and(|n| now > n) {
                    return Err(Deny::CrlStale);
                }
                if self.policy.max_crl_age.is_some_and(|max| age > max) {
                    return Err(Deny::CrlStale);
                }
                oldest = Some(oldest.map_or(age, |o| o.max(age)));
                if !*is_ca && !sources.contains(&l.source) {
                    sources.push(l.source.clone());
                }
            }
        }
        drop(crls);
        let revocation_source = if sources.is_empty() { "deny-list".to_string() } else { format!("deny-list+crl:{}", sources.join(",")) };
        let crl_age_s = oldest.map(|a| a.as_secs());

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
        Ok(Validation { identity, revocation_source, crl_age_s })
    }
}

fn signed_by_any(der: &[u8], issuers: &[IssuerCert]) -> bool {
    let Ok((_, c)) = X509Certificate::from_der(der) else { return false };
    issuers
        .iter()
        .filter(|i| i.subject == c.issuer().as_raw())
        .any(|i| X509Certificate::from_der(&i.der).is_ok_and(|(_, issuer)| c.verify_signature(Some(issuer.public_key())).is_ok()))
}

fn subject_text(der: &[u8]) -> String {
    X509Certificate::from_der(der).map(|(_, c)| c.subject().to_string()).unwrap_or_else(|_| "(unparseable)".into())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_shape_check() {
        assert!(looks_like_ecdsa_der(&[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01]));
        assert!(!looks_like_ecdsa_der(&[0x30, 0x06, 0x02, 0x01, 0x01]));
        assert!(!looks_like_ecdsa_der(&[0x04; 64]));
    }
}
