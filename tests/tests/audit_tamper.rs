//! Someone with the database or an export in hand deletes the newest audit
//! records, or rewrites one and recomputes every hash after it: the chain
//! alone still verifies. Checked against a signed checkpoint seen earlier,
//! truncation and rewriting are each reported as such, by
//! `pivgatectl audit verify` on an export and by the gateway on its own
//! database; an application that kept the head it saw sees the rollback.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pivgate_gateway::store::AuditRecord;
use pivgate_proto::v1 as pb;
use pivgate_tests::binary;
use pivgate_tests::process::GatewayProcess;
use pivgate_tests::site::{scratch, Site};

fn ctl(dir: &Path, port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new(binary("pivgatectl")?).args(["--gateway", &format!("127.0.0.1:{port}"), "--data-dir"]).arg(dir).args(args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("pivgatectl {args:?} failed: {text}");
    }
    Ok(text)
}

/// The database of a stopped gateway, opened as someone with the disk in
/// hand would (the gateway lets go of it as its last tasks end).
async fn stopped_db(site: &Site) -> Result<sled::Db> {
    let mut tries = 0;
    loop {
        match sled::open(site.config.data_dir.join("db")) {
            Ok(db) => return Ok(db),
            Err(_) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn rechain(records: &mut [AuditRecord]) {
    let mut prev = "0".repeat(64);
    for r in records {
        r.prev_hash = prev;
        r.hash = r.compute_hash();
        prev = r.hash.clone();
    }
}

fn write_log(path: &Path, records: &[AuditRecord]) -> Result<()> {
    let text: String = records.iter().map(|r| serde_json::to_string(r).map(|l| l + "\n")).collect::<Result<_, _>>()?;
    Ok(std::fs::write(path, text)?)
}

#[test]
fn truncated_and_rewritten_exports_are_reported_as_such() -> Result<()> {
    let dir = scratch("tamper-cli");
    let data = dir.join("data");
    let config = dir.join("gateway.toml");
    std::fs::write(&config, "audit_checkpoint_s = 1\n")?;
    let gw = GatewayProcess::start(&data, &["--config", config.to_str().context("path")?])?;
    for i in 0..6 {
        ctl(&data, gw.port, &["operator", "add", &format!("op-{i}"), "--name", &format!("Operator {i}")])?;
    }
    let export = dir.join("audit.jsonl");
    ctl(&data, gw.port, &["audit", "export", "--out", export.to_str().context("path")?])?;
    let records: Vec<AuditRecord> = std::fs::read_to_string(&export)?.lines().map(serde_json::from_str).collect::<Result<_, _>>()?;
    let last = records.last().context("no records")?.index;
    // The checkpoint that covers the whole export, saved as an auditor would.
    let cp = dir.join("checkpoint.json");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(out) = ctl(&data, gw.port, &["audit", "checkpoint", "--out", cp.to_str().context("path")?]) {
            let c: pivgate_gateway::audit::Checkpoint = serde_json::from_slice(&std::fs::read(&cp)?)?;
            if c.index >= last {
                assert!(out.contains("saved"), "{out}");
                break;
            }
        }
        if std::time::Instant::now() > deadline {
            bail!("no checkpoint covering record {last}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let c: pivgate_gateway::audit::Checkpoint = serde_json::from_slice(&std::fs::read(&cp)?)?;
    let key = c.public_key.clone();
    let exported: Vec<AuditRecord> = records.into_iter().filter(|r| r.index <= c.index).collect();
    let verify = |file: &Path| {
        ctl(&data, gw.port, &["audit", "verify", "--file", file.to_str().unwrap_or_default(), "--checkpoint", cp.to_str().unwrap_or_default(), "--key", &key])
    };

    let intact = dir.join("intact.jsonl");
    write_log(&intact, &exported)?;
    assert!(verify(&intact)?.contains("intact"));

    // The last two records deleted: the chain is fine, the log is short.
    let truncated = dir.join("truncated.jsonl");
    write_log(&truncated, &exported[..exported.len() - 2])?;
    let e = verify(&truncated).unwrap_err().to_string();
    assert!(e.contains("truncated") && !e.contains("broken") && !e.contains("rewritten"), "{e}");

    // Record 2 rewritten, every hash after it recomputed.
    let mut rewritten = exported.clone();
    rewritten[1].detail["name"] = serde_json::json!("Someone Else");
    rechain(&mut rewritten);
    let path = dir.join("rewritten.jsonl");
    write_log(&path, &rewritten)?;
    let e = verify(&path).unwrap_err().to_string();
    assert!(e.contains("rewritten") && !e.contains("broken") && !e.contains("truncated"), "{e}");

    // Without a checkpoint, the chain alone cannot tell.
    let plain = ctl(&data, gw.port, &["audit", "verify", "--file", path.to_str().context("path")?])?;
    assert!(plain.contains("intact"), "{plain}");
    Ok(())
}

#[tokio::test]
async fn a_truncated_database_is_reported_and_applications_see_the_rollback() -> Result<()> {
    let mut site = Site::start(|c, _| c.audit_checkpoint_s = 1).await?;
    let mut admin = site.admin().await?;
    for i in 0..5 {
        admin
            .add_operator(pb::AddOperatorRequest {
                operator: Some(pb::Operator { operator_id: format!("op-{i}"), name: "x".into(), roles: vec![], enabled: true }),
            })
            .await?;
    }
    drop(admin);
    // An application keeps the newest signed head it saw.
    let mut app = site.application("auditor").await?;
    let seen = loop {
        let h = app.get_audit_head(pb::GetAuditHeadRequest {}).await?.into_inner();
        if let Some(c) = h.checkpoint.filter(|c| c.index >= 5) {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    drop(app);
    site.stop().await?;

    // The newest records go, and the signed checkpoints with them.
    {
        let db = stopped_db(&site).await?;
        let audit = db.open_tree("audit")?;
        for _ in 0..3 {
            audit.pop_max()?;
        }
        db.flush()?;
    }
    let site = site.resume().await?;
    let v = site.admin().await?.verify_audit(pb::VerifyAuditRequest {}).await?.into_inner();
    assert!(!v.intact && v.truncated && !v.rewritten, "{v:?}");
    assert!(v.findings.iter().any(|f| f.starts_with("truncated")), "{v:?}");

    // Had the checkpoints been removed too, the application still holds one
    // for a record the gateway no longer has.
    let head = site.application("auditor-2").await?.get_audit_head(pb::GetAuditHeadRequest {}).await?.into_inner();
    assert!(head.records < seen.index, "the gateway's head {} is not behind the head {} seen before", head.records, seen.index);
    Ok(())
}

#[tokio::test]
async fn an_altered_event_is_reported() -> Result<()> {
    use pivgate_hw::piv::Algorithm;
    use pivgate_tests::site::{tap, Tap};
    let mut site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let mut agent = site.agent("pi-1", &["t1"]).await?;
    let Tap::Granted(g) = tap(&mut agent, "t1", &mut profile.card(), "123456", pb::Mechanism::Unspecified).await? else { bail!("refused") };
    drop(agent);
    site.stop().await?;
    {
        let db = stopped_db(&site).await?;
        // The unlock now names another operator.
        let events = db.open_tree("events")?;
        let key = g.sequence.to_be_bytes();
        let old = events.get(key)?.context("the unlock event")?;
        let forged = String::from_utf8(old.to_vec())?.replace("op-1", "op-9");
        events.insert(key, forged.as_bytes())?;
        db.flush()?;
    }
    let site = site.resume().await?;
    let v = site.admin().await?.verify_audit(pb::VerifyAuditRequest {}).await?.into_inner();
    assert!(!v.intact, "{v:?}");
    assert!(v.findings.iter().any(|f| f.starts_with(&format!("event {}", g.sequence))), "{v:?}");
    Ok(())
}
