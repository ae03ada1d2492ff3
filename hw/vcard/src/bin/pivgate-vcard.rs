//! `pivgate-vcard`: a virtual PIV card in a vpcd reader.
//!
//! ```text
//! pivgate-vcard --vpcd 127.0.0.1:35963 --profile DIR --pin 123456
//! ```
//!
//! Generates a card profile into DIR when DIR is empty (or missing) and loads
//! it otherwise, then sits in the vpcd reader until stopped, reconnecting when
//! pcscd restarts. The PEM files in DIR say what they are: `issuing-ca.pem`
//! (trust it at the gateway), `cert-9a.pem`, `cert-9e.pem`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use pivgate_hw::piv::Algorithm;
use pivgate_vcard::{vpcd, Latency, Profile, ProfileOptions};

#[derive(Clone, Copy, ValueEnum)]
enum Alg {
    P256,
    P384,
    Rsa2048,
}

#[derive(Clone, Copy, ValueEnum)]
enum Model {
    /// Answer at once.
    None,
    /// A typical contact card.
    Contact,
    /// A typical contactless card.
    Contactless,
}

/// A virtual PIV card (SP 800-73-4) in a pcscd reader through vpcd.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The vpcd reader to sit in (host:port).
    #[arg(long, default_value = "127.0.0.1:35963")]
    vpcd: SocketAddr,
    /// The card profile folder: generated when empty, loaded otherwise.
    #[arg(long)]
    profile: PathBuf,
    /// Set the card's PIN (6 to 8 digits); defaults to the profile's.
    #[arg(long)]
    pin: Option<String>,
    /// Key algorithm for a newly generated profile.
    #[arg(long, value_enum, default_value = "p256")]
    algorithm: Alg,
    /// Store certificates gzip-compressed in a newly generated profile.
    #[arg(long)]
    compress: bool,
    /// Latency model.
    #[arg(long, value_enum, default_value = "none")]
    latency: Model,
    /// Leave after one session instead of reconnecting.
    #[arg(long)]
    once: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let opts = ProfileOptions {
        algorithm: match args.algorithm {
            Alg::P256 => Algorithm::EccP256,
            Alg::P384 => Algorithm::EccP384,
            Alg::Rsa2048 => Algorithm::Rsa2048,
        },
        pin: args.pin.clone().unwrap_or_else(|| "123456".into()),
        compress_certificates: args.compress,
        ..Default::default()
    };
    let (mut profile, generated) = Profile::load_or_generate(&args.profile, &opts)?;
    if let Some(pin) = &args.pin {
        profile.set_pin(pin)?;
    }
    let dir = args.profile.display();
    eprintln!("pivgate-vcard: {} profile {dir}", if generated { "generated" } else { "loaded" });
    eprintln!("pivgate-vcard: card UUID {}", profile.chuid.uuid_string());
    eprintln!("pivgate-vcard: issuing CA {dir}/issuing-ca.pem, certificates {dir}/cert-9a.pem and {dir}/cert-9e.pem");
    let mut card = profile.card();
    card.set_latency(match args.latency {
        Model::None => Latency::default(),
        Model::Contact => Latency::typical_contact(),
        Model::Contactless => Latency::typical_contactless(),
    });
    let never = AtomicBool::new(false);
    loop {
        let stream = vpcd::connect(args.vpcd, Duration::from_secs(3600)).with_context(|| format!("connecting to vpcd at {}", args.vpcd))?;
        eprintln!("pivgate-vcard: inserted into the vpcd reader at {}", args.vpcd);
        let ended = vpcd::serve(&mut card, stream, &never);
        eprintln!("pivgate-vcard: session ended: {ended:?}");
        if args.once {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
