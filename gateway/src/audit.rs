//! Tamper evidence beyond the hash chain: signed checkpoints of the chain
//! head, and a verification that tells truncation from rewriting.
//!
//! The hash chain alone shows only that the records agree with each other:
//! deleting the last records, or rewriting one and recomputing every hash
//! after it, leaves a chain that verifies. So the gateway signs
//! checkpoints (the index and hash of the newest record, and the time) with
//! a key of its own (`audit-signing-key.pem` in the data folder), every
//! `audit_checkpoint_s` while the log grows and at shutdown. Applications
//! read the newest one (`AccessService.GetAuditHead`); administrators keep
//! exported ones (`pivgatectl audit checkpoint`). A log checked against a
//! checkpoint seen earlier reveals truncation (the log ends before the
//! checkpoint's index) and rewriting (the record at the checkpoint's index
//! has another hash), as distinct findings.
//!
//! What this does not do: stop whoever holds the data folder (and with it
//! the signing key) from signing a rewritten log. Checkpoints held
//! elsewhere (an application's, an exported file) are what catch that.

use std::path::Path;

use aws_lc_rs::signature::{EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::store::AuditRecord;

/// The domain prefix of a checkpoint's signed bytes.
const DOMAIN: &[u8] = b"pivgate.v1 audit checkpoint\0";

/// A signed statement: "the audit log's record `index` has hash `hash`",
/// made at `unix_ms` by the key `public_key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Index of the newest record covered.
    pub index: u64,
    /// That record's hash (hex).
    pub hash: String,
    /// When it was signed, Unix ms.
    pub unix_ms: i64,
    /// The signing key (DER SubjectPublicKeyInfo, hex), P-256.
    pub public_key: String,
    /// ECDSA P-256 SHA-256 signature (DER, hex) over [`Checkpoint::signed_bytes`].
    pub signature: String,
}

impl Checkpoint {
    /// The bytes signed: domain, index, hash and time.
    pub fn signed_bytes(index: u64, hash: &str, unix_ms: i64) -> Vec<u8> {
        let mut m = DOMAIN.to_vec();
        m.extend_from_slice(&index.to_be_bytes());
        m.extend_from_slice(&(hash.len() as u32).to_be_bytes());
        m.extend_from_slice(hash.as_bytes());
        m.extend_from_slice(&unix_ms.to_be_bytes());
        m
    }

    /// Checks the signature, with `pinned` (hex SPKI) as the only key
    /// accepted when given.
    pub fn verify(&self, pinned: Option<&str>) -> std::result::Result<(), &'static str> {
        if pinned.is_some_and(|k| !k.eq_ignore_ascii_case(&self.public_key)) {
            return Err("the checkpoint is signed by another key than the one given");
        }
        let key = hex::decode(&self.public_key).map_err(|_| "the checkpoint's key is not hex")?;
        let sig = hex::decode(&self.signature).map_err(|_| "the checkpoint's signature is not hex")?;
        // aws-lc-rs takes the DER SubjectPublicKeyInfo as it is.
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &key)
            .verify(&Self::signed_bytes(self.index, &self.hash, self.unix_ms), &sig)
            .map_err(|_| "the checkpoint's signature does not verify")
    }

    /// SHA-256 of the signing key, to name it.
    pub fn key_fingerprint(&self) -> String {
        hex::encode(Sha256::digest(hex::decode(&self.public_key).unwrap_or_default()))
    }
}

/// Checks an ECDSA P-256 SHA-256 signature (DER, hex) by the key
/// `spki_hex` over `message`.
pub fn verify_bytes(spki_hex: &str, message: &[u8], signature_hex: &str) -> std::result::Result<(), &'static str> {
    let key = hex::decode(spki_hex).map_err(|_| "the key is not hex")?;
    let sig = hex::decode(signature_hex).map_err(|_| "the signature is not hex")?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &key).verify(message, &sig).map_err(|_| "the signature does not verify")
}

/// The gateway's checkpoint signing key.
pub struct CheckpointKey {
    pair: EcdsaKeyPair,
    spki_hex: String,
}

impl CheckpointKey {
    /// The key file in `data_dir`.
    pub fn path(data_dir: &Path) -> std::path::PathBuf {
        data_dir.join("audit-signing-key.pem")
    }

