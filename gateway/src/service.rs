//! The gRPC services: conversion between `pivgate.v1` messages and the
//! gateway's own types, and the role check at the door of every call.
//!
//! The caller's role comes from its TLS-verified client certificate (see
//! `pki.rs`). A caller using an API its role does not allow is refused with
//! PERMISSION_DENIED and an audit record.

use std::pin::Pin;
use std::sync::Arc;

use pivgate_proto::v1 as pb;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::core::{Begin, BeginRequest, Complete, Gateway, Issued};
use crate::error::Error;
use crate::feed::Live;
use crate::limits::{self, Bounded};
use crate::model::{self, uuid_text, KeyAlgorithm, LockReason, Mechanism, Session, Slot, TerminalPolicy};
use crate::pki::{self, Caller, Role};
use crate::store::{AuditEntry, AuditRecord};
use crate::verify::Deny;

type Stream2<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The door of every call: the request's fields within their limits
/// (`limits.rs`; INVALID_ARGUMENT before anything is stored or audited),
/// the caller from its verified client certificate, and its role allowed
/// (a refusal is audited, within the caller's audit budget).
async fn authorize<T: Bounded>(gw: &Gateway, req: &Request<T>, allowed: &[Role], api: &'static str) -> Result<Caller, Status> {
    req.get_ref().check()?;
    let certs = req.peer_certs().ok_or(Error::Unauthenticated("no client certificate"))?;
    let first = certs.first().ok_or(Error::Unauthenticated("no client certificate"))?;
    let caller = pki::caller_from_cert(first.as_ref()).ok_or(Error::Unauthenticated("client certificate carries no pivgate role"))?;
    if !allowed.contains(&caller.role) {
        let entry =
            AuditEntry { kind: crate::model::AuditKind::RpcRefused, actor: caller.to_string(), terminal_id: String::new(), detail: json!({ "api": api }) };
        gw.audit_refusal(&caller.to_string(), entry).await?;
        return Err(Error::PermissionDenied(format!("{caller} may not call {api}")).into());
    }
    Ok(caller)
}

fn deny_reason(d: Deny) -> pb::DenyReason {
    use pb::DenyReason as R;
    match d {
        Deny::UnknownCard => R::UnknownCard,
        Deny::UntrustedIssuer => R::UntrustedIssuer,
        Deny::CertExpired => R::CertExpired,
        Deny::CertNotYetValid => R::CertNotYetValid,
        Deny::RevokedDenyList => R::RevokedDenyList,
        Deny::RevokedCrl => R::RevokedCrl,
        Deny::CrlStale => R::CrlStale,
        Deny::WrongKeyUsage => R::WrongKeyUsage,
        Deny::WrongEku => R::WrongEku,
        Deny::WrongPolicy => R::WrongPolicy,
        Deny::MechanismNotAllowed => R::MechanismNotAllowed,
        Deny::BadSignature => R::BadSignature,
        Deny::ChallengeUnknown => R::ChallengeUnknown,
        Deny::ChallengeExpired => R::ChallengeExpired,
        Deny::ChallengeMismatch => R::ChallengeMismatch,
        Deny::MalformedSignature => R::MalformedSignature,
        Deny::UnsupportedAlgorithm => R::UnsupportedAlgorithm,
        Deny::IdentityMismatch => R::IdentityMismatch,
        Deny::OperatorDisabled => R::OperatorDisabled,
        Deny::TerminalNotBound => R::TerminalNotBound,
        Deny::NotAuthorized => R::NotAuthorized,
        Deny::MalformedCertificate => R::MalformedCertificate,
        Deny::NotEndEntity => R::NotEndEntity,
        Deny::SelfSigned => R::SelfSigned,
        Deny::ChallengeReplayed => R::ChallengeReplayed,
        Deny::AlgorithmMismatch => R::AlgorithmMismatch,
        Deny::KeyNotAttested => R::KeyNotAttested,
        Deny::CardSuspended => R::CardSuspended,
        Deny::CardExpired => R::CardExpired,
        Deny::CardPending => R::CardPending,
        Deny::EnrolmentRefused => R::EnrolmentRefused,
        Deny::OutsideHours => R::OutsideHours,
        Deny::StepUpOtherOperator => R::StepUpOtherOperator,
        Deny::StepUpUnknown => R::StepUpUnknown,
        Deny::Throttled => R::Throttled,
        Deny::LockedOut => R::LockedOut,
        Deny::BreakGlassEnded => R::BreakGlassEnded,
    }
}

pub(crate) fn mechanism_pb(m: Mechanism) -> pb::Mechanism {
    match m {
        Mechanism::CardAndPin => pb::Mechanism::CardAndPin,
        Mechanism::CardOnly => pb::Mechanism::CardOnly,
    }
}

fn mechanism_from(m: i32) -> Result<Option<Mechanism>, Status> {
    match pb::Mechanism::try_from(m) {
        Ok(pb::Mechanism::Unspecified) => Ok(None),
        Ok(pb::Mechanism::CardAndPin) => Ok(Some(Mechanism::CardAndPin)),
        Ok(pb::Mechanism::CardOnly) => Ok(Some(Mechanism::CardOnly)),
        Err(_) => Err(Status::invalid_argument("unknown mechanism")),
    }
}

pub(crate) fn slot_pb(s: Slot) -> pb::KeySlot {
    match s {
        Slot::PivAuthentication => pb::KeySlot::PivAuthentication,
        Slot::CardAuthentication => pb::KeySlot::CardAuthentication,
    }
}

fn slot_from(s: i32) -> Result<Slot, Status> {
    match pb::KeySlot::try_from(s) {
        Ok(pb::KeySlot::PivAuthentication) => Ok(Slot::PivAuthentication),
        Ok(pb::KeySlot::CardAuthentication) => Ok(Slot::CardAuthentication),
        _ => Err(Status::invalid_argument("slot must be PIV_AUTHENTICATION or CARD_AUTHENTICATION")),
    }
}

fn algorithm_pb(a: KeyAlgorithm) -> pb::SignatureAlgorithm {
    match a {
        KeyAlgorithm::EcdsaP256 => pb::SignatureAlgorithm::EcdsaP256Sha256,
        KeyAlgorithm::EcdsaP384 => pb::SignatureAlgorithm::EcdsaP384Sha384,
        KeyAlgorithm::Rsa2048 => pb::SignatureAlgorithm::Rsa2048Pkcs1Sha256,
    }
}

fn lock_reason_pb(r: LockReason) -> pb::LockReason {
    match r {
        LockReason::Initial => pb::LockReason::Unspecified,
        LockReason::CardRemoved => pb::LockReason::CardRemoved,
        LockReason::IdleTimeout => pb::LockReason::IdleTimeout,
        LockReason::MaxSession => pb::LockReason::MaxSession,
        LockReason::Administrator => pb::LockReason::Administrator,
        LockReason::Revoked => pb::LockReason::Revoked,
        LockReason::AgentSilent => pb::LockReason::AgentSilent,
        LockReason::Replaced => pb::LockReason::Replaced,
        LockReason::RoleRemoved => pb::LockReason::RoleRemoved,
        LockReason::PolicyChanged => pb::LockReason::PolicyChanged,
        LockReason::CertificateRevoked => pb::LockReason::CertificateRevoked,
        LockReason::CertificateExpired => pb::LockReason::CertificateExpired,
        LockReason::CardSuspended => pb::LockReason::CardSuspended,
        LockReason::CardExpired => pb::LockReason::CardExpired,
        LockReason::OutsideHours => pb::LockReason::OutsideHours,
        LockReason::BreakGlassEnded => pb::LockReason::BreakGlassEnded,
    }
}

