//! The gateway over real gRPC with mutual TLS on loopback and a real sled
//! database: a valid proof unlocks, watchers see it, removal locks, and a
//! console that reconnects misses nothing.

use std::time::Duration;

use anyhow::Result;
use pivgate_hw::piv::Algorithm;
use pivgate_proto::v1 as pb;
use pivgate_tests::site::{tap, Site, Tap};
use tokio_stream_shim::next_event;

mod tokio_stream_shim {
    use anyhow::{bail, Result};
    use pivgate_proto::v1 as pb;
    use std::time::Duration;

    /// The next event from a watch stream, within two seconds.
    pub async fn next_event(s: &mut tonic::Streaming<pb::WatchEventsResponse>) -> Result<pb::Event> {
        match tokio::time::timeout(Duration::from_secs(2), s.message()).await {
            Ok(Ok(Some(m))) => Ok(m.event.expect("event")),
            Ok(Ok(None)) => bail!("stream ended"),
            Ok(Err(e)) => bail!("stream error {e}"),
            Err(_) => bail!("no event within 2 s"),
        }
    }
}

fn unlocked_by(e: &pb::Event) -> Option<&str> {
    match &e.kind {
        Some(pb::event::Kind::Unlocked(u)) => Some(&u.operator_id),
        _ => None,
    }
}

fn lock_reason(e: &pb::Event) -> Option<pb::LockReason> {
    match &e.kind {
        Some(pb::event::Kind::Locked(l)) => pb::LockReason::try_from(l.reason).ok(),
        _ => None,
    }
}

#[tokio::test]
async fn a_valid_badge_unlocks_the_console_and_removal_locks_it() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &["dispatcher"], Algorithm::EccP256).await?;
    let mut agent = site.agent("pi-1", &["dispatch-01"]).await?;
    let mut console = site.application("console-1").await?;
    let mut watch = console.watch_events(pb::WatchEventsRequest { after_sequence: 0, terminal_ids: vec!["dispatch-01".into()] }).await?.into_inner();

    let mut card = profile.card();
    let Tap::Granted(g) = tap(&mut agent, "dispatch-01", &mut card, "123456", pb::Mechanism::Unspecified).await? else {
        panic!("a valid proof was refused");
    };
    assert_eq!(g.operator_id, "op-1");
    let e = next_event(&mut watch).await?;
    assert_eq!(unlocked_by(&e), Some("op-1"));
    assert_eq!(e.sequence, g.sequence);
    let state = console.get_terminal_state(pb::GetTerminalStateRequest { terminal_id: "dispatch-01".into() }).await?.into_inner().state.unwrap();
    assert!(state.unlocked);
    assert_eq!(state.mechanism, pb::Mechanism::CardAndPin as i32);

    let removed = agent
        .rpc()
        .report_card_removed(pb::ReportCardRemovedRequest { terminal_id: "dispatch-01".into(), card_uuid: profile.chuid.guid.to_vec() })
        .await?
        .into_inner();
    assert!(removed.locked);
    let e = next_event(&mut watch).await?;
    assert_eq!(lock_reason(&e), Some(pb::LockReason::CardRemoved));
    assert!(!console.get_terminal_state(pb::GetTerminalStateRequest { terminal_id: "dispatch-01".into() }).await?.into_inner().state.unwrap().unlocked);

    // Every step is in the audit chain, and the chain verifies.
    let records = site.audit_after(0).await?;
    assert!(records.iter().any(|r| r.kind == "auth.granted" && r.terminal_id == "dispatch-01"));
    assert!(records.iter().any(|r| r.kind == "session.locked"));
    let v = site.admin().await?.verify_audit(pb::VerifyAuditRequest {}).await?.into_inner();
    assert!(v.intact && v.records as usize == records.len());
    Ok(())
}

#[tokio::test]
async fn each_algorithm_and_card_only_terminals() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let mut agent = site.agent("pi-1", &["panel", "door"]).await?;
    site.policy("door", &[pb::Mechanism::CardOnly], &[]).await?;
    for (i, alg) in [Algorithm::EccP256, Algorithm::EccP384, Algorithm::Rsa2048].into_iter().enumerate() {
        let profile = site.enrolled_card(&format!("op-{i}"), &[], alg).await?;
        let mut card = profile.card();
        let r = tap(&mut agent, "panel", &mut card, "123456", pb::Mechanism::Unspecified).await?;
        assert!(matches!(r, Tap::Granted(_)), "{alg}: {r:?}");
        // Card only: the gateway asks for the 9E certificate the first time,
        // and no PIN is involved (a wrong PIN would not matter).
        let r = tap(&mut agent, "door", &mut card, "000000", pb::Mechanism::Unspecified).await?;
        assert!(matches!(r, Tap::Granted(_)), "{alg} card-only: {r:?}");
        assert!(card.pin_tries() == 3, "the card-only tap sent a VERIFY");
    }
    Ok(())
}

