//! The virtual card's administrative commands, in process: management key
//! authentication (3DES and AES, mutual and single), and the rules that
//! PUT DATA, GENERATE, CHANGE REFERENCE DATA and RESET RETRY COUNTER keep.

use pivgate_hw::piv::{Algorithm, PivClient};
use pivgate_hw::tlv;
use pivgate_vcard::{ManagementKey, Profile, ProfileOptions, VirtualCard, DEFAULT_MANAGEMENT_KEY};

fn sw(resp: &[u8]) -> u16 {
    u16::from_be_bytes([resp[resp.len() - 2], resp[resp.len() - 1]])
}

fn apdu(ins: u8, p1: u8, p2: u8, data: &[u8]) -> Vec<u8> {
    let mut a = vec![0, ins, p1, p2, data.len() as u8];
    a.extend_from_slice(data);
    a
}

fn template(items: &[(u32, &[u8])]) -> Vec<u8> {
    let mut inner = Vec::new();
    for (t, v) in items {
        tlv::write(&mut inner, *t, v);
    }
    tlv::encode(0x7C, &inner)
}

/// Mutual authentication as yubico-piv-tool does it; returns the final SW.
fn mutual_auth(card: &mut VirtualCard, key: &ManagementKey) -> u16 {
    let alg = key.algorithm().id();
    let r = card.process(&apdu(0x87, alg, 0x9B, &template(&[(0x80, &[])]))).response;
    assert_eq!(sw(&r), 0x9000);
    let t = tlv::expect_single(&r[..r.len() - 2], 0x7C).unwrap().unwrap();
    let witness = tlv::find(t, 0x80).unwrap().unwrap();
    let plain = key.crypt_block(witness, true).unwrap();
    let challenge = vec![0x42; key.block_len()];
    let r = card.process(&apdu(0x87, alg, 0x9B, &template(&[(0x80, &plain), (0x81, &challenge)]))).response;
    if sw(&r) == 0x9000 {
        let t = tlv::expect_single(&r[..r.len() - 2], 0x7C).unwrap().unwrap();
        let enc = tlv::find(t, 0x82).unwrap().unwrap();
        assert_eq!(key.crypt_block(&challenge, false).unwrap(), enc, "card proved a different key");
    }
    sw(&r)
}

fn put_chuid(card: &mut VirtualCard) -> u16 {
    let mut data = tlv::encode(0x5C, &[0x5F, 0xC1, 0x02]);
    data.extend(tlv::encode(0x53, &tlv::encode(0x34, &[9; 16])));
    sw(&card.process(&apdu(0xDB, 0x3F, 0xFF, &data)).response)
}

#[test]
fn management_key_gates_put_data_and_generate() {
    for (alg, bytes) in [(Algorithm::TripleDes, DEFAULT_MANAGEMENT_KEY.to_vec()), (Algorithm::Aes192, vec![7; 24]), (Algorithm::Aes128, vec![3; 16])] {
        let profile = Profile::generate(&ProfileOptions::default()).unwrap();
        let mut card = profile.card();
        let key = ManagementKey::new(alg, &bytes).unwrap();
        card.contents_mut().management_key = key.clone();
        assert_eq!(put_chuid(&mut card), 0x6982, "{alg}: PUT DATA without the management key");
        let gen = apdu(0x47, 0, 0x9C, &tlv::encode(0xAC, &tlv::encode(0x80, &[0x11])));
        assert_eq!(sw(&card.process(&gen).response), 0x6982, "{alg}: GENERATE without the management key");

        let wrong = ManagementKey::new(alg, &vec![0x55; bytes.len()]).unwrap();
        assert_eq!(mutual_auth(&mut card, &wrong), 0x6982, "{alg}: a wrong key authenticated");
        assert_eq!(put_chuid(&mut card), 0x6982);

        assert_eq!(mutual_auth(&mut card, &key), 0x9000, "{alg}: the right key failed");
        assert_eq!(put_chuid(&mut card), 0x9000);
        let r = card.process(&gen).response;
        assert_eq!(sw(&r), 0x9000);
        assert_eq!(&r[..2], &[0x7F, 0x49]);
        // A reset ends the authenticated state.
        card.reset();
        assert_eq!(put_chuid(&mut card), 0x6982);
    }
}