fn card_uuid(b: &[u8]) -> Result<[u8; 16], Status> {
    b.try_into().map_err(|_| Status::invalid_argument("card_uuid must be 16 bytes"))
}

pub(crate) fn policy_pb(p: &TerminalPolicy) -> pb::TerminalPolicy {
    pb::TerminalPolicy {
        allowed_mechanisms: p.allowed_mechanisms.iter().map(|m| mechanism_pb(*m) as i32).collect(),
        allowed_roles: p.allowed_roles.clone(),
        idle_timeout_s: p.idle_timeout_s,
        max_session_s: p.max_session(),
        removal_grace_s: p.removal_grace_s,
        hours: p.hours.map(|h| pb::Hours {
            days: u32::from(h.days),
            start_minute: u32::from(h.start_minute),
            end_minute: u32::from(h.end_minute),
            utc_offset_minutes: i32::from(h.utc_offset_minutes),
        }),
    }
}

/// A policy from the API, parsed (its sense is checked by the core).
fn policy_from(p: pb::TerminalPolicy) -> Result<TerminalPolicy, Status> {
    let mut allowed = Vec::new();
    for m in p.allowed_mechanisms {
        if let Some(m) = mechanism_from(m)? {
            if !allowed.contains(&m) {
                allowed.push(m);
            }
        }
    }
    if allowed.is_empty() {
        return Err(Status::invalid_argument("allowed_mechanisms is empty"));
    }
    let hours = match p.hours {
        None => None,
        Some(h) => {
            let bad = || Status::invalid_argument("hours: days 1 to 127, minutes 0 to 1440, offset within 14 hours");
            Some(model::Hours {
                days: u8::try_from(h.days).map_err(|_| bad())?,
                start_minute: u16::try_from(h.start_minute).map_err(|_| bad())?,
                end_minute: u16::try_from(h.end_minute).map_err(|_| bad())?,
                utc_offset_minutes: i16::try_from(h.utc_offset_minutes).map_err(|_| bad())?,
            })
        }
    };
    Ok(TerminalPolicy {
        allowed_mechanisms: allowed,
        allowed_roles: p.allowed_roles,
        idle_timeout_s: p.idle_timeout_s,
        max_session_s: p.max_session_s,
        removal_grace_s: p.removal_grace_s,
        hours,
    })
}

/// A terminal's state as the Access API shows it.
pub fn terminal_state(t: &model::Terminal) -> pb::TerminalState {
    let mut s = session_state(t);
    s.group_id = t.group.clone().unwrap_or_default();
    s.policy = Some(policy_pb(&t.policy));
    s.idle_enforced = t.activity_reported && t.policy.idle_timeout_s > 0;
    s
}

fn session_state(t: &model::Terminal) -> pb::TerminalState {
    match &t.session {
        Session::Locked { reason, since_ms, sequence } => pb::TerminalState {
            terminal_id: t.id.clone(),
            unlocked: false,
            since_unix_ms: *since_ms,
            lock_reason: lock_reason_pb(*reason) as i32,
            sequence: *sequence,
            ..Default::default()
        },
        Session::Unlocked { operator_id, operator_name, roles, mechanism, since_ms, sequence, .. } => pb::TerminalState {
            terminal_id: t.id.clone(),
            unlocked: true,
            operator_id: operator_id.clone(),
            operator_name: operator_name.clone(),
            roles: roles.clone(),
            mechanism: mechanism_pb(*mechanism) as i32,
            since_unix_ms: *since_ms,
            lock_reason: 0,
            sequence: *sequence,
            ..Default::default()
        },
    }
}

/// An event as the Access API streams it.
pub fn event_pb(e: &model::Event) -> pb::Event {
    let kind = match &e.session {
        Session::Unlocked { operator_id, operator_name, roles, mechanism, card_uuid, .. } => pb::event::Kind::Unlocked(pb::Unlocked {
            operator_id: operator_id.clone(),
            operator_name: operator_name.clone(),
            roles: roles.clone(),
            mechanism: mechanism_pb(*mechanism) as i32,
            card_uuid: uuid_text(card_uuid),
        }),
        Session::Locked { reason, .. } => pb::event::Kind::Locked(pb::Locked { reason: lock_reason_pb(*reason) as i32, operator_id: String::new() }),
    };
    pb::Event { sequence: e.sequence, unix_ms: e.unix_ms, terminal_id: e.terminal_id.clone(), kind: Some(kind) }
}

fn denial(d: Deny, detail: String) -> pb::Denial {
    pb::Denial { reason: deny_reason(d) as i32, detail }
}

