//! The issuance station end to end, as an administrator types it: a blank
//! token in the station's reader (the rig's second vpcd slot) behind the
//! real pcscd, `pivgatectl card issue` against a real gateway that trusts
//! the site card CA, then the card at a terminal with a real agent, the PIN
//! unblocked with the escrowed PUK, a card pulled midway, and a retirement.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pivgate_agent::terminal::TapResult;
use pivgate_gateway::model::Operator;
use pivgate_gateway::station::Station;
use pivgate_hw::indicator::Pattern;
use pivgate_hw::piv::{ObjectTag, PivClient};
use pivgate_proto::v1 as pb;
use pivgate_tests::agent::{assert_granted, start_agent, AgentUnderTest, TerminalSpec};
use pivgate_tests::site::{scratch, Site};
use pivgate_tests::{binary, reader, Reader};
use pivgate_tests::{opensc_module, run_tool as run, run_typed};
use pivgate_vcard::{vpcd, CardContents, Fault, VirtualCard};

const T: Duration = Duration::from_secs(20);
const TERMINAL: &str = "dispatch-01";

struct Station2 {
    name: String,
    addr: std::net::SocketAddr,
}

/// `pivgatectl` against `site`, with `stdin` (PINs, one per line).
fn ctl(site: &Site, ca_dir: &Path, args: &[&str], stdin: &str) -> (bool, String) {
    let Ok(bin) = binary("pivgatectl") else { return (false, "pivgatectl is not built".into()) };
    let mut cmd = Command::new(bin);
    cmd.args(["--gateway", &site.addr, "--data-dir"]).arg(&site.config.data_dir).args(args).arg("--ca-dir").arg(ca_dir);
    run_typed(&mut cmd, stdin)
}

/// Puts `card` in the station's reader until `f` is done with it.
fn at_station<R>(st: &Station2, card: VirtualCard, f: impl FnOnce() -> R) -> Result<(VirtualCard, R)> {
    let inserted = vpcd::insert(card, st.addr)?;
    let ctx = pivgate_hw::pcsc::establish()?;
    if !pivgate_hw::pcsc::wait_for_card(&ctx, &st.name, true, T)? {
        bail!("the card never appeared in {}", st.name);
    }
    let r = f();
    let card = inserted.remove();
    if !pivgate_hw::pcsc::wait_for_card(&ctx, &st.name, false, T)? {
        bail!("pcscd still sees a card in {}", st.name);
    }
    Ok((card, r))
}

