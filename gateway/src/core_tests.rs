//! The gateway's decisions without transport: a real sled database in a
//! temporary folder, virtual time, replayable randomness, and the virtual
//! card in process signing what the gateway asks. No TLS, no pcscd.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use pivgate_hw::piv::{Algorithm, PivClient, Slot as CardSlot};
use pivgate_vcard::{IssuingCa, Profile, ProfileOptions};
use sha2::Digest;

use super::*;
use crate::config::Config;
use crate::pki::Role;

/// Time that moves only when a test moves it.
#[derive(Clone)]
struct TestClock(Arc<Mutex<(SystemTime, Instant)>>);

impl TestClock {
    fn new() -> Self {
        TestClock(Arc::new(Mutex::new((SystemTime::now(), Instant::now()))))
    }
    fn advance(&self, d: Duration) {
        let mut t = self.0.lock().unwrap();
        t.0 += d;
        t.1 += d;
    }
}

impl Clock for TestClock {
    fn system(&self) -> SystemTime {
        self.0.lock().unwrap().0
    }
    fn instant(&self) -> Instant {
        self.0.lock().unwrap().1
    }
}

/// Replayable randomness: a counter through SHA-256.
struct Counter(AtomicU64);

impl Randomness for Counter {
    fn fill(&self, buf: &mut [u8]) -> Result<()> {
        for chunk in buf.chunks_mut(32) {
            let n = self.0.fetch_add(1, Ordering::SeqCst);
            chunk.copy_from_slice(&sha2::Sha256::digest(n.to_be_bytes())[..chunk.len()]);
        }
        Ok(())
    }
}

const T: &str = "dispatch-01";

fn admin() -> Caller {
    Caller { role: Role::Admin, name: "root".into() }
}

fn agent() -> Caller {
    Caller { role: Role::Agent, name: "pi-1".into() }
}

fn issuer() -> &'static IssuingCa {
    static CA: std::sync::OnceLock<IssuingCa> = std::sync::OnceLock::new();
    CA.get_or_init(|| IssuingCa::generate("unit test card issuer").unwrap())
}

fn card_profile() -> &'static Profile {
    static P: std::sync::OnceLock<Profile> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        let ca = IssuingCa { cert_pem: issuer().cert_pem.clone(), key_pem: issuer().key_pem.clone() };
        Profile::generate_with_ca(ca, &ProfileOptions { algorithm: Algorithm::EccP256, ..Default::default() }).unwrap()
    })
}

/// A gateway on a fresh database with terminal T bound to agent pi-1 and
/// operator op-1 (role dispatcher) holding the test card (9A enrolled).
struct Bench {
    gw: Arc<Gateway>,
    clock: TestClock,
    dir: std::path::PathBuf,
}

