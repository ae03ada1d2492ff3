//! The processes around cards, past a plain enrolment from a file:
//!
//! - **enrolment at a terminal with proof**: an administrator opens a
//!   window of minutes for one operator at one terminal; the first unknown
//!   card tapped there whose 9A key signs (card and PIN, checked by the
//!   card) is enrolled to that operator, and the window closes;
//! - **approval by a second administrator** for cards of operators who
//!   hold a privileged role (`lifecycle.privileged_roles`): the card is
//!   refused until another administrator (never the one who asked, never
//!   the operator) approves, with their own badge signing where the site
//!   requires it (`lifecycle.approval = "badge"`);
//! - **replacement**: a new card for the same operator and the old one
//!   revoked in one step.
//!
//! Every change is one audit record with the changes it makes (see
//! `store.rs`), naming who asked and who approved.

use serde_json::json;
use sha2::Digest;

use crate::challenge::{Pending, Purpose, APPROVAL};
use crate::config::ApprovalProof;
use crate::core::{Complete, Enrolment, Gateway, Issued};
use crate::error::{Error, Result};
use crate::model::{
    uuid_text, AdminRecord, Approval, AuditKind, Card, DenyKey, EnrolmentWindow, KeyAlgorithm, Operator, Request, RequestKind, RequestState, Slot,
};
use crate::pki::Caller;
use crate::store::{AuditEntry, Change};
use crate::verify::{self, Deny};

/// The shortest enrolment window, and the one given when none is asked.
const WINDOW_MIN_S: u64 = 10;
const WINDOW_DEFAULT_S: u64 = 300;

/// An enrolment window, as an administrator asks for it.
#[derive(Debug, Clone)]
pub struct WindowAsk<'a> {
    /// Where.
    pub terminal: &'a str,
    /// For whom.
    pub operator_id: &'a str,
    /// How long, seconds (0: five minutes).
    pub duration_s: u64,
    /// A card the new one replaces.
    pub replaces: Option<[u8; 16]>,
    /// A temporary card: days (0: permanent).
    pub temporary_days: u32,
}

/// What an approver's badge is asked to sign.
pub struct ApprovalChallenge {
    /// Identifier, sent back with the signature.
    pub id: [u8; 16],
    /// The message ([`pivgate_proto::card_message::ApprovalMessage`]).
    pub message: Vec<u8>,
    /// The badge's 9A key algorithm.
    pub algorithm: KeyAlgorithm,
    /// How long it lives.
    pub ttl: std::time::Duration,
}

/// SHA-256 of each certificate a card holds, by slot: what an approval of
/// the card saw.
fn certificate_digests(card: &Card) -> Vec<String> {
    card.certificates.iter().map(|(slot, der)| format!("{slot:?}:{}", hex::encode(sha2::Sha256::digest(der)))).collect()
}

impl Gateway {
    /// The privileged roles `op` holds.
    pub fn privileged_roles(&self, op: &Operator) -> Vec<String> {
        op.roles.iter().filter(|r| self.lifecycle.privileged_roles.contains(r)).cloned().collect()
    }

    /// For a card of `operator` that is not approved for the privileged
    /// roles they hold: an approval request, opened unless one for the
    /// same roles and keys is open already, with `card.pending` naming it.
    /// For a card that needs no approval, an open request is withdrawn.
    pub(crate) fn ask_approval(&self, card: &mut Card, operator: &Operator, by: &str, why: &str) -> Result<Vec<Change>> {
        let now = self.now_ms();
        let roles = self.privileged_roles(operator);
        if card.approved_for(&roles) {
            return self.withdraw_request(card.pending.take(), now, "no approval needed any more");
        }
        let certificates = certificate_digests(card);
        let open = card.pending.map(|id| self.store.request(&id)).transpose()?.flatten().filter(|r| r.open(now));
        if open
            .as_ref()
            .is_some_and(|r| matches!(&r.kind, RequestKind::CardApproval { roles: rr, certificates: cc, .. } if *rr == roles && *cc == certificates))
        {
            return Ok(vec![]);
        }
        let mut changes = self.withdraw_request(card.pending.take(), now, "superseded by a newer request")?;
        let mut id = [0u8; 16];
        self.random.fill(&mut id)?;
        let request = Request {
            id,
            kind: RequestKind::CardApproval { card: card.uuid, operator_id: operator.id.clone(), roles, certificates },
            requested_by: by.to_string(),
            reason: why.to_string(),
            created_ms: now,
            expires_ms: now + self.lifecycle.request_ttl_h as i64 * 3_600_000,
            state: RequestState::Pending,
            fulfilled_ms: None,
        };
        card.pending = Some(id);
        card.note(now, by, format!("waits for a second administrator's approval (request {})", hex::encode(id)));
        changes.push(Change::Request(request));
        Ok(changes)
    }

