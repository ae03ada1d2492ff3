//! `pivgatectl`: administer a pivgate gateway.
//!
//! Connects with an administrator certificate (by default the first
//! administrator's, from the gateway's data folder) over mutual TLS.
//!
//! ```text
//! pivgatectl --data-dir DIR operator add op-17 --name "Ana Silva" --role dispatcher
//! pivgatectl --data-dir DIR card enrol --operator op-17 --cert cert-9a.pem
//! pivgatectl --data-dir DIR card enrol --operator op-17 --cert cert-9e.pem --slot 9e --card 8c1f…
//! pivgatectl --data-dir DIR enrolment open --operator op-17 --terminal dispatch-03   # then tap and PIN there
//! pivgatectl --data-dir DIR card replace 3f2a... --cert new-9a.pem --reason "lost"
//! pivgatectl --data-dir DIR request list
//! pivgatectl --data-dir DIR request approve 9c0e... --badge          # the approver's card in a reader
//! pivgatectl --data-dir DIR card issue --operator op-17          # at a workstation with a reader
//! pivgatectl --data-dir DIR card pin-unblock --card 3f2a...
//! pivgatectl --data-dir DIR card retire --card 3f2a...
//! pivgatectl --data-dir DIR agent bind pi-dispatch-03 --terminal dispatch-03
//! pivgatectl --data-dir DIR cert issue --role agent --name pi-dispatch-03 --out-dir ./pi3
//! pivgatectl --data-dir DIR audit export --out audit.jsonl
//! pivgatectl audit verify --file audit.jsonl
//! ```

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use pb::access_service_client::AccessServiceClient;
use pivgate_gateway::audit::{self, Checkpoint};
use pivgate_gateway::client::{connect, Admin, Credentials, Issued};
use pivgate_gateway::model::{Mechanism, Operator, Slot, TerminalPolicy};
use pivgate_gateway::pki::Role;
use pivgate_gateway::store::AuditRecord;
use pivgate_proto::v1 as pb;

/// Administer a pivgate gateway.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Gateway address (host:port).
    #[arg(long, env = "PIVGATE_GATEWAY", default_value = "127.0.0.1:7443")]
    gateway: String,
    /// Name in the gateway's server certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Gateway data folder: use its service CA and first administrator.
    #[arg(long, env = "PIVGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Service CA certificate (PEM), instead of --data-dir.
    #[arg(long, requires_all = ["cert", "key"])]
    ca: Option<PathBuf>,
    /// Administrator certificate (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Administrator key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Operators.
    #[command(subcommand)]
    Operator(OperatorCmd),
    /// Cards.
    #[command(subcommand)]
    Card(CardCmd),
    /// Agents and the terminals they serve.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Terminals.
    #[command(subcommand)]
    Terminal(TerminalCmd),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Service certificates.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Enrolment at a terminal: the operator taps the card and types the
    /// PIN there.
    #[command(subcommand)]
    Enrolment(EnrolmentCmd),
    /// Requests a second administrator must approve.
    #[command(subcommand)]
    Request(RequestCmd),
    /// Terminal groups and their policy.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Break-glass access for an operator who cannot use their card.
    #[command(subcommand, name = "break-glass")]
    BreakGlass(BreakGlassCmd),
    /// Take a consistent backup of the gateway's state and audit log (no
    /// private keys: keep a copy of the data folder's key files apart).
    /// Restore with `pivgate-gateway restore FILE --keys DIR --data-dir NEW`.
    Backup {
        /// Where to write it (written whole or not at all).
        #[arg(long)]
        out: PathBuf,
    },
    /// The exceptions to look at (temporary and expiring cards, suspended
    /// cards, operators without a card, lockouts, privileged cards,
    /// requests waiting, administrators, weaker terminals), each with how
    /// to resolve it: a table, or JSON lines with --json.
    Review {
        #[arg(long)]
        json: bool,
    },
    /// Print lock and unlock events as they happen.
    Watch {
        /// Start after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Only these terminals.
        #[arg(long)]
        terminal: Vec<String>,
    },
}

