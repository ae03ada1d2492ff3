//! The second line behind the card's own PIN counter: failed proofs (a
//! signature the gateway refused) and wrong PINs the agents report slow
//! down, per card, per operator and per terminal, with delays that double
//! after a few free failures; an operator whose failures in a row reach
//! `lifecycle.lockout_after` (at most 100) is locked out, durably and
//! audited, until an administrator lifts it (`AdminService.LiftLockout`).
//! A success clears the card's, the operator's and the terminal's count.
//!
//! Counts live in memory (bounded); the lockout is stored. A terminal's
//! delay is capped at 30 s, so one person failing at a console cannot keep
//! it from everyone else for long.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::core::Gateway;
use crate::error::{Error, Result};
use crate::model::{uuid_text, AuditKind, Lockout};
use crate::pki::Caller;
use crate::store::{AuditEntry, Change};
use crate::verify::Deny;

/// What failures are counted against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    /// A card.
    Card([u8; 16]),
    /// An operator.
    Operator(String),
    /// A terminal.
    Terminal(String),
}

/// The delays.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Failures in a row before any delay.
    pub free: u32,
    /// The longest delay.
    pub max_delay: Duration,
}

/// The longest a terminal's own delay gets.
pub const TERMINAL_DELAY_MAX: Duration = Duration::from_secs(30);

/// Most keys counted at once.
const KEYS_MAX: usize = 100_000;

impl Rules {
    /// The delay after `failures` in a row for `key`: none for the free
    /// ones, then 1 s, 2 s, 4 s and so on up to the cap.
    pub fn delay(&self, key: &Key, failures: u32) -> Duration {
        if failures <= self.free {
            return Duration::ZERO;
        }
        let cap = if matches!(key, Key::Terminal(_)) { self.max_delay.min(TERMINAL_DELAY_MAX) } else { self.max_delay };
        let exp = (failures - self.free - 1).min(20);
        Duration::from_secs(1u64 << exp).min(cap)
    }
}

#[derive(Debug, Clone, Copy)]
struct Count {
    failures: u32,
    last: Instant,
}

/// Failures in a row, by key.
#[derive(Default)]
pub struct Throttle {
    counts: Mutex<HashMap<Key, Count>>,
}

impl Throttle {
    /// How long to wait still before another attempt with `keys`, if at
    /// all (the longest of their delays).
    pub fn wait(&self, keys: &[Key], rules: Rules, now: Instant) -> Option<Duration> {
        let g = self.counts.lock().ok()?;
        keys.iter().filter_map(|k| g.get(k).map(|c| (c.last + rules.delay(k, c.failures)).saturating_duration_since(now))).filter(|d| !d.is_zero()).max()
    }

    /// Counts `n` failures against each of `keys`, for a challenge issued
    /// at `issued`; returns the count of the operator among them (0 if
    /// none). A key's failures count one challenge at a time: a challenge
    /// issued before the key's last failure adds nothing, so challenges
    /// gathered up front and failed together count as one, and every
    /// further try meets the delay at its begin.
    pub fn failed(&self, keys: &[Key], n: u32, issued: Instant, rules: Rules, now: Instant) -> u32 {
        let Ok(mut g) = self.counts.lock() else { return 0 };
        if g.len() >= KEYS_MAX {
            // Forget what no longer delays anything; then the oldest.
            g.retain(|k, c| c.last + rules.delay(k, c.failures).max(Duration::from_secs(3600)) > now);
            while g.len() >= KEYS_MAX {
                let Some(oldest) = g.iter().min_by_key(|(_, c)| c.last).map(|(k, _)| k.clone()) else { break };
                g.remove(&oldest);
            }
        }
        let mut operator = 0;
        for k in keys {
            if g.get(k).is_some_and(|c| issued < c.last) {
                if matches!(k, Key::Operator(_)) {
                    operator = g.get(k).map(|c| c.failures).unwrap_or(0);
                }
                continue;
            }
            let c = g.entry(k.clone()).or_insert(Count { failures: 0, last: now });
            c.failures = c.failures.saturating_add(n);
            c.last = now;
            if matches!(k, Key::Operator(_)) {
                operator = c.failures;
            }
        }
        operator
    }

    /// The failures in a row counted for `key`.
    pub fn count(&self, key: &Key) -> u32 {
        self.counts.lock().ok().and_then(|g| g.get(key).map(|c| c.failures)).unwrap_or(0)
    }

    /// Every key with at least `min` failures in a row, by key.
    pub fn repeated(&self, min: u32) -> Vec<(Key, u32)> {
        let Ok(g) = self.counts.lock() else { return vec![] };
        let mut v: Vec<(Key, u32)> = g.iter().filter(|(_, c)| c.failures >= min).map(|(k, c)| (k.clone(), c.failures)).collect();
        v.sort_by(|a, b| format!("{:?}", a.0).cmp(&format!("{:?}", b.0)));
        v.truncate(1000);
        v
    }