    /// Withdraws request `id` if it is still pending.
    pub(crate) fn withdraw_request(&self, id: Option<[u8; 16]>, now: i64, why: &str) -> Result<Vec<Change>> {
        let Some(id) = id else { return Ok(vec![]) };
        Ok(match self.store.request(&id)? {
            Some(mut r) if r.state == RequestState::Pending => {
                r.state = RequestState::Withdrawn { at_ms: now, reason: why.to_string() };
                vec![Change::Request(r)]
            }
            _ => vec![],
        })
    }

    /// Approval requests for the cards of `operator` that its privileged
    /// roles need approved (an operator given such a role: their cards are
    /// refused until approved).
    pub(crate) fn ask_approvals_for(&self, operator: &Operator, by: &str) -> Result<Vec<Change>> {
        let mut changes = Vec::new();
        for mut card in self.store.cards()?.into_iter().filter(|c| c.operator_id == operator.id) {
            if self.store.denied(DenyKey::Card(card.uuid))? {
                continue;
            }
            let asked = self.ask_approval(&mut card, operator, by, "the operator holds a privileged role")?;
            if !asked.is_empty() {
                changes.extend(asked);
                changes.push(Change::Card(card));
            }
        }
        Ok(changes)
    }

    // ---- enrolment at a terminal ----

    /// Opens an enrolment window at a terminal (replacing one open there).
    pub async fn open_enrolment(&self, caller: &Caller, ask: &WindowAsk<'_>) -> Result<EnrolmentWindow> {
        // The agent reads no attestation at a tap yet: a window would
        // enrol a card the site's rule then refuses at every tap.
        if self.require_attested_pin_key {
            return Err(Error::Precondition(
                "this site requires attested PIN keys (cards.require_attested_pin_key) and an enrolment window cannot carry the attestation yet: enrol the card with its attestation (`pivgatectl card enrol --attestation ...`)".into(),
            ));
        }
        let max = self.lifecycle.enrolment_window_max_s;
        let duration = match ask.duration_s {
            0 => WINDOW_DEFAULT_S.min(max),
            s if (WINDOW_MIN_S..=max).contains(&s) => s,
            s => {
                return Err(Error::InvalidRequest(format!(
                    "an enrolment window lasts {WINDOW_MIN_S} to {max} seconds (lifecycle.enrolment_window_max_s), not {s}"
                )))
            }
        };
        if ask.temporary_days > self.max_temporary_days {
            return Err(Error::InvalidRequest(format!("a temporary card lasts at most {} days (cards.max_temporary_days)", self.max_temporary_days)));
        }
        let now = self.now_ms();
        let window = EnrolmentWindow {
            terminal: ask.terminal.to_string(),
            operator_id: ask.operator_id.to_string(),
            opened_by: caller.to_string(),
            opened_ms: now,
            closes_ms: now + duration as i64 * 1000,
            replaces: ask.replaces,
            temporary_days: ask.temporary_days,
        };
        self.commit_with(|| {
            match self.store.operator(ask.operator_id)? {
                None => return Err(Error::NotFound(format!("operator {}", ask.operator_id))),
                Some(o) if !o.enabled => return Err(Error::InvalidRequest(format!("operator {} is disabled", o.id))),
                Some(_) => {}
            }
            if self.store.terminal(ask.terminal)?.is_none() {
                return Err(Error::NotFound(format!("terminal {} (bind it to its agent first)", ask.terminal)));
            }
            if let Some(old) = ask.replaces {
                self.replaceable(&old, ask.operator_id)?;
            }
            let replaced = self.open_window(ask.terminal)?;
            let detail = json!({ "terminal": ask.terminal, "operator": ask.operator_id, "closes_ms": window.closes_ms,
                "replaces": ask.replaces.as_ref().map(uuid_text), "temporary_days": ask.temporary_days,
                "replaced_window_of": replaced.map(|w| w.operator_id) });
            let entry = AuditEntry { kind: AuditKind::OpenEnrolment, actor: caller.to_string(), terminal_id: ask.terminal.to_string(), detail };
            Ok(Some((entry, vec![Change::Window { terminal: ask.terminal.to_string(), window: Some(window.clone()) }])))
        })
        .await?;
        Ok(window)
    }

