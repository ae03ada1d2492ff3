//! Card administration, as an issuance station does it (feature `admin`;
//! the agent on a Pi carries none of it): management key authentication
//! (SP 800-73-4 Part 2, Appendix A.1, 3DES and AES), GENERATE ASYMMETRIC
//! KEY PAIR with the YubiKey PIN and touch policies, PUT DATA, the PIN and
//! PUK changed and unblocked, and the YubiKey extensions that set the
//! management key and reset the application.
//!
//! Sans-IO like the rest of the client: randomness is passed in.

use zeroize::Zeroizing;

use crate::apdu::{Command, Ins, StatusWord};
use crate::error::{Error, Result};
use crate::pin::Pin;
use crate::tlv;
use crate::transport::Transport;

use super::client::{status_error, PivClient};
use super::{Algorithm, KeyRef, ObjectTag, Slot};

/// The well-known default management key of YubiKeys and most test cards,
/// 010203040506070801020304050607080102030405060708. A card that still has
/// it can be rewritten by anyone who holds it for a minute.
pub const DEFAULT_MANAGEMENT_KEY: [u8; 24] = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8];

/// The card management key (key reference 9B).
#[derive(Clone)]
pub enum ManagementKey {
    /// Triple DES, three keys (algorithm 03).
    TripleDes(Zeroizing<[u8; 24]>),
    /// AES-128 (algorithm 08).
    Aes128(Zeroizing<[u8; 16]>),
    /// AES-192 (algorithm 0A).
    Aes192(Zeroizing<[u8; 24]>),
    /// AES-256 (algorithm 0C).
    Aes256(Zeroizing<[u8; 32]>),
}

impl std::fmt::Debug for ManagementKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ManagementKey({}, ..)", self.algorithm())
    }
}

impl ManagementKey {
    /// Builds a key from an algorithm and its bytes.
    pub fn new(alg: Algorithm, bytes: &[u8]) -> Result<ManagementKey> {
        let wrong = || Error::InvalidInput("management key is not the length its algorithm needs");
        Ok(match alg {
            Algorithm::TripleDes => ManagementKey::TripleDes(Zeroizing::new(bytes.try_into().map_err(|_| wrong())?)),
            Algorithm::Aes128 => ManagementKey::Aes128(Zeroizing::new(bytes.try_into().map_err(|_| wrong())?)),
            Algorithm::Aes192 => ManagementKey::Aes192(Zeroizing::new(bytes.try_into().map_err(|_| wrong())?)),
            Algorithm::Aes256 => ManagementKey::Aes256(Zeroizing::new(bytes.try_into().map_err(|_| wrong())?)),
            _ => return Err(Error::InvalidInput("not a management key algorithm")),
        })
    }

    /// The default 3DES key ([`DEFAULT_MANAGEMENT_KEY`]).
    pub fn default_key() -> ManagementKey {
        ManagementKey::TripleDes(Zeroizing::new(DEFAULT_MANAGEMENT_KEY))
    }

    /// Whether this is the well-known default.
    pub fn is_default(&self) -> bool {
        matches!(self, ManagementKey::TripleDes(k) if **k == DEFAULT_MANAGEMENT_KEY)
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            ManagementKey::TripleDes(_) => Algorithm::TripleDes,
            ManagementKey::Aes128(_) => Algorithm::Aes128,
            ManagementKey::Aes192(_) => Algorithm::Aes192,
            ManagementKey::Aes256(_) => Algorithm::Aes256,
        }
    }

    /// The key bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            ManagementKey::TripleDes(k) => &k[..],
            ManagementKey::Aes128(k) => &k[..],
            ManagementKey::Aes192(k) => &k[..],
            ManagementKey::Aes256(k) => &k[..],
        }
    }

    /// The cipher's block length: challenges and witnesses are one block.
    pub fn block_len(&self) -> usize {
        match self {
            ManagementKey::TripleDes(_) => 8,
            _ => 16,
        }
    }

    /// Encrypts one block (ECB), or decrypts with `decrypt`.
    pub fn crypt_block(&self, block: &[u8], decrypt: bool) -> Option<Vec<u8>> {
        use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
        fn run<C: BlockEncrypt + BlockDecrypt + KeyInit>(key: &[u8], block: &[u8], decrypt: bool) -> Option<Vec<u8>> {
            let cipher = C::new_from_slice(key).ok()?;
            let mut b = aes::cipher::generic_array::GenericArray::clone_from_slice(block);
            if decrypt {
                cipher.decrypt_block(&mut b);
            } else {
                cipher.encrypt_block(&mut b);
            }
            Some(b.to_vec())
        }
        if block.len() != self.block_len() {
            return None;
        }
        match self {
            ManagementKey::TripleDes(k) => run::<des::TdesEde3>(&k[..], block, decrypt),
            ManagementKey::Aes128(k) => run::<aes::Aes128>(&k[..], block, decrypt),
            ManagementKey::Aes192(k) => run::<aes::Aes192>(&k[..], block, decrypt),
            ManagementKey::Aes256(k) => run::<aes::Aes256>(&k[..], block, decrypt),
        }
    }
}