#[tokio::test]
async fn a_console_that_reconnects_gets_every_missed_event_once_in_order() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let mut agent = site.agent("pi-1", &["t1", "t2"]).await?;
    let mut console = site.application("console").await?;
    let mut card = profile.card();

    let mut watch = console.watch_events(pb::WatchEventsRequest::default()).await?.into_inner();
    let Tap::Granted(_) = tap(&mut agent, "t1", &mut card, "123456", pb::Mechanism::Unspecified).await? else { panic!() };
    let first = next_event(&mut watch).await?;
    drop(watch); // the console goes away

    // Meanwhile: t1 replaced by a t2 unlock... and removals.
    let Tap::Granted(_) = tap(&mut agent, "t2", &mut card, "123456", pb::Mechanism::Unspecified).await? else { panic!() };
    agent.rpc().report_card_removed(pb::ReportCardRemovedRequest { terminal_id: "t1".into(), card_uuid: vec![] }).await?;
    agent.rpc().report_card_removed(pb::ReportCardRemovedRequest { terminal_id: "t2".into(), card_uuid: vec![] }).await?;

    // Back, from the last sequence it saw; then a live event.
    let mut watch = console.watch_events(pb::WatchEventsRequest { after_sequence: first.sequence, terminal_ids: vec![] }).await?.into_inner();
    let Tap::Granted(g) = tap(&mut agent, "t1", &mut card, "123456", pb::Mechanism::Unspecified).await? else { panic!() };
    let mut seen = vec![];
    loop {
        let e = next_event(&mut watch).await?;
        seen.push(e.sequence);
        if e.sequence == g.sequence {
            break;
        }
    }
    let expected: Vec<u64> = (first.sequence + 1..=g.sequence).collect();
    assert_eq!(seen, expected, "missed, repeated or reordered events");
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

async fn presence(
    agent: &mut pivgate_tests::site::AgentClient,
) -> Result<(tokio::sync::mpsc::Sender<pb::PresenceRequest>, tonic::Streaming<pb::PresenceResponse>)> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let stream = agent.rpc().presence(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, stream))
}

async fn next_presence(s: &mut tonic::Streaming<pb::PresenceResponse>) -> Result<pb::PresenceResponse> {
    Ok(tokio::time::timeout(Duration::from_secs(3), s.message()).await??.expect("presence reply"))
}

fn report(terminal: &str, card: Option<&[u8]>) -> pb::PresenceRequest {
    pb::PresenceRequest {
        agent_version: "test".into(),
        terminals: vec![pb::TerminalReport {
            terminal_id: terminal.into(),
            reader_present: true,
            card_present: card.is_some(),
            card_uuid: card.map(|c| c.to_vec()).unwrap_or_default(),
            no_pin_entry: false,
        }],
    }
}

async fn state(site: &Site, t: &str) -> Result<pb::TerminalState> {
    Ok(site.application("c").await?.get_terminal_state(pb::GetTerminalStateRequest { terminal_id: t.into() }).await?.into_inner().state.unwrap())
}

#[tokio::test]
async fn a_card_pulled_while_the_link_was_down_locks_when_the_agent_reports() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let mut agent = site.agent("pi-1", &["t1"]).await?;
    let Tap::Granted(_) = tap(&mut agent, "t1", &mut profile.card(), "123456", pb::Mechanism::Unspecified).await? else { panic!() };
    // The agent reconnects and reports what it sees: the card is still in ...
    let (tx, mut replies) = presence(&mut agent).await?;
    tx.send(report("t1", Some(&profile.chuid.guid))).await?;
    assert!(next_presence(&mut replies).await?.lock_terminals.is_empty());
    assert!(state(&site, "t1").await?.unlocked);
    // ... then it is gone.
    tx.send(report("t1", None)).await?;
    assert_eq!(next_presence(&mut replies).await?.lock_terminals, vec!["t1".to_string()]);
    let s = state(&site, "t1").await?;
    assert!(!s.unlocked && s.lock_reason == pb::LockReason::CardRemoved as i32);
    Ok(())
}

#[tokio::test]
async fn an_administrators_lock_is_pushed_to_the_agent() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let mut agent = site.agent("pi-1", &["t1"]).await?;
    let Tap::Granted(_) = tap(&mut agent, "t1", &mut profile.card(), "123456", pb::Mechanism::Unspecified).await? else { panic!() };
    let (tx, mut replies) = presence(&mut agent).await?;
    tx.send(report("t1", Some(&profile.chuid.guid))).await?;
    next_presence(&mut replies).await?;
    site.admin().await?.lock_terminal(pb::LockTerminalRequest { terminal_id: "t1".into() }).await?;
    assert_eq!(next_presence(&mut replies).await?.lock_terminals, vec!["t1".to_string()]);
    assert_eq!(state(&site, "t1").await?.lock_reason, pb::LockReason::Administrator as i32);
    Ok(())
}

