//! The gateway's own types: what it stores and decides about. The gRPC
//! types of `pivgate-proto` are converted to and from these at the service
//! boundary (`service.rs`), and nowhere else.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A card key slot the gateway asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Slot {
    /// 9A, PIV Authentication: the card signs only after the PIN.
    PivAuthentication,
    /// 9E, Card Authentication: no PIN.
    CardAuthentication,
}

/// How an operator proved themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mechanism {
    /// 9A after the PIN: card and PIN.
    CardAndPin,
    /// 9E: card only.
    CardOnly,
}

impl Mechanism {
    /// The slot that proves this mechanism.
    pub fn slot(self) -> Slot {
        match self {
            Mechanism::CardAndPin => Slot::PivAuthentication,
            Mechanism::CardOnly => Slot::CardAuthentication,
        }
    }

    /// The byte for the signed message ([`pivgate_proto::card_message`]).
    pub fn code(self) -> u8 {
        use pivgate_proto::card_message::{MECHANISM_CARD_AND_PIN, MECHANISM_CARD_ONLY};
        match self {
            Mechanism::CardAndPin => MECHANISM_CARD_AND_PIN,
            Mechanism::CardOnly => MECHANISM_CARD_ONLY,
        }
    }
}

/// Key algorithms pivgate accepts on cards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    /// ECDSA P-256 with SHA-256.
    EcdsaP256,
    /// ECDSA P-384 with SHA-384.
    EcdsaP384,
    /// RSA 2048 PKCS#1 v1.5 with SHA-256.
    Rsa2048,
}

/// An enrolled operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operator {
    /// Identifier.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Roles.
    pub roles: Vec<String>,
    /// May authenticate.
    pub enabled: bool,
}

/// How a card issuer's cards are told apart.
///
/// FIPS 201 cards carry their identity in the certificate (the card UUID
/// in a `urn:uuid:` SAN, the FASC-N): a card re-issued by that issuer with
/// the same UUID is the same card. Enterprise tokens (YubiKeys and Java
/// Card PIV applets provisioned by the site's IT, AD CS smart-card logon
/// certificates) carry no such name: for their issuers the key enrolled
/// for each slot is the identity, and a CHUID GUID or a serial number only
/// helps find it. Never the subject name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentityRule {
    /// The card UUID (and FASC-N) in the certificate.
    #[default]
    Fips201,
    /// The key pinned at enrolment.
    EnrolledKey,
}

impl IdentityRule {
    /// The rule's name in the configuration and in audit records.
    pub fn name(self) -> &'static str {
        match self {
            IdentityRule::Fips201 => "fips201",
            IdentityRule::EnrolledKey => "enrolled-key",
        }
    }
}

/// An enrolled card: its strong identifiers, its operator, and the
/// certificates the gateway holds for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Card {
    /// The card's id: for a FIPS 201 card its card UUID (the CHUID GUID
    /// and the certificate's `urn:uuid:`); for an enrolled-key card an id
    /// derived from the key first enrolled for it ([`enrolled_key_id`]).
    pub uuid: [u8; 16],
    /// How the card is told apart: the identity rule of its issuer when it
    /// was enrolled. A certificate from an issuer with another rule is not
    /// this card's.
    #[serde(default)]
    pub identity: IdentityRule,
    /// FASC-N, 25 bytes, when the card has one.
    pub fascn: Option<Vec<u8>>,
    /// The operator.
    pub operator_id: String,
    /// Certificates (DER) by slot.
    #[serde(with = "b64::map")]
    pub certificates: BTreeMap<Slot, Vec<u8>>,
    /// What an attestation proved about a slot's key, when one was
    /// enrolled with it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attested: BTreeMap<Slot, crate::attest::Attested>,
    /// Suspended (reversible), and why; `None`: active. Revocation is the
    /// deny list, never undone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended: Option<String>,
    /// A temporary card's end (Unix milliseconds), refused from then on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<i64>,
    /// A second administrator's approval of the card for its operator's
    /// privileged roles (`lifecycle.privileged_roles`): while its operator
    /// holds one, a card without it is refused. Cleared when the card
    /// gains a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// The approval request the card waits for, if one is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<[u8; 16]>,
    /// What happened to the card, oldest first (the last
    /// [`CARD_HISTORY_MAX`]; the audit log keeps everything).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<CardNote>,
    /// Who enrolled each slot's key (an administrator identity): a badge
    /// an asker enrolled proves no second person for their requests.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub key_enrolled_by: BTreeMap<Slot, String>,
    /// The break-glass grant this temporary card exists for: it works only
    /// where and while that grant holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub break_glass: Option<[u8; 16]>,
}

