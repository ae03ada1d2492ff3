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
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut refl = ServerReflectionClient::new(ch.clone());
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut stream = refl.server_reflection_info(tokio_stream::iter(vec![req])).await?.into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) = stream.next().await.transpose()?.and_then(|r| r.message_response) else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for svc in ["pivgate.v1.AgentService", "pivgate.v1.AccessService", "pivgate.v1.AdminService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == svc), "{svc} missing from {names:?}");
    }
    // v1alpha too: Python's grpcio-reflection and older grpcurl ask for it.
    {
        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut refl = ServerReflectionClient::new(ch);
        let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
        let mut stream = refl.server_reflection_info(tokio_stream::iter(vec![req])).await?.into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) = stream.next().await.transpose()?.and_then(|r| r.message_response) else {
            panic!("no v1alpha service list");
        };
        assert!(list.service.iter().any(|s| s.name == "pivgate.v1.AdminService"), "{:?}", list.service);
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
    let r = agent.rpc().report_card_removed(pb::ReportCardRemovedRequest { terminal_id: "t1".into(), card_uuid: vec![] }).await?.into_inner();
    assert!(r.locked);
    let state = site.application("c").await?.get_terminal_state(pb::GetTerminalStateRequest { terminal_id: "t1".into() }).await?;
    assert_eq!(state.into_inner().state.unwrap().sequence, g.sequence + 1);
    Ok(())
}

/// Serves `body` to every HTTP request on a loopback port; returns the port.
async fn serve_once_forever(body: Vec<u8>) -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = l.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let head = format!("HTTP/1.1 200 OK\r\ncontent-type: application/pkix-crl\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&body).await;
            });
        }
    });
    Ok(port)
}

async fn http_get(port: u16) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

#[tokio::test]
async fn metrics_and_crls_fetched_over_http() -> Result<()> {
    let issuer = pivgate_vcard::IssuingCa::generate("issuer")?;
    let now = time::OffsetDateTime::now_utc();
    let crl = issuer.crl(&[], now - time::Duration::minutes(10), now + time::Duration::days(1), 7)?;
    let crl_port = serve_once_forever(crl).await?;
    let metrics_port = pivgate_tests::process::free_port()?;
    let site = Site::start_with_issuer(issuer, move |c, _| {
        c.metrics_listen = Some(format!("127.0.0.1:{metrics_port}").parse().unwrap());
        c.cards.crl_urls = vec![format!("http://127.0.0.1:{crl_port}/issuer.crl"), "http://127.0.0.1:9/dead.crl".into()];
        c.cards.crl_fetch_timeout_s = 2;
    })
    .await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let mut agent = site.agent("pi-1", &["t1"]).await?;
    let Tap::Granted(_) = tap(&mut agent, "t1", &mut profile.card(), "123456", pb::Mechanism::Unspecified).await? else { panic!() };
    let Tap::Denied(_) = tap(&mut agent, "t1", &mut site.card(Algorithm::EccP256)?.card(), "123456", pb::Mechanism::Unspecified).await? else { panic!() };

    let text = http_get(metrics_port).await?;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for want in [
        "pivgate_authentications_total{outcome=\"granted\"} 1",
        "pivgate_authentications_total{outcome=\"denied\",reason=\"unknown_card\"} 1",
        "pivgate_unlocked_terminals 1",
        &format!("pivgate_crl_age_seconds{{source=\"http://127.0.0.1:{crl_port}/issuer.crl\"}} 6"),
        "pivgate_verification_seconds_count 1",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    // The grant names the CRL it relied on.
    let granted = site.audit_after(0).await?.into_iter().find(|r| r.kind == "auth.granted").unwrap();
    assert!(granted.detail_json.contains(&format!("crl:http://127.0.0.1:{crl_port}/issuer.crl")), "{}", granted.detail_json);
    Ok(())
}

#[tokio::test]
async fn a_sled_blob_file_makes_the_gateway_report_it() -> Result<()> {
    // sled never fsyncs its blob files; the store keeps every value far
    // below sled's threshold, so one appearing means a promise broke.
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let site = Site::start(move |c, _| c.metrics_listen = Some(format!("127.0.0.1:{metrics_port}").parse().unwrap())).await?;
    let ch = pivgate_gateway::client::connect(&site.addr, "localhost", &site.issue(pb::ServiceRole::Application, "probe").await?).await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    let status = |r: tonic_health::pb::HealthCheckResponse| r.status;
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    assert_eq!(status(health.check(tonic_health::pb::HealthCheckRequest { service: "pivgate.v1.AdminService".into() }).await?.into_inner()), serving);
    let blobs = site.config.data_dir.join("db/blobs");
    std::fs::create_dir_all(&blobs)?;
    std::fs::write(blobs.join("9999999"), b"a value sled wrote on its own")?;
    pivgate_tests::site::eventually(std::time::Duration::from_secs(10), || {
        let mut health = health.clone();
        async move {
            let r = health.check(tonic_health::pb::HealthCheckRequest { service: "pivgate.v1.AdminService".into() }).await?.into_inner();
            Ok(r.status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32)
        }
    })
    .await?;
    assert!(http_get(metrics_port).await?.contains("pivgate_sled_blob_files 1"));
    Ok(())
}
