//! Connecting to a gateway as a client (pivgatectl, tests, example
//! consoles): mutual TLS with a service certificate, and [`Admin`], the
//! typed Admin API client.

use std::path::Path;

use pb::admin_service_client::AdminServiceClient;
use pivgate_proto::v1 as pb;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Error, Result};
use crate::model::{Operator, Slot, TerminalPolicy};
use crate::pki::Role;

/// What IssueCertificate gave.
#[derive(Debug)]
pub enum Issued {
    /// The certificate and the service CA, PEM.
    Certificate {
        /// The certificate.
        certificate_pem: String,
        /// The service CA.
        ca_pem: String,
    },
    /// An administrator certificate waiting for a second administrator.
    Pending(Box<pb::ApprovalRequest>),
}

/// Client credentials: the service CA to trust and our certificate and key.
#[derive(Clone)]
pub struct Credentials {
    /// Service CA, PEM.
    pub ca_pem: String,
    /// Our certificate, PEM.
    pub cert_pem: String,
    /// Our key, PEM.
    pub key_pem: String,
}

impl Credentials {
    /// Reads the three PEM files.
    pub fn from_files(ca: &Path, cert: &Path, key: &Path) -> Result<Credentials> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Error::Config(format!("{}: {e}", p.display())));
        Ok(Credentials { ca_pem: read(ca)?, cert_pem: read(cert)?, key_pem: read(key)? })
    }

    /// The first administrator's credentials in a gateway data folder.
    pub fn admin_in(data_dir: &Path) -> Result<Credentials> {
        let f = crate::pki::Files::in_dir(data_dir);
        Credentials::from_files(&f.ca, &f.admin, &f.admin_key)
    }
}

/// Connects to `addr` (host:port) with mutual TLS; the server must present
/// a certificate for `server_name` from the service CA.
pub async fn connect(addr: &str, server_name: &str, creds: &Credentials) -> Result<Channel> {
    let tls = ClientTlsConfig::new()
        .domain_name(server_name)
        .ca_certificate(Certificate::from_pem(&creds.ca_pem))
        .identity(Identity::from_pem(&creds.cert_pem, &creds.key_pem));
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| Error::Config(format!("gateway address {addr}: {e}")))?
        .tls_config(tls)
        .map_err(|e| Error::Tls(e.to_string()))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(30));
    endpoint.connect().await.map_err(|e| Error::Tls(format!("connecting to {addr}: {e}")))
}

/// The Admin API, typed: what `pivgatectl`, the tests, the demo and the
/// crash tests call, with the gateway's own types in and out and the
/// request building in one place. [`Admin::rpc`] is the raw client, for
/// what has no typed call yet (and for tests that send what no client
/// would).
#[derive(Clone)]
pub struct Admin {
    rpc: AdminServiceClient<Channel>,
}

impl Admin {
    /// Over `channel`.
    pub fn new(channel: Channel) -> Admin {
        Admin { rpc: AdminServiceClient::new(channel) }
    }

    /// Connects with `creds` (see [`connect`]).
    pub async fn connect(addr: &str, server_name: &str, creds: &Credentials) -> Result<Admin> {
        Ok(Admin::new(connect(addr, server_name, creds).await?))
    }

    /// The raw client.
    pub fn rpc(&mut self) -> &mut AdminServiceClient<Channel> {
        &mut self.rpc
    }

    /// Adds or replaces an operator.
    pub async fn add_operator(&mut self, op: &Operator) -> Result<()> {
        self.rpc.add_operator(pb::AddOperatorRequest { operator: Some(crate::service::operator_pb(op)) }).await?;
        Ok(())
    }

    /// Adds `op` and enrols `certificate` (DER) for their `slot`: a new
    /// operator with their card, in two calls.
    pub async fn add_operator_with_card(&mut self, op: &Operator, certificate: &[u8], slot: Slot) -> Result<pb::Card> {
        self.add_operator(op).await?;
        self.enrol_card(&op.id, certificate, slot).await
    }

