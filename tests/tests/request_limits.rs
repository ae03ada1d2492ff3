//! Callers who send too much: a megabyte in a name, a flood of refusals,
//! more watchers than allowed, a second presence stream. Each is refused or
//! absorbed without writing more than a bounded amount into the audit log.
//! Real gateway, mutual TLS on loopback, sled on disk.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Result};
use pivgate_proto::v1 as pb;
use pivgate_tests::site::Site;
use tonic::Code;

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The call was refused as too large: INVALID_ARGUMENT naming the field
/// (over a field's limit) or, for a whole megabyte, the message limit.
fn too_large<T: std::fmt::Debug>(what: &str, r: Result<tonic::Response<T>, tonic::Status>, field: Option<&str>) -> Result<()> {
    match r {
        Ok(r) => bail!("{what}: accepted: {r:?}"),
        Err(s) if s.code() == Code::InvalidArgument && field.is_none_or(|f| s.message().contains(f)) => Ok(()),
        Err(s) if field.is_none() && matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted) => Ok(()),
        Err(s) => bail!("{what}: refused with {:?}: {}", s.code(), s.message()),
    }
}

#[tokio::test]
async fn an_oversized_field_in_any_call_is_refused_and_stores_nothing() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let mut admin = site.admin().await?;
    let mut agent = site.agent("pi-1", &["t1"]).await?;
    let mut app = site.application("console").await?;
    let before_audit = site.audit_len().await?;
    let before_size = dir_size(&site.config.data_dir.join("db"));

    for (big, field) in [("x".repeat(1 << 20), None), ("x".repeat(1000), Some("")), ("bell\u{7}".to_string(), Some(""))] {
        // The field named in each refusal, when the message itself fits.
        let f = |name: &'static str| field.map(|_| name);
        let op = |id: &str, name: &str, roles: Vec<String>| pb::AddOperatorRequest {
            operator: Some(pb::Operator { operator_id: id.into(), name: name.into(), roles, enabled: true }),
        };
        too_large("AddOperator.operator_id", admin.add_operator(op(&big, "n", vec![])).await, f("operator.operator_id"))?;
        if big.len() > 300 {
            too_large("AddOperator.name", admin.add_operator(op("op-1", &big, vec![])).await, f("operator.name"))?;
        }
        too_large("AddOperator.roles", admin.add_operator(op("op-1", "n", vec![big.clone()])).await, f("operator.roles"))?;
        too_large("GetOperator", admin.get_operator(pb::GetOperatorRequest { operator_id: big.clone() }).await, f("operator_id"))?;
        too_large(
            "EnrolCard",
            admin.enrol_card(pb::EnrolCardRequest { operator_id: big.clone(), certificate: vec![], slot: 1, ..Default::default() }).await,
            f("operator_id"),
        )?;
        // An attestation is a certificate: bounded like one.
        let huge = vec![0x30; 17 * 1024];
        let att =
            pb::EnrolCardRequest { operator_id: "op-1".into(), slot: 1, attestation: huge.clone(), attestation_intermediate: vec![0x30], ..Default::default() };
        too_large("EnrolCard.attestation", admin.enrol_card(att).await, f("attestation"))?;
        let inter = pb::EnrolCardRequest { operator_id: "op-1".into(), slot: 1, attestation: vec![0x30], attestation_intermediate: huge, ..Default::default() };
        too_large("EnrolCard.attestation_intermediate", admin.enrol_card(inter).await, f("attestation_intermediate"))?;
        if big.len() > 300 {
            too_large(
                "RevokeCard.reason",
                admin.revoke_card(pb::RevokeCardRequest { card_uuid: "00000000-0000-0000-0000-000000000000".into(), reason: big.clone() }).await,
                f("reason"),
            )?;
        }
        too_large("BindAgent.agent_name", admin.bind_agent(pb::BindAgentRequest { agent_name: big.clone(), terminal_ids: vec![] }).await, f("agent_name"))?;
        too_large(
            "BindAgent.terminal_ids",
            admin.bind_agent(pb::BindAgentRequest { agent_name: "pi-1".into(), terminal_ids: vec![big.clone()] }).await,
            f("terminal_ids"),
        )?;
        too_large(
            "SetTerminalPolicy.terminal_id",
            admin.set_terminal_policy(pb::SetTerminalPolicyRequest { terminal_id: big.clone(), allowed_mechanisms: vec![1], ..Default::default() }).await,
            f("terminal_id"),
        )?;
        too_large(
            "SetTerminalPolicy.allowed_roles",
            admin
                .set_terminal_policy(pb::SetTerminalPolicyRequest {
                    terminal_id: "t1".into(),
                    allowed_mechanisms: vec![1],
                    allowed_roles: vec![big.clone()],
                    ..Default::default()
                })
                .await,
            f("allowed_roles"),
        )?;
        too_large("LockTerminal", admin.lock_terminal(pb::LockTerminalRequest { terminal_id: big.clone() }).await, f("terminal_id"))?;
        too_large(
            "IssueCertificate",
            admin.issue_certificate(pb::IssueCertificateRequest { role: 1, name: big.clone(), public_key: vec![], validity_days: 1 }).await,
            f("name"),
        )?;
        too_large(
            "BeginAuthentication",
            agent.rpc().begin_authentication(pb::BeginAuthenticationRequest { terminal_id: big.clone(), card_uuid: vec![0; 16], ..Default::default() }).await,
            f("terminal_id"),
        )?;
        too_large(
            "CompleteAuthentication",
            agent
                .rpc()
                .complete_authentication(pb::CompleteAuthenticationRequest { challenge_id: vec![0; 16], terminal_id: big.clone(), signature: vec![] })
                .await,
            f("terminal_id"),
        )?;
        too_large(
            "ReportCardRemoved",
            agent.rpc().report_card_removed(pb::ReportCardRemovedRequest { terminal_id: big.clone(), card_uuid: vec![] }).await,
            f("terminal_id"),
        )?;
        too_large("GetTerminalState", app.get_terminal_state(pb::GetTerminalStateRequest { terminal_id: big.clone() }).await, f("terminal_id"))?;
        too_large("WatchEvents", app.watch_events(pb::WatchEventsRequest { after_sequence: 0, terminal_ids: vec![big.clone()] }).await, f("terminal_ids"))?;
        // A presence message with an oversized terminal ends the stream
        // with INVALID_ARGUMENT.
        let report =
            pb::PresenceRequest { agent_version: "test".into(), terminals: vec![pb::TerminalReport { terminal_id: big.clone(), ..Default::default() }] };
        let mut replies = agent.rpc().presence(tokio_stream::iter(vec![report])).await?.into_inner();
        match tokio::time::timeout(Duration::from_secs(5), replies.message()).await? {
            Err(s) if s.code() == Code::InvalidArgument || (field.is_none() && s.code() == Code::OutOfRange) => {}
            other => bail!("Presence with an oversized terminal: {other:?}"),
        }
    }
    // A list longer than allowed.
    too_large(
        "WatchEvents.terminal_ids",
        app.watch_events(pb::WatchEventsRequest { after_sequence: 0, terminal_ids: vec!["t".into(); 1000] }).await,
        Some("terminal_ids"),
    )?;

    assert_eq!(site.audit_len().await?, before_audit, "a refused request reached the audit log");
    let grown = dir_size(&site.config.data_dir.join("db")).saturating_sub(before_size);
    assert!(grown < 64 * 1024, "the database grew by {grown} bytes");
    Ok(())
}