impl Drop for Bench {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn bench(tweak: impl FnOnce(&mut Config)) -> Bench {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!("pivgate-core-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let anchor = dir.join("issuer.pem");
    std::fs::write(&anchor, &issuer().cert_pem).unwrap();
    let mut config = Config { data_dir: dir.join("data"), ..Config::default() };
    config.cards.trust_anchors = vec![anchor];
    tweak(&mut config);
    let clock = TestClock::new();
    let (gw, _, _) = crate::open_with(&config, Box::new(clock.clone()), Box::new(Counter(AtomicU64::new(0)))).unwrap();
    gw.add_operator(&admin(), Operator { id: "op-1".into(), name: "Op One".into(), roles: vec!["dispatcher".into()], enabled: true }).await.unwrap();
    gw.enrol_card(&admin(), "op-1", &card_profile().certificates[&CardSlot::Authentication], Slot::PivAuthentication, None).await.unwrap();
    gw.bind_agent(&admin(), "pi-1", vec![T.into(), "lobby".into()]).await.unwrap();
    Bench { gw, clock, dir }
}

fn uuid() -> [u8; 16] {
    card_profile().chuid.guid
}

fn begin_req(terminal: &str) -> BeginRequest {
    BeginRequest { terminal: terminal.into(), card_uuid: Some(uuid()), fascn: None, certificate: None, mechanism: None, step_up: None }
}

/// The card signs the message as the agent would have it (PIN verified
/// for 9A).
fn card_signs(message: &[u8], mechanism: Mechanism) -> Vec<u8> {
    profile_signs(card_profile(), message, mechanism)
}

/// [`card_signs`] with another card.
fn profile_signs(profile: &Profile, message: &[u8], mechanism: Mechanism) -> Vec<u8> {
    let mut card = profile.card();
    let mut piv = PivClient::new(&mut card);
    piv.select().unwrap();
    let slot = match mechanism {
        Mechanism::CardAndPin => {
            piv.verify_pin(&pivgate_hw::Pin::new(b"123456").unwrap()).unwrap();
            CardSlot::Authentication
        }
        Mechanism::CardOnly => CardSlot::CardAuthentication,
    };
    piv.sign(slot, Algorithm::EccP256, &sha2::Sha256::digest(message)).unwrap()
}

/// Begin and the card's signature, not yet completed.
async fn signed(b: &Bench, terminal: &str) -> ([u8; 16], Vec<u8>) {
    match b.gw.begin(&agent(), begin_req(terminal)).await.unwrap() {
        Begin::Challenge { id, message, mechanism, .. } => (id, card_signs(&message, mechanism)),
        Begin::Denied(d, why) => panic!("begin denied: {d:?} {why}"),
        Begin::CertificateNeeded(s) => panic!("certificate {s:?} asked for"),
    }
}

async fn tap(b: &Bench) -> Complete {
    let (id, sig) = signed(b, T).await;
    b.gw.complete(&agent(), &id, T, &sig).await.unwrap()
}

fn denied(c: &Complete) -> Option<Deny> {
    match c {
        Complete::Denied(d, _) => Some(*d),
        Complete::Granted { .. } | Complete::Enrolled { .. } | Complete::SteppedUp { .. } => None,
    }
}

fn session(b: &Bench) -> Session {
    b.gw.store.terminal(T).unwrap().unwrap().session
}

fn locked_for(b: &Bench) -> Option<LockReason> {
    match session(b) {
        Session::Locked { reason, .. } => Some(reason),
        Session::Unlocked { .. } => None,
    }
}

#[tokio::test]
async fn a_good_proof_unlocks_and_its_audit_record_names_the_event() {
    let b = bench(|_| {}).await;
    let Complete::Granted { operator, sequence } = tap(&b).await else { panic!("refused") };
    assert_eq!(operator.id, "op-1");
    assert!(matches!(session(&b), Session::Unlocked { ref operator_id, mechanism: Mechanism::CardAndPin, .. } if operator_id == "op-1"));
    let (head, _) = b.gw.store.audit_head().unwrap();
    let rec = b.gw.store.audit_after(head - 1, 1).unwrap().remove(0);
    assert_eq!(rec.kind, AuditKind::AuthGranted.as_str());
    assert!(rec.detail.to_string().contains("op-1"), "{}", rec.detail);
    assert!(sequence > 0);
}

#[tokio::test]
async fn a_replayed_proof_is_refused() {
    let b = bench(|_| {}).await;
    let (id, sig) = signed(&b, T).await;
    assert!(denied(&b.gw.complete(&agent(), &id, T, &sig).await.unwrap()).is_none());
    assert_eq!(denied(&b.gw.complete(&agent(), &id, T, &sig).await.unwrap()), Some(Deny::ChallengeReplayed));
}

#[tokio::test]
async fn a_challenge_expires_in_virtual_time() {
    let b = bench(|c| c.challenge_ttl_s = 10).await;
    let (id, sig) = signed(&b, T).await;
    b.clock.advance(Duration::from_secs(11));
    assert_eq!(denied(&b.gw.complete(&agent(), &id, T, &sig).await.unwrap()), Some(Deny::ChallengeExpired));
    assert!(locked_for(&b).is_some());
}

#[tokio::test]
async fn a_challenge_just_inside_its_lifetime_is_good() {
    let b = bench(|c| c.challenge_ttl_s = 10).await;
    let (id, sig) = signed(&b, T).await;
    b.clock.advance(Duration::from_secs(9));
    assert!(denied(&b.gw.complete(&agent(), &id, T, &sig).await.unwrap()).is_none());
}

#[tokio::test]
async fn a_challenge_of_another_terminal_is_refused_and_not_spent() {
    let b = bench(|_| {}).await;
    let (id, sig) = signed(&b, "lobby").await;
    assert_eq!(denied(&b.gw.complete(&agent(), &id, T, &sig).await.unwrap()), Some(Deny::ChallengeMismatch));
    assert!(denied(&b.gw.complete(&agent(), &id, "lobby", &sig).await.unwrap()).is_none(), "the mismatch spent the challenge");
}

#[tokio::test]
async fn challenge_ids_come_from_the_randomness_given() {
    let b = bench(|_| {}).await;
    let Begin::Challenge { id, .. } = b.gw.begin(&agent(), begin_req(T)).await.unwrap() else { panic!() };
    let expected = Counter(AtomicU64::new(0));
    let mut first = [0u8; 16];
    expected.fill(&mut first).unwrap();
    assert_eq!(id, first);
}

#[tokio::test]
async fn a_session_past_its_maximum_is_locked_by_the_sweep() {
    let b = bench(|c| c.agent_grace_s = 600).await;
    b.gw.set_policy(&admin(), T, TerminalPolicy { max_session_s: 60, ..Default::default() }).await.unwrap();
    assert!(denied(&tap(&b).await).is_none());
    b.clock.advance(Duration::from_secs(59));
    b.gw.sweep().await.unwrap();
    assert_eq!(locked_for(&b), None);
    b.clock.advance(Duration::from_secs(2));
    b.gw.sweep().await.unwrap();
    assert_eq!(locked_for(&b), Some(LockReason::MaxSession));
}

#[tokio::test]
async fn a_silent_agent_locks_its_terminals_and_a_reporting_one_does_not() {
    let b = bench(|c| c.agent_grace_s = 30).await;
    assert!(denied(&tap(&b).await).is_none());
    b.clock.advance(Duration::from_secs(25));
    b.gw.presence(&agent(), &[(T.to_string(), true, Some(uuid()))]).await.unwrap();
    b.clock.advance(Duration::from_secs(25));
    b.gw.sweep().await.unwrap();
    assert_eq!(locked_for(&b), None, "an agent that reported within its grace was taken for silent");
    b.clock.advance(Duration::from_secs(6));
    b.gw.sweep().await.unwrap();
    assert_eq!(locked_for(&b), Some(LockReason::AgentSilent));
}

#[tokio::test]
async fn a_presence_report_without_the_card_locks() {
    let b = bench(|_| {}).await;
    assert!(denied(&tap(&b).await).is_none());
    let locked = b.gw.presence(&agent(), &[(T.to_string(), true, Some([9; 16]))]).await.unwrap();
    assert_eq!(locked, vec![T.to_string()]);
    assert_eq!(locked_for(&b), Some(LockReason::CardRemoved));
}

#[tokio::test]
async fn a_revocation_between_begin_and_complete_refuses_the_grant() {
    let b = bench(|_| {}).await;
    let (id, sig) = signed(&b, T).await;
    b.gw.revoke_card(&admin(), uuid(), "lost").await.unwrap();
    assert_eq!(denied(&b.gw.complete(&agent(), &id, T, &sig).await.unwrap()), Some(Deny::RevokedDenyList));
    assert!(locked_for(&b).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_racing_a_grant_never_leaves_the_terminal_unlocked() {
    // Whichever commits first, the end state is locked: a grant that lands
    // before the revocation is found and locked by it; one after is refused.
    for round in 0..12 {
        let b = bench(|_| {}).await;
        let (id, sig) = signed(&b, T).await;
        let (gw1, gw2) = (b.gw.clone(), b.gw.clone());
        let grant = tokio::spawn(async move { gw1.complete(&agent(), &id, T, &sig).await.unwrap() });
        let revoke = tokio::spawn(async move { gw2.revoke_card(&admin(), uuid(), "lost").await.unwrap() });
        let (granted, _) = (grant.await.unwrap(), revoke.await.unwrap());
        assert!(locked_for(&b).is_some(), "round {round}: the revoked card's session stands (granted: {})", denied(&granted).is_none());
    }
}

#[tokio::test]
async fn a_disabled_operator_between_begin_and_complete_is_refused() {
    let b = bench(|_| {}).await;
    let (id, sig) = signed(&b, T).await;
    b.gw.add_operator(&admin(), Operator { id: "op-1".into(), name: "Op One".into(), roles: vec!["dispatcher".into()], enabled: false }).await.unwrap();
    assert_eq!(denied(&b.gw.complete(&agent(), &id, T, &sig).await.unwrap()), Some(Deny::OperatorDisabled));
}

#[tokio::test]
async fn a_policy_changed_to_card_only_between_begin_and_complete_is_refused() {
    let b = bench(|_| {}).await;
    let (id, sig) = signed(&b, T).await;
    b.gw.set_policy(&admin(), T, TerminalPolicy { allowed_mechanisms: vec![Mechanism::CardOnly], ..Default::default() }).await.unwrap();
    assert_eq!(denied(&b.gw.complete(&agent(), &id, T, &sig).await.unwrap()), Some(Deny::MechanismNotAllowed));
}

#[tokio::test]
async fn a_role_taken_away_ends_the_session_and_a_policy_naming_other_roles_too() {
    let b = bench(|_| {}).await;
    assert!(denied(&tap(&b).await).is_none());
    // The operator loses the role the session carries.
    b.gw.add_operator(&admin(), Operator { id: "op-1".into(), name: "Op One".into(), roles: vec![], enabled: true }).await.unwrap();
    assert_eq!(locked_for(&b), Some(LockReason::RoleRemoved));

    let b = bench(|_| {}).await;
    assert!(denied(&tap(&b).await).is_none());
    b.gw.set_policy(&admin(), T, TerminalPolicy { allowed_roles: vec!["intercom-admin".into()], ..Default::default() }).await.unwrap();
    assert_eq!(locked_for(&b), Some(LockReason::PolicyChanged));
}

#[tokio::test]
async fn an_unbound_terminal_and_an_unknown_card_are_refused_at_begin() {
    let b = bench(|_| {}).await;
    let Begin::Denied(d, _) = b.gw.begin(&agent(), begin_req("vault")).await.unwrap() else { panic!("began at a terminal it is not bound to") };
    assert_eq!(d, Deny::TerminalNotBound);
    // A card id the gateway does not know may be a card without a CHUID
    // or one known by its key: the gateway asks for its certificate, and
    // refuses once the certificate names no enrolled card.
    let stranger = BeginRequest { card_uuid: Some([7; 16]), ..begin_req(T) };
    assert!(matches!(b.gw.begin(&agent(), stranger.clone()).await.unwrap(), Begin::CertificateNeeded(Slot::PivAuthentication)));
    let other = Profile::generate(&ProfileOptions::default()).unwrap().certificates[&CardSlot::Authentication].clone();
    let Begin::Denied(d, _) = b.gw.begin(&agent(), BeginRequest { certificate: Some(other), ..stranger }).await.unwrap() else {
        panic!("began for an unknown card")
    };
    assert_eq!(d, Deny::UnknownCard);
}

#[tokio::test]
async fn a_card_only_terminal_asks_for_the_9e_certificate_and_keeps_it_once_proven() {
    let b = bench(|_| {}).await;
    b.gw.set_policy(&admin(), T, TerminalPolicy { allowed_mechanisms: vec![Mechanism::CardOnly], ..Default::default() }).await.unwrap();
    let req = BeginRequest { mechanism: Some(Mechanism::CardOnly), ..begin_req(T) };
    assert!(matches!(b.gw.begin(&agent(), req).await.unwrap(), Begin::CertificateNeeded(Slot::CardAuthentication)));
    let cert = card_profile().certificates[&CardSlot::CardAuthentication].clone();
    let req = BeginRequest { mechanism: Some(Mechanism::CardOnly), certificate: Some(cert.clone()), ..begin_req(T) };
    let Begin::Challenge { id, message, mechanism, .. } = b.gw.begin(&agent(), req).await.unwrap() else { panic!("no challenge") };
    assert_eq!(mechanism, Mechanism::CardOnly);
    // Not kept on the agent's word alone.
    assert!(!b.gw.store.card(&uuid()).unwrap().unwrap().certificates.contains_key(&Slot::CardAuthentication));
    assert!(denied(&b.gw.complete(&agent(), &id, T, &card_signs(&message, mechanism)).await.unwrap()).is_none());
    assert_eq!(b.gw.store.card(&uuid()).unwrap().unwrap().certificates.get(&Slot::CardAuthentication), Some(&cert));
}

#[tokio::test]
async fn a_9e_signature_where_the_pin_was_asked_is_a_policy_violation() {
    let b = bench(|_| {}).await;
    b.gw.enrol_card(&admin(), "op-1", &card_profile().certificates[&CardSlot::CardAuthentication], Slot::CardAuthentication, None).await.unwrap();
    let Begin::Challenge { id, message, mechanism, .. } = b.gw.begin(&agent(), begin_req(T)).await.unwrap() else { panic!() };
    assert_eq!(mechanism, Mechanism::CardAndPin);
    let sig = card_signs(&message, Mechanism::CardOnly);
    assert_eq!(denied(&b.gw.complete(&agent(), &id, T, &sig).await.unwrap()), Some(Deny::MechanismNotAllowed));
    assert!(locked_for(&b).is_some());
}

#[tokio::test]
async fn the_card_removed_locks_only_for_that_card() {
    let b = bench(|_| {}).await;
    assert!(denied(&tap(&b).await).is_none());
    assert!(!b.gw.card_removed(&agent(), T, Some([9; 16])).await.unwrap(), "another card's removal locked");
    assert_eq!(locked_for(&b), None);
    assert!(b.gw.card_removed(&agent(), T, Some(uuid())).await.unwrap());
    assert_eq!(locked_for(&b), Some(LockReason::CardRemoved));
}

#[test]
fn refusals_map_to_the_lock_reasons_consoles_see() {
    use crate::authorize::lock_reason;
    assert_eq!(lock_reason(Deny::CrlStale, false), None, "a stale CRL must not lock a control room");
    assert_eq!(lock_reason(Deny::RevokedCrl, false), Some(LockReason::CertificateRevoked));
    assert_eq!(lock_reason(Deny::RevokedDenyList, false), Some(LockReason::Revoked));
    assert_eq!(lock_reason(Deny::OperatorDisabled, false), Some(LockReason::Revoked));
    assert_eq!(lock_reason(Deny::CertExpired, false), Some(LockReason::CertificateExpired));
    assert_eq!(lock_reason(Deny::TerminalNotBound, false), Some(LockReason::Administrator));
    assert_eq!(lock_reason(Deny::NotAuthorized, false), Some(LockReason::RoleRemoved));
    assert_eq!(lock_reason(Deny::NotAuthorized, true), Some(LockReason::PolicyChanged));
    assert_eq!(lock_reason(Deny::MechanismNotAllowed, false), Some(LockReason::PolicyChanged));
}

#[tokio::test]
async fn the_presence_stream_pushes_locks_of_its_own_terminals_only() {
    use crate::feed::Live;
    let b = bench(|_| {}).await;
    b.gw.bind_agent(&admin(), "pi-2", vec!["vault".into()]).await.unwrap();
    let ev = |t: &str, session: Session| Event { sequence: 1, unix_ms: 0, terminal_id: t.into(), session };
    let locked = Session::Locked { reason: LockReason::Administrator, since_ms: 0, sequence: 1 };
    assert_eq!(b.gw.presence_push("pi-1", Live::Event(&ev(T, locked.clone()))).unwrap(), Some(vec![T.to_string()]));
    assert_eq!(b.gw.presence_push("pi-1", Live::Event(&ev("vault", locked))).unwrap(), None, "another agent's terminal was pushed");
    let Complete::Granted { .. } = tap(&b).await else { panic!() };
    assert_eq!(b.gw.presence_push("pi-1", Live::Event(&ev(T, session(&b)))).unwrap(), None, "an unlock was pushed as a lock");
    // After missed events: every locked terminal it serves, not the
    // unlocked one.
    assert_eq!(b.gw.presence_push("pi-1", Live::Lagged).unwrap(), Some(vec!["lobby".to_string()]));
}

#[tokio::test]
async fn a_service_certificate_is_issued_for_its_role_and_name_and_audited() {
    let b = bench(|_| {}).await;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    use rcgen::PublicKeyData;
    let Issued::Certificate { certificate_pem: cert, ca_pem: ca } =
        b.gw.issue_certificate(&admin(), Role::Agent, "pi-7", &key.subject_public_key_info(), 30).await.unwrap()
    else {
        panic!("an agent certificate needs no approval")
    };
    assert!(ca.contains("BEGIN CERTIFICATE"));
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert.as_bytes()).unwrap();
    let x = pem.parse_x509().unwrap();
    let san = format!("{:?}", x.subject_alternative_name().unwrap().unwrap().value);
    assert!(san.contains("urn:pivgate:agent:pi-7"), "{san}");
    let (head, _) = b.gw.store.audit_head().unwrap();
    assert_eq!(b.gw.store.audit_after(head - 1, 1).unwrap()[0].kind, AuditKind::IssueCertificate.as_str());
}

#[tokio::test]
async fn the_metrics_count_grants_and_denials_by_reason() {
    let b = bench(|_| {}).await;
    assert!(denied(&tap(&b).await).is_none());
    let (id, sig) = signed(&b, T).await;
    b.gw.complete(&agent(), &id, T, &sig).await.unwrap();
    b.gw.complete(&agent(), &id, T, &sig).await.unwrap();
    let text = crate::metrics::render(&b.gw);
    assert!(text.contains("pivgate_authentications_total{outcome=\"granted\"} 2"), "{text}");
    assert!(text.contains("pivgate_authentications_total{outcome=\"denied\",reason=\"challenge_replayed\"} 1"), "{text}");
    assert!(text.contains("pivgate_unlocked_terminals 1"), "{text}");
}

#[tokio::test]
async fn a_stale_crl_leaves_a_session_standing_but_hides_no_role_taken_away() {
    let b = bench(|c| {
        c.cards.crl_strict = true;
        c.agent_grace_s = 100_000;
    })
    .await;
    let now = time::OffsetDateTime::now_utc();
    let crl = issuer().crl(&[], now - time::Duration::minutes(1), now + time::Duration::hours(1), 1).unwrap();
    let report = b.gw.offer_crls(vec![("test".into(), Ok(vec![crl]))]).await.unwrap();
    assert_eq!(report.installed, 1, "{:?}", report.refused);
    let two = Operator { id: "op-1".into(), name: "Op One".into(), roles: vec!["dispatcher".into(), "supervisor".into()], enabled: true };
    b.gw.add_operator(&admin(), two).await.unwrap();
    assert!(denied(&tap(&b).await).is_none());
    // The issuer is down: the CRL goes stale. New taps are refused, the
    // session stands.
    b.clock.advance(Duration::from_secs(2 * 3600));
    let Begin::Denied(d, _) = b.gw.begin(&agent(), begin_req(T)).await.unwrap() else { panic!("a tap began on a stale CRL") };
    assert_eq!(d, Deny::CrlStale);
    b.gw.reauthorize_sessions("test").await.unwrap();
    assert_eq!(locked_for(&b), None, "a stale CRL locked a control room");
    // A role the session carries is taken away: it ends, stale CRL or not.
    b.gw.add_operator(&admin(), Operator { id: "op-1".into(), name: "Op One".into(), roles: vec!["dispatcher".into()], enabled: true }).await.unwrap();
    assert_eq!(locked_for(&b), Some(LockReason::RoleRemoved));
}

#[tokio::test]
async fn an_agent_learns_nothing_of_cards_at_a_terminal_it_does_not_serve() {
    let b = bench(|_| {}).await;
    let fascn = card_profile().chuid.fascn.map(|f| f.0.to_vec()).expect("the test card has a FASC-N");
    // The enrolled card's FASC-N with another UUID: at its own terminal an
    // identity mismatch, at a terminal it does not serve nothing but that.
    let probe = |terminal: &str| BeginRequest { card_uuid: Some([7; 16]), fascn: Some(fascn.clone()), ..begin_req(terminal) };
    let Begin::Denied(d, _) = b.gw.begin(&agent(), probe(T)).await.unwrap() else { panic!() };
    assert_eq!(d, Deny::IdentityMismatch);
    let Begin::Denied(d, _) = b.gw.begin(&agent(), probe("vault")).await.unwrap() else { panic!() };
    assert_eq!(d, Deny::TerminalNotBound);
}

/// An enterprise CA whose cards are known by their key, and certificates
/// from it with no card UUID (a smart-card logon certificate's shape).
fn enterprise() -> &'static IssuingCa {
    static CA: std::sync::OnceLock<IssuingCa> = std::sync::OnceLock::new();
    CA.get_or_init(|| IssuingCa::generate("unit test enterprise smart card CA").unwrap())
}

fn enterprise_cert(key: &pivgate_vcard::CardKey, slot: CardSlot) -> Vec<u8> {
    enterprise()
        .issue_with(slot, &key.spki_der().unwrap(), &card_profile().chuid, "op17@corp.example", pivgate_vcard::Validity::days(30), |p| {
            p.custom_extensions.retain(|e| e.oid_components().collect::<Vec<_>>() != [2, 5, 29, 17]);
        })
        .unwrap()
}

async fn enterprise_bench() -> Bench {
    bench(|c| {
        let anchor = c.data_dir.with_file_name("enterprise.pem");
        std::fs::write(&anchor, &enterprise().cert_pem).unwrap();
        c.cards.enrolled_key_anchors = vec![anchor];
    })
    .await
}

fn new_key() -> pivgate_vcard::CardKey {
    Profile::generate(&ProfileOptions::default()).unwrap().card().contents().keys[&CardSlot::Authentication].clone()
}

/// A token holding `key` in 9A signs `message` after its PIN.
fn token_signs(key: &pivgate_vcard::CardKey, message: &[u8]) -> Vec<u8> {
    let mut contents = pivgate_vcard::CardContents::blank(1);
    contents.keys.insert(CardSlot::Authentication, key.clone());
    let mut card = pivgate_vcard::VirtualCard::new(contents);
    let mut piv = PivClient::new(&mut card);
    piv.select().unwrap();
    piv.verify_pin(&pivgate_hw::Pin::new(b"123456").unwrap()).unwrap();
    piv.sign(CardSlot::Authentication, Algorithm::EccP256, &sha2::Sha256::digest(message)).unwrap()
}

#[tokio::test]
async fn an_enrolled_key_card_is_its_key_and_a_slot_never_changes_key_silently() {
    let b = enterprise_bench().await;
    let (k9a, k9e, other) = (new_key(), new_key(), new_key());
    let cert = enterprise_cert(&k9a, CardSlot::Authentication);
    assert!(verify::inspect(&cert).unwrap().uuid.is_none());
    let card = b.gw.enrol_card(&admin(), "op-1", &cert, Slot::PivAuthentication, None).await.unwrap();
    assert_eq!(card.identity, IdentityRule::EnrolledKey);
    assert_eq!(card.uuid, crate::model::enrolled_key_id(&k9a.spki_der().unwrap()));
    assert_eq!(card.fascn, None);
    // A renewed certificate for the same key names the same card.
    let renewed = enterprise_cert(&k9a, CardSlot::Authentication);
    assert_ne!(renewed, cert);
    assert_eq!(b.gw.enrol_card(&admin(), "op-1", &renewed, Slot::PivAuthentication, None).await.unwrap().uuid, card.uuid);
    // Its 9E key joins it only when the administrator names the card.
    let nine_e = enterprise_cert(&k9e, CardSlot::CardAuthentication);
    let joined = b.gw.enrol_card(&admin(), "op-1", &nine_e, Slot::CardAuthentication, Some(card.uuid)).await.unwrap();
    assert_eq!((joined.uuid, joined.certificates.len()), (card.uuid, 2));
    // Another key for an enrolled slot is another card, never a re-binding.
    let swap = enterprise_cert(&other, CardSlot::Authentication);
    let e = b.gw.enrol_card(&admin(), "op-1", &swap, Slot::PivAuthentication, Some(card.uuid)).await.unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e}");
    // A key enrolled for one card cannot be claimed for another.
    let e = b.gw.enrol_card(&admin(), "op-1", &cert, Slot::PivAuthentication, Some([9; 16])).await.unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e}");
    // The card-only key must not be the PIN key.
    let same = enterprise_cert(&k9a, CardSlot::CardAuthentication);
    let fresh = b.gw.enrol_card(&admin(), "op-1", &enterprise_cert(&new_key(), CardSlot::Authentication), Slot::PivAuthentication, None).await.unwrap();
    let e = b.gw.enrol_card(&admin(), "op-1", &same, Slot::CardAuthentication, Some(fresh.uuid)).await.unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_) | Error::InvalidRequest(_)), "{e}");
    // Under the FIPS 201 rule the same kind of certificate is refused, with
    // the way out in the message.
    let fips = bench(|c| {
        let anchor = c.data_dir.with_file_name("enterprise.pem");
        std::fs::write(&anchor, &enterprise().cert_pem).unwrap();
        c.cards.trust_anchors.push(anchor);
    })
    .await;
    let e = fips.gw.enrol_card(&admin(), "op-1", &cert, Slot::PivAuthentication, None).await.unwrap_err();
    assert!(e.to_string().contains("enrolled_key_anchors"), "{e}");
}

