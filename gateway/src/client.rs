//! Connecting to a gateway as a client (pivgatectl, tests, example
//! consoles): mutual TLS with a service certificate.

use std::path::Path;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Error, Result};

/// Client credentials: the service CA to trust and our certificate and key.
#[derive(Clone)]
pub struct Credentials {
    /// Service CA, PEM.
    pub ca_pem: String,
    /// Our certificate, PEM.
    pub cert_pem: String,
    /// Our key, PEM.
    pub key_pem: String,
}

impl Credentials {
    /// Reads the three PEM files.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Credentials> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Error::Config(format!("{}: {e}", p.display())));
        Ok(Credentials { ca_pem: read(ca)?, cert_pem: read(cert)?, key_pem: read(key)? })
    }

    /// The first administrator's credentials in a gateway data folder.
    pub fn admin_in(data_dir: &Path) -> Result<Credentials> {
        let f = crate::pki::Files::in_dir(data_dir);
        Credentials::from_files(&f.ca, &f.admin, &f.admin_key)
    }
}

/// Connects to `addr` (host:port) with mutual TLS; the server must present
/// a certificate for `server_name` from the service CA.
pub async fn connect(addr: &str, server_name: &str, creds: &Credentials) -> Result<Channel> {
    let tls = ClientTlsConfig::new()
        .domain_name(server_name)
        .ca_certificate(Certificate::from_pem(&creds.ca_pem))
        .identity(Identity::from_pem(&creds.cert_pem, &creds.key_pem));
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| Error::Config(format!("gateway address {addr}: {e}")))?
        .tls_config(tls)
        .map_err(|e| Error::Tls(e.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(30));
    endpoint.connect().await.map_err(|e| Error::Tls(format!("connecting to {addr}: {e}")))
}
