//! The virtual card answers anything with a status word, never a panic:
//! a hostile reader or a fuzzing tool gets errors, not a dead card process.

use pivgate_hw::piv::PivClient;
use pivgate_vcard::{Profile, ProfileOptions};
use proptest::prelude::*;

#[test]
fn the_virtual_card_answers_any_apdu_with_a_status_word() {
    let profile = Profile::generate(&ProfileOptions::default()).unwrap();
    let card = std::cell::RefCell::new(profile.card());
    proptest!(ProptestConfig { cases: 2000, ..ProptestConfig::default() }, |(apdu in proptest::collection::vec(any::<u8>(), 0..300))| {
        let answer = card.borrow_mut().process(&apdu);
        prop_assert!(answer.response.len() >= 2);
        prop_assert!(answer.response.len() <= 258);
    });
    // The card still works after all that.
    let mut card = card.into_inner();
    card.reset();
    let mut piv = PivClient::new(&mut card);
    piv.select().unwrap();
    piv.read_chuid().unwrap();
}

/// Every instruction with every short body shape (0 to 4 bytes, each byte
/// from values that mean something to an APDU parser: zero, a small length,
/// 0xFF), under several classes and parameters: a status word, never a
/// panic. Random APDUs rarely hit these shapes; `00 CB 3F FF 00 05` once
/// took the whole `pivgate-vcard` process down.
#[test]
fn every_short_apdu_shape_gets_a_status_word() {
    let profile = Profile::generate(&ProfileOptions::default()).unwrap();
    let mut card = profile.card();
    let values = [0x00u8, 0x05, 0xFF];
    let mut bodies: Vec<Vec<u8>> = vec![vec![]];
    for len in 1..=4 {
        let mut next = Vec::new();
        for b in bodies.iter().filter(|b| b.len() == len - 1) {
            for v in values {
                let mut x = b.clone();
                x.push(v);
                next.push(x);
            }
        }
        bodies.extend(next);
    }
    assert_eq!(bodies.len(), 1 + 3 + 9 + 27 + 81);
    let mut n = 0u64;
    for cla in [0x00u8, 0x10, 0x80, 0xFF] {
        for ins in 0..=255u8 {
            for (p1, p2) in [(0x00, 0x00), (0x3F, 0xFF), (0x9A, 0x9B), (0xFF, 0x00), (0x00, 0x80), (0x04, 0x00)] {
                for body in &bodies {
                    let mut apdu = vec![cla, ins, p1, p2];
                    apdu.extend_from_slice(body);
                    let a = card.process(&apdu);
                    assert!(a.response.len() >= 2, "{apdu:02X?}");
                    n += 1;
                }
            }
        }
        card.reset();
    }
    // Truncated headers too.
    for len in 0..4 {
        assert!(card.process(&[0x00, 0xCB, 0x3F, 0xFF][..len]).response.len() >= 2);
    }
    assert_eq!(n, 4 * 256 * 6 * 121);
    card.reset();
    let mut piv = PivClient::new(&mut card);
    piv.select().unwrap();
    piv.read_chuid().unwrap();
}