/// The Agent API.
pub struct AgentApi(pub Arc<Gateway>);

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    type PresenceStream = Stream2<pb::PresenceResponse>;

    async fn presence(&self, req: Request<Streaming<pb::PresenceRequest>>) -> Result<Response<Self::PresenceStream>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Agent], "AgentService.Presence").await?;
        let mut input = req.into_inner();
        let gw = self.0.clone();
        let (tx, rx) = mpsc::channel(16);
        // One stream per agent: this one ends the one before it.
        let (generation, mut replaced) = gw.presence_stream(&caller.name);
        // Locks of this agent's terminals are pushed as they happen (an
        // administrator's lock, a revocation), not only with heartbeats.
        let mut live = gw.store.subscribe();
        let mut step_ups = gw.step_ups.subscribe();
        let heartbeat = (gw.agent_grace.as_millis() / 3).min(u128::from(u32::MAX)) as u32;
        let mut stopping = gw.stopping.subscribe();
        tokio::spawn(async move {
            loop {
                let reply = tokio::select! {
                    _ = stopping.changed() => break,
                    _ = &mut replaced => break,
                    msg = input.next() => {
                        let msg = match msg {
                            Some(Ok(m)) => m,
                            // A message the decoder refused (too large).
                            Some(Err(status)) => {
                                let _ = tx.send(Err(status)).await;
                                break;
                            }
                            None => break,
                        };
                        if let Err(status) = msg.check() {
                            let _ = tx.send(Err(status)).await;
                            break;
                        }
                        let marked = msg.terminals.iter().try_for_each(|t| gw.pin_entry(&caller, &t.terminal_id, !t.no_pin_entry));
                        let reports: Vec<(String, bool, Option<[u8; 16]>)> = msg
                            .terminals
                            .iter()
                            .map(|t| (t.terminal_id.clone(), t.card_present, t.card_uuid.as_slice().try_into().ok()))
                            .collect();
                        let presence = match marked {
                            Ok(()) => gw.presence(&caller, &reports).await,
                            Err(e) => Err(e),
                        };
                        match presence {
                            // Step-ups waiting ride on every heartbeat: a
                            // push the agent missed is not lost.
                            Ok(locked) => Ok(pb::PresenceResponse { heartbeat_interval_ms: heartbeat, lock_terminals: locked, step_ups: step_ups_pb(&gw, &caller.name, None) }),
                            Err(e) => Err(Status::from(e)),
                        }
                    }
                    ev = live.recv() => {
                        let live = match &ev {
                            Ok(e) => Live::Event(e),
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Live::Lagged,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                        };
                        match gw.presence_push(&caller.name, live) {
                            Ok(Some(locked)) => Ok(pb::PresenceResponse { heartbeat_interval_ms: heartbeat, lock_terminals: locked, step_ups: vec![] }),
                            Ok(None) => continue,
                            Err(e) => Err(Status::from(e)),
                        }
                    }
                    asked = step_ups.recv() => {
                        let asked = match asked {
                            Ok(a) => Some(a),
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => None,
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                        };
                        let ups = step_ups_pb(&gw, &caller.name, asked.as_ref());
                        if ups.is_empty() {
                            continue;
                        }
                        Ok(pb::PresenceResponse { heartbeat_interval_ms: heartbeat, lock_terminals: vec![], step_ups: ups })
                    }
                    _ = tx.closed() => break,
                };
                // A client that stops reading must not keep this stream
                // alive past its replacement.
                tokio::select! {
                    sent = tx.send(reply) => if sent.is_err() { break },
                    _ = &mut replaced => break,
                    _ = stopping.changed() => break,
                }
            }
            gw.presence_stream_ended(&caller.name, generation);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn begin_authentication(&self, req: Request<pb::BeginAuthenticationRequest>) -> Result<Response<pb::BeginAuthenticationResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Agent], "AgentService.BeginAuthentication").await?;
        let r = req.into_inner();
        let begin = BeginRequest {
            terminal: r.terminal_id,
            card_uuid: if r.card_uuid.is_empty() { None } else { Some(card_uuid(&r.card_uuid)?) },
            fascn: (!r.fascn.is_empty()).then_some(r.fascn),
            certificate: (!r.certificate.is_empty()).then_some(r.certificate),
            mechanism: mechanism_from(r.requested_mechanism)?,
            step_up: if r.step_up_id.is_empty() { None } else { Some(card_uuid(&r.step_up_id)?) },
        };
        use pb::begin_authentication_response::Outcome;
        let outcome = match self.0.begin(&caller, begin).await? {
            Begin::Challenge { id, message, mechanism, algorithm, ttl } => Outcome::Challenge(pb::Challenge {
                challenge_id: id.to_vec(),
                message,
                slot: slot_pb(mechanism.slot()) as i32,
                algorithm: algorithm_pb(algorithm) as i32,
                pin_required: mechanism == Mechanism::CardAndPin,
                expires_in_ms: ttl.as_millis() as u32,
            }),
            Begin::CertificateNeeded(slot) => Outcome::CertificateNeeded(slot_pb(slot) as i32),
            Begin::Denied(d, detail) => Outcome::Denied(denial(d, detail)),
        };
        Ok(Response::new(pb::BeginAuthenticationResponse { outcome: Some(outcome) }))
    }

    async fn complete_authentication(&self, req: Request<pb::CompleteAuthenticationRequest>) -> Result<Response<pb::CompleteAuthenticationResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Agent], "AgentService.CompleteAuthentication").await?;
        let r = req.into_inner();
        use pb::complete_authentication_response::Outcome;
        let outcome = match self.0.complete(&caller, &r.challenge_id, &r.terminal_id, &r.signature).await? {
            Complete::Granted { operator, sequence } => {
                Outcome::Granted(pb::Grant { operator_id: operator.id, operator_name: operator.name, roles: operator.roles, sequence })
            }
            Complete::Enrolled { card, operator } => Outcome::Enrolled(pb::Enrolled {
                card_uuid: card.uuid.to_vec(),
                awaiting_approval: !card.approved_for(&self.0.privileged_roles(&operator)),
                operator_id: operator.id,
                operator_name: operator.name,
            }),
            Complete::SteppedUp { operator } => Outcome::SteppedUp(pb::SteppedUp { operator_id: operator.id }),
            Complete::Denied(d, detail) => Outcome::Denied(denial(d, detail)),
        };
        Ok(Response::new(pb::CompleteAuthenticationResponse { outcome: Some(outcome) }))
    }

    async fn report_pin_failure(&self, req: Request<pb::ReportPinFailureRequest>) -> Result<Response<pb::ReportPinFailureResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Agent], "AgentService.ReportPinFailure").await?;
        let r = req.into_inner();
        self.0.report_pin_failures(&caller, &r.challenge_id, &r.terminal_id, r.wrong_pins).await?;
        Ok(Response::new(pb::ReportPinFailureResponse {}))
    }

    async fn report_card_removed(&self, req: Request<pb::ReportCardRemovedRequest>) -> Result<Response<pb::ReportCardRemovedResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Agent], "AgentService.ReportCardRemoved").await?;
        let r = req.into_inner();
        let card = if r.card_uuid.is_empty() { None } else { Some(card_uuid(&r.card_uuid)?) };
        let locked = self.0.card_removed(&caller, &r.terminal_id, card).await?;
        Ok(Response::new(pb::ReportCardRemovedResponse { locked }))
    }
}

/// The Access API.
pub struct AccessApi(pub Arc<Gateway>);

/// Writes a backup of `cut` as 64 KiB chunks to `tx` (see
/// [`crate::backup`]): the state, the CRL cache, the audit log and the
/// events. Stops when the caller goes away or reads nothing for a minute.
fn write_backup(
    gw: &Gateway,
    cut: crate::store::BackupCut,
    tx: &mpsc::Sender<Result<pb::BackupChunk, Status>>,
    rt: &tokio::runtime::Handle,
) -> crate::error::Result<()> {
    use crate::error::Error;
    const CHUNK: usize = 64 * 1024;
    const STALL: std::time::Duration = std::time::Duration::from_secs(60);
    let deliver = |data: Vec<u8>| -> crate::error::Result<()> {
        match rt.block_on(tokio::time::timeout(STALL, tx.send(Ok(pb::BackupChunk { data })))) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Error::Backup("the caller went away".into())),
            Err(_) => Err(Error::Backup("the caller read nothing for a minute".into())),
        }
    };
    let header = crate::backup::Header {
        format: crate::backup::FORMAT.into(),
        version: crate::backup::VERSION,
        created_unix_ms: gw.now_ms(),
        audit_index: cut.audit_index,
        audit_hash: cut.audit_hash.clone(),
        event_sequence: cut.event_sequence,
        signing_key: gw.checkpoint_key.public_key().to_string(),
    };
    let mut w = crate::backup::Writer::new(Vec::with_capacity(2 * CHUNK), &header)?;
    let send = |w: &mut crate::backup::Writer<Vec<u8>>| -> crate::error::Result<()> {
        let buf = w.output();
        while buf.len() >= CHUNK {
            let rest = buf.split_off(CHUNK);
            deliver(std::mem::replace(buf, rest))?;
        }
        Ok(())
    };
    for (tree, k, v) in &cut.state {
        w.entry(tree, k, v)?;
        send(&mut w)?;
    }
    // The CRLs in force, so a restored gateway has them before any source
    // answers (their watermarks are in the state).
    for (name, der) in crate::crl::cached(&gw.data_dir)? {
        for (i, piece) in der.chunks(crate::backup::CRL_PIECE).enumerate() {
            w.entry(crate::backup::CRL_TREE, &crate::backup::crl_piece_key(&name, i as u32), piece)?;
            send(&mut w)?;
        }
    }
    for (tree, upto) in [("audit", cut.audit_index), ("events", cut.event_sequence)] {
        let mut after = 0;
        loop {
            let batch = gw.store.raw_after(tree, after, upto, 512)?;
            let Some((k, _)) = batch.last() else { break };
            after = u64::from_be_bytes(k.as_slice().try_into().map_err(|_| Error::Corrupt("bad key".into()))?);
            for (k, v) in &batch {
                w.entry(tree, k, v)?;
                send(&mut w)?;
            }
        }
    }
    let (mut rest, _) = w.finish(&gw.checkpoint_key)?;
    while !rest.is_empty() {
        let tail = rest.split_off(rest.len().min(CHUNK));
        deliver(std::mem::replace(&mut rest, tail))?;
    }
    Ok(())
}