#[tokio::test]
async fn an_enrolled_key_card_is_found_by_its_key_and_proves_with_it() {
    let b = enterprise_bench().await;
    let key = new_key();
    let cert = enterprise_cert(&key, CardSlot::Authentication);
    let card = b.gw.enrol_card(&admin(), "op-1", &cert, Slot::PivAuthentication, None).await.unwrap();
    // No CHUID, not met: the gateway asks for the certificate.
    let unnamed = BeginRequest { card_uuid: None, ..begin_req(T) };
    assert!(matches!(b.gw.begin(&agent(), unnamed.clone()).await.unwrap(), Begin::CertificateNeeded(Slot::PivAuthentication)));
    // A CHUID GUID is only a hint: it names no enrolled-key card.
    let guid = BeginRequest { card_uuid: Some([0x42; 16]), ..begin_req(T) };
    assert!(matches!(b.gw.begin(&agent(), guid).await.unwrap(), Begin::CertificateNeeded(_)));
    let offered = BeginRequest { certificate: Some(cert.clone()), ..unnamed.clone() };
    let Begin::Challenge { id, message, .. } = b.gw.begin(&agent(), offered).await.unwrap() else { panic!("no challenge") };
    let m = pivgate_proto::card_message::parse(&message).unwrap();
    assert_eq!(m.card_uuid, card.uuid, "bound to the card's id, not a GUID");
    let sig = token_signs(&key, &message);
    assert!(matches!(b.gw.complete(&agent(), &id, T, &sig).await.unwrap(), Complete::Granted { .. }));
    // Known by its id afterwards; another key claiming it signs in vain.
    let Begin::Challenge { id, message, .. } = b.gw.begin(&agent(), BeginRequest { card_uuid: Some(card.uuid), ..unnamed.clone() }).await.unwrap() else {
        panic!("no challenge by id")
    };
    let impostor = new_key();
    let sig = token_signs(&impostor, &message);
    assert!(matches!(b.gw.complete(&agent(), &id, T, &sig).await.unwrap(), Complete::Denied(Deny::BadSignature, _)));
    // The impostor's own certificate, from the same CA, names no card.
    let theirs = enterprise_cert(&impostor, CardSlot::Authentication);
    let Begin::Denied(d, _) = b.gw.begin(&agent(), BeginRequest { certificate: Some(theirs), ..unnamed }).await.unwrap() else {
        panic!("an unenrolled key began")
    };
    assert_eq!(d, Deny::UnknownCard);
}

#[tokio::test]
async fn one_key_is_one_card_and_a_renewed_certificate_on_the_card_is_judged_for_itself() {
    let b = enterprise_bench().await;
    let key = new_key();
    let cert = enterprise_cert(&key, CardSlot::Authentication);
    let card = b.gw.enrol_card(&admin(), "op-1", &cert, Slot::PivAuthentication, None).await.unwrap();
    // The same key under a FIPS 201 certificate naming another card UUID.
    let elsewhere =
        Profile::generate_with_ca(IssuingCa { cert_pem: issuer().cert_pem.clone(), key_pem: issuer().key_pem.clone() }, &ProfileOptions::default()).unwrap();
    let other = issuer().issue_for_spki(CardSlot::Authentication, &key.spki_der().unwrap(), &elsewhere.chuid, "op", pivgate_vcard::Validity::days(30)).unwrap();
    let e = b.gw.enrol_card(&admin(), "op-1", &other, Slot::PivAuthentication, None).await.unwrap_err();
    assert!(matches!(e, Error::AlreadyExists(_)), "{e}");
    // The card holds a renewed certificate for its enrolled key: the
    // challenge names that certificate (the agent read it), and the proof
    // with the same key unlocks; the enrolled certificate is unchanged.
    let renewed = enterprise_cert(&key, CardSlot::Authentication);
    let req = BeginRequest { card_uuid: None, certificate: Some(renewed.clone()), ..begin_req(T) };
    let Begin::Challenge { id, message, .. } = b.gw.begin(&agent(), req).await.unwrap() else { panic!("no challenge") };
    let m = pivgate_proto::card_message::parse(&message).unwrap();
    assert_eq!(m.certificate_sha256, <[u8; 32]>::from(sha2::Sha256::digest(&renewed)));
    assert_eq!(m.card_uuid, card.uuid);
    let sig = token_signs(&key, &message);
    assert!(matches!(b.gw.complete(&agent(), &id, T, &sig).await.unwrap(), Complete::Granted { .. }));
    assert_eq!(b.gw.store.card(&card.uuid).unwrap().unwrap().certificates[&Slot::PivAuthentication], cert);
    // Revoking an id no card has is refused, not "revoked".
    let e = b.gw.revoke_card(&admin(), [0x42; 16], "lost").await.unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
}

#[tokio::test]
async fn a_suspended_card_locks_at_once_is_refused_and_works_again_once_resumed() {
    let b = bench(|_| {}).await;
    assert!(denied(&tap(&b).await).is_none());
    let locked = b.gw.suspend_card(&admin(), uuid(), true, "found in the car park, checking").await.unwrap();
    assert_eq!(locked, [T.to_string()]);
    assert_eq!(locked_for(&b), Some(LockReason::CardSuspended));
    let Begin::Denied(d, _) = b.gw.begin(&agent(), begin_req(T)).await.unwrap() else { panic!("a suspended card began") };
    assert_eq!(d, Deny::CardSuspended);
    b.gw.suspend_card(&admin(), uuid(), false, "it was in the car park").await.unwrap();
    assert!(denied(&tap(&b).await).is_none(), "a resumed card is refused");
    let kinds: Vec<String> = b.gw.store.audit_after(0, 1000).unwrap().into_iter().map(|r| r.kind).collect();
    assert!(kinds.contains(&"admin.suspend_card".to_string()) && kinds.contains(&"admin.resume_card".to_string()), "{kinds:?}");
    assert!(matches!(b.gw.suspend_card(&admin(), [9; 16], true, "x").await, Err(Error::NotFound(_))));
}

#[tokio::test]
async fn a_temporary_card_is_refused_after_its_end_and_its_session_locks() {
    let b = bench(|_| {}).await;
    let der = card_profile().certificates[&CardSlot::Authentication].clone();
    let temporary = |days| Enrolment {
        operator_id: "op-1",
        certificate: &der,
        slot: Slot::PivAuthentication,
        to_card: None,
        attestation: None,
        dry_run: false,
        temporary_days: days,
    };
    assert!(matches!(b.gw.enrol(&admin(), &temporary(15)).await, Err(Error::InvalidRequest(_))), "past cards.max_temporary_days");
    let card = b.gw.enrol(&admin(), &temporary(1)).await.unwrap();
    assert!(card.expires_ms.is_some());
    assert!(denied(&tap(&b).await).is_none());
    b.clock.advance(Duration::from_secs(86_400 + 1));
    b.gw.reauthorize_sessions("test").await.unwrap();
    assert_eq!(locked_for(&b), Some(LockReason::CardExpired));
    let Begin::Denied(d, _) = b.gw.begin(&agent(), begin_req(T)).await.unwrap() else { panic!("an expired temporary card began") };
    assert_eq!(d, Deny::CardExpired);
}

// ---- lifecycle: enrolment windows, approvals, replacement ----

fn service_key() -> Vec<u8> {
    use rcgen::PublicKeyData;
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap().subject_public_key_info()
}

fn names(pem: &str) -> String {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let x = pem.parse_x509().unwrap();
    format!("{:?}", x.subject_alternative_name().unwrap().unwrap().value)
}

#[tokio::test]
async fn past_the_bootstrap_pair_no_administrator_makes_an_administrator_alone() {
    let b = bench(|_| {}).await;
    let issue = |by: &'static str, name: &'static str, key: Vec<u8>| {
        let gw = b.gw.clone();
        async move { gw.issue_certificate(&admin_named(by), Role::Admin, name, &key, 30).await }
    };
    // The bootstrap pair is two people: the first administrator cannot
    // make their own second identity.
    assert!(matches!(issue("root", "root", service_key()).await, Err(Error::InvalidRequest(_))));
    let Issued::Certificate { certificate_pem, .. } = issue("root", "second", service_key()).await.unwrap() else { panic!("the bootstrap pair") };
    assert!(names(&certificate_pem).contains("urn:pivgate:admin:second"));

    // The attack: root mints another identity to approve its own requests
    // with. It gets a request, not a certificate, however often it asks.
    let key = service_key();
    let Issued::Pending(r) = issue("root", "mallory", key.clone()).await.unwrap() else { panic!("issued alone") };
    let Issued::Pending(again) = issue("root", "mallory", key.clone()).await.unwrap() else { panic!("issued alone") };
    assert_eq!(again.id, r.id, "asking again is the same request");
    assert!(r.kind.summary().contains(&hex::encode(sha2::Sha256::digest(&key))), "the approver sees the key: {}", r.kind.summary());
    // Neither the asker nor the one it names approves it.
    assert!(matches!(b.gw.approve(&admin(), r.id, None).await, Err(Error::PermissionDenied(_))));
    assert!(matches!(b.gw.approve(&admin_named("mallory"), r.id, None).await, Err(Error::PermissionDenied(_))));
    b.gw.approve(&admin_named("second"), r.id, None).await.unwrap();
    // Approved for root, for that key: another asker, or another key, is a
    // new request.
    assert!(matches!(issue("second", "mallory", key.clone()).await.unwrap(), Issued::Pending(o) if o.id != r.id));
    assert!(matches!(issue("root", "mallory", service_key()).await.unwrap(), Issued::Pending(o) if o.id != r.id));
    // The asker gets it, once, and the log says who approved.
    let Issued::Certificate { certificate_pem, .. } = issue("root", "mallory", key.clone()).await.unwrap() else { panic!("approved") };
    assert!(names(&certificate_pem).contains("urn:pivgate:admin:mallory"));
    let (head, _) = b.gw.store.audit_head().unwrap();
    let rec = b.gw.store.audit_after(head - 1, 1).unwrap().remove(0);
    assert_eq!((rec.kind.as_str(), rec.detail["approved_by"].as_str()), (AuditKind::IssueCertificate.as_str(), Some("admin:second")));
    assert!(matches!(issue("root", "mallory", key).await.unwrap(), Issued::Pending(o) if o.id != r.id), "one approval, one certificate");
    let admins: Vec<_> = b.gw.store.admins().unwrap().into_iter().map(|a| (a.name, a.approved_by)).collect();
    assert_eq!(admins, vec![("mallory".into(), Some("admin:second".into())), ("second".into(), None)]);
}

/// Another FIPS 201 card from the test issuer, not enrolled.
fn other_card() -> Profile {
    let ca = IssuingCa { cert_pem: issuer().cert_pem.clone(), key_pem: issuer().key_pem.clone() };
    Profile::generate_with_ca(ca, &ProfileOptions { algorithm: Algorithm::EccP256, ..Default::default() }).unwrap()
}

