//! The gateway's decisions: who may authenticate where, how, and what
//! happens to terminal sessions. Transport-free: `service.rs` calls these
//! with the caller's verified identity and converts the results.
//!
//! Every decision is audited. A success is returned only after its audit
//! record, its event and the new session are durable; events reach watchers
//! only after that too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use crate::authorize::{lock_reason, Allowed, Ask, Certificate, Check, Overlay, Verdict};
use crate::challenge::{Challenges, Pending, Purpose};
use crate::error::{Error, Result};
use crate::metrics::{push_sample, Counters};
use crate::model::{
    uuid_text, Agent, AuditKind, Card, DenyKey, Event, IdentityRule, KeyAlgorithm, LockReason, Mechanism, Operator, Session, Slot, Terminal, TerminalPolicy,
};
use crate::pki::Caller;
use crate::step_up::{step_up_holder, step_up_policy_of};
use crate::store::{AuditEntry, AuditRecord, Change, Store};
use crate::verify::{self, CardTrust, Deny};

/// A source of wall-clock and monotonic time.
pub trait Clock: Send + Sync {
    /// Wall clock (certificate validity, audit time).
    fn system(&self) -> SystemTime;
    /// Monotonic (challenge expiry).
    fn instant(&self) -> Instant;
}

/// The operating system's clocks.
pub struct SystemClock;

impl Clock for SystemClock {
    fn system(&self) -> SystemTime {
        SystemTime::now()
    }
    fn instant(&self) -> Instant {
        Instant::now()
    }
}

/// A source of randomness for challenge ids and nonces: the OS CSPRNG in
/// service, a replayable one in tests.
pub trait Randomness: Send + Sync {
    /// Fills `buf`.
    fn fill(&self, buf: &mut [u8]) -> Result<()>;
}

/// The operating system's CSPRNG (through aws-lc-rs).
pub struct SystemRandomness;

impl Randomness for SystemRandomness {
    fn fill(&self, buf: &mut [u8]) -> Result<()> {
        aws_lc_rs::rand::fill(buf).map_err(|_| Error::Exhausted("randomness"))
    }
}

/// Live event watchers, counted per caller under one lock, so neither cap
/// can be passed by callers racing each other.
#[derive(Default)]
pub struct Watchers {
    by_caller: HashMap<String, usize>,
    total: usize,
}

/// A watcher's place, given back when dropped.
pub struct WatcherSlot {
    gateway: Arc<Gateway>,
    caller: String,
}

impl Drop for WatcherSlot {
    fn drop(&mut self) {
        if let Ok(mut w) = self.gateway.watchers.lock() {
            w.total = w.total.saturating_sub(1);
            if let Some(n) = w.by_caller.get_mut(&self.caller) {
                *n -= 1;
                if *n == 0 {
                    w.by_caller.remove(&self.caller);
                }
            }
        }
    }
}

/// What BeginAuthentication decides.
pub enum Begin {
    /// Sign this.
    Challenge {
        /// Identifier.
        id: [u8; 16],
        /// The message the card signs.
        message: Vec<u8>,
        /// Mechanism (and slot).
        mechanism: Mechanism,
        /// Key algorithm.
        algorithm: KeyAlgorithm,
        /// Lifetime.
        ttl: Duration,
    },
    /// Send the certificate of this slot first.
    CertificateNeeded(Slot),
    /// Refused.
    Denied(Deny, String),
}

/// What IssueCertificate gives.
#[derive(Debug)]
pub enum Issued {
    /// The certificate and the service CA, PEM.
    Certificate {
        /// The certificate.
        certificate_pem: String,
        /// The service CA.
        ca_pem: String,
    },
    /// An administrator certificate that waits for a second
    /// administrator's approval; asked again once approved, it is issued.
    Pending(Box<crate::model::Request>),
}

/// What CompleteAuthentication decides.
pub enum Complete {
    /// Unlocked.
    Granted {
        /// The operator.
        operator: Operator,
        /// Sequence of the unlock event.
        sequence: u64,
    },
    /// A card tapped into the terminal's enrolment window was enrolled
    /// (the terminal stays locked).
    Enrolled {
        /// The card as enrolled (pending, when its operator's privileged
        /// roles need a second administrator's approval).
        card: Box<Card>,
        /// Its operator.
        operator: Operator,
    },
    /// A step-up was proven (the session is unchanged).
    SteppedUp {
        /// Who proved.
        operator: Operator,
    },
    /// Refused.
    Denied(Deny, String),
}

/// What a proof checked by `decide` is for.
enum Decided {
    /// A badge tap: unlock, after the checks under the ledger lock.
    Unlock(Pending, Operator, verify::Validation),
    /// A card in an enrolment window.
    Enrol(Pending, crate::model::EnrolmentWindow),
    /// A step-up's proof, checked like a tap's.
    StepUp(Pending, Box<Card>, Operator),
    /// A signature the card's key did not make (or made with the wrong
    /// key): refused, and counted against the card, operator and terminal.
    BadProof {
        /// Why.
        deny: Deny,
        /// In words.
        why: &'static str,
        /// The challenge.
        pending: Pending,
        /// Its card's operator.
        operator: String,
    },
}

/// The gateway's state.
pub struct Gateway {
    /// Storage.
    pub store: Arc<Store>,
    /// Card trust.
    pub trust: CardTrust,
    /// Attestation roots (the token makers').
    pub attestation: crate::attest::AttestationTrust,
    /// Whether a 9A key must be attested as generated on its token with
    /// a PIN policy other than never, at enrolment and at every tap.
    pub require_attested_pin_key: bool,
    /// The longest a temporary card may last, days.
    pub max_temporary_days: u32,
    /// Enrolment, approvals and the other processes around cards.
    pub lifecycle: crate::config::LifecycleConfig,
    /// Which terminals each application may act on (config
    /// `applications`).
    pub applications: std::collections::BTreeMap<String, crate::config::ApplicationScope>,
    /// What session clocks keep in memory (activity, card removals).
    pub clocks: crate::policy::Clocks,
    /// Step-ups waiting and their tokens.
    pub step_ups: crate::step_up::StepUps,
    /// Failures in a row, by card, operator and terminal.
    pub throttle: crate::throttle::Throttle,
    /// Challenges.
    pub challenges: Challenges,
    /// Clock.
    pub clock: Box<dyn Clock>,
    /// Randomness for challenges.
    pub random: Box<dyn Randomness>,
    /// Agents' last presence.
    pub presence: Mutex<HashMap<String, Instant>>,
    /// Terminals whose agent reports no PIN entry (no keypad, no pinpad):
    /// they cannot answer a step-up.
    pub no_pin_entry: Mutex<std::collections::HashSet<String>>,
    /// Metrics counters.
    pub counters: Counters,
    /// CRL intake counters and what was already reported.
    pub crl_intake: crate::crl::CrlIntake,
    /// What callers may cost.
    pub limits: crate::config::LimitsConfig,
    /// Certificates found valid by the periodic session re-check: by
    /// fingerprint, the CRL generation and until when the finding holds.
    pub verdict_cache: Mutex<HashMap<[u8; 32], (u64, SystemTime)>>,
    /// The key that signs audit checkpoints.
    pub checkpoint_key: crate::audit::CheckpointKey,
    /// Set while a backup is taken: one at a time.
    pub backup_running: std::sync::atomic::AtomicBool,
    /// Audit records of refusals each caller may still cause.
    pub audit_budget: Mutex<crate::limits::AuditBudget>,
    /// Live event watchers.
    pub watchers: Mutex<Watchers>,
    /// Each agent's presence stream (a generation and the sender whose drop
    /// ends it): a new stream replaces the old one.
    pub presence_streams: Mutex<HashMap<String, (u64, tokio::sync::oneshot::Sender<()>)>>,
    /// How long an agent may be silent.
    pub agent_grace: Duration,
    /// The data folder (service PKI files).
    pub data_dir: std::path::PathBuf,
    /// Set when the gateway is stopping: long-lived streams end, so a
    /// graceful shutdown does not wait for them forever.
    pub stopping: tokio::sync::watch::Sender<bool>,
}

