//! Challenges: at least 128 random bits from the OS CSPRNG, single use,
//! expiring, bound to the agent's TLS identity, the terminal, the card, the
//! mechanism and the certificate, and to this gateway.
//!
//! Single use is keyed on the challenge identifier, never on signature
//! bytes (ECDSA signatures are malleable). A spent identifier is remembered
//! until well after it would have expired, so a replay is told apart from
//! an identifier that never existed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pivgate_proto::card_message::{ApprovalMessage, CardMessage, StepUpMessage};
use sha2::{Digest, Sha256};

use crate::model::{KeyAlgorithm, Mechanism};
use crate::verify::Deny;

/// What a proof is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purpose {
    /// A badge tap that unlocks the terminal.
    Unlock,
    /// A card tapped into the terminal's enrolment window: the proof
    /// enrols it.
    Enrol(crate::model::EnrolmentWindow),
    /// An administrator's badge approving a request (as it stood when
    /// the challenge was issued).
    Approve {
        /// The request.
        request: [u8; 16],
        /// SHA-256 of the request as stored then.
        request_sha256: [u8; 32],
    },
    /// The operator at an unlocked terminal proving again before an
    /// action (see `step_up.rs`).
    StepUp {
        /// The step-up.
        id: [u8; 16],
        /// The action, in words.
        action: String,
        /// SHA-256 of its parameters.
        params_sha256: [u8; 32],
    },
}

/// The terminal field of an approval's challenge: approvals happen at no
/// terminal, and no terminal can be named this (terminal ids are checked
/// at the API).
pub const APPROVAL: &str = "\0approval";

/// A challenge waiting for its signature.
#[derive(Debug, Clone)]
pub struct Pending {
    /// The agent it was issued to (certificate name).
    pub agent: String,
    /// The terminal.
    pub terminal: String,
    /// The card.
    pub card_uuid: [u8; 16],
    /// The mechanism (and so the slot).
    pub mechanism: Mechanism,
    /// The key algorithm.
    pub algorithm: KeyAlgorithm,
    /// The certificate whose key must have signed (DER).
    pub certificate: Vec<u8>,
    /// The encoded message whose hash the card signs.
    pub message: Vec<u8>,
    /// The agent supplied the certificate (kept only if the proof succeeds).
    pub supplied: bool,
    /// What the proof is for.
    pub purpose: Purpose,
    /// Expiry.
    pub expires: Instant,
}

struct Inner {
    pending: HashMap<[u8; 16], Pending>,
    spent: HashMap<[u8; 16], Instant>,
    issued: u64,
}

/// Most outstanding challenges per agent.
pub const PER_AGENT: usize = 64;

/// Outstanding and spent challenges.
pub struct Challenges {
    inner: Mutex<Inner>,
    ttl: Duration,
    max_pending: usize,
    gateway_id: [u8; 32],
}

/// What [`Challenges::issue`] hands out.
pub struct Issued {
    /// Identifier.
    pub id: [u8; 16],
    /// The message the card signs (the agent hashes it; see
    /// [`pivgate_proto::card_message`]).
    pub message: Vec<u8>,
}

impl Challenges {
    /// A store whose challenges live `ttl` (at most 30 s), with at most
    /// `max_pending` outstanding, for the gateway identified by
    /// `gateway_id` (its certificate fingerprint).
    pub fn new(ttl: Duration, max_pending: usize, gateway_id: [u8; 32]) -> Challenges {
        Challenges {
            inner: Mutex::new(Inner { pending: HashMap::new(), spent: HashMap::new(), issued: 0 }),
            ttl: ttl.min(Duration::from_secs(30)),
            max_pending,
            gateway_id,
        }
    }

    /// The time to live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Issues a challenge for a badge tap (an unlock, an enrolment or a
    /// step-up).
    #[allow(clippy::too_many_arguments)]
    pub fn issue(
        &self,
        agent: &str,
        terminal: &str,
        card_uuid: [u8; 16],
        mechanism: Mechanism,
        algorithm: KeyAlgorithm,
        certificate: Vec<u8>,
        supplied: bool,
        purpose: Purpose,
        random: &dyn crate::core::Randomness,
        now: Instant,
        unix_ms: i64,
    ) -> Result<Issued, crate::error::Error> {
        let certificate_sha256 = Sha256::digest(&certificate).into();
        let gateway_id = self.gateway_id;
        let pending = Pending {
            agent: agent.to_string(),
            terminal: terminal.to_string(),
            card_uuid,
            mechanism,
            algorithm,
            certificate,
            message: Vec::new(),
            supplied,
            purpose,
            expires: now + self.ttl,
        };
        let step_up = match &pending.purpose {
            Purpose::StepUp { id, action, params_sha256 } => Some((*id, action.clone(), *params_sha256)),
            _ => None,
        };
        self.insert(pending, random, now, |challenge_id, nonce| {
            let tap = CardMessage { challenge_id, nonce, gateway_id, agent, terminal, card_uuid, mechanism: mechanism.code(), certificate_sha256, unix_ms };
            match &step_up {
                // A step-up's message is never a tap's: its own domain.
                Some((step_up_id, action, params_sha256)) => StepUpMessage { tap, step_up_id: *step_up_id, action, params_sha256: *params_sha256 }.encode(),
                None => tap.encode(),
            }
        })
    }

