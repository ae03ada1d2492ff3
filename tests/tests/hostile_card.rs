//! Hostile cards: every malformed or hostile answer ends in a typed error,
//! within the time bounds, with bounded memory, and never a panic.
//!
//! Each case plants a [`Fault`] or a hostile object in the virtual card and
//! runs one client operation in process, on a thread watched by a deadline,
//! so a hang fails the case instead of the suite. Through pcscd the same
//! bytes arrive the same way; `card_path.rs` covers that transport.

use std::sync::mpsc::channel;
use std::time::Duration;

use pivgate_hw::piv::{Algorithm, Limits, PivClient, Slot};
use pivgate_hw::tlv;
use pivgate_hw::{Error, Pin};
use pivgate_vcard::{Fault, Profile, ProfileOptions, VirtualCard};

#[derive(Clone, Copy, Debug)]
enum Op {
    Select,
    Chuid,
    Discovery,
    Cert9a,
    PinStatus,
    Verify,
    Sign9e,
    SignRsa9e,
}

type Want = fn(&Error) -> bool;

struct Case {
    name: &'static str,
    op: Op,
    setup: Box<dyn Fn(&mut VirtualCard) + Send>,
    want: Want,
}

fn respond(ins: u8, object: Option<u32>, response: Vec<u8>) -> Box<dyn Fn(&mut VirtualCard) + Send> {
    Box::new(move |c: &mut VirtualCard| c.add_fault(Fault::Respond { ins, object, response: response.clone() }))
}

fn plant(tag: u32, contents: Vec<u8>) -> Box<dyn Fn(&mut VirtualCard) + Send> {
    Box::new(move |c: &mut VirtualCard| {
        c.contents_mut().objects.insert(tag, contents.clone());
    })
}

fn with_sw(mut data: Vec<u8>, sw: u16) -> Vec<u8> {
    data.extend_from_slice(&sw.to_be_bytes());
    data
}

fn malformed(e: &Error) -> bool {
    matches!(e, Error::Malformed { .. })
}
fn status(e: &Error) -> bool {
    matches!(e, Error::Status { .. })
}
fn too_large(e: &Error) -> bool {
    matches!(e, Error::TooLarge { .. })
}

