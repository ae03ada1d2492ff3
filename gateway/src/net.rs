//! Small HTTP pieces over hyper: fetching CRLs (bounded in time and size)
//! and serving Prometheus metrics.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Largest CRL accepted (a large federal CRL is a few MB).
pub const MAX_CRL_BYTES: usize = 32 << 20;

/// Fetches `url` (http://, or https:// verified against `tls`; CRLs are
/// signed and conventionally served over plain HTTP) within `timeout`,
/// refusing bodies over `limit` bytes.
pub async fn fetch(url: &str, timeout: Duration, limit: usize, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Vec<u8>, String> {
    tokio::time::timeout(timeout, fetch_inner(url, limit, tls)).await.map_err(|_| format!("{url}: timed out after {timeout:?}"))?
}

async fn fetch_inner(url: &str, limit: usize, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Vec<u8>, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(format!("{url}: only http:// and https:// CRL locations are fetched")),
    };
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?.to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("{url}: {e}"))?;
    let (mut sender, driver) = if https {
        let cfg = tls.ok_or_else(|| format!("{url}: no TLS roots configured for https:// CRL locations"))?;
        let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| format!("{url}: {e}"))?;
        let stream = tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp).await.map_err(|e| format!("{url}: TLS: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| format!("{url}: {e}"))?;
        (sender, tokio::spawn(async move { conn.await.map_err(|e| e.to_string()) }))
    } else {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| format!("{url}: {e}"))?;
        (sender, tokio::spawn(async move { conn.await.map_err(|e| e.to_string()) }))
    };
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = Request::get(path).header("host", host).body(Full::<Bytes>::new(Bytes::new())).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        driver.abort();
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), limit).collect().await.map_err(|e| format!("{url}: {e}"))?;
    driver.abort();
    Ok(body.to_bytes().to_vec())
}

/// Serves `render()` as text/plain on every request to `addr`, until the
/// task is aborted.
pub async fn serve_metrics(listener: tokio::net::TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let render = render.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                let text = render();
                async move {
                    Ok::<_, Infallible>(
                        Response::builder().header("content-type", "text/plain; version=0.0.4").body(Full::new(Bytes::from(text))).unwrap_or_default(),
                    )
                }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

/// Where metrics are served, if configured.
pub type MetricsAddr = Option<SocketAddr>;
