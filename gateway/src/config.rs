//! The gateway's configuration: a TOML file, validated at start with
//! errors that name the field. Every field has a default, so a gateway with
//! no file runs on its data folder alone.
//!
//! ```toml
//! data_dir = "/var/lib/pivgate"
//! listen = "0.0.0.0:7443"
//! metrics_listen = "127.0.0.1:9464"
//! server_names = ["gateway.site.example"]
//! challenge_ttl_s = 30
//! agent_grace_s = 30
//!
//! [cards]
//! trust_anchors = ["/etc/pivgate/card-issuer-ca.pem"]
//! enrolled_key_anchors = ["/etc/pivgate/corporate-smartcard-ca.pem"]
//! intermediates = ["/etc/pivgate/card-issuing-sub-ca.pem"]
//! crl_files = ["/var/lib/pivgate/issuer.crl"]
//! crl_urls = ["http://crl.issuer.example/issuer.crl"]
//! crl_tls_roots = "/etc/ssl/certs/ca-certificates.crt"
//! crl_refresh_s = 300
//! crl_future_skew_s = 300
//! crl_strict = true
//! max_crl_age_s = 86400
//! require_crl = false
//! eku_9a = []
//! eku_9e = ["2.16.840.1.101.3.6.8"]
//! policies_9a = ["2.16.840.1.101.3.2.1.3.13"]
//! policies_9e = ["2.16.840.1.101.3.2.1.3.17"]
//! attestation_roots = ["/etc/pivgate/yubico-piv-attestation-ca.pem"]
//! require_attested_pin_key = true
//!
//! [lifecycle]
//! privileged_roles = ["intercom-admin"]
//! approval = "badge"
//! enrolment_window_max_s = 900
//! request_ttl_h = 72
//! lockout_after = 10
//! free_failures = 3
//! max_delay_s = 300
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::Slot;
use crate::verify::CardPolicy;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Database, PKI files and generated material.
    pub data_dir: PathBuf,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus metrics listen address (none: off).
    pub metrics_listen: Option<SocketAddr>,
    /// Extra names for the server certificate (DNS names or IPs).
    pub server_names: Vec<String>,
    /// Challenge lifetime, seconds (1 to 30).
    pub challenge_ttl_s: u64,
    /// How long an agent may be silent before its terminals lock.
    pub agent_grace_s: u64,
    /// How often the audit log's head is signed while it grows, seconds
    /// (and always at shutdown).
    pub audit_checkpoint_s: u64,
    /// Card trust and revocation.
    pub cards: CardsConfig,
    /// What callers may cost the gateway.
    pub limits: LimitsConfig,
    /// Enrolment, approvals and the other processes around cards.
    pub lifecycle: LifecycleConfig,
    /// Which terminals each application may act on (ask step-ups of,
    /// report activity for), by its certificate name. Empty: every
    /// application acts on every terminal. Once one is listed, an
    /// application not listed acts on none.
    pub applications: std::collections::BTreeMap<String, ApplicationScope>,
}

/// The terminals one application may act on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApplicationScope {
    /// Terminal ids.
    pub terminals: Vec<String>,
    /// Terminal groups: every terminal in one.
    pub groups: Vec<String>,
}

/// How a second administrator proves an approval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApprovalProof {
    /// Their administrator certificate (mutual TLS); their badge may sign
    /// too, and is recorded when it does.
    #[default]
    Certificate,
    /// Their certificate and their own enrolled card (card and PIN), so a
    /// stolen administrator certificate alone approves nothing.
    Badge,
}

