//! The processes around cards, end to end: enrolment at a terminal with a
//! real agent and the virtual card behind the real pcscd; a privileged
//! card approved by a second administrator whose own badge signs through
//! `pivgatectl` at a reader; replacement; and who may do what, over real
//! gRPC with mutual TLS and a real sled database.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use pivgate_agent::terminal::TapResult;
use pivgate_gateway::client::{connect, Admin};
use pivgate_gateway::model::{Operator, Slot as GwSlot, TerminalPolicy};
use pivgate_hw::indicator::Pattern;
use pivgate_hw::piv::{Algorithm, Slot};
use pivgate_proto::v1 as pb;
use pivgate_tests::agent::{assert_granted, start_agent, AgentUnderTest, TerminalSpec};
use pivgate_tests::site::{scratch, tap, write_credentials, Site, Tap};
use pivgate_tests::{binary, reader, run_typed, Reader};
use pivgate_vcard::{vpcd, VirtualCard};

const T: Duration = Duration::from_secs(20);
const TERMINAL: &str = "dispatch-01";

fn operator(id: &str, roles: &[&str]) -> Operator {
    Operator { id: id.into(), name: format!("Operator {id}"), roles: roles.iter().map(|r| r.to_string()).collect(), enabled: true }
}

/// Inserts `card` at the terminal's reader, types `keys` once the PIN is
/// asked for, and returns the tap's result with the card, removed.
async fn at_terminal(agent: &AgentUnderTest, r: &Reader, card: VirtualCard, keys: &str) -> Result<(TapResult, VirtualCard)> {
    let since = agent.history(TERMINAL).len();
    let inserted = vpcd::insert(card, r.addr)?;
    if let Err(e) = agent.wait_pattern(TERMINAL, Pattern::EnterPin, since, T).await {
        bail!("{e}; the tap ended with {:?}", agent.next_result(TERMINAL, Duration::from_secs(1)).await);
    }
    agent.type_keys(TERMINAL, keys);
    let result = agent.next_result(TERMINAL, T).await?;
    let card = inserted.remove();
    let ctx = pivgate_hw::pcsc::establish()?;
    if !pivgate_hw::pcsc::wait_for_card(&ctx, &r.name, false, T)? {
        bail!("pcscd still sees a card in {}", r.name);
    }
    Ok((result, card))
}

/// Inserts `card` and returns the tap's result, for a tap refused before
/// the PIN is asked for.
async fn refused_at_terminal(agent: &AgentUnderTest, r: &Reader, card: VirtualCard) -> Result<TapResult> {
    let inserted = vpcd::insert(card, r.addr)?;
    let result = agent.next_result(TERMINAL, T).await?;
    inserted.remove();
    let ctx = pivgate_hw::pcsc::establish()?;
    if !pivgate_hw::pcsc::wait_for_card(&ctx, &r.name, false, T)? {
        bail!("pcscd still sees a card in {}", r.name);
    }
    Ok(result)
}

async fn cards_of(admin: &mut Admin, op: &str) -> Result<Vec<pb::Card>> {
    Ok(admin.rpc().list_cards(pb::ListCardsRequest { operator_id: op.into(), ..Default::default() }).await?.into_inner().cards)
}

