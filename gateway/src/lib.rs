//! The pivgate gateway: issues challenges, verifies every card signature,
//! certificate path, revocation state and enrolment itself, keeps terminal
//! sessions and the hash-chained audit log in sled, and streams lock and
//! unlock events over gRPC with mutual TLS.
//!
//! - [`core`]: the decisions (authentication, sessions, administration).
//! - [`verify`]: card certificates and signatures; [`crl`]: CRL intake;
//!   [`challenge`]: challenges.
//! - [`store`]: sled, group commit with fdatasync, audit chain, event log.
//! - [`metrics`]: the counters and their Prometheus text.
//! - [`service`]: the gRPC services and the role check; [`tls`]: mutual TLS;
//!   [`pki`]: the service CA and roles; [`config`]: the TOML file.
//!
//! It never takes an agent's word for an identity, never mixes the card
//! issuers' PKI with the service PKI, and acknowledges nothing that is not
//! durable.
#![forbid(unsafe_code)]

pub mod attest;
pub mod audit;
mod authorize;
pub mod backup;
pub mod break_glass;
pub mod challenge;
pub mod client;
pub mod config;
pub mod core;
pub mod crl;
pub mod error;
pub mod feed;
pub mod lifecycle;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod net;
pub mod pki;
pub mod policy;
pub mod review;
pub mod service;
pub mod station;
pub mod step_up;
pub mod store;
pub mod throttle;
pub mod tls;
pub mod verify;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pivgate_proto::v1 as pb;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use sha2::Digest;
use tokio::net::TcpListener;

pub use crate::config::Config;
pub use crate::core::Gateway;
pub use crate::error::{Error, Result};

/// The rustls client configuration for https:// CRL locations, if any are
/// configured.
fn crl_tls(config: &Config) -> Result<Option<Arc<rustls::ClientConfig>>> {
    if !config.cards.crl_urls.iter().any(|u| u.starts_with("https://")) {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    // A bundle may hold certificates rustls cannot use; skip those.
    for c in CertificateDer::pem_file_iter(&config.cards.crl_tls_roots).map_err(|e| Error::Config(format!("cards.crl_tls_roots: {e}")))?.flatten() {
        let _ = roots.add(c);
    }
    let cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(Arc::new(cfg)))
}

/// Raises this process's soft open-file limit to its hard limit (as Go and
/// nginx do) and returns the soft limit in force: the connection cap stays
/// below it, so accepting never fails for want of a descriptor.
pub fn raise_open_file_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let r = getrlimit(Resource::Nofile);
    if r.current != r.maximum {
        let _ = setrlimit(Resource::Nofile, rustix::process::Rlimit { current: r.maximum, maximum: r.maximum });
    }
    getrlimit(Resource::Nofile).current.unwrap_or(1 << 20)
}

/// Opens everything a gateway needs from its configuration: the service
/// PKI (generated on first start), the database, card trust and CRLs; on
/// the system's clock and CSPRNG.
pub fn open(config: &Config) -> Result<(Arc<Gateway>, Arc<rustls::ServerConfig>, bool)> {
    open_with(config, Box::new(core::SystemClock), Box::new(core::SystemRandomness))
}

