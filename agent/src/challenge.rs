//! What the agent lets a card sign.
//!
//! The gateway sends the whole message, never a bare digest. Before the
//! card is asked anything, [`digest_to_sign`] checks that the message is a
//! pivgate card-authentication message ([`pivgate_proto::card_message`])
//! naming this agent, this terminal, the card in the reader, the mechanism
//! of the slot it is asked to use, and a time within the allowed clock skew;
//! only then does it hash the message for GENERAL AUTHENTICATE. Anything
//! else is refused and logged by the caller, and the card never signs it:
//! the 9A key that unlocks a console usually logs its holder into Windows
//! and the VPN too, and must not become a signing oracle for whoever holds
//! a gateway certificate.

use std::time::{Duration, SystemTime};

use pivgate_hw::piv::{Algorithm, Slot};
use pivgate_proto::card_message::{self, MessageError, MECHANISM_CARD_AND_PIN, MECHANISM_CARD_ONLY};
use sha2::Digest;

/// What this tap's message must name.
#[derive(Debug, Clone)]
pub struct Expected<'a> {
    /// This agent's name (from its certificate).
    pub agent: &'a str,
    /// This terminal.
    pub terminal: &'a str,
    /// The ids the card in the reader goes by: its CHUID GUID, the id the
    /// gateway bound its last granted challenge to.
    pub cards: &'a [[u8; 16]],
    /// SHA-256 of the certificate read from the card during this tap: a
    /// message naming it is for this card whatever id it gives (a card
    /// without a CHUID, met for the first time).
    pub certificate_sha256: Option<[u8; 32]>,
    /// Now, on this agent's clock.
    pub now: SystemTime,
    /// How far the gateway's time may differ from ours.
    pub max_skew: Duration,
    /// The step-up this tap answers: the message must be a step-up's
    /// naming it (and never a tap's); `None`, a tap's (and never a
    /// step-up's).
    pub step_up: Option<[u8; 16]>,
}

/// Why the agent refused to let the card sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// Not a pivgate card-authentication message at all.
    #[error("{0}")]
    Message(MessageError),
    /// It names another agent.
    #[error("the message names agent {0:?}, not this one")]
    OtherAgent(String),
    /// It names another terminal.
    #[error("the message names terminal {0:?}, not this one")]
    OtherTerminal(String),
    /// It names another card.
    #[error("the message names another card")]
    OtherCard,
    /// Its mechanism is not the one of the slot the card is asked to use.
    #[error("the message's mechanism does not match the requested key slot")]
    WrongMechanism,
    /// Its time is further from ours than the allowed skew.
    #[error("the message's time is {0} s away from this agent's clock")]
    ClockSkew(i64),
    /// The challenge asks for a PIN with the card-authentication key, or
    /// for none with the PIV authentication key.
    #[error("the challenge's PIN requirement does not match its key slot")]
    PinRequirement,
    /// The slot or algorithm is not one a pivgate tap uses.
    #[error("unsupported key slot or algorithm")]
    Unsupported,
    /// A step-up's message names another step-up than the one asked.
    #[error("the message names another step-up")]
    OtherStepUp,
}

/// What the card may sign, once the message checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToSign {
    /// The digest the card signs: SHA-384 for P-384, else SHA-256.
    pub digest: Vec<u8>,
    /// The card id the message names (the gateway's name for this card).
    pub card: [u8; 16],
}