/// How many notes a card's history keeps.
pub const CARD_HISTORY_MAX: usize = 32;

/// How many bytes of notes (as stored) a card's history keeps: with two
/// certificates of `limits::CERTIFICATE_MAX` the card stays under the
/// store's `MAX_VALUE`, so a suspension or revocation (a note more) can
/// always be written.
pub const CARD_HISTORY_BYTES: usize = 12 * 1024;

impl Card {
    /// A new card of `operator_id`, active, with nothing enrolled yet.
    pub fn new(uuid: [u8; 16], identity: IdentityRule, fascn: Option<Vec<u8>>, operator_id: &str) -> Card {
        Card {
            uuid,
            identity,
            fascn,
            operator_id: operator_id.to_string(),
            certificates: Default::default(),
            attested: Default::default(),
            suspended: None,
            expires_ms: None,
            approval: None,
            pending: None,
            key_enrolled_by: Default::default(),
            break_glass: None,
            history: Vec::new(),
        }
    }

    /// Adds a note to the card's history.
    pub fn note(&mut self, unix_ms: i64, by: &str, what: impl Into<String>) {
        self.history.push(CardNote { unix_ms, by: by.to_string(), what: what.into() });
        if self.history.len() > CARD_HISTORY_MAX {
            self.history.drain(..self.history.len() - CARD_HISTORY_MAX);
        }
        // The newest notes that fit the budget, as stored (the newest one
        // always: its text is bounded where it is made).
        let size = |n: &CardNote| serde_json::to_vec(n).map_or(usize::MAX, |v| v.len() + 1);
        let mut total = 0;
        let keep = self.history.iter().rev().take_while(|n| {
            total += size(n);
            total <= CARD_HISTORY_BYTES
        });
        let keep = keep.count().max(1);
        let drop = self.history.len() - keep;
        self.history.drain(..drop);
    }

    /// Whether a second administrator approved the card for every one of
    /// `privileged` (the privileged roles its operator holds now).
    pub fn approved_for(&self, privileged: &[String]) -> bool {
        privileged.is_empty() || self.approval.as_ref().is_some_and(|a| privileged.iter().all(|r| a.roles.contains(r)))
    }

    /// Its state now, given whether it is on the deny list and the
    /// privileged roles its operator holds.
    pub fn state(&self, revoked: bool, privileged: &[String], now_ms: i64) -> CardState {
        if revoked {
            CardState::Revoked
        } else if !self.approved_for(privileged) {
            CardState::Pending
        } else if self.suspended.is_some() {
            CardState::Suspended
        } else if self.expires_ms.is_some_and(|end| now_ms >= end) {
            CardState::Expired
        } else {
            CardState::Active
        }
    }
}

/// A card's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardState {
    /// Waiting for a second administrator's approval.
    Pending,
    /// In use.
    Active,
    /// Suspended (reversible).
    Suspended,
    /// A temporary card past its end.
    Expired,
    /// Revoked (never undone).
    Revoked,
}

impl CardState {
    /// Its name in the API and the CLI.
    pub fn name(self) -> &'static str {
        match self {
            CardState::Pending => "pending",
            CardState::Active => "active",
            CardState::Suspended => "suspended",
            CardState::Expired => "expired",
            CardState::Revoked => "revoked",
        }
    }
}

/// A second administrator's approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The request approved.
    pub request: [u8; 16],
    /// Who approved (the administrator's certificate identity).
    pub by: String,
    /// When, Unix ms.
    pub at_ms: i64,
    /// The approver's card that signed the approval, when one did.
    pub badge: Option<[u8; 16]>,
    /// The privileged roles approved.
    pub roles: Vec<String>,
}

/// One entry of a card's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardNote {
    /// When, Unix ms.
    pub unix_ms: i64,
    /// Who (an administrator, an agent, the gateway).
    pub by: String,
    /// What ("enrolled 9A", "suspended: lost", "replaced by ...").
    pub what: String,
}

/// An enrolment window: for a few minutes, the first unknown card tapped
/// at `terminal` whose 9A key proves itself (card and PIN) is enrolled to
/// `operator_id`. One use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrolmentWindow {
    /// Where.
    pub terminal: String,
    /// For whom.
    pub operator_id: String,
    /// The administrator who opened it.
    pub opened_by: String,
    /// When, Unix ms.
    pub opened_ms: i64,
    /// Until when, Unix ms.
    pub closes_ms: i64,
    /// A card the new one replaces (revoked in the same step).
    pub replaces: Option<[u8; 16]>,
    /// A temporary card: days (0: permanent).
    pub temporary_days: u32,
}

