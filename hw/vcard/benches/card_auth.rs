//! One badge tap's card work, the pivgate way and the generic-middleware way,
//! measured in the same run against the virtual card with its latency model
//! set to a typical contact card.
//!
//! - pivgate: SELECT, CHUID, VERIFY, GENERAL AUTHENTICATE 9A, PIN reset. The
//!   gateway already holds the certificate, so none is read.
//! - generic middleware (what OpenSC's PIV driver does for a login and a
//!   signature): probe the Discovery object, SELECT, CCC, Discovery again,
//!   key history, CHUID, every certificate slot (9A, 9C, 9D, 9E), PIN
//!   status, VERIFY, sign.
//!
//! Run with `deploy/dev bench` (through the real pcscd and vpcd, plus in
//! process) or `cargo bench -p pivgate-hw --bench card_auth` (in process only).

use std::time::{Duration, Instant};

use pivgate_hw::piv::{Algorithm, ObjectTag, PivClient, Slot, Stats};
use pivgate_hw::transport::Transport;
use pivgate_hw::Pin;
use pivgate_vcard::{Latency, Profile, ProfileOptions};
use sha2::Digest;

const ROUNDS: usize = 15;

fn pivgate_tap<T: Transport>(piv: &mut PivClient<T>, digest: &[u8]) {
    piv.select().expect("select");
    piv.read_chuid().expect("chuid");
    piv.verify_pin(&Pin::new(b"123456").expect("pin")).expect("verify");
    piv.sign(Slot::Authentication, Algorithm::EccP256, digest).expect("sign");
    piv.reset_pin_state().expect("reset");
}

fn middleware_tap<T: Transport>(piv: &mut PivClient<T>, digest: &[u8]) {
    let _ = piv.get_data(ObjectTag::DISCOVERY);
    piv.select().expect("select");
    let _ = piv.get_data(ObjectTag::CCC);
    let _ = piv.get_data(ObjectTag::DISCOVERY);
    let _ = piv.get_data(ObjectTag::KEY_HISTORY);
    piv.read_chuid().expect("chuid");
    for slot in [Slot::Authentication, Slot::Signature, Slot::KeyManagement, Slot::CardAuthentication] {
        let _ = piv.read_certificate(slot);
    }
    piv.pin_status().expect("pin status");
    piv.verify_pin(&Pin::new(b"123456").expect("pin")).expect("verify");
    piv.sign(Slot::Authentication, Algorithm::EccP256, digest).expect("sign");
    piv.reset_pin_state().expect("reset");
}

#[derive(Clone, Copy)]
enum Path {
    Pivgate,
    Middleware,
}

fn tap<T: Transport>(path: Path, piv: &mut PivClient<T>, digest: &[u8]) {
    match path {
        Path::Pivgate => pivgate_tap(piv, digest),
        Path::Middleware => middleware_tap(piv, digest),
    }
}

struct Figures {
    stats: Stats,
    mean: Duration,
    min: Duration,
}

fn measure(mut one: impl FnMut() -> Stats) -> Figures {
    let mut times = Vec::with_capacity(ROUNDS);
    let mut stats = Stats::default();
    one(); // warm-up
    for _ in 0..ROUNDS {
        let t = Instant::now();
        stats = one();
        times.push(t.elapsed());
    }
    let mean = times.iter().sum::<Duration>() / ROUNDS as u32;
    Figures { stats, mean, min: *times.iter().min().unwrap_or(&Duration::ZERO) }
}

fn row(name: &str, f: &Figures) {
    println!(
        "| {name} | {} | {} | {} | {:.1} | {:.1} |",
        f.stats.apdus,
        f.stats.bytes_sent,
        f.stats.bytes_received,
        f.mean.as_secs_f64() * 1e3,
        f.min.as_secs_f64() * 1e3
    );
}

fn ratio(a: &Figures, b: &Figures) {
    println!(
        "middleware / pivgate: {:.1}x APDUs, {:.1}x bytes in, {:.2}x wall time",
        b.stats.apdus as f64 / a.stats.apdus as f64,
        b.stats.bytes_received as f64 / a.stats.bytes_received as f64,
        b.mean.as_secs_f64() / a.mean.as_secs_f64()
    );
}

fn main() {
    let profile = Profile::generate(&ProfileOptions::default()).expect("profile");
    let digest = sha2::Sha256::digest(b"challenge").to_vec();
    let latency = Latency::typical_contact();
    println!("latency model: {latency:?}; {ROUNDS} rounds each, P-256 card");
    println!();
    println!("| path | APDUs | bytes sent | bytes received | mean ms | min ms |");
    println!("| --- | --- | --- | --- | --- | --- |");

    // In process: the card answers directly, sleeping its modelled time.
    let run_in_process = |path: Path| {
        let mut card = profile.card();
        card.set_latency(latency);
        measure(|| {
            let mut piv = PivClient::new(&mut card);
            tap(path, &mut piv, &digest);
            piv.stats()
        })
    };
    let a = run_in_process(Path::Pivgate);
    let b = run_in_process(Path::Middleware);
    row("pivgate, in process", &a);
    row("generic middleware, in process", &b);

    // Through the real pcscd and vpcd when the rig is up.
    let through_pcscd = std::env::var("PIVGATE_RIG").is_ok();
    let pc = if through_pcscd { Some(pcscd_figures(&profile, latency, &digest)) } else { None };
    if let Some((c, d)) = &pc {
        row("pivgate, through pcscd + vpcd", c);
        row("generic middleware, through pcscd + vpcd", d);
    }
    println!();
    ratio(&a, &b);
    if let Some((c, d)) = &pc {
        ratio(c, d);
    } else {
        println!("(pcscd rows skipped: run `deploy/dev bench` for them)");
    }
}

fn pcscd_figures(profile: &Profile, latency: Latency, digest: &[u8]) -> (Figures, Figures) {
    use pivgate_hw::pcsc::{establish, wait_for_card, PcscCard};
    use pivgate_vcard::vpcd;
    let port: u16 = std::env::var("PIVGATE_VPCD_BASE_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(36963);
    let reader = "pivgate vpcd 0 00 00";
    let ctx = establish().expect("pcscd");
    let go = |path: Path| {
        let mut card = profile.card();
        card.set_latency(latency);
        let inserted = vpcd::insert(card, ([127, 0, 0, 1], port).into()).expect("vpcd");
        assert!(wait_for_card(&ctx, reader, true, Duration::from_secs(10)).expect("status"));
        let mut pcsc = PcscCard::connect(&ctx, reader).expect("connect");
        let figures = measure(|| {
            let mut piv = PivClient::new(pcsc.transaction().expect("transaction"));
            tap(path, &mut piv, digest);
            piv.stats()
        });
        let _ = pcsc.disconnect(false);
        inserted.remove();
        assert!(wait_for_card(&ctx, reader, false, Duration::from_secs(10)).expect("status"));
        figures
    };
    (go(Path::Pivgate), go(Path::Middleware))
}
