//! Step-up: a fresh card-and-PIN proof by the operator already at an
//! unlocked terminal, before a high-risk action.
//!
//! ```text
//! application ── AccessService.StepUp(terminal, action, params digest) ──▶ gateway
//! gateway ── PresenceResponse.step_ups ──▶ agent: prompt (Pattern::StepUp)
//! agent ── Begin(step_up_id) / Complete ──▶ gateway: a StepUpMessage the
//!          operator's card signs after its PIN, naming the action and digest
//! gateway ── StepUpResponse(token) ──▶ application ── token ──▶ the component
//!          doing the action ── AccessService.RedeemStepUp ──▶ gateway: once
//! ```
//!
//! The proof is judged like a tap (`authorize.rs`, always card and PIN,
//! whatever the terminal's mechanisms), and must come from a card of the
//! operator whose session holds the terminal: another operator's card is
//! refused. The grant is audited, durably, before the application hears
//! of it; the token is one-time, short-lived and bound to the action, its
//! parameters, the operator and the terminal, and a second presentation is
//! refused and audited.
//!
//! Everything here is in memory and bounded: a restart forgets waiting
//! step-ups and unredeemed tokens, which is the safe way to fail (the
//! application asks again).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{broadcast, watch};

use crate::authorize::{Ask, Certificate, Check, Overlay, Verdict};
use crate::challenge::{Pending, Purpose};
use crate::core::{Complete, Gateway};
use crate::error::{Error, Result};
use crate::model::{uuid_text, AuditKind, Card, Mechanism, Operator, Session, Terminal, TerminalPolicy};
use crate::pki::Caller;
use crate::store::AuditEntry;
use crate::verify::Deny;

/// The shortest, default and longest wait for the operator.
pub const WAIT_MIN: Duration = Duration::from_secs(5);
/// See [`WAIT_MIN`].
pub const WAIT_DEFAULT: Duration = Duration::from_secs(60);
/// See [`WAIT_MIN`].
pub const WAIT_MAX: Duration = Duration::from_secs(120);
/// How long a granted token can be redeemed.
pub const TOKEN_TTL: Duration = Duration::from_secs(120);
/// Most step-ups waiting at once (one per terminal), and most tokens kept.
pub const WAITING_MAX: usize = 1024;
/// See [`WAITING_MAX`].
pub const TOKENS_MAX: usize = 4096;

/// A step-up as the agents are told of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    /// Identifier.
    pub id: [u8; 16],
    /// The terminal.
    pub terminal: String,
    /// The action, in words.
    pub action: String,
    /// Until when it waits.
    pub expires: Instant,
}

/// What the operator's proof is checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The step-up.
    pub asked: Asked,
    /// The operator whose session held the terminal when it was asked.
    pub operator_id: String,
    /// SHA-256 of the action's parameters.
    pub params_sha256: [u8; 32],
    /// The application that asked (certificate identity).
    pub asked_by: String,
}

/// A proof made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// The one-time token.
    pub token: [u8; 32],
    /// The step-up it answers.
    pub step_up: [u8; 16],
    /// Where.
    pub terminal: String,
    /// Who.
    pub operator_id: String,
    /// With which card.
    pub card: [u8; 16],
    /// For what.
    pub action: String,
    /// With which parameters.
    pub params_sha256: [u8; 32],
    /// When, Unix ms.
    pub proven_ms: i64,
    /// Redeemable until.
    pub expires: Instant,
}

/// How a step-up ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Proven.
    Granted(Proof),
    /// The proof was refused.
    Denied(Deny, String),
    /// Nobody proved in time.
    TimedOut,
    /// A newer step-up at the terminal took its place.
    Superseded,
}

/// Why a token is not honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redeem {
    /// Never issued, or forgotten (expired, or a restart since).
    Unknown,
    /// Presented before.
    Replayed,
    /// Issued for another terminal, action or parameters.
    Mismatch,
}

struct Waiting {
    wanted: Wanted,
    done: watch::Sender<Option<Outcome>>,
}

/// A step-up taken out of the waiting ones by a proof being committed.
pub struct Claimed(Waiting);

struct Token {
    proof: Proof,
    redeemed: bool,
}

#[derive(Default)]
struct Inner {
    waiting: HashMap<[u8; 16], Waiting>,
    tokens: HashMap<[u8; 32], Token>,
    /// Asks per caller: a token bucket (tokens, last refill).
    asks: HashMap<String, (f64, Instant)>,
}