    /// A success: the count of each of `keys` starts again.
    pub fn succeeded(&self, keys: &[Key]) {
        if let Ok(mut g) = self.counts.lock() {
            for k in keys {
                g.remove(k);
            }
        }
    }
}

/// The throttle's "terminal" for the badge approvals of administrator
/// `name` (each approver's own: one's failures never slow another's; the
/// space keeps it apart from every terminal id).
pub(crate) fn approvals_of(name: &str) -> String {
    format!("badge approvals of {name}")
}

fn keys(card: Option<[u8; 16]>, operator: Option<&str>, terminal: &str) -> Vec<Key> {
    let mut k = vec![Key::Terminal(terminal.to_string())];
    k.extend(card.map(Key::Card));
    k.extend(operator.map(|o| Key::Operator(o.to_string())));
    k
}

impl Gateway {
    fn throttle_rules(&self) -> Rules {
        Rules { free: self.lifecycle.free_failures, max_delay: Duration::from_secs(self.lifecycle.max_delay_s) }
    }

    /// Why a proof by `card` of `operator` at `terminal` may not begin
    /// now: the operator is locked out, or failures lately ask for a wait.
    pub(crate) fn throttled(&self, card: [u8; 16], operator: &str, terminal: &str) -> Result<Option<(Deny, String)>> {
        if let Some(l) = self.store.lockout(operator)? {
            return Ok(Some((Deny::LockedOut, format!("operator {operator} is locked out after {} failures in a row: an administrator lifts it", l.failures))));
        }
        Ok(self.delayed(Some(card), Some(operator), terminal))
    }

    /// The delay failures lately put on a proof by `card` (of `operator`,
    /// when it counts) at `terminal`, as a refusal.
    pub(crate) fn delayed(&self, card: Option<[u8; 16]>, operator: Option<&str>, terminal: &str) -> Option<(Deny, String)> {
        let wait = self.throttle.wait(&keys(card, operator, terminal), self.throttle_rules(), self.clock.instant());
        wait.map(|w| (Deny::Throttled, format!("too many failures lately: try again in {} s", w.as_secs().max(1))))
    }

    /// `n` failures by `card` (of `operator`, when known) at `terminal`,
    /// seen or reported by `by`: counted, and the operator locked out once
    /// their failures in a row reach `lifecycle.lockout_after`.
    pub(crate) async fn failures(&self, by: &Caller, card: Option<[u8; 16]>, operator: Option<&str>, terminal: &str, n: u32, issued: Instant) -> Result<()> {
        let count = self.throttle.failed(&keys(card, operator, terminal), n, issued, self.throttle_rules(), self.clock.instant());
        self.counters.failures.fetch_add(u64::from(n), Ordering::Relaxed);
        let Some(operator) = operator.filter(|_| count >= self.lifecycle.lockout_after) else { return Ok(()) };
        let lockout = Lockout { operator_id: operator.to_string(), at_ms: self.now_ms(), failures: count, terminal: terminal.to_string(), by: by.to_string() };
        let locked = self
            .commit_with(|| {
                // Read again under the ledger lock: a lift that landed since
                // cleared the count, and stands.
                let count = self.throttle.count(&Key::Operator(operator.to_string()));
                if self.store.lockout(operator)?.is_some() || count < self.lifecycle.lockout_after {
                    return Ok(None);
                }
                let detail = json!({ "operator": operator, "failures": count, "limit": self.lifecycle.lockout_after,
                    "card_uuid": card.as_ref().map(uuid_text) });
                let entry = AuditEntry { kind: AuditKind::Lockout, actor: by.to_string(), terminal_id: terminal.to_string(), detail };
                Ok(Some((entry, vec![Change::Lockout { operator: operator.to_string(), lockout: Some(lockout.clone()) }])))
            })
            .await?;
        if locked.is_some() {
            self.counters.lockouts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(operator, terminal, failures = count, "operator locked out after consecutive failures");
        }
        Ok(())
    }

    /// A proof succeeded: the counts of the card, operator and terminal
    /// start again.
    pub(crate) fn proof_succeeded(&self, card: [u8; 16], operator: &str, terminal: &str) {
        self.throttle.succeeded(&keys(Some(card), Some(operator), terminal));
    }

