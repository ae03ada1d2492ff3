#![no_main]
//! The parsers of PIV data objects and APDU responses.
use libfuzzer_sys::fuzz_target;
use pivgate_hw::piv::objects::{certificate_from_container, ApplicationProperties, Chuid, Discovery};

fuzz_target!(|data: &[u8]| {
    let _ = Chuid::parse(data);
    let _ = ApplicationProperties::parse(data);
    let _ = Discovery::parse(data);
    let _ = certificate_from_container(data, 16 * 1024);
    let _ = pivgate_hw::apdu::Response::parse(data.to_vec());
});
