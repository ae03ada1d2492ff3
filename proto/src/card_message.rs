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
//! An administrator's badge signs another message, an
//! [`ApprovalMessage`] under its own prefix [`APPROVAL_DOMAIN`]: neither
//! kind ever parses as the other, so no agent can be made to sign an
//! approval and no approver's tool a badge tap.
//!
//! A step-up (a fresh proof before a risky action) signs a
//! [`StepUpMessage`] under [`STEP_UP_DOMAIN`]: a tap's fields and the
//! action's words and parameter digest.
//!
//! This module knows no protobuf and no cryptography: it is the one
//! definition of the bytes, shared by the gateway (which encodes and
//! verifies), the agent and `pivgatectl` (which check before they sign).

/// The domain prefix every pivgate card-authentication message starts with.
pub const DOMAIN: &[u8] = b"pivgate.v1 card authentication\0";

/// The domain prefix of an approval an administrator's badge signs.
pub const APPROVAL_DOMAIN: &[u8] = b"pivgate.v1 approval\0";

/// The domain prefix of a step-up: a fresh proof by the operator at an
/// unlocked terminal before a risky action, naming the action.
pub const STEP_UP_DOMAIN: &[u8] = b"pivgate.v1 step-up\0";

/// The longest action text a step-up names, bytes.
pub const ACTION_MAX: usize = 200;

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

/// `domain`, then each field with its 4-byte big-endian length.
fn encode_fields(domain: &[u8], fields: &[&[u8]]) -> Vec<u8> {
    let mut m = domain.to_vec();
    for f in fields {
        m.extend_from_slice(&(f.len() as u32).to_be_bytes());
        m.extend_from_slice(f);
    }
    m
}

/// Reads length-prefixed fields after a domain prefix.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn after(domain: &[u8], bytes: &'a [u8]) -> Result<Fields<'a>, MessageError> {
        if bytes.len() > MAX_LEN {
            return Err(MessageError::TooLong);
        }
        bytes.strip_prefix(domain).map(Fields).ok_or(MessageError::NotPivgate)
    }

    fn next(&mut self) -> Result<&'a [u8], MessageError> {
        let (len, tail) = self.0.split_first_chunk::<4>().ok_or(MessageError::Malformed)?;
        let len = u32::from_be_bytes(*len) as usize;
        if len > tail.len() {
            return Err(MessageError::Malformed);
        }
        let (f, tail) = tail.split_at(len);
        self.0 = tail;
        Ok(f)
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], MessageError> {
        fixed(self.next()?)
    }

    fn text(&mut self) -> Result<&'a str, MessageError> {
        std::str::from_utf8(self.next()?).map_err(|_| MessageError::Malformed)
    }

    fn end(self) -> Result<(), MessageError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(MessageError::Malformed)
        }
    }
}

impl CardMessage<'_> {
    /// The encoding described in the module documentation.
    pub fn encode(&self) -> Vec<u8> {
        let unix = self.unix_ms.to_be_bytes();
        encode_fields(DOMAIN, &self.fields(&unix))
    }

    fn fields<'s>(&'s self, unix: &'s [u8; 8]) -> [&'s [u8]; 9] {
        [
            &self.challenge_id,
            &self.nonce,
            &self.gateway_id,
            self.agent.as_bytes(),
            self.terminal.as_bytes(),
            &self.card_uuid,
            std::slice::from_ref(&self.mechanism),
            &self.certificate_sha256,
            unix,
        ]
    }
}

fn read_tap<'a>(f: &mut Fields<'a>) -> Result<CardMessage<'a>, MessageError> {
    Ok(CardMessage {
        challenge_id: f.fixed()?,
        nonce: f.fixed()?,
        gateway_id: f.fixed()?,
        agent: f.text()?,
        terminal: f.text()?,
        card_uuid: f.fixed()?,
        mechanism: match f.next()? {
            [m @ (MECHANISM_CARD_AND_PIN | MECHANISM_CARD_ONLY)] => *m,
            _ => return Err(MessageError::Malformed),
        },
        certificate_sha256: f.fixed()?,
        unix_ms: i64::from_be_bytes(f.fixed()?),
    })
}

/// Parses a message, borrowing its text fields.
pub fn parse(bytes: &[u8]) -> Result<CardMessage<'_>, MessageError> {
    let mut f = Fields::after(DOMAIN, bytes)?;
    let m = read_tap(&mut f)?;
    f.end()?;
    Ok(m)
}

/// What the operator's card signs for a step-up: the prefix
/// [`STEP_UP_DOMAIN`], the nine fields of a tap ([`CardMessage`], its
/// mechanism always card and PIN), then the step-up id (16 bytes), the
/// action in words (UTF-8, at most [`ACTION_MAX`] bytes) and the SHA-256 of
/// the action's parameters as the application computed them (32).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepUpMessage<'a> {
    /// The tap's fields.
    pub tap: CardMessage<'a>,
    /// The step-up asked.
    pub step_up_id: [u8; 16],
    /// The action, as the application named it.
    pub action: &'a str,
    /// SHA-256 of the action's parameters.
    pub params_sha256: [u8; 32],
}

impl StepUpMessage<'_> {
    /// The encoding described above.
    pub fn encode(&self) -> Vec<u8> {
        let unix = self.tap.unix_ms.to_be_bytes();
        let mut fields = self.tap.fields(&unix).to_vec();
        fields.extend([self.step_up_id.as_slice(), self.action.as_bytes(), self.params_sha256.as_slice()]);
        encode_fields(STEP_UP_DOMAIN, &fields)
    }
}

