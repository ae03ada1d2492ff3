//! The main job until the gateway and agent exist: a virtual PIV card in a
//! real pcscd reader (through vpcd), authenticated step by step through
//! PC/SC the way the agent will do it, printing each step.
//!
//! Run with `deploy/dev demo` (which starts pcscd with vpcd readers).

use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use pivgate_hw::pcsc::{Monitor, PcscCard, ReaderEvent};
use pivgate_hw::piv::{PinStatus, PivClient, Slot};
use pivgate_hw::Pin;
use pivgate_vcard::{vpcd, Latency, Profile, ProfileOptions};
use sha2::Digest;

fn main() -> Result<()> {
    let run = std::env::var("PIVGATE_RUN_DIR").context("run me through `deploy/dev demo`")?;
    let port: u16 = std::env::var("PIVGATE_VPCD_BASE_PORT").unwrap_or_else(|_| "36963".into()).parse()?;
    let reader = "pivgate vpcd 0 00 00".to_string();
    let dir = std::path::Path::new(&run).join("demo-card");
    let (profile, generated) = Profile::load_or_generate(&dir, &ProfileOptions::default())?;
    println!("card profile  {} ({})", dir.display(), if generated { "generated" } else { "loaded" });
    println!("issuing CA    {}", dir.join("issuing-ca.pem").display());

    let (tx, rx) = channel();
    let _monitor = Monitor::spawn(move |ev| {
        let _ = tx.send(ev);
    })?;
    let mut card = profile.card();
    card.set_latency(Latency::typical_contact());
    let inserted = vpcd::insert(card, ([127, 0, 0, 1], port).into())?;
    println!("inserted      virtual card into vpcd port {port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(ReaderEvent::CardInserted { reader: r, atr }) if r == reader => {
                println!("monitor       card in \"{r}\", ATR {}", hex::encode_upper(atr));
                break;
            }
            Ok(_) => continue,
            Err(_) => bail!("pcscd never reported the card in \"{reader}\""),
        }
    }
    let ctx = pivgate_hw::pcsc::establish()?;
    let mut pcsc = PcscCard::connect(&ctx, &reader)?;
    let started = Instant::now();
    {
        let mut piv = PivClient::new(pcsc.transaction()?);
        let props = piv.select()?;
        println!("SELECT        PIV application {}, algorithms {:?}", hex::encode_upper(&props.aid), props.algorithms);
        let chuid = piv.read_chuid()?;
        println!("GET CHUID     card UUID {}, expires {}", chuid.uuid_string(), chuid.expiry.as_deref().unwrap_or("-"));
        if let Some(f) = chuid.fascn.map(|f| f.decode()).transpose()? {
            println!("              FASC-N agency {} system {} credential {}", f.agency, f.system, f.credential);
        }
        let cert = piv.read_certificate(Slot::Authentication)?;
        println!("GET 9A cert   {} bytes (the gateway would normally hold it already)", cert.len());
        match piv.pin_status()? {
            PinStatus::TriesLeft(n) => println!("PIN status    not verified, {n} tries left"),
            other => println!("PIN status    {other:?}"),
        }
        let pin = Pin::new(b"123456")?;
        piv.verify_pin(&pin)?;
        drop(pin);
        println!("VERIFY        PIN accepted by the card (the PIN went nowhere else)");
        let digest = sha2::Sha256::digest(b"a challenge the gateway would issue");
        let sig = piv.sign(Slot::Authentication, pivgate_hw::piv::Algorithm::EccP256, &digest)?;
        println!("GEN AUTH 9A   signature {} bytes: {}", sig.len(), hex::encode_upper(&sig[..16.min(sig.len())]));
        println!("RESET PIN     state reset: {}", piv.reset_pin_state()?);
        let s = piv.stats();
        println!("wire          {} APDUs, {} bytes out, {} bytes in, {:?}", s.apdus, s.bytes_sent, s.bytes_received, started.elapsed());
    }
    pcsc.disconnect(false)?;
    inserted.remove();
    println!("removed       card out of the reader");
    Ok(())
}