/// Enrolment, approvals and the other processes around cards.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// Roles whose holders' cards take effect only once a second
    /// administrator approves them (intercom administration, say). Marking
    /// a role takes effect at once: unapproved cards of its holders are
    /// refused until approved.
    pub privileged_roles: Vec<String>,
    /// How approvals are proven.
    pub approval: ApprovalProof,
    /// The longest an enrolment window may stay open, seconds (60 to 3600).
    pub enrolment_window_max_s: u64,
    /// How long a request waits for its approval, hours (1 to 720).
    pub request_ttl_h: u64,
    /// Consecutive failed proofs or wrong PINs after which an operator is
    /// locked out until an administrator lifts it (1 to 100).
    pub lockout_after: u32,
    /// Failures in a row (per card, operator or terminal) before delays
    /// start (0 to 10).
    pub free_failures: u32,
    /// The longest a break-glass grant holds, hours (1 to 72).
    pub break_glass_max_h: u32,
    /// What using a break-glass grant needs: `temporary-card` (a card
    /// enrolled for the grant, with its PIN) or `approver-present` (the
    /// approving administrator's own badge, card and PIN, tapped at the
    /// terminal).
    pub break_glass_proof: crate::model::BreakGlassProof,
    /// The longest delay after failures, seconds (1 to 3600); a terminal's
    /// own delay is at most 30 s, so one attacker cannot keep a console
    /// from its operators.
    pub max_delay_s: u64,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            privileged_roles: vec![],
            approval: ApprovalProof::Certificate,
            enrolment_window_max_s: 900,
            request_ttl_h: 72,
            lockout_after: 10,
            free_failures: 3,
            max_delay_s: 300,
            break_glass_max_h: 8,
            break_glass_proof: crate::model::BreakGlassProof::TemporaryCard,
        }
    }
}

/// What callers may cost the gateway: connections, handshakes, streams,
/// time, and audit records of refusals. Field limits of each request are
/// fixed, in `limits.rs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Most open connections (handshaking or established). The gateway
    /// also stays 64 below its open-file limit.
    pub max_connections: usize,
    /// Most TLS handshakes in flight; a new connection past it closes the
    /// oldest handshake still waiting.
    pub max_handshakes: usize,
    /// Most TLS handshakes in flight from one address.
    pub max_handshakes_per_address: usize,
    /// Most established connections of one client identity (certificate).
    pub max_connections_per_caller: usize,
    /// Time a client has to complete its TLS handshake, seconds.
    pub handshake_timeout_s: u64,
    /// Most concurrent HTTP/2 streams (calls) on one connection.
    pub max_streams_per_connection: u32,
    /// Time limit for one unary call, seconds.
    pub call_timeout_s: u64,
    /// HTTP/2 keepalive ping interval, seconds; a peer that does not answer
    /// within `keepalive_timeout_s` is disconnected.
    pub keepalive_s: u64,
    /// See `keepalive_s`.
    pub keepalive_timeout_s: u64,
    /// Most event watchers in all.
    pub max_watchers: usize,
    /// Most event watchers per application or administrator identity.
    pub max_watchers_per_caller: usize,
    /// Audit records of refusals (denied authentications, refused calls,
    /// refused handshakes) one caller may cause at once...
    pub audit_burst: u32,
    /// ... and per minute after that. Past it, refusals are still refused
    /// and counted, and summarised in one record per `audit_summary_s`.
    pub audit_per_minute: u32,
    /// Interval of the summary of suppressed records, seconds.
    pub audit_summary_s: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 4096,
            max_handshakes: 256,
            max_handshakes_per_address: 64,
            max_connections_per_caller: 64,
            handshake_timeout_s: 5,
            max_streams_per_connection: 64,
            call_timeout_s: 30,
            keepalive_s: 30,
            keepalive_timeout_s: 10,
            max_watchers: 4096,
            max_watchers_per_caller: 16,
            audit_burst: 60,
            audit_per_minute: 60,
            audit_summary_s: 60,
        }
    }
}

