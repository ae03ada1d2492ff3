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
}

/// A free loopback port.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl GatewayProcess {
    /// Starts the gateway on `data_dir` with extra arguments, and waits for
    /// its port.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Result<GatewayProcess> {
        let mut g = GatewayProcess { child: None, data_dir: data_dir.to_path_buf(), port: free_port()?, extra: extra.iter().map(|s| s.to_string()).collect() };
        g.spawn()?;
        Ok(g)
    }

    fn spawn(&mut self) -> Result<()> {
        let child = Command::new(binary("pivgate-gateway")?)
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
