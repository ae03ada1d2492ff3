//! The live feeds the gateway streams, apart from gRPC so they can be
//! tested: a watcher's events ([`follow`]: catch-up from storage, then
//! live, with no gap and no repeat) and what an agent's presence stream
//! pushes ([`Gateway::presence_push`]).

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, watch};

use crate::core::Gateway;
use crate::error::{Error, Result};
use crate::model::{Event, Session};
use crate::store::Store;

/// Events read from storage per batch while catching up.
const CATCH_UP_BATCH: usize = 512;

/// Sends `tx` every durable event after `last` that `wanted` keeps, as
/// `item` makes it, in sequence order, each once: first from storage, then
/// live from `live` (subscribed before the first read, so nothing falls
/// between). A gap in the live events (a lagging receiver, an event out of
/// order) sends it back to storage. Ends when `tx`'s receiver goes away,
/// `stopping` changes, the live channel closes, or storage fails (the
/// error is sent first).
pub async fn follow<T, E: From<Error>>(
    store: Arc<Store>,
    mut live: broadcast::Receiver<Event>,
    mut stopping: watch::Receiver<bool>,
    mut last: u64,
    wanted: impl Fn(&Event) -> bool,
    item: impl Fn(&Event) -> T,
    tx: mpsc::Sender<std::result::Result<T, E>>,
) {
    'outer: loop {
        // Catch up from storage.
        loop {
            let batch = match store.events_after(last, CATCH_UP_BATCH) {
                Ok(b) => b,
                Err(e) => {
                    let _ = tx.send(Err(E::from(e))).await;
                    return;
                }
            };
            if batch.is_empty() {
                break;
            }
            for e in batch {
                last = e.sequence;
                if wanted(&e) && tx.send(Ok(item(&e))).await.is_err() {
                    return;
                }
            }
        }
        // Then live, skipping what storage already gave.
        loop {
            let next = tokio::select! {
                r = live.recv() => r,
                _ = stopping.changed() => return,
                // The watcher went away (or the server is stopping).
                _ = tx.closed() => return,
            };
            match next {
                Ok(e) if e.sequence <= last => continue,
                Ok(e) if Some(e.sequence) == last.checked_add(1) => {
                    last = e.sequence;
                    if wanted(&e) && tx.send(Ok(item(&e))).await.is_err() {
                        return;
                    }
                }
                // A gap (lagged or out of order): read storage again.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue 'outer,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// A live event, or word that some were missed.
pub enum Live<'a> {
    /// This event.
    Event(&'a Event),
    /// Events were missed.
    Lagged,
}

impl Gateway {
    /// The terminals `agent`'s presence stream tells it are locked, for a
    /// live event: a lock of a terminal it serves (an administrator's, a
    /// revocation) at once; after missed events, every terminal it serves
    /// that is locked now (a lock it already knows changes nothing).
    /// `None`: nothing to push.
    pub fn presence_push(&self, agent: &str, live: Live<'_>) -> Result<Option<Vec<String>>> {
        if let Live::Event(e) = &live {
            if !matches!(e.session, Session::Locked { .. }) {
                return Ok(None);
            }
        }
        let bound = self.store.agent(agent)?.map(|a| a.terminals).unwrap_or_default();
        Ok(match live {
            Live::Event(e) if matches!(e.session, Session::Locked { .. }) && bound.contains(&e.terminal_id) => Some(vec![e.terminal_id.clone()]),
            Live::Event(_) => None,
            Live::Lagged => {
                let mut locked = Vec::new();
                for t in bound {
                    if self.store.terminal(&t)?.is_some_and(|t| matches!(t.session, Session::Locked { .. })) {
                        locked.push(t);
                    }
                }
                Some(locked)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AuditKind, LockReason, Terminal, TerminalPolicy};
    use crate::store::{AuditEntry, Change};

    fn store() -> (Arc<Store>, std::path::PathBuf) {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!("pivgate-feed-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::SeqCst)));
        let _ = std::fs::remove_dir_all(&dir);
        (Store::open(&dir).unwrap(), dir)
    }

    /// Records one lock event of terminal `t`, durable; returns it.
    async fn lock(store: &Store, t: &str) -> Event {
        let terminal = Terminal {
            session: Session::Locked { reason: LockReason::Administrator, since_ms: 0, sequence: 0 },
            ..Terminal::new(t, TerminalPolicy::default(), 0)
        };
        let entry = AuditEntry { kind: AuditKind::SessionLocked, actor: "test".into(), terminal_id: t.into(), detail: serde_json::json!({}) };
        let (_, events) = store.record(entry, vec![Change::Session { terminal }], 0).unwrap();
        store.durable().await.unwrap();
        events.into_iter().next().unwrap()
    }

    async fn collect(rx: &mut mpsc::Receiver<std::result::Result<u64, Error>>, n: usize) -> Vec<u64> {
        let mut got = Vec::new();
        while got.len() < n {
            match tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await {
                Ok(Some(Ok(s))) => got.push(s),
                other => panic!("after {got:?}: {:?}", other.map(|o| o.map(|r| r.is_ok()))),
            }
        }
        got
    }

    #[tokio::test]
    async fn a_watcher_gets_stored_then_live_events_each_once_in_order() {
        let (store, dir) = store();
        for _ in 0..5 {
            lock(&store, "t1").await;
        }
        let (stop_tx, stopping) = watch::channel(false);
        let (tx, mut rx) = mpsc::channel(64);
        let live = store.subscribe();
        tokio::spawn(follow(store.clone(), live, stopping, 2, |e: &Event| e.terminal_id == "t1", |e: &Event| e.sequence, tx));
        let first = collect(&mut rx, 3).await;
        // Live ones, published as the gateway does once durable, with one
        // the filter drops.
        for t in ["t1", "t2", "t1"] {
            let e = lock(&store, t).await;
            store.publish(&[e]);
        }
        let then = collect(&mut rx, 2).await;
        let all: Vec<u64> = first.into_iter().chain(then).collect();
        assert_eq!(all, vec![3, 4, 5, 6, 8]);
        let _ = stop_tx.send(true);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn a_lagging_watcher_reads_storage_again_and_misses_nothing() {
        let (store, dir) = store();
        // A live channel far too small: the watcher lags at once.
        let (live_tx, live) = broadcast::channel(2);
        for _ in 0..10 {
            let e = lock(&store, "t1").await;
            let _ = live_tx.send(e);
        }
        let (_stop_tx, stopping) = watch::channel(false);
        let (tx, mut rx) = mpsc::channel(64);
        tokio::spawn(follow(store.clone(), live, stopping, 0, |_: &Event| true, |e: &Event| e.sequence, tx));
        let e = lock(&store, "t1").await;
        let _ = live_tx.send(e);
        assert_eq!(collect(&mut rx, 11).await, (1..=11).collect::<Vec<u64>>());
        assert!(tokio::time::timeout(std::time::Duration::from_millis(200), rx.recv()).await.is_err(), "an event came twice");
        let _ = std::fs::remove_dir_all(dir);
    }
}
