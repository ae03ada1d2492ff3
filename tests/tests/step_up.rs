//! Step-up end to end: an application (an intercom admin panel) asks the
//! operator at an unlocked console to prove again before a risky action;
//! the real agent prompts and the operator's virtual card, behind the real
//! pcscd, signs the action after its PIN; the token is honoured once over
//! real gRPC with mutual TLS, and another operator's card is refused.

use std::time::Duration;

use anyhow::{bail, Result};
use pivgate_agent::terminal::TapResult;
use pivgate_gateway::model::{Operator, Slot as GwSlot, TerminalPolicy};
use pivgate_hw::indicator::Pattern;
use pivgate_hw::piv::{Algorithm, Slot};
use pivgate_proto::v1 as pb;
use pivgate_tests::agent::{assert_granted, start_agent, TerminalSpec};
use pivgate_tests::reader;
use pivgate_tests::site::Site;
use pivgate_vcard::vpcd;
use sha2::Digest;

const T: Duration = Duration::from_secs(20);
const TERMINAL: &str = "ic-panel-1";
const ACTION: &str = "reconfigure intercom 4";

fn operator(id: &str) -> Operator {
    Operator { id: id.into(), name: format!("Operator {id}"), roles: vec!["intercom-admin".into()], enabled: true }
}

fn ask(params: &[u8]) -> pb::StepUpRequest {
    pb::StepUpRequest { terminal_id: TERMINAL.into(), action: ACTION.into(), params_sha256: sha2::Sha256::digest(params).to_vec(), timeout_ms: 20_000 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_up_is_proven_at_the_console_honoured_once_and_refused_for_another_operators_card() -> Result<()> {
    let r = reader()?;
    let site = Site::start(|_, _| {}).await?;
    let mut admin = site.admin_client().await?;
    admin.add_operator(&operator("op-1")).await?;
    admin.add_operator(&operator("op-2")).await?;
    let mine = site.card(Algorithm::EccP256)?;
    admin.enrol_card("op-1", &mine.certificates[&Slot::Authentication], GwSlot::PivAuthentication).await?;
    let theirs = site.card(Algorithm::EccP256)?;
    admin.enrol_card("op-2", &theirs.certificates[&Slot::Authentication], GwSlot::PivAuthentication).await?;
    let agent = start_agent(&site, "pi-1", &[TerminalSpec { id: TERMINAL, reader: &r.name, keypad: true }]).await?;
    // A short grace after the card leaves, so another card can be shown
    // while op-1's session stands.
    admin.set_terminal_policy(TERMINAL, &TerminalPolicy { removal_grace_s: 30, ..Default::default() }).await?;

    // op-1 unlocks; the card stays in the (contact) reader.
    let since = agent.history(TERMINAL).len();
    let inserted = vpcd::insert(mine.card(), r.addr)?;
    agent.wait_pattern(TERMINAL, Pattern::EnterPin, since, T).await?;
    agent.type_keys(TERMINAL, "123456#");
    assert_granted(agent.next_result(TERMINAL, T).await?, "op-1");

    // The panel asks; the agent prompts and asks the card in the reader
    // for its PIN at once.
    let panel = site.application("intercom-panel").await?;
    let since = agent.history(TERMINAL).len();
    let call = tokio::spawn({
        let mut p = panel.clone();
        async move { p.step_up(ask(b"gain=7")).await }
    });
    let at = agent.wait_pattern(TERMINAL, Pattern::StepUp, since, T).await?;
    agent.wait_pattern(TERMINAL, Pattern::EnterPin, at, T).await?;
    agent.type_keys(TERMINAL, "123456#");
    assert_eq!(agent.next_result(TERMINAL, T).await?, TapResult::SteppedUp("op-1".into()));
    let granted = call.await??.into_inner();
    assert_eq!(granted.outcome(), pb::StepUpOutcome::Granted, "{granted:?}");
    assert_eq!((granted.operator_id.as_str(), granted.token.len()), ("op-1", 32));

    // The component doing the action redeems it: once, for that action and
    // those parameters.
    let mut controller = site.application("intercom-controller").await?;
    let redeem = pb::RedeemStepUpRequest {
        token: granted.token.clone(),
        terminal_id: TERMINAL.into(),
        action: ACTION.into(),
        params_sha256: sha2::Sha256::digest(b"gain=7").to_vec(),
    };
    let proven = controller.redeem_step_up(redeem.clone()).await?.into_inner();
    assert_eq!((proven.operator_id.as_str(), proven.card_uuid.as_slice()), ("op-1", mine.chuid.guid.as_slice()));
    let replay = controller.redeem_step_up(redeem).await.unwrap_err();
    assert_eq!(replay.code(), tonic::Code::FailedPrecondition, "{replay}");

    // op-1's card leaves (the grace keeps the session); the panel asks
    // again and op-2's card is shown: refused before any PIN, and the
    // panel hears why.
    inserted.remove();
    let ctx = pivgate_hw::pcsc::establish()?;
    if !pivgate_hw::pcsc::wait_for_card(&ctx, &r.name, false, T)? {
        bail!("pcscd still sees a card in {}", r.name);
    }
    let since = agent.history(TERMINAL).len();
    let call = tokio::spawn({
        let mut p = panel.clone();
        async move { p.step_up(ask(b"gain=9")).await }
    });
    agent.wait_pattern(TERMINAL, Pattern::StepUp, since, T).await?;
    let other = vpcd::insert(theirs.card(), r.addr)?;
    assert_eq!(agent.next_result(TERMINAL, T).await?, TapResult::Denied(pb::DenyReason::StepUpOtherOperator));
    let refused = call.await??.into_inner();
    assert_eq!((refused.outcome(), refused.deny_reason()), (pb::StepUpOutcome::Denied, pb::DenyReason::StepUpOtherOperator));
    other.remove();
    let kinds: Vec<String> = site.audit_after(0).await?.into_iter().map(|r| r.kind).collect();
    for k in ["stepup.granted", "stepup.redeemed", "stepup.replayed"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} in {kinds:?}");
    }
    // Only an application asks for a step-up.
    let agent_creds = site.issue(pb::ServiceRole::Agent, "pi-9").await?;
    let mut as_agent = pb::access_service_client::AccessServiceClient::new(pivgate_gateway::client::connect(&site.addr, "localhost", &agent_creds).await?);
    assert_eq!(as_agent.step_up(ask(b"x")).await.unwrap_err().code(), tonic::Code::PermissionDenied);
    agent.stop().await
}