/// Checks `message` against `expected` for a signature by `slot` with
/// `alg`, and returns the digest the card signs.
pub fn digest_to_sign(message: &[u8], slot: Slot, alg: Algorithm, expected: &Expected<'_>) -> Result<ToSign, Refused> {
    let m = match expected.step_up {
        None => card_message::parse(message).map_err(Refused::Message)?,
        Some(id) => {
            let s = card_message::parse_step_up(message).map_err(Refused::Message)?;
            if s.step_up_id != id {
                return Err(Refused::OtherStepUp);
            }
            s.tap
        }
    };
    if m.agent != expected.agent {
        return Err(Refused::OtherAgent(m.agent.chars().take(64).collect()));
    }
    if m.terminal != expected.terminal {
        return Err(Refused::OtherTerminal(m.terminal.chars().take(64).collect()));
    }
    if !expected.cards.contains(&m.card_uuid) && expected.certificate_sha256 != Some(m.certificate_sha256) {
        return Err(Refused::OtherCard);
    }
    let mechanism = match slot {
        Slot::Authentication => MECHANISM_CARD_AND_PIN,
        Slot::CardAuthentication => MECHANISM_CARD_ONLY,
        _ => return Err(Refused::Unsupported),
    };
    if m.mechanism != mechanism {
        return Err(Refused::WrongMechanism);
    }
    let now_ms = match expected.now.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(_) => 0,
    };
    let skew = now_ms.saturating_sub(m.unix_ms);
    if skew.unsigned_abs() > expected.max_skew.as_millis() as u64 {
        return Err(Refused::ClockSkew(skew / 1000));
    }
    let digest = match alg {
        Algorithm::EccP384 => sha2::Sha384::digest(message).to_vec(),
        Algorithm::EccP256 | Algorithm::Rsa2048 => sha2::Sha256::digest(message).to_vec(),
        _ => return Err(Refused::Unsupported),
    };
    Ok(ToSign { digest, card: m.card_uuid })
}

#[cfg(test)]
mod tests {
    use super::*;
    use pivgate_proto::card_message::CardMessage;

    const NOW_MS: i64 = 1_790_000_000_000;

