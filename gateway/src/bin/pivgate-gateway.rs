//! `pivgate-gateway`: the central gateway.
//!
//! ```text
//! pivgate-gateway --data-dir DIR --listen 127.0.0.1:7443
//! pivgate-gateway --config /etc/pivgate/gateway.toml
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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
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
