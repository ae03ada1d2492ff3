//! Backups: a consistent copy of the database as of one point in the audit
//! sequence, as a file that `pivgate-gateway restore` turns back into a
//! data folder.
//!
//! The file is JSON lines:
//! 1. a header ([`Header`]): format, when, the audit head (index and hash)
//!    and event sequence it was cut at, the signing key;
//! 2. every entry of every tree ([`Entry`]: tree, key and value in hex):
//!    first the state (operators, cards, agents, terminals, deny list, CRL
//!    watermarks, checkpoints, meta), copied while no record could be
//!    written, then the cached CRL files in pieces, then the audit log up
//!    to the head and the events up to the sequence (append-only, so read
//!    after the cut);
//! 3. a trailer ([`Trailer`]): SHA-256 of every byte before it, signed
//!    with the gateway's audit-signing key.
//!
//! It holds no private key: the service CA, server, first administrator
//! and audit-signing keys are copied once from the data folder and kept
//! apart (ARCHITECTURE.md, Backups). A restore needs both, checks the
//! signature with the key it is given, rebuilds the database in a staging
//! folder, verifies its audit chain and checkpoints, and only then moves
//! anything into place. A file that was altered, cut short or signed by
//! another gateway is refused, and the target folder is left as it was.

use std::io::{BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The format's name and version, in the header.
pub const FORMAT: &str = "pivgate-backup";
/// This gateway writes and reads version 1.
pub const VERSION: u32 = 1;
/// The domain prefix of what the trailer's signature covers.
pub const DOMAIN: &[u8] = b"pivgate.v1 backup\0";
/// The longest line a restore reads (a value is at most 64 KiB, twice
/// that in hex).
pub const LINE_MAX: usize = 256 * 1024;

/// The pseudo-tree of the CRL cache's files, in pieces.
pub const CRL_TREE: &str = "crl-cache";
/// The size of one piece of a cached CRL.
pub const CRL_PIECE: usize = 48 * 1024;

/// The key of piece `i` of the cached CRL file `name`.
pub fn crl_piece_key(name: &str, i: u32) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&i.to_be_bytes());
    k
}

/// A cached CRL's file name as the gateway writes them.
fn crl_file_name(name: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(name).ok()?;
    let ok = s.len() <= 200 && s.ends_with(".crl") && !s.starts_with('.') && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    ok.then_some(s)
}

/// The files of a data folder a restore needs beside the backup: they do
/// not change after the first start.
pub const KEY_FILES: [&str; 7] =
    ["service-ca.pem", "service-ca-key.pem", "gateway.pem", "gateway-key.pem", "admin.pem", "admin-key.pem", "audit-signing-key.pem"];

/// The first line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// When the cut was taken, Unix ms.
    pub created_unix_ms: i64,
    /// The newest audit record in the backup.
    pub audit_index: u64,
    /// Its hash.
    pub audit_hash: String,
    /// The newest event in the backup.
    pub event_sequence: u64,
    /// The audit-signing key (hex SPKI) that signs the trailer.
    pub signing_key: String,
}

/// One entry of one tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Tree name.
    pub tree: String,
    /// Key, hex.
    pub key: String,
    /// Value, hex.
    pub value: String,
}

/// The last line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trailer {
    /// SHA-256 of every byte before this line, hex.
    pub sha256: String,
    /// ECDSA P-256 signature (DER, hex) over [`DOMAIN`] and that digest.
    pub signature: String,
}

/// What a backup holds, as told by its header and counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The header.
    pub header: Header,
    /// Entries in all.
    pub entries: u64,
}

/// Writes a backup: header, entries, trailer, hashing as it goes.
pub struct Writer<W: Write> {
    out: W,
    hash: Sha256,
    entries: u64,
}

impl<W: Write> Writer<W> {
    /// Starts a backup with its header.
    pub fn new(out: W, header: &Header) -> Result<Writer<W>> {
        let mut w = Writer { out, hash: Sha256::new(), entries: 0 };
        w.line(&serde_json::to_vec(header).map_err(|e| Error::Corrupt(e.to_string()))?)?;
        Ok(w)
    }

    fn line(&mut self, json: &[u8]) -> Result<()> {
        self.hash.update(json);
        self.hash.update(b"\n");
        self.out.write_all(json)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }

    /// One entry.
    pub fn entry(&mut self, tree: &str, key: &[u8], value: &[u8]) -> Result<()> {
        let e = Entry { tree: tree.to_string(), key: hex::encode(key), value: hex::encode(value) };
        self.entries += 1;
        self.line(&serde_json::to_vec(&e).map_err(|e| Error::Corrupt(e.to_string()))?)
    }

    /// Signs and writes the trailer; returns the output and the count of
    /// entries.
    pub fn finish(mut self, key: &crate::audit::CheckpointKey) -> Result<(W, u64)> {
        let digest: [u8; 32] = self.hash.clone().finalize().into();
        let signature = key.sign_bytes(&signed_bytes(&digest))?;
        let t = Trailer { sha256: hex::encode(digest), signature };
        let json = serde_json::to_vec(&t).map_err(|e| Error::Corrupt(e.to_string()))?;
        self.out.write_all(&json)?;
        self.out.write_all(b"\n")?;
        self.out.flush()?;
        Ok((self.out, self.entries))
    }

    /// The output so far (to send what was written).
    pub fn output(&mut self) -> &mut W {
        &mut self.out
    }
}

fn signed_bytes(digest: &[u8; 32]) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    m.extend_from_slice(digest);
    m
}

fn bad(why: impl std::fmt::Display) -> Error {
    Error::Backup(why.to_string())
}

/// Reads one line of at most [`LINE_MAX`] bytes (without its newline);
/// `None` at the end.
fn read_line(input: &mut impl BufRead, buf: &mut Vec<u8>) -> Result<Option<()>> {
    buf.clear();
    let n = std::io::Read::take(&mut *input, LINE_MAX as u64 + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(bad(if buf.len() > LINE_MAX { "a line is longer than any backup writes" } else { "the file ends in the middle of a line (cut short?)" }));
    }
    buf.pop();
    Ok(Some(()))
}

/// Reads a backup, handing every entry to `entry` in order, and checks
/// that it is whole and signed by `signing_key` (hex SPKI). Nothing read
/// may be kept unless this returns `Ok`.
pub fn read(input: &mut impl BufRead, signing_key: &str, mut entry: impl FnMut(&Header, &str, Vec<u8>, Vec<u8>) -> Result<()>) -> Result<Summary> {
    let mut hash = Sha256::new();
    let mut buf = Vec::new();
    read_line(input, &mut buf)?.ok_or_else(|| bad("the file is empty"))?;
    let header: Header = serde_json::from_slice(&buf).map_err(|e| bad(format!("not a pivgate backup (header: {e})")))?;
    if header.format != FORMAT || header.version != VERSION {
        return Err(bad(format!("format {} version {}: this gateway reads {FORMAT} version {VERSION}", header.format, header.version)));
    }
    if !header.signing_key.eq_ignore_ascii_case(signing_key) {
        return Err(bad("the backup was signed by another gateway's audit-signing key than the one in the key folder"));
    }
    hash.update(&buf);
    hash.update(b"\n");
    let mut entries = 0;
    loop {
        read_line(input, &mut buf)?.ok_or_else(|| bad("the file has no trailer (cut short?)"))?;
        if let Ok(t) = serde_json::from_slice::<Trailer>(&buf) {
            let digest: [u8; 32] = hash.finalize().into();
            if !t.sha256.eq_ignore_ascii_case(&hex::encode(digest)) {
                return Err(bad("the file was altered: its contents do not match the digest it was signed with"));
            }
            crate::audit::verify_bytes(signing_key, &signed_bytes(&digest), &t.signature)
                .map_err(|e| bad(format!("the file was altered or not signed by this gateway: {e}")))?;
            if read_line(input, &mut buf)?.is_some() {
                return Err(bad("the file goes on after its trailer"));
            }
            return Ok(Summary { header, entries });
        }
        let e: Entry = serde_json::from_slice(&buf).map_err(|e| bad(format!("line {}: not an entry ({e})", entries + 2)))?;
        hash.update(&buf);
        hash.update(b"\n");
        let key = hex::decode(&e.key).map_err(|_| bad(format!("line {}: key is not hex", entries + 2)))?;
        let value = hex::decode(&e.value).map_err(|_| bad(format!("line {}: value is not hex", entries + 2)))?;
        entries += 1;
        entry(&header, &e.tree, key, value)?;
    }
}