/// A change one administrator asks for and a second must approve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Identifier (random).
    pub id: [u8; 16],
    /// What is asked.
    pub kind: RequestKind,
    /// Who asked (certificate identity).
    pub requested_by: String,
    /// Why, in their words.
    pub reason: String,
    /// When, Unix ms.
    pub created_ms: i64,
    /// Not approved by then, it lapses.
    pub expires_ms: i64,
    /// Where it stands.
    pub state: RequestState,
    /// When what was approved was carried out (an administrator
    /// certificate fetched), Unix ms: at most once.
    #[serde(default)]
    pub fulfilled_ms: Option<i64>,
}

/// A break-glass grant in force (or ended): approved by a second
/// administrator, for one operator at named terminals, with one temporary
/// card, until a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakGlass {
    /// The request that made it.
    pub id: [u8; 16],
    /// The operator.
    pub operator_id: String,
    /// Where it holds.
    pub terminals: Vec<String>,
    /// The temporary card it holds for (`BreakGlassProof::TemporaryCard`).
    pub card: Option<[u8; 16]>,
    /// The approver whose own badge (card and PIN), tapped at one of the
    /// terminals, opens it for the operator
    /// (`BreakGlassProof::ApproverPresent`): their operator id.
    #[serde(default)]
    pub present: Option<String>,
    /// That approver's badge: the card that signed the approval, and the
    /// only one that opens the grant.
    #[serde(default)]
    pub present_card: Option<[u8; 16]>,
    /// Who asked, who approved.
    pub asked_by: String,
    /// See `asked_by`.
    pub approved_by: String,
    /// Why, in the asker's words.
    pub reason: String,
    /// From and until, Unix ms.
    pub from_ms: i64,
    /// See `from_ms`.
    pub until_ms: i64,
    /// Ended before its time: by whom, when, why.
    pub ended: Option<(String, i64, String)>,
}

impl BreakGlass {
    /// Whether it holds at `terminal` at `now_ms`.
    pub fn holds(&self, terminal: &str, now_ms: i64) -> bool {
        self.ended.is_none() && now_ms < self.until_ms && self.terminals.iter().any(|t| t == terminal)
    }
}

/// What using a break-glass grant still needs (`lifecycle.break_glass_proof`):
/// there is no fallback to a weaker factor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakGlassProof {
    /// A temporary card enrolled for the grant, proving with its PIN (the
    /// operator's).
    #[default]
    TemporaryCard,
    /// The approving administrator present at the terminal: their own
    /// badge, card and PIN, opens it in the operator's name.
    ApproverPresent,
}

/// An operator locked out after consecutive failures (see `throttle.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lockout {
    /// The operator.
    pub operator_id: String,
    /// When, Unix ms.
    pub at_ms: i64,
    /// Failures in a row that reached the limit.
    pub failures: u32,
    /// Where the last one was.
    pub terminal: String,
    /// Who reported or saw it (an agent's identity).
    pub by: String,
}

/// An administrator certificate the gateway issued through the Admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRecord {
    /// The name.
    pub name: String,
    /// SHA-256 of its public key, hex.
    pub public_key_sha256: String,
    /// Who asked.
    pub issued_by: String,
    /// Who approved (none for the bootstrap pair).
    pub approved_by: Option<String>,
    /// The request, hex (none for the bootstrap pair).
    pub request: Option<String>,
    /// When, Unix ms.
    pub at_ms: i64,
}

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    /// A card of an operator holding a privileged role.
    CardApproval {
        /// The card.
        card: [u8; 16],
        /// Its operator.
        operator_id: String,
        /// The privileged roles the operator holds.
        roles: Vec<String>,
        /// The card's certificates as the request saw them (slot and
        /// SHA-256): a card that changes after is approved by a new
        /// request.
        certificates: Vec<String>,
    },
    /// A service certificate for an administrator (after the bootstrap
    /// pair, no administrator can make another alone).
    AdminCertificate {
        /// The administrator's name (`urn:pivgate:admin:NAME`).
        name: String,
        /// SHA-256 of the public key (DER SubjectPublicKeyInfo), hex: the
        /// approver confirms it with the key's holder.
        public_key_sha256: String,
        /// Validity, days.
        validity_days: u32,
    },
    /// Break-glass: time-limited access for an operator who cannot use
    /// their card, at named terminals, with a temporary card (its PIN the
    /// operator's), in force once approved.
    BreakGlass {
        /// The operator.
        operator_id: String,
        /// Where.
        terminals: Vec<String>,
        /// For how long from approval, hours.
        hours: u32,
        /// The temporary card's 9A certificate (DER); empty where the
        /// approver's presence proves instead.
        #[serde(with = "b64")]
        certificate: Vec<u8>,
        /// What using it needs.
        #[serde(default)]
        proof: BreakGlassProof,
    },
}

