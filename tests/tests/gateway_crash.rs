//! Crash safety: the gateway process is killed with SIGKILL at random
//! moments while proofs stream in from several agents, and restarted, a
//! hundred times in a row (every fourth time killed again while it
//! starts). Every time the database opens, and at the end the audit
//! chain verifies and every success that any agent saw acknowledged has its
//! audit record and its event.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use pivgate_gateway::client::{connect, Admin, Credentials};
use pivgate_gateway::model::{Operator, Slot as GwSlot};
use pivgate_gateway::pki::Role;
use pivgate_hw::piv::Slot;
use pivgate_proto::v1 as pb;
use pivgate_tests::process::GatewayProcess;
use pivgate_tests::site::{agent_client, scratch, tap, Lcg, Tap};
use pivgate_vcard::{IssuingCa, Profile, ProfileOptions};

const AGENTS: usize = 4;
const CYCLES: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_no_acknowledged_success() -> Result<()> {
    let seed = std::env::var("PIVGATE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
    println!("PIVGATE_CRASH_SEED={seed}");
    let mut rng = Lcg(seed);

    let dir = scratch("crash");
    let issuer = IssuingCa::generate("crash test issuer")?;
    std::fs::write(dir.join("issuer.pem"), &issuer.cert_pem)?;
    std::fs::write(dir.join("gateway.toml"), format!("[cards]\ntrust_anchors = [{:?}]\n", dir.join("issuer.pem")))?;
    let config = dir.join("gateway.toml");
    let mut gw = GatewayProcess::start(&dir.join("data"), &["--config", config.to_str().context("path")?])?;

    // The site: four operators with cards, one agent serving four terminals.
    let admin_creds = Credentials::admin_in(&gw.data_dir)?;
    let mut admin = Admin::connect(&gw.addr(), "localhost", &admin_creds).await?;
    let mut cards = Vec::new();
    for i in 0..AGENTS {
        let ca = IssuingCa { cert_pem: issuer.cert_pem.clone(), key_pem: issuer.key_pem.clone() };
        let p = Profile::generate_with_ca(ca, &ProfileOptions::default())?;
        let op = Operator { id: format!("op-{i}"), name: format!("Op {i}"), roles: vec![], enabled: true };
        admin.add_operator_with_card(&op, &p.certificates[&Slot::Authentication], GwSlot::PivAuthentication).await?;
        cards.push(Arc::new(p));
    }
    let terminals: Vec<String> = (0..AGENTS).map(|i| format!("t{i}")).collect();
    admin.bind_agent("pi", &terminals).await?;
    let agent_creds = admin.issue_credentials(Role::Agent, "pi", 1).await?;
    drop(admin);

    let acked: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let mut attempts = 0usize;
    for cycle in 0..CYCLES {
        let mut tasks = Vec::new();
        for (i, profile) in cards.iter().enumerate() {
            let addr = gw.addr();
            let creds = agent_creds.clone();
            let profile = profile.clone();
            let terminal = terminals[i].clone();
            let acked = acked.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0usize;
                let Ok(ch) = connect(&addr, "localhost", &creds).await else { return n };
                let mut agent = agent_client(ch, &creds).expect("an agent certificate");
                let mut card = profile.card();
                loop {
                    n += 1;
                    match tap(&mut agent, &terminal, &mut card, "123456", pb::Mechanism::Unspecified).await {
                        Ok(Tap::Granted(g)) => acked.lock().unwrap().push((terminal.clone(), g.sequence)),
                        Ok(Tap::Denied(d)) => panic!("cycle {cycle}: a valid proof was denied: {d:?}"),
                        Ok(Tap::Enrolled(e)) => panic!("cycle {cycle}: an enrolled card was enrolled again: {e:?}"),
                        Ok(Tap::SteppedUp(who)) => panic!("cycle {cycle}: a tap that asked no step-up stepped up ({who})"),
                        Err(_) => return n, // the gateway died under us
                    }
                    if agent.rpc().report_card_removed(pb::ReportCardRemovedRequest { terminal_id: terminal.clone(), card_uuid: vec![] }).await.is_err() {
                        return n;
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(50 + rng.draw() % 400)).await;
        gw.kill();
        for t in tasks {
            attempts += t.await?;
        }
        if cycle % 4 == 3 {
            // A kill while it starts again, too.
            gw.relaunch()?;
            tokio::time::sleep(Duration::from_millis(rng.draw() % 250)).await;
            gw.kill();
        }
        gw.restart().with_context(|| format!("restart after kill {cycle}"))?;
    }

    // Everything acknowledged is there, and the chain holds.
    let mut admin = Admin::connect(&gw.addr(), "localhost", &admin_creds).await?;
    let v = admin.rpc().verify_audit(pb::VerifyAuditRequest {}).await?.into_inner();
    assert!(v.intact, "audit chain broken at {} after {CYCLES} kills", v.first_bad_index);
    let mut granted_events = BTreeSet::new();
    let mut stream = admin.rpc().export_audit(pb::ExportAuditRequest {}).await?.into_inner();
    while let Some(m) = stream.message().await? {
        let r = m.record.unwrap_or_default();
        if r.kind == "auth.granted" {
            let d: serde_json::Value = serde_json::from_str(&r.detail_json)?;
            for s in d["events"].as_array().context("granted record without events")? {
                granted_events.insert((r.terminal_id.clone(), s.as_u64().unwrap_or(0)));
            }
        }
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > CYCLES, "too few successes to mean anything: {} in {attempts} attempts", acked.len());
    for a in &acked {
        assert!(granted_events.contains(a), "acknowledged unlock {a:?} has no audit record");
    }
    println!("{} acknowledged unlocks over {CYCLES} SIGKILLs, all audited; {} audit records", acked.len(), v.records);
    Ok(())
}