fn admin_named(name: &str) -> Caller {
    Caller { role: Role::Admin, name: name.into() }
}

fn nine_a(p: &Profile) -> Vec<u8> {
    p.certificates[&CardSlot::Authentication].clone()
}

/// A tap of `p` at `terminal` as the agent makes it: the hint, then the
/// certificate when asked; the card signs what the challenge asks.
async fn tap_with(b: &Bench, p: &Profile, terminal: &str) -> Complete {
    tap_for(b, p, terminal, None).await.1
}

/// [`tap_with`] for a step-up (or not): also the message the card signed.
async fn tap_for(b: &Bench, p: &Profile, terminal: &str, step_up: Option<[u8; 16]>) -> (Vec<u8>, Complete) {
    let mut req = BeginRequest { terminal: terminal.into(), card_uuid: Some(p.chuid.guid), fascn: None, certificate: None, mechanism: None, step_up };
    loop {
        match b.gw.begin(&agent(), req.clone()).await.unwrap() {
            Begin::Challenge { id, message, mechanism, .. } => {
                let sig = profile_signs(p, &message, mechanism);
                return (message.clone(), b.gw.complete(&agent(), &id, terminal, &sig).await.unwrap());
            }
            Begin::CertificateNeeded(slot) if req.certificate.is_none() => {
                req.certificate =
                    Some(p.certificates[&if slot == Slot::PivAuthentication { CardSlot::Authentication } else { CardSlot::CardAuthentication }].clone())
            }
            Begin::CertificateNeeded(s) => panic!("{s:?} asked for twice"),
            Begin::Denied(d, why) => return (vec![], Complete::Denied(d, why)),
        }
    }
}

fn window<'a>(terminal: &'a str, operator_id: &'a str) -> crate::lifecycle::WindowAsk<'a> {
    crate::lifecycle::WindowAsk { terminal, operator_id, duration_s: 120, replaces: None, temporary_days: 0 }
}

#[tokio::test]
async fn a_card_tapped_into_an_enrolment_window_is_enrolled_after_its_pin_proof_once() {
    let b = bench(|_| {}).await;
    let new = other_card();
    b.gw.open_enrolment(&admin(), &window(T, "op-1")).await.unwrap();
    // Asked for its PIN key's certificate, whatever the terminal prefers.
    let req = BeginRequest { card_uuid: Some(new.chuid.guid), ..begin_req(T) };
    assert!(matches!(b.gw.begin(&agent(), req).await.unwrap(), Begin::CertificateNeeded(Slot::PivAuthentication)));
    let Complete::Enrolled { card, operator } = tap_with(&b, &new, T).await else { panic!("not enrolled") };
    assert_eq!((card.uuid, operator.id.as_str()), (new.chuid.guid, "op-1"));
    assert!(card.history.iter().any(|n| n.what.contains("card and PIN")), "{:?}", card.history);
    assert!(matches!(session(&b), Session::Locked { .. }), "an enrolment unlocked the terminal");
    // One use: the next unknown card is just unknown.
    assert!(b.gw.store.window(T).unwrap().is_none());
    assert_eq!(denied(&tap_with(&b, &other_card(), T).await), Some(Deny::UnknownCard));
    // The enrolled card unlocks with its next tap.
    assert!(matches!(tap_with(&b, &new, T).await, Complete::Granted { .. }));
    let kinds: Vec<String> = b.gw.store.audit_after(0, 1000).unwrap().into_iter().map(|r| r.kind).collect();
    assert!(kinds.contains(&"admin.open_enrolment".into()) && kinds.contains(&"enrol.at_terminal".into()), "{kinds:?}");
}

#[tokio::test]
async fn an_enrolment_window_takes_only_the_pin_key_only_in_time_and_only_where_it_was_opened() {
    let b = bench(|_| {}).await;
    let new = other_card();
    b.gw.open_enrolment(&admin(), &window(T, "op-1")).await.unwrap();
    // Elsewhere: unknown.
    assert_eq!(denied(&tap_with(&b, &new, "lobby").await), Some(Deny::UnknownCard));
    // The card-only key (no PIN) answering the enrolment's challenge.
    let req = BeginRequest { card_uuid: Some(new.chuid.guid), certificate: Some(nine_a(&new)), ..begin_req(T) };
    let Begin::Challenge { id, message, mechanism, .. } = b.gw.begin(&agent(), req.clone()).await.unwrap() else { panic!("no challenge") };
    assert_eq!(mechanism, Mechanism::CardAndPin);
    let sig = profile_signs(&new, &message, Mechanism::CardOnly);
    assert_eq!(denied(&b.gw.complete(&agent(), &id, T, &sig).await.unwrap()), Some(Deny::BadSignature));
    assert!(b.gw.store.card(&new.chuid.guid).unwrap().is_none());
    // A card-only reader cannot enrol.
    let card_only = BeginRequest { mechanism: Some(Mechanism::CardOnly), ..req.clone() };
    assert!(matches!(b.gw.begin(&agent(), card_only).await.unwrap(), Begin::Denied(Deny::MechanismNotAllowed, _)));
    // A challenge issued while the window was open, answered after it
    // closed.
    let Begin::Challenge { id, message, .. } = b.gw.begin(&agent(), req).await.unwrap() else { panic!("no challenge") };
    assert!(b.gw.close_enrolment(&admin(), T).await.unwrap());
    let sig = profile_signs(&new, &message, Mechanism::CardAndPin);
    assert_eq!(denied(&b.gw.complete(&agent(), &id, T, &sig).await.unwrap()), Some(Deny::EnrolmentRefused));
    // Past its time.
    b.gw.open_enrolment(&admin(), &window(T, "op-1")).await.unwrap();
    b.clock.advance(Duration::from_secs(121));
    assert_eq!(denied(&tap_with(&b, &new, T).await), Some(Deny::UnknownCard));
    assert!(b.gw.store.card(&new.chuid.guid).unwrap().is_none());
    // Bounded.
    let long = crate::lifecycle::WindowAsk { duration_s: 7200, ..window(T, "op-1") };
    assert!(matches!(b.gw.open_enrolment(&admin(), &long).await, Err(Error::InvalidRequest(_))));
    assert!(matches!(b.gw.open_enrolment(&admin(), &window(T, "nobody")).await, Err(Error::NotFound(_))));
}

#[tokio::test]
async fn failed_proofs_in_an_enrolment_window_are_slowed_without_locking_its_operator_out() {
    let b = bench(|c| {
        c.lifecycle.free_failures = 1;
        c.lifecycle.lockout_after = 2;
    })
    .await;
    let new = other_card();
    b.gw.open_enrolment(&admin(), &window(T, "op-1")).await.unwrap();
    let req = BeginRequest { card_uuid: Some(new.chuid.guid), certificate: Some(nine_a(&new)), ..begin_req(T) };
    // The attack: a card whose PIN the holder does not know (it signs with
    // another key), again and again.
    for _ in 0..2 {
        let Begin::Challenge { id, message, .. } = b.gw.begin(&agent(), req.clone()).await.unwrap() else { panic!("no challenge") };
        let sig = profile_signs(&new, &message, Mechanism::CardOnly);
        assert_eq!(denied(&b.gw.complete(&agent(), &id, T, &sig).await.unwrap()), Some(Deny::BadSignature));
        b.clock.advance(Duration::from_millis(10));
    }
    assert!(matches!(b.gw.begin(&agent(), req.clone()).await.unwrap(), Begin::Denied(Deny::Throttled, _)));
    // The window's operator is not locked out by a stranger's card.
    assert!(b.gw.store.lockout("op-1").unwrap().is_none());
    b.clock.advance(Duration::from_secs(60));
    assert!(matches!(tap_with(&b, &new, T).await, Complete::Enrolled { .. }));
}

#[tokio::test]
async fn where_pin_keys_must_be_attested_no_enrolment_window_opens() {
    let b = bench(|_| {}).await;
    let anchor = b.dir.join("issuer.pem");
    let mut config = Config { data_dir: b.dir.join("attested"), ..Config::default() };
    config.cards.trust_anchors = vec![anchor.clone()];
    config.cards.attestation_roots = vec![anchor];
    config.cards.require_attested_pin_key = true;
    let (gw, _, _) = crate::open_with(&config, Box::new(TestClock::new()), Box::new(Counter(AtomicU64::new(0)))).unwrap();
    gw.add_operator(&admin(), Operator { id: "op-1".into(), name: "Op One".into(), roles: vec![], enabled: true }).await.unwrap();
    let e = gw.open_enrolment(&admin(), &window(T, "op-1")).await.unwrap_err();
    assert!(matches!(e, Error::Precondition(ref m) if m.contains("attestation")), "{e}");
    assert!(gw.store.window(T).unwrap().is_none());
}

async fn privileged_bench(badge: bool) -> Bench {
    let b = bench(|c| {
        c.lifecycle.privileged_roles = vec!["intercom-admin".into()];
        if badge {
            c.lifecycle.approval = crate::config::ApprovalProof::Badge;
        }
    })
    .await;
    b.gw.add_operator(&admin(), Operator { id: "op-2".into(), name: "Op Two".into(), roles: vec!["intercom-admin".into()], enabled: true }).await.unwrap();
    b
}

fn open_request(b: &Bench) -> crate::model::Request {
    let now = b.gw.now_ms();
    let open: Vec<_> = b.gw.store.requests().unwrap().into_iter().filter(|r| r.open(now)).collect();
    assert_eq!(open.len(), 1, "{open:?}");
    open.into_iter().next().unwrap()
}

#[tokio::test]
async fn a_privileged_card_waits_for_a_second_administrator_who_is_neither_the_asker_nor_its_operator() {
    let b = privileged_bench(false).await;
    let new = other_card();
    let card = b.gw.enrol_card(&admin(), "op-2", &nine_a(&new), Slot::PivAuthentication, None).await.unwrap();
    assert!(card.pending.is_some() && card.approval.is_none());
    assert_eq!(denied(&tap_with(&b, &new, T).await), Some(Deny::CardPending));
    let r = open_request(&b);
    assert_eq!(r.requested_by, admin().to_string());
    let e = b.gw.approve(&admin(), r.id, None).await.unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(ref m) if m.contains("own request")), "{e}");
    let e = b.gw.approve(&admin_named("op-2"), r.id, None).await.unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(ref m) if m.contains("themselves")), "{e}");
    let approved = b.gw.approve(&admin_named("second"), r.id, None).await.unwrap();
    assert!(matches!(approved.state, crate::model::RequestState::Approved(ref a) if a.by == "admin:second"));
    assert!(matches!(tap_with(&b, &new, T).await, Complete::Granted { .. }));
    // Approved once: not twice.
    assert!(matches!(b.gw.approve(&admin_named("third"), r.id, None).await, Err(Error::InvalidRequest(_))));
    let rec = b.gw.store.audit_after(0, 1000).unwrap().into_iter().find(|r| r.kind == "admin.approve").unwrap();
    assert_eq!(rec.detail["requested_by"], "admin:root");
    assert_eq!(rec.actor, "admin:second");
}

#[tokio::test]
async fn a_privileged_role_given_later_suspends_the_cards_until_approved_and_a_new_key_needs_a_new_approval() {
    let b = privileged_bench(false).await;
    assert!(denied(&tap_with(&b, card_profile(), T).await).is_none());
    // op-1 made an intercom administrator: the session ends, the card waits.
    b.gw.add_operator(
        &admin(),
        Operator { id: "op-1".into(), name: "Op One".into(), roles: vec!["dispatcher".into(), "intercom-admin".into()], enabled: true },
    )
    .await
    .unwrap();
    assert!(locked_for(&b).is_some(), "a session of an unapproved privileged card stands");
    assert_eq!(denied(&tap_with(&b, card_profile(), T).await), Some(Deny::CardPending));
    let r = open_request(&b);
    b.gw.approve(&admin_named("second"), r.id, None).await.unwrap();
    assert!(denied(&tap_with(&b, card_profile(), T).await).is_none());
    // A 9E key joining the approved card: approved anew.
    b.gw.enrol_card(&admin(), "op-1", &card_profile().certificates[&CardSlot::CardAuthentication], Slot::CardAuthentication, None).await.unwrap();
    assert_eq!(denied(&tap_with(&b, card_profile(), T).await), Some(Deny::CardPending));
    let again = open_request(&b);
    assert_ne!(again.id, r.id);
    // Refused: still waiting for nobody, still refused.
    b.gw.refuse(&admin(), again.id, "not this week").await.unwrap();
    assert_eq!(denied(&tap_with(&b, card_profile(), T).await), Some(Deny::CardPending));
}

