//! The pivgate agent: watches the terminals' readers, reads PIV cards, takes
//! the PIN from the keypad to the card, has the card sign the gateway's
//! challenge and drives the indicators.
//!
//! - [`tap`]: the badge tap as one flow, generic over the card transport,
//!   the gateway, the PIN's way, the indicators and the clock; the tests,
//!   the demo and the benchmarks drive the same flow.
//! - [`terminal`]: one worker thread per terminal, the thin PC/SC shell
//!   around the flow.
//! - [`link`]: the gateway link (mutual TLS, presence stream, reconnects)
//!   and [`link::Calls`], the gRPC side of the flow's gateway.
//! - [`challenge`]: what the agent lets a card sign.
//! - [`keys`]: key sources; [`config`]: the TOML file.
//!
//! Threads: the reader monitor (hw), one worker per terminal (PC/SC and
//! GPIO block), and a tokio runtime for gRPC. Nothing polls while no card is
//! present: the monitor sleeps in pcscd and the workers in their channels.
//!
//! The agent never decides who may unlock anything: it relays between the
//! card and the gateway. The PIN goes from the keypad to the card and
//! nowhere else; no type that can hold it reaches a gRPC message.
#![forbid(unsafe_code)]

pub mod challenge;
pub mod config;
pub mod keys;
pub mod link;
pub mod memory;
pub mod tap;
pub mod terminal;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use pivgate_hw::indicator::{Indicator, Pattern};
use pivgate_hw::keypad::entry::EntryRules;
use pivgate_hw::pcsc::{Monitor, ReaderEvent};

