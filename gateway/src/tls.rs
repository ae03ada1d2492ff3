//! Mutual TLS with rustls on every connection: the server certificate from
//! the data folder, client certificates required and verified against the
//! service CA (and nothing else), TLS 1.2 and 1.3 only, ALPN h2.
//!
//! Handshakes run on their own tasks with a time limit, so a slow or
//! hostile client holds up nobody; refused handshakes are reported to a
//! callback (the gateway audits them, rate-limited).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{Error, Result};
use crate::pki::Files;

fn tls(e: impl std::fmt::Display) -> Error {
    Error::Tls(e.to_string())
}

/// The crypto provider (aws-lc-rs).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The server's rustls configuration from the files in the data folder.
pub fn server_config(files: &Files) -> Result<Arc<ServerConfig>> {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&files.ca).map_err(tls)? {
        roots.add(c.map_err(tls)?).map_err(tls)?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider()).build().map_err(tls)?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(&files.server).map_err(tls)?.collect::<std::result::Result<_, _>>().map_err(tls)?;
    let key = PrivateKeyDer::from_pem_file(&files.server_key).map_err(tls)?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(tls)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A refused handshake: who tried and why.
pub type OnReject = Arc<dyn Fn(SocketAddr, String) + Send + Sync>;

/// Accepts TCP connections and completes TLS handshakes, yielding
/// established streams for tonic.
/// Also returns the accept task, to abort at shutdown.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    on_reject: OnReject,
) -> (ReceiverStream<std::io::Result<TlsStream<TcpStream>>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let acceptor = TlsAcceptor::from(config);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let task_tx = tx.clone();
            let on_reject = on_reject.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = task_tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => on_reject(peer, e.to_string()),
                    Err(_) => on_reject(peer, "handshake timed out".into()),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    (ReceiverStream::new(rx), task)
}