#[test]
fn single_authentication_with_a_card_challenge() {
    let profile = Profile::generate(&ProfileOptions::default()).unwrap();
    let mut card = profile.card();
    let key = ManagementKey::new(Algorithm::TripleDes, &DEFAULT_MANAGEMENT_KEY).unwrap();
    let r = card.process(&apdu(0x87, 0x03, 0x9B, &template(&[(0x81, &[])]))).response;
    let t = tlv::expect_single(&r[..r.len() - 2], 0x7C).unwrap().unwrap();
    let challenge = tlv::find(t, 0x81).unwrap().unwrap().to_vec();
    // A replayed or wrong answer fails and spends the challenge.
    let bad = card.process(&apdu(0x87, 0x03, 0x9B, &template(&[(0x82, &[0; 8])]))).response;
    assert_eq!(sw(&bad), 0x6982);
    let good = key.crypt_block(&challenge, false).unwrap();
    assert_eq!(sw(&card.process(&apdu(0x87, 0x03, 0x9B, &template(&[(0x82, &good)]))).response), 0x6982, "challenge reused");
    let r = card.process(&apdu(0x87, 0x03, 0x9B, &template(&[(0x81, &[])]))).response;
    let t = tlv::expect_single(&r[..r.len() - 2], 0x7C).unwrap().unwrap();
    let good = key.crypt_block(tlv::find(t, 0x81).unwrap().unwrap(), false).unwrap();
    assert_eq!(sw(&card.process(&apdu(0x87, 0x03, 0x9B, &template(&[(0x82, &good)]))).response), 0x9000);
    assert_eq!(put_chuid(&mut card), 0x9000);
}

#[test]
fn pin_and_puk_rules() {
    let profile = Profile::generate(&ProfileOptions::default()).unwrap();
    let mut card = profile.card();
    let change = |old: &[u8; 8], new: &[u8; 8]| [&old[..], &new[..]].concat();
    // Wrong old PIN costs a try.
    assert_eq!(sw(&card.process(&apdu(0x24, 0, 0x80, &change(b"000000\xFF\xFF", b"111111\xFF\xFF"))).response), 0x63C2);
    // A new PIN that is not 6 to 8 digits is refused without a change.
    assert_eq!(sw(&card.process(&apdu(0x24, 0, 0x80, &change(b"123456\xFF\xFF", b"12a456\xFF\xFF"))).response), 0x6A80);
    assert_eq!(sw(&card.process(&apdu(0x24, 0, 0x80, &change(b"123456\xFF\xFF", b"222222\xFF\xFF"))).response), 0x9000);
    // Wrong PUK counts down and blocks RESET RETRY COUNTER.
    for left in [0x63C2, 0x63C1, 0x63C0] {
        assert_eq!(sw(&card.process(&apdu(0x2C, 0, 0x80, &change(b"00000000", b"333333\xFF\xFF"))).response), left);
    }
    assert_eq!(sw(&card.process(&apdu(0x2C, 0, 0x80, &change(b"12345678", b"333333\xFF\xFF"))).response), 0x6983);
    // VERIFY with the changed PIN still works.
    assert_eq!(sw(&card.process(&apdu(0x20, 0, 0x80, b"222222\xFF\xFF")).response), 0x9000);
    // The Global PIN is not supported.
    assert_eq!(sw(&card.process(&apdu(0x20, 0, 0x00, b"222222\xFF\xFF")).response), 0x6A88);
}

/// The card behind a reader that takes extended APDUs.
struct Extended(VirtualCard);

impl pivgate_hw::Transport for Extended {
    fn transmit(&mut self, command: &[u8]) -> pivgate_hw::Result<Vec<u8>> {
        self.0.transmit(command)
    }
    fn supports_extended(&self) -> bool {
        true
    }
}