#[tokio::test]
async fn where_the_site_requires_it_an_approval_is_signed_by_the_approvers_own_badge() {
    let b = privileged_bench(true).await;
    b.gw.enrol_card(&admin(), "op-2", &nine_a(&other_card()), Slot::PivAuthentication, None).await.unwrap();
    let r = open_request(&b);
    // The certificate alone approves nothing.
    let e = b.gw.approve(&admin_named("second"), r.id, None).await.unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(ref m) if m.contains("badge")), "{e}");
    // The approver's badge: a card enrolled to the operator named as the
    // administrator.
    b.gw.add_operator(&admin(), Operator { id: "second".into(), name: "Second Admin".into(), roles: vec![], enabled: true }).await.unwrap();
    // The attack: a stolen approver certificate enrols the thief's card
    // as the approver's badge. A badge its holder enrolled proves nothing.
    let planted = other_card();
    b.gw.enrol_card(&admin_named("second"), "second", &nine_a(&planted), Slot::PivAuthentication, None).await.unwrap();
    let e = b.gw.begin_approval(&admin_named("second"), r.id, &nine_a(&planted)).err().unwrap();
    assert!(matches!(e, Error::PermissionDenied(ref m) if m.contains("another administrator enrolled")), "{e}");
    let badge = other_card();
    b.gw.enrol_card(&admin(), "second", &nine_a(&badge), Slot::PivAuthentication, None).await.unwrap();
    // Another operator's card is not this administrator's badge.
    let e = b.gw.begin_approval(&admin_named("second"), r.id, &nine_a(card_profile())).err().unwrap();
    assert!(matches!(e, Error::PermissionDenied(_)), "{e}");
    // A badge enrolled before who enrolled it was recorded could be a
    // planted one: refused until another administrator enrols it again.
    let mut legacy = b.gw.store.card(&badge.chuid.guid).unwrap().unwrap();
    legacy.key_enrolled_by.clear();
    let entry = crate::store::AuditEntry { kind: AuditKind::EnrolCard, actor: "test".into(), terminal_id: String::new(), detail: serde_json::json!({}) };
    b.gw.store.record(entry, vec![crate::store::Change::Card(legacy)], b.gw.now_ms()).unwrap();
    let e = b.gw.begin_approval(&admin_named("second"), r.id, &nine_a(&badge)).err().unwrap();
    assert!(matches!(e, Error::PermissionDenied(ref m) if m.contains("not on record")), "{e}");
    b.gw.enrol_card(&admin(), "second", &nine_a(&badge), Slot::PivAuthentication, None).await.unwrap();
    let c = b.gw.begin_approval(&admin_named("second"), r.id, &nine_a(&badge)).unwrap();
    let m = pivgate_proto::card_message::parse_approval(&c.message).unwrap();
    assert_eq!((m.approver, m.request_id), ("admin:second", r.id));
    assert!(m.summary.contains("op-2"), "{}", m.summary);
    // Signed by another key: refused, and the challenge is spent.
    let wrong = profile_signs(card_profile(), &c.message, Mechanism::CardAndPin);
    assert!(matches!(b.gw.approve(&admin_named("second"), r.id, Some((&c.id, &wrong))).await, Err(Error::PermissionDenied(_))));
    assert!(matches!(b.gw.approve(&admin_named("second"), r.id, Some((&c.id, &wrong))).await, Err(Error::PermissionDenied(_))));
    // Failed badge proofs count as the holder's: past the free ones the
    // next approval waits, and past lockout_after they lock the approver
    // out (of approving too).
    for _ in 0..9 {
        b.clock.advance(Duration::from_secs(400));
        let c = b.gw.begin_approval(&admin_named("second"), r.id, &nine_a(&badge)).unwrap();
        let wrong = profile_signs(card_profile(), &c.message, Mechanism::CardAndPin);
        assert!(b.gw.approve(&admin_named("second"), r.id, Some((&c.id, &wrong))).await.is_err());
    }
    assert!(b.gw.store.lockout("second").unwrap().is_some(), "ten failed badge proofs and no lockout");
    let e = b.gw.begin_approval(&admin_named("second"), r.id, &nine_a(&badge)).err().unwrap();
    assert!(matches!(e, Error::PermissionDenied(ref m) if m.contains("locked")), "{e}");
    // Not by the locked-out administrator themselves (a thief holding
    // their certificate).
    assert!(matches!(b.gw.lift_lockout(&admin_named("second"), "second", "me").await, Err(Error::PermissionDenied(_))));
    b.gw.lift_lockout(&admin(), "second", "checked").await.unwrap();
    let sig = profile_signs(&badge, &c.message, Mechanism::CardAndPin);
    assert!(matches!(b.gw.approve(&admin_named("second"), r.id, Some((&c.id, &sig))).await, Err(Error::PermissionDenied(_))), "a spent challenge");
    let c = b.gw.begin_approval(&admin_named("second"), r.id, &nine_a(&badge)).unwrap();
    // Another administrator cannot use the second's challenge.
    let sig = profile_signs(&badge, &c.message, Mechanism::CardAndPin);
    assert!(matches!(b.gw.approve(&admin_named("third"), r.id, Some((&c.id, &sig))).await, Err(Error::PermissionDenied(_))));
    let c = b.gw.begin_approval(&admin_named("second"), r.id, &nine_a(&badge)).unwrap();
    let sig = profile_signs(&badge, &c.message, Mechanism::CardAndPin);
    let approved = b.gw.approve(&admin_named("second"), r.id, Some((&c.id, &sig))).await.unwrap();
    assert!(matches!(approved.state, crate::model::RequestState::Approved(ref a) if a.badge == Some(badge.chuid.guid)));
    // An agent's tap challenge is no approval, and an approval's no tap.
    let Begin::Challenge { message, .. } = b.gw.begin(&agent(), begin_req(T)).await.unwrap() else { panic!() };
    assert!(pivgate_proto::card_message::parse_approval(&message).is_err());
    assert!(pivgate_proto::card_message::parse(&c.message).is_err());
}

#[tokio::test]
async fn a_replacement_card_works_at_once_and_the_old_one_is_revoked_in_the_same_step() {
    let b = bench(|_| {}).await;
    assert!(denied(&tap_with(&b, card_profile(), T).await).is_none());
    let new = other_card();
    let der = nine_a(&new);
    let e = Enrolment {
        operator_id: "op-1",
        certificate: &der,
        slot: Slot::PivAuthentication,
        to_card: None,
        attestation: None,
        dry_run: false,
        temporary_days: 0,
    };
    let (card, locked) = b.gw.replace_card(&admin(), uuid(), &e, "lost on the night shift").await.unwrap();
    assert_eq!(locked, [T.to_string()]);
    assert_eq!(locked_for(&b), Some(LockReason::Revoked));
    assert_eq!(denied(&tap_with(&b, card_profile(), T).await), Some(Deny::RevokedDenyList));
    assert!(matches!(tap_with(&b, &new, T).await, Complete::Granted { .. }));
    assert!(card.history.iter().any(|n| n.what.contains("replaces")), "{:?}", card.history);
    let old = b.gw.store.card(&uuid()).unwrap().unwrap();
    assert!(old.history.iter().any(|n| n.what.contains("replaced by")), "{:?}", old.history);
    // Only a card of the same operator, and only a live one.
    assert!(matches!(b.gw.replace_card(&admin(), uuid(), &e, "again").await, Err(Error::InvalidRequest(_))));
    let rec = b.gw.store.audit_after(0, 1000).unwrap().into_iter().find(|r| r.kind == "admin.replace_card").unwrap();
    assert_eq!(rec.detail["replaces"], uuid_text(&uuid()));
}

#[tokio::test]
async fn an_enrolment_window_can_replace_a_lost_card() {
    let b = bench(|_| {}).await;
    let new = other_card();
    let ask = crate::lifecycle::WindowAsk { replaces: Some(uuid()), temporary_days: 3, ..window(T, "op-1") };
    b.gw.open_enrolment(&admin(), &ask).await.unwrap();
    let Complete::Enrolled { card, .. } = tap_with(&b, &new, T).await else { panic!("not enrolled") };
    assert!(card.expires_ms.is_some(), "a temporary window's card is temporary");
    assert_eq!(denied(&tap_with(&b, card_profile(), T).await), Some(Deny::RevokedDenyList));
}

// ---- policy by group, idle timeout, hours, removal grace ----

fn app() -> Caller {
    Caller { role: Role::Application, name: "console-1".into() }
}

#[tokio::test]
async fn a_terminal_whose_agent_takes_no_pin_is_asked_no_step_up_and_only_its_agent_says_so() {
    let b = bench(|_| {}).await;
    assert!(denied(&tap(&b).await).is_none());
    b.gw.pin_entry(&agent(), T, false).unwrap();
    assert!(matches!(b.gw.ask_step_up(&app(), T, ACTION, &params(), Duration::from_secs(5)), Err(Error::Precondition(ref m)) if m.contains("no PIN")));
    // Another agent cannot mark it either way.
    let other = Caller { role: Role::Agent, name: "pi-9".into() };
    b.gw.pin_entry(&other, T, true).unwrap();
    assert!(matches!(b.gw.ask_step_up(&app(), T, ACTION, &params(), Duration::from_secs(5)), Err(Error::Precondition(_))));
    b.gw.pin_entry(&agent(), T, true).unwrap();
    assert!(b.gw.ask_step_up(&app(), T, ACTION, &params(), Duration::from_secs(5)).is_ok());
    // Bound anew, the terminal waits for what its agent says next.
    b.gw.pin_entry(&agent(), "lobby", false).unwrap();
    b.gw.bind_agent(&admin(), "pi-1", vec![T.into(), "lobby".into()]).await.unwrap();
    assert!(b.gw.no_pin_entry.lock().unwrap().is_empty());
}

#[tokio::test]
async fn once_applications_are_scoped_each_acts_only_on_its_terminals_and_groups() {
    let b = bench(|c| {
        c.applications.insert("intercom-panel".into(), crate::config::ApplicationScope { terminals: vec![], groups: vec!["intercom".into()] });
        c.applications.insert("console-1".into(), crate::config::ApplicationScope { terminals: vec![T.into()], groups: vec![] });
    })
    .await;
    assert!(denied(&tap(&b).await).is_none());
    let panel = Caller { role: Role::Application, name: "intercom-panel".into() };
    let stranger = Caller { role: Role::Application, name: "someone-else".into() };
    // The attack: another application hogs T's step-up slot, or keeps its
    // console awake with activity reports.
    for who in [&panel, &stranger] {
        assert!(matches!(b.gw.ask_step_up(who, T, ACTION, &params(), Duration::from_secs(5)), Err(Error::PermissionDenied(_))));
        assert!(matches!(b.gw.report_activity(who, T).await, Err(Error::PermissionDenied(_))));
        assert!(matches!(b.gw.redeem_step_up(who, &[0; 32], T, ACTION, &params()).await, Err(Error::PermissionDenied(_))));
    }
    // Its own terminal, by id or by group.
    assert!(b.gw.report_activity(&app(), T).await.is_ok());
    b.gw.set_group(&admin(), "intercom", TerminalPolicy::default()).await.unwrap();
    b.gw.assign_terminal(&admin(), T, Some("intercom")).await.unwrap();
    assert!(b.gw.report_activity(&panel, T).await.is_ok());
    assert!(b.gw.ask_step_up(&panel, T, ACTION, &params(), Duration::from_secs(5)).is_ok());
}

#[tokio::test]
async fn a_group_policy_reaches_its_terminals_at_once_and_a_terminal_of_its_own_is_listed_as_weaker() {
    let b = bench(|c| c.agent_grace_s = 600).await;
    assert!(denied(&tap(&b).await).is_none());
    let panels = TerminalPolicy { allowed_roles: vec!["intercom-admin".into()], idle_timeout_s: 900, ..Default::default() };
    b.gw.set_group(&admin(), "intercom-panels", panels.clone()).await.unwrap();
    b.gw.assign_terminal(&admin(), T, Some("intercom-panels")).await.unwrap();
    // op-1 (dispatcher) no longer may: the session ends with the change.
    assert_eq!(locked_for(&b), Some(LockReason::PolicyChanged));
    assert_eq!(denied(&tap_with(&b, card_profile(), T).await), Some(Deny::NotAuthorized));
    // The group opened to dispatchers: its terminal follows.
    b.gw.set_group(&admin(), "intercom-panels", TerminalPolicy { allowed_roles: vec!["dispatcher".into()], ..panels.clone() }).await.unwrap();
    assert!(denied(&tap(&b).await).is_none());
    let t = b.gw.store.terminal(T).unwrap().unwrap();
    assert!(t.policy.weaker_than(&b.gw.store.group("intercom-panels").unwrap().unwrap().policy).is_empty());
    // A policy of its own, card only: no longer the group's, and weaker.
    b.gw.set_policy(&admin(), T, TerminalPolicy { allowed_mechanisms: vec![Mechanism::CardOnly, Mechanism::CardAndPin], ..panels }).await.unwrap();
    let t = b.gw.store.terminal(T).unwrap().unwrap();
    assert!(t.custom_policy);
    assert!(!t.policy.weaker_than(&b.gw.store.group("intercom-panels").unwrap().unwrap().policy).is_empty());
    // Bounded: no session over 12 hours.
    let long = TerminalPolicy { max_session_s: 13 * 3600, ..Default::default() };
    assert!(matches!(b.gw.set_group(&admin(), "g", long).await, Err(Error::InvalidRequest(_))));
}