/// Card issuers, CRLs and certificate policy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CardsConfig {
    /// PEM files of the FIPS 201 card issuers the site trusts: a card is
    /// the card UUID (and FASC-N) its certificate names.
    pub trust_anchors: Vec<PathBuf>,
    /// PEM files of the card issuers whose cards are known by the key
    /// enrolled for them (YubiKeys and Java Card tokens the site's IT
    /// provisioned, AD CS smart-card logon certificates: no card UUID in
    /// the certificate, often no CHUID on the card).
    pub enrolled_key_anchors: Vec<PathBuf>,
    /// PEM files of intermediate CAs between the trust anchors and the
    /// cards; each must chain to a trust anchor. Their validity and
    /// revocation (by their issuer's CRL) are checked with every card.
    pub intermediates: Vec<PathBuf>,
    /// DER or PEM CRL files, reloaded every `crl_refresh_s`.
    pub crl_files: Vec<PathBuf>,
    /// http:// or https:// CRL locations, fetched every `crl_refresh_s`.
    pub crl_urls: Vec<String>,
    /// PEM bundle of the roots that https:// CRL servers are verified
    /// against.
    pub crl_tls_roots: PathBuf,
    /// Time limit for one CRL fetch, seconds.
    pub crl_fetch_timeout_s: u64,
    /// Reload interval for CRLs, seconds.
    pub crl_refresh_s: u64,
    /// How far in the future a CRL's thisUpdate may lie (issuer clock
    /// skew), seconds; a CRL further ahead is refused.
    pub crl_future_skew_s: u64,
    /// Refuse when a CRL is past its nextUpdate.
    pub crl_strict: bool,
    /// Refuse when a CRL is older than this, seconds.
    pub max_crl_age_s: Option<u64>,
    /// Refuse cards whose issuer has no CRL loaded.
    pub require_crl: bool,
    /// EKUs (any of) required on 9A certificates.
    pub eku_9a: Vec<String>,
    /// EKUs (any of) required on 9E certificates.
    pub eku_9e: Vec<String>,
    /// Certificate policies (any of) required on 9A certificates.
    pub policies_9a: Vec<String>,
    /// Certificate policies (any of) required on 9E certificates.
    pub policies_9e: Vec<String>,
    /// The longest a temporary card may last, days (1 to 90).
    pub max_temporary_days: u32,
    /// PEM files of the attestation roots the site trusts (the token
    /// makers', such as Yubico's PIV attestation root).
    pub attestation_roots: Vec<PathBuf>,
    /// Require the 9A (card and PIN) key to be attested as generated on its
    /// token with a PIN policy other than never: at enrolment, and at every
    /// tap (a card enrolled before the policy is refused until its 9A key
    /// is enrolled again with its attestation).
    pub require_attested_pin_key: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("pivgate-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7443)),
            metrics_listen: None,
            server_names: vec![],
            challenge_ttl_s: 30,
            agent_grace_s: 30,
            audit_checkpoint_s: 60,
            cards: CardsConfig::default(),
            limits: LimitsConfig::default(),
            lifecycle: LifecycleConfig::default(),
            applications: Default::default(),
        }
    }
}

impl Default for CardsConfig {
    fn default() -> Self {
        CardsConfig {
            trust_anchors: vec![],
            enrolled_key_anchors: vec![],
            intermediates: vec![],
            crl_files: vec![],
            crl_urls: vec![],
            crl_tls_roots: PathBuf::from("/etc/ssl/certs/ca-certificates.crt"),
            crl_fetch_timeout_s: 10,
            crl_refresh_s: 300,
            crl_future_skew_s: 300,
            crl_strict: false,
            max_crl_age_s: None,
            require_crl: false,
            attestation_roots: vec![],
            require_attested_pin_key: false,
            max_temporary_days: 14,
            eku_9a: vec![],
            eku_9e: vec![],
            policies_9a: vec![],
            policies_9e: vec![],
        }
    }
}