/// One page of a listing: at most `p.size` items and
/// [`limits::PAGE_BYTES_MAX`] bytes, with the token of the next page if
/// anything follows (empty on the last). `keep` turns an item into its
/// message, or skips it; after [`limits::PAGE_SCAN_MAX`] skipped items the
/// page ends (perhaps empty, with a token to go on).
fn page<T, P: prost::Message>(
    items: impl Iterator<Item = crate::error::Result<(Vec<u8>, T)>>,
    p: &limits::Page,
    mut keep: impl FnMut(T) -> Option<P>,
) -> Result<(Vec<P>, String), Status> {
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut last: Vec<u8> = Vec::new();
    let mut skipped = 0;
    for item in items {
        let (key, item) = item.map_err(Status::from)?;
        let Some(m) = keep(item) else {
            // A filter that matches little must not scan a whole table in
            // one call: the page ends, its token after what was scanned.
            skipped += 1;
            if skipped >= limits::PAGE_SCAN_MAX {
                return Ok((out, limits::Page::token(&key)));
            }
            continue;
        };
        let n = m.encoded_len();
        if out.len() == p.size || (bytes + n > limits::PAGE_BYTES_MAX && !out.is_empty()) {
            return Ok((out, limits::Page::token(&last)));
        }
        bytes += n;
        out.push(m);
        last = key;
    }
    Ok((out, String::new()))
}

#[tonic::async_trait]
impl pb::access_service_server::AccessService for AccessApi {
    type WatchEventsStream = Stream2<pb::WatchEventsResponse>;

    async fn get_terminal_state(&self, req: Request<pb::GetTerminalStateRequest>) -> Result<Response<pb::GetTerminalStateResponse>, Status> {
        authorize(&self.0, &req, &[Role::Application, Role::Admin], "AccessService.GetTerminalState").await?;
        let id = req.into_inner().terminal_id;
        let t = self.0.store.terminal(&id).map_err(Status::from)?.ok_or_else(|| Status::not_found(format!("terminal {id}")))?;
        Ok(Response::new(pb::GetTerminalStateResponse { state: Some(terminal_state(&t)) }))
    }

    async fn list_terminal_states(&self, req: Request<pb::ListTerminalStatesRequest>) -> Result<Response<pb::ListTerminalStatesResponse>, Status> {
        authorize(&self.0, &req, &[Role::Application, Role::Admin], "AccessService.ListTerminalStates").await?;
        let r = req.into_inner();
        let p = limits::Page::parse(r.page_size, &r.page_token)?;
        let (states, next_page_token) = page(self.0.store.terminals_after(&p.after), &p, |t| Some(terminal_state(&t)))?;
        Ok(Response::new(pb::ListTerminalStatesResponse { states, next_page_token }))
    }

    async fn watch_events(&self, req: Request<pb::WatchEventsRequest>) -> Result<Response<Self::WatchEventsStream>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Application, Role::Admin], "AccessService.WatchEvents").await?;
        let slot = self.0.watcher_slot(&caller)?;
        let r = req.into_inner();
        let gw = self.0.clone();
        let filter: Vec<String> = r.terminal_ids;
        let (tx, rx) = mpsc::channel(256);
        // Subscribe before reading the stored log, so nothing falls between.
        let live = gw.store.subscribe();
        let stopping = gw.stopping.subscribe();
        tokio::spawn(async move {
            // Given back when the watcher ends, however it ends.
            let _slot = slot;
            let wanted = |e: &model::Event| filter.is_empty() || filter.contains(&e.terminal_id);
            let item = |e: &model::Event| pb::WatchEventsResponse { event: Some(event_pb(e)) };
            crate::feed::follow::<_, Status>(gw.store.clone(), live, stopping, r.after_sequence, wanted, item, tx).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn report_activity(&self, req: Request<pb::ReportActivityRequest>) -> Result<Response<pb::ReportActivityResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Application], "AccessService.ReportActivity").await?;
        let idle_timeout_s = self.0.report_activity(&caller, &req.into_inner().terminal_id).await?;
        Ok(Response::new(pb::ReportActivityResponse { idle_timeout_s }))
    }

    async fn step_up(&self, req: Request<pb::StepUpRequest>) -> Result<Response<pb::StepUpResponse>, Status> {
        use crate::step_up::Outcome;
        let caller = authorize(&self.0, &req, &[Role::Application], "AccessService.StepUp").await?;
        let r = req.into_inner();
        let wait = if r.timeout_ms == 0 { crate::step_up::WAIT_DEFAULT } else { std::time::Duration::from_millis(r.timeout_ms.into()) };
        let (wanted, mut rx) = self.0.ask_step_up(&caller, &r.terminal_id, &r.action, &r.params_sha256, wait)?;
        // An application that hangs up ends its step-up: the agent stops
        // prompting at the next heartbeat.
        let gw = self.0.clone();
        let id = wanted.asked.id;
        let _hung_up = scopeguard(move || {
            gw.step_ups.finish(&id, Outcome::TimedOut, gw.clock.instant());
        });
        let left = wanted.asked.expires.saturating_duration_since(self.0.clock.instant());
        let outcome = match tokio::time::timeout(left, rx.wait_for(Option::is_some)).await {
            Ok(Ok(o)) => o.clone(),
            _ => None,
        };
        let outcome = match outcome {
            Some(o) => o,
            None => {
                self.0.step_up_timed_out(&caller, &wanted).await?;
                Outcome::TimedOut
            }
        };
        let mut resp = pb::StepUpResponse::default();
        match outcome {
            Outcome::Granted(p) => {
                resp.set_outcome(pb::StepUpOutcome::Granted);
                resp.token = p.token.to_vec();
                resp.operator_id = p.operator_id;
                resp.token_ttl_ms = p.expires.saturating_duration_since(self.0.clock.instant()).as_millis() as u32;
            }
            Outcome::Denied(d, detail) => {
                resp.set_outcome(pb::StepUpOutcome::Denied);
                resp.set_deny_reason(deny_reason(d));
                resp.detail = detail;
            }
            Outcome::TimedOut => resp.set_outcome(pb::StepUpOutcome::TimedOut),
            Outcome::Superseded => resp.set_outcome(pb::StepUpOutcome::Superseded),
        }
        Ok(Response::new(resp))
    }

    async fn redeem_step_up(&self, req: Request<pb::RedeemStepUpRequest>) -> Result<Response<pb::RedeemStepUpResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Application, Role::Admin], "AccessService.RedeemStepUp").await?;
        let r = req.into_inner();
        let p = self.0.redeem_step_up(&caller, &r.token, &r.terminal_id, &r.action, &r.params_sha256).await?;
        Ok(Response::new(pb::RedeemStepUpResponse { operator_id: p.operator_id, card_uuid: p.card.to_vec(), proven_unix_ms: p.proven_ms }))
    }

    async fn get_audit_head(&self, req: Request<pb::GetAuditHeadRequest>) -> Result<Response<pb::GetAuditHeadResponse>, Status> {
        authorize(&self.0, &req, &[Role::Application, Role::Admin], "AccessService.GetAuditHead").await?;
        let checkpoint = self.0.store.latest_checkpoint().map_err(Status::from)?.as_ref().map(checkpoint_pb);
        let (records, _) = self.0.store.audit_head().map_err(Status::from)?;
        Ok(Response::new(pb::GetAuditHeadResponse { checkpoint, records }))
    }
}