#[tokio::test]
async fn a_flood_of_refusals_from_one_caller_writes_at_most_its_budget() -> Result<()> {
    let site = Site::start(|c, _| {
        c.limits.audit_burst = 10;
        c.limits.audit_per_minute = 60;
        c.limits.audit_summary_s = 1;
    })
    .await?;
    let mut agent = site.agent("pi-1", &["t1"]).await?;
    let mut app = site.application("console").await?;
    let before = site.audit_len().await?;
    let started = std::time::Instant::now();
    const N: usize = 300;
    for i in 0..N {
        let r = agent
            .rpc()
            .complete_authentication(pb::CompleteAuthenticationRequest { challenge_id: vec![i as u8; 16], terminal_id: "t1".into(), signature: vec![1] })
            .await?
            .into_inner();
        // Every one is still refused.
        assert!(matches!(r.outcome, Some(pb::complete_authentication_response::Outcome::Denied(_))), "{r:?}");
    }
    // An application calling the Agent API, as often.
    let mut wrong = pb::agent_service_client::AgentServiceClient::new(
        pivgate_gateway::client::connect(&site.addr, "localhost", &site.issue(pb::ServiceRole::Application, "intruder").await?).await?,
    );
    for _ in 0..N {
        let e = wrong.report_card_removed(pb::ReportCardRemovedRequest { terminal_id: "t1".into(), card_uuid: vec![] }).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
    }
    let _ = &mut app;
    let elapsed = started.elapsed().as_secs() + 1;
    // The summaries arrive within a couple of intervals.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let records = site.audit_after(before).await?;
    let denied = records.iter().filter(|r| r.kind == "auth.denied" && r.actor == "agent:pi-1").count();
    let refused = records.iter().filter(|r| r.kind == "rpc.refused" && r.actor == "application:intruder").count();
    let budget = 10 + elapsed as usize + 3;
    assert!(denied <= budget, "{denied} denial records for {N} denials (budget {budget})");
    assert!(refused <= budget, "{refused} refusal records for {N} refusals (budget {budget})");
    // Nothing silently lost: recorded plus summarised is everything.
    let mut suppressed = std::collections::HashMap::<(String, String), u64>::new();
    for r in records.iter().filter(|r| r.kind == "audit.suppressed") {
        let d: serde_json::Value = serde_json::from_str(&r.detail_json)?;
        for e in d["suppressed"].as_array().into_iter().flatten() {
            *suppressed.entry((e["caller"].as_str().unwrap_or("").into(), e["kind"].as_str().unwrap_or("").into())).or_default() +=
                e["count"].as_u64().unwrap_or(0);
        }
    }
    assert_eq!(denied as u64 + suppressed.get(&("agent:pi-1".into(), "auth.denied".into())).copied().unwrap_or(0), N as u64);
    assert_eq!(refused as u64 + suppressed.get(&("application:intruder".into(), "rpc.refused".into())).copied().unwrap_or(0), N as u64);
    // Another caller is not affected by the flood.
    let mut other = site.agent("pi-2", &["t2"]).await?;
    let before = site.audit_len().await?;
    other.rpc().complete_authentication(pb::CompleteAuthenticationRequest { challenge_id: vec![0; 16], terminal_id: "t2".into(), signature: vec![1] }).await?;
    assert!(site.audit_after(before).await?.iter().any(|r| r.kind == "auth.denied" && r.actor == "agent:pi-2"));
    Ok(())
}

