//! Card profiles: what a virtual card holds, generated on the fly or kept in
//! a folder.
//!
//! A generated profile has a throwaway issuing CA, a 9A (PIV
//! Authentication) and a 9E (Card Authentication) key and certificate, a
//! CHUID with a random card UUID and a FASC-N, a Discovery object, a PIN, a
//! PUK and the default management key. The certificates carry the card UUID
//! as a `urn:uuid:` URI and the FASC-N as a `pivFASC-N` otherName in the
//! subject alternative name, as FIPS 201-3 requires of PIV certificates.
//!
//! The folder layout (names say what each file is):
//!
//! | file | what |
//! | --- | --- |
//! | `issuing-ca.pem`, `issuing-ca-key.pem` | the issuing CA certificate and key |
//! | `cert-9a.pem`, `key-9a.pem` | PIV Authentication certificate and key |
//! | `cert-9e.pem`, `key-9e.pem` | Card Authentication certificate and key |
//! | `card.toml` | card UUID, FASC-N, expiry, PIN, PUK, management key, serial |
//!
//! The private keys are written so that the same card can be loaded again;
//! this is a test card, and the folder is as secret as the card would be.

use std::collections::BTreeMap;
use std::path::Path;

use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use pivgate_hw::piv::objects::{certificate_container, Chuid, Discovery, Fascn, FascnFields};
use pivgate_hw::piv::{Algorithm, ObjectTag, Slot, PIV_AID};
use pivgate_hw::tlv;

use super::card::{CardContents, VirtualCard, DEFAULT_TRIES};
use super::keys::{CardKey, ManagementKey, DEFAULT_MANAGEMENT_KEY};

/// OID of `pivFASC-N` (2.16.840.1.101.3.6.6), FIPS 201-3.
pub const OID_PIV_FASCN: &[u64] = &[2, 16, 840, 1, 101, 3, 6, 6];
/// OID of `id-PIV-cardAuth` (EKU for the Card Authentication certificate).
pub const OID_PIV_CARD_AUTH_EKU: &[u64] = &[2, 16, 840, 1, 101, 3, 6, 8];
/// OID of `id-fpki-common-authentication` (policy of 9A certificates).
pub const OID_POLICY_COMMON_AUTH: &[u64] = &[2, 16, 840, 1, 101, 3, 2, 1, 3, 13];
/// OID of `id-fpki-common-cardAuth` (policy of 9E certificates).
pub const OID_POLICY_COMMON_CARD_AUTH: &[u64] = &[2, 16, 840, 1, 101, 3, 2, 1, 3, 17];

/// Choices for a generated profile.
#[derive(Debug, Clone)]
pub struct ProfileOptions {
    /// Algorithm of the 9A and 9E keys.
    pub algorithm: Algorithm,
    /// The PIN (6 to 8 digits).
    pub pin: String,
    /// The PUK (8 digits).
    pub puk: String,
    /// Store certificates gzip-compressed (CertInfo 0x01).
    pub compress_certificates: bool,
    /// Common name of the cardholder in the certificates.
    pub holder: String,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        ProfileOptions {
            algorithm: Algorithm::EccP256,
            pin: "123456".into(),
            puk: "12345678".into(),
            compress_certificates: false,
            holder: "Virtual Operator".into(),
        }
    }
}

/// The issuing CA of generated profiles, able to issue more cards.
pub struct IssuingCa {
    /// CA certificate, PEM.
    pub cert_pem: String,
    /// CA private key, PKCS#8 PEM.
    pub key_pem: Zeroizing<String>,
}