    /// Issues a challenge for `approver`'s badge (`card_uuid`, its 9A
    /// `certificate`) to approve `request` (stored as `request_bytes`);
    /// taken back with [`APPROVAL`] as the terminal.
    #[allow(clippy::too_many_arguments)]
    pub fn issue_approval(
        &self,
        approver: &str,
        request: &crate::model::Request,
        request_bytes: &[u8],
        card_uuid: [u8; 16],
        algorithm: KeyAlgorithm,
        certificate: Vec<u8>,
        random: &dyn crate::core::Randomness,
        now: Instant,
        unix_ms: i64,
    ) -> Result<Issued, crate::error::Error> {
        let request_sha256: [u8; 32] = Sha256::digest(request_bytes).into();
        let summary = request.kind.summary();
        let gateway_id = self.gateway_id;
        let pending = Pending {
            agent: approver.to_string(),
            terminal: APPROVAL.to_string(),
            card_uuid,
            mechanism: Mechanism::CardAndPin,
            algorithm,
            certificate,
            message: Vec::new(),
            supplied: false,
            purpose: Purpose::Approve { request: request.id, request_sha256 },
            // An approver reads what they approve and types a PIN: a
            // minute, whatever the taps' lifetime.
            expires: now + self.ttl.max(Duration::from_secs(60)),
        };
        self.insert(pending, random, now, |challenge_id, nonce| {
            ApprovalMessage { challenge_id, nonce, gateway_id, approver, request_id: request.id, request_sha256, summary: &summary, unix_ms }.encode()
        })
    }

    fn insert(
        &self,
        mut pending: Pending,
        random: &dyn crate::core::Randomness,
        now: Instant,
        compose: impl FnOnce([u8; 16], [u8; 32]) -> Vec<u8>,
    ) -> Result<Issued, crate::error::Error> {
        let mut id = [0u8; 16];
        let mut nonce = [0u8; 32];
        random.fill(&mut id)?;
        random.fill(&mut nonce)?;
        let message = compose(id, nonce);
        let mut g = self.inner.lock().map_err(|_| crate::error::Error::Exhausted("challenge lock"))?;
        g.issued += 1;
        if g.issued % 1024 == 0 || g.pending.len() >= self.max_pending {
            g.pending.retain(|_, p| p.expires > now);
            let keep = self.ttl.max(Duration::from_secs(60)) * 4;
            g.spent.retain(|_, t| now.saturating_duration_since(*t) < keep);
        }
        if g.pending.len() >= self.max_pending {
            return Err(crate::error::Error::Exhausted("too many outstanding challenges"));
        }
        // One agent cannot starve the others: a terminal has one tap at a
        // time, so a few dozen outstanding challenges is already generous.
        let agent = pending.agent.as_str();
        if g.pending.len() >= PER_AGENT && g.pending.values().filter(|p| p.agent == agent && p.expires > now).count() >= PER_AGENT {
            return Err(crate::error::Error::Exhausted("too many outstanding challenges for this agent"));
        }
        pending.message = message.clone();
        g.pending.insert(id, pending);
        Ok(Issued { id, message })
    }

    /// Takes a challenge issued to `agent` for `terminal` that its card
    /// never signed (wrong PINs), expired or not, once; a challenge spent
    /// already is refused.
    pub fn take_reported(&self, id: &[u8], agent: &str, terminal: &str, now: Instant) -> Result<Pending, Deny> {
        let id: [u8; 16] = id.try_into().map_err(|_| Deny::ChallengeUnknown)?;
        let mut g = self.inner.lock().map_err(|_| Deny::ChallengeUnknown)?;
        if g.spent.contains_key(&id) {
            return Err(Deny::ChallengeReplayed);
        }
        match g.pending.get(&id) {
            None => return Err(Deny::ChallengeUnknown),
            Some(p) if p.agent != agent || p.terminal != terminal => return Err(Deny::ChallengeMismatch),
            Some(_) => {}
        }
        let p = g.pending.remove(&id).ok_or(Deny::ChallengeUnknown)?;
        g.spent.insert(id, now);
        Ok(p)
    }

