//! The gateway's first start makes the service CA, its server certificate,
//! the first administrator and the database. A kill at any moment of it
//! leaves either nothing the next start cannot finish, or a whole
//! installation: never a CA without its administrator, nor a data folder
//! the gateway cannot start on. And an installation that later loses a
//! part is refused with what to do, not started afresh.

use std::process::Command;

use anyhow::{Context, Result};
use pivgate_gateway::client::{connect, Credentials};
use pivgate_proto::v1 as pb;
use pivgate_tests::powercut::PowerCut;
use pivgate_tests::process::GatewayProcess;
use pivgate_tests::{binary, site::scratch};

async fn administrator_works(gw: &GatewayProcess) -> Result<()> {
    let creds = Credentials::admin_in(&gw.data_dir)?;
    let mut admin = pb::admin_service_client::AdminServiceClient::new(connect(&gw.addr(), "localhost", &creds).await?);
    admin.list_operators(pb::ListOperatorsRequest::default()).await?;
    Ok(())
}

/// The gateway is stopped at every change its first start makes to the
/// disk, in turn (the filesystem model holds that change back until the
/// process is dead), and then killed (SIGKILL: what it wrote stays), and
/// again the power cut (only what it synced stays). Each time, the next start
/// makes a whole installation or finds one, and its first administrator
/// works.
#[tokio::test]
async fn a_kill_or_power_cut_at_any_step_of_the_first_start_never_leaves_a_half_made_installation() -> Result<()> {
    anyhow::ensure!(std::path::Path::new("/dev/fuse").exists(), "this test needs /dev/fuse (and root) for its filesystem model");
    let dir = scratch("first-start");
    let mut disk = PowerCut::mount(&dir.join("disk"))?;
    let log = dir.join("gateway.log");
    // How many changes a whole first start makes.
    disk.stop_at(None);
    let mut gw = GatewayProcess::launch(&disk.path().join("whole"), &[], Some(&log))?;
    gw.wait_ready()?;
    let whole = disk.changes();
    drop(gw);
    // Every step while the PKI and the database's files are made, then
    // every third (sled's own writes, fsyncs and the marker).
    let points: Vec<u64> = (1..=whole).filter(|n| *n <= 60 || n % 3 == 0).collect();
    let mut tested_to = 0;
    for (i, n) in points.iter().flat_map(|n| [*n, *n]).enumerate() {
        let data = disk.path().join(format!("data-{i}"));
        disk.stop_at(Some(n));
        let mut gw = GatewayProcess::launch(&data, &[], Some(&log))?;
        // A start makes about as many changes each time, not always
        // exactly: one that completes before its n-th is past the end.
        let stopped = gw.stopped_or_ready(&disk).with_context(|| format!("first start, change {n} of about {whole}"))?;
        // Killed through the gate either way: a gateway that started
        // within fewer changes is still armed to stop at the n-th (sled's
        // flusher reaches it soon after), and a plain kill would wait
        // forever on a process the model holds.
        gw.send_kill();
        disk.release();
        gw.reap_held(&mut disk)?;
        if !stopped {
            disk.thaw();
            tested_to = tested_to.max(n);
            continue;
        }
        let how = if i % 2 == 0 { "killed" } else { "power cut" };
        if i % 2 == 0 {
            disk.thaw();
        } else {
            disk.cut()?;
        }
        gw.restart().map_err(|e| anyhow::anyhow!("{how} at change {n} of {whole}: the gateway does not start again: {e:#}"))?;
        administrator_works(&gw).await.map_err(|e| anyhow::anyhow!("{how} at change {n} of {whole}: the first administrator does not work: {e:#}"))?;
    }
    anyhow::ensure!(tested_to == 0 || tested_to + 5 >= whole, "first starts completed after {tested_to} changes of {whole}");
    println!("{} stops over the {whole} changes of a first start, each killed and cut, every one recovered", points.len());
    Ok(())
}

#[tokio::test]
async fn an_installation_that_lost_a_part_is_refused_with_what_to_do() -> Result<()> {
    let data = scratch("lost-part").join("data");
    let gw = GatewayProcess::start(&data, &[])?;
    administrator_works(&gw).await?;
    drop(gw);
    let start =
        |data: &std::path::Path| Command::new(binary("pivgate-gateway").unwrap()).arg("--data-dir").arg(data).args(["--listen", "127.0.0.1:0"]).output();

    // The database gone: refused, not started empty on the same CA.
    let db = data.join("db");
    std::fs::rename(&db, data.join("db.moved"))?;
    let out = start(&data)?;
    assert!(!out.status.success(), "started on an empty database");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("database") && err.contains("restore"), "{err}");
    std::fs::rename(data.join("db.moved"), &db)?;

    // The service CA gone: refused, not replaced by a new one.
    std::fs::rename(data.join("service-ca.pem"), data.join("ca.moved"))?;
    let out = start(&data)?;
    assert!(!out.status.success(), "started with a new service CA");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("service-ca.pem") && err.contains("restore"), "{err}");
    std::fs::rename(data.join("ca.moved"), data.join("service-ca.pem"))?;

    // The first administrator's key gone: refused, named.
    std::fs::rename(data.join("admin-key.pem"), data.join("admin-key.moved"))?;
    let out = start(&data)?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin-key.pem"));
    std::fs::rename(data.join("admin-key.moved"), data.join("admin-key.pem"))?;

    // Whole again, it starts.
    let gw = GatewayProcess::start(&data, &[])?;
    administrator_works(&gw).await
}