enum BeginCheck {
    Ready { card: [u8; 16], mechanism: Mechanism, algorithm: KeyAlgorithm, der: Vec<u8>, supplied: bool, purpose: Purpose },
    NeedCertificate(Slot),
}

/// The terminals a set of changes locks or unlocks.
fn locked_terminals(changes: &[Change]) -> Vec<String> {
    changes
        .iter()
        .filter_map(|c| match c {
            Change::Session { terminal } => Some(terminal.id.clone()),
            _ => None,
        })
        .collect()
}

/// A card enrolment, as an administrator asks for it.
#[derive(Debug, Clone, Copy)]
pub struct Enrolment<'a> {
    /// The operator who carries the card.
    pub operator_id: &'a str,
    /// The slot's certificate, DER.
    pub certificate: &'a [u8],
    /// Which slot.
    pub slot: Slot,
    /// Enrolled-key cards: the card whose other slot this key is for.
    pub to_card: Option<[u8; 16]>,
    /// The key's attestation and the token's attestation certificate
    /// (YubiKey: `yubico-piv-tool -a attest`, and slot F9's certificate).
    pub attestation: Option<(&'a [u8], &'a [u8])>,
    /// Check only: nothing is written or audited.
    pub dry_run: bool,
    /// A temporary card: refused this many days after enrolment (0:
    /// permanent).
    pub temporary_days: u32,
}

/// An enrolment decided and not yet written (see
/// [`Gateway::prepare_enrolment`]).
pub(crate) struct Prepared {
    /// The card as it will be stored.
    pub card: Card,
    /// The audit record's detail.
    pub detail: serde_json::Value,
    /// What changes with it: an approval request opened, an older one
    /// withdrawn.
    pub extra: Vec<Change>,
}

/// A begin-authentication request, parsed.
#[derive(Debug, Clone)]
pub struct BeginRequest {
    /// Terminal.
    pub terminal: String,
    /// The agent's hint: the CHUID GUID, or the card id it learned.
    pub card_uuid: Option<[u8; 16]>,
    /// FASC-N, if sent.
    pub fascn: Option<Vec<u8>>,
    /// Certificate, if sent.
    pub certificate: Option<Vec<u8>>,
    /// Requested mechanism, if any.
    pub mechanism: Option<Mechanism>,
    /// The step-up this proof answers (none: a tap that unlocks).
    pub step_up: Option<[u8; 16]>,
}

impl Gateway {
    pub fn now_ms(&self) -> i64 {
        self.clock.system().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    }

    pub(crate) fn count(&self, outcome: &'static str) {
        if let Ok(mut m) = self.counters.outcomes.lock() {
            *m.entry(outcome).or_insert(0) += 1;
        }
    }

    /// A backup for `caller`: the action is audited (and so in the backup),
    /// then the cut is taken (off the async workers: it copies the state
    /// under the ledger lock) and made durable, so the backup holds nothing
    /// the gateway could still lose.
    pub async fn backup_cut(self: &Arc<Self>, caller: &Caller) -> Result<crate::store::BackupCut> {
        let entry = AuditEntry { kind: AuditKind::Backup, actor: caller.to_string(), terminal_id: String::new(), detail: json!({}) };
        self.commit(entry, vec![]).await?;
        let gw = self.clone();
        let cut = tokio::task::spawn_blocking(move || gw.store.backup_cut()).await.map_err(|e| Error::Backup(e.to_string()))??;
        self.store.durable().await?;
        Ok(cut)
    }

    /// Appends an audit record with changes and waits until durable, then
    /// publishes the events.
    pub async fn commit(&self, entry: AuditEntry, changes: Vec<Change>) -> Result<(AuditRecord, Vec<Event>)> {
        let (rec, events) = self.store.record(entry, changes, self.now_ms())?;
        let events = self.settle(events).await?;
        Ok((rec, events))
    }

    /// Like [`Gateway::commit`], deciding under the ledger lock (see
    /// [`Store::record_with`]). Returns `None` when `decide` recorded nothing.
    pub async fn commit_with(&self, decide: impl FnOnce() -> Result<Option<(AuditEntry, Vec<Change>)>>) -> Result<Option<(AuditRecord, Vec<Event>)>> {
        match self.store.record_with(self.now_ms(), decide)? {
            Some((rec, events)) => Ok(Some((rec, self.settle(events).await?))),
            None => Ok(None),
        }
    }

    /// Waits until what was just written is durable, then publishes its
    /// events. On a task of its own: a caller that goes away (a client that
    /// resets its call, a deadline) cannot leave a written lock unpublished
    /// and a console or agent believing the terminal still unlocked.
    async fn settle(&self, events: Vec<Event>) -> Result<Vec<Event>> {
        let store = self.store.clone();
        tokio::spawn(async move {
            store.durable().await?;
            store.publish(&events);
            Ok(events)
        })
        .await
        .map_err(|e| Error::Transaction(format!("durability task: {e}")))?
    }

    pub(crate) async fn deny(&self, caller: &Caller, terminal: &str, stage: &str, deny: Deny, detail: serde_json::Value) -> Result<(Deny, String)> {
        self.count(deny.name());
        let text = detail.get("why").and_then(|v| v.as_str()).unwrap_or(deny.name()).to_string();
        let audited = self
            .audit_refusal(
                &caller.to_string(),
                AuditEntry {
                    kind: AuditKind::AuthDenied,
                    actor: caller.to_string(),
                    terminal_id: terminal.to_string(),
                    detail: json!({ "stage": stage, "reason": deny.name(), "detail": detail }),
                },
            )
            .await?;
        if audited {
            tracing::info!(terminal, caller = %caller, reason = deny.name(), "authentication denied");
        }
        Ok((deny, text))
    }