impl IssuingCa {
    /// Generates a self-signed P-256 issuing CA.
    pub fn generate(name: &str) -> Result<IssuingCa> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(rc)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "pivgate virtual card issuer");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(365 * 10);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(rc)?;
        Ok(IssuingCa { cert_pem: cert.pem(), key_pem: Zeroizing::new(key.serialize_pem()) })
    }

    /// Issues a PIV certificate for `slot` over `key`, naming the card.
    pub fn issue(&self, slot: Slot, key: &CardKey, chuid: &Chuid, holder: &str, validity: Validity) -> Result<Vec<u8>> {
        self.issue_for_spki(slot, &key.spki_der()?, chuid, holder, validity)
    }

    /// Issues a PIV certificate for `slot` over a public key given as a DER
    /// SubjectPublicKeyInfo (a key generated on a card).
    pub fn issue_for_spki(&self, slot: Slot, spki_der: &[u8], chuid: &Chuid, holder: &str, validity: Validity) -> Result<Vec<u8>> {
        self.issue_with(slot, spki_der, chuid, holder, validity, |_| {})
    }

    /// Like [`IssuingCa::issue_for_spki`], with a last word on the
    /// certificate's parameters (tests make wrong certificates this way).
    pub fn issue_with(
        &self,
        slot: Slot,
        spki_der: &[u8],
        chuid: &Chuid,
        holder: &str,
        validity: Validity,
        tweak: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> Result<Vec<u8>> {
        let ca_key = rcgen::KeyPair::from_pem(&self.key_pem).map_err(rc)?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&self.cert_pem, ca_key).map_err(rc)?;
        let mut params = rcgen::CertificateParams::default();
        let cn = match slot {
            Slot::CardAuthentication => format!("{holder} (card authentication)"),
            _ => holder.to_string(),
        };
        params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "pivgate virtual card holders");
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let (eku, policy) = match slot {
            Slot::CardAuthentication => (rcgen::ExtendedKeyUsagePurpose::Other(OID_PIV_CARD_AUTH_EKU.to_vec()), OID_POLICY_COMMON_CARD_AUTH),
            _ => (rcgen::ExtendedKeyUsagePurpose::ClientAuth, OID_POLICY_COMMON_AUTH),
        };
        params.extended_key_usages = vec![eku];
        params.custom_extensions = vec![
            rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 17], piv_san(chuid)),
            rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 32], certificate_policies(policy)),
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        tweak(&mut params);
        let spki = rcgen::SubjectPublicKeyInfo::from_der(spki_der).map_err(rc)?;
        let cert = params.signed_by(&spki, &issuer).map_err(rc)?;
        Ok(cert.der().to_vec())
    }
}

impl IssuingCa {
    /// A CRL from this issuer revoking the certificates with these serial
    /// numbers (big-endian bytes), valid from `this_update` to
    /// `next_update`. Returns DER.
    pub fn crl(&self, revoked: &[Vec<u8>], this_update: time::OffsetDateTime, next_update: time::OffsetDateTime, number: u64) -> Result<Vec<u8>> {
        let ca_key = rcgen::KeyPair::from_pem(&self.key_pem).map_err(rc)?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&self.cert_pem, ca_key).map_err(rc)?;
        let params = rcgen::CertificateRevocationListParams {
            this_update,
            next_update,
            crl_number: rcgen::SerialNumber::from(number.to_be_bytes().to_vec()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(s),
                    revocation_time: this_update,
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&issuer).map_err(rc)?.der().to_vec())
    }
}

/// A certificate's validity period.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Not before.
    pub not_before: time::OffsetDateTime,
    /// Not after.
    pub not_after: time::OffsetDateTime,
}

impl Validity {
    /// From an hour ago for `days` days.
    pub fn days(days: i64) -> Validity {
        let now = time::OffsetDateTime::now_utc();
        Validity { not_before: now - time::Duration::hours(1), not_after: now + time::Duration::days(days) }
    }
}

/// A complete card profile.
pub struct Profile {
    /// The issuing CA.
    pub ca: IssuingCa,
    /// What goes on the card.
    pub contents: CardContents,
    /// The CHUID as written.
    pub chuid: Chuid,
    /// Certificates (DER) by slot.
    pub certificates: BTreeMap<Slot, Vec<u8>>,
    /// Whether certificates are stored compressed.
    pub compressed: bool,
}

#[derive(Serialize, Deserialize)]
struct CardToml {
    guid: String,
    fascn: Option<String>,
    expiry: Option<String>,
    pin: String,
    puk: String,
    management_key_algorithm: u8,
    management_key: String,
    serial: u32,
    compress_certificates: bool,
}

