//! The card path through the real PC/SC stack: a virtual PIV card in a vpcd
//! reader behind the real pcscd, read and used by the PIV client the agent
//! uses, watched by the reader monitor the agent uses.

use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use anyhow::Result;
use pivgate_hw::pcsc::{Monitor, ReaderEvent};
use pivgate_hw::piv::{Algorithm, PinStatus, PivClient, Slot};
use pivgate_hw::{Error, Pin};
use pivgate_tests::{connect_card, reader, verify_signature, wait_event, Reader};
use pivgate_vcard::{vpcd, Fault, Profile, ProfileOptions, ATR};
use sha2::Digest;

const T: Duration = Duration::from_secs(10);

fn digest_for(alg: Algorithm, msg: &[u8]) -> Vec<u8> {
    match alg {
        Algorithm::EccP384 => sha2::Sha384::digest(msg).to_vec(),
        _ => sha2::Sha256::digest(msg).to_vec(),
    }
}

/// Inserts `profile`'s card, waits for the monitor to see it, and reads its
/// CHUID through pcscd.
fn the_next_card_works(r: &Reader, rx: &Receiver<ReaderEvent>, profile: &Profile) -> Result<()> {
    let inserted = vpcd::insert(profile.card(), r.addr)?;
    wait_event(rx, &r.name, T, |e| matches!(e, ReaderEvent::CardInserted { .. }))?;
    let mut card = connect_card(&r.name)?;
    {
        let mut piv = PivClient::new(card.transaction()?);
        piv.select()?;
        assert_eq!(piv.read_chuid()?, profile.chuid);
    }
    card.disconnect(false)?;
    inserted.remove();
    Ok(())
}

#[test]
fn monitor_sees_a_badge_arrive_and_leave() -> Result<()> {
    let r = reader()?;
    let (tx, rx) = channel();
    let _m = Monitor::spawn(move |ev| {
        let _ = tx.send(ev);
    })?;
    wait_event(&rx, &r.name, T, |e| matches!(e, ReaderEvent::ReaderAdded { .. }))?;
    let profile = Profile::generate(&ProfileOptions::default())?;
    let inserted = vpcd::insert(profile.card(), r.addr)?;
    let ev = wait_event(&rx, &r.name, T, |e| matches!(e, ReaderEvent::CardInserted { .. }))?;
    assert_eq!(ev, ReaderEvent::CardInserted { reader: r.name.clone(), atr: ATR.to_vec() });
    inserted.remove();
    wait_event(&rx, &r.name, T, |e| matches!(e, ReaderEvent::CardRemoved { .. }))?;
    // And again: the monitor keeps watching after a removal.
    let inserted = vpcd::insert(profile.card(), r.addr)?;
    wait_event(&rx, &r.name, T, |e| matches!(e, ReaderEvent::CardInserted { .. }))?;
    inserted.remove();
    wait_event(&rx, &r.name, T, |e| matches!(e, ReaderEvent::CardRemoved { .. }))?;
    Ok(())
}

/// Everything the agent does with a card, for one algorithm.
fn full_authentication(alg: Algorithm, compress: bool) -> Result<()> {
    let r = reader()?;
    let opts = ProfileOptions { algorithm: alg, compress_certificates: compress, ..Default::default() };
    let profile = Profile::generate(&opts)?;
    let inserted = vpcd::insert(profile.card(), r.addr)?;
    let mut card = connect_card(&r.name)?;
    {
        let tx = card.transaction()?;
        let mut piv = PivClient::new(tx);
        let props = piv.select()?;
        assert!(props.algorithms.contains(&alg));
        assert_eq!(piv.read_chuid()?, profile.chuid);

        let before = piv.stats().apdus;
        let cert_9a = piv.read_certificate(Slot::Authentication)?;
        assert_eq!(cert_9a, profile.certificates[&Slot::Authentication]);
        if !compress {
            assert!(cert_9a.len() > 256, "the certificate must need response chaining");
            assert!(piv.stats().apdus - before >= 2, "read without GET RESPONSE chaining");
        }
        let cert_9e = piv.read_certificate(Slot::CardAuthentication)?;
        assert_eq!(cert_9e, profile.certificates[&Slot::CardAuthentication]);

        let digest = digest_for(alg, b"challenge from the gateway");
        assert_eq!(piv.pin_status()?, PinStatus::TriesLeft(3));
        // 9A refuses before the PIN.
        assert!(matches!(piv.sign(Slot::Authentication, alg, &digest), Err(Error::SecurityStatusNotSatisfied { .. })));
        // 9E needs no PIN.
        let sig_9e = piv.sign(Slot::CardAuthentication, alg, &digest)?;
        verify_signature(&cert_9e, &digest, &sig_9e)?;
        assert!(verify_signature(&cert_9a, &digest, &sig_9e).is_err(), "9E signature verified with the 9A key");

        assert!(matches!(piv.verify_pin(&Pin::new(b"654321")?), Err(Error::WrongPin { tries: 2 })));
        piv.verify_pin(&Pin::new(b"123456")?)?;
        assert_eq!(piv.pin_status()?, PinStatus::Verified);
        let sig_9a = piv.sign(Slot::Authentication, alg, &digest)?;
        verify_signature(&cert_9a, &digest, &sig_9a)?;
        let other = digest_for(alg, b"another challenge");
        assert!(verify_signature(&cert_9a, &other, &sig_9a).is_err(), "signature verified over another digest");

        // After the tap the PIN state is reset: the next person gets nothing.
        assert!(piv.reset_pin_state()?);
        assert!(matches!(piv.sign(Slot::Authentication, alg, &digest), Err(Error::SecurityStatusNotSatisfied { .. })));
        assert_eq!(piv.pin_status()?, PinStatus::TriesLeft(3));
    }
    card.disconnect(false)?;
    inserted.remove();
    Ok(())
}