    /// Closes a terminal's enrolment window; whether one was open.
    pub async fn close_enrolment(&self, caller: &Caller, terminal: &str) -> Result<bool> {
        let mut was_open = false;
        self.commit_with(|| {
            let Some(w) = self.store.window(terminal)? else { return Ok(None) };
            was_open = w.closes_ms > self.now_ms();
            let detail = json!({ "terminal": terminal, "operator": w.operator_id, "was_open": was_open });
            let entry = AuditEntry { kind: AuditKind::CloseEnrolment, actor: caller.to_string(), terminal_id: terminal.to_string(), detail };
            Ok(Some((entry, vec![Change::Window { terminal: terminal.to_string(), window: None }])))
        })
        .await?;
        Ok(was_open)
    }

    /// The terminal's enrolment window, if one is open now.
    pub(crate) fn open_window(&self, terminal: &str) -> Result<Option<EnrolmentWindow>> {
        let now = self.now_ms();
        Ok(self.store.window(terminal)?.filter(|w| w.closes_ms > now))
    }

    /// The card `old` can be replaced by a new card of `operator_id`.
    fn replaceable(&self, old: &[u8; 16], operator_id: &str) -> Result<Card> {
        let Some(card) = self.store.card(old)? else { return Err(Error::NotFound(format!("card {}", uuid_text(old)))) };
        if card.operator_id != operator_id {
            return Err(Error::InvalidRequest(format!("card {} is operator {}'s, not {operator_id}'s", uuid_text(old), card.operator_id)));
        }
        if self.store.denied(DenyKey::Card(*old))? {
            return Err(Error::InvalidRequest(format!("card {} is revoked already", uuid_text(old))));
        }
        Ok(card)
    }

