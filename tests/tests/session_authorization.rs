//! A session lasts only while what allowed it still holds: taking away the
//! operator's role, changing the terminal's policy, a CRL that revokes the
//! certificate, and the certificate reaching notAfter each lock a live
//! session at once, with a reason of their own, an event for the consoles
//! and an audit record. Real gateway, mutual TLS on loopback, sled on disk.

use std::time::Duration;

use anyhow::{bail, Result};
use pivgate_hw::piv::{Algorithm, Slot};
use pivgate_proto::v1 as pb;
use pivgate_tests::pki::{self, CrlSpec};
use pivgate_tests::site::{eventually, scratch, tap, Site, Tap};
use pivgate_vcard::{IssuingCa, Profile, ProfileOptions, Validity};

const T: &str = "dispatch-01";

async fn state(site: &Site) -> Result<pb::TerminalState> {
    let mut app = site.application("checker").await?;
    Ok(app.get_terminal_state(pb::GetTerminalStateRequest { terminal_id: T.into() }).await?.into_inner().state.expect("state"))
}

/// Unlocks T with `profile` (operator op-1), watching events; returns the
/// watch stream positioned after the unlock.
async fn unlock(site: &Site, profile: &Profile) -> Result<tonic::Streaming<pb::WatchEventsResponse>> {
    let mut agent = site.agent("pi-1", &[T]).await?;
    let Tap::Granted(g) = tap(&mut agent, T, &mut profile.card(), "123456", pb::Mechanism::Unspecified).await? else {
        bail!("a valid badge was refused");
    };
    let mut app = site.application("console").await?;
    Ok(app.watch_events(pb::WatchEventsRequest { after_sequence: g.sequence, terminal_ids: vec![T.into()] }).await?.into_inner())
}

/// The next event is a lock of T with `reason`, and the audit log says so.
async fn expect_lock(site: &Site, watch: &mut tonic::Streaming<pb::WatchEventsResponse>, reason: pb::LockReason) -> Result<()> {
    let e = match tokio::time::timeout(Duration::from_secs(10), watch.message()).await {
        Ok(Ok(Some(m))) => m.event.expect("event"),
        other => bail!("no lock event: {other:?}"),
    };
    match e.kind {
        Some(pb::event::Kind::Locked(l)) if l.reason == reason as i32 => {}
        other => bail!("expected a {reason:?} lock, got {other:?}"),
    }
    let s = state(site).await?;
    assert!(!s.unlocked && s.lock_reason == reason as i32, "{s:?}");
    let name = format!("{:?}", model_reason(reason));
    let records = site.audit_after(0).await?;
    assert!(
        records.iter().any(|r| r.detail_json.contains(&name) && r.detail_json.contains(&format!("\"events\":[{}", e.sequence))),
        "no audit record for the {name} lock (event {}): {records:?}",
        e.sequence
    );
    Ok(())
}

/// The gateway's own name for a lock reason, as its audit records spell it.
fn model_reason(r: pb::LockReason) -> &'static str {
    match r {
        pb::LockReason::RoleRemoved => "RoleRemoved",
        pb::LockReason::PolicyChanged => "PolicyChanged",
        pb::LockReason::CertificateRevoked => "CertificateRevoked",
        pb::LockReason::CertificateExpired => "CertificateExpired",
        _ => "other",
    }
}