#[test]
fn badge_with_p256_keys_authenticates_through_pcscd() -> Result<()> {
    full_authentication(Algorithm::EccP256, false)
}

#[test]
fn badge_with_p384_keys_and_compressed_certificates_authenticates_through_pcscd() -> Result<()> {
    full_authentication(Algorithm::EccP384, true)
}

#[test]
fn badge_with_rsa2048_keys_authenticates_through_pcscd() -> Result<()> {
    full_authentication(Algorithm::Rsa2048, false)
}

#[test]
fn wrong_pins_count_down_to_blocked_and_a_blocked_card_gets_no_verify() -> Result<()> {
    let r = reader()?;
    let profile = Profile::generate(&ProfileOptions::default())?;
    let inserted = vpcd::insert(profile.card(), r.addr)?;
    let mut card = connect_card(&r.name)?;
    {
        let mut piv = PivClient::new(card.transaction()?);
        piv.select()?;
        let wrong = Pin::new(b"000000")?;
        assert!(matches!(piv.verify_pin(&wrong), Err(Error::WrongPin { tries: 2 })));
        assert!(matches!(piv.verify_pin(&wrong), Err(Error::WrongPin { tries: 1 })));
        assert!(matches!(piv.verify_pin(&wrong), Err(Error::PinBlocked)));
        let sent = piv.stats().apdus;
        assert!(matches!(piv.verify_pin(&Pin::new(b"123456")?), Err(Error::PinBlocked)));
        assert_eq!(piv.stats().apdus, sent, "a VERIFY reached a blocked card");
        assert_eq!(piv.pin_status()?, PinStatus::Blocked);
    }
    card.disconnect(false)?;
    let vcard = inserted.remove();
    assert_eq!(vcard.pin_tries(), 0);
    Ok(())
}

#[test]
fn a_card_pulled_mid_exchange_gives_an_error_and_the_next_card_works() -> Result<()> {
    let r = reader()?;
    let (tx, rx) = channel();
    let _m = Monitor::spawn(move |ev| {
        let _ = tx.send(ev);
    })?;
    let profile = Profile::generate(&ProfileOptions::default())?;
    let mut vcard = profile.card();
    // Answer SELECT and one GET DATA part, then leave during the chain.
    vcard.add_fault(Fault::DropAt(vcard.apdu_count() + 3));
    let inserted = vpcd::insert(vcard, r.addr)?;
    wait_event(&rx, &r.name, T, |e| matches!(e, ReaderEvent::CardInserted { .. }))?;
    let mut card = connect_card(&r.name)?;
    let result = (|| -> pivgate_hw::Result<Vec<u8>> {
        let mut piv = PivClient::new(card.transaction()?);
        piv.select()?;
        piv.read_certificate(Slot::Authentication)
    })();
    let err = result.expect_err("reading from a card that left must fail");
    assert!(matches!(err, Error::CardRemoved | Error::ReaderUnavailable | Error::Pcsc(_)), "unexpected error {err:?}");
    wait_event(&rx, &r.name, T, |e| matches!(e, ReaderEvent::CardRemoved { .. }))?;
    let _ = card.disconnect(false);
    let _ = inserted.remove();

    the_next_card_works(&r, &rx, &profile)
}