#[tokio::test]
async fn idle_timeout_locks_a_terminal_without_activity_and_not_one_with_it() {
    let b = bench(|c| c.agent_grace_s = 3600).await;
    b.gw.set_policy(&admin(), T, TerminalPolicy { idle_timeout_s: 60, ..Default::default() }).await.unwrap();
    assert!(denied(&tap(&b).await).is_none());
    // No application reports for it: only the maximum session holds.
    b.clock.advance(Duration::from_secs(120));
    b.gw.sweep().await.unwrap();
    assert_eq!(locked_for(&b), None, "idle-locked a terminal no application reports for");
    // Once reported for, activity keeps it open...
    b.gw.report_activity(&app(), T).await.unwrap();
    for _ in 0..3 {
        b.clock.advance(Duration::from_secs(50));
        b.gw.report_activity(&app(), T).await.unwrap();
        b.gw.sweep().await.unwrap();
        assert_eq!(locked_for(&b), None);
    }
    // ... and none for its timeout locks it.
    b.clock.advance(Duration::from_secs(61));
    b.gw.sweep().await.unwrap();
    assert_eq!(locked_for(&b), Some(LockReason::IdleTimeout));
    // The first report was recorded; the rest only moved the clock.
    let kinds: Vec<String> = b.gw.store.audit_after(0, 1000).unwrap().into_iter().map(|r| r.kind).collect();
    assert_eq!(kinds.iter().filter(|k| *k == "terminal.activity_reporting").count(), 1);
    // A flood is cut off, and an unknown terminal is refused.
    let mut refused = 0;
    for _ in 0..100 {
        refused += usize::from(b.gw.report_activity(&app(), T).await.is_err());
    }
    assert!(refused > 0, "100 reports at once were all taken");
    assert!(matches!(b.gw.report_activity(&Caller { name: "other".into(), ..app() }, "nowhere").await, Err(Error::NotFound(_))));
}

#[tokio::test]
async fn a_session_past_twelve_hours_locks_whatever_the_policy_says() {
    let b = bench(|c| c.agent_grace_s = 86_400).await;
    assert!(denied(&tap(&b).await).is_none());
    b.clock.advance(Duration::from_secs(12 * 3600 - 10));
    b.gw.sweep().await.unwrap();
    assert_eq!(locked_for(&b), None);
    b.clock.advance(Duration::from_secs(11));
    b.gw.sweep().await.unwrap();
    assert_eq!(locked_for(&b), Some(LockReason::MaxSession));
}

#[tokio::test]
async fn outside_its_hours_a_terminal_refuses_taps_and_its_session_ends() {
    let b = bench(|c| c.agent_grace_s = 86_400).await;
    // Open for the next hour of today (UTC), every day.
    let now_min = ((b.gw.now_ms() / 60_000) % 1440) as u16;
    let hours = crate::model::Hours { days: 0x7F, start_minute: now_min, end_minute: (now_min + 60) % 1440, utc_offset_minutes: 0 };
    b.gw.set_policy(&admin(), T, TerminalPolicy { hours: Some(hours), ..Default::default() }).await.unwrap();
    assert!(denied(&tap(&b).await).is_none());
    b.clock.advance(Duration::from_secs(3600 + 60));
    b.gw.sweep().await.unwrap();
    assert_eq!(locked_for(&b), Some(LockReason::OutsideHours));
    assert_eq!(denied(&tap_with(&b, card_profile(), T).await), Some(Deny::OutsideHours));
    // A day and a minute after the start, in its hours again.
    b.clock.advance(Duration::from_secs(23 * 3600));
    assert!(denied(&tap(&b).await).is_none());
}

#[test]
fn hours_count_days_and_night_shifts_in_the_sites_offset() {
    use crate::model::Hours;
    // 2026-12-02 was a Wednesday; 10:00 UTC.
    let wed_10 = 1_796_205_600_000i64;
    let office = Hours { days: 0b0011111, start_minute: 8 * 60, end_minute: 18 * 60, utc_offset_minutes: 0 };
    assert!(office.contains(wed_10));
    assert!(!office.contains(wed_10 + 9 * 3_600_000), "19:00");
    assert!(!office.contains(wed_10 + 3 * 86_400_000), "Saturday");
    // An offset moves the day: 10:00 UTC is 19:00 at +09:00.
    assert!(!Hours { utc_offset_minutes: 540, ..office }.contains(wed_10));
    // A night shift, Friday nights only: Friday 23:00 and Saturday 05:00 in, Saturday 23:00 out.
    let night = Hours { days: 1 << 4, start_minute: 22 * 60, end_minute: 6 * 60, utc_offset_minutes: 0 };
    let fri_23 = wed_10 + 2 * 86_400_000 + 13 * 3_600_000;
    assert!(night.contains(fri_23));
    assert!(night.contains(fri_23 + 6 * 3_600_000));
    assert!(!night.contains(fri_23 + 86_400_000));
    assert!(!Hours { days: 0, ..office }.valid() && !Hours { start_minute: 600, end_minute: 600, ..office }.valid());
}

#[tokio::test]
async fn with_a_removal_grace_the_same_card_tapped_again_continues_and_no_tap_locks() {
    let b = bench(|c| c.agent_grace_s = 3600).await;
    b.gw.set_policy(&admin(), T, TerminalPolicy { removal_grace_s: 20, ..Default::default() }).await.unwrap();
    assert!(denied(&tap(&b).await).is_none());
    let events = |b: &Bench| b.gw.store.events_after(0, 1000).unwrap().len();
    // Pulled and tapped again within the grace: one more unlock, no lock.
    assert!(!b.gw.card_removed(&agent(), T, Some(uuid())).await.unwrap());
    let before = events(&b);
    b.clock.advance(Duration::from_secs(5));
    assert!(denied(&tap(&b).await).is_none());
    assert_eq!(events(&b), before + 1);
    assert!(b.gw.store.events_after(0, 1000).unwrap().iter().all(|e| !matches!(e.session, Session::Locked { reason: LockReason::Replaced, .. })));
    // Pulled and not back: locked when the grace runs out, not before.
    assert!(!b.gw.card_removed(&agent(), T, Some(uuid())).await.unwrap());
    b.clock.advance(Duration::from_secs(19));
    b.gw.sweep().await.unwrap();
    assert_eq!(locked_for(&b), None);
    b.clock.advance(Duration::from_secs(2));
    b.gw.sweep().await.unwrap();
    assert_eq!(locked_for(&b), Some(LockReason::CardRemoved));
    // Without a grace, removal locks at once.
    b.gw.set_policy(&admin(), T, TerminalPolicy::default()).await.unwrap();
    assert!(denied(&tap(&b).await).is_none());
    assert!(b.gw.card_removed(&agent(), T, Some(uuid())).await.unwrap());
}

#[tokio::test]
async fn a_tap_cannot_add_a_key_to_an_approved_privileged_card() {
    let b = privileged_bench(false).await;
    let card = other_card();
    b.gw.enrol_card(&admin(), "op-2", &nine_a(&card), Slot::PivAuthentication, None).await.unwrap();
    b.gw.approve(&admin_named("second"), open_request(&b).id, None).await.unwrap();
    // A card-only terminal; the card offers a 9E certificate never enrolled.
    b.gw.set_policy(&admin(), T, TerminalPolicy { allowed_mechanisms: vec![Mechanism::CardOnly], ..Default::default() }).await.unwrap();
    let d = denied(&tap_with(&b, &card, T).await);
    assert_eq!(d, Some(Deny::CardPending), "a key joined an approved privileged card by a tap");
    assert!(!b.gw.store.card(&card.chuid.guid).unwrap().unwrap().certificates.contains_key(&Slot::CardAuthentication));
}

// ---- step-up ----

const ACTION: &str = "reconfigure intercom 4";

fn params() -> [u8; 32] {
    sha2::Sha256::digest(b"{\"intercom\":4,\"gain\":7}").into()
}

#[tokio::test]
async fn a_step_up_is_proven_by_the_operators_card_and_pin_and_its_token_honoured_once() {
    let b = bench(|_| {}).await;
    // Asked of the operator at an unlocked terminal only.
    let e = b.gw.ask_step_up(&app(), T, ACTION, &params(), Duration::from_secs(60)).err().unwrap();
    assert!(matches!(e, Error::Precondition(_)), "{e}");
    assert!(denied(&tap(&b).await).is_none());
    let (wanted, mut rx) = b.gw.ask_step_up(&app(), T, ACTION, &params(), Duration::from_secs(60)).unwrap();
    assert_eq!(b.gw.step_ups.waiting_at(&[T.to_string()], b.gw.clock.instant()).len(), 1, "the agent is told");
    let (message, done) = tap_for(&b, card_profile(), T, Some(wanted.asked.id)).await;
    assert!(matches!(done, Complete::SteppedUp { ref operator } if operator.id == "op-1"), "{:?}", denied(&done));
    // The card signed the action's words and parameters, with its PIN key,
    // under the step-up domain: never a tap's message.
    let m = pivgate_proto::card_message::parse_step_up(&message).unwrap();
    assert_eq!((m.action, m.params_sha256, m.step_up_id), (ACTION, params(), wanted.asked.id));
    assert_eq!(m.tap.mechanism, pivgate_proto::card_message::MECHANISM_CARD_AND_PIN);
    assert!(pivgate_proto::card_message::parse(&message).is_err());
    let Some(crate::step_up::Outcome::Granted(proof)) = rx.wait_for(Option::is_some).await.unwrap().clone() else { panic!("not granted") };
    // The grant was durable before the application heard of it.
    let rec = b.gw.store.audit_after(0, 1000).unwrap().into_iter().rev().find(|r| r.kind == "stepup.granted").expect("a grant record");
    assert_eq!((rec.detail["action"].as_str(), rec.detail["operator"].as_str()), (Some(ACTION), Some("op-1")));
    // For that action and those parameters, once.
    let p = b.gw.redeem_step_up(&app(), &proof.token, T, ACTION, &params()).await.unwrap();
    assert_eq!((p.operator_id.as_str(), p.card), ("op-1", uuid()));
    let e = b.gw.redeem_step_up(&app(), &proof.token, T, ACTION, &params()).await.unwrap_err();
    assert!(matches!(e, Error::Precondition(_)), "replayed: {e}");
    assert!(b.gw.store.audit_after(0, 1000).unwrap().iter().any(|r| r.kind == "stepup.replayed"));
    // The step-up is over: its id proves nothing more.
    assert_eq!(denied(&tap_for(&b, card_profile(), T, Some(wanted.asked.id)).await.1), Some(Deny::StepUpUnknown));
    // The session is as it was.
    assert!(locked_for(&b).is_none());
}

#[tokio::test]
async fn a_step_up_by_another_operators_card_is_refused_and_the_application_hears_it() {
    let b = bench(|_| {}).await;
    assert!(denied(&tap(&b).await).is_none());
    b.gw.add_operator(&admin(), Operator { id: "op-3".into(), name: "Op Three".into(), roles: vec!["dispatcher".into()], enabled: true }).await.unwrap();
    let other = other_card();
    b.gw.enrol_card(&admin(), "op-3", &nine_a(&other), Slot::PivAuthentication, None).await.unwrap();
    let (wanted, mut rx) = b.gw.ask_step_up(&app(), T, ACTION, &params(), Duration::from_secs(60)).unwrap();
    let (_, done) = tap_for(&b, &other, T, Some(wanted.asked.id)).await;
    assert_eq!(denied(&done), Some(Deny::StepUpOtherOperator));
    assert!(matches!(rx.wait_for(Option::is_some).await.unwrap().clone(), Some(crate::step_up::Outcome::Denied(Deny::StepUpOtherOperator, _))));
    // And the other operator's session did not begin: op-1's holds.
    assert!(matches!(b.gw.store.terminal(T).unwrap().unwrap().session, Session::Unlocked { ref operator_id, .. } if operator_id == "op-1"));
    // At a terminal unlocked card only, a step-up still needs the PIN key.
    b.gw.set_policy(&admin(), T, TerminalPolicy { allowed_mechanisms: vec![Mechanism::CardOnly], ..Default::default() }).await.unwrap();
    assert!(denied(&tap_with(&b, card_profile(), T).await).is_none(), "not unlocked card only");
    let (wanted, _rx) = b.gw.ask_step_up(&app(), T, ACTION, &params(), Duration::from_secs(60)).unwrap();
    let Begin::Challenge { mechanism, message, .. } = b.gw.begin(&agent(), BeginRequest { step_up: Some(wanted.asked.id), ..begin_req(T) }).await.unwrap()
    else {
        panic!("no challenge")
    };
    assert_eq!(mechanism, Mechanism::CardAndPin, "a step-up is card and PIN at a card-only terminal too");
    assert!(pivgate_proto::card_message::parse_step_up(&message).is_ok());
}

#[tokio::test]
async fn a_step_up_nobody_proves_times_out_and_a_newer_one_supersedes_the_waiting_one() {
    let b = bench(|_| {}).await;
    assert!(denied(&tap(&b).await).is_none());
    let (first, rx1) = b.gw.ask_step_up(&app(), T, ACTION, &params(), Duration::from_secs(60)).unwrap();
    let (second, mut rx2) = b.gw.ask_step_up(&app(), T, "open door 2", &params(), Duration::from_secs(60)).unwrap();
    assert_eq!(*rx1.borrow(), Some(crate::step_up::Outcome::Superseded));
    assert_eq!(denied(&tap_for(&b, card_profile(), T, Some(first.asked.id)).await.1), Some(Deny::StepUpUnknown));
    assert!(b.gw.step_up_timed_out(&app(), &second).await.unwrap());
    assert_eq!(rx2.wait_for(Option::is_some).await.unwrap().clone(), Some(crate::step_up::Outcome::TimedOut));
    assert_eq!(denied(&tap_for(&b, card_profile(), T, Some(second.asked.id)).await.1), Some(Deny::StepUpUnknown));
    assert!(b.gw.store.audit_after(0, 1000).unwrap().iter().any(|r| r.kind == "stepup.denied" && r.detail["why"] == "timed out"));
    // Bad words or digests are refused before anything waits.
    assert!(matches!(b.gw.ask_step_up(&app(), T, "", &params(), Duration::from_secs(60)), Err(Error::InvalidRequest(_))));
    assert!(matches!(b.gw.ask_step_up(&app(), T, ACTION, &[1; 31], Duration::from_secs(60)), Err(Error::InvalidRequest(_))));
}