/// A YubiKey PIN policy for a generated key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PinPolicy {
    /// The slot's default.
    Default,
    /// Never asks for the PIN.
    Never,
    /// Once per session.
    Once,
    /// Before every signature.
    Always,
}

impl PinPolicy {
    fn code(self) -> u8 {
        match self {
            PinPolicy::Default => 0,
            PinPolicy::Never => 1,
            PinPolicy::Once => 2,
            PinPolicy::Always => 3,
        }
    }
}

/// A public key as GENERATE returns it, with its DER SubjectPublicKeyInfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// DER SubjectPublicKeyInfo.
    pub spki: Vec<u8>,
}

fn der(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match body.len() {
        n @ 0..=0x7F => out.push(n as u8),
        n @ 0x80..=0xFF => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(body);
    out
}

fn der_uint(b: &[u8]) -> Vec<u8> {
    let mut v: Vec<u8> = b.iter().copied().skip_while(|x| *x == 0).collect();
    if v.is_empty() || v[0] & 0x80 != 0 {
        v.insert(0, 0);
    }
    der(0x02, &v)
}

/// The SubjectPublicKeyInfo of a GENERATE answer's `7F49` template
/// (SP 800-73-4 Part 2, Table 13): `86` the EC point, or `81` the RSA
/// modulus and `82` its exponent.
pub fn spki_from_template(template: &[u8], algorithm: Algorithm) -> Result<Vec<u8>> {
    const CMD: &str = "GENERATE ASYMMETRIC KEY PAIR";
    let t = tlv::expect_single(template, 0x7F49).map_err(|e| Error::malformed(CMD, e.reason()))?.ok_or_else(|| Error::malformed(CMD, "no 7F49 template"))?;
    let field = |tag| tlv::find(t, tag).map_err(|e| Error::malformed(CMD, e.reason()));
    const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01];
    let ec = |curve: &[u8], len: usize| -> Result<Vec<u8>> {
        let point =
            field(0x86)?.filter(|p| p.len() == len && p[0] == 0x04).ok_or_else(|| Error::malformed(CMD, "not an uncompressed EC point of the curve"))?;
        let alg = der(0x30, &[EC_PUBLIC_KEY, curve].concat());
        Ok(der(0x30, &[alg, der(0x03, &[&[0u8][..], point].concat())].concat()))
    };
    match algorithm {
        Algorithm::EccP256 => ec(&[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07], 65),
        Algorithm::EccP384 => ec(&[0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22], 97),
        Algorithm::Rsa2048 => {
            let n = field(0x81)?.filter(|n| n.len() == 256).ok_or_else(|| Error::malformed(CMD, "not a 2048-bit modulus"))?;
            let e = field(0x82)?.filter(|e| !e.is_empty() && e.len() <= 8).ok_or_else(|| Error::malformed(CMD, "no public exponent"))?;
            let rsa = der(0x30, &[0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x01, 0x05, 0x00]);
            let key = der(0x30, &[der_uint(n), der_uint(e)].concat());
            Ok(der(0x30, &[rsa, der(0x03, &[&[0u8][..], &key].concat())].concat()))
        }
        _ => Err(Error::InvalidInput("not an asymmetric algorithm")),
    }
}

fn padded(secret: &[u8]) -> Result<Zeroizing<[u8; 8]>> {
    if !(1..=8).contains(&secret.len()) {
        return Err(Error::InvalidInput("a PIN or PUK is 1 to 8 bytes"));
    }
    let mut out = Zeroizing::new([0xFF; 8]);
    out[..secret.len()].copy_from_slice(secret);
    Ok(out)
}