#[tokio::test]
async fn racing_watchers_cannot_pass_the_caps() -> Result<()> {
    let site = Site::start(|c, _| {
        c.limits.max_watchers_per_caller = 4;
        c.limits.max_watchers = 6;
    })
    .await?;
    let app = site.application("console").await?;
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let mut app = app.clone();
            tokio::spawn(async move { app.watch_events(pb::WatchEventsRequest { after_sequence: 0, terminal_ids: vec![] }).await })
        })
        .collect();
    let mut open = Vec::new();
    let mut exhausted = 0;
    for c in calls {
        match c.await? {
            Ok(s) => open.push(s.into_inner()),
            Err(s) if s.code() == Code::ResourceExhausted => exhausted += 1,
            Err(s) => bail!("unexpected {s:?}"),
        }
    }
    assert_eq!(open.len(), 4, "{} watchers for one caller with a cap of 4", open.len());
    assert_eq!(exhausted, 36);
    // The global cap holds across callers too.
    let other = site.application("wallboard").await?;
    let mut more = Vec::new();
    for _ in 0..5 {
        if let Ok(s) = other.clone().watch_events(pb::WatchEventsRequest { after_sequence: 0, terminal_ids: vec![] }).await {
            more.push(s);
        }
    }
    assert_eq!(more.len(), 2);
    // Closing watchers gives their places back.
    drop(open);
    let mut again = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if app.clone().watch_events(pb::WatchEventsRequest { after_sequence: 0, terminal_ids: vec![] }).await.is_ok() {
            again += 1;
            break;
        }
    }
    assert_eq!(again, 1, "a closed watcher's place was never given back");
    Ok(())
}

#[tokio::test]
async fn a_new_presence_stream_replaces_the_old_one() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let mut agent = site.agent("pi-1", &["t1"]).await?;
    let (tx1, rx1) = tokio::sync::mpsc::channel::<pb::PresenceRequest>(4);
    let mut first = agent.rpc().presence(tokio_stream::wrappers::ReceiverStream::new(rx1)).await?.into_inner();
    tx1.send(pb::PresenceRequest { agent_version: "a".into(), terminals: vec![] }).await?;
    first.message().await?.expect("a reply on the first stream");
    let (tx2, rx2) = tokio::sync::mpsc::channel::<pb::PresenceRequest>(4);
    let mut second = agent.rpc().presence(tokio_stream::wrappers::ReceiverStream::new(rx2)).await?.into_inner();
    tx2.send(pb::PresenceRequest { agent_version: "b".into(), terminals: vec![] }).await?;
    second.message().await?.expect("a reply on the second stream");
    // The first one is over.
    match tokio::time::timeout(Duration::from_secs(5), first.message()).await? {
        Ok(None) | Err(_) => {}
        Ok(Some(m)) => bail!("the replaced stream still answers: {m:?}"),
    }
    tx2.send(pb::PresenceRequest { agent_version: "b".into(), terminals: vec![] }).await?;
    second.message().await?.expect("the new stream goes on");
    let _ = tx1;
    Ok(())
}
