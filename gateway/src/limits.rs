//! Every limit the gateway enforces on what callers send, in one place.
//!
//! | what | limit | enforced by |
//! | --- | --- | --- |
//! | one gRPC message | [`MESSAGE_MAX`] bytes | tonic's decoder, per service (`service.rs`) |
//! | identifiers: operator, terminal, agent, role, certificate name | 1 to [`ID_MAX`] bytes of `A-Z a-z 0-9 - _ . : @ /` | [`Bounded`] |
//! | display names, reasons | up to [`TEXT_MAX`] bytes, no control characters | [`Bounded`] |
//! | roles per operator or policy | [`ROLES_MAX`] | [`Bounded`] |
//! | terminals per agent binding, per watch filter, per presence report | [`TERMINALS_MAX`] | [`Bounded`] |
//! | card certificate | [`CERTIFICATE_MAX`] bytes | [`Bounded`] |
//! | card signature | [`SIGNATURE_MAX`] bytes | [`Bounded`] |
//! | card UUID, challenge id | 16 bytes; FASC-N 25 bytes or none | [`Bounded`] |
//! | public key to certify | [`PUBLIC_KEY_MAX`] bytes; validity up to [`VALIDITY_DAYS_MAX`] days | [`Bounded`] |
//! | agent version | [`TEXT_MAX`] bytes | [`Bounded`] |
//! | one audit query answer | [`AUDIT_PAGE_RECORDS_MAX`] records and [`AUDIT_PAGE_BYTES_MAX`] bytes | `service.rs` |
//! | audit records of refusals per caller | a token bucket ([`crate::config::LimitsConfig`]) | [`AuditBudget`] |
//!
//! A request over a limit is refused with INVALID_ARGUMENT before anything
//! is stored or audited: whatever reaches the audit log is bounded, so no
//! call can write more than a few kilobytes into it. Transport limits
//! (connections, handshakes, streams, time) are in `config.rs`
//! ([`crate::config::LimitsConfig`]) and applied in `lib.rs` and `tls.rs`.

use std::collections::HashMap;
use std::time::Instant;

use crate::model::AuditKind;
use pivgate_proto::v1 as pb;
use tonic::Status;

/// Largest gRPC message the gateway decodes.
pub const MESSAGE_MAX: usize = 64 * 1024;
/// Longest identifier.
pub const ID_MAX: usize = 128;
/// Longest display name, reason or version string.
pub const TEXT_MAX: usize = 256;
/// Most roles on an operator or a policy.
pub const ROLES_MAX: usize = 32;
/// Most terminals in one binding, watch filter or presence report.
pub const TERMINALS_MAX: usize = 256;
/// Largest card certificate.
pub const CERTIFICATE_MAX: usize = 16 * 1024;
/// Largest card signature (RSA-2048 is 256 bytes, ECDSA P-384 DER ~104).
pub const SIGNATURE_MAX: usize = 1024;
/// Largest public key to certify.
pub const PUBLIC_KEY_MAX: usize = 4096;
/// Longest certificate validity an administrator may ask for.
pub const VALIDITY_DAYS_MAX: u32 = 3650;
/// Most audit records in one query answer.
pub const AUDIT_PAGE_RECORDS_MAX: usize = 10_000;
/// Most bytes of audit records in one query answer.
pub const AUDIT_PAGE_BYTES_MAX: usize = 1 << 20;

fn bad(field: &str, why: &str) -> Status {
    Status::invalid_argument(format!("{field}: {why}"))
}

/// Whether `s` is a valid identifier (see the table above).
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.len() <= ID_MAX && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:@/".contains(&b))
}

/// An identifier.
pub fn identifier(field: &str, s: &str) -> Result<(), Status> {
    if s.is_empty() {
        return Err(bad(field, "is empty"));
    }
    if s.len() > ID_MAX {
        return Err(bad(field, &format!("longer than {ID_MAX} bytes")));
    }
    if !is_identifier(s) {
        return Err(bad(field, "may hold only letters, digits and - _ . : @ /"));
    }
    Ok(())
}

/// Free text: bounded, no control characters.
pub fn text(field: &str, s: &str) -> Result<(), Status> {
    if s.len() > TEXT_MAX {
        return Err(bad(field, &format!("longer than {TEXT_MAX} bytes")));
    }
    if s.chars().any(char::is_control) {
        return Err(bad(field, "holds control characters"));
    }
    Ok(())
}