/// Step-ups a caller may ask at once, and per second after.
const ASK_BURST: f64 = 10.0;
const ASK_RATE: f64 = 1.0;

/// The step-ups waiting and the tokens issued.
pub struct StepUps {
    inner: Mutex<Inner>,
    pushed: broadcast::Sender<Asked>,
}

impl Default for StepUps {
    fn default() -> Self {
        StepUps { inner: Mutex::new(Inner::default()), pushed: broadcast::channel(64).0 }
    }
}

fn locked() -> Error {
    Error::Exhausted("step-up lock")
}

impl StepUps {
    /// New step-ups as they are asked (the agents' presence streams).
    pub fn subscribe(&self) -> broadcast::Receiver<Asked> {
        self.pushed.subscribe()
    }

    /// Registers a step-up; a waiting one at the same terminal is
    /// superseded. Returns what resolves with its outcome.
    pub fn ask(&self, wanted: Wanted, now: Instant) -> Result<watch::Receiver<Option<Outcome>>> {
        let mut g = self.inner.lock().map_err(|_| locked())?;
        g.waiting.retain(|_, w| w.wanted.asked.expires > now || w.done.receiver_count() > 0);
        // Only the application that asked replaces its step-up: another
        // one's is not swapped under the operator's PIN.
        if let Some(w) = g
            .waiting
            .values()
            .find(|w| w.wanted.asked.terminal == wanted.asked.terminal && w.wanted.asked.expires > now && w.wanted.asked_by != wanted.asked_by)
        {
            return Err(Error::Precondition(format!("a step-up asked by {} waits at terminal {}", w.wanted.asked_by, wanted.asked.terminal)));
        }
        if g.asks.len() > WAITING_MAX {
            g.asks.retain(|_, (tokens, at)| *tokens < ASK_BURST && now.saturating_duration_since(*at) < Duration::from_secs(60));
        }
        let bucket = g.asks.entry(wanted.asked_by.clone()).or_insert((ASK_BURST, now));
        let refill = now.saturating_duration_since(bucket.1).as_secs_f64() * ASK_RATE;
        *bucket = ((bucket.0 + refill).min(ASK_BURST), now);
        if bucket.0 < 1.0 {
            return Err(Error::Exhausted("too many step-ups asked by this caller"));
        }
        bucket.0 -= 1.0;
        let older: Vec<[u8; 16]> = g.waiting.iter().filter(|(_, w)| w.wanted.asked.terminal == wanted.asked.terminal).map(|(id, _)| *id).collect();
        for id in older {
            if let Some(w) = g.waiting.remove(&id) {
                let _ = w.done.send(Some(Outcome::Superseded));
            }
        }
        if g.waiting.len() >= WAITING_MAX {
            return Err(Error::Exhausted("too many step-ups waiting"));
        }
        let (done, rx) = watch::channel(None);
        let asked = wanted.asked.clone();
        g.waiting.insert(asked.id, Waiting { wanted, done });
        drop(g);
        let _ = self.pushed.send(asked);
        Ok(rx)
    }

    /// The step-up `id`, if it still waits at `now`.
    pub fn wanted(&self, id: &[u8; 16], now: Instant) -> Option<Wanted> {
        let g = self.inner.lock().ok()?;
        g.waiting.get(id).filter(|w| w.wanted.asked.expires > now).map(|w| w.wanted.clone())
    }

    /// The step-ups waiting at any of `terminals`.
    pub fn waiting_at(&self, terminals: &[String], now: Instant) -> Vec<Asked> {
        let Ok(g) = self.inner.lock() else { return vec![] };
        g.waiting.values().filter(|w| w.wanted.asked.expires > now && terminals.contains(&w.wanted.asked.terminal)).map(|w| w.wanted.asked.clone()).collect()
    }

    /// Takes step-up `id` out of the waiting ones (under the ledger lock,
    /// so two proofs cannot both be granted): what [`StepUps::deliver`]
    /// ends. `None` if it no longer waits.
    pub fn claim(&self, id: &[u8; 16], now: Instant) -> Option<Claimed> {
        let mut g = self.inner.lock().ok()?;
        if g.waiting.get(id).is_none_or(|w| w.wanted.asked.expires <= now) {
            return None;
        }
        g.waiting.remove(id).map(Claimed)
    }

    /// Ends a claimed step-up with `outcome`.
    pub fn deliver(&self, claimed: Claimed, outcome: Outcome, now: Instant) {
        let Ok(mut g) = self.inner.lock() else { return };
        Self::end(&mut g, claimed.0, outcome, now);
    }

