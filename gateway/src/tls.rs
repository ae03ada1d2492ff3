//! Mutual TLS with rustls on every connection: the server certificate from
//! the data folder, client certificates required and verified against the
//! service CA (and nothing else), TLS 1.2 and 1.3 only, ALPN h2.
//!
//! Handshakes run on their own tasks with a time limit and under caps (see
//! [`incoming`]), so slow, idle or hostile clients hold up nobody; refused
//! handshakes are reported to a callback (the gateway audits them within a
//! budget).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::task::AbortHandle;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
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
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.server).map_err(tls)?.collect::<std::result::Result<_, _>>().map_err(tls)?;
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

/// What connections may cost before anyone is authenticated.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// Most open connections, handshaking or established.
    pub max_connections: usize,
    /// Most handshakes in flight.
    pub max_handshakes: usize,
    /// Most handshakes in flight from one address.
    pub max_per_address: usize,
    /// Time a client has to finish its handshake.
    pub handshake_timeout: Duration,
    /// Most established connections of one client identity (one
    /// certificate's role and name).
    pub max_per_identity: usize,
}

/// A handshake in flight.
struct Pending {
    addr: IpAddr,
    handle: Option<AbortHandle>,
    /// The peer has sent something (a legitimate client sends its
    /// ClientHello at once; an idle connection never does).
    spoke: bool,
}

/// Connections counted under one lock.
#[derive(Default)]
struct Gate {
    /// Handshaking plus established.
    open: usize,
    /// Handshakes in flight, oldest first: the peer's address, the handle
    /// that ends the handshake, and whether the peer has sent anything yet.
    pending: BTreeMap<u64, Pending>,
    per_address: HashMap<IpAddr, usize>,
    /// Established connections by client identity.
    per_identity: HashMap<String, usize>,
    next: u64,
}

impl Gate {
    /// Forgets handshake `id` if it is still pending; returns whether it was.
    fn forget(&mut self, id: u64) -> Option<Option<AbortHandle>> {
        let p = self.pending.remove(&id)?;
        if let Some(n) = self.per_address.get_mut(&p.addr) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&p.addr);
            }
        }
        Some(p.handle)
    }

    /// Ends a pending handshake (from `addr`, if given): the oldest of
    /// those whose peer has sent nothing yet, else the oldest.
    fn evict_oldest(&mut self, addr: Option<IpAddr>) -> bool {
        let from = |p: &Pending| addr.is_none_or(|a| p.addr == a);
        let id = self.pending.iter().find(|(_, p)| from(p) && !p.spoke).or_else(|| self.pending.iter().find(|(_, p)| from(p))).map(|(id, _)| *id);
        let Some(handle) = id.and_then(|id| self.forget(id)) else { return false };
        if let Some(h) = handle {
            h.abort();
        }
        self.open -= 1;
        true
    }
}

/// Releases a pending handshake's place when its task ends, however.
struct PendingGuard {
    gate: Arc<Mutex<Gate>>,
    id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        if let Ok(mut g) = self.gate.lock() {
            if g.forget(self.id).is_some() {
                g.open -= 1;
            }
        }
    }
}

/// An established connection, counted until it closes.
pub struct Counted {
    inner: TlsStream<TcpStream>,
    gate: Arc<Mutex<Gate>>,
    identity: String,
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Ok(mut g) = self.gate.lock() {
            g.open = g.open.saturating_sub(1);
            if let Some(n) = g.per_identity.get_mut(&self.identity) {
                *n -= 1;
                if *n == 0 {
                    g.per_identity.remove(&self.identity);
                }
            }
        }
    }
}