    /// Loads the key from the data folder, generating it (written durably)
    /// the first time.
    pub fn load_or_create(data_dir: &Path) -> Result<CheckpointKey> {
        let path = Self::path(data_dir);
        let bad = |e: &dyn std::fmt::Display| Error::Pki(format!("{}: {e}", path.display()));
        let key = if path.exists() {
            let pem = std::fs::read_to_string(&path).map_err(|e| bad(&e))?;
            rcgen::KeyPair::from_pem(&pem).map_err(|e| bad(&e))?
        } else {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| bad(&e))?;
            crate::store::write_file_durably(&path, key.serialize_pem().as_bytes())?;
            key
        };
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &key.serialize_der()).map_err(|_| bad(&"not a P-256 PKCS#8 key"))?;
        Ok(CheckpointKey { pair, spki_hex: hex::encode(rcgen::PublicKeyData::subject_public_key_info(&key)) })
    }

    /// Loads the key from a folder holding a copy of a data folder's key
    /// files; never generates one.
    pub fn load(dir: &Path) -> Result<CheckpointKey> {
        if !Self::path(dir).exists() {
            return Err(Error::Pki(format!("{} is missing", Self::path(dir).display())));
        }
        Self::load_or_create(dir)
    }

    /// Signs `message` (which must start with its own domain prefix);
    /// the DER signature, hex.
    pub fn sign_bytes(&self, message: &[u8]) -> Result<String> {
        let sig = self.pair.sign(&aws_lc_rs::rand::SystemRandom::new(), message).map_err(|_| Error::Pki("could not sign".into()))?;
        Ok(hex::encode(sig.as_ref()))
    }

    /// The public key (hex SPKI).
    pub fn public_key(&self) -> &str {
        &self.spki_hex
    }

    /// Signs a checkpoint of the record `index` with `hash`.
    pub fn sign(&self, index: u64, hash: &str, unix_ms: i64) -> Result<Checkpoint> {
        let sig = self
            .pair
            .sign(&aws_lc_rs::rand::SystemRandom::new(), &Checkpoint::signed_bytes(index, hash, unix_ms))
            .map_err(|_| Error::Pki("could not sign an audit checkpoint".into()))?;
        Ok(Checkpoint { index, hash: hash.to_string(), unix_ms, public_key: self.spki_hex.clone(), signature: hex::encode(sig.as_ref()) })
    }
}

/// What a verification found. More than one can hold: a log can be both
/// rewritten and cut short.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Finding {
    /// The records disagree with each other from this index on (an index
    /// gap, a wrong link or a wrong hash).
    Broken {
        /// First bad index.
        at: u64,
    },
    /// The log ends before a checkpoint that was signed for it.
    Truncated {
        /// The last record present.
        log_ends_at: u64,
        /// The checkpoint's index.
        checkpoint_index: u64,
    },
    /// The record at a checkpoint's index is not the one signed: the log
    /// was rewritten at or before that index.
    Rewritten {
        /// The checkpoint's index.
        index: u64,
    },
    /// An event is not the one its audit record hashed.
    EventAltered {
        /// The event's sequence number.
        sequence: u64,
        /// The audit record that names it.
        record: u64,
    },
    /// A checkpoint's own signature does not verify (it proves nothing).
    BadCheckpoint {
        /// The checkpoint's index.
        index: u64,
        /// Why.
        why: &'static str,
    },
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Finding::Broken { at } => write!(f, "broken at record {at}: the chain is inconsistent from there on"),
            Finding::Truncated { log_ends_at, checkpoint_index } => {
                write!(f, "truncated: the log ends at record {log_ends_at}, but a signed checkpoint covers record {checkpoint_index}")
            }
            Finding::Rewritten { index } => write!(f, "rewritten: record {index} differs from the signed checkpoint of it"),
            Finding::EventAltered { sequence, record } => write!(f, "event {sequence} differs from the hash in audit record {record}"),
            Finding::BadCheckpoint { index, why } => write!(f, "checkpoint of record {index} rejected: {why}"),
        }
    }
}

