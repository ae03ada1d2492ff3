//! One checker for the APDU vectors in `vectors/apdu.toml`, run against
//! both sides of the wire: the virtual card must answer each command with
//! exactly the vector's response, and the PIV client call a vector names
//! must send exactly its command and make of the response what it says.

use std::collections::VecDeque;

use pivgate_hw::piv::{ObjectTag, PinStatus, PivClient};
use pivgate_hw::{Error, Pin, Transport};
use pivgate_vcard::{Profile, ProfileOptions};
use serde::Deserialize;

#[derive(Deserialize)]
struct File {
    vector: Vec<Vector>,
}

#[derive(Deserialize)]
struct Vector {
    name: String,
    client: Option<String>,
    command: String,
    response: String,
    outcome: Option<String>,
}

fn bytes(hex_text: &str) -> Vec<u8> {
    hex::decode(hex_text.split_whitespace().collect::<String>()).expect("vector hex")
}

fn vectors() -> Vec<Vector> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/apdu.toml")).expect("the vector file");
    let file: File = toml::from_str(&text).expect("the vector file parses");
    assert!(file.vector.len() >= 15, "vectors went missing");
    file.vector
}

#[test]
fn the_virtual_card_answers_every_vector_exactly() {
    let profile = Profile::generate(&ProfileOptions::default()).unwrap();
    let mut failures = Vec::new();
    for v in vectors() {
        let mut card = profile.card();
        let got = card.process(&bytes(&v.command)).response;
        if got != bytes(&v.response) {
            failures.push(format!("{}: answered {}, expected {}", v.name, hex::encode_upper(&got), v.response));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A card that answers the vector's response once, and records what the
/// client sent.
struct Expect {
    answers: VecDeque<Vec<u8>>,
    sent: Vec<Vec<u8>>,
}

impl Transport for Expect {
    fn transmit(&mut self, command: &[u8]) -> pivgate_hw::Result<Vec<u8>> {
        self.sent.push(command.to_vec());
        Ok(self.answers.pop_front().unwrap_or_else(|| vec![0x6F, 0x00]))
    }
}

/// Runs the client call `call` and says how it ended, in the vector file's
/// words.
fn outcome(piv: &mut PivClient<&mut Expect>, call: &str) -> String {
    let (op, arg) = call.split_once(' ').unwrap_or((call, ""));
    let ended = |r: pivgate_hw::Result<()>| match r {
        Ok(()) => "ok".to_string(),
        Err(Error::WrongPin { tries }) => format!("wrong_pin {tries}"),
        Err(Error::ObjectNotFound { .. }) => "not_found".to_string(),
        Err(e) => format!("error {e}"),
    };
    match op {
        "pin_status" => match piv.pin_status() {
            Ok(PinStatus::TriesLeft(n)) => format!("tries_left {n}"),
            Ok(s) => format!("{s:?}"),
            Err(e) => ended(Err(e)),
        },
        "verify_pin" => ended(piv.verify_pin(&Pin::new(arg.as_bytes()).unwrap())),
        "reset_pin_state" => ended(piv.reset_pin_state().and_then(|reset| if reset { Ok(()) } else { Err(Error::InvalidInput("not reset")) })),
        "get_data" => ended(piv.get_data(ObjectTag(u32::from_str_radix(arg, 16).unwrap())).map(drop)),
        other => panic!("the vector file names an unknown client call {other:?}"),
    }
}

#[test]
fn the_client_sends_every_vector_command_and_reads_its_response() {
    let mut checked = 0;
    for v in vectors() {
        let Some(call) = &v.client else { continue };
        let mut card = Expect { answers: VecDeque::from([bytes(&v.response)]), sent: vec![] };
        let got = outcome(&mut PivClient::new(&mut card), call);
        assert_eq!(card.sent, vec![bytes(&v.command)], "{}: the client sent something else", v.name);
        assert_eq!(Some(&got), v.outcome.as_ref(), "{}", v.name);
        checked += 1;
    }
    assert!(checked >= 5, "only {checked} vectors name a client call");
}