use crate::config::Config;
use crate::terminal::{Input, PinSource, SharedIndicator, Worker};

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// The card or reader failed.
    #[error("card: {0}")]
    Card(#[from] pivgate_hw::Error),
    /// The gateway could not be reached (network, TLS, timeout).
    #[error("gateway unreachable: {0}")]
    GatewayUnreachable(String),
    /// The gateway refused the call itself (not a denial).
    #[error("gateway: {0}")]
    Gateway(String),
    /// A thread could not be started.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Per-terminal overrides for the parts a test or a demo provides itself.
#[derive(Default)]
pub struct Io {
    /// PIN sources by terminal id (otherwise from the configuration).
    pub pins: HashMap<String, PinSource>,
    /// Indicators by terminal id (otherwise from the configuration).
    pub indicators: HashMap<String, Box<dyn Indicator>>,
    /// Called with every tap's result.
    pub on_result: Option<terminal::OnResult>,
}

/// Writes patterns to the log.
pub struct LogIndicator(pub String);

impl Indicator for LogIndicator {
    fn show(&mut self, p: Pattern) {
        tracing::info!(terminal = %self.0, pattern = ?p, "indicator");
    }
}

fn pin_source(t: &config::TerminalConfig) -> Result<PinSource, Error> {
    use config::KeypadConfig as K;
    Ok(match &t.keypad {
        K::Pinpad => PinSource::Pinpad,
        K::None => PinSource::Keys(Box::new(keys::NoKeys)),
        K::Simulated => return Err(Error::Config(format!("terminal {}: a simulated keypad needs keys from the program running the agent", t.id))),
        K::Terminal => {
            let (tx, kp) = pivgate_hw::keypad::sim::simulated();
            std::thread::Builder::new().name("stdin keys".into()).spawn(move || {
                pivgate_hw::keypad::sim::feed_terminal(&tx);
            })?;
            PinSource::Keys(Box::new(kp))
        }
        #[cfg(feature = "gpio")]
        K::Matrix { rows, cols, layout } => {
            let rows: [u8; 4] = rows.as_slice().try_into().map_err(|_| Error::Config("matrix: 4 rows".into()))?;
            if layout == "4x4" {
                let cols: [u8; 4] = cols.as_slice().try_into().map_err(|_| Error::Config("matrix: 4 columns".into()))?;
                PinSource::Keys(Box::new(keys::MatrixKeys(pivgate_hw::gpio::matrix_4x4(rows, cols, 4)?)))
            } else {
                let cols: [u8; 3] = cols.as_slice().try_into().map_err(|_| Error::Config("matrix: 3 columns".into()))?;
                PinSource::Keys(Box::new(keys::MatrixKeys(pivgate_hw::gpio::matrix_3x4(rows, cols, 4)?)))
            }
        }
        #[cfg(feature = "gpio")]
        K::Wiegand { d0, d1 } => PinSource::Keys(Box::new(pivgate_hw::gpio::WiegandKeypad::open(*d0, *d1)?)),
        #[cfg(not(feature = "gpio"))]
        K::Matrix { .. } | K::Wiegand { .. } => return Err(Error::Config("this agent was built without GPIO support".into())),
    })
}

fn indicator(t: &config::TerminalConfig) -> Result<Box<dyn Indicator>, Error> {
    match &t.indicator {
        config::IndicatorConfig::Log => Ok(Box::new(LogIndicator(t.id.clone()))),
        #[cfg(feature = "gpio")]
        config::IndicatorConfig::Gpio { green, red, buzzer } => Ok(Box::new(pivgate_hw::gpio::GpioIndicator::open(*green, *red, *buzzer)?)),
        #[cfg(not(feature = "gpio"))]
        config::IndicatorConfig::Gpio { .. } => Err(Error::Config("this agent was built without GPIO support".into())),
    }
}

/// Runs the agent until `shutdown` completes.
pub async fn run(config: Config, mut io: Io, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let ids: Vec<String> = config.terminals.iter().map(|t| t.id.clone()).collect();
    let link = link::Link::new(&config.gateway, &ids)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let presence = tokio::spawn(link.clone().presence_loop(stop_rx));
    // One memory of cards for all terminals: a card met at one is known at
    // the next.
    let memory = Arc::new(memory::CardMemory::new());
    let rules = EntryRules { idle_timeout: Duration::from_secs(config.pin.idle_timeout_s), total_timeout: Duration::from_secs(config.pin.total_timeout_s) };

    // One worker per terminal.
    let mut senders: Vec<(config::TerminalConfig, mpsc::Sender<Input>, SharedIndicator)> = Vec::new();
    let mut threads = Vec::new();
    for t in &config.terminals {
        let pin = match io.pins.remove(&t.id) {
            Some(p) => p,
            None => pin_source(t)?,
        };
        let ind: SharedIndicator = Arc::new(Mutex::new(match io.indicators.remove(&t.id) {
            Some(i) => i,
            None => indicator(t)?,
        }));
        let (tx, rx) = mpsc::channel();
        let on_result = io.on_result.clone();
        let card_only = t.card_only || matches!(t.keypad, config::KeypadConfig::None);
        // The gateway asks no step-up of a terminal that cannot take a PIN.
        link.report(&t.id, |r| r.no_pin_entry = card_only);
        let worker = Worker {
            memory: memory.clone(),
            terminal: t.id.clone(),
            card_only,
            link: link.clone(),
            rt: tokio::runtime::Handle::current(),
            pin,
            indicator: ind.clone(),
            inputs: rx,
            rules,
            on_result,
        };
        threads.push(std::thread::Builder::new().name(format!("terminal {}", t.id)).spawn(move || worker.run())?);
        senders.push((t.clone(), tx, ind));
    }

    // Reader events to the terminal whose reader it is.
    let routes: Vec<(config::TerminalConfig, mpsc::Sender<Input>)> = senders.iter().map(|(c, tx, _)| (c.clone(), tx.clone())).collect();
    let monitor = Monitor::spawn(move |ev| {
        let reader = match &ev {
            ReaderEvent::CardInserted { reader, .. }
            | ReaderEvent::CardRemoved { reader }
            | ReaderEvent::ReaderAdded { reader }
            | ReaderEvent::ReaderRemoved { reader } => Some(reader.clone()),
            ReaderEvent::ServiceLost | ReaderEvent::ServiceRestored => None,
        };
        for (cfg, tx) in &routes {
            if reader.as_deref().is_none_or(|r| cfg.matches_reader(r)) {
                let _ = tx.send(Input::Reader(ev.clone()));
            }
        }
    })?;

    // Gateway pushes and link changes to the terminals.
    let mut locks = link.locks();
    let mut step_ups = link.step_ups();
    let mut changes = link.link_changes();
    let lock_routes: Vec<(String, mpsc::Sender<Input>, SharedIndicator)> = senders.iter().map(|(c, tx, i)| (c.id.clone(), tx.clone(), i.clone())).collect();
    let pusher = tokio::spawn(async move {
        loop {
            tokio::select! {
                l = locks.recv() => match l {
                    Ok(t) => {
                        for (id, tx, _) in &lock_routes {
                            if *id == t {
                                let _ = tx.send(Input::Locked);
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                },
                s = step_ups.recv() => match s {
                    Ok(s) => {
                        for (id, tx, _) in &lock_routes {
                            if *id == s.terminal {
                                let _ = tx.send(Input::StepUp { id: s.id, action: s.action.clone(), until: std::time::Instant::now() + s.expires_in });
                            }
                        }
                    }
                    // Missed ones come again with the next heartbeat.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                },
                c = changes.recv() => match c {
                    Ok(up) => {
                        for (_, _, ind) in &lock_routes {
                            if let Ok(mut i) = ind.lock() {
                                i.show(if up { Pattern::Idle } else { Pattern::GatewayUnreachable });
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return,
                },
            }
        }
    });

    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let watchdog = watchdog_task();
    tracing::info!(terminals = ?ids, "pivgate agent running");
    shutdown.await;
    tracing::info!("agent stopping");
    let _ = stop_tx.send(true);
    monitor.stop();
    drop(senders);
    pusher.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    let _ = presence.await;
    for t in threads {
        // A worker in the middle of a tap finishes it first (bounded by the
        // PIN entry and card time limits).
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    Ok(())
}

/// Pings systemd's watchdog at half its interval, if one is set.
fn watchdog_task() -> Option<tokio::task::JoinHandle<()>> {
    let mut usec = 0;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let every = Duration::from_micros(usec / 2);
    Some(tokio::spawn(async move {
        loop {
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            tokio::time::sleep(every).await;
        }
    }))
}