/// Verifies records (oldest first, from index 1) against the chain and
/// against `checkpoints` (signatures checked, with `pinned_key` as the only
/// key accepted when given). Returns the number of records that chain
/// correctly and the findings (none: intact).
pub fn verify(records: impl Iterator<Item = Result<AuditRecord>>, checkpoints: &[Checkpoint], pinned_key: Option<&str>) -> (u64, Vec<Finding>) {
    let mut findings = Vec::new();
    // By index, so each record is checked against its checkpoints in
    // constant time however many there are.
    let mut good: std::collections::BTreeMap<u64, Vec<&Checkpoint>> = std::collections::BTreeMap::new();
    for c in checkpoints {
        match c.verify(pinned_key) {
            Ok(()) => good.entry(c.index).or_default().push(c),
            Err(why) => findings.push(Finding::BadCheckpoint { index: c.index, why }),
        }
    }
    let mut prev = "0".repeat(64);
    let mut n = 0u64;
    let mut last = 0u64;
    let mut broken = false;
    for (i, rec) in records.enumerate() {
        let expected = i as u64 + 1;
        let Ok(rec) = rec else {
            if !broken {
                findings.push(Finding::Broken { at: expected });
            }
            break;
        };
        last = rec.index;
        if !broken && (rec.index != expected || rec.prev_hash != prev || rec.compute_hash() != rec.hash) {
            findings.push(Finding::Broken { at: expected });
            broken = true;
        }
        if !broken {
            n += 1;
        }
        if good.get(&rec.index).is_some_and(|cs| cs.iter().any(|c| c.hash != rec.hash)) {
            findings.push(Finding::Rewritten { index: rec.index });
        }
        prev = rec.hash;
    }
    for &index in good.keys().filter(|&&i| i > last) {
        findings.push(Finding::Truncated { log_ends_at: last, checkpoint_index: index });
    }
    findings.dedup();
    (n, findings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut prev = "0".repeat(64);
        (1..=n)
            .map(|i| {
                let mut r = AuditRecord {
                    index: i,
                    unix_ms: i as i64,
                    kind: "admin.add_operator".into(),
                    actor: "admin:first".into(),
                    terminal_id: String::new(),
                    detail: serde_json::json!({ "operator": format!("op-{i}") }),
                    prev_hash: prev.clone(),
                    hash: String::new(),
                };
                r.hash = r.compute_hash();
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    fn rechain(records: &mut [AuditRecord]) {
        let mut prev = "0".repeat(64);
        for r in records {
            r.prev_hash = prev;
            r.hash = r.compute_hash();
            prev = r.hash.clone();
        }
    }

    #[test]
    fn truncation_and_rewriting_are_told_apart() {
        let dir = std::env::temp_dir().join(format!("pivgate-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = CheckpointKey::load_or_create(&dir).unwrap();
        // The same key comes back from the file.
        assert_eq!(CheckpointKey::load_or_create(&dir).unwrap().public_key(), key.public_key());
        let log = chain(10);
        let cp = key.sign(8, &log[7].hash, 1).unwrap();
        let ok = |v: Vec<AuditRecord>| verify(v.into_iter().map(Ok), std::slice::from_ref(&cp), Some(key.public_key()));
        assert_eq!(ok(log.clone()), (10, vec![]));

        // The last three records deleted.
        assert_eq!(ok(log[..7].to_vec()).1, vec![Finding::Truncated { log_ends_at: 7, checkpoint_index: 8 }]);

        // Record 3 rewritten and every hash after it recomputed: the chain
        // is consistent, the checkpoint is not.
        let mut rewritten = log.clone();
        rewritten[2].actor = "admin:nobody".into();
        rechain(&mut rewritten);
        assert_eq!(ok(rewritten.clone()), (10, vec![Finding::Rewritten { index: 8 }]));

        // Rewritten only after the checkpoint: not detectable by it.
        let mut late = log.clone();
        late[9].actor = "x".into();
        rechain(&mut late);
        assert!(ok(late).1.is_empty());

        // Rewritten without recomputing: broken there (the later records
        // still chain to its old hash, so the checkpoint still matches).
        let mut broken = log.clone();
        broken[4].actor = "x".into();
        assert_eq!(ok(broken).1, vec![Finding::Broken { at: 5 }]);

        // A forged checkpoint proves nothing.
        let mut forged = cp.clone();
        forged.index = 9;
        let (_, f) = verify(log.clone().into_iter().map(Ok), &[forged], None);
        assert!(matches!(f[..], [Finding::BadCheckpoint { index: 9, .. }]), "{f:?}");
        // A genuine checkpoint from another key than the pinned one.
        std::fs::create_dir_all(dir.join("other")).unwrap();
        let stranger = CheckpointKey::load_or_create(&dir.join("other")).unwrap().sign(8, &log[7].hash, 1).unwrap();
        let (_, f) = verify(log.into_iter().map(Ok), &[stranger], Some(key.public_key()));
        assert!(matches!(f[..], [Finding::BadCheckpoint { index: 8, .. }]), "{f:?}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
