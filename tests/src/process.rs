//! The gateway as a process, for scenarios that kill or restart it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::binary;

/// A `pivgate-gateway` process on a fixed loopback port.
pub struct GatewayProcess {
    child: Option<Child>,
    /// Data folder.
    pub data_dir: PathBuf,
    /// Port.
    pub port: u16,
    extra: Vec<String>,
    /// Open-file limit (soft and hard) to run it under, with prlimit.
    nofile: Option<u64>,
    /// Where its standard error goes (appended), if anywhere.
    pub log: Option<PathBuf>,
}

/// A free loopback port.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl GatewayProcess {
    /// Starts the gateway on `data_dir` with extra arguments, and waits for
    /// its port.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Result<GatewayProcess> {
        GatewayProcess::start_with(data_dir, extra, None)
    }

    /// Like [`GatewayProcess::start`], under an open-file limit of
    /// `nofile` (soft and hard, as systemd's default soft limit of 1024
    /// would be if the unit did not raise it).
    pub fn start_with(data_dir: &Path, extra: &[&str], nofile: Option<u64>) -> Result<GatewayProcess> {
        let mut g = GatewayProcess {
            child: None,
            data_dir: data_dir.to_path_buf(),
            port: free_port()?,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            nofile,
            log: None,
        };
        g.spawn()?;
        Ok(g)
    }

    /// Starts the gateway without waiting for it: for killing it in the
    /// middle of its start.
    /// Its standard error is appended to `log`, if given.
    pub fn launch(data_dir: &Path, extra: &[&str], log: Option<&Path>) -> Result<GatewayProcess> {
        let mut g = GatewayProcess {
            child: None,
            data_dir: data_dir.to_path_buf(),
            port: free_port()?,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            nofile: None,
            log: log.map(Path::to_path_buf),
        };
        g.spawn_child()?;
        Ok(g)
    }

    fn spawn(&mut self) -> Result<()> {
        self.spawn_child()?;
        self.wait_ready()
    }

    fn spawn_child(&mut self) -> Result<()> {
        let mut cmd = match self.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(binary("pivgate-gateway")?);
                c
            }
            None => Command::new(binary("pivgate-gateway")?),
        };
        let child = cmd
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(match &self.log {
                Some(p) => Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
                None => Stdio::null(),
            })
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the gateway serves its port (it opens it only once its
    /// first start, if any, is complete).
    pub fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                let said = self.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
                let tail: Vec<&str> = said.lines().rev().take(5).collect();
                bail!("the gateway exited: {status}; it said: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" | "));
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("the gateway did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// After a launch with `disk` armed to stop at a change: waits until
    /// the gateway is held at that change (`true`) or serves its port,
    /// having started with fewer changes (`false`), at most 20 s.
    pub fn stopped_or_ready(&self, disk: &crate::powercut::PowerCut) -> Result<bool> {
        let start = Instant::now();
        loop {
            if disk.wait_stopped(Duration::from_millis(50)) {
                return Ok(true);
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(false);
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("the gateway neither reached the change it was to stop at nor started");
            }
        }
    }

    /// The address.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Sends SIGKILL without waiting for the process to end (it may be
    /// held in a filesystem request: see `powercut`); [`GatewayProcess::kill`]
    /// then reaps it.
    pub fn send_kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
        }
    }

    /// Reaps a gateway sent SIGKILL while `disk` held one of its changes
    /// (see [`crate::powercut::PowerCut::reap`]).
    pub fn reap_held(&mut self, disk: &mut crate::powercut::PowerCut) -> Result<()> {
        match self.child.take() {
            Some(mut c) => disk.reap(&mut c),
            None => Ok(()),
        }
    }

    /// SIGKILL, no warning.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same folder and port without waiting for it
    /// (to kill it while it starts).
    pub fn relaunch(&mut self) -> Result<()> {
        self.kill();
        self.spawn_child()
    }

    /// Starts it again on the same folder and port.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A site on the gateway binary: an operator with an enrolled card, an
/// agent bound to terminal `t1`, an application, and their credentials.
pub struct ProcessSite {
    /// The gateway.
    pub gateway: GatewayProcess,
    /// The first administrator.
    pub admin: pivgate_gateway::client::Credentials,
    /// Agent `pi-1`, bound to `t1`.
    pub agent: pivgate_gateway::client::Credentials,
    /// Application `wallboard`.
    pub application: pivgate_gateway::client::Credentials,
    /// Operator `op-1`'s card (9A enrolled), PIN 123456.
    pub card: pivgate_vcard::Profile,
    _dir: PathBuf,
}

impl ProcessSite {
    /// Starts the gateway binary under an open-file limit of `nofile` (if
    /// given) with `extra_config` appended to its configuration file, and
    /// sets the site up through the Admin API.
    pub async fn start(nofile: Option<u64>, extra_config: &str) -> Result<ProcessSite> {
        use pivgate_gateway::client::{Admin, Credentials};
        use pivgate_gateway::model::{Operator, Slot};
        use pivgate_gateway::pki::Role;
        let dir = crate::site::scratch("process-site");
        let issuer = pivgate_vcard::IssuingCa::generate("test card issuer CA")?;
        let anchor = dir.join("issuer.pem");
        std::fs::write(&anchor, &issuer.cert_pem)?;
        let config = dir.join("gateway.toml");
        std::fs::write(&config, format!("{extra_config}\n[cards]\ntrust_anchors = [{:?}]\n", anchor.display().to_string()))?;
        let data = dir.join("data");
        let gateway = GatewayProcess::start_with(&data, &["--config", &config.display().to_string()], nofile)?;
        let admin_creds = Credentials::admin_in(&data)?;
        let mut admin = Admin::connect(&gateway.addr(), "localhost", &admin_creds).await?;
        let card = pivgate_vcard::Profile::generate_with_ca(issuer, &pivgate_vcard::ProfileOptions::default())?;
        let op = Operator { id: "op-1".into(), name: "Operator".into(), roles: vec![], enabled: true };
        admin.add_operator_with_card(&op, &card.certificates[&pivgate_hw::piv::Slot::Authentication], Slot::PivAuthentication).await?;
        let agent = admin.issue_credentials(Role::Agent, "pi-1", 1).await?;
        let application = admin.issue_credentials(Role::Application, "wallboard", 1).await?;
        admin.bind_agent("pi-1", &["t1"]).await?;
        Ok(ProcessSite { gateway, admin: admin_creds, agent, application, card, _dir: dir })
    }
}

/// An attacker that holds `n` idle TCP connections to a port, reopening
/// those the server closes, until dropped.
pub struct IdleFlood {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    held: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IdleFlood {
    /// Starts holding `n` connections to `127.0.0.1:port`; returns once the
    /// first `n` are open (or could not all be opened).
    pub fn start(port: u16, n: usize) -> IdleFlood {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let held_count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (s, h) = (stop.clone(), held_count.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut held: Vec<std::net::TcpStream> = Vec::new();
            let mut first = true;
            while !s.load(Ordering::Relaxed) {
                // Drop the ones the server closed, then top up.
                held.retain(|c| {
                    let _ = c.set_nonblocking(true);
                    !matches!(c.peek(&mut [0u8; 1]), Ok(0))
                });
                while held.len() < n {
                    match std::net::TcpStream::connect(("127.0.0.1", port)) {
                        Ok(c) => held.push(c),
                        Err(_) => break,
                    }
                }
                h.store(held.len(), Ordering::Relaxed);
                if first {
                    let _ = ready_tx.send(());
                    first = false;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let _ = ready_rx.recv_timeout(Duration::from_secs(30));
        IdleFlood { stop, held: held_count, thread: Some(thread) }
    }

    /// How many connections it held at its last count.
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for IdleFlood {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
