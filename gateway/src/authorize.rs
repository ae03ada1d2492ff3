//! The one authorization: may this operator, with this card and
//! certificate, use this mechanism at this terminal, through this agent,
//! now?
//!
//! Every decision asks [`Gateway::authorize`]: a begin (with the
//! certificate the agent offers), a completion (with the certificate the
//! challenge was issued for, path-validated again), the re-check under the
//! ledger lock just before a grant commits (the deny list always, the path
//! again only when a CRL changed meanwhile), and the re-check of live
//! sessions after an administrator's change or a CRL (with the change being
//! decided standing in as an [`Overlay`]). A policy rule is written here
//! once; the callers differ only in what they ask and how a refusal is
//! reported (a denial, or a lock reason: [`lock_reason`]).

use std::time::Duration;

use sha2::Digest;

use crate::core::Gateway;
use crate::error::Result;
use crate::model::{Agent, BreakGlass, Card, DenyKey, IdentityRule, Mechanism, Operator, Slot, Terminal, TerminalPolicy};
use crate::verify::{self, Deny, Validation};

/// Records as a change being decided will leave them, for judging live
/// sessions against them before the change commits.
#[derive(Default)]
pub(crate) struct Overlay<'a> {
    /// An operator being replaced.
    pub operator: Option<&'a Operator>,
    /// A terminal's policy being replaced.
    pub policy: Option<(&'a str, &'a TerminalPolicy)>,
    /// An agent binding being replaced.
    pub agent: Option<&'a Agent>,
    /// A break-glass grant being ended.
    pub break_glass: Option<&'a BreakGlass>,
}

/// Which certificate is judged.
#[derive(Clone, Copy)]
pub(crate) enum Certificate<'a> {
    /// The enrolled one for the mechanism's slot; else the one the agent
    /// offers (kept only once a proof with its key succeeds); else the
    /// agent is asked for it.
    Offered(Option<&'a [u8]>),
    /// The one a challenge was issued for.
    Pinned(&'a [u8]),
    /// The enrolled one (a live session's).
    Enrolled,
}

/// How far the certificate is checked. The deny list is read every time.
#[derive(Clone, Copy)]
pub(crate) enum Check {
    /// Identity against the card, path validation with revocation, and a
    /// key of its own for each slot.
    Full,
    /// Path validation again only if the CRLs changed since `generation`
    /// (the re-check under the ledger lock: the full check has just run).
    SinceGeneration(u64),
    /// A verdict found within the last minute under the same CRLs stands
    /// (the periodic re-check of sessions).
    Cached,
}

/// What is asked.
pub(crate) struct Ask<'a> {
    /// The agent acting.
    pub agent: &'a str,
    /// The terminal.
    pub terminal: &'a str,
    /// The card.
    pub card: [u8; 16],
    /// The mechanism asked for; `None`: the terminal's first.
    pub mechanism: Option<Mechanism>,
    /// The certificate judged.
    pub certificate: Certificate<'a>,
    /// How far it is checked.
    pub check: Check,
    /// A change being decided.
    pub overlay: &'a Overlay<'a>,
    /// A live session's operator and the roles it carries (consoles act
    /// on them): it must still be the card's operator (or the one a
    /// break-glass by presence opened it for), each role still theirs.
    pub session: Option<(&'a str, &'a [String])>,
}

/// Everything an allowed request was judged on.
pub(crate) struct Allowed {
    /// The terminal (its policy as judged).
    pub terminal: Terminal,
    /// The card.
    pub card: Card,
    /// The operator.
    pub operator: Operator,
    /// The mechanism.
    pub mechanism: Mechanism,
    /// The certificate.
    pub certificate: Vec<u8>,
    /// Whether the agent supplied it (not enrolled for the slot yet).
    pub supplied: bool,
    /// What the path validation relied on, when it ran.
    pub validation: Option<Validation>,
    /// The certificate, parsed, when the full check ran.
    pub info: Option<verify::CertInfo>,
    /// The break-glass grant the proof stands on: the card's own, or the
    /// one an approver's badge opens by presence.
    pub break_glass: Option<BreakGlass>,
}