impl<T: Transport> PivClient<T> {
    /// Mutual authentication with the card management key (SP 800-73-4
    /// Part 2, Appendix A.1): the card proves it holds the key, and so do
    /// we. `challenge` is one block of fresh randomness from the caller.
    /// Returns `Ok(false)` for a wrong key (the card refused our answer).
    pub fn authenticate_management(&mut self, key: &ManagementKey, challenge: &[u8]) -> Result<bool> {
        const CMD: &str = "GENERAL AUTHENTICATE (management key)";
        if challenge.len() != key.block_len() {
            return Err(Error::InvalidInput("the challenge must be one cipher block"));
        }
        let alg = key.algorithm().id();
        let mgmt = KeyRef::Key(Slot::Management).code();
        let ask = tlv::encode(0x7C, &tlv::encode(0x80, &[]));
        let r = self.exchange(CMD, &Command::new(Ins::GeneralAuthenticate, alg, mgmt).with_data(ask).with_le(256))?;
        match r.sw {
            StatusWord::SUCCESS => {}
            // The card's key is of another algorithm: not this key.
            StatusWord::INCORRECT_P1P2 => return Ok(false),
            sw => return Err(status_error(CMD, sw)),
        }
        let t = tlv::expect_single(&r.data, 0x7C).map_err(|e| Error::malformed(CMD, e.reason()))?.ok_or_else(|| Error::malformed(CMD, "no 7C template"))?;
        let witness = tlv::find(t, 0x80).map_err(|e| Error::malformed(CMD, e.reason()))?.ok_or_else(|| Error::malformed(CMD, "no witness"))?;
        let plain = Zeroizing::new(key.crypt_block(witness, true).ok_or_else(|| Error::malformed(CMD, "the witness is not one block"))?);
        let mut answer = tlv::encode(0x80, &plain);
        answer.extend(tlv::encode(0x81, challenge));
        let r = self.exchange(CMD, &Command::new(Ins::GeneralAuthenticate, alg, mgmt).with_data(tlv::encode(0x7C, &answer)).with_le(256))?;
        match r.sw {
            StatusWord::SUCCESS => {}
            StatusWord::SECURITY_STATUS_NOT_SATISFIED | StatusWord::INCORRECT_DATA => return Ok(false),
            sw => return Err(status_error(CMD, sw)),
        }
        let t = tlv::expect_single(&r.data, 0x7C).map_err(|e| Error::malformed(CMD, e.reason()))?.ok_or_else(|| Error::malformed(CMD, "no 7C template"))?;
        let proof = tlv::find(t, 0x82).map_err(|e| Error::malformed(CMD, e.reason()))?.ok_or_else(|| Error::malformed(CMD, "no response"))?;
        // The card must show it holds the key too: a card that answers
        // without it would take our writes for someone else.
        Ok(key.crypt_block(challenge, false).is_some_and(|c| c == proof))
    }

    /// GENERATE ASYMMETRIC KEY PAIR in `slot` (after management key
    /// authentication), with a YubiKey PIN policy. Returns the public key.
    pub fn generate(&mut self, slot: Slot, algorithm: Algorithm, pin: PinPolicy) -> Result<PublicKey> {
        const CMD: &str = "GENERATE ASYMMETRIC KEY PAIR";
        let mut ac = tlv::encode(0x80, &[algorithm.id()]);
        if pin != PinPolicy::Default {
            ac.extend(tlv::encode(0xAA, &[pin.code()]));
        }
        let r = self.exchange(CMD, &Command::new(Ins::GenerateAsymmetricKeyPair, 0x00, slot.key_ref()).with_data(tlv::encode(0xAC, &ac)).with_le(256))?;
        if r.sw != StatusWord::SUCCESS {
            return Err(status_error(CMD, r.sw));
        }
        Ok(PublicKey { algorithm, spki: spki_from_template(&r.data, algorithm)? })
    }

    /// PUT DATA: the contents of an object's `53` container (empty
    /// deletes it), after management key authentication.
    pub fn put_data(&mut self, tag: ObjectTag, contents: &[u8]) -> Result<()> {
        const CMD: &str = "PUT DATA";
        let mut data = tlv::encode(0x5C, &tag.encoded());
        data.extend(tlv::encode(0x53, contents));
        let r = self.exchange(CMD, &Command::new(Ins::PutData, 0x3F, 0xFF).with_data(data))?;
        match r.sw {
            StatusWord::SUCCESS => Ok(()),
            sw => Err(status_error(CMD, sw)),
        }
    }

    /// Writes `der` as the certificate of `slot`.
    pub fn put_certificate(&mut self, slot: Slot, der: &[u8]) -> Result<()> {
        let tag = slot.certificate_object().ok_or(Error::InvalidInput("the management key has no certificate"))?;
        self.put_data(tag, &super::objects::certificate_container(der, false))
    }

    /// Replaces the management key (YubiKey SET MANAGEMENT KEY), after
    /// authenticating with the current one.
    pub fn set_management_key(&mut self, key: &ManagementKey) -> Result<()> {
        const CMD: &str = "SET MANAGEMENT KEY";
        let mut data = Zeroizing::new(vec![key.algorithm().id(), KeyRef::Key(Slot::Management).code(), key.bytes().len() as u8]);
        data.extend_from_slice(key.bytes());
        let r = self.exchange(CMD, &Command::new(Ins::YubicoSetManagementKey, 0xFF, 0xFF).with_data(data.to_vec()))?;
        match r.sw {
            StatusWord::SUCCESS => Ok(()),
            sw => Err(status_error(CMD, sw)),
        }
    }