    /// Enrols a card certificate (DER) for an operator's `slot`; returns the
    /// card as the gateway holds it.
    pub async fn enrol_card(&mut self, operator_id: &str, certificate: &[u8], slot: Slot) -> Result<pb::Card> {
        self.enrol_card_with(operator_id, certificate, slot, None, None).await
    }

    /// [`Admin::enrol_card`] with the rest: for an enrolled-key card,
    /// `to_card` (as listed) is the card whose other slot this
    /// certificate's key is for; `attestation` is the key's attestation and
    /// the token's attestation certificate (DER), where the token gave them.
    pub async fn enrol_card_with(
        &mut self,
        operator_id: &str,
        certificate: &[u8],
        slot: Slot,
        to_card: Option<&str>,
        attestation: Option<(&[u8], &[u8])>,
    ) -> Result<pb::Card> {
        let req = pb::EnrolCardRequest {
            operator_id: operator_id.into(),
            certificate: certificate.to_vec(),
            slot: crate::service::slot_pb(slot) as i32,
            card_uuid: to_card.unwrap_or_default().into(),
            attestation: attestation.map(|a| a.0.to_vec()).unwrap_or_default(),
            attestation_intermediate: attestation.map(|a| a.1.to_vec()).unwrap_or_default(),
            dry_run: false,
            temporary_days: 0,
        };
        Ok(self.rpc.enrol_card(req).await?.into_inner().card.unwrap_or_default())
    }

    /// Whether `certificate` would enrol for the operator's `slot`, with
    /// nothing written.
    pub async fn check_enrolment(&mut self, operator_id: &str, certificate: &[u8], slot: Slot) -> Result<()> {
        let req = pb::EnrolCardRequest {
            operator_id: operator_id.into(),
            certificate: certificate.to_vec(),
            slot: crate::service::slot_pb(slot) as i32,
            dry_run: true,
            ..Default::default()
        };
        self.rpc.enrol_card(req).await?;
        Ok(())
    }

    /// Suspends a card (its id as text) at once; returns the terminals it
    /// locked.
    pub async fn suspend_card(&mut self, card_uuid: &str, reason: &str) -> Result<Vec<String>> {
        Ok(self.rpc.suspend_card(pb::SuspendCardRequest { card_uuid: card_uuid.into(), reason: reason.into() }).await?.into_inner().locked_terminals)
    }

    /// Ends a card's suspension.
    pub async fn resume_card(&mut self, card_uuid: &str, reason: &str) -> Result<()> {
        self.rpc.resume_card(pb::ResumeCardRequest { card_uuid: card_uuid.into(), reason: reason.into() }).await?;
        Ok(())
    }

    /// Opens an enrolment window for `operator_id` at `terminal` for
    /// `duration_s` seconds (0: five minutes); returns when it closes (Unix
    /// ms).
    pub async fn open_enrolment(&mut self, operator_id: &str, terminal: &str, duration_s: u32, replaces: Option<&str>, temporary_days: u32) -> Result<i64> {
        let req = pb::OpenEnrolmentRequest {
            operator_id: operator_id.into(),
            terminal_id: terminal.into(),
            duration_s,
            replaces_card_uuid: replaces.unwrap_or_default().into(),
            temporary_days,
        };
        Ok(self.rpc.open_enrolment(req).await?.into_inner().closes_unix_ms)
    }

    /// Closes a terminal's enrolment window; whether one was open.
    pub async fn close_enrolment(&mut self, terminal: &str) -> Result<bool> {
        Ok(self.rpc.close_enrolment(pb::CloseEnrolmentRequest { terminal_id: terminal.into() }).await?.into_inner().was_open)
    }

    /// Replaces card `old` with `replacement` (the same operator's), revoking
    /// the old one; returns the new card and the terminals the old one held.
    pub async fn replace_card(&mut self, old: &str, replacement: pb::EnrolCardRequest, reason: &str) -> Result<(pb::Card, Vec<String>)> {
        let req = pb::ReplaceCardRequest { card_uuid: old.into(), replacement: Some(replacement), reason: reason.into() };
        let r = self.rpc.replace_card(req).await?.into_inner();
        Ok((r.card.unwrap_or_default(), r.locked_terminals))
    }

