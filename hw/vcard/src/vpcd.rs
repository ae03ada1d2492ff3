//! Puts a [`VirtualCard`] into a real pcscd reader through vsmartcard's
//! vpcd driver.
//!
//! vpcd listens on a TCP port per reader slot (Debian's default: 35963 for
//! "Virtual PCD 00 00", 35964 for "Virtual PCD 00 01"). A card connects as a
//! client: connected means inserted, disconnected means removed. Every
//! message is a 2-byte big-endian length and a payload; a 1-byte payload is
//! a control code (0 power off, 1 power on, 2 reset, 4 send ATR), anything
//! longer is a command APDU to answer with a response APDU.
//!
//! vpcd writes the length and the payload separately; with Nagle and
//! delayed ACKs on both ends every APDU would wait about 40 ms, so the card's
//! socket sets TCP_NODELAY and re-arms TCP_QUICKACK after each read.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::VirtualCard;

/// Largest message vpcd sends: an extended APDU.
const MAX_MESSAGE: usize = 65536 + 16;

/// Why a vpcd session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// vpcd closed the connection (pcscd stopped or unloaded the reader).
    ClosedByReader,
    /// The card was removed by its owner.
    Removed,
    /// A [`super::Fault::DropAt`] pulled the card mid-exchange.
    Dropped,
}

/// Connects to the vpcd reader at `addr`, retrying until `patience` runs
/// out (pcscd may still be loading the driver).
pub fn connect(addr: SocketAddr, patience: Duration) -> io::Result<TcpStream> {
    let start = Instant::now();
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) if start.elapsed() >= patience => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// What happened during one session in the reader (for benchmarks).
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionStats {
    /// When the first command APDU arrived.
    pub first_apdu: Option<Instant>,
    /// When the last response left.
    pub last_response: Option<Instant>,
    /// Command APDUs answered.
    pub apdus: usize,
    /// The card time the latency model added.
    pub modelled: Duration,
}

/// Serves `card` over an established vpcd connection until it ends.
pub fn serve(card: &mut VirtualCard, stream: TcpStream, removed: &AtomicBool) -> io::Result<Ended> {
    serve_with_stats(card, stream, removed, &std::sync::Mutex::new(SessionStats::default()))
}

/// [`serve`], recording [`SessionStats`].
pub fn serve_with_stats(card: &mut VirtualCard, mut stream: TcpStream, removed: &AtomicBool, stats: &std::sync::Mutex<SessionStats>) -> io::Result<Ended> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let mut len = [0u8; 2];
        // Quick ACKs must be armed before vpcd's two writes arrive (the
        // kernel clears the flag as it goes), or its Nagle waits for our
        // delayed ACK between length and payload.
        let _ = socket2::SockRef::from(&stream).set_tcp_quickack(true);
        match stream.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if removed.load(Ordering::SeqCst) => {
                let _ = e;
                return Ok(Ended::Removed);
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Ended::ClosedByReader),
            Err(e) => return Err(e),
        }
        let n = usize::from(u16::from_be_bytes(len));
        if n > buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "vpcd message too long"));
        }
        stream.read_exact(&mut buf[..n])?;
        let _ = socket2::SockRef::from(&stream).set_tcp_quickack(true);
        let reply: Vec<u8> = match &buf[..n] {
            [] => continue,
            [0] | [1] => {
                card.reset();
                continue;
            }
            [2] => {
                card.warm_reset();
                continue;
            }
            [4] => card.atr().to_vec(),
            [_] => continue,
            apdu => {
                if let Ok(mut st) = stats.lock() {
                    st.first_apdu.get_or_insert_with(Instant::now);
                }
                let answer = card.process(apdu);
                // Each exchange at trace level (RUST_LOG=pivgate_vcard=trace):
                // the test rig's own `pcscd -a`.
                // PINs, PUKs and management keys are shown as their header
                // only, even in a test card's trace.
                let secret = matches!(apdu.get(1), Some(0x20 | 0x24 | 0x2C | 0xFF)) || (apdu.get(1) == Some(&0x87) && apdu.get(3) == Some(&0x9B));
                let shown = if secret { &apdu[..apdu.len().min(4)] } else { apdu };
                tracing::trace!(command = %hex::encode(shown), response = %hex::encode(&answer.response), "APDU");
                if answer.disconnect {
                    let _ = stream.shutdown(Shutdown::Both);
                    return Ok(Ended::Dropped);
                }
                if !answer.delay.is_zero() {
                    std::thread::sleep(answer.delay);
                }
                if let Ok(mut st) = stats.lock() {
                    st.apdus += 1;
                    st.modelled += answer.delay;
                }
                answer.response
            }
        };
        let mut msg = Vec::with_capacity(reply.len() + 2);
        msg.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        msg.extend_from_slice(&reply);
        stream.write_all(&msg)?;
        if let Ok(mut st) = stats.lock() {
            st.last_response = Some(Instant::now());
        }
    }
}

/// A card sitting in a vpcd reader, served on its own thread.
pub struct Inserted {
    stream: TcpStream,
    removed: Arc<AtomicBool>,
    stats: Arc<std::sync::Mutex<SessionStats>>,
    thread: JoinHandle<(VirtualCard, io::Result<Ended>)>,
}

/// Inserts `card` into the vpcd reader at `addr`.
pub fn insert(mut card: VirtualCard, addr: SocketAddr) -> io::Result<Inserted> {
    let stream = connect(addr, Duration::from_secs(10))?;
    let removed = Arc::new(AtomicBool::new(false));
    let theirs = stream.try_clone()?;
    let flag = removed.clone();
    let stats = Arc::new(std::sync::Mutex::new(SessionStats::default()));
    let st = stats.clone();
    let thread = std::thread::Builder::new().name(format!("vcard {addr}")).spawn(move || {
        let r = serve_with_stats(&mut card, theirs, &flag, &st);
        (card, r)
    })?;
    Ok(Inserted { stream, removed, stats, thread })
}

impl Inserted {
    /// Whether the card is still being served (vpcd has not closed and no
    /// fault pulled it).
    pub fn is_inserted(&self) -> bool {
        !self.thread.is_finished()
    }

    /// What the session has seen so far.
    pub fn stats(&self) -> SessionStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// Pulls the card out of the reader and hands it back with its state
    /// (retry counters, keys) as it was.
    pub fn remove(self) -> VirtualCard {
        self.removed.store(true, Ordering::SeqCst);
        let _ = self.stream.shutdown(Shutdown::Both);
        match self.thread.join() {
            Ok((card, ended)) => {
                tracing::debug!(?ended, "virtual card removed");
                card
            }
            // The serving thread does not panic on any input; if it did,
            // there is no card to hand back.
            Err(_) => std::panic::resume_unwind(Box::new("virtual card thread panicked")),
        }
    }
}
