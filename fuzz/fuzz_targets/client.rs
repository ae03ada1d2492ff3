#![no_main]
//! The PIV client against a card whose answers are the fuzzer's bytes
//! (split on 0xFF 0xFE markers into successive responses).
use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use pivgate_hw::piv::{Algorithm, PivClient, Slot};
use pivgate_hw::transport::Transport;

struct Script(VecDeque<Vec<u8>>);

impl Transport for Script {
    fn transmit(&mut self, _c: &[u8]) -> pivgate_hw::Result<Vec<u8>> {
        Ok(self.0.pop_front().unwrap_or_else(|| vec![0x6F, 0x00]))
    }
}

fuzz_target!(|data: &[u8]| {
    let responses: VecDeque<Vec<u8>> = data.split(|&b| b == 0xFE).map(|s| s.to_vec()).collect();
    let mut piv = PivClient::new(Script(responses));
    let _ = piv.select();
    let _ = piv.read_chuid();
    let _ = piv.read_certificate(Slot::Authentication);
    let _ = piv.pin_status();
    let _ = piv.sign(Slot::CardAuthentication, Algorithm::EccP256, &[0; 32]);
});