    /// Completes a proof made in an enrolment window: the signature is
    /// checked against the certificate the card offered, then, under the
    /// ledger lock, the window (still open, the same), the enrolment
    /// (decided again) and the replaced card's revocation commit together
    /// with the window's closing.
    pub(crate) async fn complete_enrolment(&self, caller: &Caller, p: Pending, window: EnrolmentWindow, signature: &[u8]) -> Result<Complete> {
        let terminal = p.terminal.clone();
        let checked = verify::inspect(&p.certificate).and_then(|info| verify::verify_signature(info.algorithm, &info.spki, &p.message, signature));
        if let Err(d) = checked {
            let (d, text) = self.deny(caller, &terminal, "enrol", d, json!({ "why": "signature refused", "window_of": window.operator_id })).await?;
            let issued = p.expires.checked_sub(self.challenges.ttl()).unwrap_or(p.expires);
            self.failures(caller, Some(p.card_uuid), None, &terminal, 1, issued).await?;
            return Ok(Complete::Denied(d, text));
        }
        let now = self.now_ms();
        let mut refused: Option<(Deny, String)> = None;
        let mut enrolled = None;
        let done = self
            .commit_with(|| {
                let mut refuse = |d: Deny, why: String| {
                    refused = Some((d, why));
                    Ok(None)
                };
                if self.store.window(&terminal)?.as_ref() != Some(&window) || window.closes_ms <= now {
                    return refuse(Deny::EnrolmentRefused, "the enrolment window closed".into());
                }
                if self.bound_terminal(&caller.name, &terminal)?.is_none() {
                    return refuse(Deny::TerminalNotBound, "terminal unknown or not bound to this agent".into());
                }
                let e = Enrolment {
                    operator_id: &window.operator_id,
                    certificate: &p.certificate,
                    slot: Slot::PivAuthentication,
                    to_card: None,
                    attestation: None,
                    dry_run: false,
                    temporary_days: window.temporary_days,
                };
                let prepared = match self.prepare_enrolment(&window.opened_by, &e) {
                    Ok(prepared) => prepared,
                    Err(e) => return refuse(Deny::EnrolmentRefused, e.to_string()),
                };
                let mut card = prepared.card;
                if card.uuid != p.card_uuid {
                    return refuse(Deny::EnrolmentRefused, "the card changed since the challenge".into());
                }
                card.note(now, &caller.to_string(), format!("proved at terminal {terminal} (card and PIN) in the window opened by {}", window.opened_by));
                let mut changes = prepared.extra;
                let mut locked = Vec::new();
                if let Some(old) = window.replaces {
                    match self.replaceable(&old, &window.operator_id) {
                        Ok(old_card) => {
                            card.note(now, &window.opened_by, format!("replaces card {}", uuid_text(&old)));
                            let revoked;
                            (revoked, locked) = self.revocation(old_card, &window.opened_by, now, &format!("replaced by card {}", uuid_text(&card.uuid)))?;
                            changes.extend(revoked);
                        }
                        Err(e) => return refuse(Deny::EnrolmentRefused, format!("the card to replace: {e}")),
                    }
                }
                let mut detail = prepared.detail;
                if let serde_json::Value::Object(m) = &mut detail {
                    m.insert("window_opened_by".into(), json!(window.opened_by));
                    m.insert("replaces".into(), json!(window.replaces.as_ref().map(uuid_text)));
                    m.insert("locked_terminals".into(), json!(locked));
                }
                changes.push(Change::Card(card.clone()));
                changes.push(Change::Window { terminal: terminal.clone(), window: None });
                enrolled = Some(card);
                Ok(Some((AuditEntry { kind: AuditKind::EnrolAtTerminal, actor: caller.to_string(), terminal_id: terminal.clone(), detail }, changes)))
            })
            .await?;
        match (done, enrolled) {
            (Some(_), Some(card)) => {
                let operator = self.store.operator(&card.operator_id)?.ok_or_else(|| Error::NotFound(format!("operator {}", card.operator_id)))?;
                tracing::info!(terminal = %terminal, operator = %operator.id, card = %uuid_text(&card.uuid), "card enrolled at the terminal");
                Ok(Complete::Enrolled { card: Box::new(card), operator })
            }
            _ => {
                let (d, why) = refused.unwrap_or((Deny::EnrolmentRefused, "state changed".into()));
                let (d, text) = self.deny(caller, &terminal, "enrol", d, json!({ "why": why, "window_of": window.operator_id })).await?;
                Ok(Complete::Denied(d, text))
            }
        }
    }

    // ---- replacement ----

    /// Enrols `e` as the replacement of card `old` (same operator) and
    /// revokes `old`, in one step. Returns the new card and the terminals
    /// the old one held (now locked).
    pub async fn replace_card(&self, caller: &Caller, old: [u8; 16], e: &Enrolment<'_>, reason: &str) -> Result<(Card, Vec<String>)> {
        let by = caller.to_string();
        let now = self.now_ms();
        let mut out = None;
        self.commit_with(|| {
            let old_card = self.replaceable(&old, e.operator_id)?;
            let prepared = self.prepare_enrolment(&by, e)?;
            let mut card = prepared.card;
            if card.uuid == old {
                return Err(Error::InvalidRequest("the new certificate is the card it would replace".into()));
            }
            card.note(now, &by, format!("replaces card {}: {reason}", uuid_text(&old)));
            let (mut changes, locked) = self.revocation(old_card, &by, now, &format!("replaced by card {}: {reason}", uuid_text(&card.uuid)))?;
            changes.extend(prepared.extra);
            changes.push(Change::Card(card.clone()));
            let mut detail = prepared.detail;
            if let serde_json::Value::Object(m) = &mut detail {
                m.insert("replaces".into(), json!(uuid_text(&old)));
                m.insert("reason".into(), json!(reason));
                m.insert("locked_terminals".into(), json!(locked));
            }
            out = Some((card, locked));
            Ok(Some((AuditEntry { kind: AuditKind::ReplaceCard, actor: by.clone(), terminal_id: String::new(), detail }, changes)))
        })
        .await?;
        out.ok_or_else(|| Error::Transaction("replacement not recorded".into()))
    }

    // ---- approvals ----

