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
use pivgate_tests::run_tool as run;
use pivgate_tests::site::{scratch, Site};
use pivgate_tests::{reader, Reader};
use pivgate_vcard::profile::pem_decode;
use pivgate_vcard::{vpcd, AttestationCa, CardContents, VirtualCard};

const T: Duration = Duration::from_secs(20);
const TERMINAL: &str = "dispatch-01";

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
    provision_with(r, ca, card, &["-A", algorithm], upn)
}

/// [`provision`] with GENERATE's arguments (algorithm, PIN policy).
fn provision_with(r: &Station, ca: &CorporateCa, card: VirtualCard, generate: &[&str], upn: &str) -> Result<(VirtualCard, Vec<u8>)> {
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
    let out = path(&public)?;
    tool(&[&["-a", "generate", "-s", "9a", "-o", out.as_str()], generate].concat())?;
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

/// An attestation and the token's attestation certificate, DER.
type Attested = (Vec<u8>, Vec<u8>);

/// The token's attestation of its 9A key and its attestation certificate
/// (F9), read at the IT station with yubico-piv-tool; `None` when the
/// token will not attest the key.
fn attestation(r: &Station, dir: &Path, card: VirtualCard) -> Result<(VirtualCard, Option<Attested>)> {
    std::fs::create_dir_all(dir)?;
    let (att, f9) = (dir.join("9a-attestation.pem"), dir.join("f9.pem"));
    let inserted = vpcd::insert(card, r.addr)?;
    let ctx = pivgate_hw::pcsc::establish()?;
    if !pivgate_hw::pcsc::wait_for_card(&ctx, &r.name, true, T)? {
        bail!("the card never appeared in {}", r.name);
    }
    let tool = |args: &[&str]| run(Command::new("yubico-piv-tool").args(["-r", &r.name]).args(args));
    let path = |p: &Path| p.to_str().map(str::to_string).context("path");
    let attested = tool(&["-a", "attest", "-s", "9a", "-o", &path(&att)?]).is_ok();
    let result = if attested {
        tool(&["-a", "read-certificate", "-s", "f9", "-o", &path(&f9)?])?;
        Some((pem_decode(&std::fs::read_to_string(&att)?)?, pem_decode(&std::fs::read_to_string(&f9)?)?))
    } else {
        None
    };
    Ok((removed(inserted, &r.name)?, result))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_policy_requires_it_only_an_attested_pin_key_enrols_and_unlocks() -> Result<()> {
    let r = reader()?;
    let it = Station::of(&r);
    let dir = scratch("attestation");
    let ca = CorporateCa::create(&dir.join("ca"))?;
    let root = AttestationCa::generate("test PIV attestation root")?;
    let token = |serial: u32| -> Result<VirtualCard> {
        let mut c = blank(serial);
        c.contents_mut().attestation = Some(root.device(serial)?);
        Ok(c)
    };
    let root_pem = dir.join("attestation-root.pem");
    std::fs::write(&root_pem, &root.cert_pem)?;
    let anchor = ca.cert.clone();
    let mut site = Site::start(move |c, _| {
        c.cards.enrolled_key_anchors = vec![anchor];
        c.cards.policies_9a.clear();
        c.cards.attestation_roots = vec![root_pem];
    })
    .await?;
    let op = |id: &str| Operator { id: id.into(), name: id.into(), roles: vec!["dispatcher".into()], enabled: true };
    // Enrolled before the site required attestation: refused from then on.
    let (earlier, earlier_cert) = provision(&it, &ca, token(20_000_000)?, "ECCP256", "op20@corp.example")?;
    site.admin_client().await?.add_operator_with_card(&op("op-20"), &earlier_cert, GwSlot::PivAuthentication).await?;
    site.stop().await?;
    site.config.cards.require_attested_pin_key = true;
    let site = site.resume().await?;
    let mut admin = site.admin_client().await?;

    // A key generated on the token with PIN policy "never" stands in for
    // no PIN key, whatever its certificate says.
    let (never, never_cert) = provision_with(&it, &ca, token(20_000_001)?, &["-A", "ECCP256", "--pin-policy=never"], "op21@corp.example")?;
    let (_, never_att) = attestation(&it, &dir.join("never"), never)?;
    let (a, f9) = never_att.context("the token attests a key it generated")?;
    admin.add_operator(&op("op-21")).await?;
    let e = admin.enrol_card_with("op-21", &never_cert, GwSlot::PivAuthentication, None, Some((&a, &f9))).await;
    let text = format!("{:?}", e.expect_err("a PIN-never key enrolled as the PIN key"));
    assert!(text.contains("PIN policy Never"), "{text}");

    // A key put on the card from outside is not attested at all.
    let outside = pivgate_vcard::Profile::generate_with_ca(
        pivgate_vcard::IssuingCa { cert_pem: site.issuer.cert_pem.clone(), key_pem: site.issuer.key_pem.clone() },
        &pivgate_vcard::ProfileOptions::default(),
    )?;
    let mut imported = outside.card();
    imported.contents_mut().attestation = Some(root.device(imported.contents().serial)?);
    let (_, none) = attestation(&it, &dir.join("imported"), imported)?;
    assert!(none.is_none(), "the token attested a key it did not generate");
    let e = admin.enrol_card("op-21", &never_cert, GwSlot::PivAuthentication).await;
    let text = format!("{:?}", e.expect_err("an unattested key enrolled where policy requires attestation"));
    assert!(text.contains("require_attested_pin_key"), "{text}");
    // Nor can another key's attestation stand in for it.
    let (good, good_cert) = provision_with(&it, &ca, token(20_000_002)?, &["-A", "ECCP256"], "op22@corp.example")?;
    let (good, good_att) = attestation(&it, &dir.join("good"), good)?;
    let (a, f9) = good_att.context("an attestation")?;
    let e = admin.enrol_card_with("op-21", &never_cert, GwSlot::PivAuthentication, None, Some((&a, &f9))).await;
    assert!(format!("{:?}", e.expect_err("another key's attestation")).contains("another key"));

    // Generated on the token, PIN policy once (the default): enrolled, with
    // what the attestation proved, and it unlocks.
    admin.add_operator(&op("op-22")).await?;
    let card = admin.enrol_card_with("op-22", &good_cert, GwSlot::PivAuthentication, None, Some((&a, &f9))).await?;
    assert_eq!(card.identity, "enrolled-key");
    let records = site.audit_after(0).await?;
    let enrolled = records.iter().rev().find(|r| r.kind == "admin.enrol_card").context("no enrolment record")?;
    assert!(enrolled.detail_json.contains("\"pin_policy\":\"once\"") && enrolled.detail_json.contains("20000002"), "{}", enrolled.detail_json);
    let agent = start_agent(&site, "pi-1", &[TerminalSpec { id: TERMINAL, reader: &r.name, keypad: true }]).await?;
    let (res, _, _) = tap(&agent, &r, good, "123456").await?;
    assert_granted(res, "op-22");
    let (res, _, _) = tap(&agent, &r, earlier, "123456").await?;
    assert_eq!(res, TapResult::Denied(pb::DenyReason::KeyNotAttested), "a card enrolled before the rule");
    agent.stop().await
}
