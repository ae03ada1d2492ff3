//! CRL intake: reading the configured CRL files and locations, and the
//! decision whether each CRL may count.
//!
//! A CRL counts only after [`CardTrust::examine_crl`] has verified its
//! signature against a trust anchor or configured intermediate of its
//! issuer's name and its dates make sense, and only if it is not older than
//! the newest CRL ever accepted for the same issuer and issuing distribution
//! point (kept in the store, so a restart cannot roll back). Every refusal
//! is a log line, a metric and an audit record (once per source and CRL, so
//! a refresh loop does not repeat it), and the CRL held before stays in
//! force. Once a CRL changes what is in force, live sessions are re-checked
//! and those it revokes lock at once.
//!
//! What this module does not do: path validation and the revocation check
//! itself (`verify.rs`, through rustls-webpki).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::core::Gateway;
use crate::error::{Error, Result};
use crate::store::{AuditEntry, Change};
use crate::verify::{CardTrust, CrlRefusal};

/// What one source gave: its CRLs (DER), or why it could not be read.
pub type Fetched = (String, std::result::Result<Vec<Vec<u8>>, String>);

/// Counters and the memory of what was already reported, per source.
#[derive(Default)]
pub struct CrlIntake {
    /// Refusals by reason name.
    pub refused: Mutex<HashMap<&'static str, u64>>,
    /// Failed reads and fetches.
    pub failed_fetches: std::sync::atomic::AtomicU64,
    /// CRLs accepted (each newer CRL once).
    pub accepted: std::sync::atomic::AtomicU64,
    /// The last refusal audited per source (reason and CRL hash): the same
    /// refusal on every refresh is audited once.
    last_refusal: Mutex<HashMap<String, (&'static str, [u8; 32])>>,
}

/// What [`Gateway::offer_crls`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// CRLs that changed what is in force.
    pub installed: usize,
    /// CRLs refused, with source and reason.
    pub refused: Vec<(String, &'static str)>,
    /// Terminals locked because their session's certificate is no longer
    /// valid.
    pub locked: Vec<String>,
}

/// Reads a PEM or DER file of certificates or CRLs into DER blobs.
pub fn read_der_or_pem(path: &std::path::Path, label: &str) -> Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    if bytes.len() > crate::net::MAX_CRL_BYTES {
        return Err(Error::Config(format!("{}: larger than {} bytes", path.display(), crate::net::MAX_CRL_BYTES)));
    }
    if bytes.starts_with(b"-----BEGIN") {
        let text = String::from_utf8_lossy(&bytes);
        let mut out = Vec::new();
        for block in text.split("-----BEGIN ").skip(1) {
            let (head, rest) = block.split_once("-----").unwrap_or_default();
            if !head.contains(label) {
                continue;
            }
            let pem = format!("-----BEGIN {head}-----{rest}");
            let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            out.push(p.contents);
        }
        Ok(out)
    } else {
        Ok(vec![bytes])
    }
}

/// Where accepted CRLs are kept, one file per issuer and distribution
/// point: after a restart the newest accepted CRL is in force before any
/// source answers, and a source serving an older one cannot undo it.
pub fn cache_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("crl-cache")
}

/// The cached CRLs, to offer before the sources.
pub fn read_cache(data_dir: &std::path::Path) -> Vec<Fetched> {
    let Ok(entries) = std::fs::read_dir(cache_dir(data_dir)) else { return vec![] };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "crl") {
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            out.push((format!("cached:{name}"), read_der_or_pem(&path, "X509 CRL").map_err(|e| e.to_string())));
        }
    }
    out
}