    /// Whether `caller` may decide `r` now: it is open, they did not ask
    /// for it, and it is not about themselves.
    fn may_approve(&self, caller: &Caller, r: &Request) -> Result<()> {
        if !r.open(self.now_ms()) {
            return Err(Error::InvalidRequest(format!("request {} is {}", hex::encode(r.id), r.state_name(self.now_ms()))));
        }
        if r.requested_by == caller.to_string() {
            return Err(Error::PermissionDenied("one administrator cannot approve their own request: a second administrator must".into()));
        }
        if r.kind.operator() == caller.name {
            return Err(Error::PermissionDenied("an administrator cannot approve a request about themselves".into()));
        }
        Ok(())
    }

    /// The approver's badge: the card whose 9A key `der` certifies,
    /// enrolled to the operator with the approver's name, in use, its
    /// certificate valid now.
    fn badge(&self, caller: &Caller, der: &[u8]) -> Result<(Card, verify::CertInfo)> {
        let refused = |why: String| Error::PermissionDenied(format!("approver's badge: {why}"));
        let info = verify::inspect(der).map_err(|d| refused(d.name().into()))?;
        let card = self.store.card_by_key(&info.key_sha256)?.map(|id| self.store.card(&id)).transpose()?.flatten();
        let Some(card) = card.filter(|c| c.operator_id == caller.name) else {
            return Err(refused(format!(
                "no card of operator {:?} (an approver's badge is a card enrolled to the operator named as their administrator certificate) holds this key",
                caller.name
            )));
        };
        if card.certificates.get(&Slot::PivAuthentication).and_then(|d| verify::inspect(d).ok()).is_none_or(|e| e.spki != info.spki) {
            return Err(refused("the key is not the card's 9A (card and PIN) key".into()));
        }
        if card.break_glass.is_some() {
            return Err(refused("a break-glass card approves nothing".into()));
        }
        if self.require_attested_pin_key && !card.attested.get(&Slot::PivAuthentication).is_some_and(|a| a.key_sha256 == info.key_sha256 && a.is_pin_key()) {
            return Err(refused("this site requires the 9A key to be attested as asking for the PIN (cards.require_attested_pin_key)".into()));
        }
        // A badge its holder enrolled themselves proves only the
        // certificate: whoever stole one could plant a card with it.
        // A card enrolled before who enrolled it was recorded could be
        // either: it is enrolled again by another administrator first.
        match card.key_enrolled_by.get(&Slot::PivAuthentication) {
            Some(by) if *by == caller.to_string() => {
                return Err(refused(format!(
                    "its key was enrolled by {caller} themselves: an approver's badge is one another administrator enrolled (a stolen certificate could plant a card)"
                )))
            }
            Some(_) => {}
            None => {
                return Err(refused(
                    "who enrolled its key is not on record (a card enrolled before pivgate kept it): another administrator enrols it again (`pivgatectl card enrol`) to make it a badge".into(),
                ))
            }
        }
        let operator = self.store.operator(&card.operator_id)?.filter(|o| o.enabled).ok_or_else(|| refused("the operator is disabled".into()))?;
        let revoked = self.store.denied(DenyKey::Card(card.uuid))? || self.store.denied(DenyKey::Certificate(info.fingerprint))?;
        let state = card.state(revoked, &self.privileged_roles(&operator), self.now_ms());
        if state != crate::model::CardState::Active {
            return Err(refused(format!("the card is {}", state.name())));
        }
        self.trust.validate(der, Slot::PivAuthentication, self.clock.system()).map_err(|d| refused(format!("certificate refused: {}", d.name())))?;
        Ok((card, info))
    }

    /// A challenge for `caller`'s badge to approve request `id`; `der` is
    /// the badge's 9A certificate.
    pub fn begin_approval(&self, caller: &Caller, id: [u8; 16], der: &[u8]) -> Result<ApprovalChallenge> {
        let Some(r) = self.store.request(&id)? else { return Err(Error::NotFound(format!("request {}", hex::encode(id)))) };
        self.may_approve(caller, &r)?;
        let (card, info) = self.badge(caller, der)?;
        // A badge that failed lately waits, and a locked-out approver
        // approves nothing, as at a terminal.
        if let Some((d, why)) = self.throttled(card.uuid, &caller.name, &crate::throttle::approvals_of(&caller.name))? {
            return Err(Error::PermissionDenied(format!("approver's badge: {}: {why}", d.name())));
        }
        let stored = serde_json::to_vec(&r).map_err(|e| Error::Corrupt(e.to_string()))?;
        let issued = self.challenges.issue_approval(
            &caller.to_string(),
            &r,
            &stored,
            card.uuid,
            info.algorithm,
            der.to_vec(),
            &*self.random,
            self.clock.instant(),
            self.now_ms(),
        )?;
        Ok(ApprovalChallenge {
            id: issued.id,
            message: issued.message,
            algorithm: info.algorithm,
            ttl: self.challenges.ttl().max(std::time::Duration::from_secs(60)),
        })
    }

