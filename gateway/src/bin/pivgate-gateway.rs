//! `pivgate-gateway`: the central gateway.
//!
//! ```text
//! pivgate-gateway --data-dir DIR --listen 127.0.0.1:7443
//! pivgate-gateway --config /etc/pivgate/gateway.toml
//! pivgate-gateway restore BACKUP --keys KEYDIR --data-dir NEWDIR
//! ```
//!
//! With no configuration it runs on embedded defaults: a data folder with a
//! sled database, a generated service CA, server certificate and first
//! administrator certificate (announced in the log).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use pivgate_gateway::{pki, Config};

/// The pivgate gateway.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML configuration file.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data folder (overrides the configuration).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// gRPC listen address (overrides the configuration).
    #[arg(long)]
    listen: Option<SocketAddr>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Builds a new data folder from a backup (`pivgatectl backup`) and a
    /// copy of the old data folder's key files, then exits; start the
    /// gateway on it as usual. Refuses a backup that is not whole, was
    /// altered or was signed by another gateway, and a folder that is not
    /// empty.
    Restore {
        /// The backup file.
        file: PathBuf,
        /// A folder with the data folder's key files (service-ca.pem,
        /// service-ca-key.pem, gateway.pem, gateway-key.pem, admin.pem,
        /// admin-key.pem, audit-signing-key.pem).
        #[arg(long)]
        keys: PathBuf,
        /// The new data folder (must not exist, or be empty).
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into())).init();
    let args = Args::parse();
    if let Some(Cmd::Restore { file, keys, data_dir }) = &args.command {
        let s = pivgate_gateway::backup::restore(file, keys, data_dir).with_context(|| format!("restoring {}", file.display()))?;
        println!(
            "restored {} into {}: audit records 1..{} verified (head {}), events 1..{}, {} entries",
            file.display(),
            data_dir.display(),
            s.header.audit_index,
            s.header.audit_hash,
            s.header.event_sequence,
            s.entries
        );
        return Ok(());
    }
    let mut config = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    config.validate()?;
    let (gateway, tls, created) = pivgate_gateway::open(&config).context("starting the gateway")?;
    let files = pki::Files::in_dir(&config.data_dir);
    if created {
        tracing::info!(
            ca = %files.ca.display(),
            admin_cert = %files.admin.display(),
            admin_key = %files.admin_key.display(),
            "generated the service CA, server certificate and first administrator"
        );
    }
    let listener = tokio::net::TcpListener::bind(config.listen).await.with_context(|| format!("listening on {}", config.listen))?;
    tracing::info!(listen = %listener.local_addr()?, data_dir = %config.data_dir.display(), "pivgate gateway serving");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending::<()>().await } } => {}
        }
        tracing::info!("shutting down; finishing in-flight requests");
    };
    // systemd (Type=notify): ready once listening; watchdog while alive.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let every = std::time::Duration::from_micros(usec / 2);
        tokio::spawn(async move {
            loop {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                tokio::time::sleep(every).await;
            }
        });
    }
    let result = pivgate_gateway::run(listener, gateway, tls, config, async move {
        shutdown.await;
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    })
    .await;
    match result {
        Ok(()) => Ok(()),
        // The disk refused to keep acknowledged writes: say so and exit
        // with EX_IOERR, so the service manager restarts on what is on disk.
        Err(e @ pivgate_gateway::Error::Durability(_)) => {
            tracing::error!(error = %e, "stopping: storage failure");
            eprintln!("pivgate-gateway: {e}");
            std::process::exit(74);
        }
        Err(e) => Err(e.into()),
    }
}
