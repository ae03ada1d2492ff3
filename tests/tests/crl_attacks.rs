//! Revocation under attack: CRLs that lie, replay, crowd out or hide, and
//! paths through intermediates. Each scenario runs a real gateway (mutual
//! TLS on loopback, sled on disk) whose CRLs come from files or an HTTP(S)
//! server the attacker controls, and checks both the decision and the
//! audit trail.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use pivgate_hw::piv::{Algorithm, Slot};
use pivgate_proto::v1 as pb;
use pivgate_tests::pki::{self, CrlServer, CrlSpec};
use pivgate_tests::site::{scratch, tap, Site, Tap};
use pivgate_vcard::{IssuingCa, Profile, ProfileOptions, Validity};
use time::OffsetDateTime;

const T: &str = "console";

fn copy(ca: &IssuingCa) -> IssuingCa {
    IssuingCa { cert_pem: ca.cert_pem.clone(), key_pem: ca.key_pem.clone() }
}

/// A card from `ca`; its 9A certificate names `dp` as CRL distribution
/// point when given.
fn card(ca: &IssuingCa, dp: Option<&str>) -> Result<Profile> {
    let mut p = Profile::generate_with_ca(copy(ca), &ProfileOptions { algorithm: Algorithm::EccP256, ..Default::default() })?;
    if let Some(dp) = dp {
        let spki = p.contents.keys[&Slot::Authentication].spki_der()?;
        let cert = ca.issue_with(Slot::Authentication, &spki, &p.chuid, "Op", Validity::days(30), |params| {
            params.crl_distribution_points = vec![rcgen::CrlDistributionPoint { uris: vec![dp.to_string()] }];
        })?;
        p.contents.objects.insert(0x5FC105, pivgate_hw::piv::objects::certificate_container(&cert, false));
        p.certificates.insert(Slot::Authentication, cert);
    }
    Ok(p)
}

fn serial_9a(p: &Profile) -> Vec<u8> {
    pki::serial_of(&p.certificates[&Slot::Authentication])
}

fn ago(minutes: i64) -> OffsetDateTime {
    OffsetDateTime::now_utc() - time::Duration::minutes(minutes)
}

fn spec(revoked: &[Vec<u8>], number: u64, this_update: OffsetDateTime) -> CrlSpec {
    CrlSpec { this_update, ..CrlSpec::revoking(revoked, number) }
}

/// Writes `bytes` to `path` by rename, so a refresh never reads half a file.
fn put(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(tmp, path)?;
    Ok(())
}

