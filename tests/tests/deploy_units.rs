//! The systemd units an integrator installs: Type=notify with a watchdog,
//! hardened, no core dumps (a PIN may be in the agent's memory), and the
//! binaries really speak sd_notify.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Result;
use pivgate_tests::{binary, site::scratch};

fn unit(name: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd").join(name)).unwrap()
}

#[test]
fn units_are_notify_with_watchdog_and_hardened() {
    for name in ["pivgate-gateway.service", "pivgate-agent.service"] {
        let u = unit(name);
        for line in [
            "Type=notify",
            "WatchdogSec=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "LimitCORE=0",
            "CapabilityBoundingSet=\n",
            "MemoryDenyWriteExecute=yes",
            "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        ] {
            assert!(u.contains(line), "{name} lacks {line:?}");
        }
    }
    let agent = unit("pivgate-agent.service");
    assert!(agent.contains("DevicePolicy=closed") && agent.contains("DeviceAllow=/dev/gpiomem rw"), "the agent may reach only its devices");
    assert!(agent.contains("MemorySwapMax=0"), "a PIN in the agent's memory could reach swap");
    let gateway = unit("pivgate-gateway.service");
    assert!(gateway.contains("PrivateDevices=yes"));
    // systemd's default soft limit (1024) is less than the gateway's
    // default connection cap.
    let nofile: u64 = gateway.lines().find_map(|l| l.strip_prefix("LimitNOFILE=")).and_then(|v| v.parse().ok()).expect("LimitNOFILE");
    assert!(nofile >= pivgate_gateway::config::LimitsConfig::default().max_connections as u64 + 64, "LimitNOFILE={nofile}");
}

#[test]
fn the_gateway_tells_systemd_it_is_ready() -> Result<()> {
    let dir = scratch("notify");
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(Duration::from_secs(20)))?;
    let port = pivgate_tests::process::free_port()?;
    // systemd sets WATCHDOG_PID to the service's pid: the shell's, which
    // exec makes the gateway's.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(r#"WATCHDOG_PID=$$ exec "$0" --data-dir "$1" --listen "$2""#)
        .arg(binary("pivgate-gateway")?)
        .arg(dir.join("data"))
        .arg(format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "2000000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !(got.iter().any(|m: &String| m.contains("READY=1")) && got.iter().any(|m| m.contains("WATCHDOG=1"))) {
        match sock.recv(&mut buf) {
            Ok(n) => got.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) => {
                let _ = child.kill();
                panic!("no READY and WATCHDOG from the gateway ({e}); got {got:?}");
            }
        }
    }
    // Listening by the time it said ready.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    child.kill()?;
    child.wait()?;
    Ok(())
}
