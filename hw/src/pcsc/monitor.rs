//! The reader monitor: readers added and removed, cards inserted and
//! removed, from SCardGetStatusChange with the PnP notification
//! pseudo-reader. No polling: the thread sleeps in pcscd until something
//! changes.
//!
//! It survives pcscd going away. It then reports [`ReaderEvent::ServiceLost`]
//! and a removal for every card it knew of (a restarted pcscd powers cards
//! off, and nobody can say the same card is still there), reconnects with
//! backoff, reports [`ReaderEvent::ServiceRestored`], and then every reader
//! and card present as new. A card swapped between two wake-ups (pcsc-lite's
//! event counter moved while a card stayed present) is reported as a removal
//! and an insertion, never as nothing.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ::pcsc::{Context, ReaderState, State};

use super::{establish, list_readers, pnp_reader};

/// Something that happened at the readers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderEvent {
    /// A reader appeared.
    ReaderAdded {
        /// Reader name as pcscd reports it.
        reader: String,
    },
    /// A reader disappeared (unplugged, or its driver went away).
    ReaderRemoved {
        /// Reader name.
        reader: String,
    },
    /// A card is in the reader.
    CardInserted {
        /// Reader name.
        reader: String,
        /// The card's ATR.
        atr: Vec<u8>,
    },
    /// The card left the reader.
    CardRemoved {
        /// Reader name.
        reader: String,
    },
    /// pcscd stopped answering; the monitor is reconnecting.
    ServiceLost,
    /// pcscd answers again.
    ServiceRestored,
}

struct Shared {
    stop: AtomicBool,
    ctx: Mutex<Option<Context>>,
}

/// A running reader monitor. Dropping it stops it.
pub struct Monitor {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Known {
    present: Option<Vec<u8>>,
    events: u32,
}

impl Monitor {
    /// Starts monitoring on a thread of its own; `sink` receives every event
    /// in order.
    pub fn spawn<F>(sink: F) -> std::io::Result<Monitor>
    where
        F: FnMut(ReaderEvent) + Send + 'static,
    {
        let shared = Arc::new(Shared { stop: AtomicBool::new(false), ctx: Mutex::new(None) });
        let s = shared.clone();
        let thread = std::thread::Builder::new().name("pcsc monitor".into()).spawn(move || run(&s, sink))?;
        Ok(Monitor { shared, thread: Some(thread) })
    }

