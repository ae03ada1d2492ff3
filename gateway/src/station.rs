//! The issuance station, for sites without a PKI of their own: an
//! administrator's workstation with a reader turns a blank token into an
//! operator's card, and later changes its PIN, unblocks it or retires it.
//!
//! ```text
//! checks    ─ the card is blank (default management key, no 9A certificate)
//! keys      ─ 9A (PIN once) and 9E (no PIN) generated on the card
//! certs     ─ FIPS 201-shaped certificates for both from the site card CA
//!             (a card UUID in the SAN), a fresh CHUID with that UUID
//! escrow    ─ a random management key and PUK, encrypted to the site's
//!             escrow key and written to disk, durably, before the card
//!             takes them; never printed
//! secrets   ─ the card takes the new management key, the PUK, and the PIN
//!             the operator chose at the station
//! ```
//!
//! The caller (`pivgatectl card issue`) checks with the gateway before any
//! of this that the operator exists and that the gateway trusts the card CA
//! (a dry-run enrolment), and enrols the certificates after it: a card that
//! leaves midway is never enrolled, and [`Interrupted`] says which steps it
//! went through, so the administrator knows what the card holds.
//!
//! The site card CA and the escrow key live in their own folder
//! (`--ca-dir`), apart from the service CA; the gateway trusts the card CA
//! only when its configuration lists `card-ca.pem` under
//! `cards.trust_anchors`.
//!
//! Sans-IO over [`PivClient`]: randomness and time are passed in.

use std::path::{Path, PathBuf};

use aws_lc_rs::{aead, agreement, hkdf};
use pivgate_hw::piv::admin::{ManagementKey, PinPolicy};
use pivgate_hw::piv::{Algorithm, Chuid, ObjectTag, PivClient, Slot as CardSlot};
use pivgate_hw::{Pin, Transport};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::core::Randomness;
use crate::error::{Error, Result};

/// The factory PIN and PUK of YubiKeys and most PIV tokens.
pub const DEFAULT_PIN: &[u8] = b"123456";
/// The factory PUK.
pub const DEFAULT_PUK: &[u8] = b"12345678";

/// id-fpki-common-authentication and id-fpki-common-cardAuth: the policies
/// the gateway's FIPS 201 profile looks for on 9A and 9E certificates.
const POLICIES_9A: &[u8] = &[0x30, 0x0E, 0x30, 0x0C, 0x06, 0x0A, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x02, 0x01, 0x03, 0x0D];
const POLICIES_9E: &[u8] = &[0x30, 0x0E, 0x30, 0x0C, 0x06, 0x0A, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x02, 0x01, 0x03, 0x11];
/// id-PIV-cardAuth.
const EKU_CARD_AUTH: &[u64] = &[2, 16, 840, 1, 101, 3, 6, 8];
/// Microsoft smart card logon.
const EKU_SMARTCARD_LOGON: &[u64] = &[1, 3, 6, 1, 4, 1, 311, 20, 2, 2];

fn pki(e: impl std::fmt::Display) -> Error {
    Error::Pki(format!("card CA: {e}"))
}

fn write_secret(path: &Path, data: &[u8], secret: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    // A stale temporary file (or a symlink planted there) is removed, and
    // the new one is created exclusively, never through a link.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The site card CA and escrow key, in their folder.
pub struct Station {
    dir: PathBuf,
    ca_cert_pem: String,
    ca_key_pem: Zeroizing<String>,
    escrow_public: Vec<u8>,
}

/// What the card holds once issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The card UUID (CHUID GUID, and in both certificates).
    pub card_uuid: [u8; 16],
    /// The token's serial number, when it told.
    pub serial: Option<u32>,
    /// The 9A certificate, DER.
    pub certificate_9a: Vec<u8>,
    /// The 9E certificate, DER.
    pub certificate_9e: Vec<u8>,
    /// The 9A key's attestation and the token's attestation certificate,
    /// when the token attests.
    pub attestation_9a: Option<(Vec<u8>, Vec<u8>)>,
}