    /// Ends step-up `id` with `outcome` (a grant's token becomes
    /// redeemable). Returns false if it was no longer waiting.
    pub fn finish(&self, id: &[u8; 16], outcome: Outcome, now: Instant) -> bool {
        let Ok(mut g) = self.inner.lock() else { return false };
        let Some(w) = g.waiting.remove(id) else { return false };
        Self::end(&mut g, w, outcome, now);
        true
    }

    fn end(g: &mut Inner, w: Waiting, outcome: Outcome, now: Instant) {
        if let Outcome::Granted(p) = &outcome {
            if g.tokens.len() >= TOKENS_MAX {
                g.tokens.retain(|_, t| t.proof.expires > now);
            }
            if g.tokens.len() < TOKENS_MAX {
                g.tokens.insert(p.token, Token { proof: p.clone(), redeemed: false });
            }
        }
        let _ = w.done.send(Some(outcome));
    }

    /// Honours `token` once, for the terminal, action and parameters it
    /// was proven for.
    pub fn redeem(&self, token: &[u8], terminal: &str, action: &str, params_sha256: &[u8], now: Instant) -> std::result::Result<Proof, Redeem> {
        let token: [u8; 32] = token.try_into().map_err(|_| Redeem::Unknown)?;
        let mut g = self.inner.lock().map_err(|_| Redeem::Unknown)?;
        let Some(t) = g.tokens.get_mut(&token) else { return Err(Redeem::Unknown) };
        if t.redeemed {
            return Err(Redeem::Replayed);
        }
        if t.proof.expires <= now {
            return Err(Redeem::Unknown);
        }
        // One presentation, whatever it asks: a token shown for another
        // action is spent too. Kept, spent, until it would have expired, so
        // a second presentation is told apart from a made-up token.
        t.redeemed = true;
        if t.proof.terminal != terminal || t.proof.action != action || t.proof.params_sha256.as_slice() != params_sha256 {
            return Err(Redeem::Mismatch);
        }
        Ok(t.proof.clone())
    }
}

/// An action's words, as the API takes them: 1 to
/// [`pivgate_proto::card_message::ACTION_MAX`] bytes, no control
/// characters (it is shown and audited).
pub fn check_action(action: &str) -> Result<()> {
    let max = pivgate_proto::card_message::ACTION_MAX;
    if action.is_empty() || action.len() > max || action.chars().any(char::is_control) {
        return Err(Error::InvalidRequest(format!("action: 1 to {max} bytes of printable text")));
    }
    Ok(())
}

/// Why the card at hand may not prove step-up `w` at terminal `t`: the
/// terminal must still be unlocked by the operator it was asked of, and the
/// card must be theirs.
pub(crate) fn step_up_holder(t: &Terminal, card: &Card, w: &Wanted) -> std::result::Result<(), &'static str> {
    if !matches!(&t.session, Session::Unlocked { operator_id, .. } if *operator_id == w.operator_id) {
        return Err("the terminal is no longer unlocked by the operator the step-up was asked of");
    }
    if card.operator_id != w.operator_id {
        return Err("the card is another operator's: a step-up is proven by the operator at the terminal");
    }
    Ok(())
}

/// The terminal's policy for a step-up: card and PIN, whatever mechanisms
/// it allows for unlocking.
pub(crate) fn step_up_policy_of(t: &Terminal) -> TerminalPolicy {
    TerminalPolicy { allowed_mechanisms: vec![Mechanism::CardAndPin], ..t.policy.clone() }
}