    /// Approval requests: the pending ones, or every one.
    pub async fn requests(&mut self, include_closed: bool) -> Result<Vec<pb::ApprovalRequest>> {
        Ok(self.rpc.list_requests(pb::ListRequestsRequest { include_closed }).await?.into_inner().requests)
    }

    /// Approves a request on this administrator's certificate alone (where
    /// the site allows it).
    pub async fn approve(&mut self, request_id: &str) -> Result<pb::ApprovalRequest> {
        let req = pb::ApproveRequestRequest { request_id: request_id.into(), ..Default::default() };
        Ok(self.rpc.approve_request(req).await?.into_inner().request.unwrap_or_default())
    }

    /// Approves a request with the approver's badge: `sign` is given the
    /// approval message (checked to be one, naming this request) and
    /// returns the badge's signature.
    pub async fn approve_with_badge(
        &mut self,
        request_id: &str,
        certificate: &[u8],
        sign: impl FnOnce(&pivgate_proto::card_message::ApprovalMessage<'_>, &[u8], pb::SignatureAlgorithm) -> Result<Vec<u8>>,
    ) -> Result<pb::ApprovalRequest> {
        let c = self.rpc.begin_approval(pb::BeginApprovalRequest { request_id: request_id.into(), certificate: certificate.to_vec() }).await?.into_inner();
        let m = pivgate_proto::card_message::parse_approval(&c.message).map_err(|e| Error::InvalidRequest(format!("the gateway's approval message: {e}")))?;
        if hex::encode(m.request_id) != request_id.to_ascii_lowercase() || m.challenge_id.as_slice() != c.challenge_id.as_slice() {
            return Err(Error::InvalidRequest("the gateway's approval message names another request".into()));
        }
        let algorithm = pb::SignatureAlgorithm::try_from(c.algorithm).map_err(|_| Error::InvalidRequest("unknown signature algorithm".into()))?;
        let signature = sign(&m, &c.message, algorithm)?;
        let req = pb::ApproveRequestRequest { request_id: request_id.into(), challenge_id: c.challenge_id, signature };
        Ok(self.rpc.approve_request(req).await?.into_inner().request.unwrap_or_default())
    }

    /// Refuses a request.
    pub async fn refuse(&mut self, request_id: &str, reason: &str) -> Result<pb::ApprovalRequest> {
        let req = pb::RefuseRequestRequest { request_id: request_id.into(), reason: reason.into() };
        Ok(self.rpc.refuse_request(req).await?.into_inner().request.unwrap_or_default())
    }

    /// Revokes a card (its UUID as text); returns the terminals it locked.
    pub async fn revoke_card(&mut self, card_uuid: &str, reason: &str) -> Result<Vec<String>> {
        Ok(self.rpc.revoke_card(pb::RevokeCardRequest { card_uuid: card_uuid.into(), reason: reason.into() }).await?.into_inner().locked_terminals)
    }

    /// Binds an agent to exactly these terminals.
    pub async fn bind_agent<S: AsRef<str>>(&mut self, agent: &str, terminals: &[S]) -> Result<()> {
        let req = pb::BindAgentRequest { agent_name: agent.into(), terminal_ids: terminals.iter().map(|t| t.as_ref().to_string()).collect() };
        self.rpc.bind_agent(req).await?;
        Ok(())
    }

    /// Sets a terminal's policy.
    pub async fn set_terminal_policy(&mut self, terminal: &str, policy: &TerminalPolicy) -> Result<()> {
        let req = pb::SetTerminalPolicyRequest {
            terminal_id: terminal.into(),
            allowed_mechanisms: policy.allowed_mechanisms.iter().map(|m| crate::service::mechanism_pb(*m) as i32).collect(),
            allowed_roles: policy.allowed_roles.clone(),
            idle_timeout_s: policy.idle_timeout_s,
            max_session_s: policy.max_session_s,
            removal_grace_s: policy.removal_grace_s,
            hours: crate::service::policy_pb(policy).hours,
        };
        self.rpc.set_terminal_policy(req).await?;
        Ok(())
    }

    /// Creates or changes a terminal group; returns the terminals its new
    /// policy locked.
    pub async fn set_terminal_group(&mut self, group: &str, policy: &TerminalPolicy) -> Result<Vec<String>> {
        let req = pb::SetTerminalGroupRequest { group_id: group.into(), policy: Some(crate::service::policy_pb(policy)) };
        Ok(self.rpc.set_terminal_group(req).await?.into_inner().locked_terminals)
    }

    /// Puts a terminal in a group (`None`: out of any).
    pub async fn assign_terminal(&mut self, terminal: &str, group: Option<&str>) -> Result<()> {
        self.rpc.assign_terminal(pb::AssignTerminalRequest { terminal_id: terminal.into(), group_id: group.unwrap_or_default().into() }).await?;
        Ok(())
    }

    /// Locks a terminal; returns whether it was unlocked.
    pub async fn lock_terminal(&mut self, terminal: &str) -> Result<bool> {
        Ok(self.rpc.lock_terminal(pb::LockTerminalRequest { terminal_id: terminal.into() }).await?.into_inner().was_unlocked)
    }

    /// A service certificate for `public_key` (DER SubjectPublicKeyInfo),
    /// or, for an administrator past the bootstrap pair, the request a
    /// second administrator approves (ask again after).
    pub async fn issue_certificate(&mut self, role: Role, name: &str, public_key: &[u8], validity_days: u32) -> Result<Issued> {
        let role = match role {
            Role::Agent => pb::ServiceRole::Agent,
            Role::Application => pb::ServiceRole::Application,
            Role::Admin => pb::ServiceRole::Admin,
        };
        let req = pb::IssueCertificateRequest { role: role as i32, name: name.into(), public_key: public_key.to_vec(), validity_days };
        let r = self.rpc.issue_certificate(req).await?.into_inner();
        Ok(match r.pending {
            Some(request) => Issued::Pending(Box::new(request)),
            None => Issued::Certificate { certificate_pem: r.certificate_pem, ca_pem: r.ca_pem },
        })
    }

    /// Credentials for a new service identity: a P-256 key made here (it
    /// never leaves this process but in the returned credentials) and its
    /// certificate. An administrator certificate that needs approval is
    /// refused here (the key would be lost): ask with
    /// [`Admin::issue_certificate`] and a key kept by its holder.
    pub async fn issue_credentials(&mut self, role: Role, name: &str, validity_days: u32) -> Result<Credentials> {
        use rcgen::PublicKeyData;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| Error::Pki(e.to_string()))?;
        match self.issue_certificate(role, name, &key.subject_public_key_info(), validity_days).await? {
            Issued::Certificate { certificate_pem, ca_pem } => Ok(Credentials { ca_pem, cert_pem: certificate_pem, key_pem: key.serialize_pem() }),
            Issued::Pending(r) => {
                Err(Error::PermissionDenied(format!("the administrator certificate waits for a second administrator's approval (request {})", r.request_id)))
            }
        }
    }

    /// Every operator, page by page.
    pub async fn operators(&mut self) -> Result<Vec<pb::Operator>> {
        let (mut all, mut page_token) = (Vec::new(), String::new());
        loop {
            let r = self.rpc.list_operators(pb::ListOperatorsRequest { page_size: 0, page_token: page_token.clone() }).await?.into_inner();
            all.extend(r.operators);
            if r.next_page_token.is_empty() {
                return Ok(all);
            }
            if r.next_page_token == page_token {
                return Err(Error::InvalidRequest("the gateway gave the same page token twice".into()));
            }
            page_token = r.next_page_token;
        }
    }

    /// Audit records after `after` (oldest first), at most `limit`.
    pub async fn audit_after(&mut self, after: u64, limit: u32) -> Result<Vec<pb::AuditRecord>> {
        Ok(self.rpc.query_audit(pb::QueryAuditRequest { after_index: after, limit }).await?.into_inner().records)
    }
}