impl RequestKind {
    /// The operator the request is about: never its approver.
    pub fn operator(&self) -> &str {
        match self {
            RequestKind::CardApproval { operator_id, .. } => operator_id,
            RequestKind::AdminCertificate { name, .. } => name,
            RequestKind::BreakGlass { operator_id, .. } => operator_id,
        }
    }

    /// A line for the approver to read before the badge signs.
    pub fn summary(&self) -> String {
        match self {
            // The certificates' digests too: a card tapped into a window by
            // someone else is told apart before the badge signs.
            RequestKind::CardApproval { card, operator_id, roles, certificates } => format!(
                "approve card {} for operator {operator_id} (privileged roles: {}; certificates {})",
                uuid_text(card),
                roles.join(", "),
                certificates.iter().map(|c| c.chars().take(36).collect::<String>()).collect::<Vec<_>>().join(", ")
            ),
            RequestKind::BreakGlass { operator_id, terminals, hours, certificate, proof: BreakGlassProof::TemporaryCard } => format!(
                "BREAK-GLASS: operator {operator_id} at {} for {hours} h with a temporary card (certificate SHA-256 {})",
                terminals.join(", "),
                hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(certificate)[..8])
            ),
            RequestKind::BreakGlass { operator_id, terminals, hours, proof: BreakGlassProof::ApproverPresent, .. } => format!(
                "BREAK-GLASS: operator {operator_id} at {} for {hours} h, opened by the approver's own badge tapped there (the approver must be present)",
                terminals.join(", ")
            ),
            RequestKind::AdminCertificate { name, public_key_sha256, validity_days } => format!(
                "issue an administrator certificate named {name} for {validity_days} days to the key with SHA-256 {public_key_sha256} (confirm the fingerprint with the key's holder)"
            ),
        }
    }
}

/// Where a request stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    /// Waiting for a second administrator.
    Pending,
    /// Approved.
    Approved(Approval),
    /// Refused by an administrator.
    Refused {
        /// Who.
        by: String,
        /// When, Unix ms.
        at_ms: i64,
        /// Why.
        reason: String,
    },
    /// Overtaken: its subject changed (the card revoked, a newer request).
    Withdrawn {
        /// When, Unix ms.
        at_ms: i64,
        /// Why.
        reason: String,
    },
}

impl Request {
    /// Whether it can still be approved at `now_ms`.
    pub fn open(&self, now_ms: i64) -> bool {
        self.state == RequestState::Pending && now_ms < self.expires_ms
    }

    /// Its state's name at `now_ms` ("pending", "approved", "refused",
    /// "withdrawn", "lapsed").
    pub fn state_name(&self, now_ms: i64) -> &'static str {
        match &self.state {
            RequestState::Pending if now_ms >= self.expires_ms => "lapsed",
            RequestState::Pending => "pending",
            RequestState::Approved(_) => "approved",
            RequestState::Refused { .. } => "refused",
            RequestState::Withdrawn { .. } => "withdrawn",
        }
    }
}

/// Why a terminal locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LockReason {
    /// Never unlocked.
    Initial,
    /// The card left the reader.
    CardRemoved,
    /// Idle timeout.
    IdleTimeout,
    /// Maximum session length.
    MaxSession,
    /// An administrator.
    Administrator,
    /// The operator or card was revoked.
    Revoked,
    /// The agent went silent.
    AgentSilent,
    /// Another operator unlocked it.
    Replaced,
    /// The operator lost every role the terminal allows.
    RoleRemoved,
    /// The terminal's policy no longer allows the operator or mechanism.
    PolicyChanged,
    /// The session's certificate (or one of its path) was revoked by CRL.
    CertificateRevoked,
    /// The session's certificate (or one of its path) expired.
    CertificateExpired,
    /// The card was suspended.
    CardSuspended,
    /// The temporary card reached its end.
    CardExpired,
    /// The terminal's hours ended.
    OutsideHours,
    /// The break-glass grant the session stood on ended.
    BreakGlassEnded,
}

/// A terminal's session state: locked, or unlocked by one operator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Session {
    /// Locked.
    Locked {
        /// Why.
        reason: LockReason,
        /// Since, Unix ms.
        since_ms: i64,
        /// Sequence of the event.
        sequence: u64,
    },
    /// Unlocked by an operator.
    Unlocked {
        /// Who.
        operator_id: String,
        /// Display name.
        operator_name: String,
        /// Roles.
        roles: Vec<String>,
        /// How.
        mechanism: Mechanism,
        /// With which card.
        card_uuid: [u8; 16],
        /// Through which agent.
        agent: String,
        /// Since, Unix ms.
        since_ms: i64,
        /// Sequence of the event.
        sequence: u64,
    },
}

