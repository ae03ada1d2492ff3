//! Break-glass: when an operator cannot use their card, an administrator
//! asks for time-limited access for them at named terminals, with a
//! written reason and a temporary card (whose PIN the operator sets); it
//! takes effect only when a second administrator approves (their badge
//! signing where `lifecycle.approval = "badge"`), for at most
//! `lifecycle.break_glass_max_h` hours. The card works only where and while
//! the grant holds (`authorize.rs`), every use is an `auth.granted` record
//! naming the grant, ending it early revokes the card (its sessions lock),
//! and it is in every review until 30 days after it ended. There is no
//! fallback to a weaker factor: the temporary card proves with its PIN.

use serde_json::json;

use crate::core::{Enrolment, Gateway};
use crate::error::{Error, Result};
use crate::model::{uuid_text, Approval, AuditKind, BreakGlass, Request, RequestKind, RequestState, Slot};
use crate::pki::Caller;
use crate::store::{AuditEntry, Change};

/// A break-glass request, as an administrator makes it.
pub struct BreakGlassAsk<'a> {
    /// For whom.
    pub operator_id: &'a str,
    /// Where.
    pub terminals: &'a [String],
    /// How long once approved, hours.
    pub hours: u32,
    /// The temporary card's 9A certificate.
    pub certificate: &'a [u8],
    /// Why.
    pub reason: &'a str,
}

impl Gateway {
    /// Asks for break-glass access; returns the request a second
    /// administrator approves.
    pub async fn ask_break_glass(&self, caller: &Caller, ask: &BreakGlassAsk<'_>) -> Result<Request> {
        let max = self.lifecycle.break_glass_max_h;
        if ask.hours == 0 || ask.hours > max {
            return Err(Error::InvalidRequest(format!("break-glass lasts 1 to {max} hours (lifecycle.break_glass_max_h)")));
        }
        if ask.terminals.is_empty() || ask.terminals.len() > 64 {
            return Err(Error::InvalidRequest("break-glass names 1 to 64 terminals".into()));
        }
        if ask.reason.trim().is_empty() {
            return Err(Error::InvalidRequest("break-glass needs a written reason".into()));
        }
        let now = self.now_ms();
        let mut out = None;
        self.commit_with(|| {
            match self.store.operator(ask.operator_id)? {
                None => return Err(Error::NotFound(format!("operator {}", ask.operator_id))),
                Some(o) if !o.enabled => return Err(Error::InvalidRequest(format!("operator {} is disabled", o.id))),
                Some(_) => {}
            }
            for t in ask.terminals {
                if self.store.terminal(t)?.is_none() {
                    return Err(Error::NotFound(format!("terminal {t}")));
                }
            }
            // The card must be one the gateway would enrol, and a new one.
            let e = self.break_glass_enrolment(ask.operator_id, ask.certificate, true);
            let prepared = self.prepare_enrolment(&caller.to_string(), &e)?;
            if self.store.card(&prepared.card.uuid)?.is_some() {
                return Err(Error::InvalidRequest("a break-glass card is a new temporary card, not one enrolled already".into()));
            }
            let mut id = [0u8; 16];
            self.random.fill(&mut id)?;
            let r = Request {
                id,
                kind: RequestKind::BreakGlass {
                    operator_id: ask.operator_id.to_string(),
                    terminals: ask.terminals.to_vec(),
                    hours: ask.hours,
                    certificate: ask.certificate.to_vec(),
                },
                requested_by: caller.to_string(),
                reason: ask.reason.to_string(),
                created_ms: now,
                // A break-glass is for now: it waits an hour at most.
                expires_ms: now + 3_600_000,
                state: RequestState::Pending,
                fulfilled_ms: None,
            };
            let detail = json!({ "request": hex::encode(id), "summary": r.kind.summary(), "operator": ask.operator_id,
                "terminals": ask.terminals, "hours": ask.hours, "reason": ask.reason });
            out = Some(r.clone());
            Ok(Some((AuditEntry { kind: AuditKind::AskBreakGlass, actor: caller.to_string(), terminal_id: String::new(), detail }, vec![Change::Request(r)])))
        })
        .await?;
        out.ok_or_else(|| Error::Transaction("break-glass request not recorded".into()))
    }

