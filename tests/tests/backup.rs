//! Backup and restore, as a site runs them: `pivgatectl backup` against a
//! gateway under load, `pivgate-gateway restore` into a new folder with a
//! copy of the key files, and the gateway started on it. The restored
//! gateway holds exactly the state as of the backup's point in the audit
//! sequence, its chain verifies, and the administrators and agents it had
//! still get in. A backup that was altered, cut short or is restored with
//! another gateway's keys is refused and leaves nothing behind.
//! The CRLs in force and the signed checkpoints come back too.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use pb::admin_service_client::AdminServiceClient;
use pivgate_gateway::backup::{Header, KEY_FILES};
use pivgate_gateway::client::{connect, Credentials};
use pivgate_proto::v1 as pb;
use pivgate_tests::binary;
use pivgate_tests::process::GatewayProcess;
use pivgate_tests::site::{operator_ids, scratch};

fn run(bin: &str, args: &[&str]) -> Result<(bool, String)> {
    let out = Command::new(binary(bin)?).args(args).output()?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)))
}

fn restore(file: &Path, keys: &Path, target: &Path) -> Result<(bool, String)> {
    run("pivgate-gateway", &["restore", &file.to_string_lossy(), "--keys", &keys.to_string_lossy(), "--data-dir", &target.to_string_lossy()])
}

