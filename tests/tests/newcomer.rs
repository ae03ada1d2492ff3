//! What a newcomer does first: the README's main command, driven to one
//! unlock and one lock, and the example console resuming after a restart.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pivgate_hw::piv::Algorithm;
use pivgate_proto::v1 as pb;
use pivgate_tests::site::{scratch, tap, Site, Tap};

fn wait_for(lines: &Receiver<String>, seen: &mut Vec<String>, needle: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) => {
                let hit = l.contains(needle);
                seen.push(l);
                if hit {
                    return Ok(());
                }
            }
            Err(_) => bail!("never saw {needle:?}; output so far:\n{}", seen.join("\n")),
        }
    }
}

#[test]
fn the_readmes_main_command_unlocks_and_locks_a_console() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md"))?;
    assert!(readme.contains("deploy/dev demo"), "the README no longer names the main command");
    let run = scratch("newcomer");
    let port = pivgate_tests::process::free_port()?;
    let mut child = Command::new(root.join("deploy/dev"))
        .arg("demo")
        .current_dir(&root)
        // Its own rig folder and vpcd port, away from the suite's readers,
        // and below the kernel's ephemeral range (32768-60999): its pcscd
        // starts while the suite's tests hold hundreds of client sockets,
        // and one of them holding the port as its source port made vpcd's
        // listener fail (the demo's badge then met "connection refused").
        .env("PIVGATE_RUN_DIR", &run)
        .env("PIVGATE_VPCD_BASE_PORT", "29963")
        .env("PIVGATE_DEMO_PORT", port.to_string())
        .env_remove("PCSCLITE_CSOCK_NAME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        // Its own process group, so a failed run can end the demo's pcscd
        // too (else it keeps the vpcd port and the next run sees no card).
        .process_group(0)
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, lines) = channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut seen = vec![];
    let t = Duration::from_secs(90);
    let result = (|| -> Result<()> {
        wait_for(&lines, &mut seen, "asks for the PIN", t)?;
        stdin.write_all(b"123456\n")?;
        wait_for(&lines, &mut seen, "UNLOCKED by op-1", t)?;
        stdin.write_all(b"r\n")?;
        wait_for(&lines, &mut seen, "LOCKED (CARD_REMOVED)", t)?;
        stdin.write_all(b"q\n")?;
        wait_for(&lines, &mut seen, "site stopped", t)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", child.id())]).status();
        let _ = child.kill();
    }
    let status = child.wait()?;
    result?;
    assert!(status.success(), "demo exited with {status}");
    // Everything it made is in the folder it named.
    let site = run.join("site");
    assert!(seen.iter().any(|l| l.contains(&site.display().to_string())));
    for f in ["gateway/service-ca.pem", "gateway/admin.pem", "card/issuing-ca.pem", "card/cert-9a.pem", "console/last-sequence"] {
        assert!(site.join(f).exists(), "{f} missing");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_console_resumes_where_it_stopped() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let mut agent = site.agent("pi", &["t1"]).await?;
    let creds = site.issue(pb::ServiceRole::Application, "console").await?;
    let dir = scratch("console");
    let files = pivgate_tests::site::write_credentials(&creds, &dir)?;
    let start = || -> Result<(std::process::Child, Receiver<String>)> {
        let mut c = Command::new(pivgate_tests::binary("pivgate-console")?)
            .args(["--gateway", &site.addr, "--terminal", "t1", "--ca"])
            .arg(&files.ca)
            .arg("--cert")
            .arg(&files.cert)
            .arg("--key")
            .arg(&files.key)
            .arg("--state")
            .arg(dir.join("seq"))
            .stdout(Stdio::piped())
            .spawn()?;
        let out = c.stdout.take().context("stdout")?;
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Ok((c, rx))
    };
    let t = Duration::from_secs(10);
    let (mut console, lines) = start()?;
    let mut seen = vec![];
    let Tap::Granted(_) = tap(&mut agent, "t1", &mut profile.card(), "123456", pb::Mechanism::Unspecified).await? else { bail!("refused") };
    wait_for(&lines, &mut seen, "#1 t1 UNLOCKED by op-1", t)?;
    // It records an event as handled right after acting on it; stop it
    // once it has (a kill in between means the event comes again: at least
    // once, never lost).
    let deadline = Instant::now() + t;
    while std::fs::read_to_string(dir.join("seq")).unwrap_or_default().trim() != "1" {
        if Instant::now() > deadline {
            bail!("the console never recorded sequence 1");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    console.kill()?;
    console.wait()?;
    // While it is away: a lock and another unlock.
    agent.rpc().report_card_removed(pb::ReportCardRemovedRequest { terminal_id: "t1".into(), card_uuid: vec![] }).await?;
    let Tap::Granted(_) = tap(&mut agent, "t1", &mut profile.card(), "123456", pb::Mechanism::Unspecified).await? else { bail!("refused") };
    let (mut console, lines) = start()?;
    let mut again = vec![];
    wait_for(&lines, &mut again, "#3 t1 UNLOCKED by op-1", t)?;
    console.kill()?;
    let events: Vec<&String> = again.iter().filter(|l| l.starts_with("console: #")).collect();
    assert_eq!(events.len(), 2, "expected #2 and #3 once each: {again:?}");
    assert!(events[0].contains("#2 t1 LOCKED (CARD_REMOVED)"));
    Ok(())
}
