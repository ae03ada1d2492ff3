//! What operators of the gateway rely on: the standard health service and
//! server reflection (so grpcurl works), and a restart that keeps
//! everything.

use anyhow::Result;
use pivgate_hw::piv::Algorithm;
use pivgate_proto::v1 as pb;
use pivgate_tests::site::{tap, Site, Tap};
use tokio_stream::StreamExt;

#[tokio::test]
async fn health_and_reflection_answer_over_mutual_tls() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let ch = pivgate_gateway::client::connect(&site.addr, "localhost", &site.issue(pb::ServiceRole::Application, "probe").await?).await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for svc in ["pivgate.v1.AgentService", "pivgate.v1.AccessService", "pivgate.v1.AdminService"] {
        let r = health.check(tonic_health::pb::HealthCheckRequest { service: svc.into() }).await?.into_inner();
        assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32, "{svc}");
    }
    use tonic_reflection::pb::v1::{server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest, server_reflection_response::MessageResponse, ServerReflectionRequest};
    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut stream = refl.server_reflection_info(tokio_stream::iter(vec![req])).await?.into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = stream.next().await.transpose()?.and_then(|r| r.message_response) else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for svc in ["pivgate.v1.AgentService", "pivgate.v1.AccessService", "pivgate.v1.AdminService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == svc), "{svc} missing from {names:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_restarted_gateway_keeps_sessions_enrolments_sequence_and_audit_chain() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let mut agent = site.agent("pi-1", &["t1"]).await?;
    let Tap::Granted(g) = tap(&mut agent, "t1", &mut profile.card(), "123456", pb::Mechanism::Unspecified).await? else { panic!() };
    let records = site.audit_len().await?;

    let site = site.restart().await?;
    let state = site.application("c").await?.get_terminal_state(pb::GetTerminalStateRequest { terminal_id: "t1".into() }).await?;
    let state = state.into_inner().state.unwrap();
    assert!(state.unlocked && state.operator_id == "op-1" && state.sequence == g.sequence);
    let v = site.admin().await?.verify_audit(pb::VerifyAuditRequest {}).await?.into_inner();
    assert!(v.intact && v.records >= records);
    // The next event continues the sequence.
    let mut agent = site.agent("pi-1", &["t1"]).await?;
    let r = agent.report_card_removed(pb::ReportCardRemovedRequest { terminal_id: "t1".into(), card_uuid: vec![] }).await?.into_inner();
    assert!(r.locked);
    let state = site.application("c").await?.get_terminal_state(pb::GetTerminalStateRequest { terminal_id: "t1".into() }).await?;
    assert_eq!(state.into_inner().state.unwrap().sequence, g.sequence + 1);
    Ok(())
}
