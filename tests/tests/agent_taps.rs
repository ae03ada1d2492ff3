//! An operator at a terminal: a real agent (its own monitor, workers and
//! gateway link) with the virtual card in a vpcd reader behind the real
//! pcscd, a real gateway on loopback with mutual TLS, and a console
//! watching.

use std::time::Duration;

use anyhow::{bail, Result};
use pivgate_agent::terminal::TapResult;
use pivgate_hw::indicator::Pattern;
use pivgate_hw::piv::Algorithm;
use pivgate_proto::v1 as pb;
use pivgate_tests::agent::{assert_granted, start_agent, TerminalSpec};
use pivgate_tests::reader;
use pivgate_tests::site::{eventually, Site};
use pivgate_vcard::vpcd;

const T: Duration = Duration::from_secs(15);

async fn state(site: &Site, terminal: &str) -> Result<pb::TerminalState> {
    let mut c = site.application("checker").await?;
    Ok(c.get_terminal_state(pb::GetTerminalStateRequest { terminal_id: terminal.into() }).await?.into_inner().state.unwrap_or_default())
}

async fn next_event(s: &mut tonic::Streaming<pb::WatchEventsResponse>) -> Result<pb::Event> {
    match tokio::time::timeout(T, s.message()).await {
        Ok(Ok(Some(m))) => Ok(m.event.unwrap_or_default()),
        other => bail!("no event: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badge_with_correct_pin_unlocks_and_removing_it_locks() -> Result<()> {
    let r = reader()?;
    let site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &["dispatcher"], Algorithm::EccP256).await?;
    let agent = start_agent(&site, "pi-1", &[TerminalSpec { id: "dispatch-01", reader: &r.name, keypad: true }]).await?;
    let mut console = site.application("console").await?;
    let mut events = console.watch_events(pb::WatchEventsRequest { after_sequence: 0, terminal_ids: vec!["dispatch-01".into()] }).await?.into_inner();

    let inserted = vpcd::insert(profile.card(), r.addr)?;
    let seen = agent.wait_pattern("dispatch-01", Pattern::EnterPin, 0, T).await?;
    agent.type_keys("dispatch-01", "123456#");
    assert_granted(agent.next_result("dispatch-01", T).await?, "op-1");
    agent.wait_pattern("dispatch-01", Pattern::Granted, seen, T).await?;
    let e = next_event(&mut events).await?;
    let Some(pb::event::Kind::Unlocked(u)) = e.kind else { bail!("expected an unlock, got {e:?}") };
    assert_eq!(u.operator_id, "op-1");
    assert_eq!(u.mechanism, pb::Mechanism::CardAndPin as i32);

    let card = inserted.remove();
    let e = next_event(&mut events).await?;
    let Some(pb::event::Kind::Locked(l)) = e.kind else { bail!("expected a lock, got {e:?}") };
    assert_eq!(l.reason, pb::LockReason::CardRemoved as i32);
    // The agent reset the card's PIN state after the tap.
    assert!(!card.pin_verified());
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_does_not_unlock_and_the_tries_left_come_back() -> Result<()> {
    let r = reader()?;
    let site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let agent = start_agent(&site, "pi-1", &[TerminalSpec { id: "t1", reader: &r.name, keypad: true }]).await?;
    let inserted = vpcd::insert(profile.card(), r.addr)?;
    let seen = agent.wait_pattern("t1", Pattern::EnterPin, 0, T).await?;
    agent.type_keys("t1", "654321#");
    // Told, and asked again; the operator gives up (clear on an empty
    // entry). One tap, one result.
    let seen = agent.wait_pattern("t1", Pattern::Denied, seen, T).await?;
    agent.wait_pattern("t1", Pattern::EnterPin, seen, T).await?;
    agent.type_keys("t1", "*");
    assert_eq!(agent.next_result("t1", T).await?, TapResult::WrongPin { tries: 2 });
    assert!(!state(&site, "t1").await?.unlocked);
    let card = inserted.remove();
    assert_eq!(card.pin_tries(), 2);
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_card_is_reported_blocked_and_gets_no_verify() -> Result<()> {
    let r = reader()?;
    let site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let agent = start_agent(&site, "pi-1", &[TerminalSpec { id: "t1", reader: &r.name, keypad: true }]).await?;
    // Two wrong PINs, then a last try with a warning, then blocked.
    let inserted = vpcd::insert(profile.card(), r.addr)?;
    let mut seen = agent.wait_pattern("t1", Pattern::EnterPin, 0, T).await?;
    for _ in 0..2 {
        agent.type_keys("t1", "000000#");
        seen = agent.wait_pattern("t1", Pattern::Denied, seen, T).await?;
        seen = agent.wait_pattern("t1", Pattern::EnterPin, seen, T).await?;
    }
    assert!(agent.history("t1").contains(&Pattern::LastTry), "no warning before the last try");
    agent.type_keys("t1", "000000#");
    assert_eq!(agent.next_result("t1", T).await?, TapResult::PinBlocked);
    agent.wait_pattern("t1", Pattern::PinBlocked, seen, T).await?;
    let card = inserted.remove();
    assert_eq!(card.pin_tries(), 0);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Next time the card comes, it is reported blocked without a VERIFY.
    let count = card.apdu_count();
    let inserted = vpcd::insert(card, r.addr)?;
    assert_eq!(agent.next_result("t1", T).await?, TapResult::PinBlocked);
    assert!(!agent.history("t1").iter().skip(seen + 1).any(|p| *p == Pattern::EnterPin), "asked for a PIN the card cannot take");
    let card = inserted.remove();
    assert!(card.apdu_count() > count);
    assert!(!state(&site, "t1").await?.unlocked);
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_only_terminal_unlocks_without_a_pin_prompt() -> Result<()> {
    let r = reader()?;
    let site = Site::start(|_, _| {}).await?;
    site.policy("door", &[pb::Mechanism::CardOnly], &[]).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let agent = start_agent(&site, "pi-1", &[TerminalSpec { id: "door", reader: &r.name, keypad: false }]).await?;
    let inserted = vpcd::insert(profile.card(), r.addr)?;
    assert_granted(agent.next_result("door", T).await?, "op-1");
    assert!(!agent.history("door").contains(&Pattern::EnterPin));
    let s = state(&site, "door").await?;
    assert!(s.unlocked && s.mechanism == pb::Mechanism::CardOnly as i32);
    let card = inserted.remove();
    assert_eq!(card.pin_tries(), 3);
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_terminals_on_one_agent_stay_independent() -> Result<()> {
    let r = reader()?;
    let (name2, addr2) = r.second_slot();
    let site = Site::start(|_, _| {}).await?;
    let a = site.enrolled_card("op-a", &[], Algorithm::EccP256).await?;
    let b = site.enrolled_card("op-b", &[], Algorithm::EccP384).await?;
    let agent =
        start_agent(&site, "pi-1", &[TerminalSpec { id: "t1", reader: &r.name, keypad: true }, TerminalSpec { id: "t2", reader: &name2, keypad: true }])
            .await?;
    let in_a = vpcd::insert(a.card(), r.addr)?;
    agent.wait_pattern("t1", Pattern::EnterPin, 0, T).await?;
    agent.type_keys("t1", "123456#");
    assert_granted(agent.next_result("t1", T).await?, "op-a");
    let in_b = vpcd::insert(b.card(), addr2)?;
    agent.wait_pattern("t2", Pattern::EnterPin, 0, T).await?;
    agent.type_keys("t2", "123456#");
    assert_granted(agent.next_result("t2", T).await?, "op-b");
    in_a.remove();
    eventually(T, || async { Ok(!state(&site, "t1").await?.unlocked) }).await?;
    let t2 = state(&site, "t2").await?;
    assert!(t2.unlocked && t2.operator_id == "op-b", "removing the card at t1 touched t2");
    in_b.remove();
    eventually(T, || async { Ok(!state(&site, "t2").await?.unlocked) }).await?;
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_gateway_down_nothing_unlocks_and_a_card_pulled_meanwhile_still_locks() -> Result<()> {
    let r = reader()?;
    let mut site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let agent = start_agent(&site, "pi-1", &[TerminalSpec { id: "t1", reader: &r.name, keypad: true }]).await?;

    // Unlocked while the gateway is up.
    let inserted = vpcd::insert(profile.card(), r.addr)?;
    agent.wait_pattern("t1", Pattern::EnterPin, 0, T).await?;
    agent.type_keys("t1", "123456#");
    assert_granted(agent.next_result("t1", T).await?, "op-1");

    // The gateway goes down; the card is pulled meanwhile; a new tap fails
    // secure.
    site.stop().await?;
    let seen = agent.wait_pattern("t1", Pattern::GatewayUnreachable, 0, T).await?;
    let card = inserted.remove();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let inserted = vpcd::insert(card, r.addr)?;
    assert_eq!(agent.next_result("t1", T).await?, TapResult::GatewayUnreachable);
    agent.wait_pattern("t1", Pattern::GatewayUnreachable, seen, T).await?;
    inserted.remove();

    // Back: the agent reconnects by itself and re-reports; the terminal the
    // card left while the link was down is locked.
    let site = site.resume().await?;
    eventually(Duration::from_secs(20), || async {
        let s = state(&site, "t1").await?;
        Ok(!s.unlocked && s.lock_reason == pb::LockReason::CardRemoved as i32)
    })
    .await?;
    agent.wait_pattern("t1", Pattern::Idle, seen, Duration::from_secs(20)).await?;
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_pcscd_restarts_the_next_tap_still_works() -> Result<()> {
    let r = reader()?;
    let site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let agent = start_agent(&site, "pi-1", &[TerminalSpec { id: "t1", reader: &r.name, keypad: true }]).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    pivgate_tests::restart_pcscd(&r)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let inserted = vpcd::insert(profile.card(), r.addr)?;
    agent.wait_pattern("t1", Pattern::EnterPin, 0, Duration::from_secs(20)).await?;
    agent.type_keys("t1", "123456#");
    assert_granted(agent.next_result("t1", T).await?, "op-1");
    inserted.remove();
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_pulled_in_the_middle_of_a_tap_unlocks_nothing_and_the_next_tap_works() -> Result<()> {
    let r = reader()?;
    let site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let agent = start_agent(&site, "pi-1", &[TerminalSpec { id: "t1", reader: &r.name, keypad: true }]).await?;
    // The card leaves after the PIN is verified, before it signs.
    let mut card = profile.card();
    // SELECT, CHUID, PIN status, VERIFY, then GENERAL AUTHENTICATE: gone.
    card.add_fault(pivgate_vcard::Fault::DropAt(card.apdu_count() + 5));
    let inserted = vpcd::insert(card, r.addr)?;
    let seen = agent.wait_pattern("t1", Pattern::EnterPin, 0, T).await?;
    agent.type_keys("t1", "123456#");
    let result = agent.next_result("t1", T).await?;
    assert!(matches!(result, TapResult::CardRemoved | TapResult::CardError(_)), "{result:?}");
    inserted.remove();
    assert!(!state(&site, "t1").await?.unlocked);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let inserted = vpcd::insert(profile.card(), r.addr)?;
    agent.wait_pattern("t1", Pattern::EnterPin, seen, T).await?;
    agent.type_keys("t1", "123456#");
    assert_granted(agent.next_result("t1", T).await?, "op-1");
    inserted.remove();
    agent.stop().await
}

/// Compatibility: a card that refuses VERIFY P1=FF (SP 800-73-3) has its
/// PIN state cleared by a card reset when the agent ends its transaction;
/// a card that takes it is not reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_without_the_pin_reset_command_is_reset_after_the_tap() -> Result<()> {
    let r = reader()?;
    let site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let agent = start_agent(&site, "pi-1", &[TerminalSpec { id: "t1", reader: &r.name, keypad: true }]).await?;
    let mut seen = 0;
    for supported in [true, false] {
        let mut card = profile.card();
        card.set_verify_reset(supported);
        let inserted = vpcd::insert(card, r.addr)?;
        seen = agent.wait_pattern("t1", Pattern::EnterPin, seen, T).await?;
        agent.type_keys("t1", "123456#");
        assert_granted(agent.next_result("t1", T).await?, "op-1");
        // The transaction is ended (and the card reset if need be) before
        // the result is reported; give pcscd a moment to pass it on.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let card = inserted.remove();
        assert_eq!(card.warm_resets(), if supported { 0 } else { 1 }, "VERIFY reset supported: {supported}");
        assert!(!card.pin_verified());
        pivgate_hw::pcsc::wait_for_card(&pivgate_hw::pcsc::establish()?, &r.name, false, T)?;
    }
    agent.stop().await
}