/// Restores a backup into `data_dir` (which must not exist),
/// with the key files from `keys` (a copy of a data folder's, see
/// [`KEY_FILES`]). The whole data folder is built in a staging folder
/// beside `data_dir`: the database from the backup, verified (its chain,
/// checkpoints and events, and that it ends where the header says), the
/// key files and the `initialized` marker, all fsynced; only then is it
/// renamed to `data_dir`. A kill or power cut at any moment leaves either
/// no restored folder or a whole one; a refused backup leaves nothing.
pub fn restore(file: &Path, keys: &Path, data_dir: &Path) -> Result<Summary> {
    if data_dir.exists() {
        return Err(bad(format!("{} exists: restore into a new folder (it is created whole at the end)", data_dir.display())));
    }
    for f in KEY_FILES {
        if !keys.join(f).exists() {
            return Err(bad(format!("{} is missing from the key folder {}", f, keys.display())));
        }
    }
    let key = crate::audit::CheckpointKey::load(keys)?;
    let open = || -> Result<std::io::BufReader<std::fs::File>> {
        Ok(std::io::BufReader::new(std::fs::File::open(file).map_err(|e| bad(format!("{}: {e}", file.display())))?))
    };
    // First the whole file's signature, in constant memory, before
    // anything is written; the second pass checks it again.
    read(&mut open()?, key.public_key(), |_, _, _, _| Ok(()))?;
    let name = data_dir.file_name().ok_or_else(|| bad(format!("{}: not a folder name", data_dir.display())))?;
    let parent = data_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let staging = parent.join(format!(".{}.restoring", name.to_string_lossy()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    crate::pki::create_dir_durably(&staging)?;
    let result = (|| {
        let db = staging.join("db");
        let crls = crate::crl::cache_dir(&staging);
        let mut crl_at: Option<(String, u32)> = None;
        let mut input = open()?;
        let summary = crate::store::Store::restore_staged(&db, |sink| {
            read(&mut input, key.public_key(), |h, tree, k, v| {
                if tree != CRL_TREE {
                    return sink(h, tree, k, v);
                }
                // A cached CRL, piece by piece, in order.
                let split = k.len().checked_sub(5).filter(|i| k[*i] == 0).ok_or_else(|| bad("a CRL piece with a bad key"))?;
                let name = crl_file_name(&k[..split]).ok_or_else(|| bad("a CRL piece with a bad file name"))?.to_string();
                let i = u32::from_be_bytes(k[split + 1..].try_into().map_err(|_| bad("a CRL piece with a bad key"))?);
                let expected = match &crl_at {
                    Some((n, last)) if *n == name => last + 1,
                    _ => 0,
                };
                if i != expected || v.len() > CRL_PIECE {
                    return Err(bad("CRL pieces out of order"));
                }
                std::fs::create_dir_all(&crls)?;
                let mut f = std::fs::OpenOptions::new().create(true).append(true).open(crls.join(&name))?;
                f.write_all(&v)?;
                crl_at = Some((name, i));
                Ok(())
            })
        })?;
        if crls.exists() {
            for e in std::fs::read_dir(&crls)? {
                std::fs::File::open(e?.path())?.sync_all()?;
            }
            std::fs::File::open(&crls)?.sync_all()?;
        }
        {
            // The rebuilt database, opened as the gateway will.
            let store = crate::store::Store::open(&db)?;
            let (records, findings) = store.verify_audit(Some(key.public_key()))?;
            if !findings.is_empty() {
                return Err(bad(format!("the restored audit log does not verify: {}", findings.iter().map(|f| f.to_string()).collect::<Vec<_>>().join("; "))));
            }
            let (index, hash) = store.audit_head()?;
            if index != summary.header.audit_index
                || records != index
                || hash != summary.header.audit_hash
                || store.last_sequence()? != summary.header.event_sequence
            {
                return Err(bad("the restored database does not end where the backup's header says"));
            }
            store.sync()?;
        }
        for f in KEY_FILES {
            crate::store::write_file_durably(&staging.join(f), &std::fs::read(keys.join(f))?)?;
        }
        crate::pki::mark_initialized(&staging)?;
        Ok(summary)
    })();
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    std::fs::rename(&staging, data_dir)?;
    std::fs::File::open(parent)?.sync_all()?;
    Ok(summary)
}
