//! The exceptions a security team must look at (`AdminService.Review`,
//! `pivgatectl review`): every way into the control room that is not an
//! operator's own active card under their terminal group's policy, each
//! with what to do about it. Computed from the stored state on demand.

use crate::core::Gateway;
use crate::error::Result;
use crate::model::{uuid_text, CardState, DenyKey, Session};

/// Every kind, the ways in first.
pub const KINDS: [&str; 12] = [
    "break_glass",
    "enrolment_window",
    "locked_out",
    "repeated_failures",
    "pending_request",
    "privileged_card",
    "admin_certificate",
    "weaker_terminal",
    "temporary_card",
    "suspended_card",
    "expiring_certificate",
    "operator_without_card",
];

/// The most items of one kind listed.
pub const PER_KIND: usize = 500;

/// How far ahead an expiry is listed.
pub const EXPIRING_MS: i64 = 30 * 86_400_000;

/// One exception.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Item {
    /// What kind: one of [`KINDS`].
    pub kind: &'static str,
    /// What it is about (a card, an operator, a terminal, a request).
    pub subject: String,
    /// The facts, in words.
    pub detail: String,
    /// Until when it stands, Unix ms (0: until someone acts).
    pub until_ms: i64,
    /// How to resolve it.
    pub resolve: String,
}