// ---- throttling ----

/// A tap whose signature is not the card's: a failed proof.
async fn bad_proof(b: &Bench) -> Option<Deny> {
    match b.gw.begin(&agent(), begin_req(T)).await.unwrap() {
        Begin::Challenge { id, .. } => denied(&b.gw.complete(&agent(), &id, T, &[0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01]).await.unwrap()),
        Begin::Denied(d, _) => Some(d),
        Begin::CertificateNeeded(s) => panic!("{s:?} asked for"),
    }
}

#[tokio::test]
async fn failed_proofs_slow_the_next_ones_and_lock_the_operator_out_until_an_administrator_lifts_it() {
    let b = bench(|c| {
        c.lifecycle.lockout_after = 6;
        c.lifecycle.free_failures = 2;
    })
    .await;
    // Two free failures; the third starts a delay the next tap meets.
    assert_eq!(bad_proof(&b).await, Some(Deny::BadSignature));
    assert_eq!(bad_proof(&b).await, Some(Deny::BadSignature));
    assert_eq!(bad_proof(&b).await, Some(Deny::BadSignature));
    assert_eq!(bad_proof(&b).await, Some(Deny::Throttled), "no delay after three failures in a row");
    assert_eq!(denied(&tap_with(&b, card_profile(), T).await), Some(Deny::Throttled), "the right card waits too");
    // The delay grows: 1 s, then 2 s, then 4 s.
    for wait in [1, 2, 4] {
        b.clock.advance(Duration::from_secs(wait));
        assert_eq!(bad_proof(&b).await, Some(Deny::BadSignature), "after {wait} s");
    }
    // Six in a row: locked out, durably, audited and counted; the right
    // card and PIN prove nothing now, however long one waits.
    b.clock.advance(Duration::from_secs(600));
    assert_eq!(denied(&tap_with(&b, card_profile(), T).await), Some(Deny::LockedOut));
    let l = b.gw.store.lockout("op-1").unwrap().expect("a stored lockout");
    assert_eq!((l.failures, l.terminal.as_str()), (6, T));
    assert!(b.gw.store.audit_after(0, 1000).unwrap().iter().any(|r| r.kind == "auth.lockout" && r.detail["operator"] == "op-1"));
    assert!(crate::metrics::render(&b.gw).contains("pivgate_lockouts_total 1"));
    // An administrator lifts it: the card works, and counting starts again.
    assert!(b.gw.lift_lockout(&admin(), "op-1", "the operator was at the console; cleared with them").await.unwrap());
    assert!(!b.gw.lift_lockout(&admin(), "op-1", "again").await.unwrap());
    assert!(denied(&tap(&b).await).is_none());
    assert!(b.gw.store.audit_after(0, 1000).unwrap().iter().any(|r| r.kind == "admin.lift_lockout"));
}

#[tokio::test]
async fn wrong_pins_count_only_when_reported_for_a_challenge_of_this_agent_there_and_only_once() {
    let b = bench(|c| {
        c.lifecycle.lockout_after = 2;
        c.lifecycle.free_failures = 10;
    })
    .await;
    let Begin::Challenge { id, .. } = b.gw.begin(&agent(), begin_req(T)).await.unwrap() else { panic!("no challenge") };
    // Another agent, another terminal, a made-up challenge: refused.
    let other = Caller { role: Role::Agent, name: "pi-2".into() };
    assert!(matches!(b.gw.report_pin_failures(&other, &id, T, 3).await, Err(Error::InvalidRequest(_))));
    assert!(matches!(b.gw.report_pin_failures(&agent(), &id, "lobby", 3).await, Err(Error::InvalidRequest(_))));
    assert!(matches!(b.gw.report_pin_failures(&agent(), &[9; 16], T, 3).await, Err(Error::InvalidRequest(_))));
    b.gw.report_pin_failures(&agent(), &id, T, 3).await.unwrap();
    // Taken once: the same challenge is neither reported again nor signed.
    assert!(matches!(b.gw.report_pin_failures(&agent(), &id, T, 3).await, Err(Error::InvalidRequest(_))));
    assert_eq!(denied(&b.gw.complete(&agent(), &id, T, &card_signs(b"x", Mechanism::CardAndPin)).await.unwrap()), Some(Deny::ChallengeReplayed));
    // Three wrong PINs for one challenge are one failure; a second
    // challenge failed locks the operator out.
    assert!(b.gw.store.lockout("op-1").unwrap().is_none(), "one report counted as many");
    let Begin::Challenge { id, .. } = b.gw.begin(&agent(), begin_req(T)).await.unwrap() else { panic!("no challenge") };
    b.gw.report_pin_failures(&agent(), &id, T, 1).await.unwrap();
    assert_eq!(denied(&tap_with(&b, card_profile(), T).await), Some(Deny::LockedOut));
    assert!(b.gw.store.audit_after(0, 1000).unwrap().iter().any(|r| r.kind == "auth.pin_failed"));
}

#[tokio::test]
async fn a_success_clears_the_failures_before_it() {
    let b = bench(|c| {
        c.lifecycle.lockout_after = 3;
        c.lifecycle.free_failures = 5;
    })
    .await;
    for _ in 0..5 {
        assert_eq!(bad_proof(&b).await, Some(Deny::BadSignature));
        assert_eq!(bad_proof(&b).await, Some(Deny::BadSignature));
        assert!(denied(&tap(&b).await).is_none(), "two failures then the right card and PIN");
    }
    assert!(b.gw.store.lockout("op-1").unwrap().is_none(), "failures not in a row locked the operator out");
}

#[tokio::test]
async fn a_step_up_token_outlives_no_lock_and_no_application_swaps_another_ones_step_up() {
    let b = bench(|_| {}).await;
    assert!(denied(&tap(&b).await).is_none());
    // Another application cannot replace a waiting step-up under the
    // operator's PIN; its own asks are bounded too.
    let (wanted, mut rx) = b.gw.ask_step_up(&app(), T, ACTION, &params(), Duration::from_secs(120)).unwrap();
    let other = Caller { role: Role::Application, name: "door-controller".into() };
    assert!(matches!(b.gw.ask_step_up(&other, T, "open every door", &params(), Duration::from_secs(60)), Err(Error::Precondition(_))));
    // The wait never outlasts the server's call timeout.
    assert!(wanted.asked.expires <= b.gw.clock.instant() + Duration::from_secs(b.gw.limits.call_timeout_s));
    assert!(matches!(tap_for(&b, card_profile(), T, Some(wanted.asked.id)).await.1, Complete::SteppedUp { .. }));
    let Some(crate::step_up::Outcome::Granted(proof)) = rx.wait_for(Option::is_some).await.unwrap().clone() else { panic!("not granted") };
    // The terminal locks before the token is used: it is worth nothing.
    assert!(b.gw.lock_if(&admin().to_string(), T, LockReason::Administrator, |_| true).await.unwrap());
    let e = b.gw.redeem_step_up(&app(), &proof.token, T, ACTION, &params()).await.unwrap_err();
    assert!(matches!(e, Error::Precondition(ref m) if m.contains("no longer unlocked")), "{e}");
    // One caller's burst of asks is cut short.
    assert!(denied(&tap(&b).await).is_none());
    let refused = (0..20).filter(|_| matches!(b.gw.ask_step_up(&app(), T, ACTION, &params(), Duration::from_secs(5)), Err(Error::Exhausted(_)))).count();
    assert!(refused >= 9, "{refused} of 20 asks refused");
}

// ---- break-glass ----

#[tokio::test]
async fn break_glass_takes_two_administrators_holds_only_where_and_while_granted_and_every_use_is_on_record() {
    let b = privileged_bench(false).await;
    let loaner = other_card();
    let terminals = vec![T.to_string()];
    let ask = crate::break_glass::BreakGlassAsk {
        operator_id: "op-2",
        terminals: &terminals,
        hours: 2,
        certificate: &nine_a(&loaner),
        reason: "badge left at home, night shift",
    };
    // Bounded: never past lifecycle.break_glass_max_h, never without a reason.
    assert!(matches!(b.gw.ask_break_glass(&admin(), &crate::break_glass::BreakGlassAsk { hours: 9, ..ask }).await, Err(Error::InvalidRequest(_))));
    assert!(matches!(b.gw.ask_break_glass(&admin(), &crate::break_glass::BreakGlassAsk { reason: " ", ..ask }).await, Err(Error::InvalidRequest(_))));
    let r = b.gw.ask_break_glass(&admin(), &ask).await.unwrap();
    // Nothing until a second administrator approves: the card is unknown.
    assert_eq!(denied(&tap_with(&b, &loaner, T).await), Some(Deny::UnknownCard));
    assert!(matches!(b.gw.approve(&admin(), r.id, None).await, Err(Error::PermissionDenied(_))), "the asker approved");
    assert!(matches!(b.gw.approve(&admin_named("op-2"), r.id, None).await, Err(Error::PermissionDenied(_))), "the operator approved");
    b.gw.approve(&admin_named("second"), r.id, None).await.unwrap();
    // In force: at the named terminal only, as the operator, on record.
    assert!(matches!(tap_with(&b, &loaner, T).await, Complete::Granted { ref operator, .. } if operator.id == "op-2"));
    let rec = b.gw.store.audit_after(0, 1000).unwrap().into_iter().rev().find(|r| r.kind == "auth.granted").unwrap();
    assert_eq!(rec.detail["break_glass"], hex::encode(r.id));
    assert_eq!(denied(&tap_with(&b, &loaner, "lobby").await), Some(Deny::NotAuthorized));
    let items = b.gw.review().unwrap();
    assert!(items.iter().any(|i| i.kind == "break_glass" && i.subject == hex::encode(r.id) && i.detail.starts_with("IN FORCE")), "{items:?}");
    // It ends on its own: the session locks at the sweep, the card is refused.
    b.clock.advance(Duration::from_secs(2 * 3600 + 1));
    b.gw.sweep().await.unwrap();
    assert!(locked_for(&b).is_some(), "a break-glass session outlived its grant");
    assert!(denied(&tap_with(&b, &loaner, T).await).is_some());
    // Still in the review, as ended, for 30 days.
    assert!(b.gw.review().unwrap().iter().any(|i| i.kind == "break_glass" && i.detail.starts_with("ended")));
}

/// A break-glass bench where the approver's presence proves; "second"
/// holds a badge root enrolled (the requests are asked by "asker").
async fn presence_bench() -> (Bench, Profile) {
    let b = bench(|c| {
        c.lifecycle.privileged_roles = vec!["intercom-admin".into()];
        c.lifecycle.break_glass_proof = crate::model::BreakGlassProof::ApproverPresent;
    })
    .await;
    b.gw.add_operator(&admin(), Operator { id: "op-2".into(), name: "Op Two".into(), roles: vec!["intercom-admin".into()], enabled: true }).await.unwrap();
    b.gw.add_operator(&admin(), Operator { id: "second".into(), name: "Second Admin".into(), roles: vec!["dispatcher".into()], enabled: true }).await.unwrap();
    let badge = other_card();
    b.gw.enrol_card(&admin(), "second", &nine_a(&badge), Slot::PivAuthentication, None).await.unwrap();
    (b, badge)
}

/// `who` approves request `id` with `badge` signing (card and PIN).
async fn approve_by_badge(b: &Bench, who: &str, id: [u8; 16], badge: &Profile) -> crate::error::Result<crate::model::Request> {
    let c = b.gw.begin_approval(&admin_named(who), id, &nine_a(badge))?;
    let sig = profile_signs(badge, &c.message, Mechanism::CardAndPin);
    b.gw.approve(&admin_named(who), id, Some((&c.id, &sig))).await
}