async fn tap(agent: &AgentUnderTest, r: &Reader, card: VirtualCard, pin: &str) -> Result<(TapResult, VirtualCard)> {
    let since = agent.history(TERMINAL).len();
    let inserted = vpcd::insert(card, r.addr)?;
    agent.wait_pattern(TERMINAL, Pattern::EnterPin, since, T).await?;
    agent.type_keys(TERMINAL, &format!("{pin}#"));
    let result = agent.next_result(TERMINAL, T).await?;
    let card = inserted.remove();
    let ctx = pivgate_hw::pcsc::establish()?;
    pivgate_hw::pcsc::wait_for_card(&ctx, &r.name, false, T)?;
    Ok((result, card))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blank_token_is_issued_unlocks_is_unblocked_and_retired() -> Result<()> {
    let r = reader()?;
    let (name, addr) = r.second_slot();
    let st = Station2 { name: name.clone(), addr };
    let ca_dir = scratch("station").join("card-ca");
    // The station makes the site card CA on first use; the gateway trusts
    // it because its configuration says so.
    let (station, created) = Station::create_or_open(&ca_dir, "Example Utilities")?;
    assert!(created);
    let ca = station.ca_certificate();
    let mut site = Site::start(move |c, _| c.cards.trust_anchors.push(ca)).await?;
    let mut admin = site.admin_client().await?;
    for id in ["op-30", "op-31"] {
        admin.add_operator(&Operator { id: id.into(), name: id.into(), roles: vec!["dispatcher".into()], enabled: true }).await?;
    }

    // Issued at the station, the PIN typed there.
    let (card, (ok, text)) = at_station(&st, VirtualCard::new(CardContents::blank(30_000_001)), || {
        ctl(&site, &ca_dir, &["card", "issue", "--operator", "op-30", "--reader", &name, "--pin-stdin"], "246810\n")
    })?;
    assert!(ok, "{text}");
    assert!(text.contains("issued to op-30 and enrolled"), "{text}");
    assert!(!text.contains("246810"), "the PIN was printed: {text}");
    // The management key is no longer the default, nor printed anywhere.
    assert!(!card.contents().management_key.is_default());
    assert!(!text.contains(&hex::encode(card.contents().management_key.bytes())));
    let chuid = pivgate_hw::piv::Chuid::parse(card.contents().objects.get(&ObjectTag::CHUID.0).context("no CHUID")?)?;
    let card_id = chuid.uuid_string();
    assert!(text.contains(&card_id), "{text}");
    let cards = admin.rpc().list_cards(pb::ListCardsRequest { operator_id: "op-30".into(), ..Default::default() }).await?.into_inner().cards;
    assert_eq!(cards.len(), 1);
    assert_eq!((cards[0].card_uuid.as_str(), cards[0].identity.as_str()), (card_id.as_str(), "fips201"));

    // Standard middleware still reads it as a PIV card.
    let module = opensc_module()?;
    let (card, tools) = at_station(&st, card, || -> Result<(String, String)> {
        let status = run(Command::new("yubico-piv-tool").args(["-r", &name, "-a", "status"]))?;
        let objects = run(Command::new("pkcs11-tool").arg("--module").arg(&module).arg("--list-objects"))?;
        Ok((status, objects))
    })?;
    let (status, objects) = tools?;
    assert!(status.contains("CHUID:") && status.contains("Slot 9a:") && status.contains("Slot 9e:"), "{status}");
    assert!(objects.contains("Certificate Object"), "{objects}");
    // The default management key no longer opens it.
    {
        let mut c = VirtualCard::new(card.contents().clone());
        let mut piv = PivClient::new(&mut c);
        piv.select()?;
        assert!(!piv.authenticate_management(&pivgate_hw::piv::admin::ManagementKey::default_key(), &[1; 8])?, "the default key still works");
    }

    // At the terminal: the PIN the operator chose unlocks.
    let agent = start_agent(&site, "pi-1", &[TerminalSpec { id: TERMINAL, reader: &r.name, keypad: true }]).await?;
    let (res, card) = tap(&agent, &r, card, "246810").await?;
    assert_granted(res, "op-30");

    // Blocked by wrong PINs, unblocked at the station with the escrowed
    // PUK; the operator sets a new PIN.
    let mut card = card;
    {
        let mut piv = PivClient::new(&mut card);
        piv.select()?;
        for _ in 0..3 {
            let _ = piv.verify_pin(&pivgate_hw::Pin::new(b"000000")?);
        }
    }
    assert_eq!(card.pin_tries(), 0);
    // The escrow private key is kept offline; recovery names it.
    let offline = ca_dir.with_file_name("escrow-key-offline.der");
    std::fs::rename(ca_dir.join("escrow-key.der"), &offline)?;
    let offline = offline.to_str().context("path")?.to_string();
    let args = ["card", "pin-unblock", "--card", &card_id, "--reader", &name, "--pin-stdin", "--escrow-key", &offline];
    // A card showing a copy of the CHUID (and serial) gets no PUK: it
    // cannot prove it holds the card's escrowed management key.
    let mut copy = VirtualCard::new(CardContents::blank(30_000_001));
    copy.contents_mut().objects.insert(ObjectTag::CHUID.0, card.contents().objects[&ObjectTag::CHUID.0].clone());
    let (copy, (ok, text)) = at_station(&st, copy, || ctl(&site, &ca_dir, &args, "135790\n"))?;
    assert!(!ok && text.contains("management key"), "{text}");
    assert_eq!(copy.commands_seen(0x2C), 0, "the PUK was sent to a card that copied the CHUID");
    let (card, (ok, text)) = at_station(&st, card, || ctl(&site, &ca_dir, &args, "135790\n"))?;
    assert!(ok, "{text}");
    let (res, card) = tap(&agent, &r, card, "135790").await?;
    assert_granted(res, "op-30");

    // A card pulled in the middle of its issuance: not enrolled, and the
    // administrator is told what it holds.
    let mut pulled = VirtualCard::new(CardContents::blank(30_000_002));
    pulled.add_fault(Fault::DropAt(8));
    let (_, (ok, text)) =
        at_station(&st, pulled, || ctl(&site, &ca_dir, &["card", "issue", "--operator", "op-31", "--reader", &name, "--pin-stdin"], "246810\n"))?;
    assert!(!ok, "an issuance with the card pulled succeeded: {text}");
    assert!(text.contains("not enrolled") && text.contains("a new 9A key") && text.contains("management key is still the default"), "{text}");
    let cards = admin.rpc().list_cards(pb::ListCardsRequest { operator_id: "op-31".into(), ..Default::default() }).await?.into_inner().cards;
    assert!(cards.is_empty(), "a card pulled midway was enrolled: {cards:?}");

    // Retired: revoked at the gateway and blank again.
    let (card, (ok, text)) =
        at_station(&st, card, || ctl(&site, &ca_dir, &["card", "retire", "--card", &card_id, "--reader", &name, "--escrow-key", &offline], ""))?;
    assert!(ok, "{text}");
    assert!(card.contents().keys.is_empty() && card.contents().objects.is_empty(), "keys or objects left");
    assert!(card.contents().management_key.is_default());
    let cards = admin.rpc().list_cards(pb::ListCardsRequest { operator_id: "op-30".into(), ..Default::default() }).await?.into_inner().cards;
    assert!(cards[0].revoked);
    agent.stop().await?;
    site.stop().await
}