fn identifiers(field: &str, list: &[String], max: usize) -> Result<(), Status> {
    if list.len() > max {
        return Err(bad(field, &format!("more than {max} entries")));
    }
    list.iter().try_for_each(|s| identifier(field, s))
}

fn bytes(field: &str, b: &[u8], max: usize) -> Result<(), Status> {
    if b.len() > max {
        return Err(bad(field, &format!("longer than {max} bytes")));
    }
    Ok(())
}

fn exactly(field: &str, b: &[u8], len: usize, optional: bool) -> Result<(), Status> {
    if b.len() == len || (optional && b.is_empty()) {
        Ok(())
    } else {
        Err(bad(field, &format!("must be {len} bytes")))
    }
}

/// A request whose every field is within its limit.
pub trait Bounded {
    /// Checks every field; the first one over its limit is named.
    fn check(&self) -> Result<(), Status>;
}

macro_rules! unbounded {
    ($($t:ty),*) => { $(impl Bounded for $t { fn check(&self) -> Result<(), Status> { Ok(()) } })* };
}
// Requests with no field a caller could make large.
unbounded!(
    pb::BackupRequest,
    pb::ExportAuditRequest,
    pb::VerifyAuditRequest,
    pb::QueryAuditRequest,
    pb::GetAuditHeadRequest,
    pb::ListRequestsRequest,
    pb::ListTerminalGroupsRequest
);

/// A list call's page size when the caller names none.
pub const PAGE_DEFAULT: usize = 500;
/// The largest page size; a larger request counts as this.
pub const PAGE_MAX: usize = 1000;
/// A page ends before this many encoded bytes (a client decodes 4 MiB by
/// default).
pub const PAGE_BYTES_MAX: usize = 1 << 20;
/// Most items a filtered list skips in one call.
pub const PAGE_SCAN_MAX: usize = 10 * PAGE_MAX;
/// A page token is the hex of a key, so at most twice the longest.
pub const PAGE_TOKEN_MAX: usize = 2 * ID_MAX;

/// Where a page of a list starts and how long it may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The key of the last item of the previous page (empty: the start).
    pub after: Vec<u8>,
    /// Most items.
    pub size: usize,
}

impl Page {
    /// From a request's page_size and page_token.
    pub fn parse(page_size: u32, page_token: &str) -> Result<Page, Status> {
        if page_token.len() > PAGE_TOKEN_MAX {
            return Err(bad("page_token", &format!("longer than {PAGE_TOKEN_MAX} bytes")));
        }
        let after = hex::decode(page_token).map_err(|_| bad("page_token", "is not a token this gateway gave"))?;
        let size = match page_size as usize {
            0 => PAGE_DEFAULT,
            n => n.min(PAGE_MAX),
        };
        Ok(Page { after, size })
    }

    /// The token that continues after `key`.
    pub fn token(key: &[u8]) -> String {
        hex::encode(key)
    }
}

fn page_token(t: &str) -> Result<(), Status> {
    Page::parse(0, t).map(|_| ())
}

impl Bounded for pb::ListOperatorsRequest {
    fn check(&self) -> Result<(), Status> {
        page_token(&self.page_token)
    }
}
impl Bounded for pb::ListAgentsRequest {
    fn check(&self) -> Result<(), Status> {
        page_token(&self.page_token)
    }
}
impl Bounded for pb::ListTerminalStatesRequest {
    fn check(&self) -> Result<(), Status> {
        page_token(&self.page_token)
    }
}
impl Bounded for pb::ListCardsRequest {
    fn check(&self) -> Result<(), Status> {
        page_token(&self.page_token)?;
        if !self.operator_id.is_empty() {
            identifier("operator_id", &self.operator_id)?;
        }
        Ok(())
    }
}

// A stream's messages are checked one by one as they arrive.
impl<T> Bounded for tonic::Streaming<T> {
    fn check(&self) -> Result<(), Status> {
        Ok(())
    }
}

impl Bounded for pb::PresenceRequest {
    fn check(&self) -> Result<(), Status> {
        text("agent_version", &self.agent_version)?;
        if self.terminals.len() > TERMINALS_MAX {
            return Err(bad("terminals", &format!("more than {TERMINALS_MAX} entries")));
        }
        for t in &self.terminals {
            identifier("terminals.terminal_id", &t.terminal_id)?;
            exactly("terminals.card_uuid", &t.card_uuid, 16, true)?;
        }
        Ok(())
    }
}

