//! Storage in sled: operators, cards, the deny list, agents, terminals with
//! their sessions, the event log and the hash-chained audit log.
//!
//! Every change goes through [`Store::record`]: one sled transaction that
//! appends an audit record and applies the change (a new session and its
//! event, an enrolment, a revocation) together, so no change exists without
//! its audit record. Appends are serialised by one lock, which is what makes
//! sequence numbers gap-free and the audit chain linear.
//!
//! Durability: sled 0.34's `flush()` ends in `sync_file_range`, which
//! survives a killed process but not a power cut (sled issue #1452). The
//! [`Committer`] therefore follows each flush with `fdatasync` of sled's
//! `db` file. Callers that acknowledge anything wait for
//! [`Store::durable`], which batches concurrent waiters into one flush and
//! one fdatasync (group commit).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::Transactional;
use tokio::sync::{broadcast, oneshot};

use crate::error::{Error, Result};
use crate::model::{Agent, Card, Event, Operator, Session, Terminal};

/// The card index holds two kinds of key: a FASC-N (25 bytes) and, for
/// every certificate a card holds, `key\0` and the SHA-256 of its public
/// key (36 bytes), each naming the card's id. A key index entry whose card
/// no longer holds that key is harmless: the card's own certificates are
/// what every check compares with.
fn key_index(key_sha256: &[u8; 32]) -> Vec<u8> {
    [b"key\0".as_slice(), key_sha256].concat()
}

/// The largest value the store writes: well under sled 0.34's blob
/// threshold (a quarter of its 512 KiB segment), past which sled writes the
/// value as a file under `blobs/` that it never fsyncs.
pub const MAX_VALUE: usize = 64 * 1024;

/// The schema this code reads and writes.
pub const SCHEMA_VERSION: u64 = 1;

/// One audit record, as stored and exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position, from 1.
    pub index: u64,
    /// Unix ms.
    pub unix_ms: i64,
    /// What happened ("auth.granted", "auth.denied", "session.locked", ...).
    pub kind: String,
    /// Who did it.
    pub actor: String,
    /// The terminal, if any.
    pub terminal_id: String,
    /// Details.
    pub detail: serde_json::Value,
    /// The previous record's hash (hex), or 64 zeros for the first.
    pub prev_hash: String,
    /// SHA-256 over the previous hash and this record without its hash.
    pub hash: String,
}

#[derive(Serialize)]
struct AuditBody<'a> {
    index: u64,
    unix_ms: i64,
    kind: &'a str,
    actor: &'a str,
    terminal_id: &'a str,
    detail: &'a serde_json::Value,
    prev_hash: &'a str,
}

impl AuditRecord {
    /// The hash this record must carry, given its fields and `prev_hash`.
    pub fn compute_hash(&self) -> String {
        let body = AuditBody {
            index: self.index,
            unix_ms: self.unix_ms,
            kind: &self.kind,
            actor: &self.actor,
            terminal_id: &self.terminal_id,
            detail: &self.detail,
            prev_hash: &self.prev_hash,
        };
        // serde_json writes struct fields in order and maps sorted, so the
        // bytes are canonical.
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut h = Sha256::new();
        h.update(self.prev_hash.as_bytes());
        h.update(&bytes);
        hex::encode(h.finalize())
    }
}

/// What an audit record says, before it is numbered and chained.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    /// Kind.
    pub kind: crate::model::AuditKind,
    /// Actor.
    pub actor: String,
    /// Terminal.
    pub terminal_id: String,
    /// Details.
    pub detail: serde_json::Value,
}

/// A change applied together with an audit record.
#[derive(Debug, Clone)]
pub enum Change {
    /// A terminal's new session (emits an event).
    Session {
        /// The terminal (must exist or be created with `policy`).
        terminal: Terminal,
    },
    /// Creates or replaces a terminal without a session change.
    Terminal(Terminal),
    /// Creates or replaces an operator.
    Operator(Operator),
    /// Creates or replaces a card.
    Card(Card),
    /// Adds deny-list entries.
    Deny(Vec<crate::model::DenyKey>),
    /// Creates or replaces an agent binding.
    Agent(Agent),
    /// Opens (`Some`) or closes (`None`) a terminal's enrolment window.
    Window {
        /// The terminal.
        terminal: String,
        /// The window.
        window: Option<crate::model::EnrolmentWindow>,
    },
    /// Creates or replaces an approval request.
    Request(crate::model::Request),
    /// Creates or replaces a terminal group.
    Group(crate::model::TerminalGroup),
    /// Records an administrator certificate issued.
    Admin(crate::model::AdminRecord),
    /// Forgets a closed request (its records stay in the audit log).
    ForgetRequest([u8; 16]),
    /// Creates or replaces a break-glass grant.
    BreakGlass(crate::model::BreakGlass),
    /// The bootstrap pair is spent: every administrator certificate from
    /// now on needs a second administrator.
    BootstrapSpent,
    /// Locks an operator out (`Some`) or lifts it (`None`).
    Lockout {
        /// The operator.
        operator: String,
        /// The lockout.
        lockout: Option<crate::model::Lockout>,
    },
    /// The newest thisUpdate (Unix seconds) accepted for a CRL key
    /// ([`crate::verify::CrlKey::id`]): a restart never goes back to an
    /// older CRL.
    CrlWatermark {
        /// The CRL key's id.
        key: String,
        /// thisUpdate, Unix seconds.
        this_update_s: i64,
    },
}

struct Ledger {
    next_audit: u64,
    next_sequence: u64,
    last_hash: String,
}

/// Batches durability waiters into one flush + fdatasync.
struct Committer {
    tx: Mutex<mpsc::Sender<oneshot::Sender<std::result::Result<(), String>>>>,
    flushes: Arc<AtomicU64>,
}