impl Gateway {
    /// Asks the operator at `terminal` for a step-up before `action` (with
    /// parameters hashing to `params_sha256`), waiting `wait` at most.
    /// Returns it and what resolves with its outcome.
    pub fn ask_step_up(
        &self,
        caller: &Caller,
        terminal: &str,
        action: &str,
        params_sha256: &[u8],
        wait: Duration,
    ) -> Result<(Wanted, watch::Receiver<Option<Outcome>>)> {
        check_action(action)?;
        let params_sha256: [u8; 32] = params_sha256.try_into().map_err(|_| Error::InvalidRequest("params_sha256: 32 bytes".into()))?;
        let t = self.store.terminal(terminal)?.ok_or_else(|| Error::NotFound(format!("terminal {terminal}")))?;
        self.application_reaches(caller, &t)?;
        if self.no_pin_entry.lock().map_or(true, |n| n.contains(terminal)) {
            return Err(Error::Precondition(format!(
                "terminal {terminal} takes no PIN (its agent has no keypad or pinpad): a step-up needs card and PIN there"
            )));
        }
        let Session::Unlocked { operator_id, .. } = &t.session else {
            return Err(Error::Precondition(format!("terminal {terminal} is locked: a step-up is asked of the operator at an unlocked terminal")));
        };
        let mut id = [0u8; 16];
        self.random.fill(&mut id)?;
        let now = self.clock.instant();
        // The call must answer before the server's own call timeout ends it.
        let max = WAIT_MAX.min(Duration::from_secs(self.limits.call_timeout_s).saturating_sub(Duration::from_secs(2))).max(WAIT_MIN);
        let wanted = Wanted {
            asked: Asked { id, terminal: terminal.to_string(), action: action.to_string(), expires: now + wait.clamp(WAIT_MIN, max) },
            operator_id: operator_id.clone(),
            params_sha256,
            asked_by: caller.to_string(),
        };
        let rx = self.step_ups.ask(wanted.clone(), now)?;
        tracing::info!(terminal, operator = %operator_id, action, "step-up asked");
        Ok((wanted, rx))
    }

    /// The application's wait for `wanted` ran out: the step-up ends,
    /// audited (within the caller's refusal budget). Whether it was still
    /// waiting.
    pub async fn step_up_timed_out(&self, caller: &Caller, wanted: &Wanted) -> Result<bool> {
        if !self.step_ups.finish(&wanted.asked.id, Outcome::TimedOut, self.clock.instant()) {
            return Ok(false);
        }
        let detail = json!({ "step_up": hex::encode(wanted.asked.id), "action": wanted.asked.action, "operator": wanted.operator_id, "why": "timed out" });
        let entry = AuditEntry { kind: AuditKind::StepUpDenied, actor: caller.to_string(), terminal_id: wanted.asked.terminal.clone(), detail };
        self.audit_refusal(&caller.to_string(), entry).await?;
        Ok(true)
    }

    /// A proof for step-up `id` was refused (audited by the caller as a
    /// denied authentication): the application hears of it.
    pub(crate) async fn step_up_refused(&self, _agent: &Caller, id: &[u8; 16], deny: Deny, why: &str) -> Result<()> {
        self.step_ups.finish(id, Outcome::Denied(deny, why.to_string()), self.clock.instant());
        Ok(())
    }

