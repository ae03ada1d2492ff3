//! `pivgate-demo`: a whole site on one machine, for a newcomer. Run it with
//! `deploy/dev demo`, which starts pcscd with a vpcd reader first.
//!
//! - the gateway on its embedded defaults (service CA, certificates,
//!   database generated into the site folder);
//! - a virtual PIV card (P-256, PIN 123456) from an issuer the gateway
//!   trusts, enrolled for operator `op-1`;
//! - one agent serving terminal `console-1`, whose reader holds the card
//!   through pcscd and vpcd; the PIN is typed here, at the keyboard;
//! - the example console (`pivgate-console`, a separate process) watching
//!   the terminal and printing each lock and unlock.
//!
//! Type the PIN and Enter when asked. `r` + Enter pulls the badge out of
//! the reader or puts it back; `q` + Enter (or end of input) stops.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use pivgate_agent::config::{Config as AgentConfig, GatewayConfig, IndicatorConfig, KeypadConfig, PinConfig, TerminalConfig};
use pivgate_agent::terminal::{PinSource, TapResult};
use pivgate_gateway::client::{Admin, Credentials};
use pivgate_gateway::model::{Mechanism, Operator, Slot as GwSlot, TerminalPolicy};
use pivgate_gateway::pki::Role;
use pivgate_hw::indicator::{Indicator, Pattern};
use pivgate_hw::piv::Slot;
use pivgate_vcard::{vpcd, Latency, Profile, ProfileOptions};

const TERMINAL: &str = "console-1";

struct Say(&'static str, Option<Pattern>);

impl Indicator for Say {
    fn show(&mut self, p: Pattern) {
        if self.1.replace(p) == Some(p) {
            return;
        }
        let line = match p {
            Pattern::EnterPin => "asks for the PIN: type it (this demo card's PIN is 123456) and press Enter",
            Pattern::LastTry => "warns: ONE PIN try left before the card blocks",
            Pattern::Working => return,
            Pattern::Granted => "shows GREEN: access granted",
            Pattern::Denied => "shows RED: access denied",
            Pattern::PinBlocked => "shows RED (blinking): the card's PIN is blocked",
            Pattern::GatewayUnreachable => "shows RED (slow blink): gateway unreachable, nothing will unlock",
            Pattern::Enrolled => "shows GREEN (three blinks): card enrolled, the terminal stays locked",
            Pattern::StepUp => "shows GREEN (two blinks), then AMBER: prove again (card and PIN) for the action asked",
            Pattern::Idle => "is idle",
        };
        println!("agent: {} {line}", self.0);
    }
}

fn write(path: &Path, text: &str) -> Result<PathBuf> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(path, text)?;
    Ok(path.to_path_buf())
}