/// Sequence numbers written, and written and durable.
#[derive(Default)]
struct Watermarks {
    written: AtomicU64,
    durable: AtomicU64,
}

/// What makes written data durable: sled's flush, then fdatasync of its
/// data file. A function, so a test can make the disk fail.
type Sync = Box<dyn FnMut() -> std::result::Result<(), String> + Send>;

impl Committer {
    fn start(db: sled::Db, data_file: File, marks: Arc<Watermarks>, fatal: tokio::sync::watch::Sender<Option<String>>) -> std::io::Result<Committer> {
        let sync: Sync = Box::new(move || db.flush().map_err(|e| e.to_string()).and_then(|_| data_file.sync_data().map_err(|e| e.to_string())));
        Committer::start_with(sync, marks, fatal)
    }

    fn start_with(mut sync: Sync, marks: Arc<Watermarks>, fatal: tokio::sync::watch::Sender<Option<String>>) -> std::io::Result<Committer> {
        let (tx, rx) = mpsc::channel::<oneshot::Sender<std::result::Result<(), String>>>();
        let flushes = Arc::new(AtomicU64::new(0));
        let count = flushes.clone();
        std::thread::Builder::new().name("group commit".into()).spawn(move || {
            let mut failed: Option<String> = None;
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while let Ok(w) = rx.try_recv() {
                    batch.push(w);
                }
                // Once the disk has refused to keep what was written, what
                // is in memory can no longer be promised: every waiter from
                // then on is told so, and the gateway is told to stop (the
                // service manager restarts it on what is on disk).
                let r = match &failed {
                    Some(e) => Err(e.clone()),
                    None => {
                        let written = marks.written.load(Ordering::SeqCst);
                        let r = sync();
                        count.fetch_add(1, Ordering::Relaxed);
                        match &r {
                            Ok(()) => {
                                marks.durable.fetch_max(written, Ordering::SeqCst);
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "cannot make writes durable; the gateway stops");
                                failed = Some(e.clone());
                                let _ = fatal.send(Some(e.clone()));
                            }
                        }
                        r
                    }
                };
                for w in batch {
                    let _ = w.send(r.clone());
                }
            }
        })?;
        Ok(Committer { tx: Mutex::new(tx), flushes })
    }
}

/// The gateway's database.
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
    operators: sled::Tree,
    cards: sled::Tree,
    fascn_index: sled::Tree,
    deny: sled::Tree,
    agents: sled::Tree,
    crl_state: sled::Tree,
    checkpoints: sled::Tree,
    terminals: sled::Tree,
    /// Enrolment windows (`w/` and the terminal), approval requests (`r/`
    /// and the id) and terminal groups (`g/` and the id).
    lifecycle: sled::Tree,
    events: sled::Tree,
    audit: sled::Tree,
    ledger: Mutex<Ledger>,
    committer: Committer,
    marks: Arc<Watermarks>,
    live: broadcast::Sender<Event>,
    /// Set when writes can no longer be made durable: nothing more is
    /// recorded, and `run` stops with an error.
    fatal: tokio::sync::watch::Sender<Option<String>>,
    path: PathBuf,
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::Corrupt(e.to_string()))
}

fn dec<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| Error::Corrupt(e.to_string()))
}

fn last_key(tree: &sled::Tree) -> Result<u64> {
    Ok(match tree.last()? {
        Some((k, _)) => u64::from_be_bytes(k.as_ref().try_into().map_err(|_| Error::Corrupt("bad key".into()))?),
        None => 0,
    })
}

/// Makes a new, empty database at `dir`: in `.NAME.new` beside it, every
/// file and folder fsynced, then renamed into place and the parent
/// fsynced. A staging folder left by an interrupted attempt is removed
/// first (nothing in it was ever acknowledged).
fn create_whole(dir: &Path) -> Result<()> {
    let name = dir.file_name().ok_or_else(|| Error::Corrupt(format!("{}: not a folder name", dir.display())))?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let staging = parent.join(format!(".{}.new", name.to_string_lossy()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)?;
    }
    {
        let db = sled::Config::new().path(&staging).open()?;
        db.open_tree("meta")?.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
        db.flush()?;
    }
    sync_folder(&staging)?;
    std::fs::rename(&staging, dir)?;
    File::open(parent)?.sync_all()?;
    Ok(())
}