#[test]
fn pcscd_restarting_locks_out_the_old_card_and_the_next_card_works() -> Result<()> {
    let r = reader()?;
    let (tx, rx) = channel();
    let _m = Monitor::spawn(move |ev| {
        let _ = tx.send(ev);
    })?;
    let profile = Profile::generate(&ProfileOptions::default())?;
    let inserted = vpcd::insert(profile.card(), r.addr)?;
    wait_event(&rx, &r.name, T, |e| matches!(e, ReaderEvent::CardInserted { .. }))?;

    pivgate_tests::restart_pcscd(&r)?;
    // The card is reported gone (a restarted pcscd resets cards), then the
    // service, then the service and the reader come back.
    wait_event(&rx, &r.name, T, |e| matches!(e, ReaderEvent::CardRemoved { .. }))?;
    wait_event(&rx, &r.name, T, |e| matches!(e, ReaderEvent::ServiceLost))?;
    wait_event(&rx, &r.name, T, |e| matches!(e, ReaderEvent::ServiceRestored))?;
    wait_event(&rx, &r.name, T, |e| matches!(e, ReaderEvent::ReaderAdded { .. }))?;
    assert!(!inserted.is_inserted(), "vpcd kept the old connection across the restart");
    inserted.remove();

    the_next_card_works(&r, &rx, &profile)
}

#[test]
fn the_vpcd_reader_has_no_pin_pad() -> Result<()> {
    let r = reader()?;
    let profile = Profile::generate(&ProfileOptions::default())?;
    let inserted = vpcd::insert(profile.card(), r.addr)?;
    let card = connect_card(&r.name)?;
    let features = pivgate_hw::pcsc::pinpad::features(&card)?;
    assert!(!features.has_pin_pad());
    assert!(matches!(pivgate_hw::pcsc::pinpad::verify_pin_direct(&card, &features, 30), Err(Error::NoPinPad)));
    card.disconnect(false)?;
    inserted.remove();
    Ok(())
}

/// Compatibility: a card whose PIV applet answers only the whole 11-byte
/// AID, and one that answers only the 9-byte truncation, are selected,
/// read and signed with through pcscd, as a card taking any prefix is.
#[test]
fn cards_that_take_only_the_whole_aid_or_only_its_truncation_sign_through_pcscd() -> Result<()> {
    use pivgate_vcard::AidMatch;
    let r = reader()?;
    let profile = Profile::generate(&ProfileOptions::default())?;
    for matching in [AidMatch::FullOnly, AidMatch::TruncatedOnly] {
        let mut virtual_card = profile.card();
        virtual_card.set_aid_match(matching);
        let inserted = vpcd::insert(virtual_card, r.addr)?;
        let mut card = connect_card(&r.name)?;
        {
            let mut piv = PivClient::new(card.transaction()?);
            piv.select()?;
            assert_eq!(piv.read_chuid()?, profile.chuid, "{matching:?}");
            piv.verify_pin(&Pin::new(b"123456")?)?;
            let digest = digest_for(Algorithm::EccP256, b"challenge from the gateway");
            let sig = piv.sign(Slot::Authentication, Algorithm::EccP256, &digest)?;
            verify_signature(&profile.certificates[&Slot::Authentication], &digest, &sig)?;
            piv.reset_pin_state()?;
        }
        card.disconnect(false)?;
        let seen = inserted.remove();
        assert_eq!(seen.commands_seen(0xA4), if matching == AidMatch::FullOnly { 2 } else { 1 }, "{matching:?}");
        // Gone from pcscd before the next card comes.
        pivgate_hw::pcsc::wait_for_card(&pivgate_hw::pcsc::establish()?, &r.name, false, T)?;
    }
    Ok(())
}

/// Compatibility: extended length is used only when both ends say so.
/// A card whose ATR announces it, in a reader that does not (vpcd answers
/// no SCARD_ATTR_MAXINPUT, like many readers), gets an RSA-2048
/// signature's 266-byte command as two chained short APDUs, as a card
/// without the announcement does, and signs. (The extended path itself is
/// tested in process: `extended_length_where_card_and_reader_take_it`.)
#[test]
fn rsa_signatures_are_chained_unless_card_and_reader_both_take_extended_length() -> Result<()> {
    let r = reader()?;
    let profile = Profile::generate(&ProfileOptions { algorithm: Algorithm::Rsa2048, ..Default::default() })?;
    for extended in [false, true] {
        let mut virtual_card = profile.card();
        virtual_card.set_extended_length(extended);
        let inserted = vpcd::insert(virtual_card, r.addr)?;
        let mut card = connect_card(&r.name)?;
        let digest = digest_for(Algorithm::Rsa2048, b"challenge from the gateway");
        {
            let tx = card.transaction()?;
            assert!(!pivgate_hw::Transport::supports_extended(&tx), "vpcd now announces extended length: test that path here");
            let mut piv = PivClient::new(tx);
            piv.select()?;
            let sig = piv.sign(Slot::CardAuthentication, Algorithm::Rsa2048, &digest)?;
            verify_signature(&profile.certificates[&Slot::CardAuthentication], &digest, &sig)?;
        }
        card.disconnect(false)?;
        let seen = inserted.remove();
        assert_eq!(seen.commands_seen(0x87), 2, "extended length announced by the card: {extended}");
        pivgate_hw::pcsc::wait_for_card(&pivgate_hw::pcsc::establish()?, &r.name, false, T)?;
    }
    Ok(())
}