    fn message() -> CardMessage<'static> {
        CardMessage {
            challenge_id: [1; 16],
            nonce: [2; 32],
            gateway_id: [3; 32],
            agent: "pi-1",
            terminal: "dispatch-01",
            card_uuid: [4; 16],
            mechanism: MECHANISM_CARD_AND_PIN,
            certificate_sha256: [5; 32],
            unix_ms: NOW_MS,
        }
    }

    fn expected() -> Expected<'static> {
        Expected {
            agent: "pi-1",
            terminal: "dispatch-01",
            cards: &[[4; 16]],
            certificate_sha256: None,
            now: SystemTime::UNIX_EPOCH + Duration::from_millis(NOW_MS as u64 + 1500),
            max_skew: Duration::from_secs(60),
            step_up: None,
        }
    }

    #[test]
    fn a_step_up_signs_only_the_step_up_asked_and_never_a_tap() {
        use pivgate_proto::card_message::StepUpMessage;
        let s = StepUpMessage { tap: message(), step_up_id: [6; 16], action: "reconfigure intercom 4", params_sha256: [7; 32] };
        let asked = Expected { step_up: Some([6; 16]), ..expected() };
        let bytes = s.encode();
        assert_eq!(digest_to_sign(&bytes, Slot::Authentication, Algorithm::EccP256, &asked).map(|t| t.digest), Ok(sha2::Sha256::digest(&bytes).to_vec()));
        // Another step-up, a tap's message during a step-up, a step-up's
        // message during a tap: refused.
        let other = StepUpMessage { step_up_id: [9; 16], ..s.clone() }.encode();
        assert_eq!(digest_to_sign(&other, Slot::Authentication, Algorithm::EccP256, &asked), Err(Refused::OtherStepUp));
        assert!(matches!(digest_to_sign(&message().encode(), Slot::Authentication, Algorithm::EccP256, &asked), Err(Refused::Message(_))));
        assert!(matches!(digest_to_sign(&bytes, Slot::Authentication, Algorithm::EccP256, &expected()), Err(Refused::Message(_))));
        // The tap's fields are checked as ever.
        let elsewhere = StepUpMessage { tap: CardMessage { terminal: "t2", ..message() }, ..s }.encode();
        assert_eq!(digest_to_sign(&elsewhere, Slot::Authentication, Algorithm::EccP256, &asked), Err(Refused::OtherTerminal("t2".into())));
    }

    #[test]
    fn a_message_for_this_tap_is_hashed_for_the_card() {
        let m = message().encode();
        let d = digest_to_sign(&m, Slot::Authentication, Algorithm::EccP256, &expected()).unwrap();
        assert_eq!(d, ToSign { digest: sha2::Sha256::digest(&m).to_vec(), card: [4; 16] });
        let d = digest_to_sign(&m, Slot::Authentication, Algorithm::EccP384, &expected()).unwrap();
        assert_eq!(d.digest, sha2::Sha384::digest(&m).to_vec());
        let card_only = CardMessage { mechanism: MECHANISM_CARD_ONLY, ..message() }.encode();
        assert!(digest_to_sign(&card_only, Slot::CardAuthentication, Algorithm::EccP256, &expected()).is_ok());
    }

    #[test]
    fn a_card_met_for_the_first_time_is_known_by_the_certificate_read() {
        // An enrolled-key card without a CHUID: the gateway names it by an
        // id the agent has never seen, and the certificate the agent just
        // read from it.
        let read = Expected { cards: &[], certificate_sha256: Some([5; 32]), ..expected() };
        let m = CardMessage { card_uuid: [8; 16], ..message() }.encode();
        assert_eq!(digest_to_sign(&m, Slot::Authentication, Algorithm::EccP256, &read).map(|t| t.card), Ok([8; 16]));
        let other = CardMessage { card_uuid: [8; 16], certificate_sha256: [6; 32], ..message() }.encode();
        assert_eq!(digest_to_sign(&other, Slot::Authentication, Algorithm::EccP256, &read), Err(Refused::OtherCard));
    }

    #[test]
    fn anything_else_is_refused() {
        let e = expected();
        let sign = |m: &[u8], slot| digest_to_sign(m, slot, Algorithm::EccP256, &e);
        // A bare digest (a TLS, SSH or PKINIT transcript hash).
        assert!(matches!(sign(&[0x5A; 32], Slot::Authentication), Err(Refused::Message(MessageError::NotPivgate))));
        assert_eq!(sign(&CardMessage { agent: "pi-2", ..message() }.encode(), Slot::Authentication), Err(Refused::OtherAgent("pi-2".into())));
        assert_eq!(sign(&CardMessage { terminal: "t2", ..message() }.encode(), Slot::Authentication), Err(Refused::OtherTerminal("t2".into())));
        assert_eq!(sign(&CardMessage { card_uuid: [9; 16], ..message() }.encode(), Slot::Authentication), Err(Refused::OtherCard));
        // A card the agent has not met and whose certificate it did not read
        // this tap (no CHUID): nothing the message names is this card's.
        let unknown = Expected { cards: &[], ..expected() };
        assert_eq!(digest_to_sign(&message().encode(), Slot::Authentication, Algorithm::EccP256, &unknown), Err(Refused::OtherCard));
        // A card-only message offered for the PIN key, and the reverse.
        assert_eq!(sign(&CardMessage { mechanism: MECHANISM_CARD_ONLY, ..message() }.encode(), Slot::Authentication), Err(Refused::WrongMechanism));
        assert_eq!(sign(&message().encode(), Slot::CardAuthentication), Err(Refused::WrongMechanism));
        // Too old, and too far ahead.
        assert_eq!(sign(&CardMessage { unix_ms: NOW_MS - 120_000, ..message() }.encode(), Slot::Authentication), Err(Refused::ClockSkew(121)));
        assert_eq!(sign(&CardMessage { unix_ms: NOW_MS + 120_000, ..message() }.encode(), Slot::Authentication), Err(Refused::ClockSkew(-118)));
        // A slot a tap never uses.
        assert_eq!(sign(&message().encode(), Slot::Signature), Err(Refused::Unsupported));
    }
}
