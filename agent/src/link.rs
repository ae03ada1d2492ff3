//! The link to the gateway: mutual TLS, the calls of one badge tap, and the
//! presence stream that reports every terminal's reader and card.
//!
//! The presence stream reconnects with exponential backoff and jitter, and
//! every (re)connection starts with a full report of every terminal, so a
//! card pulled while the link was down still locks its terminal. Locks the
//! gateway pushes (an administrator's, a revocation) reach the terminal's
//! worker through [`Link::locks`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pb::agent_service_client::AgentServiceClient;
use pivgate_proto::v1 as pb;
use tokio::sync::{broadcast, Notify};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use pivgate_hw::piv::{Algorithm, Slot};

use crate::config::GatewayConfig;
use crate::tap::{BeginRequest, Begun, Challenge, CompleteRequest, Completed, DenyReason, Gateway, GatewayError, Grant};
use crate::Error;

/// What one terminal looks like to the gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TerminalReport {
    /// The reader is there.
    pub reader_present: bool,
    /// A card is in it.
    pub card_present: bool,
    /// The card's UUID, once read.
    pub card_uuid: Option<[u8; 16]>,
    /// The terminal has no way to enter a PIN: it answers no step-up.
    pub no_pin_entry: bool,
}

/// The gateway link.
pub struct Link {
    calls: Calls,
    state: Mutex<BTreeMap<String, TerminalReport>>,
    changed: Notify,
    connected: AtomicBool,
    locks: broadcast::Sender<String>,
    step_ups: broadcast::Sender<StepUpAsk>,
    link_changes: broadcast::Sender<bool>,
}

/// A step-up the gateway asks of the operator at one of our terminals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepUpAsk {
    /// Identifier (sent back with the proof).
    pub id: [u8; 16],
    /// The terminal.
    pub terminal: String,
    /// What it is for, in words (for the log).
    pub action: String,
    /// How long it keeps waiting.
    pub expires_in: Duration,
}

/// The agent name in a service certificate (`urn:pivgate:agent:NAME` in
/// its subject alternative name).
pub fn agent_name(pem: &str) -> Result<String, String> {
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| format!("not a PEM certificate: {e}"))?;
    let cert = p.parse_x509().map_err(|e| format!("not a certificate: {e}"))?;
    let san = cert.subject_alternative_name().ok().flatten().ok_or("the certificate has no subject alternative name")?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix("urn:pivgate:agent:").map(str::to_string),
            _ => None,
        })
        .ok_or_else(|| "not an agent certificate (no urn:pivgate:agent: name)".to_string())
}

fn jitter(d: Duration) -> Duration {
    // Spread reconnects of fifty boxes after a gateway restart: 50% to
    // 150% of the backoff, from the clock's low bits (no need for a CSPRNG).
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.subsec_nanos()).unwrap_or(0);
    d.mul_f64(0.5 + f64::from(nanos % 1000) / 1000.0)
}

impl Link {
    /// A link to the configured gateway. Connects lazily: a gateway that is
    /// down does not stop the agent from starting.
    pub fn new(cfg: &GatewayConfig, terminals: &[String]) -> Result<Arc<Link>, Error> {
        let read = |p: &std::path::Path| std::fs::read_to_string(p).map_err(|e| Error::Config(format!("{}: {e}", p.display())));
        let tls = ClientTlsConfig::new()
            .domain_name(cfg.server_name.clone())
            .ca_certificate(Certificate::from_pem(read(&cfg.ca)?))
            .identity(Identity::from_pem(read(&cfg.certificate)?, read(&cfg.key)?));
        let channel = Endpoint::from_shared(format!("https://{}", cfg.address))
            .map_err(|e| Error::Config(format!("gateway.address: {e}")))?
            .tls_config(tls)
            .map_err(|e| Error::Config(format!("gateway TLS: {e}")))?
            .connect_timeout(Duration::from_secs(cfg.call_timeout_s))
            .tcp_nodelay(true)
            .connect_lazy();
        let state = terminals.iter().map(|t| (t.clone(), TerminalReport::default())).collect();
        let name = agent_name(&read(&cfg.certificate)?).map_err(|e| Error::Config(format!("{}: {e}", cfg.certificate.display())))?;
        Ok(Arc::new(Link {
            calls: Calls::new(channel, name, Duration::from_secs(cfg.max_clock_skew_s), Duration::from_secs(cfg.call_timeout_s)),
            state: Mutex::new(state),
            changed: Notify::new(),
            connected: AtomicBool::new(false),
            locks: broadcast::channel(64).0,
            step_ups: broadcast::channel(64).0,
            link_changes: broadcast::channel(16).0,
        }))
    }