/// The longest session any policy allows: NIST SP 800-63B-4 has AAL3
/// sessions re-authenticated at least every 12 hours.
pub const MAX_SESSION_MAX_S: u32 = 12 * 3600;

/// A terminal's policy (its group's, or its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalPolicy {
    /// Mechanisms accepted, in order of preference.
    pub allowed_mechanisms: Vec<Mechanism>,
    /// Roles allowed (empty: any).
    pub allowed_roles: Vec<String>,
    /// Idle timeout, seconds (0: none): a session with no activity reported
    /// for this long locks. Enforced once an application reports activity
    /// for the terminal; before that only `max_session_s` holds.
    pub idle_timeout_s: u32,
    /// Maximum session, seconds (0: [`MAX_SESSION_MAX_S`]; never more).
    pub max_session_s: u32,
    /// What the card leaving does: 0 locks at once; otherwise the session
    /// stands this many seconds for the operator to tap again.
    #[serde(default)]
    pub removal_grace_s: u32,
    /// When the terminal may be used (none: always).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<Hours>,
}

impl Default for TerminalPolicy {
    fn default() -> Self {
        TerminalPolicy {
            allowed_mechanisms: vec![Mechanism::CardAndPin],
            allowed_roles: vec![],
            idle_timeout_s: 0,
            max_session_s: 0,
            removal_grace_s: 0,
            hours: None,
        }
    }
}

impl TerminalPolicy {
    /// The maximum session, seconds, as enforced.
    pub fn max_session(&self) -> u32 {
        match self.max_session_s {
            0 => MAX_SESSION_MAX_S,
            s => s.min(MAX_SESSION_MAX_S),
        }
    }

    /// How this policy is weaker than `baseline` (a group's): one line
    /// each; empty when it is at least as strict.
    pub fn weaker_than(&self, baseline: &TerminalPolicy) -> Vec<String> {
        let mut w = Vec::new();
        if let Some(m) = self.allowed_mechanisms.iter().find(|m| !baseline.allowed_mechanisms.contains(m)) {
            w.push(format!("allows {m:?}"));
        }
        if !baseline.allowed_roles.is_empty() && (self.allowed_roles.is_empty() || self.allowed_roles.iter().any(|r| !baseline.allowed_roles.contains(r))) {
            w.push("allows roles the group does not".into());
        }
        if baseline.idle_timeout_s > 0 && (self.idle_timeout_s == 0 || self.idle_timeout_s > baseline.idle_timeout_s) {
            w.push(format!("idle timeout {} s where the group has {} s", self.idle_timeout_s, baseline.idle_timeout_s));
        }
        if self.max_session() > baseline.max_session() {
            w.push(format!("maximum session {} s where the group has {} s", self.max_session(), baseline.max_session()));
        }
        if self.removal_grace_s > baseline.removal_grace_s {
            w.push(format!("removal grace {} s where the group has {} s", self.removal_grace_s, baseline.removal_grace_s));
        }
        if baseline.hours.is_some() && self.hours != baseline.hours {
            w.push("other hours than the group's".into());
        }
        w
    }
}

/// When a terminal may be used: days of the week and a span of the day, in
/// a fixed offset from UTC (the site's standard time; daylight saving is
/// not followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hours {
    /// Bit 0 Monday to bit 6 Sunday.
    pub days: u8,
    /// From this minute of the day (0 to 1439)...
    pub start_minute: u16,
    /// ... to this one (exclusive); before `start_minute`: the span goes
    /// past midnight (a night shift), counted on the day it starts.
    pub end_minute: u16,
    /// The site's offset from UTC, minutes.
    pub utc_offset_minutes: i16,
}

impl Hours {
    /// Whether `unix_ms` falls within these hours.
    pub fn contains(&self, unix_ms: i64) -> bool {
        let local_min = unix_ms.div_euclid(60_000) + i64::from(self.utc_offset_minutes);
        let minute = local_min.rem_euclid(1440) as u16;
        let day = local_min.div_euclid(1440);
        // 1970-01-01 was a Thursday (3, counting Monday as 0).
        let weekday = |d: i64| (d + 3).rem_euclid(7) as u8;
        let on = |d: i64| self.days & (1 << weekday(d)) != 0;
        if self.start_minute <= self.end_minute {
            on(day) && (self.start_minute..self.end_minute).contains(&minute)
        } else if minute >= self.start_minute {
            on(day)
        } else {
            minute < self.end_minute && on(day - 1)
        }
    }

