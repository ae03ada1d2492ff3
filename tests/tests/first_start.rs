//! The gateway's first start makes the service CA, its server certificate,
//! the first administrator and the database. A kill at any moment of it
//! leaves either nothing the next start cannot finish, or a whole
//! installation: never a CA without its administrator, nor a data folder
//! the gateway cannot start on. And an installation that later loses a
//! part is refused with what to do, not started afresh.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Result};
use pivgate_gateway::client::{connect, Credentials};
use pivgate_proto::v1 as pb;
use pivgate_tests::process::{free_port, GatewayProcess};
use pivgate_tests::{binary, site::scratch};

async fn administrator_works(gw: &GatewayProcess) -> Result<()> {
    let creds = Credentials::admin_in(&gw.data_dir)?;
    let mut admin = pb::admin_service_client::AdminServiceClient::new(connect(&gw.addr(), "localhost", &creds).await?);
    admin.list_operators(pb::ListOperatorsRequest::default()).await?;
    Ok(())
}

#[tokio::test]
async fn a_kill_during_the_first_start_never_leaves_a_half_made_installation() -> Result<()> {
    for i in 0..24u64 {
        let data = scratch("first-start").join("data");
        let mut child = Command::new(binary("pivgate-gateway")?)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{}", free_port()?)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        // From before anything is written to after the first start is done.
        tokio::time::sleep(Duration::from_millis(i * 12)).await;
        child.kill()?;
        child.wait()?;
        let gw = match GatewayProcess::start(&data, &[]) {
            Ok(gw) => gw,
            Err(e) => bail!("killed after {} ms, the gateway does not start again: {e:#}", i * 12),
        };
        administrator_works(&gw).await.map_err(|e| anyhow::anyhow!("killed after {} ms: the first administrator does not work: {e:#}", i * 12))?;
    }
    Ok(())
}

#[tokio::test]
async fn an_installation_that_lost_a_part_is_refused_with_what_to_do() -> Result<()> {
    let data = scratch("lost-part").join("data");
    let gw = GatewayProcess::start(&data, &[])?;
    administrator_works(&gw).await?;
    drop(gw);
    let start = |data: &std::path::Path| Command::new(binary("pivgate-gateway").unwrap()).arg("--data-dir").arg(data).args(["--listen", "127.0.0.1:0"]).output();

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
