//! Shared helpers for the end-to-end scenarios in `tests/tests/`.
//!
//! The scenarios run against the real test rig that `deploy/dev test`
//! starts: a pcscd with several vpcd readers. Each scenario leases a reader
//! of its own ([`reader`]) so scenarios run in parallel, in one process or
//! many (the lease is a file lock). Scenarios that use PC/SC must lease
//! their reader before their first PC/SC call.
#![forbid(unsafe_code)]

use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use pivgate_hw::pcsc::ReaderEvent;

/// One vpcd reader of the rig, held until dropped.
pub struct Reader {
    /// The rig's pcscd instance that serves this reader.
    pub instance: usize,
    /// The reader's name in pcscd.
    pub name: String,
    /// Where a virtual card connects to put itself in this reader.
    pub addr: SocketAddr,
    _lock: File,
}

fn env(name: &str) -> Result<String> {
    std::env::var(name).map_err(|_| anyhow!("{name} is not set: these scenarios need the test rig's pcscd; run them with `deploy/dev test`"))
}

/// The rig's working folder.
pub fn run_dir() -> Result<PathBuf> {
    Ok(PathBuf::from(env("PIVGATE_RUN_DIR")?))
}

impl Reader {
    /// The instance's second vpcd slot (name, address), for scenarios with
    /// two terminals on one agent. The lease covers it.
    pub fn second_slot(&self) -> (String, SocketAddr) {
        let mut addr = self.addr;
        addr.set_port(addr.port() + 1);
        (format!("pivgate vpcd {} 00 01", self.instance), addr)
    }
}

/// Leases a free vpcd reader, waiting up to a minute for one.
pub fn reader() -> Result<Reader> {
    env("PIVGATE_RIG")?;
    let count: usize = env("PIVGATE_PCSCD_INSTANCES")?.parse::<usize>()?;
    let base: u16 = env("PIVGATE_VPCD_BASE_PORT")?.parse()?;
    let locks = run_dir()?.join("locks");
    std::fs::create_dir_all(&locks)?;
    let start = Instant::now();
    loop {
        for k in 0..count {
            let f = File::create(locks.join(format!("reader-{k}.lock")))?;
            if f.try_lock().is_ok() {
                // Each pcscd instance of the rig serves two readers; this
                // process talks to the instance of the reader it leased.
                // pcsc-lite reads this once, at the first PC/SC call.
                // Only the first of the instance's two vpcd slots is used:
                // a card leaving one slot disturbs the other in vpcd.
                let socket = run_dir()?.join(format!("pcscd-{k}/pcscd.comm"));
                std::env::set_var("PCSCLITE_CSOCK_NAME", socket);
                let name = format!("pivgate vpcd {k} 00 00");
                // The previous holder's card may still be leaving: pcscd
                // notices a vpcd card has gone at its next presence poll.
                let ctx = pivgate_hw::pcsc::establish()?;
                if !pivgate_hw::pcsc::wait_for_card(&ctx, &name, false, Duration::from_secs(10))? {
                    bail!("reader {name} did not become empty");
                }
                return Ok(Reader { instance: k, name, addr: SocketAddr::from(([127, 0, 0, 1], base + 2 * k as u16)), _lock: f });
            }
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("no free vpcd reader after a minute");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for the next event about `reader` that `want` accepts, skipping
/// events about other readers (other scenarios run in parallel).
pub fn wait_event(rx: &Receiver<ReaderEvent>, reader: &str, timeout: Duration, want: impl Fn(&ReaderEvent) -> bool) -> Result<ReaderEvent> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(ev) => {
                let about = match &ev {
                    ReaderEvent::CardInserted { reader: r, .. }
                    | ReaderEvent::CardRemoved { reader: r }
                    | ReaderEvent::ReaderAdded { reader: r }
                    | ReaderEvent::ReaderRemoved { reader: r } => r == reader,
                    ReaderEvent::ServiceLost | ReaderEvent::ServiceRestored => true,
                };
                if about && want(&ev) {
                    return Ok(ev);
                }
            }
            Err(RecvTimeoutError::Timeout) => bail!("no matching event for {reader} within {timeout:?}"),
            Err(RecvTimeoutError::Disconnected) => bail!("monitor stopped"),
        }
    }
}

