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
        };
        g.spawn()?;
        Ok(g)
    }

    fn spawn(&mut self) -> Result<()> {
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
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                bail!("the gateway exited: {status}");
            }
            if start.elapsed() > Duration::from_secs(20) {
                bail!("the gateway did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The address.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGKILL, no warning.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
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
