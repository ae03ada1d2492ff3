#![no_main]
//! BER-TLV parsing of arbitrary bytes.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut total = 0;
    for t in pivgate_hw::tlv::iter(data) {
        match t {
            Ok(t) => {
                total += t.value.len();
                assert!(total <= data.len());
                let _ = pivgate_hw::tlv::iter(t.value).count();
            }
            Err(_) => break,
        }
    }
});