/// The answer.
pub(crate) enum Verdict {
    /// Allowed.
    Allowed(Box<Allowed>),
    /// The agent must send the certificate of this slot first.
    NeedCertificate(Slot),
    /// Refused, and why (for the audit record).
    Refused(Deny, &'static str),
    /// A role the session carries is no longer the operator's.
    SessionRoleRemoved,
}

/// How long a session's certificate verdict is reused.
const VERDICT_REUSE: Duration = Duration::from_secs(60);

/// Most cached verdicts before the cache starts over.
const VERDICTS_MAX: usize = 100_000;

impl Gateway {
    /// The one authorization (see the module documentation).
    pub(crate) fn authorize(&self, ask: &Ask<'_>) -> Result<Verdict> {
        use Verdict::Refused;
        let overlay = ask.overlay;
        let agent = match overlay.agent {
            Some(a) if a.name == ask.agent => Some(a.clone()),
            _ => self.store.agent(ask.agent)?,
        };
        let terminal = match agent.filter(|a| a.terminals.iter().any(|t| t == ask.terminal)) {
            Some(_) => self.store.terminal(ask.terminal)?,
            None => None,
        };
        let Some(mut terminal) = terminal else { return Ok(Refused(Deny::TerminalNotBound, "terminal unknown or not bound to this agent")) };
        if let Some((id, p)) = overlay.policy {
            if id == terminal.id {
                terminal.policy = p.clone();
            }
        }
        let Some(card) = self.store.card(&ask.card)? else { return Ok(Refused(Deny::UnknownCard, "card not enrolled")) };
        if card.suspended.is_some() {
            return Ok(Refused(Deny::CardSuspended, "card suspended"));
        }
        if card.expires_ms.is_some_and(|end| self.now_ms() >= end) {
            return Ok(Refused(Deny::CardExpired, "temporary card past its end"));
        }
        let now = self.now_ms();
        let grant = |id: &[u8; 16]| -> Result<Option<BreakGlass>> {
            Ok(match overlay.break_glass {
                Some(g) if g.id == *id => Some(g.clone()),
                _ => self.store.break_glass(id)?,
            })
        };
        // A break-glass card works only where and while its grant holds,
        // and only with its PIN.
        let mut break_glass = None;
        if let Some(id) = card.break_glass {
            match grant(&id)? {
                Some(g) if g.holds(ask.terminal, now) => break_glass = Some(g),
                Some(g) if g.terminals.iter().any(|t| t == ask.terminal) => {
                    return Ok(Refused(Deny::BreakGlassEnded, "a break-glass card, and its grant has ended"))
                }
                _ => return Ok(Refused(Deny::NotAuthorized, "a break-glass card, and its grant does not hold at this terminal")),
            }
        }
        let operator_named = |id: &str| -> Result<Option<Operator>> {
            Ok(match overlay.operator {
                Some(o) if o.id == id => Some(o.clone()),
                _ => self.store.operator(id)?,
            })
        };
        let Some(holder) = operator_named(&card.operator_id)? else { return Ok(Refused(Deny::UnknownCard, "card's operator no longer exists")) };
        if !holder.enabled {
            return Ok(Refused(Deny::OperatorDisabled, "operator disabled"));
        }
        // A privileged role's holder proves themselves only with a card a
        // second administrator approved for it.
        if !card.approved_for(&self.privileged_roles(&holder)) {
            return Ok(Refused(Deny::CardPending, "card waits for a second administrator's approval"));
        }
        // An approver's badge at a terminal that a break-glass by their
        // presence names opens it in the grant's operator's name, while
        // the grant holds; a session of the badge's own holder is theirs.
        let theirs = ask.session.is_some_and(|(op, _)| op == card.operator_id);
        let present = match self.presence_grant(&card, ask.terminal, overlay)? {
            _ if theirs => None,
            Some(Err(why)) if ask.session.is_none() => return Ok(Refused(Deny::NotAuthorized, why)),
            Some(Ok(g)) if g.holds(ask.terminal, now) => Some(g),
            Some(_) if ask.session.is_some() => return Ok(Refused(Deny::BreakGlassEnded, "the break-glass grant the session stood on has ended")),
            _ => None,
        };
        let operator = match &present {
            None => holder.clone(),
            Some(g) => match operator_named(&g.operator_id)? {
                Some(o) if o.enabled => o,
                Some(_) => return Ok(Refused(Deny::OperatorDisabled, "the break-glass grant's operator is disabled")),
                None => return Ok(Refused(Deny::UnknownCard, "the break-glass grant's operator no longer exists")),
            },
        };
        if ask.session.is_some_and(|(op, _)| op != operator.id) {
            return Ok(Refused(Deny::UnknownCard, "the session's operator is not the card's"));
        }
        // A lockout refuses every new proof, checked again at the grant
        // under the ledger lock; a session already open stands. An
        // approver locked out opens no grant either.
        if ask.session.is_none() {
            for o in [&operator.id, &holder.id] {
                if self.store.lockout(o)?.is_some() {
                    return Ok(Refused(Deny::LockedOut, "operator locked out after consecutive failures: an administrator lifts it"));
                }
            }
        }
        let break_glass = break_glass.or(present);
        let policy = &terminal.policy;
        if policy.hours.is_some_and(|h| !h.contains(self.now_ms())) {
            return Ok(Refused(Deny::OutsideHours, "outside the terminal's hours"));
        }
        if !policy.allowed_roles.is_empty() && !operator.roles.iter().any(|r| policy.allowed_roles.contains(r)) {
            return Ok(Refused(Deny::NotAuthorized, "operator has no role allowed at this terminal"));
        }
        // Before any certificate check: no certificate verdict (a stale CRL
        // that leaves a session standing) may hide a role taken away.
        if ask.session.is_some_and(|(_, held)| held.iter().any(|r| !operator.roles.contains(r))) {
            return Ok(Verdict::SessionRoleRemoved);
        }
        let mechanism = match ask.mechanism {
            Some(m) if !policy.allowed_mechanisms.contains(&m) => return Ok(Refused(Deny::MechanismNotAllowed, "mechanism not allowed at this terminal")),
            Some(m) => m,
            // Break-glass proves with a PIN wherever the terminal allows it.
            None if break_glass.is_some() && policy.allowed_mechanisms.contains(&Mechanism::CardAndPin) => Mechanism::CardAndPin,
            None => match policy.allowed_mechanisms.first() {
                Some(m) => *m,
                None => return Ok(Refused(Deny::MechanismNotAllowed, "terminal allows no mechanism")),
            },
        };
        if break_glass.is_some() && mechanism != Mechanism::CardAndPin {
            return Ok(Refused(Deny::MechanismNotAllowed, "break-glass proves with a card and its PIN only"));
        }
        let slot = mechanism.slot();
        let same_key = |a: &[u8], b: &[u8]| matches!((verify::inspect(a), verify::inspect(b)), (Ok(x), Ok(y)) if x.spki == y.spki);
        let (certificate, supplied) = match (ask.certificate, card.certificates.get(&slot)) {
            (Certificate::Pinned(d), _) => (d.to_vec(), false),
            // The card offers another certificate for the enrolled key (one
            // renewed on the card): that one is judged, and the card signs
            // for it; the enrolled one stays as enrolled.
            (Certificate::Offered(Some(d)), Some(e)) if d != e.as_slice() && same_key(d, e) => (d.to_vec(), false),
            (Certificate::Offered(_) | Certificate::Enrolled, Some(d)) => (d.clone(), false),
            // An enrolled-key card's keys are the ones enrolled: a key
            // offered for another slot is no key of this card's.
            (Certificate::Offered(Some(_)), None) if card.identity == IdentityRule::EnrolledKey => {
                return Ok(Refused(Deny::UnknownCard, "no key enrolled for the slot"))
            }
            // A key another card holds is not this card's.
            (Certificate::Offered(Some(d)), None)
                if verify::inspect(d).ok().and_then(|i| self.store.card_by_key(&i.key_sha256).ok().flatten()).is_some_and(|o| o != card.uuid) =>
            {
                return Ok(Refused(Deny::IdentityMismatch, "the certificate's key belongs to another card"))
            }
            // A privileged operator's card gains a key only by an
            // administrator's enrolment and a second one's approval.
            (Certificate::Offered(Some(_)), None) if !self.privileged_roles(&operator).is_empty() => {
                return Ok(Refused(Deny::CardPending, "a new key for a privileged operator's card needs an enrolment and its approval"))
            }
            (Certificate::Offered(Some(d)), None) => (d.to_vec(), true),
            (Certificate::Offered(None), None) => return Ok(Verdict::NeedCertificate(slot)),
            (Certificate::Enrolled, None) => return Ok(Refused(Deny::UnknownCard, "no certificate enrolled for the slot")),
        };
        let fingerprint: [u8; 32] = sha2::Sha256::digest(&certificate).into();
        // A deny list that cannot be read denies (and ends sessions).
        let denied = |k: DenyKey| self.store.denied(k).unwrap_or(true);
        if denied(DenyKey::Card(card.uuid)) || denied(DenyKey::Certificate(fingerprint)) {
            return Ok(Refused(Deny::RevokedDenyList, "card revoked"));
        }
        let (mut info, mut validation) = (None, None);
        match ask.check {
            Check::Full => match self.check_certificate(&card, &certificate, slot) {
                Ok((i, v)) => (info, validation) = (Some(i), Some(v)),
                Err(d) => return Ok(Refused(d, "certificate refused")),
            },
            Check::SinceGeneration(g) if self.trust.generation() != g => {
                // A CRL installed since the full check either lands before
                // this grant (and refuses it) or after (and its re-check
                // finds the session).
                match self.trust.validate(&certificate, slot, self.clock.system()) {
                    Ok(v) => validation = Some(v),
                    Err(d) => return Ok(Refused(d, "a CRL changed while the proof was checked")),
                }
            }
            Check::SinceGeneration(_) => {}
            Check::Cached => {
                if let Err(d) = self.cached_check(&card, &certificate, slot, fingerprint) {
                    return Ok(Refused(d, "certificate refused"));
                }
            }
        }
        Ok(Verdict::Allowed(Box::new(Allowed { terminal, card, operator, mechanism, certificate, supplied, validation, info, break_glass })))
    }