    /// Stops the monitor and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let Some(t) = self.thread.take() else { return };
        // SCardCancel only wakes a wait already in progress; the thread may
        // be between two waits, so cancel until it has seen the flag.
        while !t.is_finished() {
            if let Ok(guard) = self.shared.ctx.lock() {
                if let Some(ctx) = guard.as_ref() {
                    let _ = ctx.cancel();
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = t.join();
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn run(shared: &Shared, mut sink: impl FnMut(ReaderEvent)) {
    let mut known: BTreeMap<String, Known> = BTreeMap::new();
    let mut backoff = Duration::from_millis(100);
    let mut lost = false;
    while !shared.stop.load(Ordering::SeqCst) {
        let ctx = match establish() {
            Ok(c) => c,
            Err(_) => {
                if !lost {
                    lost = true;
                    forget_all(&mut known, &mut sink);
                    sink(ReaderEvent::ServiceLost);
                }
                sleep_unless_stopped(shared, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Ok(mut g) = shared.ctx.lock() {
            *g = Some(ctx.clone());
        }
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        if lost {
            sink(ReaderEvent::ServiceRestored);
        }
        match watch(&ctx, shared, &mut known, &mut sink) {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "pcscd connection lost; reconnecting");
                lost = true;
                forget_all(&mut known, &mut sink);
                sink(ReaderEvent::ServiceLost);
                sleep_unless_stopped(shared, backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// What a reader's new state means for the card in it, given what was
/// known of the reader: a removal, an insertion, both (a swap), or
/// nothing. pcsc-lite's event counter (`count`, in the upper bits of the
/// event state) moves once per change; a card that is present now and was
/// present before, with the counter moved twice or more, was swapped
/// between two wake-ups. Updates `k`. Pure: the PC/SC calls are in
/// [`watch`].
fn card_transition(reader: &str, k: &mut Known, present: bool, count: u32, atr: &[u8]) -> Vec<ReaderEvent> {
    let mut out = Vec::new();
    let swapped = present && k.present.is_some() && count.wrapping_sub(k.events) >= 2;
    if k.present.is_some() && (!present || swapped) {
        k.present = None;
        out.push(ReaderEvent::CardRemoved { reader: reader.to_string() });
    }
    if present && k.present.is_none() {
        k.present = Some(atr.to_vec());
        out.push(ReaderEvent::CardInserted { reader: reader.to_string(), atr: atr.to_vec() });
    }
    k.events = count;
    out
}

fn forget_all(known: &mut BTreeMap<String, Known>, sink: &mut impl FnMut(ReaderEvent)) {
    for (reader, k) in std::mem::take(known) {
        if k.present.is_some() {
            sink(ReaderEvent::CardRemoved { reader: reader.clone() });
        }
        sink(ReaderEvent::ReaderRemoved { reader });
    }
}

fn sleep_unless_stopped(shared: &Shared, d: Duration) {
    let step = Duration::from_millis(50);
    let mut left = d;
    while !left.is_zero() && !shared.stop.load(Ordering::SeqCst) {
        let s = left.min(step);
        std::thread::sleep(s);
        left -= s;
    }
}

/// Watches until stopped (`Ok`) or until pcscd fails (`Err`).
fn watch(ctx: &Context, shared: &Shared, known: &mut BTreeMap<String, Known>, sink: &mut impl FnMut(ReaderEvent)) -> Result<(), ::pcsc::Error> {
    let pnp = pnp_reader().to_owned();
    let mut states = vec![ReaderState::new(pnp.clone(), State::UNAWARE)];
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let names = list_readers(ctx).map_err(|_| ::pcsc::Error::NoService)?;
        let gone: Vec<String> = known.keys().filter(|k| !names.contains(k)).cloned().collect();
        for reader in gone {
            if known.remove(&reader).is_some_and(|k| k.present.is_some()) {
                sink(ReaderEvent::CardRemoved { reader: reader.clone() });
            }
            sink(ReaderEvent::ReaderRemoved { reader });
        }
        states.retain(|s| s.name() == pnp.as_c_str() || names.iter().any(|n| s.name().to_bytes() == n.as_bytes()));
        for n in &names {
            if !states.iter().any(|s| s.name().to_bytes() == n.as_bytes()) {
                if let Ok(c) = CString::new(n.as_str()) {
                    states.push(ReaderState::new(c, State::UNAWARE));
                }
            }
            if !known.contains_key(n) {
                known.insert(n.clone(), Known::default());
                sink(ReaderEvent::ReaderAdded { reader: n.clone() });
            }
        }
        match ctx.get_status_change(None, &mut states) {
            Ok(()) => {}
            Err(::pcsc::Error::Cancelled) | Err(::pcsc::Error::Timeout) => continue,
            // The reader list changed under us; list again.
            Err(::pcsc::Error::UnknownReader) | Err(::pcsc::Error::ReaderUnavailable) => continue,
            Err(e) => return Err(e),
        }
        for s in states.iter_mut() {
            let ev = s.event_state();
            if s.name() == pnp.as_c_str() || !ev.contains(State::CHANGED) {
                s.sync_current_state();
                continue;
            }
            let reader = s.name().to_string_lossy().into_owned();
            let present = ev.contains(State::PRESENT) && !ev.intersects(State::UNKNOWN | State::IGNORE);
            let k = known.entry(reader.clone()).or_default();
            for e in card_transition(&reader, k, present, s.event_count(), s.atr()) {
                sink(e);
            }
            s.sync_current_state();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ATR_A: &[u8] = &[0x3b, 0x8a, 0x80];
    const ATR_B: &[u8] = &[0x3b, 0xf8, 0x13];

    fn removed() -> ReaderEvent {
        ReaderEvent::CardRemoved { reader: "r".into() }
    }
    fn inserted(atr: &[u8]) -> ReaderEvent {
        ReaderEvent::CardInserted { reader: "r".into(), atr: atr.to_vec() }
    }

    #[test]
    fn a_card_put_in_and_taken_out_is_one_insertion_and_one_removal() {
        let mut k = Known::default();
        assert_eq!(card_transition("r", &mut k, true, 1, ATR_A), [inserted(ATR_A)]);
        assert_eq!(card_transition("r", &mut k, false, 2, &[]), [removed()]);
        assert!(card_transition("r", &mut k, false, 3, &[]).is_empty(), "an empty reader changing state says nothing");
    }

    #[test]
    fn a_card_that_stays_while_its_state_changes_once_is_not_reported() {
        let mut k = Known::default();
        card_transition("r", &mut k, true, 4, ATR_A);
        // INUSE or EXCLUSIVE coming and going moves the counter once.
        assert!(card_transition("r", &mut k, true, 5, ATR_A).is_empty());
        assert_eq!(k.present.as_deref(), Some(ATR_A));
    }

    #[test]
    fn a_card_swapped_between_two_wake_ups_is_a_removal_and_an_insertion() {
        let mut k = Known::default();
        card_transition("r", &mut k, true, 10, ATR_A);
        // Out and in again before the monitor woke: the counter moved twice.
        assert_eq!(card_transition("r", &mut k, true, 12, ATR_B), [removed(), inserted(ATR_B)]);
        assert_eq!(k.present.as_deref(), Some(ATR_B));
    }

    #[test]
    fn the_counter_wrapping_around_still_shows_a_swap() {
        let mut k = Known { present: Some(ATR_A.to_vec()), events: u32::MAX };
        assert_eq!(card_transition("r", &mut k, true, 1, ATR_B), [removed(), inserted(ATR_B)]);
        let mut k = Known { present: Some(ATR_A.to_vec()), events: u32::MAX };
        assert!(card_transition("r", &mut k, true, 0, ATR_A).is_empty(), "one step across the wrap is no swap");
    }

    #[test]
    fn a_card_present_when_the_monitor_starts_is_an_insertion() {
        let mut k = Known::default();
        assert_eq!(card_transition("r", &mut k, true, 0, ATR_A), [inserted(ATR_A)]);
    }
}