/// A step of an issuance, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// Authenticated with the default management key.
    Authenticated,
    /// A new 9A key on the card.
    Generated9a,
    /// A new 9E key on the card.
    Generated9e,
    /// The 9A and 9E certificates written.
    Certificates,
    /// The CHUID written.
    Chuid,
    /// The new management key and PUK escrowed.
    Escrowed,
    /// The card took the new management key.
    ManagementKey,
    /// The card took the new PUK.
    Puk,
    /// The card took the operator's PIN.
    Pin,
}

/// An issuance that stopped: what it did to the card before, and why.
#[derive(Debug)]
pub struct Interrupted {
    /// The steps done, in order.
    pub done: Vec<Step>,
    /// The card UUID it was issuing, once chosen.
    pub card_uuid: Option<[u8; 16]>,
    /// What stopped it.
    pub error: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "issuance stopped: {}. ", self.error)?;
        let has = |s| self.done.contains(&s);
        if self.done.is_empty() {
            return f.write_str("The card was not changed.");
        }
        let mut holds = Vec::new();
        if has(Step::Generated9a) {
            holds.push("a new 9A key");
        }
        if has(Step::Generated9e) {
            holds.push("a new 9E key");
        }
        if has(Step::Certificates) {
            holds.push("their certificates");
        }
        if has(Step::Chuid) {
            holds.push("a new CHUID");
        }
        if holds.is_empty() {
            holds.push("what it held before");
        }
        write!(f, "The card now holds {}", holds.join(", "))?;
        if has(Step::ManagementKey) {
            f.write_str("; its management key is the escrowed one")?;
        } else {
            f.write_str("; its management key is still the default")?;
        }
        if has(Step::Puk) {
            f.write_str(", its PUK the escrowed one")?;
        } else {
            f.write_str(", its PUK still the default")?;
        }
        if has(Step::Pin) {
            f.write_str(", its PIN the operator's")?;
        } else {
            f.write_str(", its PIN still the default")?;
        }
        f.write_str(". It is not enrolled: ")?;
        if has(Step::ManagementKey) {
            f.write_str("retire it (pivgatectl card retire) and issue it again.")
        } else {
            f.write_str("issue it again.")
        }
    }
}

/// The secrets of one card, as escrowed.
#[derive(Serialize, Deserialize)]
struct Secrets {
    management_algorithm: u8,
    management_key: String,
    puk: String,
}

/// One escrow record: the card's secrets encrypted to the escrow key.
#[derive(Serialize, Deserialize)]
struct EscrowRecord {
    card_uuid: String,
    serial: Option<u32>,
    /// The ephemeral ECDH P-256 public key, hex (uncompressed point).
    ephemeral: String,
    /// AES-256-GCM nonce, hex.
    nonce: String,
    /// The encrypted [`Secrets`] (JSON), hex.
    ciphertext: String,
}

/// A card's secrets, recovered from escrow.
pub struct Recovered {
    /// The management key.
    pub management_key: ManagementKey,
    /// The PUK.
    pub puk: Zeroizing<Vec<u8>>,
    /// The token's serial number at issuance, when it told.
    pub serial: Option<u32>,
}

struct Okm(usize);
impl hkdf::KeyType for Okm {
    fn len(&self) -> usize {
        self.0
    }
}

fn sealing_key(shared: &[u8], ephemeral: &[u8]) -> std::result::Result<aead::LessSafeKey, aws_lc_rs::error::Unspecified> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"pivgate escrow v1").extract(shared);
    let info = [ephemeral];
    let okm = prk.expand(&info, Okm(32))?;
    let mut key = Zeroizing::new([0u8; 32]);
    okm.fill(&mut key[..])?;
    Ok(aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_256_GCM, &key[..])?))
}

fn uuid_text(u: &[u8; 16]) -> String {
    crate::model::uuid_text(u)
}