/// Waits for an audit record of `kind` whose detail contains `needle`.
async fn audited(site: &Site, kind: &str, needle: &str) -> Result<pb::AuditRecord> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(r) = site.audit_after(0).await?.into_iter().find(|r| r.kind == kind && r.detail_json.contains(needle)) {
            return Ok(r);
        }
        if std::time::Instant::now() > deadline {
            bail!("no {kind} audit record with {needle}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until there are `n` records of `kind` containing `needle`.
async fn eventually_count(site: &Site, kind: &str, needle: &str, n: usize) -> Result<bool> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if count(site, kind, needle).await? >= n {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(false)
}

async fn count(site: &Site, kind: &str, needle: &str) -> Result<usize> {
    Ok(site.audit_after(0).await?.iter().filter(|r| r.kind == kind && r.detail_json.contains(needle)).count())
}

/// A site with terminal T (card and PIN), agent pi-1 bound to it, and CRL
/// files `files` (written before start) refreshed every second.
async fn site_with(issuer: IssuingCa, files: &[(&str, Vec<u8>)], tweak: impl FnOnce(&mut pivgate_gateway::Config, &Path)) -> Result<(Site, PathBuf)> {
    let dir = scratch("crls");
    let mut paths = Vec::new();
    for (name, der) in files {
        let p = dir.join(name);
        put(&p, der)?;
        paths.push(p);
    }
    let site = Site::start_with_issuer(issuer, |c, d| {
        c.cards.crl_files = paths;
        c.cards.crl_refresh_s = 1;
        tweak(c, d);
    })
    .await?;
    site.policy(T, &[pb::Mechanism::CardAndPin], &[]).await?;
    Ok((site, dir))
}

async fn tap_card(site: &Site, profile: &Profile) -> Result<Tap> {
    let mut agent = site.agent("pi-1", &[T]).await?;
    let r = tap(&mut agent, T, &mut profile.card(), "123456", pb::Mechanism::Unspecified).await?;
    if let Tap::Granted(_) = r {
        // Leave the terminal locked for the next tap.
        agent.rpc().report_card_removed(pb::ReportCardRemovedRequest { terminal_id: T.into(), card_uuid: vec![] }).await?;
    }
    Ok(r)
}

fn refused(r: &Tap, reason: pb::DenyReason) -> Result<()> {
    match r {
        Tap::Denied(d) if *d == reason => Ok(()),
        other => bail!("expected {reason:?}, got {other:?}"),
    }
}

async fn enrol_refusal(site: &Site, profile: &Profile, operator: &str) -> Result<String> {
    match site.enrol(profile, operator, &["dispatcher"]).await {
        Ok(()) => bail!("a card that must be refused was enrolled"),
        Err(e) => Ok(format!("{e:#}")),
    }
}

#[tokio::test]
async fn forged_crl_with_the_issuers_name_cannot_switch_revocation_off() -> Result<()> {
    // The attacker knows the issuer's name, not its key. Their CRL carries
    // the name, a thisUpdate far in the future, a high number, no
    // revocations and a CA-only scope: before, it evicted the genuine CRL
    // and the revoked card unlocked.
    let issuer = IssuingCa::generate("test card issuer CA")?;
    let forger = IssuingCa::generate("test card issuer CA")?;
    let victim = card(&issuer, None)?;
    let empty = pki::crl(&issuer, &spec(&[], 1, ago(10)))?;
    let mut forged_spec = spec(&[], 999_999, OffsetDateTime::now_utc() + time::Duration::days(300));
    forged_spec.next_update = OffsetDateTime::now_utc() + time::Duration::days(600);
    forged_spec.scope = Some(rcgen::CrlScope::CaCertsOnly);
    forged_spec.idp_uris = vec!["http://crl.example/arl.crl".into()];
    let forged = pki::crl(&forger, &forged_spec)?;
    let (site, dir) = site_with(copy(&issuer), &[("genuine.crl", empty), ("forged.crl", forged)], |_, _| {}).await?;
    site.enrol(&victim, "op-1", &["dispatcher"]).await?;

    // The card is reported lost; the issuer publishes it.
    put(&dir.join("genuine.crl"), &pki::crl(&issuer, &spec(&[serial_9a(&victim)], 2, ago(1)))?)?;
    audited(&site, "crl.accepted", "\"revoked\":1").await?;
    refused(&tap_card(&site, &victim).await?, pb::DenyReason::RevokedCrl)?;

    // The forgery was refused for its signature, audited once however
    // often the refresh saw it.
    let r = audited(&site, "crl.refused", "forged.crl").await?;
    assert!(r.detail_json.contains("\"reason\":\"bad_signature\""), "{}", r.detail_json);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(count(&site, "crl.refused", "forged.crl").await?, 1);
    refused(&tap_card(&site, &victim).await?, pb::DenyReason::RevokedCrl)?;

    // A forgery that would replace the genuine CRL (same issuer name, no
    // distribution point, newer): only its signature gives it away.
    put(&dir.join("forged.crl"), &pki::crl(&forger, &spec(&[], 3, ago(0)))?)?;
    assert!(eventually_count(&site, "crl.refused", "forged.crl", 2).await?);
    refused(&tap_card(&site, &victim).await?, pb::DenyReason::RevokedCrl)?;

    // Signed by the issuer but dated far ahead: refused too.
    let mut ahead = spec(&[], 3, OffsetDateTime::now_utc() + time::Duration::days(2));
    ahead.next_update = OffsetDateTime::now_utc() + time::Duration::days(3);
    put(&dir.join("forged.crl"), &pki::crl(&issuer, &ahead)?)?;
    let r = audited(&site, "crl.refused", "this_update_in_the_future").await?;
    assert!(r.detail_json.contains("forged.crl"), "{}", r.detail_json);
    refused(&tap_card(&site, &victim).await?, pb::DenyReason::RevokedCrl)
}

#[tokio::test]
async fn crl_from_another_ca_at_the_same_location_does_not_drop_the_genuine_one() -> Result<()> {
    let issuer = IssuingCa::generate("test card issuer CA")?;
    let other = IssuingCa::generate("another trusted issuer")?;
    let victim = card(&issuer, None)?;
    let server = CrlServer::http(pki::crl(&issuer, &spec(&[], 1, ago(10)))?).await?;
    let url = server.http_url();
    let other_pem = copy(&other).cert_pem;
    let (site, _dir) = site_with(copy(&issuer), &[], |c, d| {
        let p = d.join("other-issuer.pem");
        std::fs::write(&p, other_pem).unwrap();
        c.cards.trust_anchors.push(p);
        c.cards.crl_urls = vec![url];
    })
    .await?;
    site.enrol(&victim, "op-1", &["dispatcher"]).await?;
    server.set(pki::crl(&issuer, &spec(&[serial_9a(&victim)], 2, ago(1)))?);
    audited(&site, "crl.accepted", "\"revoked\":1").await?;
    refused(&tap_card(&site, &victim).await?, pb::DenyReason::RevokedCrl)?;

    // The location now serves another (trusted, validly signed) issuer's
    // CRL. It counts for its own issuer and drops nothing.
    server.set(pki::crl(&other, &spec(&[], 50, ago(0)))?);
    audited(&site, "crl.accepted", "\"crl_number\":\"32\"").await?;
    refused(&tap_card(&site, &victim).await?, pb::DenyReason::RevokedCrl)
}

#[tokio::test]
async fn restart_does_not_go_back_to_an_older_crl() -> Result<()> {
    let issuer = IssuingCa::generate("test card issuer CA")?;
    let victim = card(&issuer, None)?;
    let old = pki::crl(&issuer, &spec(&[], 1, ago(10)))?;
    let (site, dir) = site_with(copy(&issuer), &[("issuer.crl", old.clone())], |_, _| {}).await?;
    site.enrol(&victim, "op-1", &["dispatcher"]).await?;
    put(&dir.join("issuer.crl"), &pki::crl(&issuer, &spec(&[serial_9a(&victim)], 2, ago(1)))?)?;
    audited(&site, "crl.accepted", "\"revoked\":1").await?;
    refused(&tap_card(&site, &victim).await?, pb::DenyReason::RevokedCrl)?;

    // While the gateway is down, the attacker puts back the old CRL.
    put(&dir.join("issuer.crl"), &old)?;
    let site = site.restart().await?;
    refused(&tap_card(&site, &victim).await?, pb::DenyReason::RevokedCrl)?;
    let r = audited(&site, "crl.refused", "\"reason\":\"rollback\"").await?;
    assert!(r.detail_json.contains("issuer.crl"), "{}", r.detail_json);
    Ok(())
}

#[tokio::test]
async fn partitioned_crls_both_apply() -> Result<()> {
    // One issuer, two partitions: each card names its partition's
    // distribution point, each partition's CRL revokes one card.
    let issuer = IssuingCa::generate("test card issuer CA")?;
    let (u1, u2) = ("http://crl.example/part1.crl", "http://crl.example/part2.crl");
    let in_1 = card(&issuer, Some(u1))?;
    let in_2 = card(&issuer, Some(u2))?;
    let fine = card(&issuer, Some(u1))?;
    let mut p1 = spec(&[serial_9a(&in_1)], 1, ago(5));
    p1.idp_uris = vec![u1.into()];
    let mut p2 = spec(&[serial_9a(&in_2)], 2, ago(1));
    p2.idp_uris = vec![u2.into()];
    let (site, _dir) = site_with(copy(&issuer), &[("part1.crl", pki::crl(&issuer, &p1)?), ("part2.crl", pki::crl(&issuer, &p2)?)], |_, _| {}).await?;
    for (p, op) in [(&in_1, "op-1"), (&in_2, "op-2")] {
        let e = enrol_refusal(&site, p, op).await?;
        assert!(e.contains("revoked_crl"), "{e}");
    }
    site.enrol(&fine, "op-3", &["dispatcher"]).await?;
    match tap_card(&site, &fine).await? {
        Tap::Granted(g) => assert_eq!(g.operator_id, "op-3"),
        other => bail!("the unrevoked card of partition 1 was refused: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn require_crl_counts_a_ca_only_crl_as_no_coverage() -> Result<()> {
    let issuer = IssuingCa::generate("test card issuer CA")?;
    let card_1 = card(&issuer, None)?;
    let mut ca_only = spec(&[], 1, ago(1));
    ca_only.scope = Some(rcgen::CrlScope::CaCertsOnly);
    ca_only.idp_uris = vec!["http://crl.example/arl.crl".into()];
    let (site, _dir) = site_with(copy(&issuer), &[("arl.crl", pki::crl(&issuer, &ca_only)?)], |c, _| c.cards.require_crl = true).await?;
    let e = enrol_refusal(&site, &card_1, "op-1").await?;
    assert!(e.contains("crl_stale"), "{e}");
    Ok(())
}

#[tokio::test]
async fn cards_chain_through_intermediates_whose_expiry_and_revocation_count() -> Result<()> {
    let root = pki::root("test card root CA")?;
    let now = OffsetDateTime::now_utc();
    let good = pki::intermediate(&root, "issuing CA 1", now - time::Duration::days(1), now + time::Duration::days(365))?;
    let expired = pki::intermediate(&root, "issuing CA 2", now - time::Duration::days(30), now - time::Duration::days(1))?;
    let revoked = pki::intermediate(&root, "issuing CA 3", now - time::Duration::days(1), now + time::Duration::days(365))?;
    let arl = pki::crl(&root, &spec(&[pki::serial_of(&pki::der_of(&revoked.cert_pem))], 1, ago(1)))?;
    let pems: Vec<String> = [&good, &expired, &revoked].iter().map(|c| c.cert_pem.clone()).collect();
    let root_pem = root.cert_pem.clone();
    let (site, _dir) = site_with(copy(&root), &[("root.crl", arl)], move |c, d| {
        let anchor = d.join("root.pem");
        std::fs::write(&anchor, root_pem).unwrap();
        c.cards.trust_anchors = vec![anchor];
        c.cards.intermediates = pems
            .iter()
            .enumerate()
            .map(|(i, pem)| {
                let p = d.join(format!("intermediate-{i}.pem"));
                std::fs::write(&p, pem).unwrap();
                p
            })
            .collect();
    })
    .await?;
    let through_good = card(&good, None)?;
    site.enrol(&through_good, "op-1", &["dispatcher"]).await?;
    match tap_card(&site, &through_good).await? {
        Tap::Granted(g) => assert_eq!(g.operator_id, "op-1"),
        other => bail!("a card through a valid intermediate was refused: {other:?}"),
    }
    let e = enrol_refusal(&site, &card(&expired, None)?, "op-2").await?;
    assert!(e.contains("cert_expired"), "{e}");
    let e = enrol_refusal(&site, &card(&revoked, None)?, "op-3").await?;
    assert!(e.contains("revoked_crl"), "{e}");
    Ok(())
}

#[tokio::test]
async fn an_intermediate_that_does_not_chain_to_an_anchor_is_a_configuration_error() -> Result<()> {
    let root = pki::root("test card root CA")?;
    let stranger = pki::root("someone else's root")?;
    let now = OffsetDateTime::now_utc();
    let orphan = pki::intermediate(&stranger, "orphan CA", now - time::Duration::days(1), now + time::Duration::days(30))?;
    let r = Site::start_with_issuer(copy(&root), |c, d| {
        let p = d.join("orphan.pem");
        std::fs::write(&p, &orphan.cert_pem).unwrap();
        c.cards.intermediates = vec![p];
    })
    .await;
    match r {
        Ok(_) => bail!("the gateway started with an intermediate from an untrusted root"),
        Err(e) => assert!(format!("{e:#}").contains("does not chain to a trusted card issuer"), "{e:#}"),
    }
    Ok(())
}

#[tokio::test]
async fn crls_fetched_over_https() -> Result<()> {
    let issuer = IssuingCa::generate("test card issuer CA")?;
    let victim = card(&issuer, None)?;
    let (server, root_pem) = CrlServer::https(pki::crl(&issuer, &spec(&[serial_9a(&victim)], 4, ago(1)))?).await?;
    let url = server.https_url();
    let (site, _dir) = site_with(copy(&issuer), &[], move |c, d| {
        let roots = d.join("crl-tls-roots.pem");
        std::fs::write(&roots, root_pem).unwrap();
        c.cards.crl_tls_roots = roots;
        c.cards.crl_urls = vec![url];
    })
    .await?;
    let r = audited(&site, "crl.accepted", "https://").await?;
    assert!(r.detail_json.contains("\"revoked\":1"), "{}", r.detail_json);
    let e = enrol_refusal(&site, &victim, "op-1").await?;
    assert!(e.contains("revoked_crl"), "{e}");
    Ok(())
}

#[tokio::test]
async fn an_expired_crl_for_a_scope_never_seen_is_refused() -> Result<()> {
    // A genuinely signed CRL from long ago, for a distribution point the
    // issuer no longer publishes: accepted, it would make every card of
    // that scope stale under a strict policy, for good.
    let issuer = IssuingCa::generate("test card issuer CA")?;
    let victim = card(&issuer, None)?;
    let mut old = spec(&[], 1, OffsetDateTime::now_utc() - time::Duration::days(30));
    old.next_update = OffsetDateTime::now_utc() - time::Duration::days(23);
    old.idp_uris = vec!["http://crl.example/retired.crl".into()];
    let current = pki::crl(&issuer, &spec(&[], 5, ago(1)))?;
    let (site, _dir) = site_with(copy(&issuer), &[("current.crl", current), ("old.crl", pki::crl(&issuer, &old)?)], |c, _| c.cards.crl_strict = true).await?;
    let r = audited(&site, "crl.refused", "old.crl").await?;
    assert!(r.detail_json.contains("\"reason\":\"expired\""), "{}", r.detail_json);
    site.enrol(&victim, "op-1", &["dispatcher"]).await?;
    match tap_card(&site, &victim).await? {
        Tap::Granted(g) => assert_eq!(g.operator_id, "op-1"),
        other => bail!("a card was refused for a CRL that should never have counted: {other:?}"),
    }
    Ok(())
}
