//! Tap to unlock, as an operator sees it: the agent process (release
//! build) with its reader in the rig's pcscd, the virtual card timed like a
//! typical contact card, a gateway on loopback with mutual TLS and sled, and
//! a console holding the unlock event. Split into:
//!
//! - detection: card in the vpcd reader until its first APDU (pcscd's
//!   presence polling of vpcd plus the agent's monitor: a rig artifact
//!   that a USB CCID reader's interrupt replaces);
//! - card: the time the latency model spent in the card;
//! - software: the rest of first APDU until the console has the event
//!   (agent, PC/SC, TLS, gateway verification, durable write, stream).
//!
//! Then the agent's resident memory and its CPU and wake-ups while idle.
//!
//! Run with `deploy/dev bench` (the rig must be up).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use pivgate_hw::piv::Algorithm;
use pivgate_proto::v1 as pb;
use pivgate_tests::site::{scratch, Site};
use pivgate_vcard::{vpcd, Latency};

const TAPS: usize = 15;

fn proc_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0)))
        .unwrap_or(0)
}

/// Voluntary context switches of every thread of the process.
fn wakeups(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .filter_map(|s| s.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:").and_then(|v| v.trim().parse::<u64>().ok())))
        .sum()
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0) + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    if std::env::var("PIVGATE_RIG").is_err() {
        eprintln!("tap_latency needs the rig: run `deploy/dev bench`");
        return;
    }
    let r = pivgate_tests::reader().expect("reader");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let site = Site::start(|c, _| c.agent_grace_s = 30).await.expect("gateway");
        let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await.expect("card");
        site.policy("t-card", &[pb::Mechanism::CardOnly], &[]).await.expect("policy");
        site.policy("t-pin", &[pb::Mechanism::CardAndPin], &[]).await.expect("policy");
        println!("latency model: {:?}; P-256 card; {TAPS} taps each; agent: release build, 2 worker threads", Latency::typical_contact());
        println!();
        println!("| terminal | tap to unlock, median ms | detection ms | card ms | software ms | p90 tap ms |");
        println!("| --- | --- | --- | --- | --- | --- |");
        let mut footprint = None;
        for (terminal, keypad) in [("t-card", "none"), ("t-pin", "terminal")] {
            let creds = site.issue(pb::ServiceRole::Agent, "bench-pi").await.expect("cert");
            site.admin_client().await.expect("admin").bind_agent("bench-pi", &[terminal]).await.expect("bind");
            let dir = scratch("bench-agent");
            let files = pivgate_tests::site::write_credentials(&creds, &dir).expect("write");
            let config = format!(
                "[gateway]\naddress = {:?}\nca = {:?}\ncertificate = {:?}\nkey = {:?}\n\n[[terminal]]\nid = {terminal:?}\nreader = {:?}\nkeypad = {{ kind = {keypad:?} }}\n",
                site.addr,
                files.ca,
                files.cert,
                files.key,
                r.name
            );
            std::fs::write(dir.join("agent.toml"), config).expect("config");
            let agent_bin = std::env::current_exe().expect("exe").parent().and_then(|p| p.parent()).expect("target").join("pivgate-agent");
            let mut agent = Command::new(agent_bin)
                .arg("--config")
                .arg(dir.join("agent.toml"))
                .env("RUST_LOG", "info")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("agent");
            let pid = agent.id();
            let mut stdin = agent.stdin.take().expect("stdin");
            let (ptx, prompts) = channel();
            let err = agent.stderr.take().expect("stderr");
            std::thread::spawn(move || {
                for l in BufReader::new(err).lines().map_while(Result::ok) {
                    if l.contains("EnterPin") {
                        let _ = ptx.send(());
                    }
                }
            });
            tokio::time::sleep(Duration::from_millis(800)).await;
            let mut console = site.application("bench-console").await.expect("app");
            let after = console.list_terminal_states(pb::ListTerminalStatesRequest::default()).await.expect("states").into_inner().states.iter().map(|s| s.sequence).max().unwrap_or(0);
            let mut events = console
                .watch_events(pb::WatchEventsRequest { after_sequence: after, terminal_ids: vec![terminal.into()] })
                .await
                .expect("watch")
                .into_inner();
            let (mut taps, mut detect, mut card_t, mut soft) = (vec![], vec![], vec![], vec![]);
            for _ in 0..TAPS {
                let mut card = profile.card();
                card.set_latency(Latency::typical_contact());
                let t0 = Instant::now();
                let inserted = vpcd::insert(card, r.addr).expect("insert");
                if keypad == "terminal" {
                    prompts.recv_timeout(Duration::from_secs(20)).expect("PIN prompt");
                    stdin.write_all(b"123456\n").expect("type");
                }
                loop {
                    let e = tokio::time::timeout(Duration::from_secs(20), events.message()).await.expect("event in time").expect("stream").expect("event").event.unwrap();
                    if matches!(e.kind, Some(pb::event::Kind::Unlocked(_))) {
                        break;
                    }
                }
                let t1 = Instant::now();
                let st = inserted.stats();
                inserted.remove();
                loop {
                    let e = tokio::time::timeout(Duration::from_secs(20), events.message()).await.expect("event in time").expect("stream").expect("event").event.unwrap();
                    if matches!(e.kind, Some(pb::event::Kind::Locked(_))) {
                        break;
                    }
                }
                let first = st.first_apdu.unwrap_or(t0);
                taps.push(t1 - t0);
                detect.push(first - t0);
                card_t.push(st.modelled);
                soft.push((t1 - first).saturating_sub(st.modelled));
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let p90 = {
                let mut t = taps.clone();
                t.sort();
                t[(t.len() * 9) / 10]
            };
            println!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.1} | {:.0} |",
                if keypad == "none" { "card only (9E)" } else { "card and PIN (9A), PIN typed at the prompt" },
                ms(median(&mut taps)),
                ms(median(&mut detect)),
                ms(median(&mut card_t)),
                ms(median(&mut soft)),
                ms(p90)
            );
            if footprint.is_none() {
                let rss = proc_field(pid, "VmRSS:");
                let hwm = proc_field(pid, "VmHWM:");
                let threads = proc_field(pid, "Threads:");
                let c0 = cpu_ticks(pid);
                let w0 = wakeups(pid);
                let idle = Duration::from_secs(20);
                tokio::time::sleep(idle).await;
                let c1 = cpu_ticks(pid);
                let w1 = wakeups(pid);
                let hz = 100.0; // USER_HZ on Linux
                footprint = Some((rss, hwm, threads, (c1 - c0) as f64 / hz / idle.as_secs_f64() * 100.0, (w1 - w0) as f64 / idle.as_secs_f64()));
            }
            let _ = agent.kill();
            let _ = agent.wait();
        }
        if let Some((rss, hwm, threads, cpu, wakeups)) = footprint {
            println!();
            println!("agent process after {TAPS} taps: resident {rss} kB (peak {hwm} kB), {threads} threads");
            println!("idle for 20 s with no card: CPU {cpu:.2}% of one core, {wakeups:.2} wake-ups per second over all threads (a presence heartbeat every 10 s)");
        }
    });
}