async fn unlocked(site: &Site) -> Result<bool> {
    let mut c = site.application("checker").await?;
    Ok(c.get_terminal_state(pb::GetTerminalStateRequest { terminal_id: TERMINAL.into() }).await?.into_inner().state.unwrap_or_default().unlocked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_is_enrolled_at_the_terminal_by_its_pin_proof_only_there_and_only_while_the_window_is_open() -> Result<()> {
    let r = reader()?;
    let site = Site::start(|_, _| {}).await?;
    let mut admin = site.admin_client().await?;
    admin.add_operator(&operator("op-7", &["dispatcher"])).await?;
    let (second, _) = r.second_slot();
    let agent = start_agent(
        &site,
        "pi-1",
        &[TerminalSpec { id: TERMINAL, reader: &r.name, keypad: true }, TerminalSpec { id: "lobby", reader: &second, keypad: true }],
    )
    .await?;
    let new = site.card(Algorithm::EccP256)?;

    // The window at the dispatch console; the operator gives up at the
    // PIN: nothing is enrolled, the window stays open.
    admin.open_enrolment("op-7", TERMINAL, 120, None, 0).await?;
    let (result, card) = at_terminal(&agent, &r, new.card(), "*").await?;
    assert_eq!(result, TapResult::NoPin);
    assert!(cards_of(&mut admin, "op-7").await?.is_empty(), "a card enrolled without its PIN");
    // With the PIN: enrolled, and the terminal stays locked.
    let seen = agent.history(TERMINAL).len();
    let (result, card) = at_terminal(&agent, &r, card, "123456#").await?;
    let TapResult::Enrolled(e) = result else { bail!("not enrolled: {result:?}") };
    assert_eq!((e.operator_id.as_str(), e.card_uuid, e.awaiting_approval), ("op-7", new.chuid.guid, false));
    agent.wait_pattern(TERMINAL, Pattern::Enrolled, seen, T).await?;
    assert!(!unlocked(&site).await?, "an enrolment unlocked the terminal");
    let cards = cards_of(&mut admin, "op-7").await?;
    assert_eq!(cards.len(), 1);
    assert_eq!(cards[0].state, "active");
    // One use: the card unlocks from now on; another unknown card is
    // unknown.
    let (result, _) = at_terminal(&agent, &r, card, "123456#").await?;
    assert_granted(result, "op-7");
    let result = refused_at_terminal(&agent, &r, site.card(Algorithm::EccP256)?.card()).await?;
    assert_eq!(result, TapResult::Denied(pb::DenyReason::UnknownCard));

    // A window elsewhere takes nothing here, and one closed takes nothing.
    admin.open_enrolment("op-7", "lobby", 120, None, 0).await?;
    let result = refused_at_terminal(&agent, &r, site.card(Algorithm::EccP256)?.card()).await?;
    assert_eq!(result, TapResult::Denied(pb::DenyReason::UnknownCard));
    assert!(admin.close_enrolment("lobby").await?);
    assert_eq!(cards_of(&mut admin, "op-7").await?.len(), 1);
    let kinds: Vec<String> = site.audit_after(0).await?.into_iter().map(|r| r.kind).collect();
    for k in ["admin.open_enrolment", "enrol.at_terminal", "admin.close_enrolment"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in {kinds:?}");
    }
    agent.stop().await
}

/// `pivgatectl` as the administrator in `creds`, with `stdin`.
fn ctl(site: &Site, creds: &pivgate_tests::site::CredentialFiles, args: &[&str], stdin: &str) -> (bool, String) {
    let Ok(bin) = binary("pivgatectl") else { return (false, "pivgatectl is not built".into()) };
    let mut cmd = Command::new(bin);
    cmd.args(["--gateway", &site.addr, "--ca"]).arg(&creds.ca).arg("--cert").arg(&creds.cert).arg("--key").arg(&creds.key).args(args);
    run_typed(&mut cmd, stdin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_privileged_card_is_approved_by_a_second_administrator_whose_own_badge_signs() -> Result<()> {
    let r = reader()?;
    let site = Site::start(|c, _| {
        c.lifecycle.privileged_roles = vec!["intercom-admin".into()];
        c.lifecycle.approval = pivgate_gateway::config::ApprovalProof::Badge;
    })
    .await?;
    let mut root = site.admin_client().await?;
    let mut agent = site.agent("pi-1", &[TERMINAL]).await?;
    // An intercom administrator's card, enrolled by the first administrator.
    root.add_operator(&operator("ic-1", &["intercom-admin"])).await?;
    let ic = site.card(Algorithm::EccP256)?;
    let card = root.enrol_card("ic-1", &ic.certificates[&Slot::Authentication], GwSlot::PivAuthentication).await?;
    assert_eq!(card.state, "pending");
    let Tap::Denied(d) = tap(&mut agent, TERMINAL, &mut ic.card(), "123456", pb::Mechanism::Unspecified).await? else { bail!("a pending card unlocked") };
    assert_eq!(d, pb::DenyReason::CardPending);
    let request = card.pending_request.clone();
    assert_eq!(root.requests(false).await?.iter().map(|r| r.request_id.clone()).collect::<Vec<_>>(), std::slice::from_ref(&request));

    // The one who asked cannot approve, not even with a badge at hand.
    let e = root.approve(&request).await.unwrap_err();
    assert!(e.to_string().contains("badge") || e.to_string().contains("own request"), "{e}");

    // A second administrator, whose badge is a card enrolled to the
    // operator with their name.
    let second = site.issue(pb::ServiceRole::Admin, "second").await?;
    let files = write_credentials(&second, &scratch("second-admin"))?;
    root.add_operator(&operator("second", &[])).await?;
    let badge = site.card(Algorithm::EccP256)?;
    root.enrol_card("second", &badge.certificates[&Slot::Authentication], GwSlot::PivAuthentication).await?;
    // Their certificate alone approves nothing at this site.
    let mut as_second = Admin::new(connect(&site.addr, "localhost", &second).await?);
    let e = as_second.approve(&request).await.unwrap_err();
    assert!(e.to_string().contains("badge"), "{e}");
    // Another card in the reader (not theirs): refused.
    let (station, addr) = r.second_slot();
    let ctx = pivgate_hw::pcsc::establish()?;
    let in_reader = |card: VirtualCard| -> Result<vpcd::Inserted> {
        let inserted = vpcd::insert(card, addr)?;
        if !pivgate_hw::pcsc::wait_for_card(&ctx, &station, true, T)? {
            bail!("the card never appeared in {station}");
        }
        Ok(inserted)
    };
    let out_of_reader = |inserted: vpcd::Inserted| -> Result<VirtualCard> {
        let card = inserted.remove();
        if !pivgate_hw::pcsc::wait_for_card(&ctx, &station, false, T)? {
            bail!("pcscd still sees a card in {station}");
        }
        Ok(card)
    };
    let inserted = in_reader(site.card(Algorithm::EccP256)?.card())?;
    let (ok, said) =
        tokio::task::block_in_place(|| ctl(&site, &files, &["request", "approve", &request, "--badge", "--reader", &station, "--pin-stdin"], "123456\n"));
    assert!(!ok, "approved with someone else's card: {said}");
    out_of_reader(inserted)?;
    // Their badge, wrong PIN: refused by the card, nothing approved.
    let inserted = in_reader(badge.card())?;
    let (ok, said) =
        tokio::task::block_in_place(|| ctl(&site, &files, &["request", "approve", &request, "--badge", "--reader", &station, "--pin-stdin"], "654321\n"));
    assert!(!ok && said.to_lowercase().contains("pin"), "{said}");
    let card_back = out_of_reader(inserted)?;
    assert_eq!(card_back.pin_tries(), 2, "{said}");
    // Their badge and its PIN: approved, and the badge named.
    let inserted = in_reader(card_back)?;
    let (ok, said) =
        tokio::task::block_in_place(|| ctl(&site, &files, &["request", "approve", &request, "--badge", "--reader", &station, "--pin-stdin"], "123456\n"));
    assert!(ok, "{said}");
    assert!(said.contains("approved") && said.contains("badge"), "{said}");
    let badge_back = out_of_reader(inserted)?;
    assert!(!badge_back.pin_verified(), "the badge kept a verified PIN");

    let Tap::Granted(_) = tap(&mut agent, TERMINAL, &mut ic.card(), "123456", pb::Mechanism::Unspecified).await? else {
        bail!("the approved card was refused")
    };
    let records = site.audit_after(0).await?;
    // The refused attempts are on record too.
    let refused = records.iter().filter(|r| r.kind == "rpc.refused" && r.detail_json.contains("AdminService.ApproveRequest")).count();
    assert!(refused >= 2, "refused approvals left {refused} records");
    let rec = records.into_iter().find(|r| r.kind == "admin.approve").expect("an approval record");
    let detail: serde_json::Value = serde_json::from_str(&rec.detail_json)?;
    assert_eq!(rec.actor, "admin:second");
    assert_eq!(detail["requested_by"], "admin:admin");
    assert_eq!(detail["badge"], badge.chuid.uuid_string());
    let listed = cards_of(&mut root, "ic-1").await?;
    assert_eq!((listed[0].state.as_str(), listed[0].approved_by.as_str()), ("active", "admin:second"));
    Ok(())
}

#[tokio::test]
async fn a_replacement_locks_the_old_cards_console_at_once_and_the_new_card_unlocks() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let old = site.enrolled_card("op-1", &["dispatcher"], Algorithm::EccP256).await?;
    let mut agent = site.agent("pi-1", &[TERMINAL]).await?;
    let Tap::Granted(_) = tap(&mut agent, TERMINAL, &mut old.card(), "123456", pb::Mechanism::Unspecified).await? else { bail!("refused") };
    let new = site.card(Algorithm::EccP256)?;
    let mut admin = site.admin_client().await?;
    let replacement = pb::EnrolCardRequest {
        operator_id: "op-1".into(),
        certificate: new.certificates[&Slot::Authentication].clone(),
        slot: pb::KeySlot::PivAuthentication as i32,
        ..Default::default()
    };
    let (card, locked) = admin.replace_card(&old.chuid.uuid_string(), replacement.clone(), "lost on the night shift").await?;
    assert_eq!(locked, [TERMINAL]);
    assert_eq!(card.operator_id, "op-1");
    assert!(!unlocked(&site).await?);
    let Tap::Denied(d) = tap(&mut agent, TERMINAL, &mut old.card(), "123456", pb::Mechanism::Unspecified).await? else { bail!("the old card unlocked") };
    assert_eq!(d, pb::DenyReason::RevokedDenyList);
    let Tap::Granted(_) = tap(&mut agent, TERMINAL, &mut new.card(), "123456", pb::Mechanism::Unspecified).await? else { bail!("the new card was refused") };
    // Both cards, with their history, stay with the operator.
    let r = admin.rpc().get_operator(pb::GetOperatorRequest { operator_id: "op-1".into() }).await?.into_inner();
    let states: Vec<(String, String)> = r.cards.iter().map(|c| (c.card_uuid.clone(), c.state.clone())).collect();
    assert!(states.contains(&(old.chuid.uuid_string(), "revoked".into())) && states.contains(&(new.chuid.uuid_string(), "active".into())), "{states:?}");
    let old_listed = r.cards.iter().find(|c| c.card_uuid == old.chuid.uuid_string()).unwrap();
    assert!(old_listed.history.iter().any(|n| n.what.contains("replaced by")), "{:?}", old_listed.history);
    // A revoked card cannot be replaced again; another operator's card
    // cannot be someone's replacement.
    assert!(admin.replace_card(&old.chuid.uuid_string(), replacement, "again").await.is_err());
    Ok(())
}

fn code<T>(r: std::result::Result<tonic::Response<T>, tonic::Status>) -> Option<tonic::Code> {
    r.err().map(|s| s.code())
}

#[tokio::test]
async fn applications_and_agents_cannot_enrol_open_windows_or_approve() -> Result<()> {
    let site = Site::start(|c, _| c.lifecycle.privileged_roles = vec!["intercom-admin".into()]).await?;
    let mut root = site.admin_client().await?;
    root.add_operator(&operator("ic-1", &["intercom-admin"])).await?;
    let ic = site.card(Algorithm::EccP256)?;
    let request = root.enrol_card("ic-1", &ic.certificates[&Slot::Authentication], GwSlot::PivAuthentication).await?.pending_request;
    site.agent("pi-1", &[TERMINAL]).await?;
    for role in [pb::ServiceRole::Application, pb::ServiceRole::Agent] {
        let creds = site.issue(role, &format!("{role:?}-x").to_lowercase()).await?;
        let mut as_other = pb::admin_service_client::AdminServiceClient::new(connect(&site.addr, "localhost", &creds).await?);
        let window = pb::OpenEnrolmentRequest { operator_id: "ic-1".into(), terminal_id: TERMINAL.into(), ..Default::default() };
        assert_eq!(code(as_other.open_enrolment(window).await), Some(tonic::Code::PermissionDenied), "{role:?} opened a window");
        let approve = pb::ApproveRequestRequest { request_id: request.clone(), ..Default::default() };
        assert_eq!(code(as_other.approve_request(approve).await), Some(tonic::Code::PermissionDenied), "{role:?} approved");
        let enrol = pb::EnrolCardRequest { operator_id: "ic-1".into(), certificate: ic.certificates[&Slot::Authentication].clone(), ..Default::default() };
        assert_eq!(code(as_other.enrol_card(enrol).await), Some(tonic::Code::PermissionDenied), "{role:?} enrolled");
    }
    // Still pending: nothing the others did counted.
    assert_eq!(root.requests(false).await?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_bootstrap_pair_an_administrator_certificate_needs_a_second_administrator() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let root = write_credentials(&site.admin_credentials()?, &scratch("root-admin"))?;
    // The bootstrap pair: the first administrator and one more, at once.
    let second = write_credentials(&site.issue(pb::ServiceRole::Admin, "second").await?, &scratch("second-admin"))?;
    // The new administrator makes their key; the first asks for its
    // certificate and gets a request, however often it asks.
    let keys = scratch("third-admin");
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &root, &["cert", "key", "--name", "third", "--out-dir", &keys.display().to_string()], ""));
    assert!(ok, "{said}");
    let fingerprint = said.rsplit(' ').next().unwrap_or_default().trim().to_string();
    let public = keys.join("third.pub").display().to_string();
    let out = scratch("third-cert").display().to_string();
    let ask = ["cert", "issue", "--role", "admin", "--name", "third", "--out-dir", &out, "--public-key", &public, "--days", "30"];
    for _ in 0..2 {
        let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &root, &ask, ""));
        assert!(ok && said.contains("pending") && said.contains(&fingerprint), "{said}");
        assert!(!std::path::Path::new(&out).join("third.pem").exists(), "issued alone: {said}");
    }
    let mut as_root = site.admin_client().await?;
    let [request] = as_root.requests(false).await?.try_into().map_err(|r| anyhow::anyhow!("requests: {r:?}"))?;
    assert_eq!((request.kind.as_str(), request.operator_id.as_str()), ("admin_certificate", "third"));
    // The one who asked cannot approve it.
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &root, &["request", "approve", &request.request_id], ""));
    assert!(!ok && said.contains("own request"), "{said}");
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &second, &["request", "approve", &request.request_id], ""));
    assert!(ok, "{said}");
    // Asked again: issued, and it works; once.
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &root, &ask, ""));
    assert!(ok && said.contains("third.pem"), "{said}");
    let third = pivgate_tests::site::CredentialFiles {
        ca: std::path::Path::new(&out).join("service-ca.pem"),
        cert: std::path::Path::new(&out).join("third.pem"),
        key: keys.join("third-key.pem"),
    };
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &third, &["request", "list", "--all"], ""));
    assert!(ok && said.contains(&request.request_id) && said.contains("approved"), "{said}");
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &root, &ask, ""));
    assert!(ok && said.contains("pending"), "one approval gave two certificates: {said}");
    let records = site.audit_after(0).await?;
    let issued = records.iter().filter(|r| r.kind == "admin.issue_certificate" && r.detail_json.contains("\"third\"")).collect::<Vec<_>>();
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert!(issued[0].detail_json.contains("admin:second"), "{}", issued[0].detail_json);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_pins_at_the_keypad_lock_the_operator_out_until_an_administrator_lifts_it() -> Result<()> {
    let r = reader()?;
    let site = Site::start(|c, _| {
        c.lifecycle.lockout_after = 2;
        c.lifecycle.free_failures = 5;
    })
    .await?;
    let mut admin = site.admin_client().await?;
    admin.add_operator(&operator("op-7", &["dispatcher"])).await?;
    let badge = site.card(Algorithm::EccP256)?;
    admin.enrol_card("op-7", &badge.certificates[&Slot::Authentication], GwSlot::PivAuthentication).await?;
    let agent = start_agent(&site, "pi-1", &[TerminalSpec { id: TERMINAL, reader: &r.name, keypad: true }]).await?;
    // Two taps, each a wrong PIN and then giving up: the card counts them,
    // and so does the gateway, from the agent's reports.
    let (result, card) = at_terminal(&agent, &r, badge.card(), "111111#*").await?;
    assert_eq!(result, TapResult::WrongPin { tries: 2 });
    let (result, card) = at_terminal(&agent, &r, card, "222222#*").await?;
    assert_eq!(result, TapResult::WrongPin { tries: 1 });
    // Locked out: even the right PIN is not asked for.
    let inserted = vpcd::insert(card, r.addr)?;
    assert_eq!(agent.next_result(TERMINAL, T).await?, TapResult::Denied(pb::DenyReason::LockedOut));
    let card = inserted.remove();
    let ctx = pivgate_hw::pcsc::establish()?;
    if !pivgate_hw::pcsc::wait_for_card(&ctx, &r.name, false, T)? {
        bail!("pcscd still sees a card in {}", r.name);
    }
    let records = site.audit_after(0).await?;
    assert_eq!(records.iter().filter(|r| r.kind == "auth.pin_failed").count(), 2);
    assert!(records.iter().any(|r| r.kind == "auth.lockout" && r.detail_json.contains("op-7")), "no lockout record");
    // An administrator lifts it, and the right PIN unlocks.
    let root = write_credentials(&site.admin_credentials()?, &scratch("root-admin-lockout"))?;
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &root, &["operator", "unlock", "op-7", "--reason", "verified at the desk"], ""));
    assert!(ok && said.contains("lifted"), "{said}");
    let (result, card) = at_terminal(&agent, &r, card, "123456#").await?;
    assert_granted(result, "op-7");
    assert_eq!(card.pin_tries(), 3, "the card's own counter reset by the right PIN");
    agent.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_review_lists_each_exception_made_and_nothing_else() -> Result<()> {
    let site = Site::start(|c, _| {
        c.lifecycle.privileged_roles = vec!["intercom-admin".into()];
        c.lifecycle.lockout_after = 1;
    })
    .await?;
    let root_files = write_credentials(&site.admin_credentials()?, &scratch("root-admin-review"))?;
    let review = |site: &Site| -> Result<Vec<(String, String)>> {
        let (ok, said) = tokio::task::block_in_place(|| ctl(site, &root_files, &["review", "--json"], ""));
        if !ok {
            bail!("review: {said}");
        }
        let mut rows = Vec::new();
        for line in said.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)?;
            assert!(!v["resolve"].as_str().unwrap_or_default().is_empty(), "no way to resolve {line}");
            rows.push((v["kind"].as_str().unwrap_or_default().to_string(), v["subject"].as_str().unwrap_or_default().to_string()));
        }
        rows.sort();
        Ok(rows)
    };
    let mut root = site.admin_client().await?;
    // Nothing out of the ordinary: an operator with an active card.
    root.add_operator(&operator("op-1", &["dispatcher"])).await?;
    let fine = site.card(Algorithm::EccP256)?;
    root.enrol_card("op-1", &fine.certificates[&Slot::Authentication], GwSlot::PivAuthentication).await?;
    assert_eq!(review(&site)?, vec![], "an ordinary site has exceptions");

    let mut expected: Vec<(String, String)> = Vec::new();
    fn want(expected: &mut Vec<(String, String)>, kind: &str, subject: &str) {
        expected.push((kind.to_string(), subject.to_string()));
    }
    // An operator with no card.
    root.add_operator(&operator("op-2", &["dispatcher"])).await?;
    want(&mut expected, "operator_without_card", "op-2");
    // A temporary card.
    root.add_operator(&operator("op-3", &["dispatcher"])).await?;
    let temp = site.card(Algorithm::EccP256)?;
    let req = pb::EnrolCardRequest {
        operator_id: "op-3".into(),
        certificate: temp.certificates[&Slot::Authentication].clone(),
        slot: pb::KeySlot::PivAuthentication as i32,
        temporary_days: 3,
        ..Default::default()
    };
    let card = root.rpc().enrol_card(req).await?.into_inner().card.unwrap_or_default();
    want(&mut expected, "temporary_card", &card.card_uuid);
    // A suspended card (and so an operator without an active one).
    root.add_operator(&operator("op-4", &["dispatcher"])).await?;
    let s = site.card(Algorithm::EccP256)?;
    let card = root.enrol_card("op-4", &s.certificates[&Slot::Authentication], GwSlot::PivAuthentication).await?;
    root.suspend_card(&card.card_uuid, "left in a locker").await?;
    want(&mut expected, "suspended_card", &card.card_uuid);
    want(&mut expected, "operator_without_card", "op-4");
    // A privileged card waiting, then approved by a second administrator
    // (whose certificate is listed, issued in the bootstrap pair).
    root.add_operator(&operator("ic-1", &["intercom-admin"])).await?;
    let ic = site.card(Algorithm::EccP256)?;
    let card = root.enrol_card("ic-1", &ic.certificates[&Slot::Authentication], GwSlot::PivAuthentication).await?;
    let mut now = expected.clone();
    now.extend([("operator_without_card".to_string(), "ic-1".to_string()), ("pending_request".to_string(), card.pending_request.clone())]);
    now.sort();
    assert_eq!(review(&site)?, now);
    let second = site.issue(pb::ServiceRole::Admin, "second").await?;
    Admin::new(connect(&site.addr, "localhost", &second).await?).approve(&card.pending_request).await?;
    want(&mut expected, "privileged_card", &card.card_uuid);
    want(&mut expected, "admin_certificate", "second");
    // A lockout (lockout_after = 1): one wrong PIN.
    root.add_operator(&operator("op-5", &["dispatcher"])).await?;
    let l = site.card(Algorithm::EccP256)?;
    root.enrol_card("op-5", &l.certificates[&Slot::Authentication], GwSlot::PivAuthentication).await?;
    let mut agent = site.agent("pi-1", &[TERMINAL, "ic-panel-1"]).await?;
    assert!(tap(&mut agent, TERMINAL, &mut l.card(), "000000", pb::Mechanism::Unspecified).await.is_err(), "a wrong PIN unlocked");
    want(&mut expected, "locked_out", "op-5");
    // A terminal of a group with a policy of its own, weaker.
    let panels = TerminalPolicy { allowed_roles: vec!["intercom-admin".into()], ..Default::default() };
    root.set_terminal_group("panels", &panels).await?;
    root.assign_terminal("ic-panel-1", Some("panels")).await?;
    root.set_terminal_policy("ic-panel-1", &TerminalPolicy::default()).await?;
    want(&mut expected, "weaker_terminal", "ic-panel-1");
    expected.sort();
    assert_eq!(review(&site)?, expected);
    // The table for people says the same, with the ways to resolve.
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &root_files, &["review"], ""));
    assert!(ok && said.contains("pivgatectl operator unlock op-5"), "{said}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_takes_two_administrators_works_only_while_granted_and_is_in_the_review() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let root = write_credentials(&site.admin_credentials()?, &scratch("root-admin-bg"))?;
    let second = write_credentials(&site.issue(pb::ServiceRole::Admin, "second").await?, &scratch("second-admin-bg"))?;
    let mut admin = site.admin_client().await?;
    admin.add_operator(&operator("op-9", &["dispatcher"])).await?;
    let mut agent = site.agent("pi-1", &[TERMINAL, "lobby"]).await?;
    let loaner = site.card(Algorithm::EccP256)?;
    let cert = scratch("loaner").join("9a.der");
    std::fs::create_dir_all(cert.parent().unwrap_or(std::path::Path::new(".")))?;
    std::fs::write(&cert, &loaner.certificates[&Slot::Authentication])?;
    let ask = [
        "break-glass",
        "request",
        "--operator",
        "op-9",
        "--terminal",
        TERMINAL,
        "--hours",
        "1",
        "--cert",
        &cert.display().to_string(),
        "--reason",
        "badge at home",
    ];
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &root, &ask, ""));
    assert!(ok && said.contains("BREAK-GLASS"), "{said}");
    let id = said.split_whitespace().nth(1).unwrap_or_default().to_string();
    // Nothing until a second administrator approves, and never the asker.
    let Tap::Denied(d) = tap(&mut agent, TERMINAL, &mut loaner.card(), "123456", pb::Mechanism::Unspecified).await? else { bail!("unlocked before approval") };
    assert_eq!(d, pb::DenyReason::UnknownCard);
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &root, &["request", "approve", &id], ""));
    assert!(!ok && said.contains("own request"), "{said}");
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &second, &["request", "approve", &id], ""));
    assert!(ok, "{said}");
    // In force at the named terminal, as the operator; not elsewhere.
    let Tap::Granted(g) = tap(&mut agent, TERMINAL, &mut loaner.card(), "123456", pb::Mechanism::Unspecified).await? else { bail!("break-glass refused") };
    assert_eq!(g.operator_id, "op-9");
    let Tap::Denied(_) = tap(&mut agent, "lobby", &mut loaner.card(), "123456", pb::Mechanism::Unspecified).await? else { bail!("break-glass held elsewhere") };
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &root, &["review", "--json"], ""));
    assert!(ok && said.lines().any(|l| l.contains("\"break_glass\"") && l.contains(&id) && l.contains("IN FORCE")), "{said}");
    // Ended now: the session locks and the card is refused.
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &root, &["break-glass", "end", &id, "--reason", "badge brought in"], ""));
    assert!(ok && said.contains(TERMINAL), "{said}");
    assert!(!unlocked(&site).await?, "the break-glass session outlived its end");
    let Tap::Denied(_) = tap(&mut agent, TERMINAL, &mut loaner.card(), "123456", pb::Mechanism::Unspecified).await? else {
        bail!("an ended break-glass unlocked")
    };
    let records = site.audit_after(0).await?;
    let uses = records.iter().filter(|r| r.kind == "auth.granted" && r.detail_json.contains(&id)).count();
    assert_eq!(uses, 1, "each use on record, naming the grant");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_break_glass_by_presence_is_opened_by_the_approvers_own_badge_at_the_terminal_and_locks_when_it_ends() -> Result<()> {
    let r = reader()?;
    let site = Site::start(|c, _| c.lifecycle.break_glass_proof = pivgate_gateway::model::BreakGlassProof::ApproverPresent).await?;
    let root = write_credentials(&site.admin_credentials()?, &scratch("root-admin-bgp"))?;
    let second_creds = site.issue(pb::ServiceRole::Admin, "second").await?;
    let asker = write_credentials(&site.issue_approved_admin("asker", &second_creds).await?, &scratch("asker-admin-bgp"))?;
    let second = write_credentials(&second_creds, &scratch("second-admin-bgp"))?;
    let mut admin = site.admin_client().await?;
    admin.add_operator(&operator("op-9", &["dispatcher"])).await?;
    admin.add_operator(&operator("second", &["dispatcher"])).await?;
    // The approver's badge, enrolled by another administrator (root).
    let badge = site.card(Algorithm::EccP256)?;
    admin.enrol_card("second", &badge.certificates[&Slot::Authentication], GwSlot::PivAuthentication).await?;
    let mut agent = site.agent("pi-1", &[TERMINAL, "lobby"]).await?;
    let ask = ["break-glass", "request", "--operator", "op-9", "--terminal", TERMINAL, "--hours", "1", "--reason", "badge at home"];
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &asker, &ask, ""));
    assert!(ok && said.contains("approver must be present"), "{said}");
    let id = said.split_whitespace().nth(1).unwrap_or_default().to_string();
    // The certificate alone cannot stand for presence.
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &second, &["request", "approve", &id], ""));
    assert!(!ok && said.contains("badge"), "{said}");
    // The approver's badge signs in a reader, card and PIN: it is the card
    // that opens the grant.
    let (station, addr) = r.second_slot();
    let inserted = vpcd::insert(badge.card(), addr)?;
    let ctx = pivgate_hw::pcsc::establish()?;
    if !pivgate_hw::pcsc::wait_for_card(&ctx, &station, true, T)? {
        bail!("the badge never appeared in {station}");
    }
    let (ok, said) =
        tokio::task::block_in_place(|| ctl(&site, &second, &["request", "approve", &id, "--badge", "--reader", &station, "--pin-stdin"], "123456\n"));
    assert!(ok, "{said}");
    inserted.remove();
    // The approver's badge, card and PIN, at the named terminal: op-9's
    // session; elsewhere, the badge is its holder's.
    let Tap::Granted(g) = tap(&mut agent, TERMINAL, &mut badge.card(), "123456", pb::Mechanism::Unspecified).await? else { bail!("presence refused") };
    assert_eq!(g.operator_id, "op-9");
    let Tap::Granted(g) = tap(&mut agent, "lobby", &mut badge.card(), "123456", pb::Mechanism::Unspecified).await? else { bail!("badge refused elsewhere") };
    assert_eq!(g.operator_id, "second");
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &root, &["review", "--json"], ""));
    assert!(ok && said.lines().any(|l| l.contains(&id) && l.contains("IN FORCE") && l.contains("second's own badge")), "{said}");
    let (ok, said) = tokio::task::block_in_place(|| ctl(&site, &root, &["break-glass", "end", &id, "--reason", "badge brought in"], ""));
    assert!(ok && said.contains(TERMINAL), "{said}");
    let mut c = site.application("checker").await?;
    let s = c.get_terminal_state(pb::GetTerminalStateRequest { terminal_id: TERMINAL.into() }).await?.into_inner().state.unwrap_or_default();
    assert_eq!((s.unlocked, s.lock_reason), (false, pb::LockReason::BreakGlassEnded as i32), "{s:?}");
    let records = site.audit_after(0).await?;
    assert!(records.iter().any(|r| r.kind == "auth.granted" && r.detail_json.contains(&id) && r.detail_json.contains("\"present\":\"second\"")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_locks_a_console_without_activity_and_not_one_with_activity() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let mut admin = site.admin_client().await?;
    let mut agent = site.agent("pi-1", &[TERMINAL, "lobby"]).await?;
    let idle = TerminalPolicy { idle_timeout_s: 3, ..Default::default() };
    let mut cards = Vec::new();
    for (op, terminal) in [("op-a", TERMINAL), ("op-b", "lobby")] {
        admin.set_terminal_policy(terminal, &idle).await?;
        admin.add_operator(&operator(op, &["dispatcher"])).await?;
        let c = site.card(Algorithm::EccP256)?;
        admin.enrol_card(op, &c.certificates[&Slot::Authentication], GwSlot::PivAuthentication).await?;
        let Tap::Granted(_) = tap(&mut agent, terminal, &mut c.card(), "123456", pb::Mechanism::Unspecified).await? else { bail!("{op} refused") };
        cards.push(c);
    }
    let mut console = site.application("dispatch-console").await?;
    let state = |mut c: pb::access_service_client::AccessServiceClient<tonic::transport::Channel>, t: &'static str| async move {
        Ok::<_, anyhow::Error>(c.get_terminal_state(pb::GetTerminalStateRequest { terminal_id: t.into() }).await?.into_inner().state.unwrap_or_default())
    };
    // Before any report, no idle timeout holds (the policy says so).
    assert!(!state(console.clone(), "lobby").await?.idle_enforced);
    // The console reports activity at both, then only at dispatch-01.
    for t in [TERMINAL, "lobby"] {
        let r = console.report_activity(pb::ReportActivityRequest { terminal_id: t.into() }).await?.into_inner();
        assert_eq!(r.idle_timeout_s, 3);
    }
    assert!(state(console.clone(), "lobby").await?.idle_enforced);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        console.report_activity(pb::ReportActivityRequest { terminal_id: TERMINAL.into() }).await?;
        let lobby = state(console.clone(), "lobby").await?;
        if !lobby.unlocked {
            assert_eq!(lobby.lock_reason(), pb::LockReason::IdleTimeout);
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the idle console never locked");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Two more idle timeouts of activity: dispatch-01 stays unlocked.
    for _ in 0..12 {
        console.report_activity(pb::ReportActivityRequest { terminal_id: TERMINAL.into() }).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let busy = state(console.clone(), TERMINAL).await?;
    assert!(busy.unlocked, "a console with activity locked: {:?}", busy.lock_reason());
    Ok(())
}