/// Parses a step-up message.
pub fn parse_step_up(bytes: &[u8]) -> Result<StepUpMessage<'_>, MessageError> {
    let mut f = Fields::after(STEP_UP_DOMAIN, bytes)?;
    let tap = read_tap(&mut f)?;
    let m = StepUpMessage { tap, step_up_id: f.fixed()?, action: f.text()?, params_sha256: f.fixed()? };
    f.end()?;
    if m.tap.mechanism != MECHANISM_CARD_AND_PIN || m.action.len() > ACTION_MAX {
        return Err(MessageError::Malformed);
    }
    Ok(m)
}

/// What an administrator's badge signs to approve a request: the prefix
/// [`APPROVAL_DOMAIN`] and eight length-prefixed fields, in this order:
/// challenge id (16 bytes), nonce (32), gateway id (32), approver (their
/// administrator certificate's name, UTF-8), request id (16), SHA-256 of
/// the request as stored (32), what is approved in words (UTF-8, shown to
/// the approver before the PIN), and the gateway's time (8-byte big-endian
/// signed Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalMessage<'a> {
    /// The challenge identifier.
    pub challenge_id: [u8; 16],
    /// The gateway's random nonce.
    pub nonce: [u8; 32],
    /// SHA-256 of the gateway's server certificate.
    pub gateway_id: [u8; 32],
    /// The approving administrator.
    pub approver: &'a str,
    /// The request approved.
    pub request_id: [u8; 16],
    /// SHA-256 of the request as the gateway holds it.
    pub request_sha256: [u8; 32],
    /// What is approved, in words.
    pub summary: &'a str,
    /// The gateway's time, Unix milliseconds.
    pub unix_ms: i64,
}

impl ApprovalMessage<'_> {
    /// The encoding described above.
    pub fn encode(&self) -> Vec<u8> {
        let unix = self.unix_ms.to_be_bytes();
        encode_fields(
            APPROVAL_DOMAIN,
            &[
                &self.challenge_id,
                &self.nonce,
                &self.gateway_id,
                self.approver.as_bytes(),
                &self.request_id,
                &self.request_sha256,
                self.summary.as_bytes(),
                &unix,
            ],
        )
    }
}

/// Parses an approval message.
pub fn parse_approval(bytes: &[u8]) -> Result<ApprovalMessage<'_>, MessageError> {
    let mut f = Fields::after(APPROVAL_DOMAIN, bytes)?;
    let m = ApprovalMessage {
        challenge_id: f.fixed()?,
        nonce: f.fixed()?,
        gateway_id: f.fixed()?,
        approver: f.text()?,
        request_id: f.fixed()?,
        request_sha256: f.fixed()?,
        summary: f.text()?,
        unix_ms: i64::from_be_bytes(f.fixed()?),
    };
    f.end()?;
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
    fn an_approval_is_never_a_tap_and_a_tap_never_an_approval() {
        let a = ApprovalMessage {
            challenge_id: [1; 16],
            nonce: [2; 32],
            gateway_id: [3; 32],
            approver: "admin-b",
            request_id: [4; 16],
            request_sha256: [5; 32],
            summary: "approve card for operator op-1",
            unix_ms: 1_790_000_000_000,
        };
        let bytes = a.encode();
        assert_eq!(parse_approval(&bytes).unwrap(), a);
        assert_eq!(parse(&bytes).unwrap_err(), MessageError::NotPivgate);
        assert_eq!(parse_approval(&sample().encode()).unwrap_err(), MessageError::NotPivgate);
        for n in APPROVAL_DOMAIN.len()..bytes.len() {
            assert_eq!(parse_approval(&bytes[..n]).unwrap_err(), MessageError::Malformed, "cut at {n}");
        }
    }

    #[test]
    fn a_step_up_is_never_a_tap_nor_an_approval() {
        let m = StepUpMessage { tap: sample(), step_up_id: [7; 16], action: "change intercom 4 configuration", params_sha256: [8; 32] };
        let bytes = m.encode();
        assert_eq!(parse_step_up(&bytes).unwrap(), m);
        assert_eq!(parse(&bytes).unwrap_err(), MessageError::NotPivgate);
        assert_eq!(parse_approval(&bytes).unwrap_err(), MessageError::NotPivgate);
        assert_eq!(parse_step_up(&sample().encode()).unwrap_err(), MessageError::NotPivgate);
        for n in STEP_UP_DOMAIN.len()..bytes.len() {
            assert_eq!(parse_step_up(&bytes[..n]).unwrap_err(), MessageError::Malformed, "cut at {n}");
        }
        // Always the PIN key; an action of bounded length.
        let card_only = StepUpMessage { tap: CardMessage { mechanism: MECHANISM_CARD_ONLY, ..sample() }, ..m.clone() };
        assert_eq!(parse_step_up(&card_only.encode()).unwrap_err(), MessageError::Malformed);
        let long = "x".repeat(ACTION_MAX + 1);
        assert_eq!(parse_step_up(&StepUpMessage { action: &long, ..m }.encode()).unwrap_err(), MessageError::Malformed);
    }

    #[test]
    fn field_boundaries_cannot_be_shifted() {
        let a = CardMessage { agent: "pi-1d", terminal: "ispatch", ..sample() };
        let b = CardMessage { agent: "pi-1", terminal: "dispatch", ..sample() };
        assert_ne!(a.encode(), b.encode());
    }
}