/// The source a handshake is counted against: the IPv4 address, or the
/// IPv6 /64 (one host can hold a whole /64).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// The client identity (`role:name`) of an established connection.
fn identity(stream: &TlsStream<TcpStream>) -> String {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|c| crate::pki::caller_from_cert(c.as_ref()))
        .map(|c| c.to_string())
        .unwrap_or_default()
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for Counted {
    // The same connection information as the TLS stream itself, so
    // `Request::peer_certs` finds the client certificate.
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts TCP connections and completes TLS handshakes, yielding
/// established streams for tonic; also returns the accept task, to abort at
/// shutdown.
///
/// Before anyone is authenticated a connection costs a descriptor and a
/// task, so: at most `max_connections` open, at most `max_handshakes` (and
/// `max_per_address` from one address) handshaking, each for at most
/// `handshake_timeout`. A new connection past a handshake cap ends a
/// waiting handshake rather than being refused (the oldest whose peer has
/// sent nothing, else the oldest), so idle connections cannot keep a
/// legitimate client out: the newcomer who speaks at once is through in
/// milliseconds, and is evicted only after every silent connection.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: AcceptLimits,
    on_reject: OnReject,
) -> (ReceiverStream<std::io::Result<Counted>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let gate = Arc::new(Mutex::new(Gate::default()));
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
            let addr = source(peer.ip());
            let id = {
                let Ok(mut g) = gate.lock() else { return };
                if g.per_address.get(&addr).copied().unwrap_or(0) >= limits.max_per_address {
                    g.evict_oldest(Some(addr));
                }
                if g.pending.len() >= limits.max_handshakes {
                    g.evict_oldest(None);
                }
                if g.open >= limits.max_connections && !g.evict_oldest(None) {
                    // Every place is an authenticated connection: refuse.
                    drop(g);
                    drop(tcp);
                    on_reject(peer, "connection limit reached".into());
                    continue;
                }
                let id = g.next;
                g.next += 1;
                g.open += 1;
                g.pending.insert(id, Pending { addr, handle: None, spoke: false });
                *g.per_address.entry(addr).or_insert(0) += 1;
                id
            };
            let _ = tcp.set_nodelay(true);
            let config = config.clone();
            let task_tx = tx.clone();
            let on_reject = on_reject.clone();
            let guard = PendingGuard { gate: gate.clone(), id };
            let handle = tokio::spawn(async move {
                let guard = guard;
                let handshake = async {
                    // Once the peer has sent a whole ClientHello, its
                    // handshake is evicted only after every one that has
                    // not (a byte and a stall does not count).
                    let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
                    if let Ok(mut g) = guard.gate.lock() {
                        if let Some(p) = g.pending.get_mut(&guard.id) {
                            p.spoke = true;
                        }
                    }
                    start.into_stream(config).await
                };
                match tokio::time::timeout(limits.handshake_timeout, handshake).await {
                    Ok(Ok(stream)) => {
                        // Still ours, or evicted meanwhile? And within its
                        // identity's share, so one certificate cannot hold
                        // every connection?
                        let who = identity(&stream);
                        let admitted = guard
                            .gate
                            .lock()
                            .map(|mut g| {
                                if g.forget(guard.id).is_none() {
                                    return Err("evicted");
                                }
                                let n = g.per_identity.entry(who.clone()).or_insert(0);
                                if *n >= limits.max_per_identity {
                                    g.open -= 1;
                                    return Err("too many connections for this client identity");
                                }
                                *n += 1;
                                Ok(())
                            })
                            .map_err(|_| ());
                        match admitted {
                            Ok(Ok(())) => {
                                let counted = Counted { inner: stream, gate: guard.gate.clone(), identity: who };
                                let _ = task_tx.send(Ok(counted)).await;
                            }
                            Ok(Err("evicted")) => {}
                            Ok(Err(why)) => on_reject(peer, format!("{why} ({who})")),
                            Err(_) => {}
                        }
                    }
                    Ok(Err(e)) => on_reject(peer, e.to_string()),
                    Err(_) => on_reject(peer, "handshake timed out".into()),
                }
            });
            if let Ok(mut g) = gate.lock() {
                if let Some(entry) = g.pending.get_mut(&id) {
                    entry.handle = Some(handle.abort_handle());
                }
            }
            if tx.is_closed() {
                return;
            }
        }
    });
    (ReceiverStream::new(rx), task)
}
