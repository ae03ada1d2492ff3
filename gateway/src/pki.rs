//! The site's service PKI: the service CA that issues the gateway's server
//! certificate and the client certificates of agents, applications and
//! administrators. (Card issuers are a separate PKI: see `verify.rs`.)
//!
//! A client's role and name live in its certificate as a subject
//! alternative name URI `urn:pivgate:ROLE:NAME`, ROLE one of `agent`,
//! `application`, `admin`. Only the service CA issues them, and the TLS
//! layer accepts only certificates that chain to it.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::error::{Error, Result};

/// What a client certificate lets its holder do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// An agent on a Pi: the Agent API, for its bound terminals.
    Agent,
    /// An application: the Access API.
    Application,
    /// An administrator: the Admin and Access APIs.
    Admin,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Application => "application",
            Role::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "agent" => Role::Agent,
            "application" => Role::Application,
            "admin" => Role::Admin,
            _ => return None,
        })
    }
}

/// A verified caller: role and name from its client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Caller {
    /// Role.
    pub role: Role,
    /// Name.
    pub name: String,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role.as_str(), self.name)
    }
}

/// Reads the role URI from a (TLS-verified) client certificate.
pub fn caller_from_cert(der: &[u8]) -> Option<Caller> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => {
            let rest = u.strip_prefix("urn:pivgate:")?;
            let (role, name) = rest.split_once(':')?;
            // Names are identifiers (bounded, printable): they reach the
            // audit log as actors.
            if !crate::limits::is_identifier(name) {
                return None;
            }
            Some(Caller { role: Role::parse(role)?, name: name.to_string() })
        }
        _ => None,
    })
}

/// The name of the first administrator, made at first start.
pub const FIRST_ADMIN: &str = "admin";

/// Names of the files in the data folder.
pub struct Files {
    /// Service CA certificate.
    pub ca: PathBuf,
    /// Service CA key.
    pub ca_key: PathBuf,
    /// Gateway server certificate.
    pub server: PathBuf,
    /// Gateway server key.
    pub server_key: PathBuf,
    /// First administrator's certificate.
    pub admin: PathBuf,
    /// First administrator's key.
    pub admin_key: PathBuf,
}

impl Files {
    /// The files in `dir`.
    pub fn in_dir(dir: &Path) -> Files {
        Files {
            ca: dir.join("service-ca.pem"),
            ca_key: dir.join("service-ca-key.pem"),
            server: dir.join("gateway.pem"),
            server_key: dir.join("gateway-key.pem"),
            admin: dir.join("admin.pem"),
            admin_key: dir.join("admin-key.pem"),
        }
    }
}

/// The service CA, able to issue certificates.
pub struct ServiceCa {
    /// CA certificate, PEM.
    pub cert_pem: String,
    key_pem: String,
}

fn pki(e: impl fmt::Display) -> Error {
    Error::Pki(e.to_string())
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

fn serial() -> Result<rcgen::SerialNumber> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| Error::Pki("no randomness".into()))?;
    b[0] &= 0x7F;
    Ok(rcgen::SerialNumber::from_slice(&b))
}

fn write_file(path: &Path, data: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(if secret { 0o600 } else { 0o644 }).open(path)?;
    f.write_all(data.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

impl ServiceCa {
    /// Generates a new service CA.
    pub fn generate(site: &str) -> Result<ServiceCa> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(pki)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, format!("pivgate service CA ({site})"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, 365 * 10);
        params.serial_number = Some(serial()?);
        let cert = params.self_signed(&key).map_err(pki)?;
        Ok(ServiceCa { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Loads the CA from its files.
    pub fn load(files: &Files) -> Result<ServiceCa> {
        Ok(ServiceCa { cert_pem: std::fs::read_to_string(&files.ca)?, key_pem: std::fs::read_to_string(&files.ca_key)? })
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>> {
        let key = KeyPair::from_pem(&self.key_pem).map_err(pki)?;
        Issuer::from_ca_cert_pem(&self.cert_pem, key).map_err(pki)
    }

    /// Issues the gateway's server certificate for `names` (DNS names or IP
    /// addresses). Returns (certificate PEM, key PEM).
    pub fn issue_server(&self, names: &[String]) -> Result<(String, String)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(pki)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "pivgate gateway");
        for n in names {
            params.subject_alt_names.push(match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.as_str().try_into().map_err(pki)?),
            });
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        validity(&mut params, 365 * 2);
        params.serial_number = Some(serial()?);
        let cert = params.signed_by(&key, &self.issuer()?).map_err(pki)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues a client certificate for `role`/`name` over a public key
    /// (DER SubjectPublicKeyInfo).
    pub fn issue_client(&self, role: Role, name: &str, spki_der: &[u8], days: u32) -> Result<String> {
        check_request(name, spki_der)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, format!("{} {name}", role.as_str()));
        params.subject_alt_names.push(SanType::URI(format!("urn:pivgate:{}:{name}", role.as_str()).try_into().map_err(pki)?));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut params, i64::from(if days == 0 { 365 } else { days.min(3650) }));
        params.serial_number = Some(serial()?);
        let spki = rcgen::SubjectPublicKeyInfo::from_der(spki_der).map_err(|e| Error::InvalidRequest(format!("public key: {e}")))?;
        let cert = params.signed_by(&spki, &self.issuer()?).map_err(pki)?;
        Ok(cert.pem())
    }

    /// Generates a key and issues a client certificate for it. Returns
    /// (certificate PEM, key PEM).
    pub fn issue_client_with_key(&self, role: Role, name: &str, days: u32) -> Result<(String, String)> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(pki)?;
        let cert = self.issue_client(role, name, &key.subject_public_key_info(), days)?;
        Ok((cert, key.serialize_pem()))
    }
}