    /// Takes a challenge issued to `agent` for `terminal` for checking; it
    /// can never be taken again. A challenge of another agent or terminal
    /// is refused and left alone, so no agent can burn another's.
    pub fn take(&self, id: &[u8], agent: &str, terminal: &str, now: Instant) -> Result<Pending, Deny> {
        let p = self.take_reported(id, agent, terminal, now)?;
        if now > p.expires {
            return Err(Deny::ChallengeExpired);
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(ttl: u64) -> Challenges {
        Challenges::new(Duration::from_secs(ttl), 10, [7; 32])
    }

    fn issue(c: &Challenges, now: Instant) -> Issued {
        c.issue(
            "agent-1",
            "t1",
            [1; 16],
            Mechanism::CardAndPin,
            KeyAlgorithm::EcdsaP256,
            vec![1, 2, 3],
            false,
            Purpose::Unlock,
            &crate::core::SystemRandomness,
            now,
            0,
        )
        .unwrap()
    }

    #[test]
    fn single_use_expiry_and_replay() {
        let c = store(10);
        let t0 = Instant::now();
        let a = issue(&c, t0);
        let b = issue(&c, t0);
        assert_ne!(a.id, b.id);
        assert_ne!(a.message, b.message, "two challenges for the same tap must differ");
        let take = |id: &[u8], t| c.take(id, "agent-1", "t1", t);
        assert!(take(&a.id, t0).is_ok());
        assert_eq!(take(&a.id, t0).unwrap_err(), Deny::ChallengeReplayed);
        assert_eq!(take(&b.id, t0 + Duration::from_secs(11)).unwrap_err(), Deny::ChallengeExpired);
        assert_eq!(take(&b.id, t0).unwrap_err(), Deny::ChallengeReplayed);
        assert_eq!(take(&[9; 16], t0).unwrap_err(), Deny::ChallengeUnknown);
        assert_eq!(take(&[9; 3], t0).unwrap_err(), Deny::ChallengeUnknown);
    }

    #[test]
    fn another_agent_cannot_burn_a_challenge() {
        let c = store(10);
        let t0 = Instant::now();
        let a = issue(&c, t0);
        assert_eq!(c.take(&a.id, "agent-2", "t1", t0).unwrap_err(), Deny::ChallengeMismatch);
        assert_eq!(c.take(&a.id, "agent-1", "t2", t0).unwrap_err(), Deny::ChallengeMismatch);
        // Still there for its own agent and terminal.
        assert!(c.take(&a.id, "agent-1", "t1", t0).is_ok());
    }

    #[test]
    fn ttl_is_capped_and_outstanding_challenges_are_bounded() {
        assert_eq!(store(300).ttl(), Duration::from_secs(30));
        let c = store(10);
        let t0 = Instant::now();
        for _ in 0..10 {
            issue(&c, t0);
        }
        assert!(c
            .issue("a", "t", [0; 16], Mechanism::CardOnly, KeyAlgorithm::Rsa2048, vec![], false, Purpose::Unlock, &crate::core::SystemRandomness, t0, 0)
            .is_err());
        // Once they expire, room frees up.
        assert!(c
            .issue(
                "a",
                "t",
                [0; 16],
                Mechanism::CardOnly,
                KeyAlgorithm::Rsa2048,
                vec![],
                false,
                Purpose::Unlock,
                &crate::core::SystemRandomness,
                t0 + Duration::from_secs(11),
                0
            )
            .is_ok());
    }

    #[test]
    fn one_agent_cannot_hold_every_challenge() {
        let c = Challenges::new(Duration::from_secs(10), 10_000, [7; 32]);
        let t0 = Instant::now();
        let issue = |agent: &str| {
            c.issue(agent, "t", [0; 16], Mechanism::CardOnly, KeyAlgorithm::EcdsaP256, vec![], false, Purpose::Unlock, &crate::core::SystemRandomness, t0, 0)
        };
        for _ in 0..PER_AGENT {
            issue("greedy").unwrap();
        }
        assert!(issue("greedy").is_err());
        assert!(issue("polite").is_ok());
    }
}