/// Connects to the card in `reader`, waiting for pcscd to see it.
pub fn connect_card(reader: &str) -> Result<pivgate_hw::pcsc::PcscCard> {
    let ctx = pivgate_hw::pcsc::establish()?;
    if !pivgate_hw::pcsc::wait_for_card(&ctx, reader, true, Duration::from_secs(10))? {
        bail!("pcscd never saw the card in {reader}");
    }
    let start = Instant::now();
    loop {
        match pivgate_hw::pcsc::PcscCard::connect(&ctx, reader) {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() > Duration::from_secs(10) => return Err(e).context("connecting to the card"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Checks a card's signature over `digest` with the public key in
/// `cert_der`: ECDSA P-256 or P-384 over the prehashed digest, or RSA
/// PKCS#1 v1.5 with SHA-256.
pub fn verify_signature(cert_der: &[u8], digest: &[u8], sig: &[u8]) -> Result<()> {
    use p256::pkcs8::DecodePublicKey;
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(cert_der)?;
    let spki = cert.tbs_certificate.subject_pki.raw;
    if let Ok(pk) = p256::PublicKey::from_public_key_der(spki) {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        let sig = p256::ecdsa::Signature::from_der(sig)?;
        return Ok(p256::ecdsa::VerifyingKey::from(&pk).verify_prehash(digest, &sig)?);
    }
    if let Ok(pk) = p384::PublicKey::from_public_key_der(spki) {
        use p384::ecdsa::signature::hazmat::PrehashVerifier;
        let sig = p384::ecdsa::Signature::from_der(sig)?;
        return Ok(p384::ecdsa::VerifyingKey::from(&pk).verify_prehash(digest, &sig)?);
    }
    let pk = rsa::RsaPublicKey::from_public_key_der(spki).context("certificate key is not P-256, P-384 or RSA")?;
    pk.verify(rsa::Pkcs1v15Sign::new::<sha2::Sha256>(), digest, sig)?;
    Ok(())
}

/// Restarts the rig's pcscd instance that serves `reader`, as a Pi's
/// pcscd may be restarted under a running agent.
pub fn restart_pcscd(reader: &Reader) -> Result<()> {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/dev");
    let status = std::process::Command::new(script).args(["restart-pcscd", &reader.instance.to_string()]).stdout(std::process::Stdio::null()).status()?;
    if !status.success() {
        bail!("restarting pcscd instance {} failed", reader.instance);
    }
    Ok(())
}

pub mod agent;
pub mod pki;
pub mod powercut;
pub mod process;
pub mod site;

/// The path of one of the workspace's binaries, next to the test
/// executable (test executables live in target/<profile>/deps).
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(std::path::Path::parent).context("no target folder")?;
    let path = dir.join(name);
    if !path.exists() {
        bail!("{} is not built; run `cargo build --workspace --all-targets`", path.display());
    }
    Ok(path)
}

/// Runs a tool (yubico-piv-tool, openssl, pkcs11-tool) as a user would;
/// its output, or an error with the output when it fails.
pub fn run_tool(cmd: &mut std::process::Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{cmd:?} failed: {text}");
    }
    Ok(text)
}

/// Runs `cmd` (an administrator at `pivgatectl`, say) with `stdin` typed
/// into it (PINs, one per line): whether it succeeded, and what it said
/// (standard output, then standard error).
pub fn run_typed(cmd: &mut std::process::Command, stdin: &str) -> (bool, String) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = match cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) => return (false, e.to_string()),
    };
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(stdin.as_bytes());
    }
    match child.wait_with_output() {
        Ok(out) => (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))),
        Err(e) => (false, e.to_string()),
    }
}

/// OpenSC's PKCS#11 module, where Debian puts it.
pub fn opensc_module() -> Result<PathBuf> {
    for p in [
        "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so",
        "/usr/lib/aarch64-linux-gnu/opensc-pkcs11.so",
        "/usr/lib/opensc-pkcs11.so",
        "/usr/lib64/opensc-pkcs11.so",
    ] {
        if std::path::Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    bail!("opensc-pkcs11.so not found; install the opensc package")
}
