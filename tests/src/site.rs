//! A site in a test: a real gateway on loopback (real mutual TLS, real sled
//! on disk), its administrator, agents and applications with certificates
//! from its service CA, and virtual cards from a card issuer it trusts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use std::collections::VecDeque;

use anyhow::{bail, Context, Result};
use pb::access_service_client::AccessServiceClient;
use pb::admin_service_client::AdminServiceClient;
use pivgate_agent::keys::KeySource;
pub use pivgate_agent::link::Calls as AgentClient;
use pivgate_agent::memory::CardMemory;
pub use pivgate_agent::tap::{Challenge, Grant};
use pivgate_agent::tap::{Nothing, PinWay, Tap as Flow, TapResult};
use pivgate_gateway::client::{connect, Admin, Credentials};
use pivgate_gateway::model::{Mechanism, Operator, Slot as GwSlot, TerminalPolicy};
use pivgate_gateway::pki::Role;
use pivgate_gateway::Config;
use pivgate_hw::keypad::entry::EntryRules;
use pivgate_hw::keypad::Key;
use pivgate_hw::piv::{Algorithm, PivClient, Slot};
use pivgate_hw::{Pin, SystemClock};
use pivgate_proto::v1 as pb;
use pivgate_vcard::{IssuingCa, Profile, ProfileOptions, VirtualCard};
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

    /// The typed Admin API client.
    pub async fn admin_client(&self) -> Result<Admin> {
        Ok(Admin::connect(&self.addr, "localhost", &self.admin_credentials()?).await?)
    }

    /// Credentials for a new service identity issued through the Admin API.
    /// An administrator past the bootstrap pair: asked by the first
    /// administrator, approved by `approver` (another administrator),
    /// then issued.
    pub async fn issue_approved_admin(&self, name: &str, approver: &Credentials) -> Result<Credentials> {
        use pivgate_gateway::client::Issued;
        use rcgen::PublicKeyData;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut root = self.admin_client().await?;
        let Issued::Pending(r) = root.issue_certificate(Role::Admin, name, &key.subject_public_key_info(), 30).await? else {
            bail!("an administrator certificate past the bootstrap pair issued without approval")
        };
        Admin::new(connect(&self.addr, "localhost", approver).await?).approve(&r.request_id).await?;
        match root.issue_certificate(Role::Admin, name, &key.subject_public_key_info(), 30).await? {
            Issued::Certificate { certificate_pem, ca_pem } => Ok(Credentials { ca_pem, cert_pem: certificate_pem, key_pem: key.serialize_pem() }),
            Issued::Pending(_) => bail!("still pending after its approval"),
        }
    }

    pub async fn issue(&self, role: pb::ServiceRole, name: &str) -> Result<Credentials> {
        let role = match role {
            pb::ServiceRole::Agent => Role::Agent,
            pb::ServiceRole::Application => Role::Application,
            pb::ServiceRole::Admin | pb::ServiceRole::Unspecified => Role::Admin,
        };
        Ok(self.admin_client().await?.issue_credentials(role, name, 30).await?)
    }

    /// An agent client named `name`, bound to `terminals`.
    pub async fn agent(&self, name: &str, terminals: &[&str]) -> Result<AgentClient> {
        let creds = self.issue(pb::ServiceRole::Agent, name).await?;
        self.admin_client().await?.bind_agent(name, terminals).await?;
        agent_client(connect(&self.addr, "localhost", &creds).await?, &creds)
    }

    /// An application client.
    pub async fn application(&self, name: &str) -> Result<AccessServiceClient<Channel>> {
        let creds = self.issue(pb::ServiceRole::Application, name).await?;
        Ok(AccessServiceClient::new(connect(&self.addr, "localhost", &creds).await?))
    }

    /// Sets a terminal's mechanisms (and roles).
    pub async fn policy(&self, terminal: &str, mechanisms: &[pb::Mechanism], roles: &[&str]) -> Result<()> {
        let allowed_mechanisms = mechanisms
            .iter()
            .filter_map(|m| match m {
                pb::Mechanism::CardAndPin => Some(Mechanism::CardAndPin),
                pb::Mechanism::CardOnly => Some(Mechanism::CardOnly),
                pb::Mechanism::Unspecified => None,
            })
            .collect();
        let policy = TerminalPolicy { allowed_mechanisms, allowed_roles: roles.iter().map(|r| r.to_string()).collect(), ..Default::default() };
        Ok(self.admin_client().await?.set_terminal_policy(terminal, &policy).await?)
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
        let op = Operator { id: operator.into(), name: format!("Operator {operator}"), roles: roles.iter().map(|r| r.to_string()).collect(), enabled: true };
        self.admin_client().await?.add_operator_with_card(&op, &profile.certificates[&Slot::Authentication], GwSlot::PivAuthentication).await?;
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

/// The outcome of a tap that reached a decision.
#[derive(Debug)]
pub enum Tap {
    /// Granted.
    Granted(Grant),
    /// Denied at begin or complete.
    Denied(pb::DenyReason),
    /// Enrolled in the terminal's enrolment window.
    Enrolled(pivgate_agent::tap::Enrolled),
    /// A step-up proven, by this operator.
    SteppedUp(String),
}

/// Keys typed in one go, as the operator does once asked: the PIN and `#`,
/// then `*` (give up) if the card asks again.
struct Typed(VecDeque<Key>);

impl Typed {
    fn pin(pin: &str) -> Typed {
        Typed(pin.chars().chain(['#']).filter_map(Key::from_legend).collect())
    }
}

impl KeySource for Typed {
    fn next_key(&mut self, _: Duration) -> Option<Key> {
        Some(self.0.pop_front().unwrap_or(Key::Clear))
    }
    fn drain(&mut self) {}
}

/// What a test's terminal has around the flow: keys typed at once, and
/// nothing to show.
struct AtTerminal {
    keys: Typed,
    around: Nothing,
    memory: CardMemory,
}

impl AtTerminal {
    fn typing(pin: &str) -> AtTerminal {
        AtTerminal { keys: Typed::pin(pin), around: Nothing, memory: CardMemory::new() }
    }

    fn flow<'a, T>(
        &'a mut self,
        agent: &'a mut AgentClient,
        terminal: &'a str,
        requested: Option<pb::Mechanism>,
    ) -> Flow<'a, T, AgentClient, SystemClock, Nothing> {
        Flow {
            terminal,
            requested,
            gateway: agent,
            pin: PinWay::Keys { keys: &mut self.keys, rules: EntryRules::default() },
            around: &mut self.around,
            clock: &SystemClock,
            memory: &self.memory,
            step_up: None,
        }
    }
}

