//! The message a card signs for pivgate, and nothing else.
//!
//! The gateway composes it and sends it whole (`pivgate.v1.Challenge.message`);
//! the agent parses it with [`parse`], checks that it names this agent,
//! this terminal, this card and a current time, hashes it itself and only
//! then lets the card sign. A card's 9A key usually also logs its holder
//! into Windows and the VPN: an agent that signed whatever digest it was
//! handed would be a signing oracle for TLS, SSH or PKINIT transcripts for
//! anyone holding a gateway certificate.
//!
//! The encoding is the domain prefix [`DOMAIN`] followed by exactly nine
//! fields, each a 4-byte big-endian length and its bytes, in this order:
//! challenge id (16 bytes), nonce (32), gateway id (SHA-256 of the gateway's
//! server certificate, 32), agent name (UTF-8), terminal id (UTF-8), card
//! UUID (16), mechanism (1 byte: 1 card and PIN, 2 card only), SHA-256 of
//! the card certificate (32), and the gateway's time (8-byte big-endian
//! signed Unix milliseconds). Length prefixes make the encoding injective;
//! nothing may follow the last field.
//!
//! This module knows no protobuf and no cryptography: it is the one
//! definition of the bytes, shared by the gateway (which encodes and
//! verifies) and the agent (which checks before it signs).

/// The domain prefix every pivgate card-authentication message starts with.
pub const DOMAIN: &[u8] = b"pivgate.v1 card authentication\0";

/// The longest message either side accepts.
pub const MAX_LEN: usize = 1024;

/// Mechanism byte: card and PIN (slot 9A).
pub const MECHANISM_CARD_AND_PIN: u8 = 1;
/// Mechanism byte: card only (slot 9E).
pub const MECHANISM_CARD_ONLY: u8 = 2;

/// The fields of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardMessage<'a> {
    /// The challenge identifier.
    pub challenge_id: [u8; 16],
    /// The gateway's random nonce.
    pub nonce: [u8; 32],
    /// SHA-256 of the gateway's server certificate.
    pub gateway_id: [u8; 32],
    /// The agent the challenge was issued to (its certificate name).
    pub agent: &'a str,
    /// The terminal.
    pub terminal: &'a str,
    /// The card UUID.
    pub card_uuid: [u8; 16],
    /// [`MECHANISM_CARD_AND_PIN`] or [`MECHANISM_CARD_ONLY`].
    pub mechanism: u8,
    /// SHA-256 of the certificate whose key must sign.
    pub certificate_sha256: [u8; 32],
    /// The gateway's time, Unix milliseconds.
    pub unix_ms: i64,
}

/// Why bytes are not a pivgate card-authentication message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageError {
    /// Longer than [`MAX_LEN`].
    TooLong,
    /// It does not start with [`DOMAIN`].
    NotPivgate,
    /// A field is cut short, has the wrong length or is not UTF-8, or bytes
    /// follow the last field.
    Malformed,
}

impl std::fmt::Display for MessageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MessageError::TooLong => "longer than any pivgate card-authentication message",
            MessageError::NotPivgate => "not a pivgate card-authentication message (no domain prefix)",
            MessageError::Malformed => "a malformed pivgate card-authentication message",
        })
    }
}

impl std::error::Error for MessageError {}

impl CardMessage<'_> {
    /// The encoding described in the module documentation.
    pub fn encode(&self) -> Vec<u8> {
        let mut m = DOMAIN.to_vec();
        let unix = self.unix_ms.to_be_bytes();
        let fields: [&[u8]; 9] = [
            &self.challenge_id,
            &self.nonce,
            &self.gateway_id,
            self.agent.as_bytes(),
            self.terminal.as_bytes(),
            &self.card_uuid,
            std::slice::from_ref(&self.mechanism),
            &self.certificate_sha256,
            &unix,
        ];
        for f in fields {
            m.extend_from_slice(&(f.len() as u32).to_be_bytes());
            m.extend_from_slice(f);
        }
        m
    }
}

/// Parses a message, borrowing its text fields.
pub fn parse(bytes: &[u8]) -> Result<CardMessage<'_>, MessageError> {
    if bytes.len() > MAX_LEN {
        return Err(MessageError::TooLong);
    }
    let mut rest = bytes.strip_prefix(DOMAIN).ok_or(MessageError::NotPivgate)?;
    let mut field = || -> Result<&[u8], MessageError> {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or(MessageError::Malformed)?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > tail.len() {
            return Err(MessageError::Malformed);
        }
        let (f, tail) = tail.split_at(len);
        rest = tail;
        Ok(f)
    };
    let text = |f| std::str::from_utf8(f).map_err(|_| MessageError::Malformed);
    let m = CardMessage {
        challenge_id: fixed(field()?)?,
        nonce: fixed(field()?)?,
        gateway_id: fixed(field()?)?,
        agent: text(field()?)?,
        terminal: text(field()?)?,
        card_uuid: fixed(field()?)?,
        mechanism: match field()? {
            [m @ (MECHANISM_CARD_AND_PIN | MECHANISM_CARD_ONLY)] => *m,
            _ => return Err(MessageError::Malformed),
        },
        certificate_sha256: fixed(field()?)?,
        unix_ms: i64::from_be_bytes(fixed(field()?)?),
    };
    if !rest.is_empty() {
        return Err(MessageError::Malformed);
    }
    Ok(m)
}

fn fixed<const N: usize>(f: &[u8]) -> Result<[u8; N], MessageError> {
    f.try_into().map_err(|_| MessageError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CardMessage<'static> {
        CardMessage {
            challenge_id: [1; 16],
            nonce: [2; 32],
            gateway_id: [3; 32],
            agent: "pi-1",
            terminal: "dispatch-01",
            card_uuid: [4; 16],
            mechanism: MECHANISM_CARD_AND_PIN,
            certificate_sha256: [5; 32],
            unix_ms: 1_790_000_000_000,
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(parse(&m.encode()).unwrap(), m);
    }

    #[test]
    fn foreign_and_broken_messages_are_refused() {
        // A bare digest, as a TLS or SSH transcript hash would be.
        assert_eq!(parse(&[0xAB; 32]).unwrap_err(), MessageError::NotPivgate);
        assert_eq!(parse(b"").unwrap_err(), MessageError::NotPivgate);
        let good = sample().encode();
        // Anything after the last field.
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(parse(&longer).unwrap_err(), MessageError::Malformed);
        // Every truncation.
        for n in DOMAIN.len()..good.len() {
            assert_eq!(parse(&good[..n]).unwrap_err(), MessageError::Malformed, "cut at {n}");
        }
        // An unknown mechanism.
        let mut m = sample();
        m.mechanism = 9;
        assert_eq!(parse(&m.encode()).unwrap_err(), MessageError::Malformed);
        // A length that claims more than there is.
        let mut lying = DOMAIN.to_vec();
        lying.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse(&lying).unwrap_err(), MessageError::Malformed);
        assert_eq!(parse(&vec![0; MAX_LEN + 1]).unwrap_err(), MessageError::TooLong);
    }

    #[test]
    fn field_boundaries_cannot_be_shifted() {
        let a = CardMessage { agent: "pi-1d", terminal: "ispatch", ..sample() };
        let b = CardMessage { agent: "pi-1", terminal: "dispatch", ..sample() };
        assert_ne!(a.encode(), b.encode());
    }
}
