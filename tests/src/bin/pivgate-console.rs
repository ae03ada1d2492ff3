//! `pivgate-console`: an example application for integrators. It connects
//! to the gateway as an application (mutual TLS with an application
//! certificate), watches chosen terminals and prints each lock and unlock.
//! It remembers the last sequence number it handled in a state file, so
//! after a restart it resumes exactly where it stopped: nothing missed,
//! nothing twice.
//!
//! ```text
//! pivgate-console --gateway 127.0.0.1:7443 --ca service-ca.pem \
//!     --cert console.pem --key console-key.pem --state console.seq --terminal dispatch-03
//! ```
//!
//! A real console would lock or unlock its screen where this prints.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use pb::access_service_client::AccessServiceClient;
use pivgate_gateway::client::{connect, Credentials};
use pivgate_proto::v1 as pb;

/// Watch pivgate terminals.
#[derive(Parser)]
struct Args {
    /// Gateway address.
    #[arg(long, default_value = "127.0.0.1:7443")]
    gateway: String,
    /// Name in the gateway's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Service CA (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// Application certificate (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Application key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Where to keep the last sequence number handled.
    #[arg(long)]
    state: PathBuf,
    /// Terminals to watch (none: all).
    #[arg(long)]
    terminal: Vec<String>,
}

fn load_seq(p: &PathBuf) -> u64 {
    std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

fn save_seq(p: &PathBuf, seq: u64) -> Result<()> {
    // Write then rename, so a crash never leaves a torn number.
    let tmp = p.with_extension("tmp");
    std::fs::write(&tmp, seq.to_string())?;
    std::fs::rename(&tmp, p)?;
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let creds = Credentials::from_files(&args.ca, &args.cert, &args.key)?;
    let mut backoff = Duration::from_millis(200);
    loop {
        let after = load_seq(&args.state);
        let result: Result<()> = async {
            let ch = connect(&args.gateway, &args.server_name, &creds).await?;
            let mut access = AccessServiceClient::new(ch);
            let mut stream = access
                .watch_events(pb::WatchEventsRequest { after_sequence: after, terminal_ids: args.terminal.clone() })
                .await
                .context("watching")?
                .into_inner();
            println!(
                "console: watching {} from sequence {after}",
                if args.terminal.is_empty() { "all terminals".to_string() } else { args.terminal.join(", ") }
            );
            std::io::stdout().flush()?;
            while let Some(m) = stream.message().await? {
                let e = m.event.unwrap_or_default();
                match e.kind {
                    Some(pb::event::Kind::Unlocked(u)) => {
                        println!("console: #{} {} UNLOCKED by {} ({}), card {}", e.sequence, e.terminal_id, u.operator_id, u.operator_name, u.card_uuid)
                    }
                    Some(pb::event::Kind::Locked(l)) => println!(
                        "console: #{} {} LOCKED ({})",
                        e.sequence,
                        e.terminal_id,
                        pb::LockReason::try_from(l.reason).map(|r| r.as_str_name().trim_start_matches("LOCK_REASON_")).unwrap_or("?")
                    ),
                    None => {}
                }
                std::io::stdout().flush()?;
                save_seq(&args.state, e.sequence)?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            eprintln!("console: {e:#}; reconnecting");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