    fn break_glass_enrolment<'a>(&self, operator_id: &'a str, certificate: &'a [u8], dry_run: bool) -> Enrolment<'a> {
        Enrolment { operator_id, certificate, slot: Slot::PivAuthentication, to_card: None, attestation: None, dry_run, temporary_days: 0 }
    }

    /// The changes that put an approved break-glass request `r` in force
    /// (under the ledger lock, from `approve`): the temporary card,
    /// approved for the operator's privileged roles and bound to the
    /// grant, and the grant.
    pub(crate) fn grant_break_glass(&self, r: &Request, approver: &Caller, badge: Option<[u8; 16]>, now: i64) -> Result<(Vec<Change>, Approval)> {
        let RequestKind::BreakGlass { operator_id, terminals, hours, certificate } = &r.kind else {
            return Err(Error::Transaction("not a break-glass request".into()));
        };
        let operator = self
            .store
            .operator(operator_id)?
            .filter(|o| o.enabled)
            .ok_or_else(|| Error::InvalidRequest(format!("operator {operator_id} is gone or disabled")))?;
        let prepared = self.prepare_enrolment(&r.requested_by, &self.break_glass_enrolment(operator_id, certificate, false))?;
        let mut card = prepared.card;
        if self.store.card(&card.uuid)?.is_some() {
            return Err(Error::InvalidRequest("the break-glass card was enrolled since: ask again with a new temporary card".into()));
        }
        let until_ms = now + i64::from(*hours) * 3_600_000;
        let approval = Approval { request: r.id, by: approver.to_string(), at_ms: now, badge, roles: self.privileged_roles(&operator) };
        card.expires_ms = Some(until_ms);
        card.break_glass = Some(r.id);
        card.approval = Some(approval.clone());
        card.pending = None;
        card.note(now, &approver.to_string(), format!("break-glass card for {} until {until_ms} (request {})", terminals.join(", "), hex::encode(r.id)));
        let grant = BreakGlass {
            id: r.id,
            operator_id: operator_id.clone(),
            terminals: terminals.clone(),
            card: card.uuid,
            asked_by: r.requested_by.clone(),
            approved_by: approver.to_string(),
            reason: r.reason.clone(),
            from_ms: now,
            until_ms,
            ended: None,
        };
        // The grant's approval is the card's: no request of its own.
        let mut changes: Vec<Change> = prepared.extra.into_iter().filter(|c| !matches!(c, Change::Request(_))).collect();
        changes.push(Change::Card(card));
        changes.push(Change::BreakGlass(grant));
        Ok((changes, approval))
    }

    /// Ends a break-glass grant before its time: its card is revoked and
    /// the terminals it holds open lock. Returns them.
    pub async fn end_break_glass(&self, caller: &Caller, id: [u8; 16], reason: &str) -> Result<Vec<String>> {
        let now = self.now_ms();
        let mut locked = Vec::new();
        self.commit_with(|| {
            let Some(mut g) = self.store.break_glass(&id)? else { return Err(Error::NotFound(format!("break-glass {}", hex::encode(id)))) };
            if g.ended.is_some() || now >= g.until_ms {
                return Err(Error::InvalidRequest(format!("break-glass {} has ended already", hex::encode(id))));
            }
            g.ended = Some((caller.to_string(), now, reason.to_string()));
            let mut changes = vec![];
            if let Some(card) = self.store.card(&g.card)? {
                let (revoked, l) = self.revocation(card, &caller.to_string(), now, &format!("break-glass ended: {reason}"))?;
                changes.extend(revoked);
                locked = l;
            }
            let detail = json!({ "break_glass": hex::encode(id), "operator": g.operator_id, "card_uuid": uuid_text(&g.card), "reason": reason, "locked_terminals": locked });
            changes.push(Change::BreakGlass(g));
            Ok(Some((AuditEntry { kind: AuditKind::EndBreakGlass, actor: caller.to_string(), terminal_id: String::new(), detail }, changes)))
        })
        .await?;
        Ok(locked)
    }
}
