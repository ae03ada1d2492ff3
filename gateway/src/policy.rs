//! Policy by terminal group, and the clocks a session runs on.
//!
//! A group (dispatch consoles, intercom admin panels, or what the site
//! defines) holds the policy of its terminals: the mechanism, the roles
//! allowed, the idle timeout, the maximum session (never over 12 hours:
//! NIST SP 800-63B-4 re-authenticates AAL3 sessions at least that often),
//! what the card leaving does (lock at once, or a short grace for a
//! re-tap) and optional hours. A terminal in a group takes the group's
//! policy, and every change of it, unless it was given a policy of its own
//! (`SetTerminalPolicy`), which the review lists where it is weaker.
//!
//! Idle timeout: applications report operator activity for their terminal
//! (`AccessService.ReportActivity`, rate-limited per caller). Once one has,
//! the terminal's sessions lock after `idle_timeout_s` without a report; a
//! terminal no application reports for keeps its maximum session only, and
//! its state says so (`idle_enforced`). Activity is kept in memory: after a
//! restart the idle clock of a live session starts again from the start.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::json;

use crate::authorize::Overlay;
use crate::core::Gateway;
use crate::error::{Error, Result};
use crate::model::{AuditKind, LockReason, Session, Terminal, TerminalGroup, TerminalPolicy, MAX_SESSION_MAX_S};
use crate::pki::Caller;
use crate::store::{AuditEntry, Change};

/// Activity reports one caller may make at once, and per second after.
const ACTIVITY_BURST: f64 = 40.0;
const ACTIVITY_PER_SECOND: f64 = 20.0;
/// Callers whose report budget is remembered before the oldest go.
const ACTIVITY_CALLERS_MAX: usize = 10_000;

/// What the clocks of sessions need that is not stored: the last activity
/// reported per terminal, pending card removals, and the activity budgets.
#[derive(Default)]
pub struct Clocks {
    /// Terminal to the last activity reported (Unix ms).
    activity: Mutex<HashMap<String, i64>>,
    /// Terminal to a card removal whose grace runs: until when (Unix ms),
    /// and the session's event sequence then.
    removals: Mutex<HashMap<String, (i64, u64)>>,
    /// Caller to its activity tokens and when they were counted.
    budget: Mutex<HashMap<String, (f64, Instant)>>,
    /// When this gateway started (Unix ms): the idle clock of a session
    /// older than that starts here.
    pub started_ms: std::sync::atomic::AtomicI64,
    /// When closed requests were last pruned (Unix ms).
    pub pruned_ms: std::sync::atomic::AtomicI64,
}

/// A policy as an administrator gives it, checked.
pub fn checked(p: TerminalPolicy) -> Result<TerminalPolicy> {
    if p.allowed_mechanisms.is_empty() {
        return Err(Error::InvalidRequest("a policy allows at least one mechanism".into()));
    }
    if p.max_session_s > MAX_SESSION_MAX_S {
        return Err(Error::InvalidRequest(format!(
            "max_session_s is at most {MAX_SESSION_MAX_S} (12 hours: NIST SP 800-63B-4 re-authenticates AAL3 sessions at least that often)"
        )));
    }
    if p.idle_timeout_s > MAX_SESSION_MAX_S || p.removal_grace_s > 300 {
        return Err(Error::InvalidRequest("idle_timeout_s is at most 43200 and removal_grace_s at most 300".into()));
    }
    if p.hours.is_some_and(|h| !h.valid()) {
        return Err(Error::InvalidRequest("hours: days 1 to 127, minutes 0 to 1440 (start before 1440, start and end differ), offset within 14 hours".into()));
    }
    Ok(p)
}

impl Gateway {
    /// Creates or changes a group: its terminals without a policy of their
    /// own take the new policy, and their sessions it no longer allows end,
    /// in the same step. Returns the terminals locked.
    pub async fn set_group(&self, caller: &Caller, id: &str, policy: TerminalPolicy) -> Result<Vec<String>> {
        let policy = checked(policy)?;
        let now = self.now_ms();
        let mut locked_ids = Vec::new();
        self.commit_with(|| {
            let members: Vec<Terminal> = self.store.terminals()?.into_iter().filter(|t| t.group.as_deref() == Some(id) && !t.custom_policy).collect();
            let mut changes = Vec::new();
            let mut locked = Vec::new();
            for t in members {
                let (c, l) = self.with_policy(t, &policy, now)?;
                changes.push(c);
                locked.extend(l);
            }
            locked_ids = locked.iter().filter_map(|l| l["terminal"].as_str().map(String::from)).collect();
            changes.push(Change::Group(TerminalGroup { id: id.to_string(), policy: policy.clone() }));
            let detail = json!({ "group": id, "policy": policy, "locked_terminals": locked });
            Ok(Some((AuditEntry { kind: AuditKind::SetTerminalGroup, actor: caller.to_string(), terminal_id: String::new(), detail }, changes)))
        })
        .await?;
        Ok(locked_ids)
    }