const CHUID: u32 = 0x5FC102;
const CERT_9A: u32 = 0x5FC105;

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn cases() -> Vec<Case> {
    let ok_apt = {
        let mut apt = Vec::new();
        tlv::write(&mut apt, 0x4F, &[0, 0, 0x10, 0, 1, 0]);
        tlv::encode(0x61, &apt)
    };
    let long_chuid = {
        let mut v = Vec::new();
        tlv::write(&mut v, 0x34, &[0x11; 16]);
        v.extend([0x35, 0x20, b'2', b'0']);
        v
    };
    vec![
        // --- SELECT ---
        Case { name: "select answers nothing at all", op: Op::Select, setup: respond(0xA4, None, vec![]), want: malformed },
        Case { name: "select answers one byte", op: Op::Select, setup: respond(0xA4, None, vec![0x90]), want: malformed },
        Case { name: "select: not found", op: Op::Select, setup: respond(0xA4, None, vec![0x6A, 0x82]), want: |e| matches!(e, Error::NoPivApplication) },
        Case { name: "select: unknown status word", op: Op::Select, setup: respond(0xA4, None, vec![0x6F, 0x12]), want: status },
        Case { name: "select: class not supported", op: Op::Select, setup: respond(0xA4, None, vec![0x6E, 0x00]), want: status },
        Case {
            name: "select: template names another app",
            op: Op::Select,
            setup: respond(0xA4, None, with_sw(tlv::encode(0x61, &tlv::encode(0x4F, &[0xD2, 0x76, 0, 1])), 0x9000)),
            want: malformed,
        },
        Case {
            name: "select: APT length past the data",
            op: Op::Select,
            setup: respond(0xA4, None, vec![0x61, 0x40, 0x4F, 0x06, 0x90, 0x00]),
            want: malformed,
        },
        Case {
            name: "select: APT with trailing garbage",
            op: Op::Select,
            setup: respond(0xA4, None, with_sw([ok_apt.clone(), vec![0xFF]].concat(), 0x9000)),
            want: malformed,
        },
        Case { name: "select: indefinite length", op: Op::Select, setup: respond(0xA4, None, vec![0x61, 0x80, 0x00, 0x00, 0x90, 0x00]), want: malformed },
        Case { name: "select: five length bytes", op: Op::Select, setup: respond(0xA4, None, vec![0x61, 0x85, 0, 0, 0, 0, 1, 0, 0x90, 0x00]), want: malformed },
        Case {
            name: "select: wrong Le forever",
            op: Op::Select,
            setup: respond(0xA4, None, vec![0x6C, 0x10]),
            want: |e| matches!(e, Error::ChainTooLong { .. }),
        },
        Case { name: "select: response longer than a short APDU", op: Op::Select, setup: respond(0xA4, None, with_sw(vec![0; 300], 0x9000)), want: too_large },
        // --- GET DATA: CHUID ---
        Case {
            name: "chuid: not found",
            op: Op::Chuid,
            setup: respond(0xCB, Some(CHUID), vec![0x6A, 0x82]),
            want: |e| matches!(e, Error::ObjectNotFound { .. }),
        },
        Case {
            name: "chuid: security status",
            op: Op::Chuid,
            setup: respond(0xCB, Some(CHUID), vec![0x69, 0x82]),
            want: |e| matches!(e, Error::SecurityStatusNotSatisfied { .. }),
        },
        Case { name: "chuid: memory failure", op: Op::Chuid, setup: respond(0xCB, Some(CHUID), vec![0x65, 0x81]), want: status },
        Case {
            name: "chuid: outer tag not 53",
            op: Op::Chuid,
            setup: respond(0xCB, Some(CHUID), with_sw(tlv::encode(0x54, &[1, 2]), 0x9000)),
            want: malformed,
        },
        Case {
            name: "chuid: long-form length past data",
            op: Op::Chuid,
            setup: respond(0xCB, Some(CHUID), vec![0x53, 0x82, 0xFF, 0xFF, 0x30, 0x00, 0x90, 0x00]),
            want: malformed,
        },
        Case { name: "chuid: no GUID", op: Op::Chuid, setup: plant(CHUID, tlv::encode(0x35, b"20301231")), want: malformed },
        Case { name: "chuid: GUID of 15 bytes", op: Op::Chuid, setup: plant(CHUID, tlv::encode(0x34, &[1; 15])), want: malformed },
        Case {
            name: "chuid: FASC-N of 24 bytes",
            op: Op::Chuid,
            setup: plant(CHUID, [tlv::encode(0x30, &[1; 24]), tlv::encode(0x34, &[1; 16])].concat()),
            want: malformed,
        },
        Case {
            name: "chuid: expiry not digits",
            op: Op::Chuid,
            setup: plant(CHUID, [tlv::encode(0x34, &[1; 16]), tlv::encode(0x35, b"2030-1-1")].concat()),
            want: malformed,
        },
        Case { name: "chuid: inner TLV truncated", op: Op::Chuid, setup: plant(CHUID, long_chuid.clone()), want: malformed },
        Case { name: "chuid: tag of four bytes", op: Op::Chuid, setup: plant(CHUID, vec![0x5F, 0xFF, 0xFF, 0xFF, 0x01, 0x00]), want: malformed },
        Case { name: "chuid: empty 9000 answer", op: Op::Chuid, setup: respond(0xCB, Some(CHUID), vec![0x90, 0x00]), want: malformed },
        // --- Discovery ---
        Case { name: "discovery: not 7E", op: Op::Discovery, setup: plant(0x7E, tlv::encode(0x7F, &[1])), want: malformed },
        Case {
            name: "discovery: policy of 1 byte",
            op: Op::Discovery,
            setup: plant(0x7E, tlv::encode(0x7E, &[tlv::encode(0x4F, &[1; 11]), tlv::encode(0x5F2F, &[0x40])].concat())),
            want: malformed,
        },
        // --- certificates ---
        Case {
            name: "cert: endless 61xx chain",
            op: Op::Cert9a,
            setup: Box::new(|c: &mut VirtualCard| c.add_fault(Fault::EndlessChain)),
            want: |e| matches!(e, Error::TooLarge { .. } | Error::ChainTooLong { .. }),
        },
        Case { name: "cert: oversized object", op: Op::Cert9a, setup: plant(CERT_9A, tlv::encode(0x70, &vec![0x30; 60_000])), want: too_large },
        Case {
            name: "cert: gzip bomb",
            op: Op::Cert9a,
            setup: plant(CERT_9A, [tlv::encode(0x70, &gzip(&vec![0u8; 8 << 20])), tlv::encode(0x71, &[1])].concat()),
            want: too_large,
        },
        Case {
            name: "cert: says gzip, is not",
            op: Op::Cert9a,
            setup: plant(CERT_9A, [tlv::encode(0x70, &[0x30, 0x82, 1, 0]), tlv::encode(0x71, &[1])].concat()),
            want: malformed,
        },
        Case {
            name: "cert: truncated gzip",
            op: Op::Cert9a,
            setup: plant(CERT_9A, [tlv::encode(0x70, &gzip(&[0x30; 900])[..20]), tlv::encode(0x71, &[1])].concat()),
            want: malformed,
        },
        Case { name: "cert: no 70 tag", op: Op::Cert9a, setup: plant(CERT_9A, [tlv::encode(0x71, &[0]), tlv::encode(0xFE, &[])].concat()), want: malformed },
        Case { name: "cert: empty certificate", op: Op::Cert9a, setup: plant(CERT_9A, tlv::encode(0x70, &[])), want: malformed },
        Case {
            name: "cert: empty CertInfo",
            op: Op::Cert9a,
            setup: plant(CERT_9A, [tlv::encode(0x70, &[0x30]), tlv::encode(0x71, &[])].concat()),
            want: malformed,
        },
        Case { name: "cert: GET RESPONSE refused", op: Op::Cert9a, setup: respond(0xC0, None, vec![0x6A, 0x86]), want: status },
        Case {
            name: "cert: answers slowly",
            op: Op::Cert9a,
            setup: Box::new(|c: &mut VirtualCard| c.add_fault(Fault::Slow(Duration::from_millis(400)))),
            want: |e| matches!(e, Error::Timeout { .. }),
        },
        // --- PIN ---
        Case { name: "pin status: 63 00 without a count", op: Op::PinStatus, setup: respond(0x20, None, vec![0x63, 0x00]), want: status },
        Case { name: "verify: blocked", op: Op::Verify, setup: respond(0x20, None, vec![0x69, 0x83]), want: |e| matches!(e, Error::PinBlocked) },
        Case { name: "verify: zero tries left", op: Op::Verify, setup: respond(0x20, None, vec![0x63, 0xC0]), want: |e| matches!(e, Error::PinBlocked) },
        Case { name: "verify: data with the status", op: Op::Verify, setup: respond(0x20, None, vec![0x01, 0x6A, 0x80]), want: status },
        // --- GENERAL AUTHENTICATE ---
        Case {
            name: "sign: template without 82",
            op: Op::Sign9e,
            setup: respond(0x87, None, with_sw(tlv::encode(0x7C, &tlv::encode(0x81, &[1; 8])), 0x9000)),
            want: malformed,
        },
        Case {
            name: "sign: not a 7C template",
            op: Op::Sign9e,
            setup: respond(0x87, None, with_sw(tlv::encode(0x7D, &tlv::encode(0x82, &[1; 8])), 0x9000)),
            want: malformed,
        },
        Case {
            name: "sign: 7C length past data",
            op: Op::Sign9e,
            setup: respond(0x87, None, vec![0x7C, 0x50, 0x82, 0x02, 0x30, 0x00, 0x90, 0x00]),
            want: malformed,
        },
        Case { name: "sign: 9000 and no data", op: Op::Sign9e, setup: respond(0x87, None, vec![0x90, 0x00]), want: malformed },
        Case {
            name: "sign: empty signature",
            op: Op::Sign9e,
            setup: respond(0x87, None, with_sw(tlv::encode(0x7C, &tlv::encode(0x82, &[])), 0x9000)),
            want: malformed,
        },
        Case {
            name: "sign: signature not DER",
            op: Op::Sign9e,
            setup: respond(0x87, None, with_sw(tlv::encode(0x7C, &tlv::encode(0x82, &[0x04; 64])), 0x9000)),
            want: malformed,
        },
        Case {
            name: "sign: ECDSA integers too long",
            op: Op::Sign9e,
            setup: respond(
                0x87,
                None,
                with_sw(
                    tlv::encode(0x7C, &tlv::encode(0x82, &tlv::encode(0x30, &[tlv::encode(0x02, &[1; 40]), tlv::encode(0x02, &[1; 32])].concat()))),
                    0x9000,
                ),
            ),
            want: malformed,
        },
        Case {
            name: "sign: RSA signature of 200 bytes",
            op: Op::SignRsa9e,
            setup: respond(0x87, None, with_sw(tlv::encode(0x7C, &tlv::encode(0x82, &[7; 200])), 0x9000)),
            want: malformed,
        },
        Case { name: "sign: algorithm refused", op: Op::Sign9e, setup: respond(0x87, None, vec![0x6A, 0x86]), want: status },
    ]
}