    /// Completes a step-up whose proof `decide` checked: under the ledger
    /// lock the step-up must still wait, the terminal still be the
    /// operator's and the card theirs; the grant is durable in the audit
    /// log before the application's token exists.
    pub(crate) async fn complete_step_up(&self, caller: &Caller, p: Pending, card: &Card, operator: &Operator) -> Result<Complete> {
        let Purpose::StepUp { id, action, params_sha256 } = &p.purpose else {
            return Err(Error::Transaction("not a step-up's challenge".into()));
        };
        let now = self.clock.instant();
        let mut token = [0u8; 32];
        self.random.fill(&mut token)?;
        let mut refused: Option<(Deny, &str)> = None;
        let mut proven = None;
        self.commit_with(|| {
            let mut refuse = |d: Deny, why: &'static str| {
                refused = Some((d, why));
                Ok(None)
            };
            let Some(w) = self.step_ups.wanted(id, now) else { return refuse(Deny::StepUpUnknown, "the step-up is no longer waiting") };
            if w.asked.action != *action || w.params_sha256 != *params_sha256 || w.asked.terminal != p.terminal {
                return refuse(Deny::StepUpUnknown, "the step-up is not the one the challenge named");
            }
            let Some(t) = self.bound_terminal(&caller.name, &p.terminal)? else {
                return refuse(Deny::TerminalNotBound, "terminal unknown or not bound to this agent");
            };
            if let Err(why) = step_up_holder(&t, card, &w) {
                return refuse(Deny::StepUpOtherOperator, why);
            }
            // Judged again under the ledger lock, as an unlock is: a
            // revocation or suspension lands before this grant or after.
            let policy = step_up_policy_of(&t);
            let ask = Ask {
                agent: &caller.name,
                terminal: &p.terminal,
                card: card.uuid,
                mechanism: Some(Mechanism::CardAndPin),
                certificate: Certificate::Pinned(&p.certificate),
                check: Check::Full,
                overlay: &Overlay { policy: Some((&p.terminal, &policy)), ..Default::default() },
                session: None,
            };
            match self.authorize(&ask)? {
                Verdict::Allowed(_) => {}
                Verdict::Refused(d, why) => return refuse(d, why),
                Verdict::NeedCertificate(_) | Verdict::SessionRoleRemoved => return refuse(Deny::UnknownCard, "certificate no longer enrolled"),
            }
            // Claimed last, under the lock: a second proof of the same
            // step-up finds it gone.
            let Some(claimed) = self.step_ups.claim(id, now) else { return refuse(Deny::StepUpUnknown, "the step-up is no longer waiting") };
            let detail = json!({ "step_up": hex::encode(id), "action": action, "params_sha256": hex::encode(params_sha256),
                "operator": operator.id, "card_uuid": uuid_text(&card.uuid), "asked_by": w.asked_by });
            proven = Some((w, claimed));
            Ok(Some((AuditEntry { kind: AuditKind::StepUpGranted, actor: caller.to_string(), terminal_id: p.terminal.clone(), detail }, vec![])))
        })
        .await?;
        let Some((w, claimed)) = proven else {
            let (d, why) = refused.unwrap_or((Deny::StepUpUnknown, "state changed"));
            let (d, text) = self.deny(caller, &p.terminal, "step_up", d, json!({ "why": why, "step_up": hex::encode(id) })).await?;
            self.step_up_refused(caller, id, d, &text).await?;
            return Ok(Complete::Denied(d, text));
        };
        let proof = Proof {
            token,
            step_up: *id,
            terminal: p.terminal.clone(),
            operator_id: operator.id.clone(),
            card: card.uuid,
            action: action.clone(),
            params_sha256: *params_sha256,
            proven_ms: self.now_ms(),
            expires: self.clock.instant() + TOKEN_TTL,
        };
        // Durable in the audit log: now the token exists.
        self.step_ups.deliver(claimed, Outcome::Granted(proof), self.clock.instant());
        self.count("step_up_granted");
        self.proof_succeeded(card.uuid, &operator.id, &p.terminal);
        tracing::info!(terminal = %p.terminal, operator = %operator.id, action = %w.asked.action, "step-up proven");
        Ok(Complete::SteppedUp { operator: operator.clone() })
    }

    /// Honours a step-up token once (see [`StepUps::redeem`]); every
    /// refusal is audited within the caller's budget, a redemption always.
    pub async fn redeem_step_up(&self, caller: &Caller, token: &[u8], terminal: &str, action: &str, params_sha256: &[u8]) -> Result<Proof> {
        let refused = |why: &'static str| AuditEntry {
            kind: AuditKind::StepUpReplayed,
            actor: caller.to_string(),
            terminal_id: terminal.to_string(),
            detail: json!({ "action": action, "why": why }),
        };
        // Before the token is touched: an application out of scope spends
        // nobody's token.
        let Some(t) = self.store.terminal(terminal)? else { return Err(Error::NotFound(format!("terminal {terminal}"))) };
        self.application_reaches(caller, &t)?;
        match self.step_ups.redeem(token, terminal, action, params_sha256, self.clock.instant()) {
            // The operator who proved must still hold the terminal: a token
            // outlives no lock, revocation or change of operator.
            Ok(p)
                if !self
                    .store
                    .terminal(terminal)?
                    .is_some_and(|t| matches!(&t.session, Session::Unlocked { operator_id, .. } if *operator_id == p.operator_id)) =>
            {
                self.audit_refusal(&caller.to_string(), refused("the operator who proved no longer holds the terminal")).await?;
                Err(Error::Precondition("the terminal is no longer unlocked by the operator who proved: ask for a new step-up".into()))
            }
            Ok(p) => {
                let detail = json!({ "step_up": hex::encode(p.step_up), "action": p.action, "operator": p.operator_id });
                self.commit(AuditEntry { kind: AuditKind::StepUpRedeemed, actor: caller.to_string(), terminal_id: terminal.to_string(), detail }, vec![])
                    .await?;
                Ok(p)
            }
            Err(Redeem::Replayed) => {
                self.audit_refusal(&caller.to_string(), refused("presented again")).await?;
                Err(Error::Precondition("this step-up token was redeemed already: ask for a new step-up".into()))
            }
            Err(Redeem::Mismatch) => {
                self.audit_refusal(&caller.to_string(), refused("proven for another terminal, action or parameters")).await?;
                Err(Error::PermissionDenied("the step-up token was proven for another terminal, action or parameters (it is spent now)".into()))
            }
            Err(Redeem::Unknown) => Err(Error::NotFound("no such step-up token (expired, or never issued)".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted(id: u8, terminal: &str, now: Instant) -> Wanted {
        Wanted {
            asked: Asked { id: [id; 16], terminal: terminal.into(), action: "reconfigure intercom 4".into(), expires: now + WAIT_DEFAULT },
            operator_id: "op-1".into(),
            params_sha256: [7; 32],
            asked_by: "application:panel".into(),
        }
    }

    fn proof(token: u8, now: Instant) -> Proof {
        Proof {
            token: [token; 32],
            step_up: [1; 16],
            terminal: "t".into(),
            operator_id: "op-1".into(),
            card: [3; 16],
            action: "reconfigure intercom 4".into(),
            params_sha256: [7; 32],
            proven_ms: 0,
            expires: now + TOKEN_TTL,
        }
    }

    #[test]
    fn a_newer_step_up_at_a_terminal_supersedes_the_waiting_one() {
        let s = StepUps::default();
        let now = Instant::now();
        let first = s.ask(wanted(1, "t", now), now).unwrap();
        let _other = s.ask(wanted(2, "u", now), now).unwrap();
        let _second = s.ask(wanted(3, "t", now), now).unwrap();
        assert_eq!(*first.borrow(), Some(Outcome::Superseded));
        assert!(s.wanted(&[1; 16], now).is_none());
        let mut at: Vec<_> = s.waiting_at(&["t".into(), "u".into()], now).into_iter().map(|a| a.id[0]).collect();
        at.sort();
        assert_eq!(at, [2, 3]);
        assert!(s.wanted(&[3; 16], now + WAIT_DEFAULT).is_none(), "expired");
    }

    #[test]
    fn a_token_is_honoured_once_and_only_for_what_was_proven() {
        let s = StepUps::default();
        let now = Instant::now();
        let rx = s.ask(wanted(1, "t", now), now).unwrap();
        assert!(s.finish(&[1; 16], Outcome::Granted(proof(9, now)), now));
        assert!(!s.finish(&[1; 16], Outcome::TimedOut, now), "ended once");
        assert!(matches!(*rx.borrow(), Some(Outcome::Granted(_))));
        assert_eq!(s.redeem(&[9; 32], "t", "reconfigure intercom 4", &[7; 32], now).map(|p| p.operator_id), Ok("op-1".into()));
        assert_eq!(s.redeem(&[9; 32], "t", "reconfigure intercom 4", &[7; 32], now), Err(Redeem::Replayed));
        // Shown for another action, parameters or terminal: refused, and
        // spent.
        for (i, (terminal, action, params)) in
            [("t", "delete everything", [7; 32]), ("t", "reconfigure intercom 4", [8; 32]), ("u", "reconfigure intercom 4", [7; 32])].into_iter().enumerate()
        {
            let id = [10 + i as u8; 16];
            s.ask(Wanted { asked: Asked { id, ..wanted(0, "t", now).asked }, ..wanted(0, "t", now) }, now).unwrap();
            s.finish(&id, Outcome::Granted(proof(20 + i as u8, now)), now);
            assert_eq!(s.redeem(&[20 + i as u8; 32], terminal, action, &params, now), Err(Redeem::Mismatch));
            assert_eq!(s.redeem(&[20 + i as u8; 32], "t", "reconfigure intercom 4", &[7; 32], now), Err(Redeem::Replayed));
        }
        assert_eq!(s.redeem(&[8; 32], "t", "reconfigure intercom 4", &[7; 32], now), Err(Redeem::Unknown));
        assert_eq!(s.redeem(&[9; 3], "t", "reconfigure intercom 4", &[7; 32], now), Err(Redeem::Unknown));
        // Past its time: not honoured.
        s.ask(wanted(2, "t", now), now).unwrap();
        s.finish(&[2; 16], Outcome::Granted(proof(5, now)), now);
        assert_eq!(s.redeem(&[5; 32], "t", "reconfigure intercom 4", &[7; 32], now + TOKEN_TTL), Err(Redeem::Unknown));
    }

    #[test]
    fn actions_are_bounded_printable_text() {
        assert!(check_action("change intercom 4 configuration").is_ok());
        assert!(check_action("").is_err());
        assert!(check_action("line\nbreak").is_err());
        assert!(check_action(&"x".repeat(201)).is_err());
    }
}