    /// The identity, path and key checks of a card certificate.
    fn check_certificate(&self, card: &Card, der: &[u8], slot: Slot) -> std::result::Result<(verify::CertInfo, Validation), Deny> {
        let info = verify::inspect(der)?;
        match card.identity {
            IdentityRule::Fips201 => {
                if info.uuid != Some(card.uuid) {
                    return Err(Deny::IdentityMismatch);
                }
                if let (Some(a), Some(b)) = (&info.fascn, &card.fascn) {
                    if a != b {
                        return Err(Deny::IdentityMismatch);
                    }
                }
            }
            // The key is the card: the certificate must carry the key
            // enrolled for the slot, whatever else it names.
            IdentityRule::EnrolledKey => {
                let enrolled = card.certificates.get(&slot).and_then(|d| verify::inspect(d).ok());
                if enrolled.is_none_or(|e| e.spki != info.spki) {
                    return Err(Deny::IdentityMismatch);
                }
            }
        }
        // Where the site requires it, the PIN key is the one attested as
        // generated on the token and asking for the PIN: a card enrolled
        // before the rule, or a key swapped since, is refused.
        if slot == Slot::PivAuthentication
            && self.require_attested_pin_key
            && !card.attested.get(&slot).is_some_and(|a| a.key_sha256 == info.key_sha256 && a.is_pin_key())
        {
            return Err(Deny::KeyNotAttested);
        }
        let v = self.trust.validate(der, slot, self.clock.system())?;
        // A card is judged under the rule it was enrolled under: an issuer
        // moved to another rule (or a certificate from another issuer)
        // does not carry it over.
        if v.identity != card.identity {
            return Err(Deny::IdentityMismatch);
        }
        // One key for both slots would make the no-PIN key a PIN key.
        let other = match slot {
            Slot::PivAuthentication => Slot::CardAuthentication,
            Slot::CardAuthentication => Slot::PivAuthentication,
        };
        if let Some(o) = card.certificates.get(&other).and_then(|d| verify::inspect(d).ok()) {
            if o.spki == info.spki {
                return Err(Deny::MechanismNotAllowed);
            }
        }
        Ok((info, v))
    }