    /// Whether the fields make sense.
    pub fn valid(&self) -> bool {
        self.days & 0x80 == 0
            && self.days != 0
            && self.start_minute < 1440
            && self.end_minute <= 1440
            && self.start_minute != self.end_minute
            && self.utc_offset_minutes.abs() <= 14 * 60
    }
}

/// A group of terminals sharing a policy (dispatch consoles, intercom
/// admin panels, or what the site defines).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalGroup {
    /// Identifier.
    pub id: String,
    /// The policy of its terminals (those without a policy of their own).
    pub policy: TerminalPolicy,
}

/// A terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terminal {
    /// Identifier.
    pub id: String,
    /// Policy.
    pub policy: TerminalPolicy,
    /// Session.
    pub session: Session,
    /// The group it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Its policy was set for it alone (else it is its group's).
    #[serde(default)]
    pub custom_policy: bool,
    /// An application has reported operator activity for it: its idle
    /// timeout is enforced.
    #[serde(default)]
    pub activity_reported: bool,
}

impl Terminal {
    /// A new terminal, locked, with `policy`.
    pub fn new(id: &str, policy: TerminalPolicy, now_ms: i64) -> Terminal {
        Terminal {
            id: id.to_string(),
            policy,
            session: Session::Locked { reason: LockReason::Initial, since_ms: now_ms, sequence: 0 },
            group: None,
            custom_policy: false,
            activity_reported: false,
        }
    }
}

/// A lock or unlock event as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Gateway-wide sequence.
    pub sequence: u64,
    /// Unix ms.
    pub unix_ms: i64,
    /// Terminal.
    pub terminal_id: String,
    /// The resulting session.
    pub session: Session,
}

/// Formats a card UUID canonically.
pub fn uuid_text(u: &[u8; 16]) -> String {
    let h = hex::encode(u);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// The id of a card whose identity is its enrolled key: SHA-256 of a
/// domain prefix and the key's SubjectPublicKeyInfo, cut to 16 bytes and
/// marked as an RFC 9562 version 8 UUID, so it reads like any card UUID.
pub fn enrolled_key_id(spki: &[u8]) -> [u8; 16] {
    use sha2::Digest;
    let h = sha2::Sha256::new().chain_update(b"pivgate enrolled key\0").chain_update(spki).finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&h[..16]);
    id[6] = (id[6] & 0x0F) | 0x80;
    id[8] = (id[8] & 0x3F) | 0x80;
    id
}

/// Parses a canonical (or bare hex) UUID.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    hex::decode(s.replace('-', "")).ok()?.try_into().ok()
}

/// An agent and the terminals it may act for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    /// Name, as in its certificate.
    pub name: String,
    /// Terminals bound to it.
    pub terminals: Vec<String>,
}

/// What an audit record is about. Stored as its [`AuditKind::as_str`]
/// name, which is part of the audit format: never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AuditKind {
    /// A tap unlocked a terminal.
    AuthGranted,
    /// A tap was refused.
    AuthDenied,
    /// A session ended.
    SessionLocked,
    /// A TLS handshake was refused.
    TlsRefused,
    /// An authenticated caller called an API its role may not use.
    RpcRefused,
    /// Refusal records a caller's budget held back, counted.
    AuditSuppressed,
    /// A CRL was installed.
    CrlAccepted,
    /// A CRL was refused.
    CrlRefused,
    /// An operator was added or replaced.
    AddOperator,
    /// A card was enrolled.
    EnrolCard,
    /// A card was revoked.
    RevokeCard,
    /// An agent was bound to terminals.
    BindAgent,
    /// A terminal's policy was set.
    SetTerminalPolicy,
    /// A service certificate was issued.
    IssueCertificate,
    /// A backup was taken.
    Backup,
    /// A card was suspended.
    SuspendCard,
    /// A card's suspension ended.
    ResumeCard,
    /// An enrolment window was opened at a terminal.
    OpenEnrolment,
    /// An enrolment window was closed before use.
    CloseEnrolment,
    /// A card was enrolled at a terminal, after its proof.
    EnrolAtTerminal,
    /// A second administrator approved a request.
    Approve,
    /// A request was refused.
    Refuse,
    /// A card replaced another (which was revoked with it).
    ReplaceCard,
    /// A terminal group was created or changed.
    SetTerminalGroup,
    /// A terminal was put in a group (or out of one).
    AssignTerminal,
    /// An application first reported activity for a terminal.
    ActivityReporting,
    /// An administrator certificate was asked for (a second administrator approves).
    AskAdminCertificate,
    /// A step-up was proven (card and PIN) at a terminal.
    StepUpGranted,
    /// A step-up was refused, timed out or superseded.
    StepUpDenied,
    /// A step-up token was redeemed.
    StepUpRedeemed,
    /// A step-up token was refused (presented again, or for another action).
    StepUpReplayed,
    /// An operator was locked out after consecutive failures.
    Lockout,
    /// An administrator lifted an operator's lockout.
    LiftLockout,
    /// An agent reported wrong PINs for a challenge.
    PinFailed,
    /// Break-glass access was asked for (a second administrator approves).
    AskBreakGlass,
    /// A break-glass grant was ended before its time.
    EndBreakGlass,
    /// Requests closed for 30 days were forgotten (the audit log keeps them).
    PruneRequests,
}