impl Profile {
    /// Generates a new card with a new issuing CA.
    pub fn generate(opts: &ProfileOptions) -> Result<Profile> {
        let ca = IssuingCa::generate("pivgate virtual card issuing CA")?;
        Profile::generate_with_ca(ca, opts)
    }

    /// Generates a new card issued by `ca` (several cards, one issuer).
    pub fn generate_with_ca(ca: IssuingCa, opts: &ProfileOptions) -> Result<Profile> {
        let mut guid = [0u8; 16];
        OsRng.fill_bytes(&mut guid);
        guid[6] = (guid[6] & 0x0F) | 0x40; // RFC 4122 version 4
        guid[8] = (guid[8] & 0x3F) | 0x80;
        let serial = OsRng.next_u32() & 0x7FFF_FFFF;
        let credential = format!("{:06}", serial % 1_000_000);
        let fascn = Fascn::encode(&FascnFields {
            agency: "9999".into(),
            system: "9999".into(),
            credential,
            series: "0".into(),
            issue: "1".into(),
            person: format!("{:010}", serial),
            org_category: "1".into(),
            org_id: "9999".into(),
            association: "1".into(),
        })?;
        let expiry = (time::OffsetDateTime::now_utc() + time::Duration::days(365 * 3)).date();
        let chuid = Chuid {
            fascn: Some(fascn),
            guid,
            expiry: Some(format!("{:04}{:02}{:02}", expiry.year(), u8::from(expiry.month()), expiry.day())),
            cardholder_uuid: None,
            signed: false,
        };
        let mut keys = BTreeMap::new();
        let mut certificates = BTreeMap::new();
        for slot in [Slot::Authentication, Slot::CardAuthentication] {
            let key = CardKey::generate(opts.algorithm, &mut OsRng)?;
            let der = ca.issue(slot, &key, &chuid, &opts.holder, Validity::days(365 * 3))?;
            certificates.insert(slot, der);
            keys.insert(slot, key);
        }
        let contents = CardContents {
            keys,
            objects: BTreeMap::new(),
            pin: pad(&opts.pin, true)?,
            puk: pad(&opts.puk, false)?,
            management_key: ManagementKey::new(Algorithm::TripleDes, &DEFAULT_MANAGEMENT_KEY)?,
            serial,
            pin_tries_max: DEFAULT_TRIES,
            origins: BTreeMap::new(),
            attestation: None,
        };
        let mut p = Profile { ca, contents, chuid, certificates, compressed: opts.compress_certificates };
        p.write_objects()?;
        Ok(p)
    }

    /// Fills the card's data objects from the CHUID and certificates.
    fn write_objects(&mut self) -> Result<()> {
        let objects = &mut self.contents.objects;
        objects.insert(ObjectTag::CHUID.0, self.chuid.encode());
        objects.insert(ObjectTag::DISCOVERY.0, Discovery { aid: PIV_AID.to_vec(), pin_usage_policy: [0x40, 0x00] }.encode());
        for (slot, der) in &self.certificates {
            let tag = slot.certificate_object().ok_or(Error::Profile("certificate for the management key".into()))?;
            let body = if self.compressed { gzip(der)? } else { der.clone() };
            objects.insert(tag.0, certificate_container(&body, self.compressed));
        }
        Ok(())
    }

    /// A virtual card holding this profile.
    pub fn card(&self) -> VirtualCard {
        VirtualCard::new(self.contents.clone())
    }