/// [`open`] on the given clock and randomness (tests drive time by hand).
pub fn open_with(config: &Config, clock: Box<dyn core::Clock>, random: Box<dyn core::Randomness>) -> Result<(Arc<Gateway>, Arc<rustls::ServerConfig>, bool)> {
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
    let gateway_id: [u8; 32] = sha2::Sha256::digest(server_der.as_ref()).into();
    let mut anchors = Vec::new();
    for (paths, identity) in
        [(&config.cards.trust_anchors, verify::IdentityRule::Fips201), (&config.cards.enrolled_key_anchors, verify::IdentityRule::EnrolledKey)]
    {
        for p in paths {
            anchors.extend(crl::read_der_or_pem(p, "CERTIFICATE")?.into_iter().map(|der| verify::Anchor { der, identity }));
        }
    }
    let mut intermediates = Vec::new();
    for p in &config.cards.intermediates {
        intermediates.extend(crl::read_der_or_pem(p, "CERTIFICATE")?);
    }
    let trust = verify::CardTrust::new(&anchors, &intermediates, config.card_policy()).map_err(|e| Error::Config(format!("cards: {e}")))?;
    let store = store::Store::open(&config.data_dir.join("db"))?;
    store.open_bootstrap_if_new()?;
    // The database's folder name, durable, before the first start counts
    // as complete.
    std::fs::File::open(&config.data_dir)?.sync_all()?;
    pki::mark_initialized(&config.data_dir)?;
    if !audit::CheckpointKey::path(&config.data_dir).exists() && store.latest_checkpoint()?.is_some() {
        return Err(Error::Pki(format!(
            "{} is missing but the audit log has signed checkpoints: restore the key from the backup of the data folder \
             (a new key would leave every earlier checkpoint unverifiable)",
            audit::CheckpointKey::path(&config.data_dir).display()
        )));
    }
    let mut roots = Vec::new();
    for p in &config.cards.attestation_roots {
        roots.extend(crl::read_der_or_pem(p, "CERTIFICATE")?);
    }
    let attestation = attest::AttestationTrust::new(&roots).map_err(|e| Error::Config(format!("cards: {e}")))?;
    let gateway = Gateway {
        store,
        trust,
        attestation,
        require_attested_pin_key: config.cards.require_attested_pin_key,
        max_temporary_days: config.cards.max_temporary_days,
        lifecycle: config.lifecycle.clone(),
        applications: config.applications.clone(),
        clocks: Default::default(),
        step_ups: Default::default(),
        throttle: Default::default(),
        challenges: challenge::Challenges::new(Duration::from_secs(config.challenge_ttl_s), 100_000, gateway_id),
        clock,
        random,
        presence: Default::default(),
        no_pin_entry: Default::default(),
        counters: Default::default(),
        crl_intake: Default::default(),
        limits: config.limits.clone(),
        verdict_cache: Default::default(),
        checkpoint_key: audit::CheckpointKey::load_or_create(&config.data_dir)?,
        backup_running: Default::default(),
        audit_budget: std::sync::Mutex::new(limits::AuditBudget::new(config.limits.audit_burst, config.limits.audit_per_minute)),
        watchers: Default::default(),
        presence_streams: Default::default(),
        agent_grace: Duration::from_secs(config.agent_grace_s),
        data_dir: config.data_dir.clone(),
        stopping: tokio::sync::watch::channel(false).0,
    };
    gateway.clocks.started_ms.store(gateway.now_ms(), std::sync::atomic::Ordering::Relaxed);
    // Agents holding terminals open are watched for silence from the
    // start, whether or not they ever reconnect.
    if let Ok(mut p) = gateway.presence.lock() {
        for t in gateway.store.terminals()? {
            if let model::Session::Unlocked { agent, .. } = t.session {
                p.insert(agent, gateway.clock.instant());
            }
        }
    }
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
    let checkpoint_s = config.audit_checkpoint_s;
    let sweeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        for n in 0u64.. {
            tick.tick().await;
            if let Err(e) = gw.sweep().await {
                tracing::warn!(error = %e, "sweep failed");
            }
            // Certificates reach notAfter on their own: re-check live
            // sessions every two seconds.
            if n % 4 == 3 {
                if let Err(e) = gw.reauthorize_sessions("gateway").await {
                    tracing::warn!(error = %e, "session re-check failed");
                }
            }
            if (n + 1) % (checkpoint_s * 2) == 0 {
                if let Err(e) = gw.sign_checkpoint().await {
                    tracing::warn!(error = %e, "could not sign an audit checkpoint");
                }
            }
            if (n + 1) % (gw.limits.audit_summary_s * 2) == 0 {
                if let Err(e) = gw.summarise_suppressed().await {
                    tracing::warn!(error = %e, "could not write the summary of suppressed audit records");
                }
            }
        }
    });
    // CRLs before serving, then on schedule.
    let tls = crl_tls(&config)?;
    if let Err(e) = gateway.offer_crls(crl::fetch_all(&config, tls.as_ref()).await).await {
        tracing::error!(error = %e, "CRL intake failed at start; retrying on schedule");
    }
    let gw = gateway.clone();
    let crl_config = config.clone();
    let crl_reloader = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(crl_config.cards.crl_refresh_s));
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = gw.offer_crls(crl::fetch_all(&crl_config, tls.as_ref()).await).await {
                tracing::warn!(error = %e, "CRL refresh failed");
            }
        }
    });
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr).await.map_err(|e| Error::Config(format!("metrics_listen {addr}: {e}")))?;
            let gw = gateway.clone();
            Some(tokio::spawn(net::serve_metrics(listener, Arc::new(move || metrics::render(&gw)))))
        }
        None => None,
    };
    let gw = gateway.clone();
    let on_reject: tls::OnReject = Arc::new(move |peer: SocketAddr, why: String| {
        gw.counters.tls_rejected.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(%peer, reason = %why, "TLS handshake refused");
        // Unauthenticated peers share one audit budget: they cannot flood
        // the audit log, and what they cost is summarised.
        let gw = gw.clone();
        tokio::spawn(async move {
            let entry = store::AuditEntry {
                kind: crate::model::AuditKind::TlsRefused,
                actor: format!("peer:{peer}"),
                terminal_id: String::new(),
                detail: serde_json::json!({ "reason": why.chars().take(limits::TEXT_MAX).collect::<String>() }),
            };
            if let Err(e) = gw.audit_refusal("unauthenticated", entry).await {
                tracing::warn!(error = %e, "could not audit a refused handshake");
            }
        });
    });
    let l = &config.limits;
    let open_files = raise_open_file_limit();
    let accept = tls::AcceptLimits {
        max_connections: l.max_connections.min(open_files.saturating_sub(64) as usize).max(16),
        max_handshakes: l.max_handshakes,
        max_per_address: l.max_handshakes_per_address,
        handshake_timeout: Duration::from_secs(l.handshake_timeout_s),
        max_per_identity: l.max_connections_per_caller,
    };
    tracing::info!(max_connections = accept.max_connections, open_files, "connection limits");
    let (incoming, acceptor) = tls::incoming(listener, tls_config, accept, on_reject);
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<pb::agent_service_server::AgentServiceServer<service::AgentApi>>().await;
    health_reporter.set_serving::<pb::access_service_server::AccessServiceServer<service::AccessApi>>().await;
    health_reporter.set_serving::<pb::admin_service_server::AdminServiceServer<service::AdminApi>>().await;
    // sled's blob files are never fsynced: the store keeps every value far
    // below the threshold, and a blob file found means that promise broke.
    // Checked at start and every two seconds: alarm in the log, the metric
    // and health (NOT_SERVING).
    let blob_watch = {
        let (gw, reporter) = (gateway.clone(), health_reporter.clone());
        tokio::spawn(async move {
            let mut alarmed = false;
            loop {
                let n = gw.store.blob_files();
                if n > 0 && !alarmed {
                    alarmed = true;
                    tracing::error!(files = n, dir = %gw.store.path().join("blobs").display(), "sled wrote blob files, which it never makes durable: acknowledged writes may not survive a power cut; see ARCHITECTURE.md (Durability)");
                    reporter.set_not_serving::<pb::agent_service_server::AgentServiceServer<service::AgentApi>>().await;
                    reporter.set_not_serving::<pb::access_service_server::AccessServiceServer<service::AccessApi>>().await;
                    reporter.set_not_serving::<pb::admin_service_server::AdminServiceServer<service::AdminApi>>().await;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pivgate_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // Both reflection versions: grpcurl and Python's grpcio-reflection
    // still ask for v1alpha.
    let reflection_v1 = reflection().build_v1().map_err(|e| Error::Config(format!("reflection: {e}")))?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(|e| Error::Config(format!("reflection: {e}")))?;
    let max = limits::MESSAGE_MAX;
    let result = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(l.max_streams_per_connection))
        .http2_max_pending_accept_reset_streams(Some(16))
        .http2_max_header_list_size(Some(16 * 1024))
        .http2_keepalive_interval(Some(Duration::from_secs(l.keepalive_s)))
        .http2_keepalive_timeout(Some(Duration::from_secs(l.keepalive_timeout_s)))
        .timeout(Duration::from_secs(l.call_timeout_s))
        .add_service(health.max_decoding_message_size(max))
        .add_service(reflection_v1.max_decoding_message_size(max))
        .add_service(reflection_v1alpha.max_decoding_message_size(max))
        .add_service(pb::agent_service_server::AgentServiceServer::new(service::AgentApi(gateway.clone())).max_decoding_message_size(max))
        .add_service(pb::access_service_server::AccessServiceServer::new(service::AccessApi(gateway.clone())).max_decoding_message_size(max))
        .add_service(pb::admin_service_server::AdminServiceServer::new(service::AdminApi(gateway.clone())).max_decoding_message_size(max))
        .serve_with_incoming_shutdown(incoming, {
            let gw = gateway.clone();
            let mut fatal = gateway.store.fatal();
            async move {
                // Stop when asked, or when the disk refuses to keep writes.
                tokio::select! {
                    _ = shutdown => {}
                    _ = fatal.wait_for(|f| f.is_some()) => {}
                }
                let _ = gw.stopping.send(true);
            }
        })
        .await;
    if let Some(e) = gateway.store.fatal().borrow().clone() {
        sweeper.abort();
        crl_reloader.abort();
        acceptor.abort();
        blob_watch.abort();
        if let Some(m) = &metrics {
            m.abort();
        }
        return Err(Error::Durability(std::io::Error::other(format!("writes can no longer be made durable ({e}); stopped"))));
    }
    sweeper.abort();
    crl_reloader.abort();
    acceptor.abort();
    blob_watch.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    // The head as it is at shutdown, signed: a later truncation is visible.
    if let Err(e) = gateway.sign_checkpoint().await {
        tracing::warn!(error = %e, "could not sign the audit checkpoint at shutdown");
    }
    gateway.store.sync()?;
    result.map_err(|e| Error::Tls(e.to_string()))
}