async fn issue(admin: &mut Admin, role: Role, name: &str, dir: &Path) -> Result<Credentials> {
    let creds = admin.issue_credentials(role, name, 30).await?;
    write(&dir.join("service-ca.pem"), &creds.ca_pem)?;
    write(&dir.join(format!("{name}.pem")), &creds.cert_pem)?;
    write(&dir.join(format!("{name}-key.pem")), &creds.key_pem)?;
    Ok(creds)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let run_dir = PathBuf::from(std::env::var("PIVGATE_RUN_DIR").context("run me through `deploy/dev demo`")?);
    let site = run_dir.join("site");
    let vpcd_port: u16 = std::env::var("PIVGATE_VPCD_BASE_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(36963);
    let reader = "pivgate vpcd 0 00 00";
    let port = std::env::var("PIVGATE_DEMO_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(7443u16);
    println!("site folder: {}", site.display());

    // The card and its issuer.
    let (profile, generated) = Profile::load_or_generate(&site.join("card"), &ProfileOptions::default())?;
    println!("card: P-256 virtual PIV card, UUID {}, PIN 123456 ({})", profile.chuid.uuid_string(), if generated { "new" } else { "loaded" });

    // The gateway, on its defaults, trusting the card issuer.
    let mut gcfg = pivgate_gateway::Config { data_dir: site.join("gateway"), listen: format!("127.0.0.1:{port}").parse()?, ..Default::default() };
    gcfg.cards.trust_anchors = vec![site.join("card/issuing-ca.pem")];
    gcfg.validate()?;
    let (gateway, tls, created) = pivgate_gateway::open(&gcfg)?;
    let listener = tokio::net::TcpListener::bind(gcfg.listen).await.with_context(|| format!("port {port} is taken; set PIVGATE_DEMO_PORT"))?;
    let (gw_stop, gw_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let gw_task = tokio::spawn(pivgate_gateway::run(listener, gateway, tls, gcfg.clone(), async {
        let _ = gw_stop_rx.await;
    }));
    println!(
        "gateway: listening on 127.0.0.1:{port}; service CA, server and admin certificates in {} ({})",
        gcfg.data_dir.display(),
        if created { "generated" } else { "loaded" }
    );

    // Administration: operator, card, agent, terminal, certificates.
    let admin_creds = Credentials::admin_in(&gcfg.data_dir)?;
    let mut admin = Admin::connect(&format!("127.0.0.1:{port}"), "localhost", &admin_creds).await?;
    let op = Operator { id: "op-1".into(), name: "Demo Operator".into(), roles: vec!["dispatcher".into()], enabled: true };
    admin.add_operator_with_card(&op, &profile.certificates[&Slot::Authentication], GwSlot::PivAuthentication).await?;
    admin.bind_agent("demo-pi", &[TERMINAL]).await?;
    admin.set_terminal_policy(TERMINAL, &TerminalPolicy { allowed_mechanisms: vec![Mechanism::CardAndPin], ..Default::default() }).await?;
    issue(&mut admin, Role::Agent, "demo-pi", &site.join("agent")).await?;
    issue(&mut admin, Role::Application, "console", &site.join("console")).await?;
    println!("admin: operator op-1 (Demo Operator) with the card enrolled; agent demo-pi serves {TERMINAL} (card and PIN)");

    // The example console, a process of its own.
    let console_bin = std::env::current_exe()?.with_file_name("pivgate-console");
    let mut console = Command::new(&console_bin)
        .args(["--gateway", &format!("127.0.0.1:{port}"), "--ca"])
        .arg(site.join("console/service-ca.pem"))
        .arg("--cert")
        .arg(site.join("console/console.pem"))
        .arg("--key")
        .arg(site.join("console/console-key.pem"))
        .arg("--state")
        .arg(site.join("console/last-sequence"))
        .args(["--terminal", TERMINAL])
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", console_bin.display()))?;

    // The agent, with the keyboard as its keypad.
    let acfg = AgentConfig {
        gateway: GatewayConfig {
            address: format!("127.0.0.1:{port}"),
            server_name: "localhost".into(),
            ca: site.join("agent/service-ca.pem"),
            certificate: site.join("agent/demo-pi.pem"),
            key: site.join("agent/demo-pi-key.pem"),
            call_timeout_s: 5,
            max_clock_skew_s: 300,
        },
        pin: PinConfig { idle_timeout_s: 60, total_timeout_s: 120 },
        terminals: vec![TerminalConfig {
            id: TERMINAL.into(),
            reader: reader.into(),
            keypad: KeypadConfig::Simulated,
            indicator: IndicatorConfig::Log,
            card_only: false,
        }],
    };
    let (keys, keypad) = pivgate_hw::keypad::sim::simulated();
    let mut io = pivgate_agent::Io::default();
    io.pins.insert(TERMINAL.into(), PinSource::Keys(Box::new(keypad)));
    io.indicators.insert(TERMINAL.into(), Box::new(Say(TERMINAL, None)));
    io.on_result = Some(Arc::new(|t: &str, r: &TapResult| match r {
        TapResult::Granted(g) => println!("agent: {t}: the gateway verified the card and granted access to {}", g.operator_id),
        TapResult::WrongPin { tries } => println!("agent: {t}: wrong PIN, {tries} tries left"),
        other => println!("agent: {t}: {other:?}"),
    }));
    let (agent_stop, agent_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent_task = tokio::spawn(pivgate_agent::run(acfg, io, async {
        let _ = agent_stop_rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The badge, with a contact card's timing.
    let vpcd_addr = std::net::SocketAddr::from(([127, 0, 0, 1], vpcd_port));
    let mut card = Some(profile.card());
    if let Some(c) = card.as_mut() {
        c.set_latency(Latency::typical_contact());
    }
    let inserted: Arc<Mutex<Option<vpcd::Inserted>>> = Arc::default();
    let insert = |card: pivgate_vcard::VirtualCard| -> Result<vpcd::Inserted> {
        println!(">>> badge inserted into \"{reader}\"");
        Ok(vpcd::insert(card, vpcd_addr)?)
    };
    *inserted.lock().unwrap() = Some(insert(card.take().context("card")?)?);
    println!("(type the PIN and Enter when asked; r + Enter pulls or re-inserts the badge; q + Enter quits)");

    // The keyboard.
    // What is typed is not echoed (it may be the PIN) and is zeroized once
    // handled.
    let (line_tx, mut line_rx) = tokio::sync::mpsc::channel::<Option<zeroize::Zeroizing<String>>>(16);
    std::thread::spawn(move || {
        let mut lines = pivgate_hw::keypad::sim::QuietLines::stdin();
        while let Some(line) = lines.next_line() {
            if line_tx.blocking_send(Some(line)).is_err() {
                return;
            }
        }
        let _ = line_tx.blocking_send(None);
    });
    loop {
        let line = tokio::select! {
            l = line_rx.recv() => l,
            _ = tokio::signal::ctrl_c() => None,
        };
        let Some(Some(line)) = line else { break };
        match line.trim() {
            "q" | "quit" => break,
            "r" | "remove" | "insert" => {
                let mut slot = inserted.lock().unwrap();
                match slot.take() {
                    Some(i) => {
                        let c = i.remove();
                        println!(">>> badge removed");
                        card = Some(c);
                    }
                    None => {
                        if let Some(c) = card.take() {
                            *slot = Some(insert(c)?);
                        }
                    }
                }
            }
            digits => {
                keys.type_legends(digits);
                keys.press(pivgate_hw::keypad::Key::Enter);
            }
        }
    }
    println!(">>> stopping");
    if let Some(i) = inserted.lock().unwrap().take() {
        i.remove();
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let _ = agent_stop.send(());
    let _ = agent_task.await;
    let _ = console.kill();
    let _ = console.wait();
    let _ = gw_stop.send(());
    let _ = gw_task.await;
    println!("site stopped; everything it made is in {}", site.display());
    Ok(())
}