impl Bounded for pb::BeginAuthenticationRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("terminal_id", &self.terminal_id)?;
        // Empty: a card without a CHUID the agent has not met.
        exactly("card_uuid", &self.card_uuid, 16, true)?;
        exactly("fascn", &self.fascn, 25, true)?;
        exactly("step_up_id", &self.step_up_id, 16, true)?;
        bytes("certificate", &self.certificate, CERTIFICATE_MAX)
    }
}

impl Bounded for pb::CompleteAuthenticationRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("terminal_id", &self.terminal_id)?;
        exactly("challenge_id", &self.challenge_id, 16, false)?;
        bytes("signature", &self.signature, SIGNATURE_MAX)
    }
}

impl Bounded for pb::ReportCardRemovedRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("terminal_id", &self.terminal_id)?;
        exactly("card_uuid", &self.card_uuid, 16, true)
    }
}

impl Bounded for pb::GetTerminalStateRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("terminal_id", &self.terminal_id)
    }
}

impl Bounded for pb::WatchEventsRequest {
    fn check(&self) -> Result<(), Status> {
        identifiers("terminal_ids", &self.terminal_ids, TERMINALS_MAX)
    }
}

impl Bounded for pb::AddOperatorRequest {
    fn check(&self) -> Result<(), Status> {
        let o = self.operator.as_ref().ok_or_else(|| bad("operator", "missing"))?;
        identifier("operator.operator_id", &o.operator_id)?;
        text("operator.name", &o.name)?;
        identifiers("operator.roles", &o.roles, ROLES_MAX)
    }
}

impl Bounded for pb::GetOperatorRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("operator_id", &self.operator_id)
    }
}

impl Bounded for pb::EnrolCardRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("operator_id", &self.operator_id)?;
        if self.card_uuid.len() > 64 {
            return Err(bad("card_uuid", "is not a UUID"));
        }
        bytes("attestation", &self.attestation, CERTIFICATE_MAX)?;
        bytes("attestation_intermediate", &self.attestation_intermediate, CERTIFICATE_MAX)?;
        bytes("certificate", &self.certificate, CERTIFICATE_MAX)
    }
}

impl Bounded for pb::SuspendCardRequest {
    fn check(&self) -> Result<(), Status> {
        if self.card_uuid.len() > 64 {
            return Err(bad("card_uuid", "is not a UUID"));
        }
        text("reason", &self.reason)
    }
}

impl Bounded for pb::ReplaceCardRequest {
    fn check(&self) -> Result<(), Status> {
        if self.card_uuid.len() > 64 {
            return Err(bad("card_uuid", "is not a UUID"));
        }
        text("reason", &self.reason)?;
        match &self.replacement {
            Some(r) => r.check(),
            None => Err(bad("replacement", "is missing")),
        }
    }
}

impl Bounded for pb::OpenEnrolmentRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("operator_id", &self.operator_id)?;
        identifier("terminal_id", &self.terminal_id)?;
        if self.replaces_card_uuid.len() > 64 {
            return Err(bad("replaces_card_uuid", "is not a UUID"));
        }
        Ok(())
    }
}

impl Bounded for pb::CloseEnrolmentRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("terminal_id", &self.terminal_id)
    }
}

impl Bounded for pb::BeginApprovalRequest {
    fn check(&self) -> Result<(), Status> {
        request_id_len(&self.request_id)?;
        bytes("certificate", &self.certificate, CERTIFICATE_MAX)
    }
}

impl Bounded for pb::ApproveRequestRequest {
    fn check(&self) -> Result<(), Status> {
        request_id_len(&self.request_id)?;
        bytes("challenge_id", &self.challenge_id, 16)?;
        bytes("signature", &self.signature, SIGNATURE_MAX)
    }
}

impl Bounded for pb::RefuseRequestRequest {
    fn check(&self) -> Result<(), Status> {
        request_id_len(&self.request_id)?;
        text("reason", &self.reason)
    }
}

fn request_id_len(s: &str) -> Result<(), Status> {
    if s.len() != 32 {
        return Err(bad("request_id", "is not a request id (32 hex digits)"));
    }
    Ok(())
}

impl Bounded for pb::ResumeCardRequest {
    fn check(&self) -> Result<(), Status> {
        if self.card_uuid.len() > 64 {
            return Err(bad("card_uuid", "is not a UUID"));
        }
        text("reason", &self.reason)
    }
}