    /// Audits a refusal (a denied authentication, a refused call or
    /// handshake) if `budget_key` has budget left; otherwise counts it for
    /// the next `audit.suppressed` summary. Returns whether it was audited.
    pub async fn audit_refusal(&self, budget_key: &str, entry: AuditEntry) -> Result<bool> {
        let allowed = self.audit_budget.lock().map(|mut b| b.allow(budget_key, entry.kind, self.clock.instant())).unwrap_or(false);
        if allowed {
            self.commit(entry, vec![]).await?;
        } else {
            self.counters.audit_suppressed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(allowed)
    }

    /// Writes one `audit.suppressed` record with the refusals the budget
    /// kept out of the log since the last one (called every
    /// `limits.audit_summary_s`).
    pub async fn summarise_suppressed(&self) -> Result<()> {
        let counts = self.audit_budget.lock().map(|mut b| b.take_suppressed()).unwrap_or_default();
        if counts.is_empty() {
            return Ok(());
        }
        let total: u64 = counts.iter().map(|(_, _, n)| n).sum();
        let listed: Vec<serde_json::Value> =
            counts.iter().take(100).map(|(caller, kind, n)| json!({ "caller": caller, "kind": kind.as_str(), "count": n })).collect();
        let unlisted: u64 = counts.iter().skip(100).map(|(_, _, n)| n).sum();
        tracing::warn!(total, "refusals past their callers' audit budget were counted, not recorded one by one");
        self.commit(
            AuditEntry {
                kind: AuditKind::AuditSuppressed,
                actor: "gateway".into(),
                terminal_id: String::new(),
                detail: json!({ "total": total, "suppressed": listed, "not_listed": unlisted }),
            },
            vec![],
        )
        .await?;
        Ok(())
    }

    /// Signs a checkpoint of the audit log's head, if it moved since the
    /// last one. The head is durable before it is signed, and the
    /// checkpoint before this returns.
    pub async fn sign_checkpoint(&self) -> Result<Option<crate::audit::Checkpoint>> {
        let (index, hash) = self.store.audit_head()?;
        if index == 0 || self.store.latest_checkpoint()?.is_some_and(|c| c.index >= index) {
            return Ok(None);
        }
        self.store.durable().await?;
        let c = self.checkpoint_key.sign(index, &hash, self.now_ms())?;
        self.store.put_checkpoint(&c)?;
        self.store.durable().await?;
        Ok(Some(c))
    }

    /// Takes a watcher's place for `caller`, within the total and
    /// per-caller caps.
    pub fn watcher_slot(self: &Arc<Self>, caller: &Caller) -> Result<WatcherSlot> {
        let key = caller.to_string();
        let mut w = self.watchers.lock().map_err(|_| Error::Exhausted("watcher lock"))?;
        if w.total >= self.limits.max_watchers {
            return Err(Error::Exhausted("too many watchers"));
        }
        let mine = w.by_caller.get(&key).copied().unwrap_or(0);
        if mine >= self.limits.max_watchers_per_caller {
            return Err(Error::Exhausted("too many watchers for this caller"));
        }
        w.total += 1;
        w.by_caller.insert(key.clone(), mine + 1);
        Ok(WatcherSlot { gateway: self.clone(), caller: key })
    }

    /// The number of live watchers.
    pub fn watcher_count(&self) -> usize {
        self.watchers.lock().map(|w| w.total).unwrap_or(0)
    }

    /// Registers a new presence stream for `agent`, ending the one it had:
    /// returns the stream's generation and what resolves when a newer
    /// stream replaces it.
    pub fn presence_stream(&self, agent: &str) -> (u64, tokio::sync::oneshot::Receiver<()>) {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let generation = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Ok(mut m) = self.presence_streams.lock() {
            // Dropping the old sender ends the old stream.
            m.insert(agent.to_string(), (generation, tx));
        }
        (generation, rx)
    }

    /// Forgets `agent`'s presence stream if it is still `generation`.
    pub fn presence_stream_ended(&self, agent: &str, generation: u64) {
        if let Ok(mut m) = self.presence_streams.lock() {
            if m.get(agent).is_some_and(|(g, _)| *g == generation) {
                m.remove(agent);
            }
        }
    }

    /// The terminal, if bound to this agent.
    pub(crate) fn bound_terminal(&self, agent: &str, terminal: &str) -> Result<Option<Terminal>> {
        let Some(a) = self.store.agent(agent)? else { return Ok(None) };
        if !a.terminals.iter().any(|t| t == terminal) {
            return Ok(None);
        }
        self.store.terminal(terminal)
    }

    fn begin_check(&self, caller: &Caller, req: &BeginRequest) -> Result<std::result::Result<BeginCheck, (Deny, serde_json::Value)>> {
        let hint = req.card_uuid.as_ref().map(uuid_text);
        let denied = |d: Deny, why: &str| Ok(Err((d, json!({ "why": why, "card_uuid": hint }))));
        // An agent learns nothing about cards at terminals it does not serve.
        let Some(terminal) = self.bound_terminal(&caller.name, &req.terminal)? else {
            return denied(Deny::TerminalNotBound, "terminal unknown or not bound to this agent");
        };
        // A step-up answers one waiting at this terminal (see `step_up.rs`).
        let wanted = match req.step_up {
            Some(id) => match self.step_ups.wanted(&id, self.clock.instant()) {
                Some(w) if w.asked.terminal == req.terminal => Some(w),
                _ => return denied(Deny::StepUpUnknown, "no such step-up waits at this terminal"),
            },
            None => None,
        };
        // Which enrolled card this is: the agent's hint (a CHUID GUID, or
        // the id it learned) or the CHUID's FASC-N; else the certificate,
        // when offered, by its key (any card) or its card UUID (FIPS 201
        // cards). The hint only picks the card: the proof is judged against
        // that card's own certificates.
        let offered = match req.certificate.as_deref().map(verify::inspect).transpose() {
            Ok(i) => i,
            Err(d) => return denied(d, "certificate refused"),
        };
        let hinted = match (req.card_uuid.map(|u| self.store.card(&u)).transpose()?.flatten(), &req.fascn) {
            (Some(c), _) => Some(c),
            (None, Some(f)) => self.store.card_by_fascn(f)?.map(|u| self.store.card(&u)).transpose()?.flatten(),
            (None, None) => None,
        };
        let card = match (hinted, &offered) {
            (Some(c), _) => Some(c),
            (None, Some(info)) => match self.store.card_by_key(&info.key_sha256)?.or(info.uuid) {
                Some(id) => self.store.card(&id)?,
                None => None,
            },
            (None, None) => None,
        };
        let Some(card) = card else {
            // A step-up is proven with a PIN key: its certificate, to find
            // the card by.
            if wanted.is_some() {
                return match offered {
                    Some(_) => denied(Deny::UnknownCard, "card not enrolled"),
                    None => Ok(Ok(BeginCheck::NeedCertificate(Slot::PivAuthentication))),
                };
            }
            // A card no one enrolled, tapped into this terminal's enrolment
            // window: its 9A key proves possession and the PIN, and the
            // proof enrols it (see `lifecycle.rs`).
            if let Some(w) = self.open_window(&req.terminal)? {
                let (Some(der), Some(info)) = (req.certificate.as_deref(), &offered) else {
                    return Ok(Ok(BeginCheck::NeedCertificate(Slot::PivAuthentication)));
                };
                if req.mechanism == Some(Mechanism::CardOnly) {
                    return denied(Deny::MechanismNotAllowed, "an enrolment needs card and PIN, and this terminal offers card only");
                }
                let e = Enrolment {
                    operator_id: &w.operator_id,
                    certificate: der,
                    slot: Slot::PivAuthentication,
                    to_card: None,
                    attestation: None,
                    dry_run: true,
                    temporary_days: w.temporary_days,
                };
                let p = match self.prepare_enrolment(&w.opened_by, &e) {
                    Ok(p) => p,
                    Err(e) => return denied(Deny::EnrolmentRefused, &e.to_string()),
                };
                // Failed enrolment proofs lately slow the next one, by card
                // and terminal (not the window's operator: a stranger's card
                // must not lock them out).
                if let Some((d, why)) = self.delayed(Some(p.card.uuid), None, &req.terminal) {
                    return denied(d, &why);
                }
                return Ok(Ok(BeginCheck::Ready {
                    card: p.card.uuid,
                    mechanism: Mechanism::CardAndPin,
                    algorithm: info.algorithm,
                    der: der.to_vec(),
                    supplied: true,
                    purpose: Purpose::Enrol(w),
                }));
            }
            if offered.is_some() {
                return denied(Deny::UnknownCard, "card not enrolled");
            }
            // A card without a CHUID, or one the agent has not met, is
            // found by the key of the slot the terminal will use.
            let wanted = match req.mechanism {
                Some(m) if terminal.policy.allowed_mechanisms.contains(&m) => Some(m),
                Some(_) => None,
                None => terminal.policy.allowed_mechanisms.first().copied(),
            };
            return match wanted {
                Some(m) => Ok(Ok(BeginCheck::NeedCertificate(m.slot()))),
                None => denied(Deny::MechanismNotAllowed, "mechanism not allowed at this terminal"),
            };
        };
        if card.identity == IdentityRule::Fips201 {
            if req.card_uuid.is_some_and(|u| u != card.uuid) {
                return denied(Deny::IdentityMismatch, "the CHUID names another card than the certificate or FASC-N");
            }
            if let (Some(a), Some(b)) = (&req.fascn, &card.fascn) {
                if a != b {
                    return denied(Deny::IdentityMismatch, "FASC-N does not match the enrolled card");
                }
            }
        }
        // Failures lately slow the next proof; an operator locked out
        // proves nothing until an administrator lifts it.
        if let Some((d, why)) = self.throttled(card.uuid, &card.operator_id, &req.terminal)? {
            return denied(d, &why);
        }
        let step_up_policy;
        let (mechanism, overlay, purpose) = match &wanted {
            Some(w) => {
                if let Err(why) = step_up_holder(&terminal, &card, w) {
                    return denied(Deny::StepUpOtherOperator, why);
                }
                step_up_policy = step_up_policy_of(&terminal);
                let purpose = Purpose::StepUp { id: w.asked.id, action: w.asked.action.clone(), params_sha256: w.params_sha256 };
                (Some(Mechanism::CardAndPin), Overlay { policy: Some((&req.terminal, &step_up_policy)), ..Default::default() }, purpose)
            }
            None => (req.mechanism, Overlay::default(), Purpose::Unlock),
        };
        let ask = Ask {
            agent: &caller.name,
            terminal: &req.terminal,
            card: card.uuid,
            mechanism,
            certificate: Certificate::Offered(req.certificate.as_deref()),
            check: Check::Full,
            overlay: &overlay,
            session: None,
        };
        match self.authorize(&ask)? {
            Verdict::Allowed(a) => {
                let algorithm = a.info.as_ref().map(|i| i.algorithm).ok_or_else(|| Error::Transaction("a full check without the certificate".into()))?;
                Ok(Ok(BeginCheck::Ready { card: a.card.uuid, mechanism: a.mechanism, algorithm, der: a.certificate, supplied: a.supplied, purpose }))
            }
            Verdict::NeedCertificate(slot) => Ok(Ok(BeginCheck::NeedCertificate(slot))),
            Verdict::Refused(d, why) => denied(d, why),
            Verdict::SessionRoleRemoved => denied(Deny::NotAuthorized, "role removed"),
        }
    }

    /// BeginAuthentication.
    pub async fn begin(&self, caller: &Caller, req: BeginRequest) -> Result<Begin> {
        let t = req.terminal.as_str();
        match self.begin_check(caller, &req)? {
            Err((deny, detail)) => {
                let (d, text) = self.deny(caller, t, "begin", deny, detail).await?;
                // The application hears that its step-up was refused.
                if let Some(id) = req.step_up.filter(|_| d != Deny::StepUpUnknown) {
                    self.step_up_refused(caller, &id, d, &text).await?;
                }
                Ok(Begin::Denied(d, text))
            }
            Ok(BeginCheck::NeedCertificate(slot)) => Ok(Begin::CertificateNeeded(slot)),
            Ok(BeginCheck::Ready { card, mechanism, algorithm, der, supplied, purpose }) => {
                // A supplied certificate is kept only once a proof with its
                // key succeeds (see `complete`).
                let issued = self.challenges.issue(
                    &caller.name,
                    t,
                    card,
                    mechanism,
                    algorithm,
                    der,
                    supplied,
                    purpose,
                    &*self.random,
                    self.clock.instant(),
                    self.now_ms(),
                )?;
                Ok(Begin::Challenge { id: issued.id, message: issued.message, mechanism, algorithm, ttl: self.challenges.ttl() })
            }
        }
    }

    /// CompleteAuthentication.
    pub async fn complete(&self, caller: &Caller, challenge_id: &[u8], terminal: &str, signature: &[u8]) -> Result<Complete> {
        let started = Instant::now();
        let generation = self.trust.generation();
        let decided = self.decide(caller, challenge_id, terminal, signature);
        if let Ok(mut v) = self.counters.verify_us.lock() {
            push_sample(&mut v, started.elapsed().as_micros() as u64);
        }
        match decided? {
            Err((deny, detail)) => {
                let (d, text) = self.deny(caller, terminal, "complete", deny, detail).await?;
                Ok(Complete::Denied(d, text))
            }
            Ok(Decided::Enrol(p, window)) => self.complete_enrolment(caller, p, window, signature).await,
            Ok(Decided::StepUp(p, card, operator)) => self.complete_step_up(caller, p, &card, &operator).await,
            Ok(Decided::BadProof { deny, why, pending, operator }) => {
                let (d, text) = self.deny(caller, terminal, "complete", deny, json!({ "why": why, "card_uuid": uuid_text(&pending.card_uuid) })).await?;
                let issued = pending.expires.checked_sub(self.challenges.ttl()).unwrap_or(pending.expires);
                self.failures(caller, Some(pending.card_uuid), Some(&operator), terminal, 1, issued).await?;
                if let Purpose::StepUp { id, .. } = &pending.purpose {
                    self.step_up_refused(caller, id, d, &text).await?;
                }
                Ok(Complete::Denied(d, text))
            }
            Ok(Decided::Unlock(p, operator, validation)) => {
                // Re-check, under the ledger lock, everything an
                // administrator may have changed since the checks above: a
                // revocation or unbinding either lands before this grant
                // (and refuses it) or after (and finds the session to lock).
                let mut refused: Option<(Deny, &'static str)> = None;
                let mut holder = String::new();
                let now = self.now_ms();
                let caller_name = caller.name.clone();
                let granted = self
                    .commit_with(|| {
                        let ask = Ask {
                            agent: &caller_name,
                            terminal: &p.terminal,
                            card: p.card_uuid,
                            mechanism: Some(p.mechanism),
                            certificate: Certificate::Pinned(&p.certificate),
                            check: Check::SinceGeneration(generation),
                            overlay: &Overlay::default(),
                            session: None,
                        };
                        let allowed = match self.authorize(&ask)? {
                            Verdict::Allowed(a) => a,
                            Verdict::Refused(d, why) => {
                                refused = Some((d, why));
                                return Ok(None);
                            }
                            Verdict::NeedCertificate(_) | Verdict::SessionRoleRemoved => {
                                refused = Some((Deny::UnknownCard, "certificate no longer enrolled"));
                                return Ok(None);
                            }
                        };
                        let Allowed { terminal: term, mut card, operator: judged, break_glass, .. } = *allowed;
                        // The session is the operator the proof was judged
                        // for (a break-glass by presence that began or ended
                        // meanwhile changes it): else nothing is granted.
                        if judged.id != operator.id {
                            refused = Some((Deny::BreakGlassEnded, "whose session the card opens changed while the proof was checked (a break-glass began or ended): tap again"));
                            return Ok(None);
                        }
                        let operator = judged;
                        holder = card.operator_id.clone();
                        let mut changes = Vec::new();
                        // The same card tapped again while its removal's
                        // grace runs continues the session (the same
                        // operator's): no lock between.
                        let continues = matches!(&term.session, Session::Unlocked { card_uuid, operator_id, .. } if *card_uuid == p.card_uuid && *operator_id == operator.id)
                            && self.removal_pending(&p.terminal);
                        if matches!(term.session, Session::Unlocked { .. }) && !continues {
                            changes.push(Change::Session {
                                terminal: Terminal { session: Session::Locked { reason: LockReason::Replaced, since_ms: now, sequence: 0 }, ..term.clone() },
                            });
                        }
                        changes.push(Change::Session {
                            terminal: Terminal {
                                session: Session::Unlocked {
                                    operator_id: operator.id.clone(),
                                    operator_name: operator.name.clone(),
                                    roles: operator.roles.clone(),
                                    mechanism: p.mechanism,
                                    card_uuid: p.card_uuid,
                                    agent: caller_name.clone(),
                                    since_ms: now,
                                    sequence: 0,
                                },
                                ..term
                            },
                        });
                        // Every use of a break-glass grant is on record as
                        // one (and, by presence, whose badge opened it).
                        let present = break_glass.as_ref().and_then(|g| g.present.clone());
                        let break_glass = break_glass.map(|g| hex::encode(g.id));
                        let mut certificate_added = false;
                        if p.supplied && !card.certificates.contains_key(&p.mechanism.slot()) {
                            // Proven by this very signature: keep it.
                            card.certificates.insert(p.mechanism.slot(), p.certificate.clone());
                            changes.push(Change::Card(card));
                            certificate_added = true;
                        }
                        let detail = json!({
                            "operator": operator.id,
                            "card_uuid": uuid_text(&p.card_uuid),
                            "mechanism": format!("{:?}", p.mechanism),
                            "revocation_source": validation.revocation_source,
                            "crl_age_s": validation.crl_age_s,
                            "certificate_added": certificate_added,
                            "break_glass": break_glass,
                            "present": present,
                        });
                        Ok(Some((AuditEntry { kind: AuditKind::AuthGranted, actor: caller.to_string(), terminal_id: p.terminal.clone(), detail }, changes)))
                    })
                    .await?;
                let Some((_, events)) = granted else {
                    let (d, why) = refused.unwrap_or((Deny::TerminalNotBound, "state changed"));
                    let (d, text) = self.deny(caller, terminal, "complete", d, json!({ "why": why })).await?;
                    return Ok(Complete::Denied(d, text));
                };
                let operator = self.store.operator(&operator.id)?.unwrap_or(operator);
                // The card's holder proved (an approver's badge: the
                // approver, not the grant's operator).
                self.proof_succeeded(p.card_uuid, &holder, &p.terminal);
                let _ = self.take_removal(&p.terminal);
                self.count("granted");
                // Watch this agent for silence from now on, stream or not.
                if let Ok(mut pr) = self.presence.lock() {
                    pr.entry(caller.name.clone()).or_insert_with(|| self.clock.instant());
                }
                let sequence = events.last().map(|e| e.sequence).unwrap_or(0);
                tracing::info!(terminal = %p.terminal, operator = %operator.id, sequence, "terminal unlocked");
                Ok(Complete::Granted { operator, sequence })
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn decide(
        &self,
        caller: &Caller,
        challenge_id: &[u8],
        terminal: &str,
        signature: &[u8],
    ) -> Result<std::result::Result<Decided, (Deny, serde_json::Value)>> {
        let d = |deny: Deny, why: &str| Ok(Err((deny, json!({ "why": why }))));
        let p = match self.challenges.take(challenge_id, &caller.name, terminal, self.clock.instant()) {
            Ok(p) => p,
            Err(Deny::ChallengeMismatch) => return d(Deny::ChallengeMismatch, "challenge was issued to another agent or terminal"),
            Err(deny) => return d(deny, "challenge refused"),
        };
        match &p.purpose {
            Purpose::Unlock => {}
            Purpose::Enrol(w) => {
                let w = w.clone();
                return Ok(Ok(Decided::Enrol(p, w)));
            }
            Purpose::Approve { .. } => return d(Deny::ChallengeMismatch, "an approval's challenge is not a badge tap's"),
            Purpose::StepUp { .. } => {}
        }
        let step_up_policy;
        let overlay = match &p.purpose {
            Purpose::StepUp { .. } => {
                let t = self.store.terminal(terminal)?.ok_or_else(|| Error::NotFound(format!("terminal {terminal}")))?;
                step_up_policy = step_up_policy_of(&t);
                Overlay { policy: Some((terminal, &step_up_policy)), ..Default::default() }
            }
            _ => Overlay::default(),
        };
        let ask = Ask {
            agent: &caller.name,
            terminal,
            card: p.card_uuid,
            mechanism: Some(p.mechanism),
            certificate: Certificate::Pinned(&p.certificate),
            check: Check::Full,
            overlay: &overlay,
            session: None,
        };
        let allowed = match self.authorize(&ask)? {
            Verdict::Allowed(a) => a,
            Verdict::Refused(deny, why) => return d(deny, why),
            Verdict::NeedCertificate(_) | Verdict::SessionRoleRemoved => return d(Deny::UnknownCard, "certificate no longer enrolled"),
        };
        let (Some(info), Some(validation)) = (allowed.info, allowed.validation) else { return d(Deny::UnknownCard, "certificate not checked") };
        let (card, operator) = (allowed.card, allowed.operator);
        if let Err(deny) = verify::verify_signature(info.algorithm, &info.spki, &p.message, signature) {
            // A 9E (card-only) signature offered where 9A (card and PIN)
            // was asked for is a policy violation, not just a bad signature.
            if deny == Deny::BadSignature && p.mechanism == Mechanism::CardAndPin {
                if let Some(other) = card.certificates.get(&Slot::CardAuthentication) {
                    if let Ok(o) = verify::inspect(other) {
                        if verify::verify_signature(o.algorithm, &o.spki, &p.message, signature).is_ok() {
                            let why = "signed with the card authentication key where the PIN was required";
                            return Ok(Ok(Decided::BadProof { deny: Deny::MechanismNotAllowed, why, pending: p, operator: card.operator_id.clone() }));
                        }
                    }
                }
            }
            return Ok(Ok(Decided::BadProof { deny, why: "signature refused", pending: p, operator: card.operator_id.clone() }));
        }
        if matches!(p.purpose, Purpose::StepUp { .. }) {
            return Ok(Ok(Decided::StepUp(p, Box::new(card), operator)));
        }
        Ok(Ok(Decided::Unlock(p, operator, validation)))
    }

    /// Locks `terminal` if `pred` holds for its session; returns whether it
    /// locked.
    pub async fn lock_if(&self, actor: &str, terminal: &str, reason: LockReason, pred: impl Fn(&Session) -> bool) -> Result<bool> {
        self.lock_when(actor, terminal, |t| Ok(pred(&t.session).then_some(reason))).await
    }

    /// Locks `terminal` if it is unlocked and `decide`, reading it under the
    /// ledger lock, names a reason; returns whether it locked.
    pub async fn lock_when(&self, actor: &str, terminal: &str, decide: impl FnOnce(&Terminal) -> Result<Option<LockReason>>) -> Result<bool> {
        let now = self.now_ms();
        let mut why = None;
        let locked = self
            .commit_with(|| {
                let Some(t) = self.store.terminal(terminal)? else { return Ok(None) };
                let Session::Unlocked { operator_id, .. } = &t.session else { return Ok(None) };
                let Some(reason) = decide(&t)? else { return Ok(None) };
                why = Some(reason);
                let entry = AuditEntry {
                    kind: AuditKind::SessionLocked,
                    actor: actor.to_string(),
                    terminal_id: terminal.to_string(),
                    detail: json!({ "reason": format!("{reason:?}"), "operator": operator_id }),
                };
                let change = Change::Session { terminal: Terminal { session: Session::Locked { reason, since_ms: now, sequence: 0 }, ..t } };
                Ok(Some((entry, vec![change])))
            })
            .await?
            .is_some();
        if locked {
            tracing::info!(terminal, reason = ?why, "terminal locked");
        }
        Ok(locked)
    }

    /// Whether the session at `t` is still allowed, with `overlay` standing
    /// for a change being decided (so an administrator's change and the
    /// locks it causes commit together). `None`: it stands; otherwise why it
    /// must end. The same rules as a grant: operator enabled and holding a
    /// role the terminal allows, terminal bound to the agent, mechanism
    /// allowed, card enrolled and not deny-listed, its certificate valid and
    /// unrevoked. A CRL that is merely stale refuses new taps but does not
    /// end sessions (an issuer's outage must not lock a control room).
    fn session_verdict(&self, t: &Terminal, overlay: &Overlay<'_>) -> Result<Option<LockReason>> {
        let Session::Unlocked { mechanism, card_uuid, agent, roles: session_roles, operator_id, .. } = &t.session else { return Ok(None) };
        let ask = Ask {
            agent,
            terminal: &t.id,
            card: *card_uuid,
            mechanism: Some(*mechanism),
            certificate: Certificate::Enrolled,
            check: Check::Cached,
            overlay,
            // Consoles act on the roles a session carries: one the operator
            // no longer holds ends it (a new tap carries the roles held now).
            session: Some((operator_id, session_roles)),
        };
        Ok(match self.authorize(&ask)? {
            Verdict::Allowed(_) => None,
            Verdict::SessionRoleRemoved => Some(LockReason::RoleRemoved),
            Verdict::NeedCertificate(_) => Some(LockReason::Revoked),
            Verdict::Refused(deny, _) => lock_reason(deny, overlay.policy.is_some_and(|(id, _)| id == t.id)),
        })
    }

    /// Lock changes for the unlocked terminals, among those `which`
    /// selects, that `overlay` no longer allows; with their reasons.
    pub(crate) fn reauthorize(&self, overlay: &Overlay<'_>, now: i64, which: impl Fn(&Terminal) -> bool) -> Result<(Vec<Change>, Vec<serde_json::Value>)> {
        let mut changes = Vec::new();
        let mut locked = Vec::new();
        for t in self.store.terminals()? {
            if !matches!(t.session, Session::Unlocked { .. }) || !which(&t) {
                continue;
            }
            if let Some(reason) = self.session_verdict(&t, overlay)? {
                locked.push(json!({ "terminal": t.id, "reason": format!("{reason:?}") }));
                changes.push(Change::Session { terminal: Terminal { session: Session::Locked { reason, since_ms: now, sequence: 0 }, ..t } });
            }
        }
        Ok((changes, locked))
    }

    /// Locks every session that is no longer allowed (a CRL that revoked
    /// its certificate, a certificate past notAfter). Called after each CRL
    /// change and periodically. Each session is judged outside the ledger
    /// lock first; only one found wanting is judged again under it, and
    /// locked. Returns the terminals locked.
    pub async fn reauthorize_sessions(&self, actor: &str) -> Result<Vec<String>> {
        let mut locked = Vec::new();
        for t in self.store.terminals()? {
            if !matches!(t.session, Session::Unlocked { .. }) || self.session_verdict(&t, &Overlay::default())?.is_none() {
                continue;
            }
            if self.lock_when(actor, &t.id, |t| self.session_verdict(t, &Overlay::default())).await? {
                locked.push(t.id);
            }
        }
        Ok(locked)
    }

    /// The card at a terminal was removed.
    pub async fn card_removed(&self, caller: &Caller, terminal: &str, card: Option<[u8; 16]>) -> Result<bool> {
        if self.bound_terminal(&caller.name, terminal)?.is_none() {
            return Err(Error::PermissionDenied(format!("terminal {terminal} is not bound to this agent")));
        }
        self.lock_when(&caller.to_string(), terminal, |t| {
            let theirs = match (&t.session, card) {
                (Session::Unlocked { card_uuid, .. }, Some(c)) => *card_uuid == c,
                _ => true,
            };
            Ok((theirs && !self.removal_grace(t)).then_some(LockReason::CardRemoved))
        })
        .await
    }

    /// A presence report: remembers the agent and locks terminals whose
    /// reported card no longer matches their session (a card pulled while
    /// the link was down).
    /// The agent says whether its terminal can take a PIN (a keypad or a
    /// pinpad reader), for its terminals only.
    pub fn pin_entry(&self, caller: &Caller, terminal: &str, can: bool) -> Result<()> {
        if self.bound_terminal(&caller.name, terminal)?.is_none() {
            return Ok(());
        }
        if let Ok(mut n) = self.no_pin_entry.lock() {
            if can {
                n.remove(terminal);
            } else {
                n.insert(terminal.to_string());
            }
        }
        Ok(())
    }

    pub async fn presence(&self, caller: &Caller, reports: &[(String, bool, Option<[u8; 16]>)]) -> Result<Vec<String>> {
        if let Ok(mut p) = self.presence.lock() {
            p.insert(caller.name.clone(), self.clock.instant());
        }
        let mut locked = Vec::new();
        for (terminal, card_present, card) in reports {
            if self.bound_terminal(&caller.name, terminal)?.is_none() {
                continue;
            }
            // The session stands only while the agent sees that very card.
            let gone = |s: &Session| match s {
                Session::Unlocked { card_uuid, .. } => !*card_present || *card != Some(*card_uuid),
                Session::Locked { .. } => false,
            };
            let decide = |t: &Terminal| Ok((gone(&t.session) && !self.removal_grace(t)).then_some(LockReason::CardRemoved));
            if self.lock_when(&caller.to_string(), terminal, decide).await? {
                locked.push(terminal.clone());
            }
        }
        Ok(locked)
    }

    /// Locks the terminals of agents silent past their grace period, and
    /// sessions their clocks end (maximum session, idle, hours, a card
    /// removal's grace). Called periodically.
    pub async fn sweep(&self) -> Result<()> {
        let now = self.clock.instant();
        let silent: Vec<String> = self
            .presence
            .lock()
            .map(|p| p.iter().filter(|(_, t)| now.saturating_duration_since(**t) > self.agent_grace).map(|(a, _)| a.clone()).collect())
            .unwrap_or_default();
        for agent in silent {
            if let Some(a) = self.store.agent(&agent)? {
                for t in &a.terminals {
                    self.lock_if("gateway", t, LockReason::AgentSilent, |s| matches!(s, Session::Unlocked { agent: ag, .. } if *ag == agent)).await?;
                }
            }
            if let Ok(mut p) = self.presence.lock() {
                p.remove(&agent);
            }
        }
        // Hourly: closed requests past their keeping forgotten.
        let now_ms = self.now_ms();
        let last = self.clocks.pruned_ms.load(std::sync::atomic::Ordering::Relaxed);
        if now_ms - last >= 3_600_000 {
            self.clocks.pruned_ms.store(now_ms, std::sync::atomic::Ordering::Relaxed);
            self.prune_requests().await?;
        }
        self.lock_by_clocks().await
    }

    // ---- administration ----

    fn admin_entry(caller: &Caller, kind: crate::model::AuditKind, detail: serde_json::Value) -> AuditEntry {
        AuditEntry { kind, actor: caller.to_string(), terminal_id: String::new(), detail }
    }

    /// Lock changes for every unlocked terminal whose session matches.
    fn locks_where(&self, reason: LockReason, now: i64, matches: impl Fn(&Terminal) -> bool) -> Result<Vec<Change>> {
        Ok(self
            .store
            .terminals()?
            .into_iter()
            .filter(|t| matches!(t.session, Session::Unlocked { .. }) && matches(t))
            .map(|t| Change::Session { terminal: Terminal { session: Session::Locked { reason, since_ms: now, sequence: 0 }, ..t } })
            .collect())
    }

    /// Adds or replaces an operator. Disabling one locks their sessions in
    /// the same step.
    pub async fn add_operator(&self, caller: &Caller, op: Operator) -> Result<()> {
        if op.id.is_empty() {
            return Err(Error::InvalidRequest("operator_id is empty".into()));
        }
        let now = self.now_ms();
        self.commit_with(|| {
            // Disabling the operator or taking a role away ends the sessions
            // it no longer allows, in the same step.
            let overlay = Overlay { operator: Some(&op), ..Default::default() };
            let (mut changes, locked) =
                self.reauthorize(&overlay, now, |t| matches!(&t.session, Session::Unlocked { operator_id, .. } if *operator_id == op.id))?;
            // A privileged role newly held: the operator's cards wait for a
            // second administrator (and end their sessions above).
            let asked = self.ask_approvals_for(&op, &caller.to_string())?;
            let requests: Vec<String> = asked.iter().filter_map(|c| if let Change::Request(r) = c { Some(hex::encode(r.id)) } else { None }).collect();
            changes.extend(asked);
            let detail = json!({ "operator": op.id, "name": op.name, "roles": op.roles, "enabled": op.enabled, "locked_terminals": locked,
                "approval_requests": requests });
            changes.push(Change::Operator(op.clone()));
            Ok(Some((Self::admin_entry(caller, AuditKind::AddOperator, detail), changes)))
        })
        .await?;
        Ok(())
    }

    /// Enrols a card from a certificate, after validating it.
    ///
    /// What the card is depends on its issuer's identity rule. FIPS 201:
    /// the card UUID the certificate names (a new certificate with the same
    /// UUID replaces the slot's). Enrolled key: the certificate's key; a
    /// key already enrolled names its card, `to_card` names the card a new
    /// key joins (its other slot), else a new card is made whose id is
    /// derived from the key. A slot never silently changes key: a new key
    /// for an enrolled slot is a new card.
    pub async fn enrol_card(&self, caller: &Caller, operator_id: &str, der: &[u8], slot: Slot, to_card: Option<[u8; 16]>) -> Result<Card> {
        self.enrol(caller, &Enrolment { operator_id, certificate: der, slot, to_card, attestation: None, dry_run: false, temporary_days: 0 }).await
    }

    /// [`Gateway::enrol_card`], with the slot key's attestation when the
    /// token gave one: it must verify to a configured attestation root and
    /// name the certificate's key, and what it proves is kept with the
    /// card. Where the site requires an attested PIN key, a 9A certificate
    /// without an attestation proving a key generated on the token with a
    /// PIN policy other than never is refused. A card of an operator who
    /// holds a privileged role waits for a second administrator's
    /// approval (an approval request is opened with it).
    pub async fn enrol(&self, caller: &Caller, e: &Enrolment<'_>) -> Result<Card> {
        let by = caller.to_string();
        if e.dry_run {
            return Ok(self.prepare_enrolment(&by, e)?.card);
        }
        let mut enrolled = None;
        self.commit_with(|| {
            let p = self.prepare_enrolment(&by, e)?;
            let mut changes = p.extra;
            changes.push(Change::Card(p.card.clone()));
            enrolled = Some(p.card);
            Ok(Some((Self::admin_entry(caller, AuditKind::EnrolCard, p.detail), changes)))
        })
        .await?;
        enrolled.ok_or_else(|| Error::Transaction("enrolment not recorded".into()))
    }

    /// Decides an enrolment without writing it: the card as it will be
    /// stored and what changes with it. `by` asked for it (an
    /// administrator, or the one who opened an enrolment window).
    pub(crate) fn prepare_enrolment(&self, by: &str, e: &Enrolment<'_>) -> Result<Prepared> {
        let Enrolment { operator_id, certificate: der, slot, to_card, attestation, dry_run: _, temporary_days } = *e;
        if temporary_days > self.max_temporary_days {
            return Err(Error::InvalidRequest(format!("a temporary card lasts at most {} days (cards.max_temporary_days)", self.max_temporary_days)));
        }
        let Some(operator) = self.store.operator(operator_id)? else { return Err(Error::NotFound(format!("operator {operator_id}"))) };
        let info = verify::inspect(der).map_err(|d| Error::InvalidRequest(format!("certificate: {}", d.name())))?;
        let validation =
            self.trust.validate(der, slot, self.clock.system()).map_err(|d| Error::InvalidRequest(format!("certificate refused: {}", d.name())))?;
        let attested = match attestation {
            Some((att, intermediate)) => Some(
                self.attestation
                    .verify(att, intermediate, &info.spki, self.clock.system())
                    .map_err(|r| Error::InvalidRequest(format!("attestation refused: {r}")))?,
            ),
            None => None,
        };
        if slot == Slot::PivAuthentication && self.require_attested_pin_key && !attested.as_ref().is_some_and(|a| a.is_pin_key()) {
            return Err(Error::InvalidRequest(match &attested {
                None => "this site requires the 9A key to be attested (cards.require_attested_pin_key): enrol it with the token's attestation".into(),
                Some(a) => format!(
                    "this site requires the 9A key to ask for the PIN, and its attestation says PIN policy {:?} (cards.require_attested_pin_key)",
                    a.pin_policy
                ),
            }));
        }
        let uuid = match validation.identity {
            IdentityRule::Fips201 => {
                let uuid = info.uuid.ok_or_else(|| {
                    Error::InvalidRequest(
                        "certificate has no urn:uuid: card UUID, and its issuer is a FIPS 201 issuer (cards.trust_anchors); \
                         list the issuer under cards.enrolled_key_anchors to enrol its cards by their key"
                            .into(),
                    )
                })?;
                if to_card.is_some_and(|c| c != uuid) {
                    return Err(Error::InvalidRequest("a FIPS 201 card is the card UUID its certificate names; card_uuid names another".into()));
                }
                uuid
            }
            IdentityRule::EnrolledKey => match (self.store.card_by_key(&info.key_sha256)?, to_card) {
                (Some(held), Some(c)) if held != c => {
                    return Err(Error::AlreadyExists(format!("this key is enrolled for card {}, not {}", uuid_text(&held), uuid_text(&c))))
                }
                (Some(held), _) => held,
                (None, Some(c)) => c,
                (None, None) => crate::model::enrolled_key_id(&info.spki),
            },
        };
        if self.store.denied(DenyKey::Card(uuid))? || self.store.denied(DenyKey::Certificate(info.fingerprint))? {
            return Err(Error::InvalidRequest("card is on the deny list".into()));
        }
        // One key, one card, whatever the rules of their issuers.
        if let Some(other) = self.store.card_by_key(&info.key_sha256)?.filter(|o| *o != uuid) {
            if self.store.card(&other)?.is_some_and(|c| c.certificates.values().any(|d| verify::inspect(d).is_ok_and(|i| i.spki == info.spki))) {
                return Err(Error::AlreadyExists(format!("this key is enrolled for card {}", uuid_text(&other))));
            }
        }
        let mut card = match self.store.card(&uuid)? {
            Some(c) => c,
            None if to_card.is_some() && validation.identity == IdentityRule::EnrolledKey => {
                return Err(Error::NotFound(format!("card {}", uuid_text(&uuid))));
            }
            None => Card::new(uuid, validation.identity, info.fascn.clone().filter(|_| validation.identity == IdentityRule::Fips201), operator_id),
        };
        if card.operator_id != operator_id {
            return Err(Error::AlreadyExists(format!("card {} belongs to operator {}", uuid_text(&uuid), card.operator_id)));
        }
        if card.identity != validation.identity {
            return Err(Error::InvalidRequest(format!(
                "card {} was enrolled under the {} identity rule; this certificate's issuer has the {} rule",
                uuid_text(&uuid),
                card.identity.name(),
                validation.identity.name()
            )));
        }
        let key_of = |slot: Slot| card.certificates.get(&slot).and_then(|d| verify::inspect(d).ok()).map(|i| i.spki);
        if card.identity == IdentityRule::EnrolledKey && key_of(slot).is_some_and(|k| k != info.spki) {
            return Err(Error::AlreadyExists(format!(
                "slot {slot:?} of card {} holds another key: a new key is a new card (revoke this one first)",
                uuid_text(&uuid)
            )));
        }
        let other = match slot {
            Slot::PivAuthentication => Slot::CardAuthentication,
            Slot::CardAuthentication => Slot::PivAuthentication,
        };
        if key_of(other).is_some_and(|k| k == info.spki) {
            return Err(Error::InvalidRequest("the card's other slot holds the same key: a card-only key must not stand in for the PIN key".into()));
        }
        let now = self.now_ms();
        if temporary_days > 0 {
            card.expires_ms = Some(now + i64::from(temporary_days) * 86_400_000);
        }
        // A key the card did not hold is approved anew: an approval is of
        // the keys it saw.
        let new_key = key_of(slot).is_none_or(|k| k != info.spki);
        if new_key {
            card.approval = None;
            card.key_enrolled_by.insert(slot, by.to_string());
        } else {
            // A key enrolled before who enrolled it was recorded: whoever
            // enrols it again answers for it.
            card.key_enrolled_by.entry(slot).or_insert_with(|| by.to_string());
        }
        card.certificates.insert(slot, der.to_vec());
        // A new certificate's key is attested anew or not at all.
        match &attested {
            Some(a) => card.attested.insert(slot, a.clone()),
            None => card.attested.remove(&slot).filter(|a| a.key_sha256 == info.key_sha256).and_then(|a| card.attested.insert(slot, a)),
        };
        card.note(now, by, format!("{} {slot:?} certificate {}", if new_key { "enrolled" } else { "renewed" }, hex::encode(&info.fingerprint[..8])));
        let extra = self.ask_approval(&mut card, &operator, by, "enrolment")?;
        let detail = json!({ "operator": operator_id, "card_uuid": uuid_text(&uuid), "slot": format!("{slot:?}"),
            "identity": card.identity.name(), "key_sha256": hex::encode(info.key_sha256), "expires_ms": card.expires_ms,
            "certificate_sha256": hex::encode(info.fingerprint),
            "approval_request": card.pending.as_ref().map(hex::encode),
            "attested": attested.as_ref().map(|a| json!({ "pin_policy": a.pin_policy, "touch_policy": a.touch_policy,
                "serial": a.serial, "firmware": a.firmware, "attestation_sha256": hex::encode(a.attestation_sha256) })) });
        Ok(Prepared { card, detail, extra })
    }

    /// Suspends a card (`suspend`) or ends its suspension, with `reason`,
    /// in one step with the locks of the terminals it holds: no grant can
    /// slip in between.
    pub async fn suspend_card(&self, caller: &Caller, uuid: [u8; 16], suspend: bool, reason: &str) -> Result<Vec<String>> {
        let now = self.now_ms();
        let mut locked = Vec::new();
        self.commit_with(|| {
            let Some(mut card) = self.store.card(&uuid)? else { return Err(Error::NotFound(format!("card {}", uuid_text(&uuid)))) };
            let (kind, mut changes) = if suspend {
                card.suspended = Some(reason.to_string());
                card.note(now, &caller.to_string(), format!("suspended: {reason}"));
                let locks =
                    self.locks_where(LockReason::CardSuspended, now, |t| matches!(&t.session, Session::Unlocked { card_uuid, .. } if *card_uuid == uuid))?;
                (AuditKind::SuspendCard, locks)
            } else if card.suspended.is_none() {
                return Ok(None);
            } else {
                card.suspended = None;
                card.note(now, &caller.to_string(), format!("resumed: {reason}"));
                (AuditKind::ResumeCard, vec![])
            };
            locked = locked_terminals(&changes);
            let detail = json!({ "card_uuid": uuid_text(&uuid), "operator": card.operator_id, "reason": reason, "locked_terminals": locked });
            changes.push(Change::Card(card));
            Ok(Some((Self::admin_entry(caller, kind, detail), changes)))
        })
        .await?;
        Ok(locked)
    }

    /// Revokes a card: deny-lists its UUID and certificates and locks any
    /// terminal it holds, in one step (no grant can slip in between).
    pub async fn revoke_card(&self, caller: &Caller, uuid: [u8; 16], reason: &str) -> Result<Vec<String>> {
        let now = self.now_ms();
        let mut locked = Vec::new();
        self.commit_with(|| {
            // An id that names no card would deny-list nothing anyone
            // carries while saying "revoked": an enrolled-key card is
            // revoked by the id `card list` shows, not by its CHUID GUID.
            let Some(card) = self.store.card(&uuid)? else {
                return Err(Error::NotFound(format!(
                    "no enrolled card has the id {} (an enrolled-key card goes by the id `card list` shows, not its CHUID GUID)",
                    uuid_text(&uuid)
                )));
            };
            let changes;
            (changes, locked) = self.revocation(card, &caller.to_string(), now, &format!("revoked: {reason}"))?;
            let detail = json!({ "card_uuid": uuid_text(&uuid), "reason": reason, "locked_terminals": locked });
            Ok(Some((Self::admin_entry(caller, AuditKind::RevokeCard, detail), changes)))
        })
        .await?;
        Ok(locked)
    }

    /// What revoking `card` changes: its id and certificates deny-listed,
    /// the terminals it holds locked, its open approval request withdrawn,
    /// and `note` in its history. Returns the changes and the terminals.
    pub(crate) fn revocation(&self, mut card: Card, by: &str, now: i64, note: &str) -> Result<(Vec<Change>, Vec<String>)> {
        let uuid = card.uuid;
        let mut keys = vec![DenyKey::Card(uuid)];
        keys.extend(card.certificates.values().filter_map(|der| verify::inspect(der).ok()).map(|i| DenyKey::Certificate(i.fingerprint)));
        let mut changes = self.locks_where(LockReason::Revoked, now, |t| matches!(&t.session, Session::Unlocked { card_uuid, .. } if *card_uuid == uuid))?;
        let locked = locked_terminals(&changes);
        changes.push(Change::Deny(keys));
        changes.extend(self.withdraw_request(card.pending.take(), now, "the card was revoked")?);
        card.note(now, by, note);
        changes.push(Change::Card(card));
        Ok((changes, locked))
    }

    /// Issues a service certificate (agent, application or administrator)
    /// for `public_key` from the service CA, audited. An administrator
    /// certificate past the bootstrap pair needs a second administrator
    /// (see [`Gateway::issue_admin_certificate`]).
    pub async fn issue_certificate(&self, caller: &Caller, role: crate::pki::Role, name: &str, public_key: &[u8], validity_days: u32) -> Result<Issued> {
        if role == crate::pki::Role::Admin {
            return self.issue_admin_certificate(caller, name, public_key, validity_days).await;
        }
        let ca = crate::pki::ServiceCa::load(&crate::pki::Files::in_dir(&self.data_dir))?;
        let certificate_pem = ca.issue_client(role, name, public_key, validity_days)?;
        self.commit(Self::admin_entry(caller, AuditKind::IssueCertificate, json!({ "role": format!("{role:?}"), "name": name })), vec![]).await?;
        Ok(Issued::Certificate { certificate_pem, ca_pem: ca.cert_pem })
    }

    /// Binds an agent to terminals (creating unknown terminals locked with
    /// the default policy). Terminals taken away from the agent are locked
    /// if it holds them open.
    pub async fn bind_agent(&self, caller: &Caller, name: &str, terminals: Vec<String>) -> Result<()> {
        let now = self.now_ms();
        let agent = Agent { name: name.to_string(), terminals: terminals.clone() };
        self.commit_with(|| {
            let overlay = Overlay { agent: Some(&agent), ..Default::default() };
            let (mut changes, locked) = self.reauthorize(&overlay, now, |t| matches!(&t.session, Session::Unlocked { agent, .. } if agent == name))?;
            changes.push(Change::Agent(agent.clone()));
            for t in &terminals {
                if self.store.terminal(t)?.is_none() {
                    changes.push(Change::Terminal(Terminal::new(t, TerminalPolicy::default(), now)));
                }
            }
            let detail = json!({ "agent": name, "terminals": terminals, "locked_terminals": locked });
            Ok(Some((Self::admin_entry(caller, AuditKind::BindAgent, detail), changes)))
        })
        .await?;
        // What an agent said of its terminals' PIN entry is its own: the
        // agent now bound says it again with its next heartbeat.
        if let Ok(mut n) = self.no_pin_entry.lock() {
            n.retain(|t| !terminals.contains(t));
        }
        Ok(())
    }

    /// Sets a terminal's policy (the session is kept as it is at that
    /// moment, read under the ledger lock).
    pub async fn set_policy(&self, caller: &Caller, id: &str, policy: TerminalPolicy) -> Result<()> {
        if id.is_empty() {
            return Err(Error::InvalidRequest("terminal_id is empty".into()));
        }
        let policy = crate::policy::checked(policy)?;
        let now = self.now_ms();
        self.commit_with(|| {
            // A session the new policy does not allow ends with the change.
            let t = self.store.terminal(id)?.unwrap_or_else(|| Terminal::new(id, policy.clone(), now));
            let group = t.group.clone();
            let (change, locked) = self.with_policy(Terminal { custom_policy: true, ..t }, &policy, now)?;
            let detail = json!({ "terminal": id, "policy": policy, "group": group, "locked_terminals": locked });
            Ok(Some((Self::admin_entry(caller, AuditKind::SetTerminalPolicy, detail), vec![change])))
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod decision_tests;
