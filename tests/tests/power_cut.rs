//! Power cuts: the gateway binary runs on a filesystem that keeps, across
//! a cut, only what was fsynced, names included ([`PowerCut`]). Several
//! administrators add operators while the power goes at random moments:
//! during first start, during writes, between them and while the gateway
//! starts again. After every cut
//! the gateway starts again on what the disk kept, and
//! - it is the same installation: the same service CA, the same first
//!   administrator;
//! - every change it acknowledged is there;
//! - the audit chain verifies with no finding (so its indexes have no
//!   gaps and no signed checkpoint is ahead of the log).
//!
//! `PIVGATE_POWERCUT_CUTS` sets the number of cuts (default 20) and
//! `PIVGATE_POWERCUT_SEED` replays a run.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use pb::admin_service_client::AdminServiceClient;
use pivgate_gateway::client::{connect, Credentials};
use pivgate_proto::v1 as pb;
use pivgate_tests::powercut::PowerCut;
use pivgate_tests::process::GatewayProcess;
use pivgate_tests::site::{operator_ids, scratch, Lcg};

const WRITERS: usize = 3;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// Administrators adding operators until the gateway goes away; the ids it
/// acknowledged go into `acked`.
fn writers(addr: String, creds: Credentials, round: usize, acked: Arc<Mutex<Vec<String>>>) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WRITERS)
        .map(|w| {
            let (addr, creds, acked) = (addr.clone(), creds.clone(), acked.clone());
            tokio::spawn(async move {
                let Ok(ch) = connect(&addr, "localhost", &creds).await else { return };
                let mut admin = AdminServiceClient::new(ch);
                for n in 0.. {
                    let id = format!("r{round}-w{w}-{n}");
                    let op = pb::Operator { operator_id: id.clone(), name: format!("Operator {id}"), roles: vec!["dispatcher".into()], enabled: true };
                    match admin.add_operator(pb::AddOperatorRequest { operator: Some(op) }).await {
                        Ok(_) => acked.lock().unwrap().push(id),
                        Err(_) => return, // the power went
                    }
                }
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_lose_nothing_acknowledged_and_never_a_half_made_installation() -> Result<()> {
    ensure!(std::path::Path::new("/dev/fuse").exists(), "this test needs /dev/fuse (and root) for its power-cut filesystem");
    let seed = env_u64("PIVGATE_POWERCUT_SEED")
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1));
    let cuts = env_u64("PIVGATE_POWERCUT_CUTS").unwrap_or(20) as usize;
    println!("PIVGATE_POWERCUT_SEED={seed} PIVGATE_POWERCUT_CUTS={cuts}");
    let mut rng = Lcg(seed);

    // The installer's files on the real disk; the gateway's data folder on
    // the model.
    let dir = scratch("powercut");
    let issuer = pivgate_vcard::IssuingCa::generate("power cut issuer")?;
    std::fs::write(dir.join("issuer.pem"), &issuer.cert_pem)?;
    // Checkpoints every second, so cuts also land around those.
    std::fs::write(dir.join("gateway.toml"), format!("audit_checkpoint_s = 1\n[cards]\ntrust_anchors = [{:?}]\n", dir.join("issuer.pem")))?;
    let config = dir.join("gateway.toml");
    let args = ["--config", config.to_str().context("path")?];
    let mut disk = PowerCut::mount(&dir.join("disk"))?;
    let data = disk.path().join("pivgate");
    let log = dir.join("gateway.log");

    // Cuts during first start: whatever the disk kept, the next start
    // makes a whole installation or finds one.
    for i in 0..4 {
        let mut gw = GatewayProcess::launch(&data, &args, Some(&log))?;
        std::thread::sleep(Duration::from_millis(rng.draw() % (40 + 60 * i)));
        gw.kill();
        disk.cut()?;
    }
    let mut gw = GatewayProcess::launch(&data, &args, Some(&log))?;
    gw.wait_ready().context("the first start after cuts during first start")?;
    let admin_creds = Credentials::admin_in(&data)?;
    let ca = std::fs::read(data.join("service-ca.pem"))?;
    let mut admin = AdminServiceClient::new(connect(&gw.addr(), "localhost", &admin_creds).await?);
    ensure!(operator_ids(&mut admin).await?.is_empty(), "a new installation with operators");
    drop(admin);

    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    for round in 0..cuts {
        let tasks = writers(gw.addr(), admin_creds.clone(), round, acked.clone());
        tokio::time::sleep(Duration::from_millis(50 + rng.draw() % 700)).await;
        if rng.draw().is_multiple_of(4) {
            // Between writes: the administrators stop, then the power goes.
            for t in &tasks {
                t.abort();
            }
        }
        gw.kill();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await.context("a writer hung after the gateway died")?;
        }
        disk.cut()?;
        if rng.draw().is_multiple_of(3) {
            // And again while the gateway starts (sled writes a snapshot
            // at every start).
            gw.relaunch()?;
            std::thread::sleep(Duration::from_millis(rng.draw() % 300));
            gw.kill();
            disk.cut()?;
        }
        gw.restart().with_context(|| format!("start after cut {round} (seed {seed})"))?;

        ensure!(std::fs::read(data.join("service-ca.pem"))? == ca, "cut {round}: the service CA changed");
        let mut admin = AdminServiceClient::new(
            connect(&gw.addr(), "localhost", &admin_creds).await.with_context(|| format!("cut {round}: the first administrator no longer gets in"))?,
        );
        let have = operator_ids(&mut admin).await?;
        let lost: Vec<_> = acked.lock().unwrap().iter().filter(|id| !have.contains(*id)).cloned().collect();
        if !lost.is_empty() {
            bail!("cut {round} (seed {seed}): {} acknowledged operators lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
        }
        let v = admin.verify_audit(pb::VerifyAuditRequest {}).await?.into_inner();
        ensure!(v.intact && v.findings.is_empty(), "cut {round} (seed {seed}): audit {:?}", v.findings);
        let acked_n = acked.lock().unwrap().len() as u64;
        ensure!(v.records >= acked_n, "cut {round}: {} audit records for {acked_n} acknowledged changes", v.records);
    }
    gw.kill();
    let counts = disk.counts();
    let acked = acked.lock().unwrap().len();
    println!("{acked} acknowledged operators over {} cuts, none lost; {} file and {} folder syncs", counts.cuts, counts.file_syncs, counts.dir_syncs);
    ensure!(acked > cuts, "too few acknowledged writes to mean anything: {acked}");
    Ok(())
}

/// Every step of a restart of an installed gateway, in turn: the process
/// is stopped at that change to the disk, then killed or the power cut.
/// sled writes a snapshot at every start; none of these stops may cost an
/// acknowledged change or the ability to start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_or_power_cut_at_any_step_of_a_restart_loses_nothing() -> Result<()> {
    ensure!(std::path::Path::new("/dev/fuse").exists(), "this test needs /dev/fuse (and root) for its power-cut filesystem");
    let dir = scratch("restart-steps");
    let mut disk = PowerCut::mount(&dir.join("disk"))?;
    let data = disk.path().join("pivgate");
    let log = dir.join("gateway.log");
    let mut gw = GatewayProcess::launch(&data, &[], Some(&log))?;
    gw.wait_ready()?;
    let creds = Credentials::admin_in(&data)?;
    let mut want = BTreeSet::new();
    let mut admin = AdminServiceClient::new(connect(&gw.addr(), "localhost", &creds).await?);
    for i in 0..40 {
        let id = format!("op-{i}");
        admin
            .add_operator(pb::AddOperatorRequest { operator: Some(pb::Operator { operator_id: id.clone(), name: id.clone(), roles: vec![], enabled: true }) })
            .await?;
        want.insert(id);
    }
    drop(admin);
    gw.kill();
    disk.stop_at(None);
    gw.restart()?;
    let whole = disk.changes();
    gw.kill();
    let mut stops = 0;
    for (n, cut) in (1..=whole + 2).flat_map(|n| [(n, false), (n, true)]) {
        disk.stop_at(Some(n));
        gw.relaunch()?;
        let stopped = gw.stopped_or_ready(&disk).with_context(|| format!("a restart, change {n}"))?;
        gw.send_kill();
        disk.release();
        gw.reap_held(&mut disk)?;
        if !stopped {
            disk.thaw();
            continue;
        }
        stops += 1;
        let how = if cut {
            disk.cut()?;
            "power cut"
        } else {
            disk.thaw();
            "killed"
        };
        gw.restart().with_context(|| format!("{how} at change {n} of a restart's {whole}: it does not start again"))?;
        let mut admin = AdminServiceClient::new(connect(&gw.addr(), "localhost", &creds).await?);
        let have = operator_ids(&mut admin).await?;
        ensure!(have == want, "{how} at change {n}: operators {} of {}", have.len(), want.len());
        let v = admin.verify_audit(pb::VerifyAuditRequest {}).await?.into_inner();
        ensure!(v.intact && v.findings.is_empty(), "{how} at change {n}: audit {:?}", v.findings);
        gw.kill();
    }
    ensure!(stops + 6 >= 2 * whole, "only {stops} stops over a restart's {whole} changes");
    println!("{stops} stops (killed and cut) over the {whole} changes of a restart, nothing lost");
    Ok(())
}