/// Opens sled at `dir`. Just after [`create_whole`] or a restore, the sled
/// that made the database may still hold its file lock for a moment (its
/// I/O threads close the file as they finish), as may a gateway that is
/// stopping: a lock held is waited for, up to 10 s.
fn open_sled(dir: &Path) -> Result<sled::Db> {
    // sled 0.34.7 reports a held lock as ErrorKind::Other with this text.
    let locked = |e: &sled::Error| matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"));
    let start = std::time::Instant::now();
    loop {
        match sled::Config::new().path(dir).open() {
            Ok(db) => return Ok(db),
            Err(e) if locked(&e) && start.elapsed() < std::time::Duration::from_secs(10) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// sled 0.34.7 writes a snapshot at every open as `snap.LSN.generating`,
/// fsyncs it, renames it to `snap.LSN`, then removes the older ones. But
/// it reads the newest file named `snap.*`, `.generating` included, and
/// refuses to open ("Read corrupted data") if that one is partial, as a
/// kill while it is written leaves it. A `.generating` file was never
/// renamed, so the older snapshots are all still there: removing it is
/// safe, and sled then recovers from the older snapshot and its log.
fn remove_unfinished_snapshots(dir: &Path) -> Result<()> {
    let mut removed = false;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %name, "removing a snapshot sled did not finish writing (the gateway stopped while it started)");
            std::fs::remove_file(dir.join(&*name))?;
            removed = true;
        }
    }
    if removed {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// fsyncs every file and folder in `dir` (one level down: sled keeps
/// `blobs/` there), then `dir` itself.
fn sync_folder(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            for inner in std::fs::read_dir(&path)? {
                File::open(inner?.path())?.sync_all()?;
            }
        }
        File::open(&path)?.sync_all()?;
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The trees that hold state (everything but the append-only audit log
/// and events), in [`Store::state_trees`] order.
const STATE_TREES: [&str; 10] = ["meta", "operators", "cards", "fascn_index", "deny", "agents", "crl_state", "checkpoints", "terminals", "lifecycle"];

/// A backup's cut: see [`Store::backup_cut`].
#[derive(Debug, Clone)]
pub struct BackupCut {
    /// The newest audit record at the cut.
    pub audit_index: u64,
    /// Its hash.
    pub audit_hash: String,
    /// The newest event at the cut.
    pub event_sequence: u64,
    /// Every state tree's entries: tree, key, value.
    pub state: Vec<(&'static str, Vec<u8>, Vec<u8>)>,
}

/// A tree's entries after `after` (exclusive), in key order.
fn listing<'a, T: for<'de> Deserialize<'de>>(tree: &'a sled::Tree, after: &[u8]) -> impl Iterator<Item = Result<(Vec<u8>, T)>> + 'a {
    use std::ops::Bound;
    let start = if after.is_empty() { Bound::Unbounded } else { Bound::Excluded(after.to_vec()) };
    tree.range::<Vec<u8>, _>((start, Bound::Unbounded)).map(|r| {
        let (k, v) = r?;
        Ok((k.to_vec(), dec(&v)?))
    })
}

fn abort(e: Error) -> ConflictableTransactionError<Error> {
    ConflictableTransactionError::Abort(e)
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    ///
    /// A new database is made whole in a staging folder beside `dir` and
    /// renamed into place, so a kill or power cut while sled creates its
    /// files (its `conf` is written in two steps and never fsynced by
    /// sled) never leaves a `dir` that cannot be opened. Every file sled
    /// keeps is fsynced, with the folder, at each open.
    pub fn open(dir: &Path) -> Result<Arc<Store>> {
        if !dir.exists() {
            create_whole(dir)?;
        }
        remove_unfinished_snapshots(dir)?;
        let db = open_sled(dir)?;
        let meta = db.open_tree("meta")?;
        match meta.get("schema_version")? {
            None => {
                meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
            }
            Some(v) => {
                let v = u64::from_be_bytes(v.as_ref().try_into().map_err(|_| Error::Corrupt("schema_version".into()))?);
                if v != SCHEMA_VERSION {
                    return Err(Error::Corrupt(format!("database schema {v}, this gateway reads {SCHEMA_VERSION}")));
                }
            }
        }
        let audit = db.open_tree("audit")?;
        let events = db.open_tree("events")?;
        let last_hash = match audit.last()? {
            Some((_, v)) => dec::<AuditRecord>(&v)?.hash,
            None => "0".repeat(64),
        };
        let ledger = Ledger { next_audit: last_key(&audit)? + 1, next_sequence: last_key(&events)? + 1, last_hash };
        db.flush()?;
        // sled keeps its log and heap in the file `db` in its folder; its
        // `conf` and the snapshot it wrote while opening are synced too.
        sync_folder(dir)?;
        let data_file = File::open(dir.join("db"))?;
        let marks = Arc::new(Watermarks::default());
        let last_seq = ledger.next_sequence - 1;
        marks.written.store(last_seq, Ordering::SeqCst);
        marks.durable.store(last_seq, Ordering::SeqCst);
        let fatal = tokio::sync::watch::channel(None).0;
        let committer = Committer::start(db.clone(), data_file, marks.clone(), fatal.clone())?;
        let (live, _) = broadcast::channel(4096);
        Ok(Arc::new(Store {
            meta,
            operators: db.open_tree("operators")?,
            cards: db.open_tree("cards")?,
            fascn_index: db.open_tree("fascn_index")?,
            deny: db.open_tree("deny")?,
            agents: db.open_tree("agents")?,
            crl_state: db.open_tree("crl_state")?,
            checkpoints: db.open_tree("checkpoints")?,
            terminals: db.open_tree("terminals")?,
            lifecycle: db.open_tree("lifecycle")?,
            events,
            audit,
            db,
            ledger: Mutex::new(ledger),
            committer,
            marks,
            live,
            fatal,
            path: dir.to_path_buf(),
        }))
    }

    /// Files sled has put under `blobs/` (values over its blob threshold,
    /// which it never fsyncs). Always 0 while [`MAX_VALUE`] holds; anything
    /// else is an alarm.
    pub fn blob_files(&self) -> usize {
        std::fs::read_dir(self.path.join("blobs")).map(|d| d.flatten().count()).unwrap_or(0)
    }

    /// Resolves with the reason once writes can no longer be made durable.
    pub fn fatal(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.fatal.subscribe()
    }

    /// The database folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many flush + fdatasync rounds have run (for metrics and the
    /// group-commit benchmark).
    pub fn flushes(&self) -> u64 {
        self.committer.flushes.load(Ordering::Relaxed)
    }

    /// Waits until everything written before this call is on disk (flushed
    /// and fdatasync'ed).
    pub async fn durable(&self) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.committer
            .tx
            .lock()
            .map_err(|_| Error::Transaction("committer lock poisoned".into()))?
            .send(tx)
            .map_err(|_| Error::Transaction("committer stopped".into()))?;
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Durability(std::io::Error::other(e))),
            Err(_) => Err(Error::Transaction("committer stopped".into())),
        }
    }

    /// Appends an audit record and applies `changes`, atomically. Returns
    /// the record and the events it produced. Not yet durable: await
    /// [`Store::durable`] before acknowledging, then [`Store::publish`].
    pub fn record(&self, entry: AuditEntry, changes: Vec<Change>, now_ms: i64) -> Result<(AuditRecord, Vec<Event>)> {
        self.record_with(now_ms, || Ok(Some((entry, changes))))?.ok_or_else(|| Error::Transaction("nothing recorded".into()))
    }

    /// Decides and records under the ledger lock: `decide` reads the
    /// current state and returns what to record (or nothing), and no other
    /// change can slip in between its reads and the write. `decide` must
    /// not call `record` itself.
    pub fn record_with(&self, now_ms: i64, decide: impl FnOnce() -> Result<Option<(AuditEntry, Vec<Change>)>>) -> Result<Option<(AuditRecord, Vec<Event>)>> {
        let mut ledger = self.ledger.lock().map_err(|_| Error::Transaction("ledger lock poisoned".into()))?;
        if let Some(e) = self.fatal.borrow().clone() {
            return Err(Error::Durability(std::io::Error::other(format!("the disk refused an earlier write: {e}"))));
        }
        let Some((entry, changes)) = decide()? else { return Ok(None) };
        // The record names the events it comes with, so an acknowledged
        // unlock can be matched to its audit record.
        let mut record = AuditRecord {
            index: ledger.next_audit,
            unix_ms: now_ms,
            kind: entry.kind.as_str().to_string(),
            actor: entry.actor,
            terminal_id: entry.terminal_id,
            detail: entry.detail,
            prev_hash: ledger.last_hash.clone(),
            hash: String::new(),
        };
        let mut events = Vec::new();
        let mut event_hashes = Vec::new();
        let mut seq = ledger.next_sequence;
        // (tree, key, value); no value: the key is removed.
        let mut writes: Vec<(usize, Vec<u8>, Option<Vec<u8>>)> = Vec::new();
        macro_rules! put {
            ($tree:expr, $k:expr, $v:expr) => {
                writes.push(($tree, $k, Some($v)))
            };
        }
        for c in &changes {
            match c {
                Change::Session { terminal } => {
                    let mut t = terminal.clone();
                    set_sequence(&mut t.session, seq);
                    let ev = Event { sequence: seq, unix_ms: now_ms, terminal_id: t.id.clone(), session: t.session.clone() };
                    let bytes = enc(&ev)?;
                    event_hashes.push(hex::encode(Sha256::digest(&bytes)));
                    put!(T_EVENTS, seq.to_be_bytes().to_vec(), bytes);
                    put!(T_TERMINALS, t.id.as_bytes().to_vec(), enc(&t)?);
                    events.push(ev);
                    seq += 1;
                }
                Change::Terminal(t) => put!(T_TERMINALS, t.id.as_bytes().to_vec(), enc(t)?),
                Change::Operator(o) => put!(T_OPERATORS, o.id.as_bytes().to_vec(), enc(o)?),
                Change::Card(card) => {
                    put!(T_CARDS, card.uuid.to_vec(), enc(card)?);
                    if let Some(f) = &card.fascn {
                        put!(T_FASCN, f.clone(), card.uuid.to_vec());
                    }
                    for der in card.certificates.values() {
                        if let Ok(info) = crate::verify::inspect(der) {
                            put!(T_FASCN, key_index(&info.key_sha256), card.uuid.to_vec());
                        }
                    }
                }
                Change::Deny(keys) => {
                    for k in keys {
                        put!(T_DENY, k.stored().into_bytes(), now_ms.to_be_bytes().to_vec());
                    }
                }
                Change::Agent(a) => put!(T_AGENTS, a.name.as_bytes().to_vec(), enc(a)?),
                Change::CrlWatermark { key, this_update_s } => put!(T_CRL_STATE, key.as_bytes().to_vec(), this_update_s.to_be_bytes().to_vec()),
                Change::Window { terminal, window: Some(w) } => put!(T_LIFECYCLE, window_key(terminal), enc(w)?),
                Change::Window { terminal, window: None } => writes.push((T_LIFECYCLE, window_key(terminal), None)),
                Change::Request(r) => put!(T_LIFECYCLE, request_key(&r.id), enc(r)?),
                Change::Group(g) => put!(T_LIFECYCLE, group_key(&g.id), enc(g)?),
                Change::Admin(a) => put!(T_LIFECYCLE, admin_key(&a.name), enc(a)?),
                Change::ForgetRequest(id) => writes.push((T_LIFECYCLE, request_key(id), None)),
                Change::BreakGlass(b) => put!(T_LIFECYCLE, break_glass_key(&b.id), enc(b)?),
                Change::BootstrapSpent => put!(T_LIFECYCLE, BOOTSTRAP.to_vec(), b"spent".to_vec()),
                Change::Lockout { operator, lockout: Some(l) } => put!(T_LIFECYCLE, lockout_key(operator), enc(l)?),
                Change::Lockout { operator, lockout: None } => writes.push((T_LIFECYCLE, lockout_key(operator), None)),
            }
        }
        // The record names the events it comes with, and their hashes, so
        // an acknowledged unlock can be matched to its audit record and the
        // event log is covered by the chain.
        if !events.is_empty() {
            if let serde_json::Value::Object(m) = &mut record.detail {
                m.insert("events".into(), serde_json::json!(events.iter().map(|e| e.sequence).collect::<Vec<_>>()));
                m.insert("event_sha256".into(), serde_json::json!(event_hashes));
            }
        }
        record.hash = record.compute_hash();
        let audit_value = enc(&record)?;
        // sled 0.34 writes a value over about 128 KiB as a file under
        // `blobs/` that it never fsyncs: no value may come near that.
        if let Some(n) = std::iter::once(audit_value.len()).chain(writes.iter().filter_map(|(_, _, v)| v.as_ref().map(Vec::len))).find(|n| *n > MAX_VALUE) {
            return Err(Error::InvalidRequest(format!(
                "a stored value would be {n} bytes; pivgate keeps every value under {MAX_VALUE} (sled would write it as a blob file it never makes durable)"
            )));
        }
        let index_key = record.index.to_be_bytes();
        let trees: [&sled::Tree; TREES] = [
            &self.audit,
            &self.events,
            &self.terminals,
            &self.operators,
            &self.cards,
            &self.fascn_index,
            &self.deny,
            &self.agents,
            &self.crl_state,
            &self.lifecycle,
        ];
        trees
            .as_slice()
            .transaction(|t: &Vec<TransactionalTree>| {
                t[T_AUDIT].insert(&index_key, audit_value.as_slice())?;
                for (tree, k, v) in &writes {
                    let tree = t.get(*tree).ok_or_else(|| abort(Error::Corrupt("unknown tree".into())))?;
                    match v {
                        Some(v) => tree.insert(k.as_slice(), v.as_slice())?,
                        None => tree.remove(k.as_slice())?,
                    };
                }
                Ok(())
            })
            .map_err(Error::from)?;
        ledger.next_audit += 1;
        ledger.last_hash = record.hash.clone();
        ledger.next_sequence = seq;
        self.marks.written.store(seq - 1, Ordering::SeqCst);
        Ok(Some((record, events)))
    }

    /// Sends durable events to live watchers.
    pub fn publish(&self, events: &[Event]) {
        for e in events {
            let _ = self.live.send(e.clone());
        }
    }

    /// Subscribes to live events (subscribe before reading stored ones).
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.live.subscribe()
    }

    /// Durable events with sequence greater than `after`, at most `limit`.
    /// Events written but not yet on disk are not shown: after a power cut
    /// their numbers could be given to other events.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>> {
        let durable = self.marks.durable.load(Ordering::SeqCst);
        if after >= durable {
            return Ok(Vec::new());
        }
        let start = after.saturating_add(1).to_be_bytes();
        let end = durable.to_be_bytes();
        self.events.range(start..=end).take(limit).map(|r| dec(&r?.1)).collect()
    }

    /// A consistent cut for a backup: every state tree copied while no
    /// record can be written, with the audit head and event sequence of
    /// that moment. The audit log and events up to there are read after
    /// with [`Store::raw_after`]: they are append-only.
    pub fn backup_cut(&self) -> Result<BackupCut> {
        let ledger = self.ledger.lock().map_err(|_| Error::Transaction("ledger lock poisoned".into()))?;
        let mut state = Vec::new();
        for (name, tree) in self.state_trees() {
            for r in tree.iter() {
                let (k, v) = r?;
                state.push((name, k.to_vec(), v.to_vec()));
            }
        }
        Ok(BackupCut { audit_index: ledger.next_audit - 1, audit_hash: ledger.last_hash.clone(), event_sequence: ledger.next_sequence - 1, state })
    }

    fn state_trees(&self) -> [(&'static str, &sled::Tree); 10] {
        let t = [
            &self.meta,
            &self.operators,
            &self.cards,
            &self.fascn_index,
            &self.deny,
            &self.agents,
            &self.crl_state,
            &self.checkpoints,
            &self.terminals,
            &self.lifecycle,
        ];
        std::array::from_fn(|i| (STATE_TREES[i], t[i]))
    }

    /// Raw entries of the audit log (`audit`) or events (`events`) with
    /// index greater than `after` and at most `upto`, at most `limit`.
    pub fn raw_after(&self, tree: &str, after: u64, upto: u64, limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let t = match tree {
            "audit" => &self.audit,
            "events" => &self.events,
            other => return Err(Error::Corrupt(format!("no append-only tree {other}"))),
        };
        if after >= upto {
            return Ok(Vec::new());
        }
        t.range(after.saturating_add(1).to_be_bytes()..=upto.to_be_bytes())
            .take(limit)
            .map(|r| r.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(Error::from))
            .collect()
    }

    /// Builds a database at `staging` (which must not exist) from a
    /// backup's entries: `read` is given a sink for them. Only the trees a
    /// gateway keeps are accepted; the audit log and events must come in
    /// order. Every file is fsynced before this returns.
    pub fn restore_staged<S>(
        staging: &Path,
        read: impl FnOnce(&mut dyn FnMut(&crate::backup::Header, &str, Vec<u8>, Vec<u8>) -> Result<()>) -> Result<S>,
    ) -> Result<S> {
        if staging.exists() {
            std::fs::remove_dir_all(staging)?;
        }
        let summary = {
            let db = sled::Config::new().path(staging).open()?;
            let mut trees: std::collections::HashMap<String, sled::Tree> = Default::default();
            let mut last: std::collections::HashMap<&'static str, u64> = Default::default();
            let mut sink = |h: &crate::backup::Header, tree: &str, key: Vec<u8>, value: Vec<u8>| -> Result<()> {
                let bad = |why: String| Error::Backup(why);
                if key.len() > 1024 {
                    return Err(bad(format!("a key in {tree} is longer than the gateway writes")));
                }
                if value.len() > MAX_VALUE {
                    return Err(bad(format!("a value in {tree} is longer than the gateway writes")));
                }
                let name: &'static str = if let Some(n) = STATE_TREES.iter().find(|n| **n == tree) {
                    n
                } else if tree == "audit" || tree == "events" {
                    let n = u64::from_be_bytes(key.as_slice().try_into().map_err(|_| bad(format!("a {tree} key is not an index")))?);
                    let (name, upto) = if tree == "audit" { ("audit", h.audit_index) } else { ("events", h.event_sequence) };
                    let prev = last.entry(name).or_insert(0);
                    if n != *prev + 1 || n > upto {
                        return Err(bad(format!("{tree} entry {n} out of order (after {prev}, up to {upto})")));
                    }
                    *prev = n;
                    name
                } else {
                    return Err(bad(format!("unknown tree {tree:?}")));
                };
                let t = match trees.get(name) {
                    Some(t) => t.clone(),
                    None => {
                        let t = db.open_tree(name)?;
                        trees.insert(name.to_string(), t.clone());
                        t
                    }
                };
                t.insert(key, value)?;
                Ok(())
            };
            let summary = read(&mut sink)?;
            db.flush()?;
            summary
        };
        sync_folder(staging)?;
        Ok(summary)
    }

    /// The last event sequence number (0 if none).
    pub fn last_sequence(&self) -> Result<u64> {
        last_key(&self.events)
    }

    /// Audit records with index greater than `after`, at most `limit`.
    pub fn audit_after(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>> {
        let start = after.saturating_add(1).to_be_bytes();
        self.audit.range(start..).take(limit).map(|r| dec(&r?.1)).collect()
    }

    /// Checks the whole audit chain against the stored checkpoints, and
    /// every event against the hash its audit record carries. Returns the
    /// records that chain correctly and the findings (none: intact).
    pub fn verify_audit(&self, pinned_key: Option<&str>) -> Result<(u64, Vec<crate::audit::Finding>)> {
        let checkpoints = self.checkpoints()?;
        let records = self.audit.iter().map(|r| r.map_err(Error::from).and_then(|(_, v)| dec::<AuditRecord>(&v)));
        let (n, mut findings) = crate::audit::verify(records, &checkpoints, pinned_key);
        // Events: each must be the one its record hashed.
        for r in self.audit.iter() {
            let rec: AuditRecord = dec(&r?.1)?;
            let (Some(seqs), Some(hashes)) = (rec.detail.get("events").and_then(|v| v.as_array()), rec.detail.get("event_sha256").and_then(|v| v.as_array()))
            else {
                continue;
            };
            for (seq, h) in seqs.iter().zip(hashes) {
                let stored = seq.as_u64().map(|s| self.events.get(s.to_be_bytes())).transpose()?.flatten();
                let ok = stored.is_some_and(|v| h.as_str() == Some(hex::encode(Sha256::digest(&v)).as_str()));
                if !ok {
                    findings.push(crate::audit::Finding::EventAltered { sequence: seq.as_u64().unwrap_or(0), record: rec.index });
                }
            }
        }
        Ok((n, findings))
    }

    /// The newest record's index and hash (0 and 64 zeros when empty).
    pub fn audit_head(&self) -> Result<(u64, String)> {
        let ledger = self.ledger.lock().map_err(|_| Error::Transaction("ledger lock poisoned".into()))?;
        Ok((ledger.next_audit - 1, ledger.last_hash.clone()))
    }

    /// Keeps a signed checkpoint (durable once [`Store::durable`] returns).
    pub fn put_checkpoint(&self, c: &crate::audit::Checkpoint) -> Result<()> {
        self.checkpoints.insert(c.index.to_be_bytes(), enc(c)?)?;
        Ok(())
    }

    /// The newest signed checkpoint.
    pub fn latest_checkpoint(&self) -> Result<Option<crate::audit::Checkpoint>> {
        self.checkpoints.last()?.map(|(_, v)| dec(&v)).transpose()
    }

    /// Every stored checkpoint, oldest first.
    pub fn checkpoints(&self) -> Result<Vec<crate::audit::Checkpoint>> {
        self.checkpoints.iter().map(|r| dec(&r?.1)).collect()
    }

    /// An operator.
    pub fn operator(&self, id: &str) -> Result<Option<Operator>> {
        self.operators.get(id)?.map(|v| dec(&v)).transpose()
    }

    /// All operators.
    pub fn operators(&self) -> Result<Vec<Operator>> {
        self.operators.iter().map(|r| dec(&r?.1)).collect()
    }

    /// Operators after key `after` (exclusive; empty: from the first), in
    /// key order, with their keys: for paging.
    pub fn operators_after<'a>(&'a self, after: &[u8]) -> impl Iterator<Item = Result<(Vec<u8>, Operator)>> + 'a {
        listing(&self.operators, after)
    }

    /// Cards after key `after`, like [`Store::operators_after`].
    pub fn cards_after<'a>(&'a self, after: &[u8]) -> impl Iterator<Item = Result<(Vec<u8>, Card)>> + 'a {
        listing(&self.cards, after)
    }

    /// Agents after key `after`, like [`Store::operators_after`].
    pub fn agents_after<'a>(&'a self, after: &[u8]) -> impl Iterator<Item = Result<(Vec<u8>, Agent)>> + 'a {
        listing(&self.agents, after)
    }

    /// Terminals after key `after`, like [`Store::operators_after`].
    pub fn terminals_after<'a>(&'a self, after: &[u8]) -> impl Iterator<Item = Result<(Vec<u8>, Terminal)>> + 'a {
        listing(&self.terminals, after)
    }

    /// A card by UUID.
    pub fn card(&self, uuid: &[u8; 16]) -> Result<Option<Card>> {
        self.cards.get(uuid)?.map(|v| dec(&v)).transpose()
    }

    /// The card that holds this key (SHA-256 of its SubjectPublicKeyInfo)
    /// in one of its certificates.
    pub fn card_by_key(&self, key_sha256: &[u8; 32]) -> Result<Option<[u8; 16]>> {
        Ok(self.fascn_index.get(key_index(key_sha256))?.and_then(|v| v.as_ref().try_into().ok()))
    }

    /// The card whose FASC-N this is.
    pub fn card_by_fascn(&self, fascn: &[u8]) -> Result<Option<[u8; 16]>> {
        Ok(self.fascn_index.get(fascn)?.and_then(|v| v.as_ref().try_into().ok()))
    }

    /// All cards.
    pub fn cards(&self) -> Result<Vec<Card>> {
        self.cards.iter().map(|r| dec(&r?.1)).collect()
    }

    /// Whether a deny-list key is present.
    pub fn denied(&self, key: crate::model::DenyKey) -> Result<bool> {
        Ok(self.deny.contains_key(key.stored())?)
    }

    /// The newest thisUpdate (Unix seconds) accepted for a CRL key.
    pub fn crl_watermark(&self, key: &str) -> Result<Option<i64>> {
        Ok(match self.crl_state.get(key)? {
            Some(v) => Some(i64::from_be_bytes(v.as_ref().try_into().map_err(|_| Error::Corrupt("crl_state".into()))?)),
            None => None,
        })
    }

    /// An agent.
    pub fn agent(&self, name: &str) -> Result<Option<Agent>> {
        self.agents.get(name)?.map(|v| dec(&v)).transpose()
    }

    /// All agents.
    pub fn agents(&self) -> Result<Vec<Agent>> {
        self.agents.iter().map(|r| dec(&r?.1)).collect()
    }

    /// A terminal.
    pub fn terminal(&self, id: &str) -> Result<Option<Terminal>> {
        self.terminals.get(id)?.map(|v| dec(&v)).transpose()
    }

    /// All terminals.
    pub fn terminals(&self) -> Result<Vec<Terminal>> {
        self.terminals.iter().map(|r| dec(&r?.1)).collect()
    }

    /// A terminal's enrolment window, open or lapsed.
    pub fn window(&self, terminal: &str) -> Result<Option<crate::model::EnrolmentWindow>> {
        self.lifecycle.get(window_key(terminal))?.map(|v| dec(&v)).transpose()
    }

    /// Every enrolment window, open or lapsed.
    pub fn windows(&self) -> Result<Vec<crate::model::EnrolmentWindow>> {
        self.lifecycle.scan_prefix(b"w/").map(|r| dec(&r?.1)).collect()
    }

    /// An approval request.
    pub fn request(&self, id: &[u8; 16]) -> Result<Option<crate::model::Request>> {
        self.lifecycle.get(request_key(id))?.map(|v| dec(&v)).transpose()
    }

    /// Every approval request, by id.
    pub fn requests(&self) -> Result<Vec<crate::model::Request>> {
        self.lifecycle.scan_prefix(b"r/").map(|r| dec(&r?.1)).collect()
    }

    /// On a new database (no audit record yet), opens the bootstrap pair:
    /// one administrator certificate may be issued without a second
    /// administrator. A database from before has it closed, so an upgrade
    /// never opens it again.
    pub fn open_bootstrap_if_new(&self) -> Result<()> {
        if self.audit_head()?.0 == 0 && self.lifecycle.get(BOOTSTRAP)?.is_none() {
            self.lifecycle.insert(BOOTSTRAP, b"open".as_slice())?;
            self.lifecycle.flush()?;
        }
        Ok(())
    }

    /// Whether the bootstrap pair is still open.
    pub fn bootstrap_open(&self) -> Result<bool> {
        Ok(self.lifecycle.get(BOOTSTRAP)?.is_some_and(|v| v.as_ref() == b"open"))
    }

    /// The administrator certificates issued through the Admin API, by
    /// name (the newest for each name).
    pub fn admins(&self) -> Result<Vec<crate::model::AdminRecord>> {
        self.lifecycle.scan_prefix(b"a/").map(|r| dec(&r?.1)).collect()
    }

    /// A break-glass grant.
    pub fn break_glass(&self, id: &[u8; 16]) -> Result<Option<crate::model::BreakGlass>> {
        self.lifecycle.get(break_glass_key(id))?.map(|v| dec(&v)).transpose()
    }

    /// Every break-glass grant, by id.
    pub fn break_glasses(&self) -> Result<Vec<crate::model::BreakGlass>> {
        self.lifecycle.scan_prefix(b"b/").map(|r| dec(&r?.1)).collect()
    }

    /// The operator's lockout, if locked out.
    pub fn lockout(&self, operator: &str) -> Result<Option<crate::model::Lockout>> {
        self.lifecycle.get(lockout_key(operator))?.map(|v| dec(&v)).transpose()
    }

    /// Every lockout, by operator.
    pub fn lockouts(&self) -> Result<Vec<crate::model::Lockout>> {
        self.lifecycle.scan_prefix(b"l/").map(|r| dec(&r?.1)).collect()
    }

    /// A terminal group.
    pub fn group(&self, id: &str) -> Result<Option<crate::model::TerminalGroup>> {
        self.lifecycle.get(group_key(id))?.map(|v| dec(&v)).transpose()
    }

    /// Every terminal group, by id.
    pub fn groups(&self) -> Result<Vec<crate::model::TerminalGroup>> {
        self.lifecycle.scan_prefix(b"g/").map(|r| dec(&r?.1)).collect()
    }

    /// Flushes and syncs now (shutdown).
    pub fn sync(&self) -> Result<()> {
        self.db.flush()?;
        File::open(self.path.join("db"))?.sync_data()?;
        Ok(())
    }
}

