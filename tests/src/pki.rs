//! Card-issuer PKI for scenarios: roots that may sign intermediates,
//! intermediates, and CRLs with every knob an attacker or a real issuer
//! turns (issuer name, key, dates, number, issuing distribution point).
//! Everything comes from rcgen, so any test can make it again.

use anyhow::Result;
use pivgate_vcard::IssuingCa;
use time::OffsetDateTime;

fn ca_params(name: &str, not_before: OffsetDateTime, not_after: OffsetDateTime, path_len: u8) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "pivgate virtual card issuer");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(path_len));
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign, rcgen::KeyUsagePurpose::DigitalSignature];
    params.not_before = not_before;
    params.not_after = not_after;
    // rcgen derives the serial number from the (new) key.
    params.use_authority_key_identifier_extension = true;
    params
}

/// A self-signed root that may sign one level of intermediates.
pub fn root(name: &str) -> Result<IssuingCa> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let now = OffsetDateTime::now_utc();
    let cert = ca_params(name, now - time::Duration::days(1), now + time::Duration::days(3650), 1).self_signed(&key)?;
    Ok(IssuingCa { cert_pem: cert.pem(), key_pem: zeroize::Zeroizing::new(key.serialize_pem()) })
}

/// An intermediate CA signed by `parent`, valid from `not_before` to
/// `not_after`.
pub fn intermediate(parent: &IssuingCa, name: &str, not_before: OffsetDateTime, not_after: OffsetDateTime) -> Result<IssuingCa> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&parent.cert_pem, rcgen::KeyPair::from_pem(&parent.key_pem)?)?;
    let cert = ca_params(name, not_before, not_after, 0).signed_by(&key, &issuer)?;
    Ok(IssuingCa { cert_pem: cert.pem(), key_pem: zeroize::Zeroizing::new(key.serialize_pem()) })
}

/// What a CRL says.
pub struct CrlSpec {
    /// Serial numbers (big-endian bytes) it revokes.
    pub revoked: Vec<Vec<u8>>,
    /// thisUpdate.
    pub this_update: OffsetDateTime,
    /// nextUpdate.
    pub next_update: OffsetDateTime,
    /// cRLNumber.
    pub number: u64,
    /// IssuingDistributionPoint URIs (empty and `scope` None: no IDP).
    pub idp_uris: Vec<String>,
    /// IssuingDistributionPoint scope.
    pub scope: Option<rcgen::CrlScope>,
}

impl CrlSpec {
    /// A CRL revoking `revoked`, issued a minute ago, valid a day.
    pub fn revoking(revoked: &[Vec<u8>], number: u64) -> CrlSpec {
        let now = OffsetDateTime::now_utc();
        CrlSpec {
            revoked: revoked.to_vec(),
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(1),
            number,
            idp_uris: vec![],
            scope: None,
        }
    }
}

/// A CRL (DER) signed by `ca`.
pub fn crl(ca: &IssuingCa, spec: &CrlSpec) -> Result<Vec<u8>> {
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert_pem, rcgen::KeyPair::from_pem(&ca.key_pem)?)?;
    let idp = (!spec.idp_uris.is_empty() || spec.scope.is_some())
        .then(|| rcgen::CrlIssuingDistributionPoint { distribution_point: rcgen::CrlDistributionPoint { uris: spec.idp_uris.clone() }, scope: spec.scope });
    let params = rcgen::CertificateRevocationListParams {
        this_update: spec.this_update,
        next_update: spec.next_update,
        crl_number: rcgen::SerialNumber::from(spec.number.to_be_bytes().to_vec()),
        issuing_distribution_point: idp,
        revoked_certs: spec
            .revoked
            .iter()
            .map(|s| rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(s),
                revocation_time: spec.this_update,
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    Ok(params.signed_by(&issuer)?.der().to_vec())
}

/// The serial number (big-endian bytes) of a DER certificate.
pub fn serial_of(der: &[u8]) -> Vec<u8> {
    let (_, c) = x509_parser::parse_x509_certificate(der).expect("certificate");
    c.tbs_certificate.raw_serial().to_vec()
}

/// The DER of a PEM certificate.
pub fn der_of(pem: &str) -> Vec<u8> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("PEM").1.contents
}

/// An HTTP (or HTTPS) server on loopback that answers every request with
/// the CRL it holds now; [`CrlServer::set`] changes it.
pub struct CrlServer {
    body: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// Host, port and path (see [`CrlServer::http_url`]).
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl CrlServer {
    /// Serves `body` over plain HTTP.
    pub async fn http(body: Vec<u8>) -> Result<CrlServer> {
        CrlServer::start(body, None).await
    }

    /// Serves `body` over HTTPS with a server certificate for 127.0.0.1
    /// from a new root; returns the server and the root's PEM.
    pub async fn https(body: Vec<u8>) -> Result<(CrlServer, String)> {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "test CRL server root");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?;
        let cert = params.signed_by(&key, &issuer)?;
        let server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der())),
            )?;
        Ok((CrlServer::start(body, Some(std::sync::Arc::new(server))).await?, ca_cert.pem()))
    }

    async fn start(body: Vec<u8>, tls: Option<std::sync::Arc<rustls::ServerConfig>>) -> Result<CrlServer> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = l.local_addr()?.port();
        let body = std::sync::Arc::new(std::sync::Mutex::new(body));
        let held = body.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let body = held.lock().map(|b| b.clone()).unwrap_or_default();
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        Some(cfg) => {
                            if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(s).await {
                                answer(s, &body).await;
                            }
                        }
                        None => answer(s, &body).await,
                    }
                });
            }
        });
        Ok(CrlServer { body, url: format!("127.0.0.1:{port}/issuer.crl"), task })
    }

    /// The URL for plain HTTP.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.url)
    }

    /// The URL for HTTPS.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.url)
    }

    /// Serves `body` from now on.
    pub fn set(&self, body: Vec<u8>) {
        if let Ok(mut b) = self.body.lock() {
            *b = body;
        }
    }
}

impl Drop for CrlServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, body: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 2048];
    let _ = s.read(&mut buf).await;
    let head = format!("HTTP/1.1 200 OK\r\ncontent-type: application/pkix-crl\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body).await;
    let _ = s.shutdown().await;
}