#[tokio::test]
async fn a_silent_agent_and_a_long_session_lock_their_terminals() -> Result<()> {
    let site = Site::start(|c, _| c.agent_grace_s = 1).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let mut agent = site.agent("pi-1", &["t1"]).await?;
    // t2's agent has never opened a presence stream, so only its session
    // length can lock it.
    let mut other = site.agent("pi-2", &["t2"]).await?;
    site.admin()
        .await?
        .set_terminal_policy(pb::SetTerminalPolicyRequest {
            terminal_id: "t2".into(),
            allowed_mechanisms: vec![pb::Mechanism::CardAndPin as i32],
            max_session_s: 1,
            ..Default::default()
        })
        .await?;
    let Tap::Granted(_) = tap(&mut agent, "t1", &mut profile.card(), "123456", pb::Mechanism::Unspecified).await? else { panic!() };
    let Tap::Granted(_) = tap(&mut other, "t2", &mut profile.card(), "123456", pb::Mechanism::Unspecified).await? else { panic!() };
    // pi-2 keeps reporting its card, so only the session length can lock t2.
    let (tx2, mut replies2) = presence(&mut other).await?;
    let uuid = profile.chuid.guid;
    let beat = tokio::spawn(async move {
        loop {
            if tx2.send(report("t2", Some(&uuid))).await.is_err() {
                return;
            }
            let _ = replies2.message().await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    // pi-1: one heartbeat, then silence.
    let (tx, mut replies) = presence(&mut agent).await?;
    tx.send(report("t1", Some(&profile.chuid.guid))).await?;
    next_presence(&mut replies).await?;
    pivgate_tests::site::eventually(Duration::from_secs(5), || async {
        Ok(state(&site, "t1").await?.lock_reason == pb::LockReason::AgentSilent as i32
            && state(&site, "t2").await?.lock_reason == pb::LockReason::MaxSession as i32)
    })
    .await?;
    beat.abort();
    drop(tx);
    Ok(())
}

#[tokio::test]
async fn another_card_in_the_reader_or_a_disabled_operator_ends_the_session() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let mut agent = site.agent("pi-1", &["t1"]).await?;
    let Tap::Granted(_) = tap(&mut agent, "t1", &mut profile.card(), "123456", pb::Mechanism::Unspecified).await? else { panic!() };
    // The agent reports a card it could not identify: not the operator's.
    let (tx, mut replies) = presence(&mut agent).await?;
    tx.send(report("t1", Some(&[]))).await?;
    assert_eq!(next_presence(&mut replies).await?.lock_terminals, vec!["t1".to_string()]);
    // Unlock again, then the operator is disabled: the session ends with it.
    let Tap::Granted(_) = tap(&mut agent, "t1", &mut profile.card(), "123456", pb::Mechanism::Unspecified).await? else { panic!() };
    site.admin()
        .await?
        .add_operator(pb::AddOperatorRequest { operator: Some(pb::Operator { operator_id: "op-1".into(), name: "x".into(), roles: vec![], enabled: false }) })
        .await?;
    let s = state(&site, "t1").await?;
    assert!(!s.unlocked && s.lock_reason == pb::LockReason::Revoked as i32);
    Ok(())
}

#[tokio::test]
async fn a_suspended_card_locks_its_console_at_once_and_only_an_administrator_suspends() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &["dispatcher"], Algorithm::EccP256).await?;
    let mut agent = site.agent("pi-1", &["dispatch-01"]).await?;
    let mut console = site.application("console-1").await?;
    let mut watch = console.watch_events(pb::WatchEventsRequest { after_sequence: 0, terminal_ids: vec!["dispatch-01".into()] }).await?.into_inner();
    let mut card = profile.card();
    let Tap::Granted(_) = tap(&mut agent, "dispatch-01", &mut card, "123456", pb::Mechanism::Unspecified).await? else { panic!("refused") };
    assert_eq!(unlocked_by(&next_event(&mut watch).await?), Some("op-1"));

    // An application's certificate cannot suspend, nor can an agent's.
    let creds = site.issue(pb::ServiceRole::Application, "console-2").await?;
    let channel = pivgate_gateway::client::connect(&site.addr, "localhost", &creds).await?;
    let mut as_app = pb::admin_service_client::AdminServiceClient::new(channel);
    let refused = as_app.suspend_card(pb::SuspendCardRequest { card_uuid: profile.chuid.uuid_string(), reason: "x".into() }).await;
    assert_eq!(refused.map_err(|s| s.code()).err(), Some(tonic::Code::PermissionDenied));

    let mut admin = site.admin_client().await?;
    let locked = admin.suspend_card(&profile.chuid.uuid_string(), "found in the car park").await?;
    assert_eq!(locked, ["dispatch-01"]);
    assert_eq!(lock_reason(&next_event(&mut watch).await?), Some(pb::LockReason::CardSuspended));
    let Tap::Denied(d) = tap(&mut agent, "dispatch-01", &mut card, "123456", pb::Mechanism::Unspecified).await? else { panic!("a suspended card unlocked") };
    assert_eq!(d, pb::DenyReason::CardSuspended);
    let listed = admin.rpc().list_cards(pb::ListCardsRequest { operator_id: "op-1".into(), ..Default::default() }).await?.into_inner().cards;
    assert_eq!(listed[0].state, "suspended");

    admin.resume_card(&profile.chuid.uuid_string(), "checked").await?;
    let Tap::Granted(_) = tap(&mut agent, "dispatch-01", &mut card, "123456", pb::Mechanism::Unspecified).await? else { panic!("a resumed card was refused") };
    Ok(())
}