/// Writes `bytes` to `path` so that after a power cut the file holds either
/// its old content or the new one, and its name survives: a temporary file
/// in the same folder, fsynced, renamed over `path`, then the folder
/// fsynced. The file is readable by its owner alone.
pub fn write_file_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().ok_or_else(|| Error::Config(format!("{}: no parent folder", path.display())))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Readable by the gateway's user alone (keys, cached CRLs).
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

// The trees one record writes, by their place in the transaction.
const T_AUDIT: usize = 0;
const T_EVENTS: usize = 1;
const T_TERMINALS: usize = 2;
const T_OPERATORS: usize = 3;
const T_CARDS: usize = 4;
const T_FASCN: usize = 5;
const T_DENY: usize = 6;
const T_AGENTS: usize = 7;
const T_CRL_STATE: usize = 8;
const T_LIFECYCLE: usize = 9;
const TREES: usize = 10;

fn window_key(terminal: &str) -> Vec<u8> {
    [b"w/".as_slice(), terminal.as_bytes()].concat()
}

fn group_key(id: &str) -> Vec<u8> {
    [b"g/".as_slice(), id.as_bytes()].concat()
}

/// Whether the bootstrap pair is still open ("open") or spent. A database
/// made before this key existed has none: closed.
const BOOTSTRAP: &[u8] = b"m/bootstrap";