impl AuditKind {
    /// Every kind, for tests and readers of the log.
    pub const ALL: [AuditKind; 37] = [
        AuditKind::AuthGranted,
        AuditKind::AuthDenied,
        AuditKind::SessionLocked,
        AuditKind::TlsRefused,
        AuditKind::RpcRefused,
        AuditKind::AuditSuppressed,
        AuditKind::CrlAccepted,
        AuditKind::CrlRefused,
        AuditKind::AddOperator,
        AuditKind::EnrolCard,
        AuditKind::RevokeCard,
        AuditKind::BindAgent,
        AuditKind::SetTerminalPolicy,
        AuditKind::IssueCertificate,
        AuditKind::Backup,
        AuditKind::SuspendCard,
        AuditKind::ResumeCard,
        AuditKind::OpenEnrolment,
        AuditKind::CloseEnrolment,
        AuditKind::EnrolAtTerminal,
        AuditKind::Approve,
        AuditKind::Refuse,
        AuditKind::ReplaceCard,
        AuditKind::SetTerminalGroup,
        AuditKind::AssignTerminal,
        AuditKind::ActivityReporting,
        AuditKind::AskAdminCertificate,
        AuditKind::StepUpGranted,
        AuditKind::StepUpDenied,
        AuditKind::StepUpRedeemed,
        AuditKind::StepUpReplayed,
        AuditKind::Lockout,
        AuditKind::LiftLockout,
        AuditKind::PinFailed,
        AuditKind::AskBreakGlass,
        AuditKind::EndBreakGlass,
        AuditKind::PruneRequests,
    ];

    /// The name stored in the record.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::AuthGranted => "auth.granted",
            AuditKind::AuthDenied => "auth.denied",
            AuditKind::SessionLocked => "session.locked",
            AuditKind::TlsRefused => "tls.refused",
            AuditKind::RpcRefused => "rpc.refused",
            AuditKind::AuditSuppressed => "audit.suppressed",
            AuditKind::CrlAccepted => "crl.accepted",
            AuditKind::CrlRefused => "crl.refused",
            AuditKind::AddOperator => "admin.add_operator",
            AuditKind::EnrolCard => "admin.enrol_card",
            AuditKind::RevokeCard => "admin.revoke_card",
            AuditKind::BindAgent => "admin.bind_agent",
            AuditKind::SetTerminalPolicy => "admin.set_terminal_policy",
            AuditKind::IssueCertificate => "admin.issue_certificate",
            AuditKind::Backup => "admin.backup",
            AuditKind::SuspendCard => "admin.suspend_card",
            AuditKind::ResumeCard => "admin.resume_card",
            AuditKind::OpenEnrolment => "admin.open_enrolment",
            AuditKind::CloseEnrolment => "admin.close_enrolment",
            AuditKind::EnrolAtTerminal => "enrol.at_terminal",
            AuditKind::Approve => "admin.approve",
            AuditKind::Refuse => "admin.refuse",
            AuditKind::ReplaceCard => "admin.replace_card",
            AuditKind::SetTerminalGroup => "admin.set_terminal_group",
            AuditKind::AssignTerminal => "admin.assign_terminal",
            AuditKind::ActivityReporting => "terminal.activity_reporting",
            AuditKind::AskAdminCertificate => "admin.ask_admin_certificate",
            AuditKind::StepUpGranted => "stepup.granted",
            AuditKind::StepUpDenied => "stepup.denied",
            AuditKind::StepUpRedeemed => "stepup.redeemed",
            AuditKind::StepUpReplayed => "stepup.replayed",
            AuditKind::Lockout => "auth.lockout",
            AuditKind::LiftLockout => "admin.lift_lockout",
            AuditKind::PinFailed => "auth.pin_failed",
            AuditKind::AskBreakGlass => "admin.ask_break_glass",
            AuditKind::EndBreakGlass => "admin.end_break_glass",
            AuditKind::PruneRequests => "lifecycle.prune_requests",
        }
    }

    /// The kind a stored name stands for.
    pub fn parse(name: &str) -> Option<AuditKind> {
        AuditKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for AuditKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An entry of the deny list: a whole card, or one certificate. Stored as
/// its [`DenyKey::stored`] form (the card UUID in hex, or `sha256:` and the
/// certificate's fingerprint in hex), which is part of the database
/// format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenyKey {
    /// Every certificate of this card (CHUID GUID).
    Card([u8; 16]),
    /// The certificate with this SHA-256 fingerprint.
    Certificate([u8; 32]),
}