    fn change_reference(&mut self, key: KeyRef, old: &[u8; 8], new: &[u8; 8]) -> Result<()> {
        const CMD: &str = "CHANGE REFERENCE DATA";
        let mut data = Zeroizing::new(old.to_vec());
        data.extend_from_slice(new);
        let r = self.exchange(CMD, &Command::new(Ins::ChangeReferenceData, 0x00, key.code()).with_data(data.to_vec()))?;
        pin_answer(CMD, r.sw)
    }

    /// Changes the PIN (CHANGE REFERENCE DATA).
    pub fn change_pin(&mut self, old: &Pin, new: &Pin) -> Result<()> {
        self.change_reference(KeyRef::Pin, &old.padded(), &new.padded())
    }

    /// Changes the PUK (1 to 8 bytes).
    pub fn change_puk(&mut self, old: &[u8], new: &[u8]) -> Result<()> {
        self.change_reference(KeyRef::Puk, &*padded(old)?, &*padded(new)?)
    }

    /// RESET RETRY COUNTER: unblocks the PIN with the PUK, setting `new`.
    pub fn unblock_pin(&mut self, puk: &[u8], new: &Pin) -> Result<()> {
        const CMD: &str = "RESET RETRY COUNTER";
        let mut data = Zeroizing::new(padded(puk)?.to_vec());
        data.extend_from_slice(&new.padded()[..]);
        let r = self.exchange(CMD, &Command::new(Ins::ResetRetryCounter, 0x00, KeyRef::Pin.code()).with_data(data.to_vec()))?;
        pin_answer(CMD, r.sw)
    }

    /// Resets the PIV application to its factory state (YubiKey RESET,
    /// INS FB): every key and object gone, PIN, PUK and management key
    /// back to their defaults. The card takes it only once both the PIN
    /// and the PUK are blocked.
    pub fn reset_application(&mut self) -> Result<()> {
        const CMD: &str = "RESET";
        let r = self.exchange(CMD, &Command::new(Ins::Other(0xFB), 0x00, 0x00))?;
        match r.sw {
            StatusWord::SUCCESS => Ok(()),
            sw => Err(status_error(CMD, sw)),
        }
    }
}

fn pin_answer(cmd: &'static str, sw: StatusWord) -> Result<()> {
    match sw {
        StatusWord::SUCCESS => Ok(()),
        StatusWord::AUTH_METHOD_BLOCKED => Err(Error::PinBlocked),
        sw => match sw.tries_left() {
            Some(0) => Err(Error::PinBlocked),
            Some(tries) => Err(Error::WrongPin { tries }),
            None => Err(status_error(cmd, sw)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_keys_become_subject_public_key_infos() {
        let mut point = vec![0x04];
        point.extend([7u8; 64]);
        let t = tlv::encode(0x7F49, &tlv::encode(0x86, &point));
        let spki = spki_from_template(&t, Algorithm::EccP256).unwrap();
        assert_eq!(spki.len(), 91, "the DER of a P-256 SubjectPublicKeyInfo");
        assert_eq!(&spki[..2], &[0x30, 0x59]);
        assert!(spki_from_template(&t, Algorithm::EccP384).is_err(), "a P-256 point is no P-384 key");
        let mut rsa = tlv::encode(0x81, &[0xC5; 256]);
        rsa.extend(tlv::encode(0x82, &[1, 0, 1]));
        let spki = spki_from_template(&tlv::encode(0x7F49, &rsa), Algorithm::Rsa2048).unwrap();
        assert_eq!(spki.len(), 294, "the DER of an RSA-2048 SubjectPublicKeyInfo");
        assert!(spki_from_template(&tlv::encode(0x7F49, &tlv::encode(0x81, &[1; 255])), Algorithm::Rsa2048).is_err());
    }

    #[test]
    fn pins_and_puks_are_padded_and_bounded() {
        assert_eq!(&padded(b"123456").unwrap()[..], b"123456\xff\xff");
        assert!(padded(b"").is_err());
        assert!(padded(b"123456789").is_err());
        assert!(!ManagementKey::new(Algorithm::Aes192, &[0; 24]).unwrap().is_default());
        assert!(ManagementKey::default_key().is_default());
        assert!(ManagementKey::new(Algorithm::EccP256, &[0; 24]).is_err());
    }
}