fn is_oid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() >= 2 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let c: Config = toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<()> {
        if !(1..=30).contains(&self.challenge_ttl_s) {
            return Err(Error::Config(format!("challenge_ttl_s = {}: must be 1 to 30", self.challenge_ttl_s)));
        }
        if !(1..=3600).contains(&self.audit_checkpoint_s) {
            return Err(Error::Config("audit_checkpoint_s must be 1 to 3600".into()));
        }
        if self.agent_grace_s == 0 {
            return Err(Error::Config("agent_grace_s must be at least 1".into()));
        }
        if self.cards.crl_refresh_s == 0 {
            return Err(Error::Config("cards.crl_refresh_s must be at least 1".into()));
        }
        let l = &self.limits;
        for (field, v, min) in [
            ("max_connections", l.max_connections as u64, 16),
            ("max_handshakes", l.max_handshakes as u64, 1),
            ("max_handshakes_per_address", l.max_handshakes_per_address as u64, 1),
            ("max_connections_per_caller", l.max_connections_per_caller as u64, 1),
            ("handshake_timeout_s", l.handshake_timeout_s, 1),
            ("max_streams_per_connection", u64::from(l.max_streams_per_connection), 4),
            ("call_timeout_s", l.call_timeout_s, 1),
            ("keepalive_s", l.keepalive_s, 1),
            ("keepalive_timeout_s", l.keepalive_timeout_s, 1),
            ("max_watchers", l.max_watchers as u64, 1),
            ("max_watchers_per_caller", l.max_watchers_per_caller as u64, 1),
            ("audit_burst", u64::from(l.audit_burst), 1),
            ("audit_per_minute", u64::from(l.audit_per_minute), 1),
            ("audit_summary_s", l.audit_summary_s, 1),
        ] {
            if v < min {
                return Err(Error::Config(format!("limits.{field} must be at least {min}")));
            }
        }
        if l.handshake_timeout_s > 60 || l.call_timeout_s > 300 {
            return Err(Error::Config("limits.handshake_timeout_s must be at most 60 and limits.call_timeout_s at most 300".into()));
        }
        let c = &self.cards;
        if let Some(bad) = c.crl_urls.iter().find(|u| !(u.starts_with("http://") || u.starts_with("https://"))) {
            return Err(Error::Config(format!("cards.crl_urls: {bad:?} is not an http:// or https:// URL")));
        }
        if c.crl_urls.iter().any(|u| u.starts_with("https://")) && !c.crl_tls_roots.exists() {
            return Err(Error::Config(format!("cards.crl_tls_roots: {} does not exist (needed for https:// CRL locations)", c.crl_tls_roots.display())));
        }
        if c.crl_future_skew_s > 86_400 {
            return Err(Error::Config("cards.crl_future_skew_s must be at most 86400".into()));
        }
        if !(1..=120).contains(&c.crl_fetch_timeout_s) {
            return Err(Error::Config("cards.crl_fetch_timeout_s must be 1 to 120".into()));
        }
        for (field, list) in [("eku_9a", &c.eku_9a), ("eku_9e", &c.eku_9e), ("policies_9a", &c.policies_9a), ("policies_9e", &c.policies_9e)] {
            if let Some(bad) = list.iter().find(|o| !is_oid(o)) {
                return Err(Error::Config(format!("cards.{field}: {bad:?} is not a dotted OID")));
            }
        }
        if let Some(p) = c.enrolled_key_anchors.iter().find(|p| c.trust_anchors.contains(p)) {
            return Err(Error::Config(format!(
                "cards: {} is in both trust_anchors (identity by card UUID) and enrolled_key_anchors (identity by enrolled key); an issuer has one identity rule",
                p.display()
            )));
        }
        if !(1..=90).contains(&c.max_temporary_days) {
            return Err(Error::Config("cards.max_temporary_days must be 1 to 90".into()));
        }
        let lc = &self.lifecycle;
        if !(60..=3600).contains(&lc.enrolment_window_max_s) {
            return Err(Error::Config("lifecycle.enrolment_window_max_s must be 60 to 3600".into()));
        }
        if !(1..=720).contains(&lc.request_ttl_h) {
            return Err(Error::Config("lifecycle.request_ttl_h must be 1 to 720".into()));
        }
        if !(1..=100).contains(&lc.lockout_after) {
            return Err(Error::Config("lifecycle.lockout_after must be 1 to 100".into()));
        }
        if lc.free_failures > 10 {
            return Err(Error::Config("lifecycle.free_failures must be 0 to 10".into()));
        }
        if !(1..=72).contains(&lc.break_glass_max_h) {
            return Err(Error::Config("lifecycle.break_glass_max_h must be 1 to 72".into()));
        }
        if !(1..=3600).contains(&lc.max_delay_s) {
            return Err(Error::Config("lifecycle.max_delay_s must be 1 to 3600".into()));
        }
        if let Some(r) = lc.privileged_roles.iter().find(|r| r.is_empty() || r.len() > 128) {
            return Err(Error::Config(format!("lifecycle.privileged_roles: {r:?} is not a role name")));
        }
        if self.applications.len() > 10_000 {
            return Err(Error::Config("applications: at most 10000".into()));
        }
        for (name, scope) in &self.applications {
            let id = |s: &String| crate::limits::is_identifier(s);
            if !id(name) {
                return Err(Error::Config(format!("applications: {name:?} is not an application's certificate name")));
            }
            if let Some(t) = scope.terminals.iter().chain(&scope.groups).find(|t| !id(t)) {
                return Err(Error::Config(format!("applications.{name}: {t:?} is not a terminal or group id")));
            }
        }
        if c.require_attested_pin_key && c.attestation_roots.is_empty() {
            return Err(Error::Config("cards.require_attested_pin_key needs cards.attestation_roots".into()));
        }
        for p in c.trust_anchors.iter().chain(&c.enrolled_key_anchors).chain(&c.intermediates).chain(&c.crl_files).chain(&c.attestation_roots) {
            if !p.exists() {
                return Err(Error::Config(format!("{} does not exist", p.display())));
            }
        }
        Ok(())
    }

    /// The card policy this configuration describes.
    pub fn card_policy(&self) -> CardPolicy {
        let c = &self.cards;
        CardPolicy {
            required_eku: BTreeMap::from([(Slot::PivAuthentication, c.eku_9a.clone()), (Slot::CardAuthentication, c.eku_9e.clone())]),
            required_policies: BTreeMap::from([(Slot::PivAuthentication, c.policies_9a.clone()), (Slot::CardAuthentication, c.policies_9e.clone())]),
            crl_strict: c.crl_strict,
            max_crl_age: c.max_crl_age_s.map(Duration::from_secs),
            require_crl: c.require_crl,
            crl_future_skew: Duration::from_secs(c.crl_future_skew_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_errors_name_the_field() {
        Config::default().validate().unwrap();
        let bad: Config = toml::from_str("challenge_ttl_s = 90").unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("challenge_ttl_s"));
        let bad: Config = toml::from_str("[cards]\neku_9e = [\"cardAuth\"]").unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("cards.eku_9e"));
        let unknown = toml::from_str::<Config>("listen_port = 3");
        assert!(unknown.unwrap_err().to_string().contains("listen_port"));
        let wrong_type = toml::from_str::<Config>("listen = 3");
        assert!(wrong_type.is_err());
        let scoped: Config = toml::from_str("[applications.panel]\ngroups = [\"intercom\"]\nterminals = [\"ic-1\"]").unwrap();
        scoped.validate().unwrap();
        assert_eq!(scoped.applications["panel"].groups, ["intercom"]);
        let bad: Config = toml::from_str("[applications.panel]\nterminals = [\"two words\"]").unwrap();
        assert!(bad.validate().unwrap_err().to_string().contains("applications.panel"));
        assert!(toml::from_str::<Config>("[applications.panel]\nterminal = [\"x\"]").is_err(), "a misspelt field is refused");
    }

    #[test]
    fn the_shipped_example_configuration_is_valid() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway.toml");
        let c = Config::load(&path).unwrap();
        assert_eq!(c.challenge_ttl_s, Config::default().challenge_ttl_s);
        assert_eq!(c.cards.crl_refresh_s, CardsConfig::default().crl_refresh_s);
    }
}
