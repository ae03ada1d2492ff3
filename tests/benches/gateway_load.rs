//! Verified authentications per second through the real gateway: gRPC with
//! mutual TLS on loopback, sled on disk with group commit and fdatasync,
//! from 1, 16 and 256 concurrent simulated agents (each its own TLS
//! connection, terminal and P-256 card signing in process), with p50 and
//! p99 latency of a whole authentication (BeginAuthentication, the card's
//! signature, CompleteAuthentication). In the same run: the raw cost of one
//! signature verification (aws-lc-rs and the pure-Rust p256 crate) and of
//! one certificate path validation, so the overhead is a ratio.
//!
//! The load generator and the gateway share the machine's 2 cores.
//!
//! Run: `cargo bench -p pivgate-tests --bench gateway_load`

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use pivgate_gateway::model::{KeyAlgorithm, Slot as GwSlot};
use pivgate_gateway::verify::{self, CardPolicy, CardTrust};
use pivgate_hw::piv::{Algorithm, Slot};
use pivgate_proto::v1 as pb;
use pivgate_tests::site::{tap, Site, Tap};
use pivgate_vcard::{Profile, ProfileOptions};
use sha2::Digest;

fn per_op(n: usize, d: Duration) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

fn raw_costs() -> (f64, f64, f64) {
    let profile = Profile::generate(&ProfileOptions::default()).expect("profile");
    let cert = &profile.certificates[&Slot::Authentication];
    let info = verify::inspect(cert).expect("cert");
    let message = b"pivgate.v1 card authentication: a benchmark message of typical length, about eighty bytes long";
    let digest = sha2::Sha256::digest(message);
    let mut card = profile.card();
    let mut piv = pivgate_hw::piv::PivClient::new(&mut card);
    piv.verify_pin(&pivgate_hw::Pin::new(b"123456").expect("pin")).expect("verify");
    let sig = piv.sign(Slot::Authentication, Algorithm::EccP256, &digest).expect("sign");
    let n = 3000;

    let t = Instant::now();
    for _ in 0..n {
        verify::verify_signature(KeyAlgorithm::EcdsaP256, &info.spki, message, &sig).expect("aws-lc-rs verify");
    }
    let aws = per_op(n, t.elapsed());

    use p256::ecdsa::signature::hazmat::PrehashVerifier;
    use p256::pkcs8::DecodePublicKey;
    let vk = p256::ecdsa::VerifyingKey::from_public_key_der(&info.spki).expect("key");
    let s = p256::ecdsa::Signature::from_der(&sig).expect("sig");
    let t = Instant::now();
    for _ in 0..n {
        vk.verify_prehash(&digest, &s).expect("p256 verify");
    }
    let rust = per_op(n, t.elapsed());

    let anchor = pivgate_vcard::profile::pem_decode(&profile.ca.cert_pem).expect("ca");
    let trust = CardTrust::new(&[verify::Anchor::fips201(anchor)], &[], CardPolicy::default()).expect("trust");
    let t = Instant::now();
    for _ in 0..n {
        trust.validate(cert, GwSlot::PivAuthentication, SystemTime::now()).expect("path");
    }
    let path = per_op(n, t.elapsed());
    (aws, rust, path)
}

async fn load(site: &Arc<Site>, agents: usize, cards: &[Arc<Profile>], duration: Duration) -> (usize, f64, Duration, Duration, u64) {
    let mut clients = Vec::new();
    for i in 0..agents {
        clients.push(site.agent(&format!("pi-{i}"), &[&format!("t{i}")]).await.expect("agent"));
    }
    let flushes_before = flush_count(site).await;
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for (i, mut agent) in clients.into_iter().enumerate() {
        let profile = cards[i].clone();
        tasks.push(tokio::spawn(async move {
            let mut card = profile.card();
            let terminal = format!("t{i}");
            let mut lat = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                match tap(&mut agent, &terminal, &mut card, "123456", pb::Mechanism::Unspecified).await {
                    Ok(Tap::Granted(_)) => lat.push(t.elapsed()),
                    other => panic!("tap failed: {other:?}"),
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let elapsed = start.elapsed();
    all.sort();
    let q = |p: f64| all[((all.len() - 1) as f64 * p) as usize];
    let flushes = flush_count(site).await - flushes_before;
    (all.len(), all.len() as f64 / elapsed.as_secs_f64(), q(0.5), q(0.99), flushes)
}

async fn flush_count(site: &Site) -> u64 {
    let port = site.config.metrics_listen.expect("metrics").port();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("metrics");
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.expect("get");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("read");
    text.lines().find_map(|l| l.strip_prefix("pivgate_group_commits_total ")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

fn main() {
    let (aws, rust, path) = raw_costs();
    println!("raw costs, one core, 3000 iterations each:");
    println!("| operation | µs per op | per second |");
    println!("| --- | --- | --- |");
    println!("| ECDSA P-256 verify, aws-lc-rs | {aws:.1} | {:.0} |", 1e6 / aws);
    println!("| ECDSA P-256 verify, p256 crate | {rust:.1} | {:.0} |", 1e6 / rust);
    println!("| certificate path validation (rustls-webpki + policy checks) | {path:.1} | {:.0} |", 1e6 / path);
    println!();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let site = Arc::new(Site::start(move |c, _| c.metrics_listen = Some(format!("127.0.0.1:{metrics_port}").parse().unwrap())).await.expect("gateway"));
        let mut cards = Vec::new();
        for i in 0..256 {
            cards.push(Arc::new(site.enrolled_card(&format!("op-{i}"), &[], Algorithm::EccP256).await.expect("card")));
        }
        println!("end to end (begin + card signature + complete), P-256 cards, 5 s per level:");
        println!("| concurrent agents | authentications | per second | p50 ms | p99 ms | group commits | auths per commit |");
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        for agents in [1usize, 16, 256] {
            let (n, rate, p50, p99, flushes) = load(&site, agents, &cards, Duration::from_secs(5)).await;
            println!(
                "| {agents} | {n} | {rate:.0} | {:.2} | {:.2} | {flushes} | {:.1} |",
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                n as f64 / flushes.max(1) as f64
            );
        }
        let per_auth_us = 1e6 / {
            let (_, rate, ..) = load(&site, 16, &cards, Duration::from_secs(3)).await;
            rate
        };
        println!();
        println!(
            "one authentication costs {per_auth_us:.0} µs of the 2-core machine at 16 agents: {:.1}x one aws-lc-rs verify plus one path validation ({:.0} µs)",
            per_auth_us / (aws + path),
            aws + path
        );
    });
}