    /// [`Check::Cached`]: a certificate found valid under the same CRLs
    /// within the last minute, and not yet at notAfter, is valid still.
    fn cached_check(&self, card: &Card, der: &[u8], slot: Slot, fingerprint: [u8; 32]) -> std::result::Result<(), Deny> {
        let now = self.clock.system();
        let generation = self.trust.generation();
        let cached = self.verdict_cache.lock().ok().and_then(|c| c.get(&fingerprint).copied()).is_some_and(|(g, until)| g == generation && now < until);
        if cached {
            return Ok(());
        }
        self.check_certificate(card, der, slot)?;
        let not_after = x509_parser::parse_x509_certificate(der)
            .map(|(_, c)| std::time::UNIX_EPOCH + Duration::from_secs(c.validity().not_after.timestamp().max(0) as u64))
            .unwrap_or(now);
        if let Ok(mut c) = self.verdict_cache.lock() {
            if c.len() > VERDICTS_MAX {
                c.clear();
            }
            c.insert(fingerprint, (generation, not_after.min(now + VERDICT_REUSE)));
        }
        Ok(())
    }
}

/// How a refusal ends a live session: `None` when it does not (a CRL that
/// is merely stale refuses new taps but must not lock a control room for
/// an issuer's outage). `policy_changing`: the refusal comes from the
/// terminal's new policy.
pub(crate) fn lock_reason(deny: Deny, policy_changing: bool) -> Option<crate::model::LockReason> {
    use crate::model::LockReason as L;
    Some(match deny {
        Deny::CrlStale => return None,
        Deny::TerminalNotBound => L::Administrator,
        Deny::UnknownCard | Deny::OperatorDisabled | Deny::RevokedDenyList => L::Revoked,
        Deny::NotAuthorized if !policy_changing => L::RoleRemoved,
        Deny::RevokedCrl => L::CertificateRevoked,
        Deny::CardSuspended => L::CardSuspended,
        Deny::CardExpired => L::CardExpired,
        Deny::BreakGlassEnded => L::BreakGlassEnded,
        Deny::OutsideHours => L::OutsideHours,
        Deny::CertExpired | Deny::CertNotYetValid => L::CertificateExpired,
        _ => L::PolicyChanged,
    })
}