async fn set_operator(site: &Site, roles: &[&str]) -> Result<()> {
    site.admin()
        .await?
        .add_operator(pb::AddOperatorRequest {
            operator: Some(pb::Operator {
                operator_id: "op-1".into(),
                name: "Operator op-1".into(),
                roles: roles.iter().map(|r| r.to_string()).collect(),
                enabled: true,
            }),
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn taking_away_the_operators_role_locks_the_session() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    site.policy(T, &[pb::Mechanism::CardAndPin], &["dispatcher"]).await?;
    let profile = site.enrolled_card("op-1", &["dispatcher", "trainer"], Algorithm::EccP256).await?;
    let mut watch = unlock(&site, &profile).await?;
    // A role added leaves the session alone.
    set_operator(&site, &["dispatcher", "trainer", "supervisor"]).await?;
    assert!(state(&site).await?.unlocked);
    // The role the terminal requires taken away: locked.
    set_operator(&site, &["trainer"]).await?;
    expect_lock(&site, &mut watch, pb::LockReason::RoleRemoved).await?;

    // Any role the session carries taken away, even one the terminal does
    // not require: the consoles act on the session's roles, so it ends.
    set_operator(&site, &["dispatcher", "trainer"]).await?;
    let mut watch = unlock(&site, &profile).await?;
    set_operator(&site, &["dispatcher"]).await?;
    expect_lock(&site, &mut watch, pb::LockReason::RoleRemoved).await
}

#[tokio::test]
async fn a_policy_change_locks_the_sessions_it_no_longer_allows() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    site.policy(T, &[pb::Mechanism::CardAndPin], &["dispatcher"]).await?;
    let profile = site.enrolled_card("op-1", &["dispatcher"], Algorithm::EccP256).await?;
    let mut watch = unlock(&site, &profile).await?;
    // Still allowed: stays.
    site.policy(T, &[pb::Mechanism::CardAndPin, pb::Mechanism::CardOnly], &["dispatcher", "supervisor"]).await?;
    assert!(state(&site).await?.unlocked);
    site.policy(T, &[pb::Mechanism::CardAndPin], &["supervisor"]).await?;
    expect_lock(&site, &mut watch, pb::LockReason::PolicyChanged).await?;

    // A mechanism taken away ends the session too.
    site.policy(T, &[pb::Mechanism::CardAndPin], &[]).await?;
    let mut watch = unlock(&site, &profile).await?;
    site.policy(T, &[pb::Mechanism::CardOnly], &[]).await?;
    expect_lock(&site, &mut watch, pb::LockReason::PolicyChanged).await
}

#[tokio::test]
async fn a_crl_that_revokes_the_certificate_locks_the_session() -> Result<()> {
    let issuer = IssuingCa::generate("test card issuer CA")?;
    let profile = Profile::generate_with_ca(IssuingCa { cert_pem: issuer.cert_pem.clone(), key_pem: issuer.key_pem.clone() }, &ProfileOptions::default())?;
    let dir = scratch("session-crl");
    let crl_path = dir.join("issuer.crl");
    std::fs::write(&crl_path, pki::crl(&issuer, &CrlSpec::revoking(&[], 1))?)?;
    let path = crl_path.clone();
    let site = Site::start_with_issuer(IssuingCa { cert_pem: issuer.cert_pem.clone(), key_pem: issuer.key_pem.clone() }, |c, _| {
        c.cards.crl_files = vec![path];
        c.cards.crl_refresh_s = 1;
    })
    .await?;
    site.enrol(&profile, "op-1", &["dispatcher"]).await?;
    let mut watch = unlock(&site, &profile).await?;
    let serial = pki::serial_of(&profile.certificates[&Slot::Authentication]);
    let tmp = dir.join("issuer.crl.tmp");
    std::fs::write(&tmp, pki::crl(&issuer, &CrlSpec::revoking(&[serial], 2))?)?;
    std::fs::rename(tmp, &crl_path)?;
    expect_lock(&site, &mut watch, pb::LockReason::CertificateRevoked).await
}

#[tokio::test]
async fn a_certificate_reaching_not_after_locks_the_session() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let mut profile = site.card(Algorithm::EccP256)?;
    // The 9A certificate runs out four seconds from now.
    let spki = profile.contents.keys[&Slot::Authentication].spki_der()?;
    let now = time::OffsetDateTime::now_utc();
    let short = Validity { not_before: now - time::Duration::hours(1), not_after: now + time::Duration::seconds(4) };
    let cert = site.issuer.issue_for_spki(Slot::Authentication, &spki, &profile.chuid, "Op", short)?;
    profile.certificates.insert(Slot::Authentication, cert);
    site.enrol(&profile, "op-1", &["dispatcher"]).await?;
    let mut watch = unlock(&site, &profile).await?;
    expect_lock(&site, &mut watch, pb::LockReason::CertificateExpired).await?;
    // And nothing unlocks with it afterwards.
    let mut agent = site.agent("pi-1", &[T]).await?;
    match tap(&mut agent, T, &mut profile.card(), "123456", pb::Mechanism::Unspecified).await? {
        Tap::Denied(pb::DenyReason::CertExpired) => {}
        other => bail!("an expired certificate was not refused: {other:?}"),
    }
    eventually(Duration::from_secs(1), || async { Ok(!state(&site).await?.unlocked) }).await
}