/// The Admin API.
pub struct AdminApi(pub Arc<Gateway>);

/// The step-ups waiting at `agent`'s terminals (`only`: just this one, if
/// it is at one of them).
fn step_ups_pb(gw: &Gateway, agent: &str, only: Option<&crate::step_up::Asked>) -> Vec<pb::StepUpAsk> {
    let terminals = gw.store.agent(agent).ok().flatten().map(|a| a.terminals).unwrap_or_default();
    let now = gw.clock.instant();
    let asked = match only {
        Some(a) if terminals.contains(&a.terminal) && a.expires > now => vec![a.clone()],
        Some(_) => vec![],
        None => gw.step_ups.waiting_at(&terminals, now),
    };
    asked
        .into_iter()
        .map(|a| pb::StepUpAsk {
            step_up_id: a.id.to_vec(),
            terminal_id: a.terminal,
            action: a.action,
            expires_in_ms: a.expires.saturating_duration_since(now).as_millis() as u32,
        })
        .collect()
}

/// Runs `f` when dropped.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// A signed checkpoint as the API shows it.
pub fn checkpoint_pb(c: &crate::audit::Checkpoint) -> pb::AuditCheckpoint {
    pb::AuditCheckpoint { index: c.index, hash: c.hash.clone(), unix_ms: c.unix_ms, public_key: c.public_key.clone(), signature: c.signature.clone() }
}

pub(crate) fn operator_pb(o: &model::Operator) -> pb::Operator {
    pb::Operator { operator_id: o.id.clone(), name: o.name.clone(), roles: o.roles.clone(), enabled: o.enabled }
}

pub(crate) fn card_pb(gw: &Gateway, c: &model::Card) -> pb::Card {
    let (slot, der) = c.certificates.iter().next().map(|(s, d)| (*s, d.clone())).unwrap_or((Slot::PivAuthentication, vec![]));
    let fp = crate::verify::inspect(&der).map(|i| hex::encode(i.fingerprint)).unwrap_or_default();
    // A card that cannot be read as revoked or not reads as revoked.
    let revoked = gw.store.denied(crate::model::DenyKey::Card(c.uuid)).unwrap_or(true);
    let privileged = gw.store.operator(&c.operator_id).ok().flatten().map(|o| gw.privileged_roles(&o)).unwrap_or_default();
    pb::Card {
        card_uuid: uuid_text(&c.uuid),
        fascn: c.fascn.as_ref().map(hex::encode).unwrap_or_default(),
        operator_id: c.operator_id.clone(),
        certificate_sha256: fp,
        slot: slot_pb(slot) as i32,
        revoked,
        identity: c.identity.name().to_string(),
        state: c.state(revoked, &privileged, gw.now_ms()).name().to_string(),
        expires_unix_ms: c.expires_ms.unwrap_or(0),
        approved_by: c.approval.as_ref().map(|a| a.by.clone()).unwrap_or_default(),
        pending_request: c.pending.as_ref().map(hex::encode).unwrap_or_default(),
        history: c.history.iter().map(|n| pb::CardNote { unix_ms: n.unix_ms, by: n.by.clone(), what: n.what.clone() }).collect(),
    }
}

pub(crate) fn request_pb(gw: &Gateway, r: &model::Request) -> pb::ApprovalRequest {
    let (kind, card_uuid, operator_id) = match &r.kind {
        model::RequestKind::CardApproval { card, operator_id, .. } => ("card_approval", uuid_text(card), operator_id.clone()),
        model::RequestKind::AdminCertificate { name, .. } => ("admin_certificate", String::new(), name.clone()),
        model::RequestKind::BreakGlass { operator_id, certificate, .. } => {
            ("break_glass", crate::verify::inspect(certificate).ok().and_then(|i| i.uuid).map(|u| uuid_text(&u)).unwrap_or_default(), operator_id.clone())
        }
    };
    let (decided_by, badge_signed) = match &r.state {
        model::RequestState::Approved(a) => (a.by.clone(), a.badge.is_some()),
        model::RequestState::Refused { by, .. } => (by.clone(), false),
        _ => (String::new(), false),
    };
    pb::ApprovalRequest {
        request_id: hex::encode(r.id),
        summary: r.kind.summary(),
        card_uuid,
        operator_id,
        requested_by: r.requested_by.clone(),
        reason: r.reason.clone(),
        created_unix_ms: r.created_ms,
        expires_unix_ms: r.expires_ms,
        state: r.state_name(gw.now_ms()).to_string(),
        decided_by,
        badge_signed,
        kind: kind.into(),
        fulfilled_unix_ms: r.fulfilled_ms.unwrap_or(0),
    }
}

/// A refused approval (self-approval, a wrong badge, a stolen certificate
/// probing) is audited, within the caller's refusal budget, and answered.
async fn approval_refused(gw: &Gateway, caller: &Caller, api: &str, request: &str, e: Error) -> Status {
    let entry = AuditEntry {
        kind: crate::model::AuditKind::RpcRefused,
        actor: caller.to_string(),
        terminal_id: String::new(),
        detail: json!({ "api": api, "request": request, "why": e.to_string() }),
    };
    if let Err(a) = gw.audit_refusal(&caller.to_string(), entry).await {
        return a.into();
    }
    e.into()
}

fn request_id(s: &str) -> Result<[u8; 16], Status> {
    hex::decode(s).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| Status::invalid_argument("request_id is not a request id (32 hex digits)"))
}

/// An EnrolCard request as the decision core takes it.
fn enrolment(r: &pb::EnrolCardRequest) -> Result<crate::core::Enrolment<'_>, Status> {
    let to_card = match r.card_uuid.as_str() {
        "" => None,
        u => Some(model::parse_uuid(u).ok_or_else(|| Status::invalid_argument("card_uuid is not a UUID"))?),
    };
    let attestation = match (r.attestation.is_empty(), r.attestation_intermediate.is_empty()) {
        (true, true) => None,
        (false, false) => Some((r.attestation.as_slice(), r.attestation_intermediate.as_slice())),
        _ => return Err(Status::invalid_argument("attestation and attestation_intermediate go together")),
    };
    Ok(crate::core::Enrolment {
        operator_id: &r.operator_id,
        certificate: &r.certificate,
        slot: slot_from(r.slot)?,
        to_card,
        attestation,
        dry_run: r.dry_run,
        temporary_days: r.temporary_days,
    })
}

