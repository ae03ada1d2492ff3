//! Before anyone is authenticated, a connection costs the gateway a file
//! descriptor and a task. An attacker who opens more idle TCP connections
//! than the gateway has descriptors, and a caller who opens thousands of
//! streams on one connection, must not lock out an administrator or an
//! agent. The gateway binary runs here under an open-file limit of 1024
//! (soft and hard, so it cannot raise it), as under systemd's default.
//!
//! This checks that the calls succeed; how long they take with and
//! without the abuse is measured by `tests/benches/abuse.rs` (BENCHMARKS.md).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pivgate_gateway::client::{connect, Credentials};
use pivgate_proto::v1 as pb;
use pivgate_tests::process::{IdleFlood, ProcessSite};
use pivgate_tests::site::{agent_client, tap, Tap};

const IDLE: usize = 1100;

/// Connects as a real client does under a flood: a handshake the gateway
/// evicted (it came in while this machine was too busy to send its
/// ClientHello before newer connections arrived) is tried again, a few
/// times. Locked out means never getting in, not needing a second try.
async fn connect_retrying(addr: &str, creds: &Credentials) -> Result<tonic::transport::Channel> {
    let mut tries = 0;
    loop {
        tries += 1;
        match connect(addr, "localhost", creds).await {
            Ok(ch) => return Ok(ch),
            Err(e) if tries < 5 => {
                println!("connection attempt {tries} failed ({e}); trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn admin_call(addr: &str, creds: &Credentials) -> Result<Duration> {
    let t = Instant::now();
    let mut admin = pb::admin_service_client::AdminServiceClient::new(connect_retrying(addr, creds).await?);
    let ops = tokio::time::timeout(Duration::from_secs(20), admin.list_operators(pb::ListOperatorsRequest::default()))
        .await
        .context("the administrator's call did not finish")??
        .into_inner()
        .operators;
    assert_eq!(ops.len(), 1);
    Ok(t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_stream_floods_lock_out_no_administrator_and_no_agent() -> Result<()> {
    // This test itself holds more than a thousand sockets.
    pivgate_gateway::raise_open_file_limit();
    // Idle handshakes are given a whole minute: far longer than the 20 s
    // the administrator is given below, so only evicting them (not their
    // timing out) lets the administrator in.
    let site = ProcessSite::start(Some(1024), "[limits]\nhandshake_timeout_s = 60").await?;
    let gw = &site.gateway;
    let addr = gw.addr();
    let (admin_creds, agent_creds, app_creds, profile) = (&site.admin, &site.agent, &site.application, &site.card);
    let undisturbed = admin_call(&addr, admin_creds).await?;

    // The attack: more idle connections than the gateway has descriptors,
    // reopened as the gateway closes them.
    let port = gw.port;
    let idle = tokio::task::spawn_blocking(move || IdleFlood::start(port, IDLE)).await?;
    assert!(idle.held() >= 1000, "only {} idle connections opened", idle.held());
    // And a caller who opens thousands of streams on one connection.
    let app = pb::access_service_client::AccessServiceClient::new(connect_retrying(&addr, app_creds).await?);
    let streams: Vec<_> = (0..3000)
        .map(|i| {
            let mut app = app.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    app.watch_events(pb::WatchEventsRequest { after_sequence: 0, terminal_ids: vec![] }).await.map(|s| Some(s.into_inner()))
                } else {
                    app.list_terminal_states(pb::ListTerminalStatesRequest::default()).await.map(|_| None)
                }
            })
        })
        .collect();

    // An administrator and an agent still get through.
    let during = admin_call(&addr, admin_creds).await?;
    let mut agent = agent_client(connect_retrying(&addr, agent_creds).await?, agent_creds)?;
    let t = Instant::now();
    match tokio::time::timeout(Duration::from_secs(20), tap(&mut agent, "t1", &mut profile.card(), "123456", pb::Mechanism::Unspecified)).await {
        Ok(Ok(Tap::Granted(g))) => assert_eq!(g.operator_id, "op-1"),
        other => bail!("the agent's authentication failed under the flood: {other:?}"),
    }
    let tap_time = t.elapsed();
    println!("admin call: {undisturbed:?} undisturbed, {during:?} with {} idle connections; authentication {tap_time:?}", idle.held());

    // The stream flood was absorbed: every call answered, at most the
    // per-caller cap of watchers open.
    let mut watchers = Vec::new();
    for s in streams {
        match s.await? {
            Ok(Some(w)) => watchers.push(w),
            Ok(None) => {}
            Err(st) if st.code() == tonic::Code::ResourceExhausted => {}
            // Streams the client opened before it learnt the gateway's
            // per-connection stream limit are refused by HTTP/2 itself.
            Err(st) if st.code() == tonic::Code::Unavailable && format!("{st:?}").contains("REFUSED_STREAM") => {}
            Err(st) => bail!("a flooding call failed with {st:?}"),
        }
    }
    assert!(watchers.len() <= 16, "{} watchers open for one application", watchers.len());
    tokio::task::spawn_blocking(move || drop(idle)).await?;
    Ok(())
}