    /// Approves request `id`: with `badge` (the approval challenge's id and
    /// the badge's signature of it), or, where the site allows it, on the
    /// approver's certificate alone.
    pub async fn approve(&self, caller: &Caller, id: [u8; 16], badge: Option<(&[u8], &[u8])>) -> Result<Request> {
        let signed = match badge {
            None if self.lifecycle.approval == ApprovalProof::Badge => {
                return Err(Error::PermissionDenied(
                    "this site requires approvals signed by the approver's badge (lifecycle.approval = \"badge\"): approve with the card in a reader".into(),
                ))
            }
            None => None,
            Some((challenge, signature)) => {
                let p = self
                    .challenges
                    .take(challenge, &caller.to_string(), APPROVAL, self.clock.instant())
                    .map_err(|d| Error::PermissionDenied(format!("approval challenge: {}", d.name())))?;
                let Purpose::Approve { request, request_sha256 } = p.purpose else {
                    return Err(Error::PermissionDenied("not an approval challenge".into()));
                };
                if request != id {
                    return Err(Error::PermissionDenied("the approval challenge is for another request".into()));
                }
                let info = verify::inspect(&p.certificate).map_err(|d| Error::PermissionDenied(format!("approver's badge: {}", d.name())))?;
                if let Err(d) = verify::verify_signature(info.algorithm, &info.spki, &p.message, signature) {
                    // Counted as a failed proof of the badge and its holder.
                    let issued = p.expires.checked_sub(self.challenges.ttl().max(std::time::Duration::from_secs(60))).unwrap_or(p.expires);
                    self.failures(caller, Some(p.card_uuid), Some(&caller.name), &crate::throttle::approvals_of(&caller.name), 1, issued).await?;
                    return Err(Error::PermissionDenied(format!("the badge's signature: {}", d.name())));
                }
                Some((p.certificate, request_sha256))
            }
        };
        let now = self.now_ms();
        let mut decided = None;
        self.commit_with(|| {
            let Some(mut r) = self.store.request(&id)? else { return Err(Error::NotFound(format!("request {}", hex::encode(id)))) };
            let stored = serde_json::to_vec(&r).map_err(|e| Error::Corrupt(e.to_string()))?;
            self.may_approve(caller, &r)?;
            // Under the ledger lock: a challenge taken before a lockout
            // approves nothing after it.
            if self.store.lockout(&caller.name)?.is_some() {
                return Err(Error::PermissionDenied(format!("{caller} is locked out after failed proofs: another administrator lifts it")));
            }
            let mut badge_card = None;
            if let Some((der, request_sha256)) = &signed {
                if <[u8; 32]>::from(sha2::Sha256::digest(&stored)) != *request_sha256 {
                    return Err(Error::PermissionDenied("the request changed after the badge signed: approve again".into()));
                }
                // Revoked or suspended since it signed: no approval.
                badge_card = Some(self.badge(caller, der)?.0.uuid);
            }
            let approval = |roles: Vec<String>| Approval { request: id, by: caller.to_string(), at_ms: now, badge: badge_card, roles };
            let mut changes = vec![];
            let approval = match &r.kind {
                RequestKind::CardApproval { card: card_id, roles, certificates, .. } => {
                    let Some(mut card) = self.store.card(card_id)? else { return Err(Error::NotFound(format!("card {}", uuid_text(card_id)))) };
                    if card.pending != Some(id) || certificate_digests(&card) != *certificates {
                        return Err(Error::InvalidRequest("the card changed since this request: its newer request is the one to approve".into()));
                    }
                    let approval = approval(roles.clone());
                    card.approval = Some(approval.clone());
                    card.pending = None;
                    card.note(
                        now,
                        &caller.to_string(),
                        format!(
                            "approved for {} (asked by {}){}",
                            roles.join(", "),
                            r.requested_by,
                            if badge_card.is_some() { ", signed by the approver's badge" } else { "" }
                        ),
                    );
                    changes.push(Change::Card(card));
                    approval
                }
                // Issued when the asker asks again.
                RequestKind::AdminCertificate { .. } => approval(vec![]),
                RequestKind::BreakGlass { .. } => {
                    let (granted, approval) = self.grant_break_glass(&r, caller, badge_card, now)?;
                    changes.extend(granted);
                    approval
                }
            };
            r.state = RequestState::Approved(approval);
            let detail = json!({ "request": hex::encode(id), "summary": r.kind.summary(), "requested_by": r.requested_by, "reason": r.reason,
                "approved_by": caller.to_string(), "badge": badge_card.as_ref().map(uuid_text),
                "badge_certificate_sha256": signed.as_ref().map(|(der, _)| hex::encode(sha2::Sha256::digest(der))) });
            decided = Some(r.clone());
            changes.push(Change::Request(r));
            Ok(Some((AuditEntry { kind: AuditKind::Approve, actor: caller.to_string(), terminal_id: String::new(), detail }, changes)))
        })
        .await?;
        decided.ok_or_else(|| Error::Transaction("approval not recorded".into()))
    }

