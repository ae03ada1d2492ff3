//! Property tests: the parsers of everything a card sends, and the card's
//! own command parser, on arbitrary bytes. None may panic, loop or read out
//! of bounds; the client must finish within its round limit whatever a card
//! answers. (The cargo-fuzz targets in `fuzz/` drive the same entry points
//! with coverage guidance.)

use std::collections::VecDeque;

use pivgate_hw::piv::objects::{certificate_from_container, ApplicationProperties, Chuid, Discovery};
use pivgate_hw::piv::{Algorithm, Limits, ObjectTag, PivClient, Slot};
use pivgate_hw::transport::Transport;
use pivgate_hw::{Pin, Result};
use proptest::prelude::*;

struct Random(VecDeque<Vec<u8>>, usize);

impl Transport for Random {
    fn transmit(&mut self, _command: &[u8]) -> Result<Vec<u8>> {
        self.1 += 1;
        Ok(self.0.pop_front().unwrap_or_else(|| vec![0x61, 0x00]))
    }
}

fn any_response() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        // Mostly well-formed status words, to get past the first check.
        (proptest::collection::vec(any::<u8>(), 0..260), prop_oneof![Just(0x9000u16), Just(0x6100), Just(0x6110), Just(0x6C08), Just(0x63C1), any::<u16>()])
            .prop_map(|(mut d, sw)| {
                d.extend_from_slice(&sw.to_be_bytes());
                d
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn object_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = Chuid::parse(&data);
        let _ = ApplicationProperties::parse(&data);
        let _ = Discovery::parse(&data);
        let _ = certificate_from_container(&data, 4096);
    }

    #[test]
    fn the_client_survives_any_answers(responses in proptest::collection::vec(any_response(), 0..12)) {
        let limits = Limits { max_chain_rounds: 20, ..Limits::default() };
        let mut piv = PivClient::new(Random(responses.into(), 0)).with_limits(limits);
        let _ = piv.select();
        let _ = piv.read_chuid();
        let _ = piv.read_certificate(Slot::Authentication);
        let _ = piv.get_data(ObjectTag::DISCOVERY);
        let _ = piv.pin_status();
        let _ = piv.verify_pin(&Pin::new(b"123456").unwrap());
        let _ = piv.sign(Slot::CardAuthentication, Algorithm::EccP256, &[0; 32]);
        let _ = piv.sign(Slot::CardAuthentication, Algorithm::Rsa2048, &[0; 32]);
        // Eight operations, each at most 1 + 20 rounds (+ chained parts).
        let sent = piv.into_inner().1;
        prop_assert!(sent <= 8 * 24, "{sent} APDUs");
    }
}