fn audit_pb(r: &AuditRecord) -> pb::AuditRecord {
    pb::AuditRecord {
        index: r.index,
        unix_ms: r.unix_ms,
        kind: r.kind.clone(),
        actor: r.actor.clone(),
        terminal_id: r.terminal_id.clone(),
        detail_json: r.detail.to_string(),
        hash: r.hash.clone(),
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    type ExportAuditStream = Stream2<pb::ExportAuditResponse>;
    type BackupStream = Stream2<pb::BackupChunk>;

    async fn backup(&self, req: Request<pb::BackupRequest>) -> Result<Response<Self::BackupStream>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.Backup").await?;
        // One at a time: each holds a copy of the state while it streams.
        struct Slot(Arc<Gateway>);
        impl Drop for Slot {
            fn drop(&mut self) {
                self.0.backup_running.store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
        if self.0.backup_running.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(Status::resource_exhausted("a backup is already being taken"));
        }
        let slot = Slot(self.0.clone());
        let cut = self.0.backup_cut(&caller).await?;
        let gw = self.0.clone();
        let (tx, rx) = mpsc::channel::<Result<pb::BackupChunk, Status>>(16);
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            match write_backup(&gw, cut, &tx, &rt) {
                Ok(()) => {}
                Err(e @ crate::error::Error::Backup(_)) => tracing::info!(error = %e, "backup not completed"),
                Err(e) => {
                    let _ = tx.blocking_send(Err(Status::from(e)));
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn add_operator(&self, req: Request<pb::AddOperatorRequest>) -> Result<Response<pb::AddOperatorResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.AddOperator").await?;
        let o = req.into_inner().operator.ok_or_else(|| Status::invalid_argument("operator missing"))?;
        let op = model::Operator { id: o.operator_id, name: o.name, roles: o.roles, enabled: o.enabled };
        self.0.add_operator(&caller, op).await?;
        Ok(Response::new(pb::AddOperatorResponse {}))
    }

    async fn list_operators(&self, req: Request<pb::ListOperatorsRequest>) -> Result<Response<pb::ListOperatorsResponse>, Status> {
        authorize(&self.0, &req, &[Role::Admin], "AdminService.ListOperators").await?;
        let r = req.into_inner();
        let p = limits::Page::parse(r.page_size, &r.page_token)?;
        let (operators, next_page_token) = page(self.0.store.operators_after(&p.after), &p, |o| Some(operator_pb(&o)))?;
        Ok(Response::new(pb::ListOperatorsResponse { operators, next_page_token }))
    }

    async fn list_cards(&self, req: Request<pb::ListCardsRequest>) -> Result<Response<pb::ListCardsResponse>, Status> {
        authorize(&self.0, &req, &[Role::Admin], "AdminService.ListCards").await?;
        let r = req.into_inner();
        let p = limits::Page::parse(r.page_size, &r.page_token)?;
        let only = r.operator_id;
        let (cards, next_page_token) =
            page(self.0.store.cards_after(&p.after), &p, |c| (only.is_empty() || c.operator_id == only).then(|| card_pb(&self.0, &c)))?;
        Ok(Response::new(pb::ListCardsResponse { cards, next_page_token }))
    }

    async fn get_operator(&self, req: Request<pb::GetOperatorRequest>) -> Result<Response<pb::GetOperatorResponse>, Status> {
        authorize(&self.0, &req, &[Role::Admin], "AdminService.GetOperator").await?;
        let id = req.into_inner().operator_id;
        let o = self.0.store.operator(&id).map_err(Status::from)?.ok_or_else(|| Status::not_found(format!("operator {id}")))?;
        let cards = self.0.store.cards().map_err(Status::from)?.iter().filter(|c| c.operator_id == id).map(|c| card_pb(&self.0, c)).collect();
        Ok(Response::new(pb::GetOperatorResponse { operator: Some(operator_pb(&o)), cards }))
    }

    async fn enrol_card(&self, req: Request<pb::EnrolCardRequest>) -> Result<Response<pb::EnrolCardResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.EnrolCard").await?;
        let r = req.into_inner();
        let card = self.0.enrol(&caller, &enrolment(&r)?).await?;
        Ok(Response::new(pb::EnrolCardResponse { card: Some(card_pb(&self.0, &card)) }))
    }

    async fn revoke_card(&self, req: Request<pb::RevokeCardRequest>) -> Result<Response<pb::RevokeCardResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.RevokeCard").await?;
        let r = req.into_inner();
        let uuid = model::parse_uuid(&r.card_uuid).ok_or_else(|| Status::invalid_argument("card_uuid is not a UUID"))?;
        let locked_terminals = self.0.revoke_card(&caller, uuid, &r.reason).await?;
        Ok(Response::new(pb::RevokeCardResponse { locked_terminals }))
    }

    async fn suspend_card(&self, req: Request<pb::SuspendCardRequest>) -> Result<Response<pb::SuspendCardResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.SuspendCard").await?;
        let r = req.into_inner();
        let uuid = model::parse_uuid(&r.card_uuid).ok_or_else(|| Status::invalid_argument("card_uuid is not a UUID"))?;
        let locked_terminals = self.0.suspend_card(&caller, uuid, true, &r.reason).await?;
        Ok(Response::new(pb::SuspendCardResponse { locked_terminals }))
    }

    async fn resume_card(&self, req: Request<pb::ResumeCardRequest>) -> Result<Response<pb::ResumeCardResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.ResumeCard").await?;
        let r = req.into_inner();
        let uuid = model::parse_uuid(&r.card_uuid).ok_or_else(|| Status::invalid_argument("card_uuid is not a UUID"))?;
        self.0.suspend_card(&caller, uuid, false, &r.reason).await?;
        Ok(Response::new(pb::ResumeCardResponse {}))
    }

    async fn replace_card(&self, req: Request<pb::ReplaceCardRequest>) -> Result<Response<pb::ReplaceCardResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.ReplaceCard").await?;
        let r = req.into_inner();
        let old = model::parse_uuid(&r.card_uuid).ok_or_else(|| Status::invalid_argument("card_uuid is not a UUID"))?;
        let replacement = r.replacement.as_ref().ok_or_else(|| Status::invalid_argument("replacement is missing"))?;
        if replacement.dry_run {
            return Err(Status::invalid_argument("a replacement is not a dry run: check the new card with EnrolCard's dry_run"));
        }
        let (card, locked_terminals) = self.0.replace_card(&caller, old, &enrolment(replacement)?, &r.reason).await?;
        Ok(Response::new(pb::ReplaceCardResponse { card: Some(card_pb(&self.0, &card)), locked_terminals }))
    }

    async fn open_enrolment(&self, req: Request<pb::OpenEnrolmentRequest>) -> Result<Response<pb::OpenEnrolmentResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.OpenEnrolment").await?;
        let r = req.into_inner();
        let replaces = match r.replaces_card_uuid.as_str() {
            "" => None,
            u => Some(model::parse_uuid(u).ok_or_else(|| Status::invalid_argument("replaces_card_uuid is not a UUID"))?),
        };
        let ask = crate::lifecycle::WindowAsk {
            terminal: &r.terminal_id,
            operator_id: &r.operator_id,
            duration_s: u64::from(r.duration_s),
            replaces,
            temporary_days: r.temporary_days,
        };
        let w = self.0.open_enrolment(&caller, &ask).await?;
        Ok(Response::new(pb::OpenEnrolmentResponse { closes_unix_ms: w.closes_ms }))
    }

    async fn close_enrolment(&self, req: Request<pb::CloseEnrolmentRequest>) -> Result<Response<pb::CloseEnrolmentResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.CloseEnrolment").await?;
        let was_open = self.0.close_enrolment(&caller, &req.into_inner().terminal_id).await?;
        Ok(Response::new(pb::CloseEnrolmentResponse { was_open }))
    }

    async fn list_requests(&self, req: Request<pb::ListRequestsRequest>) -> Result<Response<pb::ListRequestsResponse>, Status> {
        authorize(&self.0, &req, &[Role::Admin], "AdminService.ListRequests").await?;
        let all = req.into_inner().include_closed;
        let now = self.0.now_ms();
        let mut requests: Vec<model::Request> = self.0.store.requests()?.into_iter().filter(|r| all || r.open(now)).collect();
        requests.sort_by_key(|r| r.created_ms);
        let skip = requests.len().saturating_sub(1000);
        Ok(Response::new(pb::ListRequestsResponse { requests: requests[skip..].iter().map(|r| request_pb(&self.0, r)).collect() }))
    }

    async fn begin_approval(&self, req: Request<pb::BeginApprovalRequest>) -> Result<Response<pb::BeginApprovalResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.BeginApproval").await?;
        let r = req.into_inner();
        let c = match self.0.begin_approval(&caller, request_id(&r.request_id)?, &r.certificate) {
            Ok(c) => c,
            Err(e) => return Err(approval_refused(&self.0, &caller, "AdminService.BeginApproval", &r.request_id, e).await),
        };
        Ok(Response::new(pb::BeginApprovalResponse {
            challenge_id: c.id.to_vec(),
            message: c.message,
            algorithm: algorithm_pb(c.algorithm) as i32,
            expires_in_ms: c.ttl.as_millis() as u32,
        }))
    }

    async fn approve_request(&self, req: Request<pb::ApproveRequestRequest>) -> Result<Response<pb::ApproveRequestResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.ApproveRequest").await?;
        let r = req.into_inner();
        let badge = match (r.challenge_id.is_empty(), r.signature.is_empty()) {
            (true, true) => None,
            (false, false) => Some((r.challenge_id.as_slice(), r.signature.as_slice())),
            _ => return Err(Status::invalid_argument("challenge_id and signature go together")),
        };
        let decided = match self.0.approve(&caller, request_id(&r.request_id)?, badge).await {
            Ok(d) => d,
            Err(e) => return Err(approval_refused(&self.0, &caller, "AdminService.ApproveRequest", &r.request_id, e).await),
        };
        Ok(Response::new(pb::ApproveRequestResponse { request: Some(request_pb(&self.0, &decided)) }))
    }

    async fn refuse_request(&self, req: Request<pb::RefuseRequestRequest>) -> Result<Response<pb::RefuseRequestResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.RefuseRequest").await?;
        let r = req.into_inner();
        let decided = self.0.refuse(&caller, request_id(&r.request_id)?, &r.reason).await?;
        Ok(Response::new(pb::RefuseRequestResponse { request: Some(request_pb(&self.0, &decided)) }))
    }

    async fn bind_agent(&self, req: Request<pb::BindAgentRequest>) -> Result<Response<pb::BindAgentResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.BindAgent").await?;
        let r = req.into_inner();
        self.0.bind_agent(&caller, &r.agent_name, r.terminal_ids).await?;
        Ok(Response::new(pb::BindAgentResponse {}))
    }

    async fn list_agents(&self, req: Request<pb::ListAgentsRequest>) -> Result<Response<pb::ListAgentsResponse>, Status> {
        authorize(&self.0, &req, &[Role::Admin], "AdminService.ListAgents").await?;
        let r = req.into_inner();
        let p = limits::Page::parse(r.page_size, &r.page_token)?;
        let live: std::collections::HashSet<String> = self.0.presence.lock().map(|p| p.keys().cloned().collect()).unwrap_or_default();
        let (agents, next_page_token) = page(self.0.store.agents_after(&p.after), &p, |a| {
            Some(pb::AgentBinding { connected: live.contains(&a.name), agent_name: a.name, terminal_ids: a.terminals })
        })?;
        Ok(Response::new(pb::ListAgentsResponse { agents, next_page_token }))
    }

    async fn set_terminal_policy(&self, req: Request<pb::SetTerminalPolicyRequest>) -> Result<Response<pb::SetTerminalPolicyResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.SetTerminalPolicy").await?;
        let r = req.into_inner();
        let policy = policy_from(pb::TerminalPolicy {
            allowed_mechanisms: r.allowed_mechanisms,
            allowed_roles: r.allowed_roles,
            idle_timeout_s: r.idle_timeout_s,
            max_session_s: r.max_session_s,
            removal_grace_s: r.removal_grace_s,
            hours: r.hours,
        })?;
        self.0.set_policy(&caller, &r.terminal_id, policy).await?;
        Ok(Response::new(pb::SetTerminalPolicyResponse {}))
    }

    async fn set_terminal_group(&self, req: Request<pb::SetTerminalGroupRequest>) -> Result<Response<pb::SetTerminalGroupResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.SetTerminalGroup").await?;
        let r = req.into_inner();
        let policy = policy_from(r.policy.ok_or_else(|| Status::invalid_argument("policy is missing"))?)?;
        let locked_terminals = self.0.set_group(&caller, &r.group_id, policy).await?;
        Ok(Response::new(pb::SetTerminalGroupResponse { locked_terminals }))
    }

    async fn assign_terminal(&self, req: Request<pb::AssignTerminalRequest>) -> Result<Response<pb::AssignTerminalResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.AssignTerminal").await?;
        let r = req.into_inner();
        let group = (!r.group_id.is_empty()).then_some(r.group_id.as_str());
        self.0.assign_terminal(&caller, &r.terminal_id, group).await?;
        Ok(Response::new(pb::AssignTerminalResponse {}))
    }

    async fn list_terminal_groups(&self, req: Request<pb::ListTerminalGroupsRequest>) -> Result<Response<pb::ListTerminalGroupsResponse>, Status> {
        authorize(&self.0, &req, &[Role::Admin], "AdminService.ListTerminalGroups").await?;
        let terminals = self.0.store.terminals()?;
        let groups = self
            .0
            .groups()?
            .into_iter()
            .map(|g| pb::TerminalGroup {
                terminal_ids: terminals.iter().filter(|t| t.group.as_deref() == Some(g.id.as_str())).map(|t| t.id.clone()).collect(),
                policy: Some(policy_pb(&g.policy)),
                group_id: g.id,
            })
            .collect();
        Ok(Response::new(pb::ListTerminalGroupsResponse { groups }))
    }

    async fn lock_terminal(&self, req: Request<pb::LockTerminalRequest>) -> Result<Response<pb::LockTerminalResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.LockTerminal").await?;
        let id = req.into_inner().terminal_id;
        if self.0.store.terminal(&id).map_err(Status::from)?.is_none() {
            return Err(Status::not_found(format!("terminal {id}")));
        }
        let was_unlocked = self.0.lock_if(&caller.to_string(), &id, LockReason::Administrator, |_| true).await?;
        Ok(Response::new(pb::LockTerminalResponse { was_unlocked }))
    }

    async fn query_audit(&self, req: Request<pb::QueryAuditRequest>) -> Result<Response<pb::QueryAuditResponse>, Status> {
        authorize(&self.0, &req, &[Role::Admin], "AdminService.QueryAudit").await?;
        let r = req.into_inner();
        let limit = if r.limit == 0 { 100 } else { (r.limit as usize).min(limits::AUDIT_PAGE_RECORDS_MAX) };
        // Bounded by bytes as well: the answer stays well under what a
        // client decodes by default (4 MiB).
        let mut records = Vec::new();
        let mut bytes = 0;
        for rec in self.0.store.audit_after(r.after_index, limit).map_err(Status::from)? {
            let rec = audit_pb(&rec);
            bytes += prost::Message::encoded_len(&rec);
            if bytes > limits::AUDIT_PAGE_BYTES_MAX && !records.is_empty() {
                break;
            }
            records.push(rec);
        }
        Ok(Response::new(pb::QueryAuditResponse { records }))
    }

    async fn export_audit(&self, req: Request<pb::ExportAuditRequest>) -> Result<Response<Self::ExportAuditStream>, Status> {
        authorize(&self.0, &req, &[Role::Admin], "AdminService.ExportAudit").await?;
        let gw = self.0.clone();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut after = 0;
            loop {
                let batch = match gw.store.audit_after(after, 512) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                if batch.is_empty() {
                    return;
                }
                for r in batch {
                    after = r.index;
                    if tx.send(Ok(pb::ExportAuditResponse { record: Some(audit_pb(&r)) })).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn verify_audit(&self, req: Request<pb::VerifyAuditRequest>) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        authorize(&self.0, &req, &[Role::Admin], "AdminService.VerifyAudit").await?;
        use crate::audit::Finding;
        let key = self.0.checkpoint_key.public_key().to_string();
        // A whole-log scan: on a blocking thread, not a runtime worker.
        let store = self.0.store.clone();
        let (records, findings) = tokio::task::spawn_blocking(move || store.verify_audit(Some(&key)))
            .await
            .map_err(|_| Status::internal("audit verification stopped"))?
            .map_err(Status::from)?;
        Ok(Response::new(pb::VerifyAuditResponse {
            intact: findings.is_empty(),
            records,
            first_bad_index: findings.iter().find_map(|f| if let Finding::Broken { at } = f { Some(*at) } else { None }).unwrap_or(0),
            truncated: findings.iter().any(|f| matches!(f, Finding::Truncated { .. })),
            rewritten: findings.iter().any(|f| matches!(f, Finding::Rewritten { .. })),
            findings: findings.iter().map(|f| f.to_string()).collect(),
        }))
    }

    async fn review(&self, req: Request<pb::ReviewRequest>) -> Result<Response<pb::ReviewResponse>, Status> {
        authorize(&self.0, &req, &[Role::Admin], "AdminService.Review").await?;
        // Reads every card and terminal: off the async workers.
        let gw = self.0.clone();
        let items = tokio::task::spawn_blocking(move || gw.review()).await.map_err(|_| Status::internal("review stopped"))??;
        let truncated = items.len() > 5000;
        let items = items
            .into_iter()
            .take(5000)
            .map(|i| pb::ReviewItem { kind: i.kind.into(), subject: i.subject, detail: i.detail, until_unix_ms: i.until_ms, resolve: i.resolve })
            .collect();
        Ok(Response::new(pb::ReviewResponse { items, truncated }))
    }

    async fn request_break_glass(&self, req: Request<pb::RequestBreakGlassRequest>) -> Result<Response<pb::RequestBreakGlassResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.RequestBreakGlass").await?;
        let r = req.into_inner();
        let ask = crate::break_glass::BreakGlassAsk {
            operator_id: &r.operator_id,
            terminals: &r.terminal_ids,
            hours: r.hours,
            certificate: &r.certificate,
            reason: &r.reason,
        };
        let request = self.0.ask_break_glass(&caller, &ask).await?;
        Ok(Response::new(pb::RequestBreakGlassResponse { request: Some(request_pb(&self.0, &request)) }))
    }

    async fn end_break_glass(&self, req: Request<pb::EndBreakGlassRequest>) -> Result<Response<pb::EndBreakGlassResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.EndBreakGlass").await?;
        let r = req.into_inner();
        let id: [u8; 16] =
            hex::decode(&r.request_id).ok().and_then(|v| v.try_into().ok()).ok_or_else(|| Status::invalid_argument("request_id: 32 hex digits"))?;
        let locked_terminals = self.0.end_break_glass(&caller, id, &r.reason).await?;
        Ok(Response::new(pb::EndBreakGlassResponse { locked_terminals }))
    }

    async fn lift_lockout(&self, req: Request<pb::LiftLockoutRequest>) -> Result<Response<pb::LiftLockoutResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.LiftLockout").await?;
        let r = req.into_inner();
        let was_locked_out = self.0.lift_lockout(&caller, &r.operator_id, &r.reason).await?;
        Ok(Response::new(pb::LiftLockoutResponse { was_locked_out }))
    }

    async fn issue_certificate(&self, req: Request<pb::IssueCertificateRequest>) -> Result<Response<pb::IssueCertificateResponse>, Status> {
        let caller = authorize(&self.0, &req, &[Role::Admin], "AdminService.IssueCertificate").await?;
        let r = req.into_inner();
        let role = match pb::ServiceRole::try_from(r.role) {
            Ok(pb::ServiceRole::Agent) => Role::Agent,
            Ok(pb::ServiceRole::Application) => Role::Application,
            Ok(pb::ServiceRole::Admin) => Role::Admin,
            _ => return Err(Status::invalid_argument("role must be AGENT, APPLICATION or ADMIN")),
        };
        Ok(Response::new(match self.0.issue_certificate(&caller, role, &r.name, &r.public_key, r.validity_days).await? {
            Issued::Certificate { certificate_pem, ca_pem } => pb::IssueCertificateResponse { certificate_pem, ca_pem, pending: None },
            Issued::Pending(request) => pb::IssueCertificateResponse { pending: Some(request_pb(&self.0, &request)), ..Default::default() },
        }))
    }
}