async fn audit(admin: &mut AdminServiceClient<tonic::transport::Channel>) -> Result<Vec<pb::AuditRecord>> {
    let mut out = Vec::new();
    let mut s = admin.export_audit(pb::ExportAuditRequest {}).await?.into_inner();
    while let Some(m) = s.message().await? {
        out.push(m.record.unwrap_or_default());
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_to_the_same_state_and_a_tampered_one_is_refused() -> Result<()> {
    let dir = scratch("backup");
    let data = dir.join("data");
    // A card issuer with a CRL in force (so the CRL cache is in the backup)
    // and checkpoints every second (so they are too).
    let issuer = pivgate_tests::pki::root("backup test issuer")?;
    std::fs::write(dir.join("issuer.pem"), &issuer.cert_pem)?;
    std::fs::write(dir.join("issuer.crl"), pivgate_tests::pki::crl(&issuer, &pivgate_tests::pki::CrlSpec::revoking(&[vec![7]], 1))?)?;
    std::fs::write(
        dir.join("gateway.toml"),
        format!("audit_checkpoint_s = 1\n[cards]\ntrust_anchors = [{:?}]\ncrl_files = [{:?}]\n", dir.join("issuer.pem"), dir.join("issuer.crl")),
    )?;
    let config = dir.join("gateway.toml");
    let gw = GatewayProcess::start(&data, &["--config", config.to_str().context("path")?])?;
    let creds = Credentials::admin_in(&data)?;

    // Load: three administrators adding operators the whole time.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let writers: Vec<_> = (0..3)
        .map(|w| {
            let (addr, creds, stop, acked) = (gw.addr(), creds.clone(), stop.clone(), acked.clone());
            tokio::spawn(async move {
                let mut admin = AdminServiceClient::new(connect(&addr, "localhost", &creds).await?);
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let id = format!("w{w}-{n}");
                    admin
                        .add_operator(pb::AddOperatorRequest {
                            operator: Some(pb::Operator { operator_id: id.clone(), name: id.clone(), roles: vec![], enabled: true }),
                        })
                        .await?;
                    acked.lock().unwrap().push(id);
                    n += 1;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let file = dir.join("site.pgb");
    let (before_backup, _) = (acked.lock().unwrap().clone(), ());
    let addr = gw.addr();
    let (data_s, file_s) = (data.to_string_lossy().to_string(), file.to_string_lossy().to_string());
    let (ok, said) = tokio::task::spawn_blocking(move || run("pivgatectl", &["--gateway", &addr, "--data-dir", &data_s, "backup", "--out", &file_s])).await??;
    ensure!(ok && said.contains("backup written"), "{said}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in writers {
        w.await??;
    }
    let first = std::fs::read_to_string(&file)?;
    let header: Header = serde_json::from_str(first.lines().next().context("empty backup")?)?;
    let mut admin = AdminServiceClient::new(connect(&gw.addr(), "localhost", &creds).await?);
    let original = audit(&mut admin).await?;
    ensure!(original.len() as u64 > header.audit_index, "the load went on after the backup: {} records, cut at {}", original.len(), header.audit_index);

    // The key files, kept apart once after installation.
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys)?;
    for f in KEY_FILES {
        std::fs::copy(data.join(f), keys.join(f))?;
    }

    // Restored into a new folder and started there.
    let restored = dir.join("restored");
    let (ok, said) = restore(&file, &keys, &restored)?;
    ensure!(ok && said.contains("verified"), "{said}");
    ensure!(first.contains("\"tree\":\"checkpoints\""), "no signed checkpoint in the backup");
    let cache = |d: &Path| -> Result<Vec<(String, Vec<u8>)>> { Ok(pivgate_gateway::crl::cached(d)?) };
    ensure!(!cache(&data)?.is_empty() && cache(&restored)? == cache(&data)?, "the CRL cache was not restored as it was");
    let gw2 = GatewayProcess::start(&restored, &["--config", config.to_str().context("path")?])?;
    let mut admin2 = AdminServiceClient::new(connect(&gw2.addr(), "localhost", &creds).await.context("the first administrator on the restored gateway")?);
    let v = admin2.verify_audit(pb::VerifyAuditRequest {}).await?.into_inner();
    ensure!(v.intact && v.findings.is_empty(), "restored audit: {:?}", v.findings);
    // Its log is the original's up to the cut, record for record.
    let copy = audit(&mut admin2).await?;
    let n = header.audit_index as usize;
    ensure!(copy.len() >= n && copy[..n] == original[..n], "the restored log differs from the original's first {n} records");
    ensure!(copy[..n].iter().any(|r| r.kind == "admin.backup"), "the backup itself is not in the audit log it holds");
    // Its operators are exactly those added at or before the cut.
    let want: BTreeSet<String> = original[..n]
        .iter()
        .filter(|r| r.kind == "admin.add_operator")
        .filter_map(|r| serde_json::from_str::<serde_json::Value>(&r.detail_json).ok()?["operator"].as_str().map(String::from))
        .collect();
    let have = operator_ids(&mut admin2).await?;
    ensure!(have == want, "restored operators: {} of {} as of the cut", have.len(), want.len());
    ensure!(before_backup.iter().all(|id| have.contains(id)), "an operator acknowledged before the backup began is missing");
    println!("backup cut at record {n} of {} under load; {} operators restored", original.len(), have.len());
    drop(gw2);

    // Refused, each with a clear reason, and nothing left behind.
    let refused = |what: &str, file: &Path, keys: &Path, want: &str| -> Result<()> {
        let target = dir.join(format!("refused-{}", what.replace(' ', "-")));
        let (ok, said) = restore(file, keys, &target)?;
        if ok || !said.contains(want) {
            bail!("{what}: restore said {said:?} (wanted a refusal mentioning {want:?})");
        }
        ensure!(!target.join("db").exists() && !target.join("service-ca.pem").exists(), "{what}: a refused restore left files in {}", target.display());
        Ok(())
    };
    // One hex digit of one operator's stored value changed.
    let lines: Vec<&str> = first.lines().collect();
    let i = lines.iter().position(|l| l.contains("\"tree\":\"operators\"")).context("no operator in the backup")?;
    let mut altered = lines.clone();
    let line = lines[i].to_string();
    let at = line.rfind("\"}").context("entry shape")? - 2;
    let mut bytes = line.into_bytes();
    bytes[at] = if bytes[at] == b'0' { b'1' } else { b'0' };
    let edited = String::from_utf8(bytes)?;
    altered[i] = &edited;
    let tampered = dir.join("tampered.pgb");
    std::fs::write(&tampered, altered.join("\n") + "\n")?;
    refused("altered", &tampered, &keys, "altered")?;
    // Altered, and the digest made again to match: the signature catches it.
    let body = altered[..altered.len() - 1].join("\n") + "\n";
    let trailer: serde_json::Value = serde_json::from_str(altered[altered.len() - 1])?;
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(body.as_bytes()));
    let resigned = dir.join("resigned.pgb");
    std::fs::write(&resigned, format!("{body}{}\n", serde_json::json!({ "sha256": digest, "signature": trailer["signature"] })))?;
    refused("new digest", &resigned, &keys, "not signed by this gateway")?;
    // Cut short: the trailer gone.
    let short = dir.join("short.pgb");
    std::fs::write(&short, lines[..lines.len() - 1].join("\n") + "\n")?;
    refused("cut short", &short, &keys, "cut short")?;
    // Another gateway's keys.
    let other = GatewayProcess::start(&dir.join("other"), &[])?;
    drop(other);
    refused("other keys", &file, &dir.join("other"), "another gateway")?;
    // A folder that exists.
    let (ok, said) = restore(&file, &keys, &data)?;
    ensure!(!ok && said.contains("exists"), "{said}");
    Ok(())
}

/// A restore is stopped at its changes to the disk in turn, then killed
/// or the power cut: the target folder is never there half-made (a gateway
/// started on it would begin empty on the site's CA). It is either absent,
/// and the restore run again succeeds, or whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_interrupted_at_any_step_leaves_no_half_made_folder() -> Result<()> {
    ensure!(Path::new("/dev/fuse").exists(), "this test needs /dev/fuse (and root) for its filesystem model");
    let dir = scratch("restore-steps");
    let data = dir.join("data");
    let gw = GatewayProcess::start(&data, &[])?;
    let creds = Credentials::admin_in(&data)?;
    let mut admin = AdminServiceClient::new(connect(&gw.addr(), "localhost", &creds).await?);
    for i in 0..20 {
        let id = format!("op-{i}");
        admin.add_operator(pb::AddOperatorRequest { operator: Some(pb::Operator { operator_id: id.clone(), name: id, roles: vec![], enabled: true }) }).await?;
    }
    let file = dir.join("site.pgb");
    let (ok, said) = run("pivgatectl", &["--gateway", &gw.addr(), "--data-dir", &data.to_string_lossy(), "backup", "--out", &file.to_string_lossy()])?;
    ensure!(ok, "{said}");
    let want = operator_ids(&mut admin).await?;
    drop(admin);
    drop(gw);
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys)?;
    for f in KEY_FILES {
        std::fs::copy(data.join(f), keys.join(f))?;
    }

    let mut disk = pivgate_tests::powercut::PowerCut::mount(&dir.join("disk"))?;
    let restore_cmd = |target: &Path| -> Result<std::process::Child> {
        Ok(Command::new(binary("pivgate-gateway")?)
            .args(["restore", &file.to_string_lossy(), "--keys", &keys.to_string_lossy(), "--data-dir", &target.to_string_lossy()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?)
    };
    disk.stop_at(None);
    ensure!(restore_cmd(&disk.path().join("whole"))?.wait()?.success(), "the restore failed on the model");
    let whole = disk.changes();
    let mut stops = 0;
    // Every change of the last twelve (key files, marker, the rename),
    // every fifth before (the database being built).
    let points: Vec<u64> = (1..=whole).filter(|n| n + 12 > whole || n % 5 == 1).collect();
    for (n, cut) in points.iter().flat_map(|n| [(*n, false), (*n, true)]) {
        let target = disk.path().join(format!("restored-{n}-{cut}"));
        disk.stop_at(Some(n));
        let mut child = restore_cmd(&target)?;
        let t = std::time::Instant::now();
        let stopped = loop {
            if disk.wait_stopped(Duration::from_millis(50)) {
                break true;
            }
            if child.try_wait()?.is_some() {
                break false;
            }
            ensure!(t.elapsed() < Duration::from_secs(30), "the restore neither reached its change {n} nor ended");
        };
        let _ = child.kill();
        disk.release();
        disk.reap(&mut child)?;
        if cut {
            disk.cut()?;
        } else {
            disk.thaw();
        }
        if !stopped {
            continue;
        }
        stops += 1;
        let how = if cut { "power cut" } else { "killed" };
        if !target.exists() {
            let (ok, said) = restore(&file, &keys, &target)?;
            ensure!(ok, "{how} at change {n} of {whole}: the restore run again fails: {said}");
        }
        // Whole: the gateway starts on it with every operator.
        let gw = GatewayProcess::start(&target, &[]).with_context(|| format!("{how} at change {n} of {whole}"))?;
        let mut admin = AdminServiceClient::new(connect(&gw.addr(), "localhost", &creds).await?);
        let have = operator_ids(&mut admin).await?;
        ensure!(have == want, "{how} at change {n} of {whole}: {} operators of {}", have.len(), want.len());
    }
    ensure!(stops + 6 >= 2 * points.len(), "only {stops} stops over a restore's {whole} changes");
    println!("{stops} stops (killed and cut) over the {whole} changes of a restore, never a half-made folder");
    Ok(())
}