    /// Puts a terminal in a group (taking the group's policy, dropping any
    /// of its own), or out of any (`None`: it keeps the policy it has, as
    /// its own).
    pub async fn assign_terminal(&self, caller: &Caller, terminal: &str, group: Option<&str>) -> Result<()> {
        let now = self.now_ms();
        self.commit_with(|| {
            let Some(mut t) = self.store.terminal(terminal)? else { return Err(Error::NotFound(format!("terminal {terminal}"))) };
            let (change, locked) = match group {
                Some(g) => {
                    let Some(group) = self.store.group(g)? else { return Err(Error::NotFound(format!("terminal group {g}"))) };
                    t.group = Some(g.to_string());
                    t.custom_policy = false;
                    self.with_policy(t, &group.policy, now)?
                }
                None => {
                    t.group = None;
                    t.custom_policy = true;
                    (Change::Terminal(t), vec![])
                }
            };
            let detail = json!({ "terminal": terminal, "group": group, "locked_terminals": locked });
            Ok(Some((AuditEntry { kind: AuditKind::AssignTerminal, actor: caller.to_string(), terminal_id: terminal.to_string(), detail }, vec![change])))
        })
        .await?;
        Ok(())
    }

    /// `t` with `policy`, its session ended if the policy no longer allows
    /// it: the change, and the lock (if any) for the audit record.
    pub(crate) fn with_policy(&self, t: Terminal, policy: &TerminalPolicy, now: i64) -> Result<(Change, Vec<serde_json::Value>)> {
        let id = t.id.clone();
        let overlay = Overlay { policy: Some((&id, policy)), ..Default::default() };
        let (mut changes, locked) = self.reauthorize(&overlay, now, |x| x.id == id)?;
        // The lock (if any) carries the stored terminal: only its session is
        // taken, the rest is `t` as the caller made it.
        Ok(match changes.pop() {
            Some(Change::Session { terminal }) => (Change::Session { terminal: Terminal { policy: policy.clone(), session: terminal.session, ..t } }, locked),
            _ => (Change::Terminal(Terminal { policy: policy.clone(), ..t }), locked),
        })
    }

    /// Every terminal group.
    pub fn groups(&self) -> Result<Vec<TerminalGroup>> {
        self.store.groups()
    }

    /// An application reports operator activity at `terminal`. The first
    /// report for a terminal is recorded (its idle timeout is enforced
    /// from then on, across restarts); later ones only move its idle clock.
    /// Returns the terminal's idle timeout, seconds.
    pub async fn report_activity(&self, caller: &Caller, terminal: &str) -> Result<u32> {
        if !self.activity_allowed(&caller.to_string()) {
            return Err(Error::Exhausted("activity reports: too many from this caller (coalesce them: one every few seconds is plenty)"));
        }
        let Some(t) = self.store.terminal(terminal)? else { return Err(Error::NotFound(format!("terminal {terminal}"))) };
        self.application_reaches(caller, &t)?;
        if let Ok(mut a) = self.clocks.activity.lock() {
            a.insert(terminal.to_string(), self.now_ms());
        }
        if !t.activity_reported {
            self.commit_with(|| {
                let Some(t) = self.store.terminal(terminal)?.filter(|t| !t.activity_reported) else { return Ok(None) };
                let detail = json!({ "terminal": terminal, "idle_timeout_s": t.policy.idle_timeout_s });
                let entry = AuditEntry { kind: AuditKind::ActivityReporting, actor: caller.to_string(), terminal_id: terminal.to_string(), detail };
                Ok(Some((entry, vec![Change::Terminal(Terminal { activity_reported: true, ..t })])))
            })
            .await?;
        }
        Ok(t.policy.idle_timeout_s)
    }

    /// Whether `caller`, an application, may act on terminal `t` (ask a
    /// step-up of it, report activity for it, redeem its step-ups): as
    /// config `applications` scopes it. Other roles are not scoped here.
    pub(crate) fn application_reaches(&self, caller: &Caller, t: &Terminal) -> Result<()> {
        if caller.role != crate::pki::Role::Application || self.applications.is_empty() {
            return Ok(());
        }
        match self.applications.get(&caller.name) {
            Some(s) if s.terminals.contains(&t.id) || t.group.as_ref().is_some_and(|g| s.groups.contains(g)) => Ok(()),
            Some(_) => Err(Error::PermissionDenied(format!(
                "application {} may not act on terminal {} (the gateway's applications.{} names its terminals and groups)",
                caller.name, t.id, caller.name
            ))),
            None => Err(Error::PermissionDenied(format!("application {} is not in the gateway's applications: it acts on no terminal", caller.name))),
        }
    }