#[tokio::test]
async fn by_the_approvers_presence_only_the_badge_that_approved_at_a_named_terminal_opens_it_and_only_while_it_holds() {
    let (b, badge) = presence_bench().await;
    let asker = admin_named("asker");
    let terminals = vec![T.to_string()];
    let ask = crate::break_glass::BreakGlassAsk { operator_id: "op-2", terminals: &terminals, hours: 2, certificate: &[], reason: "badge at home" };
    // No temporary card in this mode.
    let loaner = other_card();
    let with_card = crate::break_glass::BreakGlassAsk { certificate: &nine_a(&loaner), ..ask };
    assert!(matches!(b.gw.ask_break_glass(&asker, &with_card).await, Err(Error::InvalidRequest(_))));
    let r = b.gw.ask_break_glass(&asker, &ask).await.unwrap();
    // Before the approval the badge is its holder's as usual.
    assert!(matches!(tap_with(&b, &badge, T).await, Complete::Granted { ref operator, .. } if operator.id == "second"));
    b.gw.lock_if(&admin().to_string(), T, LockReason::Administrator, |_| true).await.unwrap();
    // Approved without a badge (a certificate, wherever it is): refused,
    // presence is what the badge signing proves.
    let e = b.gw.approve(&admin_named("second"), r.id, None).await.unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(ref m) if m.contains("badge")), "{e}");
    approve_by_badge(&b, "second", r.id, &badge).await.unwrap();
    // The attack: another card of the approver's, enrolled since by a
    // colluding administrator, opens nothing; nor does anyone else's card.
    let spare = other_card();
    b.gw.enrol_card(&admin_named("accomplice"), "second", &nine_a(&spare), Slot::PivAuthentication, None).await.unwrap();
    assert_eq!(denied(&tap_with(&b, &spare, T).await), Some(Deny::NotAuthorized));
    assert!(matches!(tap(&b).await, Complete::Granted { ref operator, .. } if operator.id == "op-1"));
    b.gw.lock_if(&admin().to_string(), T, LockReason::Administrator, |_| true).await.unwrap();
    // Card only is never enough.
    b.gw.set_policy(&admin(), T, TerminalPolicy { allowed_mechanisms: vec![Mechanism::CardOnly, Mechanism::CardAndPin], ..Default::default() }).await.unwrap();
    let card_only = BeginRequest {
        card_uuid: Some(badge.chuid.guid),
        mechanism: Some(Mechanism::CardOnly),
        certificate: Some(badge.certificates[&CardSlot::CardAuthentication].clone()),
        ..begin_req(T)
    };
    assert!(matches!(b.gw.begin(&agent(), card_only).await.unwrap(), Begin::Denied(Deny::MechanismNotAllowed, _)));
    // The approving badge, card and PIN, at the named terminal: op-2's
    // session, on record with whose badge opened it.
    assert!(matches!(tap_with(&b, &badge, T).await, Complete::Granted { ref operator, .. } if operator.id == "op-2"));
    let rec = b.gw.store.audit_after(0, 1000).unwrap().into_iter().rev().find(|r| r.kind == "auth.granted").unwrap();
    assert_eq!((rec.detail["break_glass"].as_str(), rec.detail["present"].as_str()), (Some(hex::encode(r.id).as_str()), Some("second")));
    assert!(matches!(session(&b), Session::Unlocked { ref operator_id, card_uuid, .. } if operator_id == "op-2" && card_uuid == badge.chuid.guid));
    // The periodic re-check keeps it while the grant holds.
    b.gw.reauthorize_sessions("test").await.unwrap();
    assert!(locked_for(&b).is_none(), "a session by presence locked while its grant holds");
    // Elsewhere the badge is its holder's.
    assert!(matches!(tap_with(&b, &badge, "lobby").await, Complete::Granted { ref operator, .. } if operator.id == "second"));
    // A second grant the same badge would open at T: refused.
    b.gw.add_operator(&admin(), Operator { id: "op-3".into(), name: "Op Three".into(), roles: vec!["dispatcher".into()], enabled: true }).await.unwrap();
    let r2 = b.gw.ask_break_glass(&asker, &crate::break_glass::BreakGlassAsk { operator_id: "op-3", ..ask }).await.unwrap();
    assert!(matches!(approve_by_badge(&b, "second", r2.id, &badge).await, Err(Error::InvalidRequest(_))));
    // Ended early: the session standing on it locks with the grant.
    assert_eq!(b.gw.end_break_glass(&admin(), r.id, "badge found").await.unwrap(), [T.to_string()]);
    assert_eq!(locked_for(&b), Some(LockReason::BreakGlassEnded));
    assert!(matches!(tap_with(&b, &badge, T).await, Complete::Granted { ref operator, .. } if operator.id == "second"));
    let rec = b.gw.store.audit_after(0, 1000).unwrap().into_iter().rev().find(|r| r.kind == "admin.end_break_glass").unwrap();
    assert_eq!(rec.detail["present"], "second");
}

#[tokio::test]
async fn a_break_glass_by_presence_locks_at_its_end_and_a_badge_the_approver_or_asker_enrolled_opens_nothing() {
    let (b, badge) = presence_bench().await;
    let terminals = vec![T.to_string()];
    let ask = crate::break_glass::BreakGlassAsk { operator_id: "op-2", terminals: &terminals, hours: 1, certificate: &[], reason: "night shift" };
    // The asker enrolled "second"'s badge: it cannot stand in for the
    // approver's presence on the asker's own request.
    let r = b.gw.ask_break_glass(&admin(), &ask).await.unwrap();
    let e = approve_by_badge(&b, "second", r.id, &badge).await.unwrap_err();
    assert!(matches!(e, Error::PermissionDenied(ref m) if m.contains("asker")), "{e}");
    // A stolen certificate of "third" plants a badge for third: no
    // approval with it.
    b.gw.add_operator(&admin(), Operator { id: "third".into(), name: "Third".into(), roles: vec![], enabled: true }).await.unwrap();
    let planted = other_card();
    b.gw.enrol_card(&admin_named("third"), "third", &nine_a(&planted), Slot::PivAuthentication, None).await.unwrap();
    assert!(matches!(approve_by_badge(&b, "third", r.id, &planted).await, Err(Error::PermissionDenied(_))));
    // A badge of third's that someone else enrolled approves, and only it
    // opens the grant; the planted one is refused there.
    let real = other_card();
    b.gw.enrol_card(&admin_named("fourth"), "third", &nine_a(&real), Slot::PivAuthentication, None).await.unwrap();
    approve_by_badge(&b, "third", r.id, &real).await.unwrap();
    assert_eq!(denied(&tap_with(&b, &planted, T).await), Some(Deny::NotAuthorized));
    assert!(matches!(tap_with(&b, &real, T).await, Complete::Granted { ref operator, .. } if operator.id == "op-2"));
    // Failed proofs with the badge count against its holder, not the
    // grant's operator.
    let req = BeginRequest { card_uuid: Some(real.chuid.guid), ..begin_req(T) };
    let Begin::Challenge { id, message, .. } = b.gw.begin(&agent(), req).await.unwrap() else { panic!("no challenge") };
    let wrong = profile_signs(&real, &message, Mechanism::CardOnly);
    assert!(denied(&b.gw.complete(&agent(), &id, T, &wrong).await.unwrap()).is_some());
    assert!(b.gw.throttle.count(&crate::throttle::Key::Operator("third".into())) == 1);
    assert!(b.gw.throttle.count(&crate::throttle::Key::Operator("op-2".into())) == 0);
    // At its time: the periodic re-check locks it, with the grant's reason.
    assert!(matches!(tap_with(&b, &real, T).await, Complete::Granted { .. }));
    b.clock.advance(Duration::from_secs(3601));
    b.gw.reauthorize_sessions("test").await.unwrap();
    assert_eq!(locked_for(&b), Some(LockReason::BreakGlassEnded));
    assert!(b.gw.review().unwrap().iter().any(|i| i.kind == "break_glass" && i.subject == hex::encode(r.id)));
}

#[tokio::test]
async fn a_break_glass_ended_early_revokes_its_card_and_locks_its_session() {
    let b = privileged_bench(false).await;
    let loaner = other_card();
    let terminals = vec![T.to_string()];
    let ask = crate::break_glass::BreakGlassAsk { operator_id: "op-2", terminals: &terminals, hours: 4, certificate: &nine_a(&loaner), reason: "lost badge" };
    let r = b.gw.ask_break_glass(&admin(), &ask).await.unwrap();
    b.gw.approve(&admin_named("second"), r.id, None).await.unwrap();
    assert!(denied(&tap_with(&b, &loaner, T).await).is_none());
    assert_eq!(b.gw.end_break_glass(&admin(), r.id, "badge found").await.unwrap(), [T.to_string()]);
    assert_eq!(locked_for(&b), Some(LockReason::Revoked));
    assert_eq!(denied(&tap_with(&b, &loaner, T).await), Some(Deny::BreakGlassEnded));
    assert!(b.gw.store.denied(crate::model::DenyKey::Card(loaner.chuid.guid)).unwrap(), "the card is not revoked");
    assert!(matches!(b.gw.end_break_glass(&admin(), r.id, "again").await, Err(Error::InvalidRequest(_))));
    assert!(b.gw.store.audit_after(0, 1000).unwrap().iter().any(|r| r.kind == "admin.end_break_glass"));
}

#[tokio::test]
async fn challenges_gathered_up_front_count_once_and_a_lockout_refuses_one_issued_before_it() {
    let b = bench(|c| {
        c.lifecycle.lockout_after = 2;
        c.lifecycle.free_failures = 10;
    })
    .await;
    // The attack: challenges for the victim's card gathered first (a
    // hostile agent, or a card copying its CHUID), then all failed.
    let mut gathered = vec![];
    for _ in 0..5 {
        let Begin::Challenge { id, .. } = b.gw.begin(&agent(), begin_req(T)).await.unwrap() else { panic!("no challenge") };
        gathered.push(id);
    }
    b.clock.advance(Duration::from_secs(1));
    for id in &gathered {
        b.gw.report_pin_failures(&agent(), id, T, 3).await.unwrap();
    }
    assert!(b.gw.store.lockout("op-1").unwrap().is_none(), "five gathered challenges counted as five failures");
    // A challenge taken now, then a second failure after it: locked out,
    // and the challenge taken before is refused at its grant.
    let Begin::Challenge { id: early, message, mechanism, .. } = b.gw.begin(&agent(), begin_req(T)).await.unwrap() else { panic!("no challenge") };
    b.clock.advance(Duration::from_secs(1));
    let Begin::Challenge { id, .. } = b.gw.begin(&agent(), begin_req(T)).await.unwrap() else { panic!("no challenge") };
    b.gw.report_pin_failures(&agent(), &id, T, 1).await.unwrap();
    assert!(b.gw.store.lockout("op-1").unwrap().is_some());
    let done = b.gw.complete(&agent(), &early, T, &card_signs(&message, mechanism)).await.unwrap();
    assert_eq!(denied(&done), Some(Deny::LockedOut));
}

#[tokio::test]
async fn a_break_glass_card_proves_with_its_pin_only_and_approves_nothing() {
    let b = privileged_bench(false).await;
    let loaner = other_card();
    let terminals = vec![T.to_string()];
    let ask =
        crate::break_glass::BreakGlassAsk { operator_id: "op-2", terminals: &terminals, hours: 2, certificate: &nine_a(&loaner), reason: "badge at home" };
    let r = b.gw.ask_break_glass(&admin(), &ask).await.unwrap();
    b.gw.approve(&admin_named("second"), r.id, None).await.unwrap();
    // Card only, even where the terminal allows it: refused, and its 9E
    // key is never taken from a tap.
    b.gw.set_policy(&admin(), T, TerminalPolicy { allowed_mechanisms: vec![Mechanism::CardOnly, Mechanism::CardAndPin], ..Default::default() }).await.unwrap();
    let card_only = BeginRequest { card_uuid: Some(loaner.chuid.guid), mechanism: Some(Mechanism::CardOnly), ..begin_req(T) };
    let Begin::Denied(d, _) = b.gw.begin(&agent(), card_only.clone()).await.unwrap() else { panic!("a break-glass card was offered card only") };
    assert_eq!(d, Deny::MechanismNotAllowed);
    let with_9e = BeginRequest { certificate: Some(loaner.certificates[&CardSlot::CardAuthentication].clone()), ..card_only };
    assert!(matches!(b.gw.begin(&agent(), with_9e).await.unwrap(), Begin::Denied(Deny::MechanismNotAllowed, _)));
    // And an operator who is also an administrator cannot approve with it.
    b.gw.add_operator(&admin(), Operator { id: "third".into(), name: "Third".into(), roles: vec![], enabled: true }).await.unwrap();
    let other = other_card();
    let ask = crate::break_glass::BreakGlassAsk { operator_id: "third", terminals: &terminals, hours: 2, certificate: &nine_a(&other), reason: "x" };
    let r2 = b.gw.ask_break_glass(&admin(), &ask).await.unwrap();
    b.gw.approve(&admin_named("second"), r2.id, None).await.unwrap();
    let _bootstrap = b.gw.issue_certificate(&admin(), Role::Admin, "second", &service_key(), 30).await.unwrap();
    let Issued::Pending(open) = b.gw.issue_certificate(&admin(), Role::Admin, "fourth", &service_key(), 30).await.unwrap() else { panic!("issued alone") };
    let e = b.gw.begin_approval(&admin_named("third"), open.id, &nine_a(&other)).err().unwrap();
    assert!(matches!(e, Error::PermissionDenied(ref m) if m.contains("break-glass")), "{e}");
}

#[tokio::test]
async fn closed_requests_are_forgotten_thirty_days_after_and_open_ones_never() {
    let b = privileged_bench(false).await;
    b.gw.enrol_card(&admin(), "op-2", &nine_a(&other_card()), Slot::PivAuthentication, None).await.unwrap();
    let refused = open_request(&b);
    b.gw.refuse(&admin(), refused.id, "not this one").await.unwrap();
    b.gw.enrol_card(&admin(), "op-2", &nine_a(&other_card()), Slot::PivAuthentication, None).await.unwrap();
    let waiting = open_request(&b);
    // Not yet: the refused one is kept for 30 days after its expiry.
    b.gw.sweep().await.unwrap();
    assert_eq!(b.gw.store.requests().unwrap().len(), 2);
    b.clock.advance(Duration::from_secs(31 * 86_400 + 72 * 3600));
    // (The waiting one lapsed long ago; a new one is open now.)
    b.gw.enrol_card(&admin(), "op-2", &nine_a(&other_card()), Slot::PivAuthentication, None).await.unwrap();
    let fresh = open_request(&b);
    b.gw.sweep().await.unwrap();
    let left: Vec<[u8; 16]> = b.gw.store.requests().unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(left, vec![fresh.id], "closed ones kept, or the open one forgotten");
    assert_ne!(waiting.id, fresh.id);
    let rec = b.gw.store.audit_after(0, 10_000).unwrap().into_iter().find(|r| r.kind == "lifecycle.prune_requests").expect("a prune record");
    assert!(rec.detail["requests"].to_string().contains(&hex::encode(refused.id)));
}