    /// Refuses request `id` (any administrator, the one who asked too).
    pub async fn refuse(&self, caller: &Caller, id: [u8; 16], reason: &str) -> Result<Request> {
        let now = self.now_ms();
        let mut decided = None;
        self.commit_with(|| {
            let Some(mut r) = self.store.request(&id)? else { return Err(Error::NotFound(format!("request {}", hex::encode(id)))) };
            if !r.open(now) {
                return Err(Error::InvalidRequest(format!("request {} is {}", hex::encode(id), r.state_name(now))));
            }
            r.state = RequestState::Refused { by: caller.to_string(), at_ms: now, reason: reason.to_string() };
            let mut changes = vec![Change::Request(r.clone())];
            let card = match &r.kind {
                RequestKind::CardApproval { card, .. } => self.store.card(card)?.filter(|c| c.pending == Some(id)),
                RequestKind::AdminCertificate { .. } | RequestKind::BreakGlass { .. } => None,
            };
            if let Some(mut card) = card {
                card.pending = None;
                card.note(now, &caller.to_string(), format!("approval refused: {reason}"));
                changes.push(Change::Card(card));
            }
            let detail = json!({ "request": hex::encode(id), "summary": r.kind.summary(), "requested_by": r.requested_by, "reason": reason });
            decided = Some(r);
            Ok(Some((AuditEntry { kind: AuditKind::Refuse, actor: caller.to_string(), terminal_id: String::new(), detail }, changes)))
        })
        .await?;
        decided.ok_or_else(|| Error::Transaction("refusal not recorded".into()))
    }

    // ---- administrator certificates ----