fn requested(m: pb::Mechanism) -> Option<pb::Mechanism> {
    (m != pb::Mechanism::Unspecified).then_some(m)
}

fn ended(r: TapResult) -> anyhow::Error {
    anyhow::anyhow!("the tap ended with {r:?}")
}

/// One badge tap with the card in process, through the agent's own tap
/// flow ([`pivgate_agent::tap`]): the same steps and checks as an agent at
/// a terminal, PIN typed at once.
pub async fn tap(agent: &mut AgentClient, terminal: &str, card: &mut VirtualCard, pin: &str, mechanism: pb::Mechanism) -> Result<Tap> {
    let mut at = AtTerminal::typing(pin);
    let mut flow = at.flow(agent, terminal, requested(mechanism));
    match flow.run(&mut PivClient::new(card)).await.result {
        TapResult::Granted(g) => Ok(Tap::Granted(g)),
        TapResult::Denied(d) => Ok(Tap::Denied(d)),
        TapResult::Enrolled(e) => Ok(Tap::Enrolled(e)),
        TapResult::SteppedUp(who) => Ok(Tap::SteppedUp(who)),
        r => Err(ended(r)),
    }
}

/// The flow's begin alone (identify, BeginAuthentication, the certificate
/// when asked), for tests that take a tap apart.
pub async fn begin(
    agent: &mut AgentClient,
    terminal: &str,
    card: &mut VirtualCard,
    mechanism: pb::Mechanism,
) -> Result<std::result::Result<Challenge, pb::DenyReason>> {
    let mut at = AtTerminal::typing("");
    let mut flow = at.flow(agent, terminal, requested(mechanism));
    let mut piv = PivClient::new(card);
    let mut id = flow.identify(&mut piv).map_err(ended)?;
    match flow.begin(&mut piv, &mut id).await {
        Ok(c) => Ok(Ok(c)),
        Err(TapResult::Denied(d)) => Ok(Err(d)),
        Err(r) => Err(ended(r)),
    }
}

/// The flow's sign alone: the agent's check of the message, the PIN when
/// the challenge needs it, the signature, the PIN state reset.
pub fn sign(agent: &mut AgentClient, terminal: &str, card: &mut VirtualCard, c: &Challenge, pin: &str) -> Result<Vec<u8>> {
    let mut at = AtTerminal::typing(pin);
    let mut flow = at.flow(agent, terminal, None);
    let mut piv = PivClient::new(card);
    let id = flow.identify(&mut piv).map_err(ended)?;
    let sig = flow.sign(&mut piv, &id, c).map_err(ended);
    piv.reset_pin_state()?;
    sig
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

/// The flow's completion alone.
pub async fn complete(agent: &mut AgentClient, terminal: &str, c: &Challenge, signature: Vec<u8>) -> Result<Tap> {
    use pivgate_agent::tap::Completed;
    let mut at = AtTerminal::typing("");
    let mut flow = at.flow::<&mut VirtualCard>(agent, terminal, None);
    match flow.complete(c, signature).await.map_err(ended)? {
        Completed::Granted(g) => Ok(Tap::Granted(g)),
        Completed::Enrolled(e) => Ok(Tap::Enrolled(e)),
        Completed::SteppedUp(who) => Ok(Tap::SteppedUp(who)),
        Completed::Denied(d) => Ok(Tap::Denied(d)),
    }
}

/// The agent calls over `channel` as the agent whose certificate is in
/// `creds`.
pub fn agent_client(channel: Channel, creds: &Credentials) -> Result<AgentClient> {
    let name = pivgate_agent::link::agent_name(&creds.cert_pem).map_err(anyhow::Error::msg)?;
    Ok(AgentClient::new(channel, name, Duration::from_secs(300), Duration::from_secs(60)))
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
