//! Tokens as a site's IT hands them out: a blank YubiKey-like card in a
//! vpcd reader behind the real pcscd, provisioned with `yubico-piv-tool`
//! and an `openssl` CA only (no pivgate code): the key generated on the
//! card, a smart-card logon certificate for it with a Windows UPN and no
//! card UUID, no CHUID. The gateway trusts that
//! CA under the enrolled-key identity rule; a real agent unlocks with it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pivgate_agent::terminal::TapResult;
use pivgate_gateway::model::{Operator, Slot as GwSlot};
use pivgate_hw::indicator::Pattern;
use pivgate_proto::v1 as pb;
use pivgate_tests::agent::{assert_granted, start_agent, AgentUnderTest, TerminalSpec};
use pivgate_tests::site::{scratch, Site};
use pivgate_tests::{reader, Reader};
use pivgate_vcard::profile::pem_decode;
use pivgate_vcard::{vpcd, CardContents, VirtualCard};

const T: Duration = Duration::from_secs(20);
const TERMINAL: &str = "dispatch-01";

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{cmd:?} failed: {text}");
    }
    Ok(text)
}

/// The corporate smart-card CA, made with openssl as an IT department
/// would.
struct CorporateCa {
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl CorporateCa {
    fn create(dir: &Path) -> Result<CorporateCa> {
        std::fs::create_dir_all(dir)?;
        let (cert, key) = (dir.join("corp-ca.pem"), dir.join("corp-ca.key"));
        run(Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "3650"])
            .args(["-subj", "/O=Example Utilities/CN=Example Utilities Smart Card CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert))?;
        // A smart-card logon certificate: the holder's UPN in the SAN (an
        // otherName, as AD CS issues it), client auth and smart-card logon
        // EKUs, no urn:uuid.
        std::fs::write(
            dir.join("logon.cnf"),
            "[logon]\nbasicConstraints = CA:FALSE\nkeyUsage = critical, digitalSignature\n\
             extendedKeyUsage = clientAuth, 1.3.6.1.4.1.311.20.2.2\n\
             subjectAltName = otherName:1.3.6.1.4.1.311.20.2.3;UTF8:${ENV::UPN}\n",
        )?;
        Ok(CorporateCa { dir: dir.to_path_buf(), cert, key })
    }

    /// Issues a certificate for the public key in `public` (PEM), for
    /// `upn`, into `out` (PEM).
    fn issue(&self, public: &Path, upn: &str, out: &Path) -> Result<()> {
        run(Command::new("openssl")
            .env("UPN", upn)
            .args(["x509", "-new", "-days", "365", "-sha256", "-extensions", "logon"])
            .args(["-subj", &format!("/O=Example Utilities/CN={upn}")])
            .arg("-force_pubkey")
            .arg(public)
            .arg("-CA")
            .arg(&self.cert)
            .arg("-CAkey")
            .arg(&self.key)
            .arg("-CAcreateserial")
            .arg("-extfile")
            .arg(self.dir.join("logon.cnf"))
            .arg("-out")
            .arg(out))?;
        Ok(())
    }
}

/// The IT department's reader: the rig's second slot, which no agent
/// watches.
struct Station {
    name: String,
    addr: std::net::SocketAddr,
}

impl Station {
    fn of(r: &Reader) -> Station {
        let (name, addr) = r.second_slot();
        Station { name, addr }
    }
}

/// Provisions `card` at the IT station as a site's IT does: 9A key
/// generated on the card, a certificate for its public key from the CA,
/// imported. Returns the card (out of the reader) and the certificate, DER.
fn provision(r: &Station, ca: &CorporateCa, card: VirtualCard, algorithm: &str, upn: &str) -> Result<(VirtualCard, Vec<u8>)> {
    let dir = ca.dir.join(upn);
    std::fs::create_dir_all(&dir)?;
    let (public, cert) = (dir.join("9a-public.pem"), dir.join("9a.pem"));
    let inserted = vpcd::insert(card, r.addr)?;
    let ctx = pivgate_hw::pcsc::establish()?;
    if !pivgate_hw::pcsc::wait_for_card(&ctx, &r.name, true, T)? {
        bail!("the card never appeared in {}", r.name);
    }
    let tool = |args: &[&str]| run(Command::new("yubico-piv-tool").args(["-r", &r.name]).args(args));
    let path = |p: &Path| p.to_str().map(str::to_string).context("path");
    tool(&["-a", "generate", "-s", "9a", "-A", algorithm, "-o", &path(&public)?])?;
    ca.issue(&public, upn, &cert)?;
    tool(&["-a", "import-certificate", "-s", "9a", "-i", &path(&cert)?])?;
    tool(&["-a", "status"])?;
    let card = removed(inserted, &r.name)?;
    assert!(!card.contents().objects.contains_key(&pivgate_hw::piv::ObjectTag::CHUID.0), "provisioning wrote a CHUID");
    Ok((card, pem_decode(&std::fs::read_to_string(&cert)?)?))
}

/// Takes the card out and waits until pcscd has seen it go.
fn removed(inserted: vpcd::Inserted, reader: &str) -> Result<VirtualCard> {
    let card = inserted.remove();
    let ctx = pivgate_hw::pcsc::establish()?;
    if !pivgate_hw::pcsc::wait_for_card(&ctx, reader, false, T)? {
        bail!("pcscd still sees a card in {reader}");
    }
    Ok(card)
}

/// One badge tap at the agent's terminal, typing `pin` when asked: the
/// result, the card back, and the APDUs the tap cost.
async fn tap(agent: &AgentUnderTest, r: &Reader, card: VirtualCard, pin: &str) -> Result<(TapResult, VirtualCard, usize)> {
    let before = card.apdu_count();
    let since = agent.history(TERMINAL).len();
    let inserted = vpcd::insert(card, r.addr)?;
    let prompted = tokio::select! {
        p = agent.wait_pattern(TERMINAL, Pattern::EnterPin, since, T) => Some(p?),
        res = agent.next_result(TERMINAL, T) => {
            let card = removed(inserted, &r.name)?;
            let n = card.apdu_count() - before;
            return Ok((res?, card, n));
        }
    };
    assert!(prompted.is_some());
    agent.type_keys(TERMINAL, &format!("{pin}#"));
    let result = agent.next_result(TERMINAL, T).await?;
    let card = removed(inserted, &r.name)?;
    let n = card.apdu_count() - before;
    Ok((result, card, n))
}

async fn site_trusting(ca: &CorporateCa) -> Result<Site> {
    let anchor = ca.cert.clone();
    Site::start(move |c, _| {
        c.cards.enrolled_key_anchors = vec![anchor];
        // Corporate certificates carry no FIPS 201 policies.
        c.cards.policies_9a.clear();
        c.cards.policies_9e.clear();
    })
    .await
}

async fn enrol(site: &Site, operator: &str, der: &[u8]) -> Result<pb::Card> {
    let op = Operator { id: operator.into(), name: format!("Operator {operator}"), roles: vec!["dispatcher".into()], enabled: true };
    Ok(site.admin_client().await?.add_operator_with_card(&op, der, GwSlot::PivAuthentication).await?)
}

fn blank(serial: u32) -> VirtualCard {
    VirtualCard::new(CardContents::blank(serial))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_provisioned_with_yubico_piv_tool_and_openssl_enrol_and_unlock() -> Result<()> {
    let r = reader()?;
    let it = Station::of(&r);
    let ca = CorporateCa::create(&scratch("corp-ca"))?;
    let (p256, p256_cert) = provision(&it, &ca, blank(10_000_001), "ECCP256", "op17@corp.example")?;
    let (rsa, rsa_cert) = provision(&it, &ca, blank(10_000_002), "RSA2048", "op18@corp.example")?;

    // A gateway that knows the CA only as a FIPS 201 issuer refuses the
    // card at enrolment and says what to change.
    let anchor = ca.cert.clone();
    let mut strict = Site::start(move |c, _| {
        c.cards.trust_anchors = vec![anchor];
        c.cards.policies_9a.clear();
    })
    .await?;
    let op = Operator { id: "op-17".into(), name: "Op".into(), roles: vec![], enabled: true };
    let refused = strict.admin_client().await?.add_operator_with_card(&op, &p256_cert, GwSlot::PivAuthentication).await;
    let text = format!("{:?}", refused.expect_err("a certificate without a card UUID enrolled under the fips201 rule"));
    assert!(text.contains("enrolled_key_anchors"), "{text}");
    strict.stop().await?;

    let site = site_trusting(&ca).await?;
    let card17 = enrol(&site, "op-17", &p256_cert).await?;
    assert_eq!(card17.identity, "enrolled-key");
    let card18 = enrol(&site, "op-18", &rsa_cert).await?;
    assert_ne!(card17.card_uuid, card18.card_uuid);
    let agent = start_agent(&site, "pi-1", &[TerminalSpec { id: TERMINAL, reader: &r.name, keypad: true }]).await?;

    // First tap of each: found by its certificate's key.
    let (res, p256, first) = tap(&agent, &r, p256, "123456").await?;
    assert_granted(res, "op-17");
    let (res, rsa, _) = tap(&agent, &r, rsa, "123456").await?;
    assert_granted(res, "op-18");
    // Known now, by its serial: SELECT, GET SERIAL, VERIFY, GENERAL
    // AUTHENTICATE, VERIFY (reset).
    let (res, p256, known) = tap(&agent, &r, p256, "123456").await?;
    assert_granted(res, "op-17");
    assert_eq!(known, 5, "a known token without a CHUID (the first tap took {first})");
    eprintln!("APDUs of a CHUID-less token: first tap {first}, known {known}");
    let (res, rsa, known) = tap(&agent, &r, rsa, "123456").await?;
    assert_granted(res, "op-18");
    // RSA-2048 through a reader without extended length: the 256-byte
    // signature input goes as two chained commands and the signature comes
    // back with one GET RESPONSE, so GENERAL AUTHENTICATE is three APDUs.
    assert_eq!(known, 7, "RSA-2048, chained through vpcd");

    // A second token with the first one's serial (a cloned identity) and a
    // key of its own, certified by the same CA but never enrolled: the
    // agent's memory names op-17's card, the signature is not op-17's key.
    let (clone, _) = provision(&it, &ca, blank(10_000_001), "ECCP256", "op17@corp.example")?;
    let (res, clone, _) = tap(&agent, &r, clone, "123456").await?;
    assert_eq!(res, TapResult::Denied(pb::DenyReason::BadSignature));
    // Asked afresh, it is found by its own key: not enrolled.
    let (res, _, _) = tap(&agent, &r, clone, "123456").await?;
    assert_eq!(res, TapResult::Denied(pb::DenyReason::UnknownCard));
    // The real op-17 still unlocks (looked up afresh once).
    let (res, p256, _) = tap(&agent, &r, p256, "123456").await?;
    assert_granted(res, "op-17");

    // A CHUID written later (yubico-piv-tool -a set-chuid), copied onto a
    // third token with another key: the same CHUID GUID is no identity.
    let inserted = vpcd::insert(rsa, it.addr)?;
    let ctx = pivgate_hw::pcsc::establish()?;
    assert!(pivgate_hw::pcsc::wait_for_card(&ctx, &it.name, true, T)?);
    run(Command::new("yubico-piv-tool").args(["-r", &it.name, "-a", "set-chuid"]))?;
    let rsa = removed(inserted, &it.name)?;
    let chuid = rsa.contents().objects.get(&pivgate_hw::piv::ObjectTag::CHUID.0).cloned().context("set-chuid wrote no CHUID")?;
    let (mut copy, _) = provision(&it, &ca, blank(10_000_003), "ECCP256", "op18@corp.example")?;
    copy.contents_mut().objects.insert(pivgate_hw::piv::ObjectTag::CHUID.0, chuid);
    let (res, _, _) = tap(&agent, &r, copy, "123456").await?;
    assert!(matches!(res, TapResult::Denied(pb::DenyReason::UnknownCard | pb::DenyReason::BadSignature)), "{res:?}");
    let (res, rsa, _) = tap(&agent, &r, rsa, "123456").await?;
    assert_granted(res, "op-18");

    // Revoked: refused at once, by the card id the gateway listed.
    site.admin_client().await?.revoke_card(&card17.card_uuid, "lost").await?;
    let (res, _, _) = tap(&agent, &r, p256, "123456").await?;
    assert_eq!(res, TapResult::Denied(pb::DenyReason::RevokedDenyList));
    let (res, _, _) = tap(&agent, &r, rsa, "123456").await?;
    assert_granted(res, "op-18");
    agent.stop().await
}
