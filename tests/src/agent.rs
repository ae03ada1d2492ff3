//! A real agent in a test: the agent's own code with its own reader
//! monitor through the rig's pcscd, keys typed by the test and indicators
//! the test reads.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use pivgate_agent::config::{Config, GatewayConfig, IndicatorConfig, KeypadConfig, PinConfig, TerminalConfig};
use pivgate_agent::terminal::{PinSource, TapResult};
use pivgate_hw::indicator::{Pattern, SimulatedIndicator};
use pivgate_hw::keypad::sim::{simulated, KeySender};
use pivgate_proto::v1 as pb;

use crate::site::{scratch, write_credentials, Site};

/// Fails unless `r` is an unlock for `operator`.
#[track_caller]
pub fn assert_granted(r: TapResult, operator: &str) {
    match r {
        TapResult::Granted(g) if g.operator_id == operator => {}
        r => panic!("expected an unlock for {operator}, got {r:?}"),
    }
}

/// One terminal for the agent: id, reader name, and whether it has a keypad.
pub struct TerminalSpec<'a> {
    /// Terminal id.
    pub id: &'a str,
    /// Reader name.
    pub reader: &'a str,
    /// A keypad (false: card-only).
    pub keypad: bool,
}

/// The running agent.
pub struct AgentUnderTest {
    keys: HashMap<String, KeySender>,
    indicators: HashMap<String, SimulatedIndicator>,
    results: Receiver<(String, TapResult)>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::result::Result<(), pivgate_agent::Error>>>,
}

/// Writes the agent's credentials and starts it against `site`.
pub async fn start_agent(site: &Site, name: &str, terminals: &[TerminalSpec<'_>]) -> Result<AgentUnderTest> {
    start_agent_at(site, &site.addr.clone(), name, terminals).await
}

/// Like [`start_agent`], with credentials from `site` but talking to the
/// gateway (or impostor) at `addr`.
pub async fn start_agent_at(site: &Site, addr: &str, name: &str, terminals: &[TerminalSpec<'_>]) -> Result<AgentUnderTest> {
    let creds = site.issue(pb::ServiceRole::Agent, name).await?;
    site.admin_client().await?.bind_agent(name, &terminals.iter().map(|t| t.id).collect::<Vec<_>>()).await?;
    let files = write_credentials(&creds, &scratch("agent"))?;
    let config = Config {
        gateway: GatewayConfig {
            address: addr.to_string(),
            server_name: "localhost".into(),
            ca: files.ca,
            certificate: files.cert,
            key: files.key,
            call_timeout_s: 3,
            max_clock_skew_s: 300,
        },
        pin: PinConfig { idle_timeout_s: 10, total_timeout_s: 30 },
        terminals: terminals
            .iter()
            .map(|t| TerminalConfig {
                id: t.id.into(),
                reader: t.reader.into(),
                keypad: if t.keypad { KeypadConfig::Simulated } else { KeypadConfig::None },
                indicator: IndicatorConfig::Log,
                card_only: !t.keypad,
            })
            .collect(),
    };
    config.validate()?;
    let mut io = pivgate_agent::Io::default();
    let mut keys = HashMap::new();
    let mut indicators = HashMap::new();
    for t in terminals {
        if t.keypad {
            let (tx, kp) = simulated();
            keys.insert(t.id.to_string(), tx);
            io.pins.insert(t.id.to_string(), PinSource::Keys(Box::new(kp)));
        }
        let ind = SimulatedIndicator::default();
        indicators.insert(t.id.to_string(), ind.clone());
        io.indicators.insert(t.id.to_string(), Box::new(ind));
    }
    let (rtx, results) = channel();
    let rtx = std::sync::Mutex::new(rtx);
    io.on_result = Some(Arc::new(move |t: &str, r: &TapResult| {
        if let Ok(tx) = rtx.lock() {
            let _ = tx.send((t.to_string(), r.clone()));
        }
    }));
    let (stx, srx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(pivgate_agent::run(config, io, async {
        let _ = srx.await;
    }));
    Ok(AgentUnderTest { keys, indicators, results, shutdown: Some(stx), task: Some(task) })
}

impl AgentUnderTest {
    /// Waits for the terminal's indicator to show `p` (after `since`
    /// patterns), returns the history length after it.
    pub async fn wait_pattern(&self, terminal: &str, p: Pattern, since: usize, timeout: Duration) -> Result<usize> {
        let ind = &self.indicators[terminal];
        let deadline = Instant::now() + timeout;
        loop {
            let h = ind.history();
            if let Some(i) = h.iter().skip(since).position(|x| *x == p) {
                return Ok(since + i + 1);
            }
            if Instant::now() > deadline {
                bail!("{terminal} never showed {p:?}; history {:?}", &h[since.min(h.len())..]);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the terminal's indicator has shown.
    pub fn history(&self, terminal: &str) -> Vec<Pattern> {
        self.indicators[terminal].history()
    }

    /// Types on the terminal's keypad.
    pub fn type_keys(&self, terminal: &str, legends: &str) {
        self.keys[terminal].type_legends(legends);
    }

    /// The next tap result of `terminal`.
    pub async fn next_result(&self, terminal: &str, timeout: Duration) -> Result<TapResult> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.results.try_recv() {
                Ok((t, r)) if t == terminal => return Ok(r),
                Ok(_) => continue,
                Err(_) if Instant::now() > deadline => bail!("no tap result for {terminal} within {timeout:?}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Stops the agent.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await??;
        }
        Ok(())
    }
}

impl Drop for AgentUnderTest {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}