#[cfg(test)]
mod page_tests {
    use super::*;

    fn items(n: u32) -> impl Iterator<Item = crate::error::Result<(Vec<u8>, u32)>> {
        (0..n).map(|i| Ok((i.to_be_bytes().to_vec(), i)))
    }

    #[test]
    fn a_page_ends_at_its_size_and_its_token_resumes_after_its_last_item() {
        let p = limits::Page { after: vec![], size: 3 };
        let (out, token) = page(items(10), &p, |i| Some(pb::Operator { operator_id: i.to_string(), ..Default::default() })).unwrap();
        assert_eq!(out.iter().map(|o| o.operator_id.as_str()).collect::<Vec<_>>(), ["0", "1", "2"]);
        assert_eq!(limits::Page::parse(3, &token).unwrap().after, 2u32.to_be_bytes());
        let (out, token) = page(items(3), &p, |i| Some(pb::Operator { operator_id: i.to_string(), ..Default::default() })).unwrap();
        assert_eq!((out.len(), token.as_str()), (3, ""), "no token on the last page");
    }

    #[test]
    fn a_filter_that_matches_nothing_scans_a_bounded_number_of_items() {
        let p = limits::Page { after: vec![], size: 10 };
        let mut seen = 0;
        let (out, token) = page(items(50_000), &p, |_| -> Option<pb::Operator> {
            seen += 1;
            None
        })
        .unwrap();
        assert!(out.is_empty() && seen == limits::PAGE_SCAN_MAX, "scanned {seen}");
        assert_eq!(limits::Page::parse(10, &token).unwrap().after, (limits::PAGE_SCAN_MAX as u32 - 1).to_be_bytes());
    }

    #[test]
    fn a_page_ends_before_its_byte_bound() {
        let p = limits::Page { after: vec![], size: 1000 };
        let big = "x".repeat(4000);
        let (out, token) = page(items(1000), &p, |i| Some(pb::Operator { operator_id: i.to_string(), name: big.clone(), ..Default::default() })).unwrap();
        let bytes: usize = out.iter().map(prost::Message::encoded_len).sum();
        assert!(bytes <= limits::PAGE_BYTES_MAX && out.len() < 1000 && !token.is_empty(), "{} items, {bytes} bytes", out.len());
    }
}
