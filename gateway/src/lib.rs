//! The pivgate gateway: issues challenges, verifies every card signature,
//! certificate path, revocation state and enrolment itself, keeps terminal
//! sessions and the hash-chained audit log in sled, and streams lock and
//! unlock events over gRPC with mutual TLS.
//!
//! - [`core`]: the decisions (authentication, sessions, administration).
//! - [`verify`]: card certificates and signatures; [`challenge`]: challenges.
//! - [`store`]: sled, group commit with fdatasync, audit chain, event log.
//! - [`service`]: the gRPC services and the role check; [`tls`]: mutual TLS;
//!   [`pki`]: the service CA and roles; [`config`]: the TOML file.
//!
//! It never takes an agent's word for an identity, never mixes the card
//! issuers' PKI with the service PKI, and acknowledges nothing that is not
//! durable.
#![forbid(unsafe_code)]

pub mod challenge;
pub mod client;
pub mod config;
pub mod core;
pub mod error;
pub mod model;
pub mod pki;
pub mod service;
pub mod store;
pub mod tls;
pub mod verify;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pivgate_proto::v1 as pb;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use sha2::Digest;
use tokio::net::TcpListener;

pub use crate::config::Config;
pub use crate::core::Gateway;
pub use crate::error::{Error, Result};

/// Reads a PEM or DER file of certificates or CRLs into DER blobs.
fn read_der_or_pem(path: &std::path::Path, label: &str) -> Result<Vec<Vec<u8>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    if bytes.starts_with(b"-----BEGIN") {
        let text = String::from_utf8_lossy(&bytes);
        let mut out = Vec::new();
        for block in text.split("-----BEGIN ").skip(1) {
            let (head, rest) = block.split_once("-----").unwrap_or_default();
            if !head.contains(label) {
                continue;
            }
            let pem = format!("-----BEGIN {head}-----{rest}");
            let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            out.push(p.contents);
        }
        Ok(out)
    } else {
        Ok(vec![bytes])
    }
}

/// Loads the CRL files named in the configuration.
pub fn load_crls(config: &Config) -> Result<Vec<verify::LoadedCrl>> {
    let mut out = Vec::new();
    for path in &config.cards.crl_files {
        for der in read_der_or_pem(path, "X509 CRL")? {
            out.push(
                verify::LoadedCrl::from_der(&der, path.display().to_string())
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?,
            );
        }
    }
    Ok(out)
}

/// Opens everything a gateway needs from its configuration: the service
/// PKI (generated on first start), the database, card trust and CRLs.
pub fn open(config: &Config) -> Result<(Arc<Gateway>, Arc<rustls::ServerConfig>, bool)> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    names.push(config.listen.ip().to_string());
    names.extend(config.server_names.iter().cloned());
    names.dedup();
    let created = pki::bootstrap(&config.data_dir, &names)?;
    let files = pki::Files::in_dir(&config.data_dir);
    let tls_config = tls::server_config(&files)?;
    let server_der = CertificateDer::pem_file_iter(&files.server)
        .map_err(|e| Error::Tls(e.to_string()))?
        .next()
        .ok_or_else(|| Error::Tls("no server certificate".into()))?
        .map_err(|e| Error::Tls(e.to_string()))?;
    let gateway_id = sha2::Sha256::digest(server_der.as_ref()).to_vec();
    let mut anchors = Vec::new();
    for p in &config.cards.trust_anchors {
        anchors.extend(read_der_or_pem(p, "CERTIFICATE")?);
    }
    let trust = verify::CardTrust::new(&anchors, config.card_policy()).map_err(Error::Config)?;
    trust.set_crls(load_crls(config)?);
    let store = store::Store::open(&config.data_dir.join("db"))?;
    let gateway = Gateway {
        store,
        trust,
        challenges: challenge::Challenges::new(Duration::from_secs(config.challenge_ttl_s), 100_000, gateway_id),
        clock: Box::new(core::SystemClock),
        presence: Default::default(),
        counters: Default::default(),
        agent_grace: Duration::from_secs(config.agent_grace_s),
        data_dir: config.data_dir.clone(),
    };
    Ok((Arc::new(gateway), tls_config, created))
}

/// Serves the gateway on `listener` until `shutdown` completes; in-flight
/// requests finish first. Background work (sweeps, CRL reloads) stops with
/// it.
pub async fn run(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    tls_config: Arc<rustls::ServerConfig>,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let gw = gateway.clone();
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            if let Err(e) = gw.sweep().await {
                tracing::warn!(error = %e, "sweep failed");
            }
        }
    });
    let gw = gateway.clone();
    let crl_config = config.clone();
    let crl_reloader = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(crl_config.cards.crl_refresh_s));
        tick.tick().await;
        loop {
            tick.tick().await;
            match load_crls(&crl_config) {
                Ok(c) => gw.trust.set_crls(c),
                Err(e) => tracing::warn!(error = %e, "CRL reload failed; keeping the previous CRLs"),
            }
        }
    });
    let gw = gateway.clone();
    let limiter = Arc::new(std::sync::Mutex::new((0u32, SystemTime::UNIX_EPOCH)));
    let on_reject: tls::OnReject = Arc::new(move |peer: SocketAddr, why: String| {
        gw.counters.tls_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(%peer, reason = %why, "TLS handshake refused");
        // Audit refused handshakes, at most 60 a minute: an unauthenticated
        // peer must not be able to flood the audit log.
        let now = SystemTime::now();
        let allowed = limiter
            .lock()
            .map(|mut l| {
                if now.duration_since(l.1).unwrap_or_default() > Duration::from_secs(60) {
                    *l = (0, now);
                }
                l.0 += 1;
                l.0 <= 60
            })
            .unwrap_or(false);
        if allowed {
            let gw = gw.clone();
            tokio::spawn(async move {
                let entry = store::AuditEntry {
                    kind: "tls.refused",
                    actor: format!("peer:{peer}"),
                    terminal_id: String::new(),
                    detail: serde_json::json!({ "reason": why }),
                };
                if let Err(e) = gw.commit(entry, vec![]).await {
                    tracing::warn!(error = %e, "could not audit a refused handshake");
                }
            });
        }
    });
    let (incoming, acceptor) = tls::incoming(listener, tls_config, on_reject);
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<pb::agent_service_server::AgentServiceServer<service::AgentApi>>().await;
    health_reporter.set_serving::<pb::access_service_server::AccessServiceServer<service::AccessApi>>().await;
    health_reporter.set_serving::<pb::admin_service_server::AdminServiceServer<service::AdminApi>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pivgate_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| Error::Config(format!("reflection: {e}")))?;
    let result = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection)
        .add_service(pb::agent_service_server::AgentServiceServer::new(service::AgentApi(gateway.clone())))
        .add_service(pb::access_service_server::AccessServiceServer::new(service::AccessApi(gateway.clone())))
        .add_service(pb::admin_service_server::AdminServiceServer::new(service::AdminApi(gateway.clone())))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    sweeper.abort();
    crl_reloader.abort();
    acceptor.abort();
    gateway.store.sync()?;
    result.map_err(|e| Error::Tls(e.to_string()))
}