    /// Writes the profile to `dir` (created if needed).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        write_secret(&dir.join("issuing-ca.pem"), self.ca.cert_pem.as_bytes(), false)?;
        write_secret(&dir.join("issuing-ca-key.pem"), self.ca.key_pem.as_bytes(), true)?;
        for (slot, der) in &self.certificates {
            let pem = pem_encode("CERTIFICATE", der);
            write_secret(&dir.join(format!("cert-{slot}.pem")), pem.as_bytes(), false)?;
            let key = self.contents.keys.get(slot).ok_or_else(|| Error::Profile(format!("no key for slot {slot}")))?;
            write_secret(&dir.join(format!("key-{slot}.pem")), key.to_pem()?.as_bytes(), true)?;
        }
        let c = &self.contents;
        let toml = CardToml {
            guid: hex::encode(self.chuid.guid),
            fascn: self.chuid.fascn.map(|f| hex::encode(f.0)),
            expiry: self.chuid.expiry.clone(),
            pin: unpad(&c.pin[..]),
            puk: unpad(&c.puk[..]),
            management_key_algorithm: c.management_key.algorithm().id(),
            management_key: hex::encode(c.management_key.bytes()),
            serial: c.serial,
            compress_certificates: self.compressed,
        };
        let text = toml::to_string(&toml).map_err(|e| Error::Profile(format!("writing card.toml: {e}")))?;
        write_secret(&dir.join("card.toml"), text.as_bytes(), true)?;
        Ok(())
    }

    /// Loads a profile written by [`Profile::save`].
    pub fn load(dir: &Path) -> Result<Profile> {
        let read = |name: &str| std::fs::read_to_string(dir.join(name)).map_err(|e| Error::Profile(format!("{}: {e}", dir.join(name).display())));
        let t: CardToml = toml::from_str(&read("card.toml")?).map_err(|e| Error::Profile(format!("card.toml: {e}")))?;
        let guid = hex::decode(&t.guid).ok().and_then(|g| g.try_into().ok()).ok_or(Error::Profile("card.toml: guid is not 16 hex bytes".into()))?;
        let fascn = match &t.fascn {
            Some(f) => Some(Fascn(hex::decode(f).ok().and_then(|g| g.try_into().ok()).ok_or(Error::Profile("card.toml: fascn is not 25 hex bytes".into()))?)),
            None => None,
        };
        let mgmt_alg = Algorithm::from_id(t.management_key_algorithm).ok_or(Error::Profile("card.toml: unknown management key algorithm".into()))?;
        let mgmt = hex::decode(&t.management_key).map_err(|_| Error::Profile("card.toml: management_key is not hex".into()))?;
        let ca = IssuingCa { cert_pem: read("issuing-ca.pem")?, key_pem: Zeroizing::new(read("issuing-ca-key.pem")?) };
        let mut keys = BTreeMap::new();
        let mut certificates = BTreeMap::new();
        for slot in [Slot::Authentication, Slot::Signature, Slot::KeyManagement, Slot::CardAuthentication] {
            let cert_path = dir.join(format!("cert-{slot}.pem"));
            if !cert_path.exists() {
                continue;
            }
            let der = pem_decode(&read(&format!("cert-{slot}.pem"))?)?;
            let key = CardKey::from_pem(&read(&format!("key-{slot}.pem"))?)?;
            certificates.insert(slot, der);
            keys.insert(slot, key);
        }
        if keys.is_empty() {
            return Err(Error::Profile(format!("{}: no cert-9a.pem or cert-9e.pem", dir.display())));
        }
        let contents = CardContents {
            keys,
            objects: BTreeMap::new(),
            pin: pad(&t.pin, true)?,
            puk: pad(&t.puk, false)?,
            management_key: ManagementKey::new(mgmt_alg, &mgmt)?,
            serial: t.serial,
            pin_tries_max: DEFAULT_TRIES,
            origins: BTreeMap::new(),
            attestation: None,
        };
        let chuid = Chuid { fascn, guid, expiry: t.expiry, cardholder_uuid: None, signed: false };
        let mut p = Profile { ca, contents, chuid, certificates, compressed: t.compress_certificates };
        p.write_objects()?;
        Ok(p)
    }

    /// Loads the profile in `dir`, or generates one there when the folder
    /// is empty or missing. Returns whether it was generated.
    pub fn load_or_generate(dir: &Path, opts: &ProfileOptions) -> Result<(Profile, bool)> {
        if dir.join("card.toml").exists() {
            return Ok((Profile::load(dir)?, false));
        }
        if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
            return Err(Error::Profile(format!("{} is neither empty nor a card profile (no card.toml)", dir.display())));
        }
        let p = Profile::generate(opts)?;
        p.save(dir)?;
        Ok((p, true))
    }

    /// Sets the PIN (for `--pin`).
    pub fn set_pin(&mut self, pin: &str) -> Result<()> {
        self.contents.pin = pad(pin, true)?;
        Ok(())
    }
}