impl DenyKey {
    /// The stored form.
    pub fn stored(&self) -> String {
        match self {
            DenyKey::Card(u) => hex::encode(u),
            DenyKey::Certificate(f) => format!("sha256:{}", hex::encode(f)),
        }
    }
}

/// Bytes stored as base64 text: a third larger than the bytes, where
/// serde_json's array of numbers is three to four times. Reads the arrays
/// of older records too.
pub(crate) mod b64 {
    use base64::Engine as _;
    use serde::de::{self, Deserializer, SeqAccess, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(Bytes)
    }

    struct Bytes;

    impl<'de> Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("base64 text or an array of bytes")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            base64::engine::general_purpose::STANDARD.decode(v).map_err(E::custom)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64 * 1024));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }

    /// A map whose values are bytes, each as base64 text.
    pub mod map {
        use std::collections::BTreeMap;

        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        #[derive(Serialize, Deserialize)]
        struct B(#[serde(with = "super")] Vec<u8>);

        pub fn serialize<K: Serialize + Ord, S: Serializer>(m: &BTreeMap<K, Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
            s.collect_map(m.iter().map(|(k, v)| (k, B(v.clone()))))
        }

        pub fn deserialize<'de, K: Deserialize<'de> + Ord, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<K, Vec<u8>>, D::Error> {
            Ok(BTreeMap::<K, B>::deserialize(d)?.into_iter().map(|(k, B(v))| (k, v)).collect())
        }
    }
}

#[cfg(test)]
mod stored_size_tests {
    use super::*;

    #[test]
    fn a_card_at_every_bound_is_stored_in_one_value_and_reads_its_older_form() {
        let mut card = Card::new([7; 16], IdentityRule::EnrolledKey, None, &"o".repeat(crate::limits::ID_MAX));
        let cert = vec![0xffu8; crate::limits::CERTIFICATE_MAX];
        card.certificates.insert(Slot::PivAuthentication, cert.clone());
        card.certificates.insert(Slot::CardAuthentication, cert.clone());
        // Notes whose text escapes to twice its length, by the longest
        // names, more than the history keeps.
        for i in 0..100 {
            card.note(i, &"a".repeat(crate::limits::ID_MAX), format!("suspended: {}", "\"".repeat(crate::limits::TEXT_MAX)));
        }
        // An approval of many long roles, a long suspension reason.
        let roles = (0..32).map(|i| format!("{i:03}{}", "r".repeat(125))).collect();
        card.approval = Some(Approval { request: [1; 16], by: "a".repeat(crate::limits::ID_MAX), at_ms: 1, badge: Some([2; 16]), roles });
        card.suspended = Some("\"".repeat(crate::limits::TEXT_MAX));
        let stored = serde_json::to_vec(&card).unwrap();
        assert!(stored.len() <= crate::store::MAX_VALUE, "{} bytes", stored.len());
        assert!(!card.history.is_empty() && card.history.last().unwrap().unix_ms == 99);
        assert_eq!(serde_json::from_slice::<Card>(&stored).unwrap(), card);
        // A record written before certificates were base64 reads the same.
        let mut old: serde_json::Value = serde_json::from_slice(&stored).unwrap();
        old["certificates"] = serde_json::json!({ "PivAuthentication": cert, "CardAuthentication": cert });
        let back: Card = serde_json::from_value(old).unwrap();
        assert_eq!(back.certificates, card.certificates);
    }
}

#[cfg(test)]
mod kind_tests {
    use super::*;

    #[test]
    fn audit_kind_names_are_distinct_and_read_back() {
        let names: std::collections::BTreeSet<&str> = AuditKind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), AuditKind::ALL.len());
        for k in AuditKind::ALL {
            assert_eq!(AuditKind::parse(k.as_str()), Some(k));
        }
        assert_eq!(AuditKind::parse("auth.granted "), None);
    }

    #[test]
    fn deny_keys_keep_their_stored_form() {
        // The database holds these strings: changing them would forget
        // every revocation.
        assert_eq!(DenyKey::Card([0xAB; 16]).stored(), "ab".repeat(16));
        assert_eq!(DenyKey::Certificate([1; 32]).stored(), format!("sha256:{}", "01".repeat(32)));
    }
}
