//! A gateway that lies: it holds a valid server certificate (stolen, or
//! issued by whoever has the service CA key) and asks the agent to have the
//! operator's card sign something other than this tap's pivgate challenge.
//! The real agent, with the virtual card in a vpcd reader behind the real
//! pcscd, refuses each one before the card is asked to sign, and the card
//! never sees a GENERAL AUTHENTICATE.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Result};
use pivgate_agent::terminal::TapResult;
use pivgate_hw::piv::Algorithm;
use pivgate_proto::card_message::{CardMessage, MECHANISM_CARD_AND_PIN};
use pivgate_proto::v1 as pb;
use pivgate_tests::agent::{start_agent_at, TerminalSpec};
use pivgate_tests::reader;
use pivgate_tests::site::Site;
use pivgate_vcard::vpcd;
use sha2::Digest;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

const T: &str = "dispatch-01";
const WAIT: Duration = Duration::from_secs(15);
const GENERAL_AUTHENTICATE: u8 = 0x87;

/// The impostor: answers each BeginAuthentication with the next message it
/// wants signed, and counts the signatures it gets.
struct Impostor {
    messages: Mutex<VecDeque<Vec<u8>>>,
    completions: Arc<AtomicUsize>,
}

type Replies = Pin<Box<dyn Stream<Item = Result<pb::PresenceResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for Impostor {
    type PresenceStream = Replies;

    async fn presence(&self, req: Request<Streaming<pb::PresenceRequest>>) -> Result<Response<Replies>, Status> {
        let mut input = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(Ok(_)) = input.next().await {
                if tx.send(Ok(pb::PresenceResponse { heartbeat_interval_ms: 1000, lock_terminals: vec![], step_ups: vec![] })).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn begin_authentication(&self, _: Request<pb::BeginAuthenticationRequest>) -> Result<Response<pb::BeginAuthenticationResponse>, Status> {
        let message = self.messages.lock().unwrap().pop_front().unwrap_or_default();
        let challenge = pb::Challenge {
            challenge_id: vec![7; 16],
            message,
            slot: pb::KeySlot::PivAuthentication as i32,
            algorithm: pb::SignatureAlgorithm::EcdsaP256Sha256 as i32,
            pin_required: true,
            expires_in_ms: 30_000,
        };
        Ok(Response::new(pb::BeginAuthenticationResponse { outcome: Some(pb::begin_authentication_response::Outcome::Challenge(challenge)) }))
    }

    async fn complete_authentication(&self, _: Request<pb::CompleteAuthenticationRequest>) -> Result<Response<pb::CompleteAuthenticationResponse>, Status> {
        self.completions.fetch_add(1, Ordering::SeqCst);
        Err(Status::unavailable("the impostor got a signature"))
    }

    async fn report_card_removed(&self, _: Request<pb::ReportCardRemovedRequest>) -> Result<Response<pb::ReportCardRemovedResponse>, Status> {
        Ok(Response::new(pb::ReportCardRemovedResponse { locked: false }))
    }

    async fn report_pin_failure(&self, _: Request<pb::ReportPinFailureRequest>) -> Result<Response<pb::ReportPinFailureResponse>, Status> {
        Ok(Response::new(pb::ReportPinFailureResponse {}))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_asking_the_card_to_sign_a_foreign_message_gets_no_signature() -> Result<()> {
    let r = reader()?;
    let site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &["dispatcher"], Algorithm::EccP256).await?;
    let now_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?.as_millis() as i64;
    let tap_message = |agent: &'static str, terminal: &'static str, unix_ms: i64| {
        CardMessage {
            challenge_id: [7; 16],
            nonce: [1; 32],
            gateway_id: [2; 32],
            agent,
            terminal,
            card_uuid: profile.chuid.guid,
            mechanism: MECHANISM_CARD_AND_PIN,
            certificate_sha256: [3; 32],
            unix_ms,
        }
        .encode()
    };
    let foreign: Vec<(&str, Vec<u8>)> = vec![
        // What a TLS 1.3 CertificateVerify or an SSH userauth signs is a
        // hash the card cannot tell from any other.
        ("a bare digest", sha2::Sha256::digest(b"TLS 1.3, client CertificateVerify: transcript").to_vec()),
        ("another terminal", tap_message("pi-1", "vault-door", now_ms)),
        ("another agent", tap_message("pi-9", T, now_ms)),
        ("an hour ago", tap_message("pi-1", T, now_ms - 3_600_000)),
    ];
    let completions = Arc::new(AtomicUsize::new(0));
    let impostor = Impostor { messages: Mutex::new(foreign.iter().map(|(_, m)| m.clone()).collect()), completions: completions.clone() };

    // The impostor serves with the real gateway's server certificate and
    // key, and asks for the site's agent certificates like the real one.
    let tls = pivgate_gateway::tls::server_config(&pivgate_gateway::pki::Files::in_dir(&site.config.data_dir))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let limits = pivgate_gateway::tls::AcceptLimits {
        max_connections: 64,
        max_handshakes: 16,
        max_per_address: 16,
        handshake_timeout: Duration::from_secs(5),
        max_per_identity: 16,
    };
    let (incoming, _accept) = pivgate_gateway::tls::incoming(listener, tls, limits, Arc::new(|_, _| {}));
    tokio::spawn(tonic::transport::Server::builder().add_service(pb::agent_service_server::AgentServiceServer::new(impostor)).serve_with_incoming(incoming));

    let agent = start_agent_at(&site, &addr, "pi-1", &[TerminalSpec { id: T, reader: &r.name, keypad: true }]).await?;
    let mut card = profile.card();
    for (what, _) in &foreign {
        let inserted = vpcd::insert(card, r.addr)?;
        match agent.next_result(T, WAIT).await? {
            TapResult::Refused(_) => {}
            other => bail!("{what}: expected the agent to refuse, got {other:?}"),
        }
        card = inserted.remove();
        pivgate_hw::pcsc::wait_for_card(&pivgate_hw::pcsc::establish()?, &r.name, false, WAIT)?;
    }
    assert_eq!(card.commands_seen(GENERAL_AUTHENTICATE), 0, "the card was asked to sign");
    assert_eq!(completions.load(Ordering::SeqCst), 0, "the impostor received a signature");
    assert!(!card.pin_verified());
    agent.stop().await
}