    /// An agent reports `wrong` wrong PINs typed for challenge
    /// `challenge_id` at `terminal` (the card refused them; it never
    /// signed). The report must name a challenge this agent was issued
    /// there, asking for the PIN, and is taken once: an agent cannot count
    /// failures against a card it was never shown.
    pub async fn report_pin_failures(&self, caller: &Caller, challenge_id: &[u8], terminal: &str, wrong: u32) -> Result<()> {
        let p = self
            .challenges
            .take_reported(challenge_id, &caller.name, terminal, self.clock.instant())
            .map_err(|d| Error::InvalidRequest(format!("challenge: {}", d.name())))?;
        if p.mechanism != crate::model::Mechanism::CardAndPin {
            return Err(Error::InvalidRequest("the challenge asked for no PIN".into()));
        }
        // A card's own counter blocks it after a few: more is made up.
        let wrong = wrong.clamp(1, 3);
        let operator = self.store.card(&p.card_uuid)?.map(|c| c.operator_id);
        let detail = json!({ "card_uuid": uuid_text(&p.card_uuid), "operator": operator, "wrong_pins": wrong });
        self.audit_refusal(
            &caller.to_string(),
            AuditEntry { kind: AuditKind::PinFailed, actor: caller.to_string(), terminal_id: terminal.to_string(), detail },
        )
        .await?;
        let issued = p.expires.checked_sub(self.challenges.ttl()).unwrap_or(p.expires);
        // One failure per challenge, however many PINs were typed for it
        // (the card counts those): an agent's word cannot multiply it.
        self.failures(caller, Some(p.card_uuid), operator.as_deref(), terminal, 1, issued).await
    }

    /// Lifts `operator`'s lockout (and clears their failure counts);
    /// whether they were locked out.
    pub async fn lift_lockout(&self, caller: &Caller, operator: &str, reason: &str) -> Result<bool> {
        // A lockout of an administrator's own badge is lifted by another:
        // a thief with their certificate must not clear it.
        if caller.name == operator {
            return Err(Error::PermissionDenied("an administrator's own lockout is lifted by another administrator".into()));
        }
        let mut was = false;
        let mut cleared = vec![Key::Operator(operator.to_string())];
        cleared.extend(self.store.cards()?.into_iter().filter(|c| c.operator_id == operator).map(|c| Key::Card(c.uuid)));
        cleared.push(Key::Terminal(approvals_of(operator)));
        self.commit_with(|| {
            // Cleared under the ledger lock, so a failure being counted
            // now cannot lock the operator out again on the old count.
            self.throttle.succeeded(&cleared);
            let Some(l) = self.store.lockout(operator)? else { return Ok(None) };
            was = true;
            let detail = json!({ "operator": operator, "reason": reason, "failures": l.failures, "locked_at_ms": l.at_ms, "terminal": l.terminal });
            let entry = AuditEntry { kind: AuditKind::LiftLockout, actor: caller.to_string(), terminal_id: String::new(), detail };
            Ok(Some((entry, vec![Change::Lockout { operator: operator.to_string(), lockout: None }])))
        })
        .await?;
        Ok(was)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules { free: 3, max_delay: Duration::from_secs(300) };

    #[test]
    fn delays_start_after_the_free_failures_double_and_stop_at_their_caps() {
        let card = Key::Card([1; 16]);
        let terminal = Key::Terminal("t".into());
        let d: Vec<u64> = (0..=14).map(|n| RULES.delay(&card, n).as_secs()).collect();
        assert_eq!(d, [0, 0, 0, 0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(RULES.delay(&terminal, 12), TERMINAL_DELAY_MAX);
        assert_eq!(RULES.delay(&card, u32::MAX), Duration::from_secs(300));
    }

    #[test]
    fn failures_delay_the_next_attempt_and_a_success_clears_them() {
        let t = Throttle::default();
        let now = Instant::now();
        let keys = [Key::Card([1; 16]), Key::Operator("op-1".into()), Key::Terminal("t".into())];
        assert_eq!(t.failed(&keys, 3, now, RULES, now), 3);
        assert_eq!(t.wait(&keys, RULES, now), None, "three free failures");
        assert_eq!(t.failed(&keys, 2, now, RULES, now), 5);
        assert_eq!(t.wait(&keys, RULES, now), Some(Duration::from_secs(2)));
        assert_eq!(t.wait(&keys, RULES, now + Duration::from_secs(2)), None);
        // Another card of the same operator waits too; another operator's
        // card at another terminal does not.
        assert!(t.wait(&[Key::Card([2; 16]), Key::Operator("op-1".into())], RULES, now).is_some());
        assert_eq!(t.wait(&[Key::Card([3; 16]), Key::Operator("op-3".into()), Key::Terminal("u".into())], RULES, now), None);
        // A challenge issued before the last failure adds nothing.
        let earlier = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
        assert_eq!(t.failed(&keys, 3, earlier, RULES, now + Duration::from_secs(1)), 5);
        t.succeeded(&keys);
        assert_eq!(t.wait(&keys, RULES, now), None);
        assert_eq!(t.failed(&keys, 1, now, RULES, now), 1, "counting starts again");
    }
}