    /// Whether the presence stream is up.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::SeqCst)
    }

    /// Terminals the gateway locked (pushed over the presence stream).
    pub fn locks(&self) -> broadcast::Receiver<String> {
        self.locks.subscribe()
    }

    /// Step-ups asked at our terminals (pushed over the presence stream,
    /// and repeated with every heartbeat while they wait).
    pub fn step_ups(&self) -> broadcast::Receiver<StepUpAsk> {
        self.step_ups.subscribe()
    }

    /// The presence stream going up (true) or down (false).
    pub fn link_changes(&self) -> broadcast::Receiver<bool> {
        self.link_changes.subscribe()
    }

    /// Updates a terminal's report; the presence stream sends it at once.
    pub fn report(&self, terminal: &str, update: impl FnOnce(&mut TerminalReport)) {
        if let Ok(mut s) = self.state.lock() {
            if let Some(r) = s.get_mut(terminal) {
                update(r);
            }
        }
        self.changed.notify_one();
    }

    fn snapshot(&self) -> pb::PresenceRequest {
        let terminals = self
            .state
            .lock()
            .map(|s| {
                s.iter()
                    .map(|(id, r)| pb::TerminalReport {
                        terminal_id: id.clone(),
                        reader_present: r.reader_present,
                        card_present: r.card_present,
                        card_uuid: r.card_uuid.map(|u| u.to_vec()).unwrap_or_default(),
                        no_pin_entry: r.no_pin_entry,
                    })
                    .collect()
            })
            .unwrap_or_default();
        pb::PresenceRequest { agent_version: env!("CARGO_PKG_VERSION").into(), terminals }
    }

    /// The calls of a badge tap, for [`crate::tap::Tap`].
    pub fn calls(&self) -> Calls {
        self.calls.clone()
    }

    /// ReportCardRemoved. A failure is not fatal: the next presence report
    /// after a reconnect says the card is gone.
    pub async fn card_removed(&self, terminal: &str, uuid: Option<[u8; 16]>) -> Result<bool, Error> {
        let mut c = self.calls.client.clone();
        let req = pb::ReportCardRemovedRequest { terminal_id: terminal.into(), card_uuid: uuid.map(|u| u.to_vec()).unwrap_or_default() };
        Ok(self.calls.call(c.report_card_removed(req)).await?.locked)
    }

    fn set_connected(&self, up: bool) {
        if self.connected.swap(up, Ordering::SeqCst) != up {
            let _ = self.link_changes.send(up);
            if up {
                tracing::info!("gateway link up");
            } else {
                tracing::warn!("gateway link down; nothing will unlock until it is back");
            }
        }
    }

    /// Keeps the presence stream up until `shutdown`.
    pub async fn presence_loop(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(200);
        let mut heartbeat = Duration::from_secs(10);
        loop {
            if *shutdown.borrow() {
                return;
            }
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let _ = tx.try_send(self.snapshot());
            let mut client = self.calls.client.clone();
            let opened = tokio::time::timeout(self.calls.timeout, client.presence(tokio_stream::wrappers::ReceiverStream::new(rx))).await;
            let mut stream = match opened {
                Ok(Ok(s)) => s.into_inner(),
                _ => {
                    self.set_connected(false);
                    tokio::select! {
                        _ = tokio::time::sleep(jitter(backoff)) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            loop {
                tokio::select! {
                    msg = stream.message() => match msg {
                        Ok(Some(r)) => {
                            self.set_connected(true);
                            backoff = Duration::from_millis(200);
                            if r.heartbeat_interval_ms > 0 {
                                heartbeat = Duration::from_millis(u64::from(r.heartbeat_interval_ms)).max(Duration::from_millis(200));
                            }
                            for t in r.lock_terminals {
                                let _ = self.locks.send(t);
                            }
                            for s in r.step_ups {
                                // A malformed id is no step-up of ours.
                                let Ok(id) = <[u8; 16]>::try_from(s.step_up_id.as_slice()) else { continue };
                                let action: String = s.action.chars().take(pivgate_proto::card_message::ACTION_MAX).collect();
                                let expires_in = Duration::from_millis(u64::from(s.expires_in_ms)).min(Duration::from_secs(120));
                                let _ = self.step_ups.send(StepUpAsk { id, terminal: s.terminal_id, action, expires_in });
                            }
                        }
                        _ => break,
                    },
                    _ = self.changed.notified() => {
                        if tx.send(self.snapshot()).await.is_err() { break; }
                    }
                    _ = tokio::time::sleep(heartbeat) => {
                        if tx.send(self.snapshot()).await.is_err() { break; }
                    }
                    _ = shutdown.changed() => return,
                }
            }
            self.set_connected(false);
            tokio::select! {
                _ = tokio::time::sleep(jitter(backoff)) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}

/// The calls of one badge tap over gRPC: [`crate::tap::Gateway`] for the
/// agent, and for tests and benchmarks that play an agent. The only place
/// `pb` messages become the tap's domain types; anything this agent cannot
/// use (an unknown key slot or algorithm, an empty answer) is an error,
/// never a guess.
#[derive(Clone)]
pub struct Calls {
    client: AgentServiceClient<Channel>,
    /// This agent's name, from its certificate: the name every challenge
    /// must carry.
    name: String,
    /// How far a challenge's time may be from ours.
    max_clock_skew: Duration,
    timeout: Duration,
}

impl Calls {
    /// Calls over `channel` for the agent `name`.
    pub fn new(channel: Channel, name: String, max_clock_skew: Duration, timeout: Duration) -> Calls {
        Calls { client: AgentServiceClient::new(channel), name, max_clock_skew, timeout }
    }

    /// The raw client, for tests that send what no agent would.
    pub fn rpc(&mut self) -> &mut AgentServiceClient<Channel> {
        &mut self.client
    }

    async fn call<T>(&self, f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>) -> Result<T, GatewayError> {
        match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown) => {
                Err(GatewayError::Unreachable(s.message().to_string()))
            }
            Ok(Err(s)) => Err(GatewayError::Refused(s.to_string())),
            Err(_) => Err(GatewayError::Unreachable("call timed out".into())),
        }
    }
}

impl From<GatewayError> for Error {
    fn from(e: GatewayError) -> Self {
        match e {
            GatewayError::Unreachable(m) => Error::GatewayUnreachable(m),
            e => Error::Gateway(e.to_string()),
        }
    }
}

fn slot_of(s: i32) -> Result<Slot, GatewayError> {
    match pb::KeySlot::try_from(s) {
        Ok(pb::KeySlot::PivAuthentication) => Ok(Slot::Authentication),
        Ok(pb::KeySlot::CardAuthentication) => Ok(Slot::CardAuthentication),
        _ => Err(GatewayError::Malformed(format!("unknown key slot {s}"))),
    }
}

fn algorithm_of(a: i32) -> Result<Algorithm, GatewayError> {
    match pb::SignatureAlgorithm::try_from(a) {
        Ok(pb::SignatureAlgorithm::EcdsaP256Sha256) => Ok(Algorithm::EccP256),
        Ok(pb::SignatureAlgorithm::EcdsaP384Sha384) => Ok(Algorithm::EccP384),
        Ok(pb::SignatureAlgorithm::Rsa2048Pkcs1Sha256) => Ok(Algorithm::Rsa2048),
        _ => Err(GatewayError::Malformed(format!("unknown signature algorithm {a}"))),
    }
}

fn deny_reason(r: i32) -> DenyReason {
    DenyReason::try_from(r).unwrap_or(DenyReason::Unspecified)
}

impl Gateway for Calls {
    fn agent_name(&self) -> &str {
        &self.name
    }

    fn max_clock_skew(&self) -> Duration {
        self.max_clock_skew
    }

    async fn begin(&mut self, req: BeginRequest) -> Result<Begun, GatewayError> {
        let req = pb::BeginAuthenticationRequest {
            terminal_id: req.terminal,
            card_uuid: req.card_uuid.map(|u| u.to_vec()).unwrap_or_default(),
            fascn: req.fascn.map(|f| f.0.to_vec()).unwrap_or_default(),
            certificate: req.certificate.unwrap_or_default(),
            requested_mechanism: req.requested.map(|m| m as i32).unwrap_or_default(),
            step_up_id: req.step_up.map(|u| u.to_vec()).unwrap_or_default(),
        };
        let mut c = self.client.clone();
        use pb::begin_authentication_response::Outcome as B;
        Ok(match self.call(c.begin_authentication(req)).await?.outcome {
            Some(B::Challenge(c)) => Begun::Challenge(Challenge {
                slot: slot_of(c.slot)?,
                algorithm: algorithm_of(c.algorithm)?,
                id: c.challenge_id,
                message: c.message,
                pin_required: c.pin_required,
                expires_in: Duration::from_millis(u64::from(c.expires_in_ms)),
            }),
            Some(B::CertificateNeeded(slot)) => Begun::CertificateNeeded(slot_of(slot)?),
            Some(B::Denied(d)) => Begun::Denied(deny_reason(d.reason)),
            None => return Err(GatewayError::Malformed("empty BeginAuthentication answer".into())),
        })
    }

    async fn pin_failed(&mut self, challenge_id: Vec<u8>, terminal: String, wrong: u32) -> Result<(), GatewayError> {
        let req = pb::ReportPinFailureRequest { challenge_id, terminal_id: terminal, wrong_pins: wrong };
        let mut c = self.client.clone();
        self.call(c.report_pin_failure(req)).await.map(|_| ())
    }

    async fn complete(&mut self, req: CompleteRequest) -> Result<Completed, GatewayError> {
        let req = pb::CompleteAuthenticationRequest { challenge_id: req.challenge_id, terminal_id: req.terminal, signature: req.signature };
        let mut c = self.client.clone();
        use pb::complete_authentication_response::Outcome as C;
        Ok(match self.call(c.complete_authentication(req)).await?.outcome {
            Some(C::Granted(g)) => {
                Completed::Granted(Grant { operator_id: g.operator_id, operator_name: g.operator_name, roles: g.roles, sequence: g.sequence })
            }
            Some(C::Denied(d)) => Completed::Denied(deny_reason(d.reason)),
            Some(C::SteppedUp(s)) => Completed::SteppedUp(s.operator_id),
            Some(C::Enrolled(e)) => Completed::Enrolled(crate::tap::Enrolled {
                card_uuid: e.card_uuid.as_slice().try_into().map_err(|_| GatewayError::Malformed("an enrolled card's id is not 16 bytes".into()))?,
                operator_id: e.operator_id,
                awaiting_approval: e.awaiting_approval,
            }),
            None => return Err(GatewayError::Malformed("empty CompleteAuthentication answer".into())),
        })
    }
}
