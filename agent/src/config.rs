//! The agent's configuration: a TOML file, validated at start with errors
//! that name the field.
//!
//! ```toml
//! [gateway]
//! address = "gateway.site.example:7443"
//! server_name = "gateway.site.example"
//! ca = "/etc/pivgate/service-ca.pem"
//! certificate = "/etc/pivgate/agent.pem"
//! key = "/etc/pivgate/agent-key.pem"
//!
//! [pin]
//! idle_timeout_s = 10
//! total_timeout_s = 30
//!
//! [[terminal]]
//! id = "dispatch-03"
//! reader = "Identiv uTrust 3700 F*"      # exact name, or a prefix ending in *
//! keypad = { kind = "matrix", rows = [5, 6, 13, 19], cols = [12, 16, 20], layout = "3x4" }
//! indicator = { kind = "gpio", green = 17, red = 27, buzzer = 22 }
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the gateway is and how to prove who we are.
    pub gateway: GatewayConfig,
    /// PIN entry limits.
    #[serde(default)]
    pub pin: PinConfig,
    /// The terminals this agent serves.
    #[serde(rename = "terminal")]
    pub terminals: Vec<TerminalConfig>,
}

/// The gateway connection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// host:port.
    pub address: String,
    /// Name in the gateway's server certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The site's service CA (PEM).
    pub ca: PathBuf,
    /// This agent's certificate (PEM).
    pub certificate: PathBuf,
    /// This agent's key (PEM).
    pub key: PathBuf,
    /// Time limit for one gateway call, seconds.
    #[serde(default = "default_call_timeout")]
    pub call_timeout_s: u64,
    /// How far the time in a gateway's challenge may be from this agent's
    /// clock, seconds. The card signs nothing dated further off: run NTP
    /// (a Pi has no clock battery).
    #[serde(default = "default_max_clock_skew")]
    pub max_clock_skew_s: u64,
}

fn default_max_clock_skew() -> u64 {
    300
}

fn default_server_name() -> String {
    "localhost".into()
}

fn default_call_timeout() -> u64 {
    5
}

/// PIN entry limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PinConfig {
    /// Longest wait between two keys, seconds.
    pub idle_timeout_s: u64,
    /// Longest a whole PIN entry may take, seconds.
    pub total_timeout_s: u64,
}

impl Default for PinConfig {
    fn default() -> Self {
        PinConfig { idle_timeout_s: 10, total_timeout_s: 30 }
    }
}

/// One terminal.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TerminalConfig {
    /// The terminal's identifier at the gateway.
    pub id: String,
    /// The reader: its exact PC/SC name, or a prefix followed by `*`.
    pub reader: String,
    /// Where the PIN comes from.
    pub keypad: KeypadConfig,
    /// LEDs and buzzer.
    #[serde(default)]
    pub indicator: IndicatorConfig,
    /// Ask the gateway for card-only (9E) taps: for terminals without a
    /// keypad. The gateway still decides.
    #[serde(default)]
    pub card_only: bool,
}

impl TerminalConfig {
    /// Whether `name` is this terminal's reader.
    pub fn matches_reader(&self, name: &str) -> bool {
        match self.reader.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == self.reader,
        }
    }
}

/// Keypads.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum KeypadConfig {
    /// A matrix keypad on GPIO (BCM pin numbers).
    Matrix {
        /// Row pins (outputs), 4.
        rows: Vec<u8>,
        /// Column pins (inputs with pull-ups), 3 or 4.
        cols: Vec<u8>,
        /// "3x4" or "4x4".
        #[serde(default = "default_layout")]
        layout: String,
    },
    /// A Wiegand keypad on GPIO.
    Wiegand {
        /// D0 pin.
        d0: u8,
        /// D1 pin.
        d1: u8,
    },
    /// The reader's own PIN pad (secure PIN entry).
    Pinpad,
    /// Lines typed on the agent's standard input (demos).
    Terminal,
    /// Keys injected by the program that runs the agent (tests).
    Simulated,
    /// No keypad: the terminal is card-only.
    None,
}

fn default_layout() -> String {
    "3x4".into()
}

/// Indicators.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum IndicatorConfig {
    /// Patterns written to the log (and standard output).
    #[default]
    Log,
    /// LEDs and a buzzer on GPIO (BCM pin numbers).
    Gpio {
        /// Green LED.
        green: u8,
        /// Red LED.
        red: u8,
        /// Buzzer.
        buzzer: u8,
    },
}

/// A configuration error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        let c: Config = toml::from_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.terminals.is_empty() {
            return Err(ConfigError("no [[terminal]]: the agent would serve nothing".into()));
        }
        for (i, t) in self.terminals.iter().enumerate() {
            if t.id.is_empty() || t.reader.is_empty() {
                return Err(ConfigError(format!("terminal[{i}]: id and reader must be set")));
            }
            if self.terminals[..i].iter().any(|o| o.id == t.id) {
                return Err(ConfigError(format!("terminal[{i}]: id {:?} appears twice", t.id)));
            }
            if let KeypadConfig::Matrix { rows, cols, layout } = &t.keypad {
                let ok = rows.len() == 4 && matches!((layout.as_str(), cols.len()), ("3x4", 3) | ("4x4", 4));
                if !ok {
                    return Err(ConfigError(format!(
                        "terminal[{i}].keypad: a {layout} matrix needs 4 rows and {} columns",
                        if layout == "4x4" { 4 } else { 3 }
                    )));
                }
            }
        }
        if !(1..=120).contains(&self.pin.idle_timeout_s) || !(self.pin.idle_timeout_s..=300).contains(&self.pin.total_timeout_s) {
            return Err(ConfigError("pin: idle_timeout_s 1 to 120, total_timeout_s at least that and at most 300".into()));
        }
        for p in [&self.gateway.ca, &self.gateway.certificate, &self.gateway.key] {
            if !p.exists() {
                return Err(ConfigError(format!("gateway: {} does not exist", p.display())));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses_and_errors_name_the_field() {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml")).unwrap();
        let c: Config = toml::from_str(&text).unwrap();
        assert_eq!(c.terminals.len(), 2);
        assert!(matches!(c.terminals[1].keypad, KeypadConfig::Pinpad));
        assert!(c.terminals[0].matches_reader("Identiv uTrust 3700 F CL Reader [CCID Interface] 00 00"));
        assert!(!c.terminals[0].matches_reader("Other Reader 00 00"));
        // Validation fails on the missing certificate files, naming them.
        assert!(c.validate().unwrap_err().to_string().contains("/etc/pivgate/service-ca.pem"));
        let bad = text.replace("layout = \"3x4\"", "layout = \"4x4\"");
        let c: Config = toml::from_str(&bad).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("terminal[0].keypad"));
        assert!(toml::from_str::<Config>(&text.replace("idle_timeout_s", "idle_timout_s")).unwrap_err().to_string().contains("idle_timout_s"));
    }
}