    /// An administrator certificate for `public_key`. While the Admin API
    /// has issued none, it is issued at once: the bootstrap pair is the
    /// first administrator (made at first start) and one more. After that
    /// it is a request a second administrator approves (never the one who
    /// asked, never the one it names), so no administrator can make
    /// themselves another identity to approve their own requests with; the
    /// asker asks again with the same name, key and validity to get the
    /// certificate, once.
    pub async fn issue_admin_certificate(&self, caller: &Caller, name: &str, public_key: &[u8], validity_days: u32) -> Result<Issued> {
        crate::pki::check_request(name, public_key)?;
        let ca = crate::pki::ServiceCa::load(&crate::pki::Files::in_dir(&self.data_dir))?;
        let public_key_sha256 = hex::encode(sha2::Sha256::digest(public_key));
        let kind = RequestKind::AdminCertificate { name: name.to_string(), public_key_sha256: public_key_sha256.clone(), validity_days };
        let by = caller.to_string();
        let now = self.now_ms();
        let mut out = None;
        self.commit_with(|| {
            let bootstrap = self.store.bootstrap_open()?;
            if bootstrap && name == caller.name {
                return Err(Error::InvalidRequest(format!(
                    "the bootstrap pair is two administrators: the second administrator certificate must name someone other than {name}"
                )));
            }
            let requests = self.store.requests()?;
            let mine = |r: &&Request| r.kind == kind && r.requested_by == by;
            let approved =
                requests.iter().filter(mine).find(|r| r.fulfilled_ms.is_none() && now < r.expires_ms && matches!(r.state, RequestState::Approved(_)));
            let request = match (bootstrap, approved) {
                (true, _) => None,
                (false, Some(r)) => Some(r.clone()),
                (false, None) => {
                    if let Some(r) = requests.iter().filter(mine).find(|r| r.open(now)) {
                        out = Some(Issued::Pending(Box::new(r.clone())));
                        return Ok(None);
                    }
                    let mut id = [0u8; 16];
                    self.random.fill(&mut id)?;
                    let existing = self.store.admins()?.into_iter().any(|a| a.name == name) || name == crate::pki::FIRST_ADMIN;
                    let r = Request {
                        id,
                        kind: kind.clone(),
                        requested_by: by.clone(),
                        reason: if existing {
                            format!("a NEW KEY for the EXISTING administrator {name}: confirm with {name} in person")
                        } else {
                            format!("administrator certificate for {name}")
                        },
                        created_ms: now,
                        expires_ms: now + self.lifecycle.request_ttl_h as i64 * 3_600_000,
                        state: RequestState::Pending,
                        fulfilled_ms: None,
                    };
                    let detail = json!({ "request": hex::encode(id), "summary": kind.summary(), "name": name, "public_key_sha256": public_key_sha256 });
                    out = Some(Issued::Pending(Box::new(r.clone())));
                    return Ok(Some((
                        AuditEntry { kind: AuditKind::AskAdminCertificate, actor: by.clone(), terminal_id: String::new(), detail },
                        vec![Change::Request(r)],
                    )));
                }
            };
            let approved_by = request.as_ref().and_then(|r| match &r.state {
                RequestState::Approved(a) => Some(a.by.clone()),
                _ => None,
            });
            let certificate_pem = ca.issue_client(crate::pki::Role::Admin, name, public_key, validity_days)?;
            let record = AdminRecord {
                name: name.to_string(),
                public_key_sha256: public_key_sha256.clone(),
                issued_by: by.clone(),
                approved_by: approved_by.clone(),
                request: request.as_ref().map(|r| hex::encode(r.id)),
                at_ms: now,
            };
            let detail = json!({ "role": "Admin", "name": name, "public_key_sha256": public_key_sha256, "bootstrap": bootstrap,
                "request": record.request, "approved_by": approved_by });
            let mut changes = vec![Change::Admin(record)];
            if bootstrap {
                changes.push(Change::BootstrapSpent);
            }
            if let Some(mut r) = request {
                r.fulfilled_ms = Some(now);
                changes.push(Change::Request(r));
            }
            out = Some(Issued::Certificate { certificate_pem, ca_pem: ca.cert_pem.clone() });
            Ok(Some((AuditEntry { kind: AuditKind::IssueCertificate, actor: by.clone(), terminal_id: String::new(), detail }, changes)))
        })
        .await?;
        out.ok_or_else(|| Error::Transaction("certificate not recorded".into()))
    }

    // ---- housekeeping ----

    /// Forgets requests closed (decided, withdrawn or lapsed) for 30 days:
    /// the lifecycle tree stays the size of what is current; the audit log
    /// keeps every request and decision. Returns how many.
    pub async fn prune_requests(&self) -> Result<usize> {
        const KEEP_MS: i64 = 30 * 86_400_000;
        let now = self.now_ms();
        let mut forgotten = 0;
        self.commit_with(|| {
            let old: Vec<[u8; 16]> =
                self.store.requests()?.into_iter().filter(|r| !r.open(now) && now > r.expires_ms + KEEP_MS).map(|r| r.id).take(1000).collect();
            forgotten = old.len();
            if old.is_empty() {
                return Ok(None);
            }
            let detail = json!({ "requests": old.iter().map(hex::encode).collect::<Vec<_>>() });
            let entry = AuditEntry { kind: AuditKind::PruneRequests, actor: "gateway".into(), terminal_id: String::new(), detail };
            Ok(Some((entry, old.into_iter().map(Change::ForgetRequest).collect())))
        })
        .await?;
        Ok(forgotten)
    }
}