/// A service name (1 to 128 of A-Z a-z 0-9 - _ . @) and a public key
/// (DER SubjectPublicKeyInfo) a certificate can be issued for.
pub fn check_request(name: &str, spki_der: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) {
        return Err(Error::InvalidRequest("a service name is 1 to 128 of A-Z a-z 0-9 - _ . @".into()));
    }
    rcgen::SubjectPublicKeyInfo::from_der(spki_der).map_err(|e| Error::InvalidRequest(format!("public key: {e}")))?;
    Ok(())
}

/// The file whose presence says a data folder's first start completed:
/// PKI and database made and durable. Written by [`mark_initialized`].
pub fn marker(dir: &Path) -> PathBuf {
    dir.join("initialized")
}

/// Creates the service CA, server certificate and first administrator in
/// `dir` on first start, so that a kill or a power cut at any moment
/// leaves either nothing usable (the next start makes it again) or the
/// whole PKI, never a mix. Returns whether anything was created.
///
/// Each file is written under a temporary name and fsynced; all but the CA
/// certificate are renamed into place and the folder fsynced; the CA
/// certificate, renamed last and fsynced, is the commit point. A folder
/// that holds part of a PKI without that is an interrupted first start and
/// is made again; one whose first start completed (`initialized`) but that
/// lacks a file is refused with what to do, never papered over.
pub fn bootstrap(dir: &Path, server_names: &[String]) -> Result<bool> {
    let files = Files::in_dir(dir);
    let installed = marker(dir).exists();
    if installed && !dir.join("db").exists() {
        return Err(Error::Pki(format!(
            "the data folder {} is an installed gateway's but its database ({}) is missing: restore it from the backup \
             (starting on an empty database would lose every enrolment and the audit log)",
            dir.display(),
            dir.join("db").display()
        )));
    }
    let all = [&files.ca, &files.ca_key, &files.server, &files.server_key, &files.admin, &files.admin_key];
    if files.ca.exists() {
        for f in [&files.ca_key, &files.admin, &files.admin_key] {
            if !f.exists() {
                return Err(Error::Pki(format!(
                    "{} is missing from the data folder {}, whose service CA exists: restore it from the backup of the data folder \
                     (do not delete the folder: its database holds the audit log)",
                    f.display(),
                    dir.display()
                )));
            }
        }
        if !files.server.exists() || !files.server_key.exists() {
            // The server certificate can always be issued again.
            let ca = ServiceCa::load(&files)?;
            let (cert, key) = ca.issue_server(server_names)?;
            crate::store::write_file_durably(&files.server_key, key.as_bytes())?;
            crate::store::write_file_durably(&files.server, cert.as_bytes())?;
            return Ok(true);
        }
        return Ok(false);
    }
    if installed {
        return Err(Error::Pki(format!(
            "{} is missing from the data folder {}, whose first start completed: restore the service CA from the backup \
             (a new CA would lock out every agent, application and administrator)",
            files.ca.display(),
            dir.display()
        )));
    }
    if dir.join("db").exists() {
        return Err(Error::Pki(format!(
            "the data folder {} has a database but no service CA ({}): restore the CA from the backup, \
             or move the folder away to start a new installation",
            dir.display(),
            files.ca.display()
        )));
    }
    // A fresh folder, or one a first start left unfinished: make it all.
    create_dir_durably(dir)?;
    for f in all {
        if f.exists() {
            std::fs::remove_file(f)?;
        }
    }
    let ca = ServiceCa::generate(&hostname())?;
    let (server_cert, server_key) = ca.issue_server(server_names)?;
    let (admin_cert, admin_key) = ca.issue_client_with_key(Role::Admin, FIRST_ADMIN, 365)?;
    let staged = |path: &Path| path.with_file_name(format!(".{}.new", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let parts: [(&PathBuf, &str); 6] = [
        (&files.ca_key, &ca.key_pem),
        (&files.server_key, &server_key),
        (&files.server, &server_cert),
        (&files.admin_key, &admin_key),
        (&files.admin, &admin_cert),
        (&files.ca, &ca.cert_pem),
    ];
    for (path, pem) in parts {
        write_file(&staged(path), pem, path.to_string_lossy().ends_with("-key.pem"))?;
    }
    // Everything but the CA certificate, then the folder; then the CA
    // certificate, the commit point, and the folder again.
    for (path, _) in &parts[..5] {
        std::fs::rename(staged(path), path)?;
    }
    std::fs::File::open(dir)?.sync_all()?;
    std::fs::rename(staged(&files.ca), &files.ca)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(true)
}

/// Records that the first start completed (PKI and database made and
/// durable): from then on a missing part is refused, not made again.
pub fn mark_initialized(dir: &Path) -> Result<()> {
    if !marker(dir).exists() {
        crate::store::write_file_durably(&marker(dir), b"pivgate data folder: first start completed\n")?;
    }
    Ok(())
}

/// Creates `dir` and any missing parents so that every new name survives
/// a power cut: each new folder's parent is fsynced after it is made.
pub(crate) fn create_dir_durably(dir: &Path) -> Result<()> {
    if dir.exists() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_durably(parent)?;
        std::fs::create_dir(dir)?;
        std::fs::File::open(parent)?.sync_all()?;
    } else {
        std::fs::create_dir(dir)?;
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "pivgate".into())
}