#[test]
fn extended_length_where_card_and_reader_take_it() {
    use pivgate_hw::piv::{PivClient, Slot};
    let profile = Profile::generate(&ProfileOptions { algorithm: Algorithm::Rsa2048, ..Default::default() }).unwrap();
    let mut piv = PivClient::new(Extended(profile.card()));
    piv.select().unwrap();
    let before = piv.stats().apdus;
    let cert = piv.read_certificate(Slot::Authentication).unwrap();
    assert!(cert.len() > 256);
    assert_eq!(piv.stats().apdus - before, 1, "an extended GET DATA needs no GET RESPONSE");
    piv.verify_pin(&pivgate_hw::Pin::new(b"123456").unwrap()).unwrap();
    let before = piv.stats().apdus;
    let sig = piv.sign(Slot::Authentication, Algorithm::Rsa2048, &[5; 32]).unwrap();
    assert_eq!(sig.len(), 256);
    assert_eq!(piv.stats().apdus - before, 1, "an extended RSA sign needs no command chaining");
    // The short path chains the same command.
    let mut short = PivClient::new(profile.card());
    short.select().unwrap();
    short.verify_pin(&pivgate_hw::Pin::new(b"123456").unwrap()).unwrap();
    let before = short.stats().apdus;
    short.sign(Slot::Authentication, Algorithm::Rsa2048, &[5; 32]).unwrap();
    assert!(short.stats().apdus - before >= 3, "short RSA sign without chaining");
}

#[test]
fn the_client_selects_cards_that_take_only_the_whole_aid_or_only_its_truncation() {
    use pivgate_vcard::AidMatch;
    let profile = Profile::generate(&ProfileOptions::default()).unwrap();
    for (matching, apdus) in [(AidMatch::Prefix, 1), (AidMatch::TruncatedOnly, 1), (AidMatch::FullOnly, 2)] {
        let mut card = profile.card();
        card.set_aid_match(matching);
        let mut piv = PivClient::new(&mut card);
        piv.select().unwrap_or_else(|e| panic!("{matching:?}: {e}"));
        assert_eq!(piv.read_chuid().unwrap(), profile.chuid, "{matching:?}");
        drop(piv);
        // The CHUID read is one APDU (the card answers it whole).
        assert_eq!(card.apdu_count(), apdus + 1, "{matching:?}: SELECT cost more than it must");
    }
    // And the card itself refuses what it does not match.
    let mut full_only = profile.card();
    full_only.set_aid_match(AidMatch::FullOnly);
    assert_eq!(full_only.process(&[0x00, 0xA4, 0x04, 0x00, 0x09, 0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x00]).response, vec![0x6A, 0x82]);
    let mut truncated_only = profile.card();
    truncated_only.set_aid_match(AidMatch::TruncatedOnly);
    let whole = [0x00, 0xA4, 0x04, 0x00, 0x0B, 0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00, 0x00];
    assert_eq!(truncated_only.process(&whole).response, vec![0x6A, 0x82]);
}

/// GENERATE in 9A with a PIN policy (AA) as yubico-piv-tool --pin-policy
/// sends it; returns the SW.
fn generate_9a(card: &mut VirtualCard, pin_policy: u8) -> u16 {
    let mut ac = tlv::encode(0x80, &[0x11]);
    ac.extend(tlv::encode(0xAA, &[pin_policy]));
    sw(&card.process(&apdu(0x47, 0, 0x9A, &tlv::encode(0xAC, &ac))).response)
}

fn signs_without_pin(card: &mut VirtualCard) -> bool {
    let mut piv = PivClient::new(&mut *card);
    piv.select().unwrap();
    piv.sign(pivgate_hw::piv::Slot::Authentication, Algorithm::EccP256, &[7; 32]).is_ok()
}