/// The cached CRL files as they are (file name, bytes), for a backup.
pub fn cached(data_dir: &std::path::Path) -> Result<Vec<(String, Vec<u8>)>> {
    let dir = cache_dir(data_dir);
    if !dir.exists() {
        return Ok(vec![]);
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "crl") {
            if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                out.push((name.to_string(), std::fs::read(&path)?));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Reads the cached CRLs, then the configured CRL files, and fetches the
/// CRL locations.
pub async fn fetch_all(config: &Config, tls: Option<&std::sync::Arc<rustls::ClientConfig>>) -> Vec<Fetched> {
    let mut out: Vec<Fetched> = read_cache(&config.data_dir);
    for path in &config.cards.crl_files {
        out.push((path.display().to_string(), read_der_or_pem(path, "X509 CRL").map_err(|e| e.to_string())));
    }
    let timeout = Duration::from_secs(config.cards.crl_fetch_timeout_s);
    for url in &config.cards.crl_urls {
        out.push((url.clone(), crate::net::fetch(url, timeout, crate::net::MAX_CRL_BYTES, tls).await.map(|der| vec![der])));
    }
    out
}

impl Gateway {
    /// Offers what the CRL sources gave: each CRL is examined, checked
    /// against the newest accepted for its key (under the ledger lock, with
    /// the new watermark committed with a `crl.accepted` record), and put in
    /// force; refusals are reported. Then every live session is re-checked.
    pub async fn offer_crls(&self, fetched: Vec<Fetched>) -> Result<Report> {
        let mut report = Report::default();
        let now = self.clock.system();
        for (source, got) in fetched {
            let ders = match got {
                Ok(d) => d,
                Err(e) => {
                    self.crl_intake.failed_fetches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(source, error = %e, "CRL source not read; the CRL held before stays in force");
                    continue;
                }
            };
            for der in ders {
                let sha: [u8; 32] = Sha256::digest(&der).into();
                // One CRL that cannot be recorded does not stop the others.
                match self.accept_crl(&self.trust, &der, &source, now).await {
                    Ok(Ok(true)) => report.installed += 1,
                    Ok(Ok(false)) => {}
                    Ok(Err(refusal)) => {
                        if let Err(e) = self.refuse_crl(&source, &refusal, sha).await {
                            tracing::error!(source, error = %e, "could not audit a refused CRL");
                        }
                        report.refused.push((source.clone(), refusal.name()));
                    }
                    Err(e) => tracing::error!(source, error = %e, "could not record a CRL; the CRL held before stays in force"),
                }
            }
        }
        if report.installed > 0 {
            report.locked = self.reauthorize_sessions("gateway:crl").await?;
        }
        Ok(report)
    }

    /// Examines one CRL and, if it may count, records and installs it.
    /// `Ok(true)`: it changed what is in force.
    async fn accept_crl(&self, trust: &CardTrust, der: &[u8], source: &str, now: SystemTime) -> Result<std::result::Result<bool, CrlRefusal>> {
        let crl = match trust.examine_crl(der, source, now) {
            Ok(c) => c,
            Err(r) => return Ok(Err(r)),
        };
        let key = crl.key.id();
        let expired = crl.next_update.is_some_and(|n| n < now);
        let this_update_s = crl.this_update.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        let mut refusal = None;
        let detail = json!({
            "source": source,
            "crl_key": key,
            "this_update_s": this_update_s,
            "next_update_s": crl.next_update.and_then(|n| n.duration_since(SystemTime::UNIX_EPOCH).ok()).map(|d| d.as_secs()),
            "crl_number": crl.number,
            "revoked": crl.revoked,
            "sha256": hex::encode(crl.sha256),
        });
        // Kept on disk before its watermark is recorded: a power cut can
        // leave a cached CRL without a watermark (harmless, it is re-offered)
        // but never a watermark without its CRL.
        let watermark = self.store.crl_watermark(&key)?;
        if watermark.is_none() && expired {
            return Ok(Err(CrlRefusal::Expired));
        }
        let newer = watermark.is_none_or(|w| this_update_s > w);
        if newer {
            let dir = cache_dir(&self.data_dir);
            if !dir.exists() {
                std::fs::create_dir_all(&dir)?;
                std::fs::File::open(&self.data_dir)?.sync_all()?;
            }
            crate::store::write_file_durably(&dir.join(format!("{key}.crl")), der)?;
        }
        self.commit_with(|| {
            match self.store.crl_watermark(&key)? {
                None if expired => {
                    refusal = Some(CrlRefusal::Expired);
                    Ok(None)
                }
                Some(w) if this_update_s < w => {
                    refusal = Some(CrlRefusal::Rollback);
                    Ok(None)
                }
                // The same CRL again (or one issued the same second): in
                // force already, or again after a restart; nothing to record.
                Some(w) if this_update_s == w => Ok(None),
                _ => Ok(Some((
                    AuditEntry { kind: crate::model::AuditKind::CrlAccepted, actor: "gateway".into(), terminal_id: String::new(), detail: detail.clone() },
                    vec![Change::CrlWatermark { key: key.clone(), this_update_s }],
                ))),
            }
        })
        .await?;
        if let Some(r) = refusal {
            return Ok(Err(r));
        }
        match trust.install_crl(crl) {
            Ok(changed) => {
                if changed {
                    self.crl_intake.accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(source, crl_key = %key, this_update_s, "CRL in force");
                    if let Ok(mut m) = self.crl_intake.last_refusal.lock() {
                        m.remove(source);
                    }
                }
                Ok(Ok(changed))
            }
            Err(r) => Ok(Err(r)),
        }
    }

    async fn refuse_crl(&self, source: &str, refusal: &CrlRefusal, sha: [u8; 32]) -> Result<()> {
        if let Ok(mut m) = self.crl_intake.refused.lock() {
            *m.entry(refusal.name()).or_insert(0) += 1;
        }
        tracing::warn!(source, reason = refusal.name(), why = %refusal, "CRL refused; the CRL held before stays in force");
        let new =
            self.crl_intake.last_refusal.lock().map(|mut m| m.insert(source.to_string(), (refusal.name(), sha)) != Some((refusal.name(), sha))).unwrap_or(true);
        if new {
            self.commit(
                AuditEntry {
                    kind: crate::model::AuditKind::CrlRefused,
                    actor: "gateway".into(),
                    terminal_id: String::new(),
                    detail: json!({ "source": source, "reason": refusal.name(), "why": refusal.to_string(), "sha256": hex::encode(sha) }),
                },
                vec![],
            )
            .await?;
        }
        Ok(())
    }
}