impl Gateway {
    /// Every exception, by kind then subject.
    pub fn review(&self) -> Result<Vec<Item>> {
        let now = self.now_ms();
        let mut items = Vec::new();
        let mut push = |kind: &'static str, subject: String, detail: String, until_ms: i64, resolve: String| {
            items.push(Item { kind, subject, detail, until_ms, resolve });
        };
        let operators = self.store.operators()?;
        let cards = self.store.cards()?;
        let mut active_holders = std::collections::BTreeSet::new();
        for c in &cards {
            let revoked = self.store.denied(DenyKey::Card(c.uuid))?;
            let Some(op) = operators.iter().find(|o| o.id == c.operator_id) else { continue };
            let privileged = self.privileged_roles(op);
            let state = c.state(revoked, &privileged, now);
            let id = uuid_text(&c.uuid);
            if state == CardState::Active {
                active_holders.insert(c.operator_id.clone());
            }
            if matches!(state, CardState::Revoked | CardState::Expired) {
                continue;
            }
            // (A break-glass card is listed with its grant.)
            if let Some(end) = c.expires_ms.filter(|_| c.break_glass.is_none()) {
                push(
                    "temporary_card",
                    id.clone(),
                    format!("operator {}: a temporary card", c.operator_id),
                    end,
                    format!("ends by itself; end it sooner with `pivgatectl card revoke {id}`"),
                );
            }
            for (slot, der) in &c.certificates {
                let not_after = x509_parser::parse_x509_certificate(der).ok().map(|(_, x)| x.validity().not_after.timestamp() * 1000);
                if let Some(end) = not_after.filter(|end| *end - now < EXPIRING_MS) {
                    push(
                        "expiring_certificate",
                        id.clone(),
                        format!("operator {}: the {slot:?} certificate ends within 30 days", c.operator_id),
                        end,
                        "renew the certificate on the card and enrol it (`pivgatectl card enrol`), or replace the card".into(),
                    );
                }
            }
            if let Some(why) = &c.suspended {
                push(
                    "suspended_card",
                    id.clone(),
                    format!("operator {}: suspended ({why})", c.operator_id),
                    0,
                    format!("`pivgatectl card resume {id}` or `pivgatectl card revoke {id}`"),
                );
            }
            if let Some(a) = &c.approval {
                push(
                    "privileged_card",
                    id.clone(),
                    format!(
                        "operator {}: approved for {} by {}{}",
                        c.operator_id,
                        a.roles.join(", "),
                        a.by,
                        if a.badge.is_some() { " (badge signed)" } else { "" }
                    ),
                    0,
                    "check the approval was expected; revoke the card if not".into(),
                );
            }
        }
        for o in operators.iter().filter(|o| o.enabled && !active_holders.contains(&o.id)) {
            push(
                "operator_without_card",
                o.id.clone(),
                format!("{} has no active card", o.name),
                0,
                format!("enrol a card (`pivgatectl enrolment open --operator {}`) or disable the operator", o.id),
            );
        }
        for l in self.store.lockouts()? {
            push(
                "locked_out",
                l.operator_id.clone(),
                format!("{} failures in a row, the last at {} (reported by {})", l.failures, l.terminal, l.by),
                0,
                format!("check with the operator, then `pivgatectl operator unlock {} --reason ...`", l.operator_id),
            );
        }
        for (key, failures) in self.throttle.repeated(self.lifecycle.free_failures.max(1)) {
            let subject = match key {
                crate::throttle::Key::Card(c) => format!("card {}", uuid_text(&c)),
                crate::throttle::Key::Operator(o) => format!("operator {o}"),
                crate::throttle::Key::Terminal(t) => format!("terminal {t}"),
            };
            push(
                "repeated_failures",
                subject,
                format!("{failures} failed proofs or wrong PINs in a row"),
                0,
                "look at the auth.denied and auth.pin_failed records".into(),
            );
        }
        for r in self.store.requests()?.into_iter().filter(|r| r.open(now)) {
            push(
                "pending_request",
                hex::encode(r.id),
                format!("{} (asked by {}: {})", r.kind.summary(), r.requested_by, r.reason),
                r.expires_ms,
                format!("`pivgatectl request approve {0}` or `pivgatectl request refuse {0}`", hex::encode(r.id)),
            );
        }
        for a in self.store.admins()? {
            let how = match &a.approved_by {
                Some(by) => format!("asked by {}, approved by {by}", a.issued_by),
                None => format!("issued by {} alone (the bootstrap pair)", a.issued_by),
            };
            push(
                "admin_certificate",
                a.name.clone(),
                format!("an administrator certificate, key SHA-256 {}: {how}", &a.public_key_sha256[..16]),
                0,
                "check every administrator is a person the site knows".into(),
            );
        }
        for g in self.store.break_glasses()? {
            let ended = g.ended.as_ref().map(|(_, at, _)| *at).unwrap_or(g.until_ms).min(g.until_ms);
            if now - ended > EXPIRING_MS {
                continue;
            }
            let id = hex::encode(g.id);
            let state = match &g.ended {
                Some((by, _, why)) => format!("ended by {by} ({why})"),
                None if now >= g.until_ms => "ended at its time".to_string(),
                None => "IN FORCE".to_string(),
            };
            let resolve = if g.ended.is_none() && now < g.until_ms {
                format!("ends by itself; end it now with `pivgatectl break-glass end {id} --reason ...`")
            } else {
                "check each use (auth.granted records naming it) with the operator".into()
            };
            push(
                "break_glass",
                id,
                format!(
                    "{state}: operator {} at {}, asked by {}, approved by {}{}: {}",
                    g.operator_id,
                    g.terminals.join(", "),
                    g.asked_by,
                    g.approved_by,
                    match &g.present {
                        Some(p) => format!(", opened by {p}'s own badge"),
                        None => ", with a temporary card".into(),
                    },
                    g.reason
                ),
                g.until_ms,
                resolve,
            );
        }
        for w in self.store.windows()?.into_iter().filter(|w| w.closes_ms > now) {
            push(
                "enrolment_window",
                w.terminal.clone(),
                format!("open for operator {} (opened by {}): the first unknown card proven there is enrolled", w.operator_id, w.opened_by),
                w.closes_ms,
                format!("closes by itself; close it now with `pivgatectl enrolment close --terminal {}`", w.terminal),
            );
        }
        let groups = self.store.groups()?;
        let baseline = crate::model::TerminalPolicy::default();
        for t in self.store.terminals()? {
            // Against its group's policy, or the site's default without one.
            let (against, weaker, resolve) = match t.group.as_ref().and_then(|g| groups.iter().find(|x| x.id == *g)) {
                Some(g) => (
                    format!("group {}", g.id),
                    t.policy.weaker_than(&g.policy),
                    format!("`pivgatectl terminal group {} --group {}` puts the group's policy back", t.id, g.id),
                ),
                None => (
                    "the default policy".to_string(),
                    t.policy.weaker_than(&baseline),
                    format!("put {} in a group, or set its policy (`pivgatectl terminal policy {}`)", t.id, t.id),
                ),
            };
            if !weaker.is_empty() {
                let unlocked = if matches!(t.session, Session::Unlocked { .. }) { " (unlocked now)" } else { "" };
                push("weaker_terminal", t.id.clone(), format!("weaker than {against}: {}{unlocked}", weaker.join("; ")), 0, resolve);
            }
        }
        // The ways in first; a kind with very many items cannot push the
        // others out: each is cut at PER_KIND, with a line saying so.
        let rank = |k: &str| KINDS.iter().position(|x| *x == k).unwrap_or(KINDS.len());
        items.sort_by(|a, b| (rank(a.kind), &a.subject).cmp(&(rank(b.kind), &b.subject)));
        let mut out: Vec<Item> = Vec::new();
        for kind in KINDS {
            let of: Vec<Item> = items.iter().filter(|i| i.kind == kind).cloned().collect();
            let more = of.len().saturating_sub(PER_KIND);
            out.extend(of.into_iter().take(PER_KIND));
            if more > 0 {
                out.push(Item {
                    kind,
                    subject: format!("(+{more} more)"),
                    detail: format!("{more} more of this kind not listed"),
                    until_ms: 0,
                    resolve: "resolve the ones listed first".into(),
                });
            }
        }
        // (A kind missing from KINDS is listed last, whole.)
        out.extend(items.into_iter().filter(|i| !KINDS.contains(&i.kind)));
        Ok(out)
    }
}