#[test]
fn pin_policies_are_kept_per_key() {
    let key = ManagementKey::new(Algorithm::TripleDes, &DEFAULT_MANAGEMENT_KEY).unwrap();
    let mut card = VirtualCard::new(pivgate_vcard::CardContents::blank(1));
    // Never: the 9A key signs for whoever holds the card.
    assert_eq!(mutual_auth(&mut card, &key), 0x9000);
    assert_eq!(generate_9a(&mut card, 1), 0x9000);
    assert!(signs_without_pin(&mut card), "PIN policy never");
    // Once (the default, 0): one VERIFY, then signatures until reset.
    assert_eq!(mutual_auth(&mut card, &key), 0x9000);
    assert_eq!(generate_9a(&mut card, 0), 0x9000);
    assert!(!signs_without_pin(&mut card), "PIN policy once signed without the PIN");
    {
        let mut piv = PivClient::new(&mut card);
        piv.select().unwrap();
        piv.verify_pin(&pivgate_hw::Pin::new(b"123456").unwrap()).unwrap();
        for _ in 0..2 {
            piv.sign(pivgate_hw::piv::Slot::Authentication, Algorithm::EccP256, &[7; 32]).unwrap();
        }
    }
    // Always: a VERIFY before each signature.
    card.reset();
    assert_eq!(mutual_auth(&mut card, &key), 0x9000);
    assert_eq!(generate_9a(&mut card, 3), 0x9000);
    let mut piv = PivClient::new(&mut card);
    piv.select().unwrap();
    piv.verify_pin(&pivgate_hw::Pin::new(b"123456").unwrap()).unwrap();
    piv.sign(pivgate_hw::piv::Slot::Authentication, Algorithm::EccP256, &[7; 32]).unwrap();
    assert!(piv.sign(pivgate_hw::piv::Slot::Authentication, Algorithm::EccP256, &[7; 32]).is_err(), "PIN always signed twice");
    // A policy byte that means nothing is refused.
    let mut card = VirtualCard::new(pivgate_vcard::CardContents::blank(1));
    assert_eq!(mutual_auth(&mut card, &key), 0x9000);
    assert_eq!(generate_9a(&mut card, 9), 0x6A80);
}

#[test]
fn a_generated_key_is_attested_and_one_put_there_is_not() {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let root = pivgate_vcard::AttestationCa::generate("test attestation root").unwrap();
    let key = ManagementKey::new(Algorithm::TripleDes, &DEFAULT_MANAGEMENT_KEY).unwrap();
    // A profile's keys are made outside the card: not attestable.
    let mut card = Profile::generate(&ProfileOptions::default()).unwrap().card();
    card.contents_mut().attestation = Some(root.device(card.contents().serial).unwrap());
    let mut piv = PivClient::new(&mut card);
    piv.select().unwrap();
    assert_eq!(piv.attest(pivgate_hw::piv::Slot::Authentication).unwrap(), None);
    let f9 = piv.attestation_certificate().unwrap().expect("the F9 certificate");
    // Generated with PIN policy once: attested, with its policy and serial.
    assert_eq!(mutual_auth(&mut card, &key), 0x9000);
    assert_eq!(generate_9a(&mut card, 2), 0x9000);
    let mut piv = PivClient::new(&mut card);
    piv.select().unwrap();
    let att = piv.attest(pivgate_hw::piv::Slot::Authentication).unwrap().expect("an attestation");
    let (_, cert) = X509Certificate::from_der(&att).unwrap();
    let (_, issuer) = X509Certificate::from_der(&f9).unwrap();
    cert.verify_signature(Some(issuer.public_key())).expect("signed by the card's attestation key");
    assert_eq!(cert.issuer(), issuer.subject());
    let ext = |oid: &str| cert.extensions().iter().find(|e| e.oid.to_id_string() == oid).map(|e| e.value.to_vec());
    assert_eq!(ext("1.3.6.1.4.1.41482.3.8"), Some(vec![2, 1]), "PIN once, touch never");
    let serial = card.contents().serial;
    let serial_der = ext("1.3.6.1.4.1.41482.3.7").unwrap();
    let (_, attested_serial) = x509_parser::der_parser::der::parse_der_integer(&serial_der).unwrap();
    assert_eq!(attested_serial.as_u32().unwrap(), serial);
    let generated = card.contents().keys[&pivgate_hw::piv::Slot::Authentication].spki_der().unwrap();
    assert_eq!(cert.public_key().raw, generated.as_slice());
    // A card that cannot attest says so.
    let mut plain = VirtualCard::new(pivgate_vcard::CardContents::blank(2));
    let mut piv = PivClient::new(&mut plain);
    piv.select().unwrap();
    assert_eq!(piv.attestation_certificate().unwrap(), None);
}
