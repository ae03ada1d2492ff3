//! Break-glass: when an operator cannot use their card, an administrator
//! asks for time-limited access for them at named terminals, with a
//! written reason; it takes effect only when a second administrator
//! approves (their badge signing where `lifecycle.approval = "badge"`), for
//! at most `lifecycle.break_glass_max_h` hours. Using it still needs two
//! factors, as the site configures (`lifecycle.break_glass_proof`):
//!
//! - `temporary-card`: a temporary card asked for with the grant (its PIN
//!   the operator sets). It works only where and while the grant holds;
//!   ending the grant early revokes it.
//! - `approver-present`: the approving administrator comes to the terminal
//!   and taps their own badge (card and PIN; a card another administrator
//!   enrolled to the operator named as them): the session opens in the
//!   operator's name. While the grant holds, that badge at those terminals
//!   opens nothing else.
//!
//! Either way the grant is checked at every proof and every re-check of a
//! session (`authorize.rs`), a session standing on it locks when it ends
//! (`BreakGlassEnded`), every use is an `auth.granted` record naming the
//! grant, and it is in every review until 30 days after it ended. There is
//! no fallback to a weaker factor.

use serde_json::json;

use crate::authorize::Overlay;
use crate::core::{Enrolment, Gateway};
use crate::error::{Error, Result};
use crate::model::{uuid_text, Approval, AuditKind, BreakGlass, BreakGlassProof, Card, Request, RequestKind, RequestState, Session, Slot};
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
    /// The temporary card's 9A certificate (`temporary-card`); empty
    /// where the approver's presence proves.
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
        let proof = self.lifecycle.break_glass_proof;
        match (proof, ask.certificate.is_empty()) {
            (BreakGlassProof::TemporaryCard, true) => {
                return Err(Error::InvalidRequest(
                    "this site's break-glass is a temporary card (lifecycle.break_glass_proof = \"temporary-card\"): give its 9A certificate".into(),
                ))
            }
            (BreakGlassProof::ApproverPresent, false) => {
                return Err(Error::InvalidRequest(
                    "this site's break-glass is opened by the approver's own badge at the terminal (lifecycle.break_glass_proof = \"approver-present\"): no temporary card".into(),
                ))
            }
            _ => {}
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
            if proof == BreakGlassProof::TemporaryCard {
                let e = self.break_glass_enrolment(ask.operator_id, ask.certificate, true);
                let prepared = self.prepare_enrolment(&caller.to_string(), &e)?;
                if self.store.card(&prepared.card.uuid)?.is_some() {
                    return Err(Error::InvalidRequest("a break-glass card is a new temporary card, not one enrolled already".into()));
                }
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
                    proof,
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
                "terminals": ask.terminals, "hours": ask.hours, "reason": ask.reason, "proof": proof });
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
        let RequestKind::BreakGlass { operator_id, terminals, hours, certificate, proof } = &r.kind else {
            return Err(Error::Transaction("not a break-glass request".into()));
        };
        let operator = self
            .store
            .operator(operator_id)?
            .filter(|o| o.enabled)
            .ok_or_else(|| Error::InvalidRequest(format!("operator {operator_id} is gone or disabled")))?;
        let until_ms = now + i64::from(*hours) * 3_600_000;
        let approval = Approval { request: r.id, by: approver.to_string(), at_ms: now, badge, roles: self.privileged_roles(&operator) };
        let mut grant = BreakGlass {
            id: r.id,
            operator_id: operator_id.clone(),
            terminals: terminals.clone(),
            card: None,
            present: None,
            present_card: None,
            asked_by: r.requested_by.clone(),
            approved_by: approver.to_string(),
            reason: r.reason.clone(),
            from_ms: now,
            until_ms,
            ended: None,
        };
        if *proof == BreakGlassProof::ApproverPresent {
            // The approver is the second factor: the badge that signs the
            // approval (card and PIN) is the one card that opens it.
            let Some(card) = badge.map(|b| self.store.card(&b)).transpose()?.flatten() else {
                return Err(Error::PermissionDenied(format!(
                    "a break-glass by the approver's presence is approved with the approver's badge in a reader (`pivgatectl request approve ... --badge`): that badge, and only it, opens it; {approver} approved without one"
                )));
            };
            grant.present = Some(approver.name.clone());
            self.presence_badge(&card, &grant).map_err(|why| Error::PermissionDenied(format!("break-glass by presence: {why}")))?;
            grant.present_card = Some(card.uuid);
            // One badge opens one operator's grant at a terminal at a time:
            // the approver's tap must not choose between two.
            let overlapping = self.store.break_glasses()?.into_iter().find(|o| {
                o.present_card == grant.present_card && o.ended.is_none() && now < o.until_ms && o.terminals.iter().any(|t| grant.terminals.contains(t))
            });
            if let Some(o) = overlapping {
                return Err(Error::InvalidRequest(format!(
                    "this badge already opens break-glass {} (operator {}) at one of these terminals: end it first",
                    hex::encode(o.id),
                    o.operator_id
                )));
            }
            return Ok((vec![Change::BreakGlass(grant)], approval));
        }
        let prepared = self.prepare_enrolment(&r.requested_by, &self.break_glass_enrolment(operator_id, certificate, false))?;
        let mut card = prepared.card;
        if self.store.card(&card.uuid)?.is_some() {
            return Err(Error::InvalidRequest("the break-glass card was enrolled since: ask again with a new temporary card".into()));
        }
        card.expires_ms = Some(until_ms);
        card.break_glass = Some(r.id);
        card.approval = Some(approval.clone());
        card.pending = None;
        card.note(now, &approver.to_string(), format!("break-glass card for {} until {until_ms} (request {})", terminals.join(", "), hex::encode(r.id)));
        grant.card = Some(card.uuid);
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
            if let Some(card) = g.card.map(|c| self.store.card(&c)).transpose()?.flatten() {
                let (revoked, l) = self.revocation(card, &caller.to_string(), now, &format!("break-glass ended: {reason}"))?;
                changes.extend(revoked);
                locked = l;
            } else {
                // Opened by the approver's badge: the sessions standing on
                // the grant lock with it.
                let overlay = Overlay { break_glass: Some(&g), ..Default::default() };
                let (c, l) = self.reauthorize(&overlay, now, |t| {
                    g.terminals.contains(&t.id) && matches!(&t.session, Session::Unlocked { operator_id, .. } if *operator_id == g.operator_id)
                })?;
                changes.extend(c);
                locked = l.iter().filter_map(|v| v["terminal"].as_str().map(str::to_string)).collect();
            }
            let detail = json!({ "break_glass": hex::encode(id), "operator": g.operator_id, "card_uuid": g.card.as_ref().map(uuid_text),
                "present": g.present, "reason": reason, "locked_terminals": locked });
            changes.push(Change::BreakGlass(g));
            Ok(Some((AuditEntry { kind: AuditKind::EndBreakGlass, actor: caller.to_string(), terminal_id: String::new(), detail }, changes)))
        })
        .await?;
        Ok(locked)
    }

    /// The grant `card` stands in for at `terminal` (an approver's badge
    /// where a break-glass by presence names them and that terminal), with
    /// `overlay`'s grant standing for a change being decided. `Ok(None)`:
    /// none, the card is its operator's as usual; `Err`: one names it, and
    /// why this card cannot open it.
    pub(crate) fn presence_grant(&self, card: &Card, terminal: &str, overlay: &Overlay<'_>) -> Result<Option<std::result::Result<BreakGlass, &'static str>>> {
        if card.break_glass.is_some() {
            return Ok(None);
        }
        let now = self.now_ms();
        let mut found = None;
        for mut g in self.store.break_glasses()? {
            if let Some(o) = overlay.break_glass.filter(|o| o.id == g.id) {
                g = o.clone();
            }
            if g.present.as_deref() != Some(card.operator_id.as_str()) || !g.terminals.iter().any(|t| t == terminal) {
                continue;
            }
            if g.present_card != Some(card.uuid) {
                // Another card of the approver's: not the badge that
                // approved, so it opens nothing while the grant holds.
                if g.holds(terminal, now) {
                    return Ok(Some(Err("only the badge that signed the break-glass approval opens it")));
                }
                continue;
            }
            if g.holds(terminal, now) {
                return Ok(Some(self.presence_badge(card, &g).map(|()| g)));
            }
            found = Some(g);
        }
        // An ended one is found only for the session that stood on it
        // (the caller compares the session's operator).
        Ok(found.map(Ok))
    }

    /// Whether `card` is a badge that opens grant `g` by presence: its
    /// approver's, its 9A key enrolled by another administrator (a stolen
    /// approver certificate could plant a card), not itself a break-glass
    /// card.
    fn presence_badge(&self, card: &Card, g: &BreakGlass) -> std::result::Result<(), &'static str> {
        if card.break_glass.is_some() {
            return Err("a break-glass card opens no other grant");
        }
        if !card.certificates.contains_key(&Slot::PivAuthentication) {
            return Err("the approver's badge has no card-and-PIN (9A) key");
        }
        match card.key_enrolled_by.get(&Slot::PivAuthentication) {
            Some(by) if *by == g.approved_by => Err("the approver enrolled this badge's key themselves: it cannot stand in for their presence"),
            Some(by) if *by == g.asked_by => Err("the break-glass's asker enrolled this badge's key: it cannot stand in for the approver's presence"),
            Some(_) => Ok(()),
            None => Err("who enrolled this badge's key is not on record: enrol it again to open a break-glass by presence"),
        }
    }
}
