#![no_main]
//! The virtual card's command parser and handlers on arbitrary APDUs.
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pivgate_vcard::{Profile, ProfileOptions};

static PROFILE: OnceLock<Profile> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let profile = PROFILE.get_or_init(|| Profile::generate(&ProfileOptions::default()).expect("profile"));
    let mut card = profile.card();
    for apdu in data.split(|&b| b == 0xFE) {
        let answer = card.process(apdu);
        assert!(answer.response.len() >= 2);
    }
});