#[derive(Subcommand)]
enum OperatorCmd {
    /// Add (or replace) an operator.
    Add {
        id: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        role: Vec<String>,
        /// Add disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// List operators.
    List,
    /// Show an operator and their cards.
    Show { id: String },
    /// Lift an operator's lockout (after lifecycle.lockout_after failures
    /// in a row).
    Unlock {
        id: String,
        /// Why, for the audit log.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum SlotArg {
    #[value(name = "9a")]
    A,
    #[value(name = "9e")]
    E,
}

#[derive(Clone, Copy, ValueEnum)]
enum KeyAlgorithmArg {
    P256,
    P384,
    Rsa2048,
}

/// Where the issuance station works: its reader and its folder.
#[derive(clap::Args)]
struct StationArgs {
    /// The reader (default: the first with a card in it).
    #[arg(long)]
    reader: Option<String>,
    /// The site card CA and escrow folder (default: DATA_DIR/card-ca).
    #[arg(long)]
    ca_dir: Option<PathBuf>,
    /// Read PINs from standard input, one per line, instead of the
    /// terminal (scripts and tests).
    #[arg(long)]
    pin_stdin: bool,
    /// The escrow private key, wherever the site keeps it offline
    /// (unblocking and retiring need it; default: CA_DIR/escrow-key.der).
    #[arg(long)]
    escrow_key: Option<PathBuf>,
}

#[derive(Subcommand)]
enum CardCmd {
    /// Issue a blank token (a new YubiKey, a fresh Java Card PIV applet) to
    /// an operator, at this workstation's reader: keys generated on the
    /// card, FIPS 201-shaped certificates from the site card CA (made on
    /// first use, in --ca-dir), a fresh CHUID, a random management key and
    /// PUK escrowed (encrypted, never shown), the PIN the operator types,
    /// and the card enrolled. The gateway must list the card CA under
    /// cards.trust_anchors; that is checked before the card is touched.
    Issue {
        #[arg(long)]
        operator: String,
        #[command(flatten)]
        station: StationArgs,
        #[arg(long, value_enum, default_value = "p256")]
        algorithm: KeyAlgorithmArg,
        /// The site's name, for the card CA made on first use.
        #[arg(long, default_value = "pivgate site")]
        site: String,
        /// Enrol the 9A key with the token's attestation (the gateway must
        /// have cards.attestation_roots).
        #[arg(long)]
        attest: bool,
    },
    /// Change the PIN of the card in the reader (old PIN, then new twice).
    PinChange {
        #[command(flatten)]
        station: StationArgs,
    },
    /// Unblock a blocked PIN with the card's escrowed PUK; the operator
    /// types a new PIN.
    PinUnblock {
        /// The card, as `card list` shows it.
        #[arg(long)]
        card: String,
        #[command(flatten)]
        station: StationArgs,
    },
    /// Retire a card: revoked at the gateway, then wiped with its escrowed
    /// management key (keys and objects gone, factory PIN, PUK and
    /// management key), ready to issue again.
    Retire {
        #[arg(long)]
        card: String,
        #[command(flatten)]
        station: StationArgs,
        #[arg(long, default_value = "retired")]
        reason: String,
    },
    /// Enrol a card from its 9A or 9E certificate (PEM or DER). From a
    /// FIPS 201 issuer the card is the UUID its certificate names; from an
    /// enrolled-key issuer (cards.enrolled_key_anchors) the certificate's
    /// key is the card.
    Enrol {
        #[arg(long)]
        operator: String,
        #[arg(long)]
        cert: PathBuf,
        #[arg(long, value_enum, default_value = "9a")]
        slot: SlotArg,
        /// Enrolled-key cards: the card (as `card list` shows it) whose
        /// other slot this key is for. Without it a new key is a new card.
        #[arg(long)]
        card: Option<String>,
        /// The key's attestation, PEM or DER (`yubico-piv-tool -a attest
        /// -s 9a`): proves the key was generated on the token, with its PIN
        /// policy. Needs --attestation-intermediate.
        #[arg(long, requires = "attestation_intermediate")]
        attestation: Option<PathBuf>,
        /// The token's attestation certificate, PEM or DER
        /// (`yubico-piv-tool -a read-certificate -s f9`).
        #[arg(long, requires = "attestation")]
        attestation_intermediate: Option<PathBuf>,
        /// A temporary card (a visitor, a forgotten badge): refused this
        /// many days from now (at most cards.max_temporary_days).
        #[arg(long, default_value_t = 0)]
        temporary_days: u32,
    },
    /// Replace a card (lost, broken) with a new one for the same operator:
    /// the new one enrolled and the old one revoked in one step.
    Replace {
        /// The card replaced, as `card list` shows it.
        old: String,
        /// The new card's 9A or 9E certificate (PEM or DER).
        #[arg(long)]
        cert: PathBuf,
        #[arg(long, value_enum, default_value = "9a")]
        slot: SlotArg,
        #[arg(long, default_value_t = 0)]
        temporary_days: u32,
        #[arg(long, default_value = "replaced")]
        reason: String,
    },
    /// List enrolled cards (tab-separated: card id, operator, certificate
    /// SHA-256, state, identity rule).
    List {
        /// Only this operator's cards.
        #[arg(long)]
        operator: Option<String>,
    },
    /// Suspend a card at once (found again later, on leave): terminals it
    /// holds lock, and it is refused until resumed.
    Suspend {
        uuid: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// End a card's suspension.
    Resume {
        uuid: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Revoke a card at once (lost, stolen, left the company).
    Revoke {
        uuid: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Subcommand)]
enum EnrolmentCmd {
    /// Open a window of a few minutes at a terminal: the first unknown
    /// card tapped there whose PIN key signs (card and PIN) is enrolled to
    /// the operator, and the window closes.
    Open {
        #[arg(long)]
        operator: String,
        #[arg(long)]
        terminal: String,
        /// How long it stays open, minutes.
        #[arg(long, default_value_t = 5)]
        minutes: u32,
        /// A card the new one replaces (revoked when the new one enrols).
        #[arg(long)]
        replaces: Option<String>,
        /// A temporary card: refused this many days after enrolment.
        #[arg(long, default_value_t = 0)]
        temporary_days: u32,
    },
    /// Close a terminal's window before it is used.
    Close {
        #[arg(long)]
        terminal: String,
    },
}

#[derive(Subcommand)]
enum RequestCmd {
    /// List requests waiting for approval (tab-separated: id, state,
    /// asked by, what).
    List {
        /// Also those decided, withdrawn or lapsed.
        #[arg(long)]
        all: bool,
    },
    /// Approve a request (never your own, nor one about yourself).
    Approve {
        id: String,
        /// Sign the approval with your own badge (card and PIN) in a reader:
        /// a card enrolled to the operator named as your administrator
        /// certificate. Sites with lifecycle.approval = "badge" require it.
        #[arg(long)]
        badge: bool,
        /// The reader (default: the first with a card in it).
        #[arg(long)]
        reader: Option<String>,
        /// Read the PIN from standard input.
        #[arg(long)]
        pin_stdin: bool,
    },
    /// Refuse a request.
    Refuse {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Bind an agent to the terminals it serves.
    Bind {
        name: String,
        #[arg(long, required = true)]
        terminal: Vec<String>,
    },
    /// List agents.
    List,
}

#[derive(Clone, Copy, ValueEnum)]
enum MechArg {
    CardAndPin,
    CardOnly,
}

/// A terminal's or a group's policy.
#[derive(clap::Args)]
struct PolicyArgs {
    #[arg(long, value_enum, required = true)]
    mechanism: Vec<MechArg>,
    /// Roles allowed (none: any enrolled operator).
    #[arg(long)]
    role: Vec<String>,
    /// Idle timeout, seconds (0: none); enforced once the terminal's
    /// application reports activity. 900 for admin panels (NIST SP
    /// 800-63B-4, AAL3).
    #[arg(long, default_value_t = 0)]
    idle_s: u32,
    /// Maximum session, seconds (at most and by default 43200: 12 hours).
    #[arg(long, default_value_t = 43200)]
    max_session_s: u32,
    /// Seconds the session stands after the card leaves, for it to tap
    /// again (0: lock at once; at most 300).
    #[arg(long, default_value_t = 0)]
    removal_grace_s: u32,
    /// When the terminal may be used, e.g. "mon-fri 07:00-19:00 +01:00" or
    /// "daily 22:00-06:00 +00:00" (a night shift); none: always.
    #[arg(long)]
    hours: Option<String>,
}

impl PolicyArgs {
    fn policy(&self) -> Result<TerminalPolicy> {
        Ok(TerminalPolicy {
            allowed_mechanisms: self
                .mechanism
                .iter()
                .map(|m| match m {
                    MechArg::CardAndPin => Mechanism::CardAndPin,
                    MechArg::CardOnly => Mechanism::CardOnly,
                })
                .collect(),
            allowed_roles: self.role.clone(),
            idle_timeout_s: self.idle_s,
            max_session_s: self.max_session_s,
            removal_grace_s: self.removal_grace_s,
            hours: self.hours.as_deref().map(parse_hours).transpose()?,
        })
    }
}

/// "mon-fri 07:00-19:00 +01:00", "daily 22:00-06:00 +00:00",
/// "sat,sun 08:00-12:00 -05:00".
fn parse_hours(s: &str) -> Result<pivgate_gateway::model::Hours> {
    const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let bad = || anyhow::anyhow!("--hours {s:?}: write it like \"mon-fri 07:00-19:00 +01:00\"");
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [days, span, offset] = parts.as_slice() else { return Err(bad()) };
    let day = |d: &str| DAYS.iter().position(|x| *x == d.to_ascii_lowercase()).ok_or_else(bad);
    let mut mask = 0u8;
    if days.eq_ignore_ascii_case("daily") {
        mask = 0x7F;
    } else {
        for part in days.split(',') {
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (day(a)?, day(b)?);
                    let mut d = a;
                    loop {
                        mask |= 1 << d;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                }
                None => mask |= 1 << day(part)?,
            }
        }
    }
    let minute = |t: &str| -> Result<u16> {
        let (h, m) = t.split_once(':').ok_or_else(bad)?;
        let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 24 || m > 59 || (h == 24 && m != 0) {
            return Err(bad());
        }
        Ok(h * 60 + m)
    };
    let (from, to) = span.split_once('-').ok_or_else(bad)?;
    let sign: i16 = match offset.chars().next() {
        Some('+') => 1,
        Some('-') => -1,
        _ => return Err(bad()),
    };
    let off = minute(&offset[1..])? as i16 * sign;
    let h = pivgate_gateway::model::Hours { days: mask, start_minute: minute(from)?, end_minute: minute(to)?, utc_offset_minutes: off };
    if !h.valid() {
        return Err(bad());
    }
    Ok(h)
}

#[derive(Subcommand)]
enum GroupCmd {
    /// Create or change a terminal group: its terminals take the policy
    /// at once (those without one of their own).
    Set {
        id: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// List groups (tab-separated: id, terminals, mechanisms, roles, idle,
    /// maximum session).
    List,
}

#[derive(Subcommand)]
enum TerminalCmd {
    /// Set a terminal's own policy (it no longer follows its group).
    Policy {
        id: String,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Put a terminal in a group (it takes the group's policy).
    Group {
        id: String,
        /// The group; none: out of any group.
        #[arg(long)]
        group: Option<String>,
    },
    /// Lock a terminal now.
    Lock { id: String },
    /// List terminals and their state.
    List,
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Show recent records.
    Tail {
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Export the whole log as JSON lines.
    Export {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Verify the log: at the gateway (against its signed checkpoints), or
    /// an exported file against checkpoints saved earlier. Truncation and
    /// rewriting are reported as such.
    Verify {
        /// An exported log (`audit export`); without it, the gateway checks
        /// its own.
        #[arg(long)]
        file: Option<PathBuf>,
        /// A checkpoint saved earlier (`audit checkpoint`); repeatable.
        #[arg(long)]
        checkpoint: Vec<PathBuf>,
        /// The gateway's audit signing key (hex SubjectPublicKeyInfo, as in
        /// a checkpoint's `public_key`): only checkpoints it signed count.
        #[arg(long)]
        key: Option<String>,
    },
    /// Save the gateway's newest signed checkpoint of the log's head, to
    /// check a later log or export against.
    Checkpoint {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Agent,
    Application,
    Admin,
}

#[derive(Subcommand)]
enum BreakGlassCmd {
    /// Ask for time-limited access for an operator; a second administrator
    /// approves it with `request approve`. Where the site's break-glass is
    /// a temporary card, give its 9A certificate (the operator sets its
    /// PIN); where it is the approver's presence, give none: the approver
    /// opens it by tapping their own badge at the terminal.
    Request {
        #[arg(long)]
        operator: String,
        /// A terminal it holds at (repeat).
        #[arg(long = "terminal", required = true)]
        terminals: Vec<String>,
        #[arg(long)]
        hours: u32,
        /// The temporary card's 9A certificate (PEM or DER), where the
        /// site's break-glass is a temporary card.
        #[arg(long)]
        cert: Option<PathBuf>,
        #[arg(long)]
        reason: String,
    },
    /// End a grant now: its card (if any) is revoked and its sessions lock.
    End {
        id: String,
        #[arg(long)]
        reason: String,
    },
}

#[derive(Subcommand)]
enum CertCmd {
    /// Have the service CA certify a key: a new one made in
    /// OUT_DIR/NAME-key.pem, or, with --public-key, one its holder keeps
    /// (always, for an administrator). An administrator certificate past
    /// the bootstrap pair waits for a second administrator (`request
    /// approve`): run the same command again after to get it.
    Issue {
        #[arg(long, value_enum)]
        role: RoleArg,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out_dir: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// The holder's public key (PEM "PUBLIC KEY", or DER
        /// SubjectPublicKeyInfo) instead of a key made here.
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// Make a key (for `cert issue --public-key` by an administrator):
    /// writes OUT_DIR/NAME-key.pem and NAME.pub, and prints the public
    /// key's SHA-256 to confirm with the approver.
    Key {
        #[arg(long)]
        name: String,
        #[arg(long)]
        out_dir: PathBuf,
    },
}

/// A new P-256 key in OUT_DIR/NAME-key.pem (mode 0600); an existing file
/// is never overwritten nor reused.
fn new_key(dir: &std::path::Path, name: &str) -> Result<rcgen::KeyPair> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(format!("{name}-key.pem"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path).with_context(|| path.display().to_string())?;
    f.write_all(key.serialize_pem().as_bytes())?;
    f.sync_all()?;
    Ok(key)
}

/// A public key file: PEM "PUBLIC KEY" or DER SubjectPublicKeyInfo.
fn read_public_key(path: &std::path::Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    if !bytes.starts_with(b"-----BEGIN") {
        return Ok(bytes);
    }
    let (_, pem) = x509_parser::pem::parse_x509_pem(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if pem.label != "PUBLIC KEY" {
        bail!("{}: a {} block, not a PUBLIC KEY", path.display(), pem.label);
    }
    Ok(pem.contents)
}

fn hex_sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn record_from_pb(r: pb::AuditRecord, prev: &str) -> Result<AuditRecord> {
    Ok(AuditRecord {
        index: r.index,
        unix_ms: r.unix_ms,
        kind: r.kind,
        actor: r.actor,
        terminal_id: r.terminal_id,
        detail: serde_json::from_str(&r.detail_json).context("record detail")?,
        prev_hash: prev.to_string(),
        hash: r.hash,
    })
}

fn credentials(a: &Args) -> Result<Credentials> {
    match (&a.ca, &a.cert, &a.key, &a.data_dir) {
        (Some(ca), Some(cert), Some(key), _) => Ok(Credentials::from_files(ca, cert, key)?),
        (_, _, _, Some(dir)) => Ok(Credentials::admin_in(dir)?),
        _ => bail!("give --data-dir (the gateway's data folder) or --ca, --cert and --key"),
    }
}

/// A writer that shows control characters (other than newline and tab)
/// escaped, so an operator name holding `ESC [ 2 J` cannot clear or rewrite
/// the administrator's screen.
struct Escaped<W: Write>(W);

impl<W: Write> Write for Escaped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let mut safe = String::with_capacity(text.len());
        for c in text.chars() {
            if c.is_control() && c != '\n' && c != '\t' {
                safe.extend(c.escape_default());
            } else {
                safe.push(c);
            }
        }
        self.0.write_all(safe.as_bytes())?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Command::Audit(AuditCmd::Verify { file: Some(f), checkpoint, key }) = &args.command {
        return verify_file(f, checkpoint, key.as_deref());
    }
    // Card work that needs no gateway.
    match &args.command {
        Command::Card(CardCmd::PinChange { station }) => return station::pin_change(station),
        Command::Card(CardCmd::PinUnblock { card, station }) => return station::pin_unblock(&args, card, station),
        _ => {}
    }
    let creds = credentials(&args)?;
    let channel = connect(&args.gateway, &args.server_name, &creds).await?;
    let mut typed = Admin::new(channel.clone());
    let mut admin = typed.rpc().clone();
    // Names, reasons and details come from the gateway, and through it from
    // whoever wrote them: nothing reaches the terminal as a control sequence.
    let mut out = Escaped(std::io::stdout().lock());
    match args.command {
        Command::Operator(OperatorCmd::Add { id, name, role, disabled }) => {
            typed.add_operator(&Operator { id: id.clone(), name, roles: role, enabled: !disabled }).await?;
            writeln!(out, "operator {id} added")?;
        }
        Command::Operator(OperatorCmd::List) => {
            let mut page_token = String::new();
            loop {
                let r = admin.list_operators(pb::ListOperatorsRequest { page_size: 0, page_token }).await?.into_inner();
                for o in r.operators {
                    writeln!(out, "{}\t{}\t{}\t{}", o.operator_id, o.name, o.roles.join(","), if o.enabled { "enabled" } else { "disabled" })?;
                }
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
        }
        Command::Operator(OperatorCmd::Unlock { id, reason }) => {
            let r = admin.lift_lockout(pb::LiftLockoutRequest { operator_id: id.clone(), reason }).await?.into_inner();
            writeln!(out, "{id}: {}", if r.was_locked_out { "lockout lifted" } else { "was not locked out" })?;
        }
        Command::Operator(OperatorCmd::Show { id }) => {
            let r = admin.get_operator(pb::GetOperatorRequest { operator_id: id }).await?.into_inner();
            let o = r.operator.unwrap_or_default();
            writeln!(out, "{} ({}) roles: {} {}", o.operator_id, o.name, o.roles.join(","), if o.enabled { "enabled" } else { "disabled" })?;
            for c in r.cards {
                writeln!(out, "  card {} {} fascn {} cert sha256 {}", c.card_uuid, c.state, c.fascn, c.certificate_sha256)?;
                if !c.approved_by.is_empty() {
                    writeln!(out, "    approved by {}", c.approved_by)?;
                }
                for n in &c.history {
                    writeln!(out, "    {}\t{}\t{}", n.unix_ms, n.by, n.what)?;
                }
            }
        }
        Command::Card(CardCmd::Enrol { operator, cert, slot, card, attestation, attestation_intermediate, temporary_days }) => {
            let der = read_certificate(&cert)?;
            let attestation = match (attestation, attestation_intermediate) {
                (Some(a), Some(i)) => Some((read_certificate(&a)?, read_certificate(&i)?)),
                _ => None,
            };
            let slot = match slot {
                SlotArg::A => Slot::PivAuthentication,
                SlotArg::E => Slot::CardAuthentication,
            };
            let req = pb::EnrolCardRequest {
                operator_id: operator,
                certificate: der,
                slot: slot_pb(slot) as i32,
                card_uuid: card.unwrap_or_default(),
                attestation: attestation.as_ref().map(|a| a.0.clone()).unwrap_or_default(),
                attestation_intermediate: attestation.map(|a| a.1).unwrap_or_default(),
                dry_run: false,
                temporary_days,
            };
            let c = admin.enrol_card(req).await?.into_inner().card.unwrap_or_default();
            writeln!(out, "card {} enrolled for {} (identity: {}, {})", c.card_uuid, c.operator_id, c.identity, c.state)?;
            if !c.pending_request.is_empty() {
                writeln!(out, "it waits for a second administrator's approval: pivgatectl request approve {}", c.pending_request)?;
            }
        }
        Command::Card(CardCmd::Replace { old, cert, slot, temporary_days, reason }) => {
            let operator = card_operator(&mut admin, &old).await?;
            let slot = match slot {
                SlotArg::A => Slot::PivAuthentication,
                SlotArg::E => Slot::CardAuthentication,
            };
            let replacement = pb::EnrolCardRequest {
                operator_id: operator,
                certificate: read_certificate(&cert)?,
                slot: slot_pb(slot) as i32,
                temporary_days,
                ..Default::default()
            };
            let (c, locked) = typed.replace_card(&old, replacement, &reason).await?;
            writeln!(out, "card {} replaces {old} (revoked) for {}; locked terminals: {}", c.card_uuid, c.operator_id, locked.join(", "))?;
        }
        Command::Enrolment(EnrolmentCmd::Open { operator, terminal, minutes, replaces, temporary_days }) => {
            let closes = typed.open_enrolment(&operator, &terminal, minutes.saturating_mul(60), replaces.as_deref(), temporary_days).await?;
            let left = (closes - now_ms()).max(0) / 1000;
            writeln!(out, "enrolment open at {terminal} for {operator} for {left} s: tap the card there and type its PIN")?;
        }
        Command::Enrolment(EnrolmentCmd::Close { terminal }) => {
            let was_open = typed.close_enrolment(&terminal).await?;
            writeln!(out, "enrolment at {terminal} {}", if was_open { "closed" } else { "was not open" })?;
        }
        Command::Request(RequestCmd::List { all }) => {
            for r in typed.requests(all).await? {
                writeln!(out, "{}\t{}\t{}\t{}", r.request_id, r.state, r.requested_by, r.summary)?;
            }
        }
        Command::Request(RequestCmd::Approve { id, badge, reader, pin_stdin }) => {
            let r = if badge { badge::approve(&mut typed, &id, reader.as_deref(), pin_stdin).await? } else { typed.approve(&id).await? };
            writeln!(out, "request {} {} by {}{}", r.request_id, r.state, r.decided_by, if r.badge_signed { " (signed by the approver's badge)" } else { "" })?;
        }
        Command::Request(RequestCmd::Refuse { id, reason }) => {
            let r = typed.refuse(&id, &reason).await?;
            writeln!(out, "request {} {}", r.request_id, r.state)?;
        }
        Command::Card(CardCmd::List { operator }) => {
            let mut page_token = String::new();
            loop {
                let r =
                    admin.list_cards(pb::ListCardsRequest { page_size: 0, page_token, operator_id: operator.clone().unwrap_or_default() }).await?.into_inner();
                for c in r.cards {
                    writeln!(out, "{}\t{}\t{}\t{}\t{}", c.card_uuid, c.operator_id, c.certificate_sha256, c.state, c.identity)?;
                }
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
        }
        Command::Card(CardCmd::Issue { operator, station, algorithm, site, attest }) => {
            station::issue(&args_dir(&args.data_dir), &mut typed, &mut out, &operator, &station, algorithm, &site, attest).await?;
        }
        Command::Card(CardCmd::PinChange { .. } | CardCmd::PinUnblock { .. }) => unreachable!("handled before connecting"),
        Command::Card(CardCmd::Retire { card, station, reason }) => {
            station::retire(&args_dir(&args.data_dir), &mut typed, &mut out, &card, &station, &reason).await?;
        }
        Command::Card(CardCmd::Suspend { uuid, reason }) => {
            let locked = typed.suspend_card(&uuid, &reason).await?;
            writeln!(out, "card {uuid} suspended; locked terminals: {}", locked.join(", "))?;
        }
        Command::Card(CardCmd::Resume { uuid, reason }) => {
            typed.resume_card(&uuid, &reason).await?;
            writeln!(out, "card {uuid} resumed")?;
        }
        Command::Card(CardCmd::Revoke { uuid, reason }) => {
            let locked = typed.revoke_card(&uuid, &reason).await?;
            writeln!(out, "card {uuid} revoked; locked terminals: {}", locked.join(", "))?;
        }
        Command::Agent(AgentCmd::Bind { name, terminal }) => {
            typed.bind_agent(&name, &terminal).await?;
            writeln!(out, "agent {name} serves {}", terminal.join(", "))?;
        }
        Command::Agent(AgentCmd::List) => {
            let mut page_token = String::new();
            loop {
                let r = admin.list_agents(pb::ListAgentsRequest { page_size: 0, page_token }).await?.into_inner();
                for a in r.agents {
                    writeln!(out, "{}\t{}\t{}", a.agent_name, a.terminal_ids.join(","), if a.connected { "connected" } else { "-" })?;
                }
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
        }
        Command::Terminal(TerminalCmd::Policy { id, policy }) => {
            typed.set_terminal_policy(&id, &policy.policy()?).await?;
            writeln!(out, "terminal {id} policy set")?;
        }
        Command::Terminal(TerminalCmd::Group { id, group }) => {
            typed.assign_terminal(&id, group.as_deref()).await?;
            match group {
                Some(g) => writeln!(out, "terminal {id} is in group {g}")?,
                None => writeln!(out, "terminal {id} is in no group; it keeps its policy")?,
            }
        }
        Command::Group(GroupCmd::Set { id, policy }) => {
            let locked = typed.set_terminal_group(&id, &policy.policy()?).await?;
            writeln!(out, "group {id} set; locked terminals: {}", locked.join(", "))?;
        }
        Command::Group(GroupCmd::List) => {
            for g in admin.list_terminal_groups(pb::ListTerminalGroupsRequest {}).await?.into_inner().groups {
                let p = g.policy.unwrap_or_default();
                let mechanisms: Vec<String> =
                    p.allowed_mechanisms.iter().map(|m| pb::Mechanism::try_from(*m).map(|m| m.as_str_name().to_string()).unwrap_or_default()).collect();
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}\tidle {} s\tmax {} s",
                    g.group_id,
                    g.terminal_ids.join(","),
                    mechanisms.join(","),
                    p.allowed_roles.join(","),
                    p.idle_timeout_s,
                    p.max_session_s
                )?;
            }
        }
        Command::Terminal(TerminalCmd::Lock { id }) => {
            let was_unlocked = typed.lock_terminal(&id).await?;
            writeln!(out, "terminal {id} {}", if was_unlocked { "locked" } else { "was already locked" })?;
        }
        Command::Terminal(TerminalCmd::List) => {
            let mut access = AccessServiceClient::new(channel);
            let mut page_token = String::new();
            loop {
                let r = access.list_terminal_states(pb::ListTerminalStatesRequest { page_size: 0, page_token }).await?.into_inner();
                for s in r.states {
                    if s.unlocked {
                        writeln!(out, "{}\tunlocked by {} ({})\tseq {}", s.terminal_id, s.operator_id, s.operator_name, s.sequence)?;
                    } else {
                        writeln!(out, "{}\tlocked\tseq {}", s.terminal_id, s.sequence)?;
                    }
                }
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
        }
        Command::Audit(AuditCmd::Tail { after, limit }) => {
            for r in admin.query_audit(pb::QueryAuditRequest { after_index: after, limit }).await?.into_inner().records {
                writeln!(out, "{}\t{}\t{}\t{}\t{}\t{}", r.index, r.unix_ms, r.kind, r.actor, r.terminal_id, r.detail_json)?;
            }
        }
        Command::Audit(AuditCmd::Export { out: file }) => {
            let mut sink: Box<dyn Write> = match file {
                Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(&p).with_context(|| p.display().to_string())?)),
                None => Box::new(Escaped(std::io::stdout())),
            };
            let mut stream = admin.export_audit(pb::ExportAuditRequest {}).await?.into_inner();
            let mut prev = "0".repeat(64);
            while let Some(m) = stream.message().await? {
                let rec = record_from_pb(m.record.unwrap_or_default(), &prev)?;
                prev = rec.hash.clone();
                serde_json::to_writer(&mut sink, &rec)?;
                sink.write_all(b"\n")?;
            }
            sink.flush()?;
        }
        Command::Backup { out: path } => {
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new(".")).to_path_buf();
            let tmp = dir.join(format!(".{}.partial", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
            let taken = async {
                use std::os::unix::fs::OpenOptionsExt;
                // The audit log and every card: readable by its owner alone.
                let mut file =
                    std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).with_context(|| tmp.display().to_string())?;
                let mut stream = admin.backup(pb::BackupRequest {}).await?.into_inner();
                let mut bytes = 0u64;
                while let Some(chunk) = stream.message().await? {
                    bytes += chunk.data.len() as u64;
                    file.write_all(&chunk.data)?;
                }
                file.sync_all()?;
                drop(file);
                // Whole and as signed: checked against its own key here
                // (the restore checks it against the key folder's).
                let key = {
                    let mut first = String::new();
                    std::io::BufRead::read_line(&mut std::io::BufReader::new(std::fs::File::open(&tmp)?), &mut first)?;
                    serde_json::from_str::<pivgate_gateway::backup::Header>(&first).map(|h| h.signing_key).unwrap_or_default()
                };
                let summary = pivgate_gateway::backup::read(&mut std::io::BufReader::new(std::fs::File::open(&tmp)?), &key, |_, _, _, _| Ok(()))
                    .map_err(|e| anyhow::anyhow!("the backup received is not whole: {e}"))?;
                anyhow::Ok((summary, bytes))
            }
            .await;
            let (summary, bytes) = match taken {
                Ok(x) => x,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
            };
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&dir)?.sync_all()?;
            let h = summary.header;
            writeln!(
                out,
                "backup written to {}: audit records 1..{} (head {}), events 1..{}, {} entries, {bytes} bytes",
                path.display(),
                h.audit_index,
                h.audit_hash,
                h.event_sequence,
                summary.entries
            )?;
        }
        Command::Audit(AuditCmd::Verify { .. }) => {
            let r = admin.verify_audit(pb::VerifyAuditRequest {}).await?.into_inner();
            if r.intact {
                writeln!(out, "audit log intact: {} records", r.records)?;
            } else {
                for f in &r.findings {
                    writeln!(out, "{f}")?;
                }
                bail!("audit log not intact ({} records chain correctly)", r.records);
            }
        }
        Command::Audit(AuditCmd::Checkpoint { out: path }) => {
            let head = AccessServiceClient::new(channel).get_audit_head(pb::GetAuditHeadRequest {}).await?.into_inner();
            let c = head.checkpoint.context("the gateway has signed no checkpoint yet")?;
            let c = Checkpoint { index: c.index, hash: c.hash, unix_ms: c.unix_ms, public_key: c.public_key, signature: c.signature };
            c.verify(None).map_err(|e| anyhow::anyhow!("the gateway's checkpoint: {e}"))?;
            std::fs::write(&path, serde_json::to_vec_pretty(&c)?).with_context(|| path.display().to_string())?;
            writeln!(out, "checkpoint of record {} (key {}) saved to {}", c.index, &c.key_fingerprint()[..16], path.display())?;
        }
        Command::Cert(CertCmd::Issue { role, name, out_dir, days, public_key }) => {
            let role = match role {
                RoleArg::Agent => Role::Agent,
                RoleArg::Application => Role::Application,
                RoleArg::Admin => Role::Admin,
            };
            std::fs::create_dir_all(&out_dir)?;
            let spki = match (public_key, role) {
                (Some(path), _) => read_public_key(&path)?,
                // An administrator's key is made by its holder (`cert key`),
                // never on the asker's machine.
                (None, Role::Admin) => {
                    bail!("an administrator certificate is for a key its holder made: --public-key FILE (from `pivgatectl cert key` run by them)")
                }
                (None, _) => rcgen::PublicKeyData::subject_public_key_info(&new_key(&out_dir, &name)?),
            };
            match typed.issue_certificate(role, &name, &spki, days).await? {
                Issued::Certificate { certificate_pem, ca_pem } => {
                    std::fs::write(out_dir.join(format!("{name}.pem")), certificate_pem)?;
                    std::fs::write(out_dir.join("service-ca.pem"), ca_pem)?;
                    writeln!(out, "wrote {0}/{name}.pem and {0}/service-ca.pem", out_dir.display())?;
                }
                Issued::Pending(r) => {
                    writeln!(out, "request {} {}: {}", r.request_id, r.state, r.summary)?;
                    writeln!(out, "a second administrator approves it (pivgatectl request approve {}); then run this command again", r.request_id)?;
                }
            }
        }
        Command::Cert(CertCmd::Key { name, out_dir }) => {
            std::fs::create_dir_all(&out_dir)?;
            use rcgen::PublicKeyData;
            let key = new_key(&out_dir, &name)?;
            let spki = key.subject_public_key_info();
            std::fs::write(out_dir.join(format!("{name}.pub")), key.public_key_pem())?;
            writeln!(out, "wrote {0}/{name}-key.pem and {0}/{name}.pub; public key SHA-256 {1}", out_dir.display(), hex_sha256(&spki))?;
        }
        Command::BreakGlass(BreakGlassCmd::Request { operator, terminals, hours, cert, reason }) => {
            let req = pb::RequestBreakGlassRequest {
                operator_id: operator,
                terminal_ids: terminals,
                hours,
                certificate: cert.map(|c| read_certificate(&c)).transpose()?.unwrap_or_default(),
                reason,
            };
            let r = admin.request_break_glass(req).await?.into_inner().request.unwrap_or_default();
            writeln!(out, "request {} {}: {}", r.request_id, r.state, r.summary)?;
            writeln!(out, "a second administrator approves it: pivgatectl request approve {}", r.request_id)?;
        }
        Command::BreakGlass(BreakGlassCmd::End { id, reason }) => {
            let r = admin.end_break_glass(pb::EndBreakGlassRequest { request_id: id.clone(), reason }).await?.into_inner();
            writeln!(out, "break-glass {id} ended; locked: {}", if r.locked_terminals.is_empty() { "none".into() } else { r.locked_terminals.join(", ") })?;
        }
        Command::Review { json } => {
            let r = admin.review(pb::ReviewRequest {}).await?.into_inner();
            for i in &r.items {
                if json {
                    let line =
                        serde_json::json!({ "kind": i.kind, "subject": i.subject, "detail": i.detail, "until_unix_ms": i.until_unix_ms, "resolve": i.resolve });
                    writeln!(out, "{line}")?;
                } else {
                    writeln!(out, "{:<22} {:<38} {}\n{:<22} {:<38} -> {}", i.kind, i.subject, i.detail, "", "", i.resolve)?;
                }
            }
            if r.truncated {
                writeln!(out, "(more than {} exceptions: resolve these first)", r.items.len())?;
            }
            if r.items.is_empty() && !json {
                writeln!(out, "no exceptions")?;
            }
        }
        Command::Watch { after, terminal } => {
            let mut access = AccessServiceClient::new(channel);
            let mut s = access.watch_events(pb::WatchEventsRequest { after_sequence: after, terminal_ids: terminal }).await?.into_inner();
            while let Some(m) = s.message().await? {
                let e = m.event.unwrap_or_default();
                match e.kind {
                    Some(pb::event::Kind::Unlocked(u)) => {
                        writeln!(out, "{}\t{}\tunlocked by {} ({})", e.sequence, e.terminal_id, u.operator_id, u.operator_name)?
                    }
                    Some(pb::event::Kind::Locked(l)) => writeln!(
                        out,
                        "{}\t{}\tlocked ({})",
                        e.sequence,
                        e.terminal_id,
                        pb::LockReason::try_from(l.reason).map(|r| r.as_str_name()).unwrap_or("?")
                    )?,
                    None => {}
                }
                out.flush()?;
            }
        }
    }
    Ok(())
}

fn verify_file(path: &PathBuf, checkpoint_files: &[PathBuf], key: Option<&str>) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let records = std::io::BufReader::new(f).lines().map(|l| {
        l.map_err(pivgate_gateway::Error::from)
            .and_then(|l| serde_json::from_str::<AuditRecord>(&l).map_err(|e| pivgate_gateway::Error::Corrupt(e.to_string())))
    });
    let mut checkpoints = Vec::new();
    for p in checkpoint_files {
        let bytes = std::fs::read(p).with_context(|| p.display().to_string())?;
        checkpoints.push(serde_json::from_slice::<Checkpoint>(&bytes).with_context(|| format!("{}: not a checkpoint", p.display()))?);
    }
    let (n, findings) = audit::verify(records, &checkpoints, key);
    let mut out = Escaped(std::io::stdout());
    if findings.is_empty() {
        writeln!(out, "audit log intact: {n} records, {} checkpoint(s) matched", checkpoints.len())?;
        if key.is_none() && !checkpoints.is_empty() {
            writeln!(out, "(checkpoint signatures checked with the key they carry; give --key to pin the gateway's)")?;
        }
        return Ok(());
    }
    for f in &findings {
        writeln!(out, "{f}")?;
    }
    bail!("audit log not intact ({n} records chain correctly)")
}

fn args_dir(d: &Option<PathBuf>) -> Option<PathBuf> {
    d.clone()
}

/// The issuance station's commands.
mod station {
    use std::io::{BufRead, Write};
    use std::path::PathBuf;

    use anyhow::{bail, Context, Result};
    use pivgate_gateway::client::Admin;
    use pivgate_gateway::core::{Randomness, SystemRandomness};
    use pivgate_gateway::model::{parse_uuid, Slot};
    use pivgate_gateway::station::Station;
    use pivgate_hw::pcsc::{self, PcscCard};
    use pivgate_hw::piv::{Algorithm, PivClient};
    use pivgate_hw::Pin;
    use zeroize::Zeroizing;

    use super::{Args, KeyAlgorithmArg, StationArgs};

    fn ca_dir(data_dir: &Option<PathBuf>, s: &StationArgs) -> Result<PathBuf> {
        match (&s.ca_dir, data_dir) {
            (Some(d), _) => Ok(d.clone()),
            (None, Some(d)) => Ok(d.join("card-ca")),
            (None, None) => bail!("give --ca-dir (the site card CA and escrow folder) or --data-dir"),
        }
    }

    /// A PIN typed at the station: from the terminal with echo off, or a
    /// line of standard input with --pin-stdin. Never echoed or logged.
    pub fn read_pin(prompt: &str, from_stdin: bool) -> Result<Pin> {
        use std::os::fd::AsFd;
        let stdin = std::io::stdin();
        let fd = stdin.as_fd();
        let tty = !from_stdin && rustix::termios::isatty(fd);
        let saved = if tty {
            eprint!("{prompt}: ");
            let saved = rustix::termios::tcgetattr(fd)?;
            let mut quiet = saved.clone();
            quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
            rustix::termios::tcsetattr(fd, rustix::termios::OptionalActions::Now, &quiet)?;
            Some(saved)
        } else {
            None
        };
        let mut line = Zeroizing::new(String::new());
        let read = stdin.lock().read_line(&mut line);
        if let Some(saved) = saved {
            let _ = rustix::termios::tcsetattr(fd, rustix::termios::OptionalActions::Now, &saved);
            eprintln!();
        }
        read?;
        Ok(Pin::new(line.trim_end_matches(['\r', '\n']).as_bytes())?)
    }

    fn new_pin(from_stdin: bool) -> Result<Pin> {
        let pin = read_pin("New PIN (6 to 8 digits)", from_stdin)?;
        if !from_stdin {
            let again = read_pin("The new PIN again", false)?;
            if pin.padded() != again.padded() {
                bail!("the two PINs differ; nothing was changed");
            }
        }
        Ok(pin)
    }

    /// Runs `f` in one transaction on the card. After a success the card
    /// is reset (its PIN and management key state cleared for the next
    /// person); after a failure it is left as it is (it may have left the
    /// reader, and some readers hang on resetting a card that is gone).
    fn with_card<T, E>(mut card: PcscCard, f: impl FnOnce(&mut PivClient<pivgate_hw::pcsc::PcscTransaction<'_>>) -> Result<T, E>) -> Result<Result<T, E>> {
        let r = {
            let mut piv = PivClient::new(card.transaction()?);
            let r = f(&mut piv);
            let _ = piv.into_inner().end(r.is_ok());
            r
        };
        let _ = card.disconnect(false);
        Ok(r)
    }

    fn open_card(s: &StationArgs) -> Result<(pcsc::Context, String)> {
        let ctx = pcsc::establish()?;
        let reader = super::pick_reader(&ctx, s.reader.as_deref(), None)?;
        Ok((ctx, reader))
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn issue(
        data_dir: &Option<PathBuf>,
        admin: &mut Admin,
        out: &mut impl Write,
        operator: &str,
        s: &StationArgs,
        algorithm: KeyAlgorithmArg,
        site: &str,
        attest: bool,
    ) -> Result<()> {
        let dir = ca_dir(data_dir, s)?;
        let (station, created) = Station::create_or_open(&dir, site)?;
        if created {
            eprintln!("made the site card CA {}: list it under cards.trust_anchors in the gateway's configuration", station.ca_certificate().display());
            eprintln!(
                "made the escrow key {}: move it offline (pin-unblock and retire take --escrow-key); anyone holding it can manage every card",
                station.default_escrow_key().display()
            );
        }
        // Before the card is touched: the operator exists, the gateway
        // trusts the card CA and takes certificates of this shape.
        let probe_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut probe_uuid = [0u8; 16];
        SystemRandomness.fill(&mut probe_uuid)?;
        let probe = station.certify(
            pivgate_hw::piv::Slot::Authentication,
            &rcgen::PublicKeyData::subject_public_key_info(&probe_key),
            &probe_uuid,
            operator,
            &SystemRandomness,
        )?;
        if let Err(e) = admin.check_enrolment(operator, &probe, Slot::PivAuthentication).await {
            let text = e.to_string();
            if !(attest && text.contains("require_attested_pin_key")) {
                bail!("the gateway would not enrol this card, so it was not touched: {text}");
            }
        }
        let pin = new_pin(s.pin_stdin)?;
        let alg = match algorithm {
            KeyAlgorithmArg::P256 => Algorithm::EccP256,
            KeyAlgorithmArg::P384 => Algorithm::EccP384,
            KeyAlgorithmArg::Rsa2048 => Algorithm::Rsa2048,
        };
        let (ctx, reader) = open_card(s)?;
        let card = PcscCard::connect(&ctx, &reader)?;
        let issued = with_card(card, |piv| station.issue(piv, operator, &pin, alg, &SystemRandomness))?;
        let issued = match issued {
            Ok(i) => i,
            Err(i) => bail!("{i}"),
        };
        let uuid = pivgate_gateway::model::uuid_text(&issued.card_uuid);
        let saved = dir.join("issued");
        std::fs::create_dir_all(&saved)?;
        std::fs::write(saved.join(format!("{uuid}-9a.der")), &issued.certificate_9a)?;
        std::fs::write(saved.join(format!("{uuid}-9e.der")), &issued.certificate_9e)?;
        let att = if attest { issued.attestation_9a.as_ref().map(|(a, i)| (a.as_slice(), i.as_slice())) } else { None };
        if let Some((a, i)) = &issued.attestation_9a {
            std::fs::write(saved.join(format!("{uuid}-9a-attestation.der")), a)?;
            std::fs::write(saved.join(format!("{uuid}-f9.der")), i)?;
        }
        let cert = |slot: &str| saved.join(format!("{uuid}-{slot}.der")).display().to_string();
        if let Err(e) = admin.enrol_card_with(operator, &issued.certificate_9a, Slot::PivAuthentication, None, att).await {
            bail!("card {uuid} is issued but not enrolled ({e}); enrol it with: pivgatectl card enrol --operator {operator} --cert {}", cert("9a"));
        }
        if let Err(e) = admin.enrol_card(operator, &issued.certificate_9e, Slot::CardAuthentication).await {
            bail!(
                "card {uuid} is issued and its 9A key enrolled, but not its 9E key ({e}); enrol it with: pivgatectl card enrol --operator {operator} --slot 9e --cert {}",
                cert("9e")
            );
        }
        writeln!(out, "card {uuid} issued to {operator} and enrolled; its management key and PUK are escrowed in {}", dir.join("escrow").display())?;
        Ok(())
    }

    pub fn pin_change(s: &StationArgs) -> Result<()> {
        let old = read_pin("Current PIN", s.pin_stdin)?;
        let new = new_pin(s.pin_stdin)?;
        let (ctx, reader) = open_card(s)?;
        let card = PcscCard::connect(&ctx, &reader)?;
        let r = with_card(card, |piv| piv.select().and_then(|_| piv.change_pin(&old, &new)))?;
        match r {
            Ok(()) => {
                println!("PIN changed");
                Ok(())
            }
            Err(pivgate_hw::Error::WrongPin { tries }) => bail!("wrong PIN; {tries} tries left"),
            Err(e) => Err(e.into()),
        }
    }

    pub fn pin_unblock(args: &Args, card_id: &str, s: &StationArgs) -> Result<()> {
        let uuid = parse_uuid(card_id).context("--card is not a card id")?;
        let station = Station::open(&ca_dir(&args.data_dir, s)?)?;
        let escrow_key = s.escrow_key.clone().unwrap_or_else(|| station.default_escrow_key());
        let new = new_pin(s.pin_stdin)?;
        let (ctx, reader) = open_card(s)?;
        let card = PcscCard::connect(&ctx, &reader)?;
        let r = with_card(card, |piv| station.unblock(piv, &uuid, &escrow_key, &new, &SystemRandomness))?;
        r?;
        println!("PIN of card {card_id} unblocked and set");
        Ok(())
    }

    pub async fn retire(data_dir: &Option<PathBuf>, admin: &mut Admin, out: &mut impl Write, card_id: &str, s: &StationArgs, reason: &str) -> Result<()> {
        let uuid = parse_uuid(card_id).context("--card is not a card id")?;
        let station = Station::open(&ca_dir(data_dir, s)?)?;
        let escrow_key = s.escrow_key.clone().unwrap_or_else(|| station.default_escrow_key());
        // Dead at the gateway first, whatever happens to the card after.
        admin.revoke_card(card_id, reason).await?;
        let (ctx, reader) = open_card(s)?;
        let card = PcscCard::connect(&ctx, &reader)?;
        let r = with_card(card, |piv| station.retire(piv, &uuid, &escrow_key, &SystemRandomness))?;
        r.with_context(|| format!("card {card_id} is revoked, but wiping it failed"))?;
        writeln!(out, "card {card_id} revoked and wiped: it is blank again")?;
        Ok(())
    }
}

fn slot_pb(s: Slot) -> pb::KeySlot {
    match s {
        Slot::PivAuthentication => pb::KeySlot::PivAuthentication,
        Slot::CardAuthentication => pb::KeySlot::CardAuthentication,
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The operator a card (as listed) belongs to.
async fn card_operator(admin: &mut pb::admin_service_client::AdminServiceClient<tonic::transport::Channel>, card: &str) -> Result<String> {
    let mut page_token = String::new();
    loop {
        let r = admin.list_cards(pb::ListCardsRequest { page_size: 0, page_token, operator_id: String::new() }).await?.into_inner();
        if let Some(c) = r.cards.iter().find(|c| c.card_uuid.eq_ignore_ascii_case(card)) {
            return Ok(c.operator_id.clone());
        }
        if r.next_page_token.is_empty() {
            bail!("no enrolled card has the id {card}");
        }
        page_token = r.next_page_token;
    }
}

/// The reader to use: the one named (waiting up to `wait` for a card in
/// it, when given), else the first with a card in it.
fn pick_reader(ctx: &pivgate_hw::pcsc::Context, named: Option<&str>, wait: Option<std::time::Duration>) -> Result<String> {
    use pivgate_hw::pcsc;
    if let Some(r) = named {
        if let Some(wait) = wait {
            if !pcsc::wait_for_card(ctx, r, true, wait)? {
                bail!("no card in {r}: put the card in it");
            }
        }
        return Ok(r.to_string());
    }
    for r in pcsc::list_readers(ctx)? {
        if pcsc::wait_for_card(ctx, &r, true, std::time::Duration::from_millis(200))? {
            return Ok(r);
        }
    }
    bail!("no reader has a card in it")
}

/// An approval signed by the approver's own badge.
mod badge {
    use anyhow::{Context, Result};
    use pivgate_gateway::client::Admin;
    use pivgate_hw::pcsc::{self, PcscCard};
    use pivgate_hw::piv::{Algorithm, PivClient, Slot};
    use pivgate_proto::v1 as pb;
    use sha2::Digest;

    /// Reads the badge's 9A certificate, has the gateway say what it is to
    /// sign, shows it, and signs after the PIN.
    pub async fn approve(admin: &mut Admin, id: &str, named: Option<&str>, pin_stdin: bool) -> Result<pb::ApprovalRequest> {
        let ctx = pcsc::establish()?;
        // An approver may type the command first and insert the badge after.
        let reader = super::pick_reader(&ctx, named, Some(std::time::Duration::from_secs(20)))?;
        let certificate = {
            let mut card = PcscCard::connect(&ctx, &reader)?;
            let mut piv = PivClient::new(card.transaction()?);
            piv.select()?;
            let der = piv.read_certificate(Slot::Authentication).context("reading the badge's PIV Authentication certificate")?;
            let _ = piv.into_inner().end(false);
            der
        };
        let r = admin
            .approve_with_badge(id, &certificate, |m, message, algorithm| {
                eprintln!("The gateway asks your badge to sign, as {}: {}", m.approver, m.summary);
                let pin = super::station_pin("Your badge's PIN", pin_stdin).map_err(|e| pivgate_gateway::Error::InvalidRequest(e.to_string()))?;
                let (alg, digest) = match algorithm {
                    pb::SignatureAlgorithm::EcdsaP384Sha384 => (Algorithm::EccP384, sha2::Sha384::digest(message).to_vec()),
                    pb::SignatureAlgorithm::Rsa2048Pkcs1Sha256 => (Algorithm::Rsa2048, sha2::Sha256::digest(message).to_vec()),
                    _ => (Algorithm::EccP256, sha2::Sha256::digest(message).to_vec()),
                };
                let signed = (|| -> pivgate_hw::Result<Vec<u8>> {
                    let mut card = PcscCard::connect(&ctx, &reader)?;
                    let mut piv = PivClient::new(card.transaction()?);
                    piv.select()?;
                    piv.verify_pin(&pin)?;
                    let sig = piv.sign(Slot::Authentication, alg, &digest);
                    // Reset: no verified PIN stays on the card.
                    let _ = piv.into_inner().end(true);
                    sig
                })();
                signed.map_err(|e| pivgate_gateway::Error::InvalidRequest(format!("the badge: {e}")))
            })
            .await?;
        Ok(r)
    }
}

/// A PIN typed at this workstation (see the station's reader of PINs).
fn station_pin(prompt: &str, from_stdin: bool) -> Result<pivgate_hw::Pin> {
    station::read_pin(prompt, from_stdin)
}

/// A certificate file, PEM or DER.
fn read_certificate(path: &std::path::Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
    if bytes.starts_with(b"-----BEGIN") {
        Ok(x509_parser::pem::parse_x509_pem(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?.1.contents)
    } else {
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_read_as_administrators_write_them() {
        let h = parse_hours("mon-fri 07:00-19:00 +01:00").unwrap();
        assert_eq!((h.days, h.start_minute, h.end_minute, h.utc_offset_minutes), (0b0011111, 420, 1140, 60));
        let n = parse_hours("fri-mon 22:00-06:00 -05:30").unwrap();
        assert_eq!((n.days, n.utc_offset_minutes), (0b1110001, -330));
        assert_eq!(parse_hours("daily 00:00-24:00 +00:00").unwrap().days, 0x7F);
        for bad in ["mon-fri 07:00", "someday 07:00-19:00 +00:00", "mon 25:00-26:00 +00:00", "mon 07:00-07:00 +00:00", "mon 07:00-19:00 01:00"] {
            assert!(parse_hours(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn control_sequences_are_shown_not_obeyed() {
        let mut out = Escaped(Vec::new());
        let name = "Ana\u{1b}[2J\u{9b}31m\u{7}";
        writeln!(out, "op-1\t{name}").unwrap();
        let shown = String::from_utf8(out.0).unwrap();
        assert_eq!(shown, "op-1\tAna\\u{1b}[2J\\u{9b}31m\\u{7}\n");
        assert!(!shown.chars().any(|c| c.is_control() && c != '\n' && c != '\t'));
    }
}