fn run(op: Op, card: VirtualCard) -> pivgate_hw::Result<()> {
    let limits = Limits { apdu_timeout: Duration::from_millis(300), exchange_timeout: Duration::from_secs(2), ..Limits::default() };
    let mut piv = PivClient::new(card).with_limits(limits);
    if !matches!(op, Op::Select) {
        piv.select()?;
    }
    match op {
        Op::Select => piv.select().map(drop),
        Op::Chuid => piv.read_chuid().map(drop),
        Op::Discovery => piv.read_discovery().map(drop),
        Op::Cert9a => piv.read_certificate(Slot::Authentication).map(drop),
        Op::PinStatus => piv.pin_status().map(drop),
        Op::Verify => piv.verify_pin(&Pin::new(b"123456")?),
        Op::Sign9e => piv.sign(Slot::CardAuthentication, Algorithm::EccP256, &[1; 32]).map(drop),
        Op::SignRsa9e => piv.sign(Slot::CardAuthentication, Algorithm::Rsa2048, &[1; 32]).map(drop),
    }
}

#[test]
fn every_hostile_answer_ends_in_a_typed_error_in_time() {
    let profile = Profile::generate(&ProfileOptions::default()).unwrap();
    let cases = cases();
    assert!(cases.len() >= 40, "only {} hostile cases", cases.len());
    let mut failures = vec![];
    for case in cases {
        let mut card = profile.card();
        (case.setup)(&mut card);
        let (tx, rx) = channel();
        let op = case.op;
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || run(op, card)));
            let _ = tx.send(r);
        });
        match rx.recv_timeout(Duration::from_secs(5)) {
            Err(_) => failures.push(format!("{}: hung", case.name)),
            Ok(Err(_)) => failures.push(format!("{}: panicked", case.name)),
            Ok(Ok(Ok(()))) => failures.push(format!("{}: accepted", case.name)),
            Ok(Ok(Err(e))) if !(case.want)(&e) => failures.push(format!("{}: wrong error {e:?}", case.name)),
            Ok(Ok(Err(_))) => {}
        }
    }
    assert!(failures.is_empty(), "hostile cases not handled:\n{}", failures.join("\n"));
}

#[test]
fn the_same_card_without_faults_passes_every_operation() {
    // The control: each operation succeeds on an honest card, so the cases
    // above fail because of their fault and nothing else.
    let p256 = Profile::generate(&ProfileOptions::default()).unwrap();
    let rsa = Profile::generate(&ProfileOptions { algorithm: Algorithm::Rsa2048, ..Default::default() }).unwrap();
    for op in [Op::Select, Op::Chuid, Op::Discovery, Op::Cert9a, Op::PinStatus, Op::Verify, Op::Sign9e] {
        run(op, p256.card()).unwrap_or_else(|e| panic!("{op:?}: {e}"));
    }
    run(Op::SignRsa9e, rsa.card()).unwrap();
}