impl Bounded for pb::RevokeCardRequest {
    fn check(&self) -> Result<(), Status> {
        if self.card_uuid.len() > 64 {
            return Err(bad("card_uuid", "is not a UUID"));
        }
        text("reason", &self.reason)
    }
}

impl Bounded for pb::BindAgentRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("agent_name", &self.agent_name)?;
        identifiers("terminal_ids", &self.terminal_ids, TERMINALS_MAX)
    }
}

impl Bounded for pb::SetTerminalPolicyRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("terminal_id", &self.terminal_id)?;
        if self.allowed_mechanisms.len() > 8 {
            return Err(bad("allowed_mechanisms", "more than 8 entries"));
        }
        identifiers("allowed_roles", &self.allowed_roles, ROLES_MAX)
    }
}

impl Bounded for pb::TerminalPolicy {
    fn check(&self) -> Result<(), Status> {
        if self.allowed_mechanisms.len() > 8 {
            return Err(bad("allowed_mechanisms", "more than 8 entries"));
        }
        identifiers("allowed_roles", &self.allowed_roles, ROLES_MAX)
    }
}

impl Bounded for pb::SetTerminalGroupRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("group_id", &self.group_id)?;
        self.policy.as_ref().map_or(Ok(()), Bounded::check)
    }
}

impl Bounded for pb::AssignTerminalRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("terminal_id", &self.terminal_id)?;
        if !self.group_id.is_empty() {
            identifier("group_id", &self.group_id)?;
        }
        Ok(())
    }
}

impl Bounded for pb::ReportActivityRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("terminal_id", &self.terminal_id)
    }
}

impl Bounded for pb::ReportPinFailureRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("terminal_id", &self.terminal_id)?;
        exactly("challenge_id", &self.challenge_id, 16, false)
    }
}

impl Bounded for pb::LiftLockoutRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("operator_id", &self.operator_id)?;
        text("reason", &self.reason)
    }
}

impl Bounded for pb::RequestBreakGlassRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("operator_id", &self.operator_id)?;
        identifiers("terminal_ids", &self.terminal_ids, 64)?;
        bytes("certificate", &self.certificate, CERTIFICATE_MAX)?;
        text("reason", &self.reason)
    }
}

impl Bounded for pb::EndBreakGlassRequest {
    fn check(&self) -> Result<(), Status> {
        request_id_len(&self.request_id)?;
        text("reason", &self.reason)
    }
}

impl Bounded for pb::ReviewRequest {
    fn check(&self) -> Result<(), Status> {
        Ok(())
    }
}

impl Bounded for pb::StepUpRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("terminal_id", &self.terminal_id)?;
        bytes("action", self.action.as_bytes(), pivgate_proto::card_message::ACTION_MAX)?;
        exactly("params_sha256", &self.params_sha256, 32, false)
    }
}

impl Bounded for pb::RedeemStepUpRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("terminal_id", &self.terminal_id)?;
        exactly("token", &self.token, 32, false)?;
        bytes("action", self.action.as_bytes(), pivgate_proto::card_message::ACTION_MAX)?;
        exactly("params_sha256", &self.params_sha256, 32, false)
    }
}

impl Bounded for pb::LockTerminalRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("terminal_id", &self.terminal_id)
    }
}

impl Bounded for pb::IssueCertificateRequest {
    fn check(&self) -> Result<(), Status> {
        identifier("name", &self.name)?;
        bytes("public_key", &self.public_key, PUBLIC_KEY_MAX)?;
        if self.validity_days > VALIDITY_DAYS_MAX {
            return Err(bad("validity_days", &format!("more than {VALIDITY_DAYS_MAX}")));
        }
        Ok(())
    }
}

/// How many audit records of refusals one caller may cause: a token bucket
/// per caller, refilled at a steady rate. Past it, the refusal still
/// happens and is counted, and [`AuditBudget::take_suppressed`] hands the
/// counts to one summary record per interval, so nothing is silently lost
/// and no caller can fill the disk with refusals.
pub struct AuditBudget {
    burst: f64,
    per_second: f64,
    buckets: HashMap<String, (f64, Instant)>,
    suppressed: HashMap<(String, AuditKind), u64>,
    /// Counted since start, for metrics.
    pub suppressed_total: u64,
}

/// Most callers tracked at once; past it, idle full buckets are dropped,
/// and new callers share one bucket.
const CALLERS_MAX: usize = 10_000;
const SHARED: &str = "(others)";

