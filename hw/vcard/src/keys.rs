//! The virtual card's keys: asymmetric slot keys that sign raw, as a card
//! does, and the symmetric card management key.

use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey, LineEnding};
use rand_core::CryptoRngCore;
use rsa::traits::PublicKeyParts;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use pivgate_hw::apdu::StatusWord;
use pivgate_hw::piv::Algorithm;
use pivgate_hw::tlv;

/// A private key in one of the card's asymmetric slots.
#[derive(Clone)]
pub enum CardKey {
    /// ECC P-256.
    P256(p256::SecretKey),
    /// ECC P-384.
    P384(p384::SecretKey),
    /// RSA-2048, e = 65537.
    Rsa2048(Box<rsa::RsaPrivateKey>),
}

impl CardKey {
    /// Generates a key for `alg` (GENERATE ASYMMETRIC KEY PAIR).
    pub fn generate(alg: Algorithm, rng: &mut dyn CryptoRngCore) -> Result<CardKey> {
        Ok(match alg {
            Algorithm::EccP256 => CardKey::P256(p256::SecretKey::random(&mut &mut *rng)),
            Algorithm::EccP384 => CardKey::P384(p384::SecretKey::random(&mut &mut *rng)),
            Algorithm::Rsa2048 => {
                CardKey::Rsa2048(Box::new(rsa::RsaPrivateKey::new(rng, 2048).map_err(|e| Error::Profile(format!("RSA key generation: {e}")))?))
            }
            other => return Err(Error::Algorithm(other.id())),
        })
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            CardKey::P256(_) => Algorithm::EccP256,
            CardKey::P384(_) => Algorithm::EccP384,
            CardKey::Rsa2048(_) => Algorithm::Rsa2048,
        }
    }

    /// Signs the way a PIV card does: ECDSA over the given hash (returned
    /// as DER), or the raw RSA private-key operation on a block of the
    /// modulus size (the host has done the padding).
    pub fn sign_raw(&self, input: &[u8], rng: &mut dyn CryptoRngCore) -> std::result::Result<Vec<u8>, StatusWord> {
        use p256::ecdsa::signature::hazmat::PrehashSigner;
        match self {
            CardKey::P256(k) => {
                let sig: p256::ecdsa::Signature = p256::ecdsa::SigningKey::from(k).sign_prehash(input).map_err(|_| StatusWord::INCORRECT_DATA)?;
                Ok(sig.to_der().as_bytes().to_vec())
            }
            CardKey::P384(k) => {
                let sig: p384::ecdsa::Signature = p384::ecdsa::SigningKey::from(k).sign_prehash(input).map_err(|_| StatusWord::INCORRECT_DATA)?;
                Ok(sig.to_der().as_bytes().to_vec())
            }
            CardKey::Rsa2048(k) => {
                let size = k.size();
                if input.len() != size {
                    return Err(StatusWord::INCORRECT_DATA);
                }
                let m = rsa::BigUint::from_bytes_be(input);
                if &m >= k.n() {
                    return Err(StatusWord::INCORRECT_DATA);
                }
                let s = rsa::hazmat::rsa_decrypt_and_check(k.as_ref(), Some(rng), &m).map_err(|_| StatusWord::UNKNOWN)?;
                let mut out = s.to_bytes_be();
                while out.len() < size {
                    out.insert(0, 0);
                }
                Ok(out)
            }
        }
    }

    /// The public key as GENERATE ASYMMETRIC KEY PAIR returns it: the
    /// contents of template 7F49 (SP 800-73-4 Part 2, Table 11).
    pub fn public_template(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            CardKey::P256(k) => tlv::write(&mut out, 0x86, p256::EncodedPoint::from(k.public_key()).as_bytes()),
            CardKey::P384(k) => tlv::write(&mut out, 0x86, p384::EncodedPoint::from(k.public_key()).as_bytes()),
            CardKey::Rsa2048(k) => {
                tlv::write(&mut out, 0x81, &k.n().to_bytes_be());
                tlv::write(&mut out, 0x82, &k.e().to_bytes_be());
            }
        }
        out
    }

    /// The public key as a DER SubjectPublicKeyInfo, for certificates.
    pub fn spki_der(&self) -> Result<Vec<u8>> {
        let der = match self {
            CardKey::P256(k) => k.public_key().to_public_key_der(),
            CardKey::P384(k) => k.public_key().to_public_key_der(),
            CardKey::Rsa2048(k) => k.to_public_key().to_public_key_der(),
        };
        der.map(|d| d.as_bytes().to_vec()).map_err(|e| Error::Profile(format!("encoding public key: {e}")))
    }

    /// PKCS#8 PEM of the private key (for the profile folder).
    pub fn to_pem(&self) -> Result<Zeroizing<String>> {
        let pem = match self {
            CardKey::P256(k) => k.to_pkcs8_pem(LineEnding::LF),
            CardKey::P384(k) => k.to_pkcs8_pem(LineEnding::LF),
            CardKey::Rsa2048(k) => k.to_pkcs8_pem(LineEnding::LF),
        };
        pem.map(|p| Zeroizing::new(p.to_string())).map_err(|e| Error::Profile(format!("encoding private key: {e}")))
    }

    /// Reads a PKCS#8 PEM private key of any of the three algorithms.
    pub fn from_pem(pem: &str) -> Result<CardKey> {
        if let Ok(k) = p256::SecretKey::from_pkcs8_pem(pem) {
            return Ok(CardKey::P256(k));
        }
        if let Ok(k) = p384::SecretKey::from_pkcs8_pem(pem) {
            return Ok(CardKey::P384(k));
        }
        match rsa::RsaPrivateKey::from_pkcs8_pem(pem) {
            Ok(k) if k.size() == 256 => Ok(CardKey::Rsa2048(Box::new(k))),
            Ok(_) => Err(Error::Profile("RSA key is not 2048 bits".into())),
            Err(_) => Err(Error::Profile("private key is not PKCS#8 P-256, P-384 or RSA-2048".into())),
        }
    }
}

pub use pivgate_hw::piv::admin::{ManagementKey, DEFAULT_MANAGEMENT_KEY};