impl Station {
    /// Opens the station's folder, creating the site card CA and the escrow
    /// key pair on first use (only issuance creates). Returns whether they
    /// were created. A folder holding some of the files but not all is
    /// refused: nothing is ever made again over a site's existing CA or
    /// escrow key.
    ///
    /// The escrow private key is written once, as `escrow-key.der`, for the
    /// site to move offline: issuing needs only the public key
    /// (`escrow-public.der`); unblocking and retiring a card need the
    /// private key, wherever it is kept ([`Station::recover`]).
    pub fn create_or_open(dir: &Path, site: &str) -> Result<(Station, bool)> {
        let files = [dir.join("card-ca.pem"), dir.join("card-ca-key.pem"), dir.join("escrow-public.der")];
        let present = files.iter().filter(|f| f.exists()).count();
        if present == files.len() {
            return Ok((Station::open(dir)?, false));
        }
        if present > 0 || dir.join("escrow-key.der").exists() {
            return Err(Error::Config(format!(
                "{} holds part of a site card CA (card-ca.pem, card-ca-key.pem, escrow-public.der): restore the missing files; nothing is made again over them",
                dir.display()
            )));
        }
        crate::pki::create_dir_durably(dir)?;
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(pki)?;
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::OrganizationName, site);
        p.distinguished_name.push(DnType::CommonName, format!("{site} card CA"));
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.not_before = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365 * 20);
        let ca = p.self_signed(&ca_key).map_err(pki)?;
        let escrow_key = agreement::PrivateKey::generate(&agreement::ECDH_P256).map_err(pki)?;
        let der: aws_lc_rs::encoding::Pkcs8V1Der<'_> = aws_lc_rs::encoding::AsDer::as_der(&escrow_key).map_err(pki)?;
        let public = escrow_key.compute_public_key().map_err(pki)?;
        // Keys first, the certificate last: a folder with a certificate has
        // its keys.
        write_secret(&dir.join("escrow-key.der"), der.as_ref(), true)?;
        write_secret(&files[2], public.as_ref(), false)?;
        write_secret(&files[1], ca_key.serialize_pem().as_bytes(), true)?;
        write_secret(&files[0], ca.pem().as_bytes(), false)?;
        Ok((Station::open(dir)?, true))
    }

    /// Opens an existing station folder (never creates one).
    pub fn open(dir: &Path) -> Result<Station> {
        let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| Error::NotFound(format!("{} ({e}): not a station folder", dir.join(name).display())));
        let ca_cert_pem = String::from_utf8(read("card-ca.pem")?).map_err(|_| Error::Corrupt("card-ca.pem is not text".into()))?;
        let ca_key_pem = Zeroizing::new(String::from_utf8(read("card-ca-key.pem")?).map_err(|_| Error::Corrupt("card-ca-key.pem is not text".into()))?);
        let escrow_public = read("escrow-public.der")?;
        if escrow_public.len() != 65 || escrow_public[0] != 0x04 {
            return Err(Error::Corrupt("escrow-public.der is not a P-256 public key".into()));
        }
        Ok(Station { dir: dir.to_path_buf(), ca_cert_pem, ca_key_pem, escrow_public })
    }

    /// Where the escrow private key is written at creation (for the site
    /// to move offline).
    pub fn default_escrow_key(&self) -> PathBuf {
        self.dir.join("escrow-key.der")
    }

    /// The card CA's certificate file, for `cards.trust_anchors`.
    pub fn ca_certificate(&self) -> PathBuf {
        self.dir.join("card-ca.pem")
    }

    /// A FIPS 201-shaped certificate for `slot`: the card UUID in the SAN,
    /// digitalSignature, the slot's EKU and certificate policy.
    pub fn certify(&self, slot: CardSlot, spki: &[u8], card_uuid: &[u8; 16], holder: &str, random: &dyn Randomness) -> Result<Vec<u8>> {
        let ca_key = KeyPair::from_pem(&self.ca_key_pem).map_err(pki)?;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&self.ca_cert_pem, ca_key).map_err(pki)?;
        let mut p = CertificateParams::default();
        let cn = match slot {
            CardSlot::CardAuthentication => format!("{holder} (card authentication)"),
            _ => holder.to_string(),
        };
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names = vec![SanType::URI(format!("urn:uuid:{}", uuid_text(card_uuid)).try_into().map_err(pki)?)];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let policies = match slot {
            CardSlot::CardAuthentication => {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::Other(EKU_CARD_AUTH.to_vec())];
                POLICIES_9E
            }
            _ => {
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::Other(EKU_SMARTCARD_LOGON.to_vec())];
                POLICIES_9A
            }
        };
        p.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 32], policies.to_vec())];
        p.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        p.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(365 * 3);
        let mut serial = [0u8; 16];
        random.fill(&mut serial)?;
        serial[0] &= 0x7F;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        p.use_authority_key_identifier_extension = true;
        let spki = rcgen::SubjectPublicKeyInfo::from_der(spki).map_err(pki)?;
        Ok(p.signed_by(&spki, &issuer).map_err(pki)?.der().to_vec())
    }

    fn escrow_path(&self, card_uuid: &[u8; 16]) -> PathBuf {
        self.dir.join("escrow").join(format!("{}.json", uuid_text(card_uuid)))
    }

    /// Encrypts a card's management key and PUK to the escrow key and
    /// writes them, durably, before the card takes them.
    fn escrow(&self, card_uuid: &[u8; 16], serial: Option<u32>, key: &ManagementKey, puk: &[u8], random: &dyn Randomness) -> Result<()> {
        let secrets = Zeroizing::new(
            serde_json::to_vec(&Secrets {
                management_algorithm: key.algorithm().id(),
                management_key: hex::encode(key.bytes()),
                puk: String::from_utf8_lossy(puk).into_owned(),
            })
            .map_err(|e| Error::Corrupt(e.to_string()))?,
        );
        let ephemeral = agreement::PrivateKey::generate(&agreement::ECDH_P256).map_err(pki)?;
        let ephemeral_public = ephemeral.compute_public_key().map_err(pki)?.as_ref().to_vec();
        let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, &self.escrow_public);
        let key = agreement::agree(&ephemeral, peer, Error::Pki("escrow: key agreement failed".into()), |shared| {
            sealing_key(shared, &ephemeral_public).map_err(|_| Error::Pki("escrow: key derivation failed".into()))
        })?;
        let mut nonce = [0u8; 12];
        random.fill(&mut nonce)?;
        let mut sealed = secrets.to_vec();
        key.seal_in_place_append_tag(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::from(card_uuid), &mut sealed).map_err(pki)?;
        let record = EscrowRecord {
            card_uuid: uuid_text(card_uuid),
            serial,
            ephemeral: hex::encode(&ephemeral_public),
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(&sealed),
        };
        crate::pki::create_dir_durably(&self.dir.join("escrow"))?;
        let json = serde_json::to_vec_pretty(&record).map_err(|e| Error::Corrupt(e.to_string()))?;
        write_secret(&self.escrow_path(card_uuid), &json, true)
    }

    /// A card's management key and PUK, from escrow, with the escrow
    /// private key at `escrow_key`.
    pub fn recover(&self, card_uuid: &[u8; 16], escrow_key: &Path) -> Result<Recovered> {
        let path = self.escrow_path(card_uuid);
        let text = std::fs::read(&path).map_err(|e| Error::NotFound(format!("no escrow for card {} ({e})", uuid_text(card_uuid))))?;
        let r: EscrowRecord = serde_json::from_slice(&text).map_err(|e| Error::Corrupt(format!("{}: {e}", path.display())))?;
        let bad = |what: &str| Error::Corrupt(format!("{}: {what}", path.display()));
        let ephemeral = hex::decode(&r.ephemeral).map_err(|_| bad("ephemeral key"))?;
        let nonce: [u8; 12] = hex::decode(&r.nonce).ok().and_then(|n| n.try_into().ok()).ok_or_else(|| bad("nonce"))?;
        let mut sealed = hex::decode(&r.ciphertext).map_err(|_| bad("ciphertext"))?;
        let private_der =
            Zeroizing::new(std::fs::read(escrow_key).map_err(|e| Error::NotFound(format!("the escrow private key {} ({e})", escrow_key.display())))?);
        let private = agreement::PrivateKey::from_private_key_der(&agreement::ECDH_P256, &private_der).map_err(pki)?;
        let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, &ephemeral);
        let key = agreement::agree(&private, peer, bad("key agreement"), |shared| sealing_key(shared, &ephemeral).map_err(|_| bad("key derivation")))?;
        let plain =
            key.open_in_place(aead::Nonce::assume_unique_for_key(nonce), aead::Aad::from(card_uuid), &mut sealed).map_err(|_| bad("does not decrypt"))?;
        let s: Secrets = serde_json::from_slice(plain).map_err(|_| bad("secrets"))?;
        let alg = Algorithm::from_id(s.management_algorithm).ok_or_else(|| bad("algorithm"))?;
        let bytes = Zeroizing::new(hex::decode(&s.management_key).map_err(|_| bad("management key"))?);
        let management_key = ManagementKey::new(alg, &bytes).map_err(|_| bad("management key"))?;
        sealed.iter_mut().for_each(|b| *b = 0);
        Ok(Recovered { management_key, puk: Zeroizing::new(s.puk.into_bytes()), serial: r.serial })
    }

    /// Issues a blank token for `holder` with the PIN they chose. Nothing
    /// is enrolled here: the caller enrols [`Issued`] once this returns.
    pub fn issue<T: Transport>(
        &self,
        piv: &mut PivClient<T>,
        holder: &str,
        pin: &Pin,
        algorithm: Algorithm,
        random: &dyn Randomness,
    ) -> std::result::Result<Issued, Interrupted> {
        let mut done = Vec::new();
        let mut card_uuid = None;
        let stop =
            |done: &Vec<Step>, card_uuid: Option<[u8; 16]>, e: &dyn std::fmt::Display| Interrupted { done: done.clone(), card_uuid, error: e.to_string() };
        macro_rules! step {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) => return Err(stop(&done, card_uuid, &e)),
                }
            };
        }
        step!(piv.select());
        let serial = piv.serial().unwrap_or(None);
        // Checks before anything changes: a card someone issued already is
        // retired first, never overwritten.
        if piv.read_certificate(CardSlot::Authentication).is_ok() {
            return Err(stop(&done, None, &"the card already holds a 9A certificate: retire it first (pivgatectl card retire)"));
        }
        let mut challenge = [0u8; 16];
        step!(random.fill(&mut challenge[..8]));
        if !step!(piv.authenticate_management(&ManagementKey::default_key(), &challenge[..8])) {
            return Err(stop(&done, None, &"the card's management key is not the default: it was issued before; retire it first"));
        }
        done.push(Step::Authenticated);
        let k9a = step!(piv.generate(CardSlot::Authentication, algorithm, PinPolicy::Once));
        done.push(Step::Generated9a);
        let k9e = step!(piv.generate(CardSlot::CardAuthentication, algorithm, PinPolicy::Never));
        done.push(Step::Generated9e);
        let mut uuid = [0u8; 16];
        step!(random.fill(&mut uuid));
        uuid[6] = (uuid[6] & 0x0F) | 0x40;
        uuid[8] = (uuid[8] & 0x3F) | 0x80;
        card_uuid = Some(uuid);
        let c9a = step!(self.certify(CardSlot::Authentication, &k9a.spki, &uuid, holder, random));
        let c9e = step!(self.certify(CardSlot::CardAuthentication, &k9e.spki, &uuid, holder, random));
        step!(piv.put_certificate(CardSlot::Authentication, &c9a));
        step!(piv.put_certificate(CardSlot::CardAuthentication, &c9e));
        done.push(Step::Certificates);
        let expiry = (time::OffsetDateTime::now_utc() + time::Duration::days(365 * 3)).date();
        let chuid = Chuid {
            fascn: None,
            guid: uuid,
            expiry: Some(format!("{:04}{:02}{:02}", expiry.year(), u8::from(expiry.month()), expiry.day())),
            cardholder_uuid: None,
            signed: false,
        };
        step!(piv.put_data(ObjectTag::CHUID, &chuid.encode()));
        done.push(Step::Chuid);
        // The new secrets: escrowed (durably) before the card takes them, so
        // a crash between the two never leaves a card nobody can manage.
        let mut key_bytes = Zeroizing::new([0u8; 24]);
        step!(random.fill(&mut key_bytes[..]));
        let mut new_key = step!(ManagementKey::new(Algorithm::Aes192, &key_bytes[..]));
        let mut digits = Zeroizing::new([0u8; 8]);
        step!(random.fill(&mut digits[..]));
        let puk = Zeroizing::new(digits.iter().map(|d| b'0' + d % 10).collect::<Vec<u8>>());
        step!(self.escrow(&uuid, serial, &new_key, &puk, random));
        done.push(Step::Escrowed);
        let refused_aes = |e: &pivgate_hw::Error| {
            use pivgate_hw::apdu::StatusWord as Sw;
            matches!(e, pivgate_hw::Error::Status { sw, .. } if [Sw::INCORRECT_DATA, Sw::INCORRECT_P1P2, Sw::INS_NOT_SUPPORTED].contains(sw))
        };
        if let Err(e) = piv.set_management_key(&new_key) {
            if !refused_aes(&e) {
                return Err(stop(&done, card_uuid, &e));
            }
            // Older tokens take only 3DES management keys.
            new_key = step!(ManagementKey::new(Algorithm::TripleDes, &key_bytes[..]));
            step!(self.escrow(&uuid, serial, &new_key, &puk, random));
            step!(piv.set_management_key(&new_key));
        }
        done.push(Step::ManagementKey);
        step!(piv.change_puk(DEFAULT_PUK, &puk));
        done.push(Step::Puk);
        let default_pin = step!(Pin::new(DEFAULT_PIN));
        step!(piv.change_pin(&default_pin, pin));
        done.push(Step::Pin);
        let attestation_9a = match (piv.attest(CardSlot::Authentication), piv.attestation_certificate()) {
            (Ok(Some(a)), Ok(Some(f9))) => Some((a, f9)),
            _ => None,
        };
        Ok(Issued { card_uuid: uuid, serial, certificate_9a: c9a, certificate_9e: c9e, attestation_9a })
    }

    /// Unblocks a blocked PIN with the card's escrowed PUK; the operator
    /// sets `new_pin`. The PUK goes only to a card that proved it holds
    /// this card's escrowed management key (a card showing a copied CHUID
    /// gets nothing).
    pub fn unblock<T: Transport>(&self, piv: &mut PivClient<T>, card_uuid: &[u8; 16], escrow_key: &Path, new_pin: &Pin, random: &dyn Randomness) -> Result<()> {
        let secrets = self.recover(card_uuid, escrow_key)?;
        piv.select()?;
        self.prove_card(piv, card_uuid, &secrets, random)?;
        piv.unblock_pin(&secrets.puk, new_pin)?;
        Ok(())
    }

    /// The card in the reader is the one escrowed as `card_uuid`: its CHUID
    /// and serial say so, and it proves it holds the escrowed management
    /// key (mutual authentication: the card answers our challenge).
    fn prove_card<T: Transport>(&self, piv: &mut PivClient<T>, card_uuid: &[u8; 16], secrets: &Recovered, random: &dyn Randomness) -> Result<()> {
        let chuid = piv.read_chuid()?;
        if &chuid.guid != card_uuid {
            return Err(Error::InvalidRequest(format!("the card in the reader is {}, not {}", uuid_text(&chuid.guid), uuid_text(card_uuid))));
        }
        if let (Some(escrowed), Some(answered)) = (secrets.serial, piv.serial().unwrap_or(None)) {
            if escrowed != answered {
                return Err(Error::InvalidRequest(format!(
                    "the card in the reader has serial {answered}, card {} was issued on {escrowed}",
                    uuid_text(card_uuid)
                )));
            }
        }
        let mut challenge = vec![0u8; secrets.management_key.block_len()];
        random.fill(&mut challenge)?;
        if !piv.authenticate_management(&secrets.management_key, &challenge)? {
            return Err(Error::InvalidRequest(format!("the card in the reader does not hold card {}'s management key", uuid_text(card_uuid))));
        }
        Ok(())
    }

    /// Retires a card: proves the site's management key, then wipes it
    /// (YubiKey: both PIN and PUK blocked, then RESET; other cards: new
    /// throwaway keys over 9A and 9E, certificates and CHUID deleted) and
    /// hands it back with the factory management key, PIN and PUK.
    pub fn retire<T: Transport>(&self, piv: &mut PivClient<T>, card_uuid: &[u8; 16], escrow_key: &Path, random: &dyn Randomness) -> Result<()> {
        let secrets = self.recover(card_uuid, escrow_key)?;
        piv.select()?;
        self.prove_card(piv, card_uuid, &secrets, random)?;
        // Does the card have RESET? A YubiKey refuses it (6985) until PIN
        // and PUK are blocked; a card without it says 6D00. Nothing is
        // blocked on a card that cannot then be reset.
        let resettable = match piv.reset_application() {
            Ok(()) => return Ok(()),
            Err(pivgate_hw::Error::Status { sw, .. }) => sw != pivgate_hw::apdu::StatusWord::INS_NOT_SUPPORTED,
            Err(e) => return Err(e.into()),
        };
        if resettable {
            // Block the PIN and the PUK with values that are not theirs.
            let wrong = Pin::new(b"00000000")?;
            for _ in 0..16 {
                match piv.verify_pin(&wrong) {
                    Err(pivgate_hw::Error::PinBlocked) => break,
                    Ok(()) => return Err(Error::InvalidRequest("the card took 00000000 as its PIN; change it first".into())),
                    Err(_) => {}
                }
            }
            let not_puk: &[u8] = if secrets.puk.as_slice() == b"99999999" { b"88888888" } else { b"99999999" };
            for _ in 0..16 {
                match piv.unblock_pin(not_puk, &wrong) {
                    Err(pivgate_hw::Error::PinBlocked) => break,
                    Err(pivgate_hw::Error::WrongPin { .. }) => {}
                    Ok(()) => return Err(Error::InvalidRequest("the card took a PUK that is not its own".into())),
                    Err(e) => return Err(e.into()),
                }
            }
            piv.reset_application()?;
            return Ok(());
        }
        // No RESET: the keys are overwritten, the objects deleted, and the
        // factory management key, PUK and PIN put back.
        for slot in [CardSlot::Authentication, CardSlot::CardAuthentication] {
            piv.generate(slot, Algorithm::EccP256, PinPolicy::Default)?;
            if let Some(tag) = slot.certificate_object() {
                piv.put_data(tag, &[])?;
            }
        }
        piv.put_data(ObjectTag::CHUID, &[])?;
        piv.change_puk(&secrets.puk, DEFAULT_PUK)?;
        piv.unblock_pin(DEFAULT_PUK, &Pin::new(DEFAULT_PIN)?)?;
        piv.set_management_key(&ManagementKey::default_key())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::SystemRandomness;

    fn scratch() -> PathBuf {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let d = std::env::temp_dir().join(format!("pivgate-station-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn escrowed_secrets_come_back_only_with_the_escrow_key() {
        let dir = scratch();
        let (station, created) = Station::create_or_open(&dir, "Test Site").unwrap();
        assert!(created);
        let (station_again, created) = Station::create_or_open(&dir, "Test Site").unwrap();
        assert!(!created, "the card CA is made once");
        assert_eq!(station.ca_cert_pem, station_again.ca_cert_pem);
        let key = ManagementKey::new(Algorithm::Aes192, &[0x5A; 24]).unwrap();
        let uuid = [7u8; 16];
        station.escrow(&uuid, Some(42), &key, b"31415926", &SystemRandomness).unwrap();
        let text = std::fs::read_to_string(station.escrow_path(&uuid)).unwrap();
        assert!(!text.contains("31415926") && !text.contains(&hex::encode([0x5A; 24])), "escrow in the clear: {text}");
        // The private key moved offline: recovery names where it is.
        let offline = dir.with_extension("offline-escrow-key.der");
        std::fs::rename(station.default_escrow_key(), &offline).unwrap();
        assert!(station.recover(&uuid, &station.default_escrow_key()).is_err());
        let back = station.recover(&uuid, &offline).unwrap();
        assert_eq!(back.management_key.bytes(), key.bytes());
        assert_eq!(back.puk.as_slice(), b"31415926");
        // Another card's record under this card's name does not open.
        std::fs::copy(station.escrow_path(&uuid), station.escrow_path(&[8; 16])).unwrap();
        assert!(station.recover(&[8; 16], &offline).is_err(), "a record opened under another card's UUID");
        // A folder missing part of its CA is refused, never made again.
        std::fs::remove_file(dir.join("card-ca.pem")).unwrap();
        assert!(Station::create_or_open(&dir, "Test Site").is_err(), "a partial station folder was made again");
        assert!(Station::open(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&offline);
    }

    #[test]
    fn issued_certificates_carry_the_card_uuid_and_the_slot_policy() {
        let dir = scratch();
        let (station, _) = Station::create_or_open(&dir, "Test Site").unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        for (slot, policy, eku) in [
            (CardSlot::Authentication, "2.16.840.1.101.3.2.1.3.13", "1.3.6.1.4.1.311.20.2.2"),
            (CardSlot::CardAuthentication, "2.16.840.1.101.3.2.1.3.17", "2.16.840.1.101.3.6.8"),
        ] {
            let der = station.certify(slot, &spki, &[9; 16], "Ana", &SystemRandomness).unwrap();
            let info = crate::verify::inspect(&der).unwrap();
            assert_eq!(info.uuid, Some([9; 16]));
            let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
            let policies: Vec<String> = c
                .extensions()
                .iter()
                .filter_map(|e| match e.parsed_extension() {
                    x509_parser::extensions::ParsedExtension::CertificatePolicies(p) => Some(p.iter().map(|i| i.policy_id.to_id_string()).collect::<Vec<_>>()),
                    _ => None,
                })
                .flatten()
                .collect();
            assert_eq!(policies, [policy]);
            let ekus = c.extended_key_usage().unwrap().unwrap().value.other.iter().map(|o| o.to_id_string()).collect::<Vec<_>>();
            assert!(ekus.contains(&eku.to_string()), "{ekus:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_interruption_says_what_the_card_holds() {
        let i = Interrupted { done: vec![Step::Authenticated, Step::Generated9a], card_uuid: None, error: "card removed".into() };
        let t = i.to_string();
        assert!(t.contains("a new 9A key") && t.contains("management key is still the default") && t.contains("not enrolled"), "{t}");
        let none = Interrupted { done: vec![], card_uuid: None, error: "x".into() };
        assert!(none.to_string().contains("not changed"));
        let late = Interrupted { done: vec![Step::Authenticated, Step::Escrowed, Step::ManagementKey], card_uuid: Some([1; 16]), error: "x".into() };
        assert!(late.to_string().contains("retire it"), "{late}");
    }
}