impl AuditBudget {
    /// A budget of `burst` records, refilled at `per_minute`.
    pub fn new(burst: u32, per_minute: u32) -> AuditBudget {
        AuditBudget {
            burst: f64::from(burst),
            per_second: f64::from(per_minute) / 60.0,
            buckets: HashMap::new(),
            suppressed: HashMap::new(),
            suppressed_total: 0,
        }
    }

    /// Whether `caller` may have one more `kind` record now; if not, it is
    /// counted as suppressed.
    pub fn allow(&mut self, caller: &str, kind: AuditKind, now: Instant) -> bool {
        if self.buckets.len() >= CALLERS_MAX && !self.buckets.contains_key(caller) {
            let (burst, rate) = (self.burst, self.per_second);
            self.buckets.retain(|_, (tokens, at)| *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < burst);
        }
        let key = if self.buckets.len() >= CALLERS_MAX && !self.buckets.contains_key(caller) { SHARED } else { caller };
        let (tokens, at) = self.buckets.entry(key.to_string()).or_insert((self.burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            *self.suppressed.entry((key.to_string(), kind)).or_insert(0) += 1;
            self.suppressed_total += 1;
            false
        }
    }

    /// The counts suppressed since the last call, by caller and kind.
    pub fn take_suppressed(&mut self) -> Vec<(String, AuditKind, u64)> {
        let mut v: Vec<_> = self.suppressed.drain().map(|((c, k), n)| (c, k, n)).collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn identifiers_and_text() {
        assert!(identifier("f", "dispatch-03").is_ok());
        assert!(identifier("f", "op:17@site/a_b.c").is_ok());
        assert!(identifier("f", "").is_err());
        assert!(identifier("f", "two words").is_err());
        assert!(identifier("f", "bell\u{7}").is_err());
        assert!(identifier("f", &"a".repeat(ID_MAX)).is_ok());
        assert!(identifier("f", &"a".repeat(ID_MAX + 1)).is_err());
        assert!(text("f", "Ana Silva (night shift)").is_ok());
        assert!(text("f", "evil\u{1b}[2J").is_err());
        assert!(text("f", &"é".repeat(TEXT_MAX)).is_err());
        let e = identifier("terminal_id", "x y").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("terminal_id"));
    }

    #[test]
    fn each_request_names_the_field_over_its_limit() {
        let big = "x".repeat(1 << 20);
        let r = pb::CompleteAuthenticationRequest { challenge_id: vec![0; 16], terminal_id: big.clone(), signature: vec![] };
        assert!(r.check().unwrap_err().message().contains("terminal_id"));
        let r = pb::AddOperatorRequest { operator: Some(pb::Operator { operator_id: "op".into(), name: big.clone(), roles: vec![], enabled: true }) };
        assert!(r.check().unwrap_err().message().contains("operator.name"));
        let r = pb::BindAgentRequest { agent_name: "pi".into(), terminal_ids: vec!["t".into(); TERMINALS_MAX + 1] };
        assert!(r.check().unwrap_err().message().contains("terminal_ids"));
        let r = pb::BeginAuthenticationRequest { terminal_id: "t".into(), card_uuid: vec![0; 16], fascn: vec![0; 24], ..Default::default() };
        assert!(r.check().unwrap_err().message().contains("fascn"));
        let r = pb::PresenceRequest { agent_version: "1".into(), terminals: vec![pb::TerminalReport { terminal_id: big, ..Default::default() }] };
        assert!(r.check().unwrap_err().message().contains("terminals.terminal_id"));
    }

    #[test]
    fn the_audit_budget_refills_and_counts_what_it_suppresses() {
        let mut b = AuditBudget::new(3, 60);
        let t0 = Instant::now();
        assert!((0..3).all(|_| b.allow("agent:pi-1", AuditKind::AuthDenied, t0)));
        assert!(!b.allow("agent:pi-1", AuditKind::AuthDenied, t0));
        assert!(!b.allow("agent:pi-1", AuditKind::RpcRefused, t0));
        // Another caller has its own bucket.
        assert!(b.allow("agent:pi-2", AuditKind::AuthDenied, t0));
        // One token a second.
        assert!(b.allow("agent:pi-1", AuditKind::AuthDenied, t0 + Duration::from_millis(1100)));
        assert_eq!(b.take_suppressed(), vec![("agent:pi-1".to_string(), AuditKind::AuthDenied, 1), ("agent:pi-1".to_string(), AuditKind::RpcRefused, 1)]);
        assert!(b.take_suppressed().is_empty());
        assert_eq!(b.suppressed_total, 2);
    }
}