fn break_glass_key(id: &[u8; 16]) -> Vec<u8> {
    [b"b/".as_slice(), id].concat()
}

fn lockout_key(operator: &str) -> Vec<u8> {
    [b"l/".as_slice(), operator.as_bytes()].concat()
}

fn admin_key(name: &str) -> Vec<u8> {
    [b"a/".as_slice(), name.as_bytes()].concat()
}

fn request_key(id: &[u8; 16]) -> Vec<u8> {
    [b"r/".as_slice(), id].concat()
}

fn set_sequence(s: &mut Session, seq: u64) {
    match s {
        Session::Locked { sequence, .. } | Session::Unlocked { sequence, .. } => *sequence = seq,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_that_would_become_a_sled_blob_is_refused() {
        let dir = std::env::temp_dir().join(format!("pivgate-store-blob-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let op = |name: String| Operator { id: "op-1".into(), name, roles: vec![], enabled: true };
        let entry =
            || AuditEntry { kind: crate::model::AuditKind::AddOperator, actor: "admin:test".into(), terminal_id: String::new(), detail: serde_json::json!({}) };
        store.record(entry(), vec![Change::Operator(op("a".repeat(1000)))], 0).unwrap();
        let e = store.record(entry(), vec![Change::Operator(op("a".repeat(MAX_VALUE)))], 0).unwrap_err();
        assert!(e.to_string().contains("blob"), "{e}");
        // Nothing of the refused change was kept, and no blob file exists.
        assert_eq!(store.operator("op-1").unwrap().unwrap().name.len(), 1000);
        assert_eq!(store.audit_head().unwrap().0, 1);
        assert_eq!(store.blob_files(), 0);
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_bootstrap_pair_is_open_on_a_new_database_only_never_on_one_upgraded() {
        let dir = std::env::temp_dir().join(format!("pivgate-store-bootstrap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let entry = || AuditEntry {
            kind: crate::model::AuditKind::IssueCertificate,
            actor: "admin:admin".into(),
            terminal_id: String::new(),
            detail: serde_json::json!({}),
        };
        {
            let store = Store::open(&dir.join("new")).unwrap();
            store.open_bootstrap_if_new().unwrap();
            assert!(store.bootstrap_open().unwrap());
            // Spent once: closed, across a restart too.
            store.record(entry(), vec![Change::BootstrapSpent], 0).unwrap();
            assert!(!store.bootstrap_open().unwrap());
        }
        let store = Store::open(&dir.join("new")).unwrap();
        store.open_bootstrap_if_new().unwrap();
        assert!(!store.bootstrap_open().unwrap(), "a restart opened the bootstrap again");
        // A database from before the bootstrap key (administrator
        // certificates issued, no record of them): closed.
        let old = Store::open(&dir.join("old")).unwrap();
        old.record(entry(), vec![], 0).unwrap();
        old.open_bootstrap_if_new().unwrap();
        assert!(!old.bootstrap_open().unwrap(), "an upgrade opened the bootstrap");
        drop((store, old));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_disk_that_refuses_a_write_is_told_to_every_waiter_and_stops_the_gateway() {
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        // The second flush fails.
        let sync: Sync = Box::new(move || if c.fetch_add(1, Ordering::SeqCst) == 1 { Err("EIO".into()) } else { Ok(()) });
        let marks = Arc::new(Watermarks::default());
        let (fatal_tx, fatal) = tokio::sync::watch::channel(None);
        let committer = Committer::start_with(sync, marks.clone(), fatal_tx).unwrap();
        let wait = |written: u64| {
            marks.written.store(written, Ordering::SeqCst);
            let (tx, rx) = oneshot::channel();
            committer.tx.lock().unwrap().send(tx).unwrap();
            rx.blocking_recv().unwrap()
        };
        assert_eq!(wait(1), Ok(()));
        assert_eq!(marks.durable.load(Ordering::SeqCst), 1);
        assert_eq!(wait(2), Err("EIO".to_string()));
        // Nothing after it is promised either, and no flush is tried.
        assert_eq!(wait(3), Err("EIO".to_string()));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(marks.durable.load(Ordering::SeqCst), 1);
        assert_eq!(fatal.borrow().as_deref(), Some("EIO"));
    }
}