    fn activity_allowed(&self, caller: &str) -> bool {
        let now = self.clock.instant();
        let Ok(mut b) = self.clocks.budget.lock() else { return false };
        if b.len() >= ACTIVITY_CALLERS_MAX && !b.contains_key(caller) {
            // Full buckets carry nothing: forget them first.
            b.retain(|_, (tokens, at)| *tokens + now.saturating_duration_since(*at).as_secs_f64() * ACTIVITY_PER_SECOND < ACTIVITY_BURST);
            if b.len() >= ACTIVITY_CALLERS_MAX {
                return false;
            }
        }
        let (tokens, at) = b.entry(caller.to_string()).or_insert((ACTIVITY_BURST, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * ACTIVITY_PER_SECOND).min(ACTIVITY_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the session at `t` has been idle past its timeout at `now`.
    fn idle(&self, t: &Terminal, now: i64) -> bool {
        let Session::Unlocked { since_ms, .. } = &t.session else { return false };
        if t.policy.idle_timeout_s == 0 || !t.activity_reported {
            return false;
        }
        let started = self.clocks.started_ms.load(std::sync::atomic::Ordering::Relaxed);
        let last = self.clocks.activity.lock().ok().and_then(|a| a.get(&t.id).copied()).unwrap_or(0).max(*since_ms).max(started);
        now - last >= i64::from(t.policy.idle_timeout_s) * 1000
    }

    /// The card left terminal `t`'s reader while `t` was unlocked: with a
    /// removal grace, the session stands until it runs out (a tap of the
    /// same card continues it); `false` then, else the caller locks now.
    pub(crate) fn removal_grace(&self, t: &Terminal) -> bool {
        let Session::Unlocked { sequence, .. } = &t.session else { return false };
        if t.policy.removal_grace_s == 0 {
            return false;
        }
        let until = self.now_ms() + i64::from(t.policy.removal_grace_s) * 1000;
        if let Ok(mut r) = self.clocks.removals.lock() {
            r.entry(t.id.clone()).or_insert((until, *sequence));
        }
        true
    }

    /// Whether a card removal's grace runs at `terminal`.
    pub(crate) fn removal_pending(&self, terminal: &str) -> bool {
        self.clocks.removals.lock().map(|r| r.contains_key(terminal)).unwrap_or(false)
    }

    /// Whether a card removal's grace ran at `terminal`; taken back (a
    /// tap of the card ends it).
    pub(crate) fn take_removal(&self, terminal: &str) -> bool {
        self.clocks.removals.lock().map(|mut r| r.remove(terminal).is_some()).unwrap_or(false)
    }

    /// Why the session at `t` must end by its clocks at `now`: maximum
    /// session, idle, hours, or a card removal whose grace ran out.
    pub(crate) fn clock_verdict(&self, t: &Terminal, now: i64) -> Option<LockReason> {
        let Session::Unlocked { since_ms, sequence, .. } = &t.session else { return None };
        if now - since_ms >= i64::from(t.policy.max_session()) * 1000 {
            return Some(LockReason::MaxSession);
        }
        if self.idle(t, now) {
            return Some(LockReason::IdleTimeout);
        }
        if t.policy.hours.is_some_and(|h| !h.contains(now)) {
            return Some(LockReason::OutsideHours);
        }
        let removed = self.clocks.removals.lock().ok().and_then(|r| r.get(&t.id).copied());
        match removed {
            Some((until, seq)) if seq == *sequence && now >= until => Some(LockReason::CardRemoved),
            Some((_, seq)) if seq != *sequence => {
                // A newer session: the removal is moot.
                let _ = self.take_removal(&t.id);
                None
            }
            _ => None,
        }
    }

    /// Locks every session its clocks end (called by the sweep).
    pub(crate) async fn lock_by_clocks(&self) -> Result<()> {
        let now = self.now_ms();
        for t in self.store.terminals()? {
            if self.clock_verdict(&t, now).is_none() {
                continue;
            }
            let locked = self.lock_when("gateway", &t.id, |t| Ok(self.clock_verdict(t, self.now_ms()))).await?;
            if locked {
                let _ = self.take_removal(&t.id);
            }
        }
        Ok(())
    }
}
