//! A site in a test: a real gateway on loopback (real mutual TLS, real sled
//! on disk), its administrator, agents and applications with certificates
//! from its service CA, and virtual cards from a card issuer it trusts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pb::access_service_client::AccessServiceClient;
use pb::admin_service_client::AdminServiceClient;
use pb::agent_service_client::AgentServiceClient;
use pivgate_gateway::client::{connect, Credentials};
use pivgate_gateway::Config;
use pivgate_hw::piv::{Algorithm, PivClient, Slot};
use pivgate_hw::vcard::{IssuingCa, Profile, ProfileOptions, VirtualCard};
use pivgate_hw::Pin;
use pivgate_proto::v1 as pb;
use tonic::transport::Channel;

/// OID arcs of id-PIV-cardAuth.
pub const EKU_CARD_AUTH: &str = "2.16.840.1.101.3.6.8";
/// id-fpki-common-authentication.
pub const POLICY_AUTH: &str = "2.16.840.1.101.3.2.1.3.13";
/// id-fpki-common-cardAuth.
pub const POLICY_CARD_AUTH: &str = "2.16.840.1.101.3.2.1.3.17";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh folder under the system temp dir.
pub fn scratch(name: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("pivgate-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Where [`write_credentials`] put the three PEM files.
pub struct CredentialFiles {
    /// Service CA.
    pub ca: PathBuf,
    /// Certificate.
    pub cert: PathBuf,
    /// Key.
    pub key: PathBuf,
}

/// Writes service credentials as `ca.pem`, `cert.pem`, `key.pem` in `dir`.
pub fn write_credentials(creds: &Credentials, dir: &Path) -> Result<CredentialFiles> {
    std::fs::create_dir_all(dir)?;
    let files = CredentialFiles { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") };
    std::fs::write(&files.ca, &creds.ca_pem)?;
    std::fs::write(&files.cert, &creds.cert_pem)?;
    std::fs::write(&files.key, &creds.key_pem)?;
    Ok(files)
}

/// A running gateway.
pub struct Site {
    /// Its address.
    pub addr: String,
    /// Its data folder.
    pub dir: PathBuf,
    /// The card issuer it trusts.
    pub issuer: IssuingCa,
    /// The configuration it runs with.
    pub config: Config,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<pivgate_gateway::Result<()>>>,
}

/// The card policy tests run with: the FPKI policies on 9A and 9E, the
/// card-authentication EKU on 9E.
pub fn strict_policy(c: &mut Config) {
    c.cards.eku_9e = vec![EKU_CARD_AUTH.into()];
    c.cards.policies_9a = vec![POLICY_AUTH.into()];
    c.cards.policies_9e = vec![POLICY_CARD_AUTH.into()];
}

impl Site {
    /// Starts a gateway trusting a new card issuer, with `tweak` applied to
    /// its configuration.
    pub async fn start(tweak: impl FnOnce(&mut Config, &Path)) -> Result<Site> {
        let issuer = IssuingCa::generate("test card issuer CA")?;
        Site::start_with_issuer(issuer, tweak).await
    }

    /// Starts a gateway trusting `issuer`.
    pub async fn start_with_issuer(issuer: IssuingCa, tweak: impl FnOnce(&mut Config, &Path)) -> Result<Site> {
        let dir = scratch("gateway");
        let anchor = dir.join("card-issuer-ca.pem");
        std::fs::write(&anchor, &issuer.cert_pem)?;
        let mut config = Config { data_dir: dir.join("data"), listen: "127.0.0.1:0".parse()?, ..Config::default() };
        config.cards.trust_anchors = vec![anchor];
        strict_policy(&mut config);
        tweak(&mut config, &dir);
        config.validate()?;
        let site = Site { addr: String::new(), dir, issuer, config, shutdown: None, task: None };
        site.launch().await
    }

    async fn launch(mut self) -> Result<Site> {
        // A stopped gateway releases its database as its last tasks end.
        let mut attempts = 0;
        let (gateway, tls, _) = loop {
            match pivgate_gateway::open(&self.config) {
                Ok(x) => break x,
                Err(pivgate_gateway::Error::Storage(e)) if attempts < 40 => {
                    attempts += 1;
                    pause_before_retry(e).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let listener = tokio::net::TcpListener::bind(self.config.listen).await?;
        self.addr = listener.local_addr()?.to_string();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let config = self.config.clone();
        self.task = Some(tokio::spawn(pivgate_gateway::run(listener, gateway, tls, config, async {
            let _ = rx.await;
        })));
        self.shutdown = Some(tx);
        Ok(self)
    }

    /// Stops the gateway (graceful) and starts it again on the same folder
    /// and port.
    pub async fn restart(mut self) -> Result<Site> {
        self.stop().await?;
        self.config.listen = self.addr.parse()?;
        self.launch().await
    }

    /// Starts a stopped gateway again on the same folder and port.
    pub async fn resume(mut self) -> Result<Site> {
        self.config.listen = self.addr.parse()?;
        self.launch().await
    }

    /// Stops the gateway gracefully.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await??;
        }
        Ok(())
    }

    /// The first administrator's credentials.
    pub fn admin_credentials(&self) -> Result<Credentials> {
        Ok(Credentials::admin_in(&self.config.data_dir)?)
    }

    /// An admin client.
    pub async fn admin(&self) -> Result<AdminServiceClient<Channel>> {
        Ok(AdminServiceClient::new(connect(&self.addr, "localhost", &self.admin_credentials()?).await?))
    }

    /// Credentials for a new service identity issued through the Admin API.
    pub async fn issue(&self, role: pb::ServiceRole, name: &str) -> Result<Credentials> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        use rcgen::PublicKeyData;
        let resp = self
            .admin()
            .await?
            .issue_certificate(pb::IssueCertificateRequest {
                role: role as i32,
                name: name.into(),
                public_key: key.subject_public_key_info(),
                validity_days: 30,
            })
            .await?
            .into_inner();
        Ok(Credentials { ca_pem: resp.ca_pem, cert_pem: resp.certificate_pem, key_pem: key.serialize_pem() })
    }

    /// An agent client named `name`, bound to `terminals`.
    pub async fn agent(&self, name: &str, terminals: &[&str]) -> Result<AgentServiceClient<Channel>> {
        let creds = self.issue(pb::ServiceRole::Agent, name).await?;
        self.admin()
            .await?
            .bind_agent(pb::BindAgentRequest { agent_name: name.into(), terminal_ids: terminals.iter().map(|t| t.to_string()).collect() })
            .await?;
        Ok(AgentServiceClient::new(connect(&self.addr, "localhost", &creds).await?))
    }

    /// An application client.
    pub async fn application(&self, name: &str) -> Result<AccessServiceClient<Channel>> {
        let creds = self.issue(pb::ServiceRole::Application, name).await?;
        Ok(AccessServiceClient::new(connect(&self.addr, "localhost", &creds).await?))
    }

    /// Sets a terminal's mechanisms (and roles).
    pub async fn policy(&self, terminal: &str, mechanisms: &[pb::Mechanism], roles: &[&str]) -> Result<()> {
        self.admin()
            .await?
            .set_terminal_policy(pb::SetTerminalPolicyRequest {
                terminal_id: terminal.into(),
                allowed_mechanisms: mechanisms.iter().map(|m| *m as i32).collect(),
                allowed_roles: roles.iter().map(|r| r.to_string()).collect(),
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// A new card from this site's issuer, enrolled (9A) for a new operator
    /// `operator` with `roles`.
    pub async fn enrolled_card(&self, operator: &str, roles: &[&str], alg: Algorithm) -> Result<Profile> {
        let profile = self.card(alg)?;
        self.enrol(&profile, operator, roles).await?;
        Ok(profile)
    }

    /// Adds operator `operator` with `roles` and enrols `profile`'s card
    /// (9A) for them.
    pub async fn enrol(&self, profile: &Profile, operator: &str, roles: &[&str]) -> Result<()> {
        let mut admin = self.admin().await?;
        admin
            .add_operator(pb::AddOperatorRequest {
                operator: Some(pb::Operator {
                    operator_id: operator.into(),
                    name: format!("Operator {operator}"),
                    roles: roles.iter().map(|r| r.to_string()).collect(),
                    enabled: true,
                }),
            })
            .await?;
        admin
            .enrol_card(pb::EnrolCardRequest {
                operator_id: operator.into(),
                certificate: profile.certificates[&Slot::Authentication].clone(),
                slot: pb::KeySlot::PivAuthentication as i32,
            })
            .await?;
        Ok(())
    }

    /// A new card from this site's issuer, not enrolled.
    pub fn card(&self, alg: Algorithm) -> Result<Profile> {
        let ca = IssuingCa { cert_pem: self.issuer.cert_pem.clone(), key_pem: self.issuer.key_pem.clone() };
        Ok(Profile::generate_with_ca(ca, &ProfileOptions { algorithm: alg, ..Default::default() })?)
    }

    /// The audit records after `after` (oldest first).
    pub async fn audit_after(&self, after: u64) -> Result<Vec<pb::AuditRecord>> {
        Ok(self.admin().await?.query_audit(pb::QueryAuditRequest { after_index: after, limit: 1000 }).await?.into_inner().records)
    }

    /// The last audit index.
    pub async fn audit_len(&self) -> Result<u64> {
        Ok(self.audit_after(0).await?.last().map(|r| r.index).unwrap_or(0))
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The outcome of a tap, as the agent sees it.
#[derive(Debug)]
pub enum Tap {
    /// Granted.
    Granted(pb::Grant),
    /// Denied at begin or complete.
    Denied(pb::DenyReason),
}

/// What an agent does for one badge tap, with the card in process: begin
/// (sending the certificate when asked), VERIFY when the PIN is required,
/// sign, reset the PIN state, complete.
pub async fn tap(agent: &mut AgentServiceClient<Channel>, terminal: &str, card: &mut VirtualCard, pin: &str, mechanism: pb::Mechanism) -> Result<Tap> {
    let challenge = match begin(agent, terminal, card, mechanism).await? {
        Ok(c) => c,
        Err(d) => return Ok(Tap::Denied(d)),
    };
    let sig = sign(card, &challenge, pin)?;
    complete(agent, terminal, &challenge, sig).await
}

/// BeginAuthentication, answering a certificate request once.
pub async fn begin(
    agent: &mut AgentServiceClient<Channel>,
    terminal: &str,
    card: &mut VirtualCard,
    mechanism: pb::Mechanism,
) -> Result<std::result::Result<pb::Challenge, pb::DenyReason>> {
    let chuid = PivClient::new(&mut *card).read_chuid()?;
    let mut req = pb::BeginAuthenticationRequest {
        terminal_id: terminal.into(),
        card_uuid: chuid.guid.to_vec(),
        fascn: chuid.fascn.map(|f| f.0.to_vec()).unwrap_or_default(),
        certificate: vec![],
        requested_mechanism: mechanism as i32,
    };
    for _ in 0..2 {
        use pb::begin_authentication_response::Outcome;
        match agent.begin_authentication(req.clone()).await?.into_inner().outcome {
            Some(Outcome::Challenge(c)) => return Ok(Ok(c)),
            Some(Outcome::Denied(d)) => return Ok(Err(pb::DenyReason::try_from(d.reason)?)),
            Some(Outcome::CertificateNeeded(slot)) => {
                let slot = if slot == pb::KeySlot::CardAuthentication as i32 { Slot::CardAuthentication } else { Slot::Authentication };
                let mut piv = PivClient::new(&mut *card);
                piv.select()?;
                req.certificate = piv.read_certificate(slot)?;
            }
            None => bail!("empty BeginAuthentication answer"),
        }
    }
    bail!("the gateway asked for a certificate twice")
}

/// The card signs a challenge, as the agent has it do.
pub fn sign(card: &mut VirtualCard, c: &pb::Challenge, pin: &str) -> Result<Vec<u8>> {
    let slot = if c.slot == pb::KeySlot::CardAuthentication as i32 { Slot::CardAuthentication } else { Slot::Authentication };
    let alg = match pb::SignatureAlgorithm::try_from(c.algorithm)? {
        pb::SignatureAlgorithm::EcdsaP256Sha256 => Algorithm::EccP256,
        pb::SignatureAlgorithm::EcdsaP384Sha384 => Algorithm::EccP384,
        pb::SignatureAlgorithm::Rsa2048Pkcs1Sha256 => Algorithm::Rsa2048,
        pb::SignatureAlgorithm::Unspecified => bail!("no algorithm"),
    };
    // The agent's own check of what it lets the card sign, with this
    // message's agent name (the helper is not told which agent it plays).
    let parsed = pivgate_proto::card_message::parse(&c.message).context("the gateway's message")?;
    let expected = pivgate_agent::challenge::Expected {
        agent: parsed.agent,
        terminal: parsed.terminal,
        card_uuid: parsed.card_uuid,
        now: std::time::SystemTime::now(),
        max_skew: Duration::from_secs(300),
    };
    let digest = pivgate_agent::challenge::digest_to_sign(&c.message, slot, alg, &expected)?;
    sign_digest(card, slot, alg, &digest, c.pin_required.then_some(pin))
}

/// Has the card sign `digest` with `slot`, with no check at all: what a
/// compromised agent does.
pub fn sign_digest(card: &mut VirtualCard, slot: Slot, alg: Algorithm, digest: &[u8], pin: Option<&str>) -> Result<Vec<u8>> {
    let mut piv = PivClient::new(card);
    piv.select()?;
    if let Some(pin) = pin {
        piv.verify_pin(&Pin::new(pin.as_bytes())?)?;
    }
    let sig = piv.sign(slot, alg, digest).context("card signature")?;
    piv.reset_pin_state()?;
    Ok(sig)
}

/// CompleteAuthentication.
pub async fn complete(agent: &mut AgentServiceClient<Channel>, terminal: &str, c: &pb::Challenge, signature: Vec<u8>) -> Result<Tap> {
    use pb::complete_authentication_response::Outcome;
    let r = agent
        .complete_authentication(pb::CompleteAuthenticationRequest { challenge_id: c.challenge_id.clone(), terminal_id: terminal.into(), signature })
        .await?
        .into_inner();
    match r.outcome {
        Some(Outcome::Granted(g)) => Ok(Tap::Granted(g)),
        Some(Outcome::Denied(d)) => Ok(Tap::Denied(pb::DenyReason::try_from(d.reason)?)),
        None => bail!("empty CompleteAuthentication answer"),
    }
}

/// Waits up to `timeout` for `f` to return true.
pub async fn eventually<F: std::future::Future<Output = Result<bool>>>(timeout: Duration, mut f: impl FnMut() -> F) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn pause_before_retry(_e: impl std::fmt::Display) {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// Every operator id the gateway has, page by page.
pub async fn operator_ids(admin: &mut AdminServiceClient<Channel>) -> Result<std::collections::BTreeSet<String>> {
    let (mut ids, mut page_token) = (std::collections::BTreeSet::new(), String::new());
    loop {
        let r = admin.list_operators(pb::ListOperatorsRequest { page_size: 1000, page_token }).await?.into_inner();
        ids.extend(r.operators.into_iter().map(|o| o.operator_id));
        if r.next_page_token.is_empty() {
            return Ok(ids);
        }
        page_token = r.next_page_token;
    }
}

/// A small deterministic generator, seeded and printed by a test so a
/// failing run can be replayed.
pub struct Lcg(pub u64);

impl Lcg {
    /// The next 31 bits.
    pub fn draw(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}
