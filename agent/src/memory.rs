//! What the agent remembers about cards it has met, so a known card costs
//! as few APDUs as a card with a CHUID, and the PIN's tries need not be
//! asked for on every tap.
//!
//! Everything here is a hint, never trust: the gateway judges each tap by
//! the key that signs. A wrong memory costs one tap (a denial, after which
//! the entry is forgotten), never an unlock.
//!
//! - Per card kind (ATR: every YubiKey 5 NFC has the same one): whether
//!   cards of that kind had no CHUID but answered GET SERIAL, so the next
//!   one is asked for its serial first and its CHUID not at all when the
//!   serial is known.
//! - Per card (its serial, else its CHUID GUID): the card id the gateway
//!   bound the last granted challenge to (for an enrolled-key card an id
//!   derived from its key, not the GUID) and the PIN tries the card last
//!   reported.
//!
//! Both maps are bounded; the oldest entry goes first. Nothing is written
//! to disk: after a restart each card costs its certificate read once.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Most cards remembered.
pub const MAX_CARDS: usize = 4096;
/// Most card kinds remembered.
pub const MAX_KINDS: usize = 64;

/// What a card is remembered by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Handle {
    /// Its serial number (YubiKey GET SERIAL).
    Serial(u32),
    /// Its CHUID GUID.
    Guid([u8; 16]),
}

/// What is remembered about one card.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memo {
    /// The card id the gateway knows it by.
    pub id: [u8; 16],
    /// PIN tries the card last reported (after a verified PIN: its full
    /// count, [`TRIES_FULL`]).
    pub pin_tries: Option<u8>,
}

/// A PIN just verified: the card's counter is back at its maximum, at
/// least 2 on every card pivgate has met.
pub const TRIES_FULL: u8 = u8::MAX;

struct Bounded<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
    max: usize,
}

impl<K: std::hash::Hash + Eq + Copy, V> Bounded<K, V> {
    fn new(max: usize) -> Self {
        Bounded { map: HashMap::new(), order: VecDeque::new(), max }
    }

    fn insert(&mut self, k: K, v: V) {
        if self.map.insert(k, v).is_none() {
            self.order.push_back(k);
            while self.map.len() > self.max {
                match self.order.pop_front() {
                    Some(old) => {
                        self.map.remove(&old);
                    }
                    None => break,
                }
            }
        }
    }

    fn remove(&mut self, k: &K) {
        if self.map.remove(k).is_some() {
            self.order.retain(|o| o != k);
        }
    }
}

struct Inner {
    /// Card kinds (ATR) that are asked for their serial first.
    serial_first: Bounded<[u8; 32], ()>,
    cards: Bounded<Handle, Memo>,
}

/// The agent's memory of cards, shared by its terminals.
pub struct CardMemory {
    inner: Mutex<Inner>,
}

impl Default for CardMemory {
    fn default() -> Self {
        CardMemory::new()
    }
}

fn kind_key(atr: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(atr).into()
}

impl CardMemory {
    /// An empty memory.
    pub fn new() -> Self {
        CardMemory { inner: Mutex::new(Inner { serial_first: Bounded::new(MAX_KINDS), cards: Bounded::new(MAX_CARDS) }) }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> Option<R> {
        self.inner.lock().ok().map(|mut g| f(&mut g))
    }

    /// Whether cards of this kind are asked for their serial first.
    pub fn serial_first(&self, atr: Option<&[u8]>) -> bool {
        atr.and_then(|a| self.with(|i| i.serial_first.map.contains_key(&kind_key(a)))).unwrap_or(false)
    }

    /// Cards of this kind had no CHUID and answered GET SERIAL.
    pub fn learn_serial_first(&self, atr: Option<&[u8]>) {
        if let Some(a) = atr {
            self.with(|i| i.serial_first.insert(kind_key(a), ()));
        }
    }

    /// What is remembered about a card.
    pub fn card(&self, h: Handle) -> Option<Memo> {
        self.with(|i| i.cards.map.get(&h).copied()).flatten()
    }

    /// The gateway granted a tap of this card, bound to `id`.
    pub fn remember(&self, h: Handle, id: [u8; 16], pin_tries: Option<u8>) {
        self.with(|i| {
            let tries = pin_tries.or_else(|| i.cards.map.get(&h).and_then(|m| m.pin_tries));
            i.cards.remove(&h);
            i.cards.insert(h, Memo { id, pin_tries: tries });
        });
    }

    /// The card reported its PIN tries.
    pub fn pin_tries(&self, h: Handle, tries: u8) {
        self.with(|i| {
            if let Some(m) = i.cards.map.get_mut(&h) {
                m.pin_tries = Some(tries);
            }
        });
    }

    /// The memory did not help (a denial after it was used): forget it.
    pub fn forget(&self, h: Handle) {
        self.with(|i| i.cards.remove(&h));
    }

    /// How many cards are remembered.
    pub fn cards(&self) -> usize {
        self.with(|i| i.cards.map.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_card_goes_first_and_the_bound_holds() {
        let m = CardMemory::new();
        for s in 0..(MAX_CARDS as u32 + 10) {
            m.remember(Handle::Serial(s), [s as u8; 16], None);
        }
        assert_eq!(m.cards(), MAX_CARDS);
        assert!(m.card(Handle::Serial(0)).is_none());
        assert!(m.card(Handle::Serial(9)).is_none());
        assert_eq!(m.card(Handle::Serial(10)).map(|c| c.id), Some([10; 16]));
        m.forget(Handle::Serial(10));
        assert!(m.card(Handle::Serial(10)).is_none());
        assert_eq!(m.cards(), MAX_CARDS - 1);
    }

    #[test]
    fn tries_are_kept_across_a_new_grant_unless_reported_anew() {
        let m = CardMemory::new();
        let h = Handle::Guid([7; 16]);
        m.pin_tries(h, 2);
        assert!(m.card(h).is_none(), "tries alone do not make a memo");
        m.remember(h, [1; 16], Some(TRIES_FULL));
        m.pin_tries(h, 1);
        m.remember(h, [1; 16], None);
        assert_eq!(m.card(h).and_then(|c| c.pin_tries), Some(1));
    }

    #[test]
    fn card_kinds_are_learned_by_atr() {
        let m = CardMemory::new();
        let yubikey = b"\x3b\xfd\x13\x00\x00\x81\x31\xfe\x15\x80\x73\xc0\x21\xc0\x57\x59\x75\x62\x69\x4b\x65\x79\x40";
        assert!(!m.serial_first(Some(yubikey)));
        m.learn_serial_first(Some(yubikey));
        assert!(m.serial_first(Some(yubikey)));
        assert!(!m.serial_first(Some(b"\x3b\x8b")));
        assert!(!m.serial_first(None));
    }
}
