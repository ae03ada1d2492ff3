//! What abuse costs legitimate callers. The gateway binary runs under an
//! open-file limit of 1024 (soft and hard); one administrator and one agent
//! make calls back to back while, in turn, nothing else happens, an
//! attacker holds 1,100 idle TCP connections (reopening those the gateway
//! closes), a caller keeps 1,000 calls in flight on one connection, and an
//! agent floods the gateway with bogus proofs. Prints p50/p99 per case.
//!
//! `cargo bench -p pivgate-tests --bench abuse` (BENCHMARKS.md). Bounded:
//! four phases of a few seconds, all on loopback.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pivgate_gateway::client::connect;
use pivgate_proto::v1 as pb;
use pivgate_tests::process::{IdleFlood, ProcessSite};
use pivgate_tests::site::{agent_client, tap, Tap};

const PHASE: Duration = Duration::from_secs(4);

#[derive(Clone, Copy)]
enum Abuse {
    None,
    IdleConnections,
    StreamsOnOneConnection,
    DenialFlood,
}

impl Abuse {
    fn name(self) -> &'static str {
        match self {
            Abuse::None => "none",
            Abuse::IdleConnections => "1,100 idle TCP connections, reopened as the gateway closes them",
            Abuse::StreamsOnOneConnection => "1,000 calls in flight on one connection, continuously",
            Abuse::DenialFlood => "4 tasks sending bogus proofs as fast as they can",
        }
    }
}

fn quantiles(mut v: Vec<Duration>) -> (f64, f64, usize) {
    v.sort();
    let q = |p: f64| v.get(((v.len().max(1) - 1) as f64 * p) as usize).map(|d| d.as_secs_f64() * 1e3).unwrap_or(f64::NAN);
    (q(0.5), q(0.99), v.len())
}

/// Starts the abuse; returns what stops it.
async fn start(site: &ProcessSite, abuse: Abuse) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let addr = site.gateway.addr();
    match abuse {
        Abuse::None => {}
        Abuse::IdleConnections => {
            let port = site.gateway.port;
            let stop = stop.clone();
            std::thread::spawn(move || {
                let flood = IdleFlood::start(port, 1100);
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                drop(flood);
            });
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        Abuse::StreamsOnOneConnection => {
            let app = pb::access_service_client::AccessServiceClient::new(connect(&addr, "localhost", &site.application).await.expect("app"));
            for _ in 0..1000 {
                let mut app = app.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = app.list_terminal_states(pb::ListTerminalStatesRequest::default()).await;
                    }
                });
            }
        }
        Abuse::DenialFlood => {
            let agent = pb::agent_service_client::AgentServiceClient::new(connect(&addr, "localhost", &site.agent).await.expect("agent"));
            for t in 0..4u8 {
                let mut agent = agent.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut i = 0u8;
                    while !stop.load(Ordering::Relaxed) {
                        i = i.wrapping_add(1);
                        let _ = agent
                            .complete_authentication(pb::CompleteAuthenticationRequest {
                                challenge_id: vec![i ^ t; 16],
                                terminal_id: "t1".into(),
                                signature: vec![1],
                            })
                            .await;
                    }
                });
            }
        }
    }
    stop
}

async fn measure(site: &ProcessSite) -> (Vec<Duration>, Vec<Duration>, Vec<Duration>, usize) {
    let addr = site.gateway.addr();
    let mut admin = pb::admin_service_client::AdminServiceClient::new(connect(&addr, "localhost", &site.admin).await.expect("admin"));
    let mut agent = agent_client(connect(&addr, "localhost", &site.agent).await.expect("agent"), &site.agent).expect("an agent certificate");
    let mut card = site.card.card();
    let (mut calls, mut fresh, mut taps, mut failed) = (Vec::new(), Vec::new(), Vec::new(), 0);
    let end = Instant::now() + PHASE;
    while Instant::now() < end {
        let t = Instant::now();
        admin.list_operators(pb::ListOperatorsRequest::default()).await.expect("admin call");
        calls.push(t.elapsed());
        // A new connection each time: what an administrator running
        // pivgatectl does, and what idle connections would starve.
        let t = Instant::now();
        match connect(&addr, "localhost", &site.admin).await {
            Ok(c) => {
                pb::admin_service_client::AdminServiceClient::new(c)
                    .list_operators(pb::ListOperatorsRequest::default())
                    .await
                    .expect("admin call on a new connection");
                fresh.push(t.elapsed());
            }
            // Counted and reported: a handshake evicted by the flood.
            Err(_) => failed += 1,
        }
        let t = Instant::now();
        match tap(&mut agent, "t1", &mut card, "123456", pb::Mechanism::Unspecified).await.expect("tap") {
            Tap::Granted(_) => taps.push(t.elapsed()),
            other => panic!("a legitimate authentication failed: {other:?}"),
        }
        agent.rpc().report_card_removed(pb::ReportCardRemovedRequest { terminal_id: "t1".into(), card_uuid: vec![] }).await.expect("removed");
    }
    (calls, fresh, taps, failed)
}

fn main() {
    pivgate_gateway::raise_open_file_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let site = ProcessSite::start(Some(1024), "").await.expect("site");
        println!("legitimate callers under abuse; gateway binary at 1024 open files; {} s per case", PHASE.as_secs());
        println!("| abuse | admin call p50 / p99 ms | admin new connection + call p50 / p99 ms | new connections failed | authentication p50 / p99 ms | authentications |");
        println!("| --- | --- | --- | --- | --- | --- |");
        for abuse in [Abuse::None, Abuse::IdleConnections, Abuse::StreamsOnOneConnection, Abuse::DenialFlood] {
            let stop = start(&site, abuse).await;
            let (calls, fresh, taps, failed) = measure(&site).await;
            stop.store(true, Ordering::Relaxed);
            let (c50, c99, _) = quantiles(calls);
            let (f50, f99, nf) = quantiles(fresh);
            let (t50, t99, n) = quantiles(taps);
            println!("| {} | {c50:.1} / {c99:.1} | {f50:.1} / {f99:.1} | {failed} of {} | {t50:.1} / {t99:.1} | {n} |", abuse.name(), nf + failed);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}