fn rc(e: rcgen::Error) -> Error {
    Error::Profile(format!("certificate: {e}"))
}

fn random_serial() -> rcgen::SerialNumber {
    let mut b = [0u8; 16];
    OsRng.fill_bytes(&mut b);
    b[0] &= 0x7F;
    rcgen::SerialNumber::from_slice(&b)
}

fn pad(s: &str, digits_only: bool) -> Result<Zeroizing<[u8; 8]>> {
    let ok = (6..=8).contains(&s.len()) && (!digits_only || s.bytes().all(|b| b.is_ascii_digit()));
    if !ok {
        return Err(Error::Profile(if digits_only { "PIN must be 6 to 8 digits".into() } else { "PUK must be 6 to 8 characters".into() }));
    }
    let mut out = Zeroizing::new([0xFFu8; 8]);
    out[..s.len()].copy_from_slice(s.as_bytes());
    Ok(out)
}

fn unpad(p: &[u8]) -> String {
    String::from_utf8_lossy(&p[..p.iter().position(|&b| b == 0xFF).unwrap_or(p.len())]).into_owned()
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

/// The subjectAltName of a PIV certificate: the card UUID as a URI and the
/// FASC-N as an otherName (FIPS 201-3 §4.2.2).
pub fn piv_san(chuid: &Chuid) -> Vec<u8> {
    let mut names = Vec::new();
    if let Some(f) = &chuid.fascn {
        let mut other = tlv::encode(0x06, &oid_der(OID_PIV_FASCN));
        tlv::write(&mut other, 0xA0, &tlv::encode(0x04, &f.0));
        tlv::write(&mut names, 0xA0, &other);
    }
    tlv::write(&mut names, 0x86, format!("urn:uuid:{}", chuid.uuid_string()).as_bytes());
    tlv::encode(0x30, &names)
}

/// The DER value of a certificatePolicies extension naming one policy.
pub fn certificate_policies(policy: &[u64]) -> Vec<u8> {
    tlv::encode(0x30, &tlv::encode(0x30, &tlv::encode(0x06, &oid_der(policy))))
}

/// DER content octets of an OBJECT IDENTIFIER.
pub fn oid_der(arcs: &[u64]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut push = |mut v: u64| {
        let mut tmp = vec![(v & 0x7F) as u8];
        v >>= 7;
        while v > 0 {
            tmp.push(0x80 | (v & 0x7F) as u8);
            v >>= 7;
        }
        tmp.reverse();
        out.extend(tmp);
    };
    push(arcs[0] * 40 + arcs[1]);
    for &a in &arcs[2..] {
        push(a);
    }
    out
}

fn write_secret(path: &Path, data: &[u8], secret: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mode = if secret { 0o600 } else { 0o644 };
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(path)?;
    f.write_all(data)?;
    Ok(())
}

/// PEM-encodes DER (RFC 7468).
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |a, (i, &b)| a | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[((n >> (18 - 6 * i)) & 0x3F) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Decodes the first PEM block's DER.
pub fn pem_decode(pem: &str) -> Result<Vec<u8>> {
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| Error::Profile(format!("PEM: {e}")))?;
    Ok(der.contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oid_encoding() {
        assert_eq!(oid_der(OID_PIV_FASCN), vec![0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x06, 0x06]);
        assert_eq!(oid_der(&[1, 2, 840, 113549]), vec![0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D]);
    }

    #[test]
    fn pem_round_trips() {
        for n in [1usize, 2, 3, 100, 1000] {
            let der: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let pem = pem_encode("CERTIFICATE", &der);
            let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
            assert_eq!(parsed.contents, der);
        }
    }
}
