//! Every way an authentication must fail, over real gRPC with mutual TLS on
//! loopback and a real sled database: each is refused with its own reason
//! code and its own audit record, and the terminal stays locked.

use std::time::Duration;

use anyhow::{bail, Result};
use pb::agent_service_client::AgentServiceClient;
use pivgate_hw::piv::{Algorithm, Slot};
use pivgate_proto::v1 as pb;
use pivgate_tests::site::{begin, complete, scratch, sign, sign_digest, tap, AgentClient, Challenge, Site, Tap};
use pivgate_vcard::{IssuingCa, Profile, Validity};

const T: &str = "admin-panel";

/// Runs `action`, expects it refused with `reason`, an `auth.denied`
/// audit record naming it, and the terminal still locked.
async fn expect_refusal<F: std::future::Future<Output = Result<Tap>>>(site: &Site, reason: pb::DenyReason, action: F) -> Result<()> {
    let before = site.audit_len().await?;
    match action.await? {
        Tap::Denied(r) if r == reason => {}
        other => bail!("expected {reason:?}, got {other:?}"),
    }
    let name = reason.as_str_name().trim_start_matches("DENY_REASON_").to_lowercase();
    let records = site.audit_after(before).await?;
    let denied: Vec<_> = records.iter().filter(|r| r.kind == "auth.denied").collect();
    assert_eq!(denied.len(), 1, "{reason:?}: expected one denial record, got {records:?}");
    assert!(denied[0].detail_json.contains(&format!("\"reason\":\"{name}\"")), "{reason:?}: {}", denied[0].detail_json);
    let state = site.application("checker").await?.get_terminal_state(pb::GetTerminalStateRequest { terminal_id: T.into() }).await?;
    assert!(!state.into_inner().state.unwrap().unlocked, "{reason:?}: the terminal unlocked");
    Ok(())
}

/// A site with terminal T (card and PIN, or card only), one agent bound to
/// it, and one enrolled P-256 card.
async fn setup(mechanisms: &[pb::Mechanism]) -> Result<(Site, AgentClient, Profile)> {
    let site = Site::start(|_, _| {}).await?;
    let agent = site.agent("pi-1", &[T, "other-terminal"]).await?;
    site.policy(T, mechanisms, &[]).await?;
    let profile = site.enrolled_card("op-1", &["dispatcher"], Algorithm::EccP256).await?;
    Ok((site, agent, profile))
}

/// Taps a card whose 9E certificate has been replaced on the card by
/// `cert` (a card-only terminal asks for it).
async fn tap_with_9e_cert(site: &Site, agent: &mut AgentClient, profile: &Profile, cert: Vec<u8>) -> Result<Tap> {
    let _ = site;
    let mut card = profile.card();
    card.contents_mut().objects.insert(0x5FC101, pivgate_hw::piv::objects::certificate_container(&cert, false));
    tap(agent, T, &mut card, "123456", pb::Mechanism::CardOnly).await
}

fn card_9e_spki(profile: &Profile) -> Vec<u8> {
    profile.contents.keys[&Slot::CardAuthentication].spki_der().unwrap()
}

async fn card_only_refusal(reason: pb::DenyReason, make: impl FnOnce(&Site, &Profile) -> Result<Vec<u8>>) -> Result<()> {
    let (site, mut agent, profile) = setup(&[pb::Mechanism::CardOnly]).await?;
    let cert = make(&site, &profile)?;
    expect_refusal(&site, reason, tap_with_9e_cert(&site, &mut agent, &profile, cert)).await
}

fn issue_9e(site: &Site, profile: &Profile, validity: Validity, tweak: impl FnOnce(&mut rcgen::CertificateParams)) -> Result<Vec<u8>> {
    Ok(site.issuer.issue_with(Slot::CardAuthentication, &card_9e_spki(profile), &profile.chuid, "Op", validity, tweak)?)
}

#[tokio::test]
async fn unknown_card() -> Result<()> {
    let (site, mut agent, _) = setup(&[pb::Mechanism::CardAndPin]).await?;
    let stranger = site.card(Algorithm::EccP256)?;
    expect_refusal(&site, pb::DenyReason::UnknownCard, tap(&mut agent, T, &mut stranger.card(), "123456", pb::Mechanism::Unspecified)).await
}

#[tokio::test]
async fn card_authentication_certificate_offered_for_the_pin_slot() -> Result<()> {
    // Enrolled by its 9E certificate only; at a card-and-PIN terminal the
    // agent offers the (valid, same-card) 9E certificate as the 9A one, so
    // the no-PIN key would sign. Refused whatever the site configured.
    let site = Site::start(|c, _| {
        c.cards.eku_9a.clear();
        c.cards.policies_9a.clear();
    })
    .await?;
    let mut agent = site.agent("pi-1", &[T]).await?;
    let profile = site.card(Algorithm::EccP256)?;
    let mut admin = site.admin().await?;
    admin
        .add_operator(pb::AddOperatorRequest { operator: Some(pb::Operator { operator_id: "op-1".into(), name: "Op".into(), roles: vec![], enabled: true }) })
        .await?;
    admin
        .enrol_card(pb::EnrolCardRequest {
            operator_id: "op-1".into(),
            certificate: profile.certificates[&Slot::CardAuthentication].clone(),
            slot: pb::KeySlot::CardAuthentication as i32,
            ..Default::default()
        })
        .await?;
    let mut card = profile.card();
    let nine_e = profile.certificates[&Slot::CardAuthentication].clone();
    card.contents_mut().objects.insert(0x5FC105, pivgate_hw::piv::objects::certificate_container(&nine_e, false));
    expect_refusal(&site, pb::DenyReason::WrongEku, tap(&mut agent, T, &mut card, "123456", pb::Mechanism::CardAndPin)).await
}

#[tokio::test]
async fn certificate_from_an_untrusted_issuer() -> Result<()> {
    card_only_refusal(pb::DenyReason::UntrustedIssuer, |_, p| {
        let rogue = IssuingCa::generate("rogue issuer")?;
        Ok(rogue.issue_for_spki(Slot::CardAuthentication, &card_9e_spki(p), &p.chuid, "Op", Validity::days(30))?)
    })
    .await
}

#[tokio::test]
async fn self_signed_leaf() -> Result<()> {
    card_only_refusal(pb::DenyReason::SelfSigned, |_, p| {
        let pem = p.contents.keys[&Slot::CardAuthentication].to_pem()?;
        let key = rcgen::KeyPair::from_pem(&pem)?;
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name.push(rcgen::DnType::CommonName, "self");
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.custom_extensions = vec![rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 17], pivgate_vcard::profile::piv_san(&p.chuid))];
        Ok(params.self_signed(&key)?.der().to_vec())
    })
    .await
}

#[tokio::test]
async fn expired_certificate() -> Result<()> {
    card_only_refusal(pb::DenyReason::CertExpired, |s, p| {
        let now = time::OffsetDateTime::now_utc();
        issue_9e(s, p, Validity { not_before: now - time::Duration::days(400), not_after: now - time::Duration::days(1) }, |_| {})
    })
    .await
}

#[tokio::test]
async fn certificate_not_yet_valid() -> Result<()> {
    card_only_refusal(pb::DenyReason::CertNotYetValid, |s, p| {
        let now = time::OffsetDateTime::now_utc();
        issue_9e(s, p, Validity { not_before: now + time::Duration::days(2), not_after: now + time::Duration::days(400) }, |_| {})
    })
    .await
}

#[tokio::test]
async fn wrong_key_usage() -> Result<()> {
    card_only_refusal(pb::DenyReason::WrongKeyUsage, |s, p| {
        issue_9e(s, p, Validity::days(30), |params| params.key_usages = vec![rcgen::KeyUsagePurpose::KeyEncipherment])
    })
    .await
}

#[tokio::test]
async fn wrong_extended_key_usage() -> Result<()> {
    card_only_refusal(pb::DenyReason::WrongEku, |s, p| {
        issue_9e(s, p, Validity::days(30), |params| params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::EmailProtection])
    })
    .await
}

#[tokio::test]
async fn wrong_certificate_policy() -> Result<()> {
    card_only_refusal(pb::DenyReason::WrongPolicy, |s, p| {
        issue_9e(s, p, Validity::days(30), |params| {
            params.custom_extensions[1] =
                rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 32], pivgate_vcard::profile::certificate_policies(&[1, 3, 6, 1, 4, 1, 99999, 1]))
        })
    })
    .await
}

#[tokio::test]
async fn ca_certificate_as_a_card_certificate() -> Result<()> {
    card_only_refusal(pb::DenyReason::NotEndEntity, |s, p| {
        issue_9e(s, p, Validity::days(30), |params| params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained))
    })
    .await
}

#[tokio::test]
async fn certificate_naming_another_card() -> Result<()> {
    card_only_refusal(pb::DenyReason::IdentityMismatch, |s, p| {
        let other = s.card(Algorithm::EccP256)?;
        Ok(s.issuer.issue_for_spki(Slot::CardAuthentication, &card_9e_spki(p), &other.chuid, "Op", Validity::days(30))?)
    })
    .await
}

#[tokio::test]
async fn unparseable_certificate() -> Result<()> {
    card_only_refusal(pb::DenyReason::MalformedCertificate, |_, _| Ok(vec![0x30, 0x82, 0x01, 0x00, 0x02, 0x01])).await
}

#[tokio::test]
async fn key_algorithm_pivgate_does_not_accept() -> Result<()> {
    card_only_refusal(pb::DenyReason::UnsupportedAlgorithm, |s, p| {
        use rcgen::PublicKeyData;
        let p521 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512)?;
        Ok(s.issuer.issue_for_spki(Slot::CardAuthentication, &p521.subject_public_key_info(), &p.chuid, "Op", Validity::days(30))?)
    })
    .await
}

#[tokio::test]
async fn card_on_the_deny_list() -> Result<()> {
    let (site, mut agent, profile) = setup(&[pb::Mechanism::CardAndPin]).await?;
    site.admin().await?.revoke_card(pb::RevokeCardRequest { card_uuid: profile.chuid.uuid_string(), reason: "lost".into() }).await?;
    expect_refusal(&site, pb::DenyReason::RevokedDenyList, tap(&mut agent, T, &mut profile.card(), "123456", pb::Mechanism::Unspecified)).await
}

fn serial_of(der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::FromDer;
    let (_, c) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    c.tbs_certificate.raw_serial().to_vec()
}

#[tokio::test]
async fn certificate_revoked_by_the_issuers_crl() -> Result<()> {
    // The CRL revokes the card's 9E certificate; 9A (enrolled) is fine.
    let issuer = IssuingCa::generate("card issuer")?;
    let card_ca = IssuingCa { cert_pem: issuer.cert_pem.clone(), key_pem: issuer.key_pem.clone() };
    let profile = Profile::generate_with_ca(card_ca, &Default::default())?;
    let now = time::OffsetDateTime::now_utc();
    let crl = issuer.crl(&[serial_of(&profile.certificates[&Slot::CardAuthentication])], now - time::Duration::minutes(5), now + time::Duration::days(1), 1)?;
    let site = Site::start_with_issuer(issuer, |c, dir| {
        let path = dir.join("issuer.crl");
        std::fs::write(&path, &crl).unwrap();
        c.cards.crl_files = vec![path];
    })
    .await?;
    let mut agent = site.agent("pi-1", &[T]).await?;
    site.policy(T, &[pb::Mechanism::CardOnly], &[]).await?;
    site.enrol(&profile, "op-1", &[]).await?;
    expect_refusal(&site, pb::DenyReason::RevokedCrl, tap(&mut agent, T, &mut profile.card(), "123456", pb::Mechanism::Unspecified)).await?;
    // The audit record of a success names its revocation source and age.
    site.policy(T, &[pb::Mechanism::CardAndPin], &[]).await?;
    let Tap::Granted(_) = tap(&mut agent, T, &mut profile.card(), "123456", pb::Mechanism::Unspecified).await? else { bail!("9A refused") };
    let granted = site.audit_after(0).await?.into_iter().rfind(|r| r.kind == "auth.granted").unwrap();
    assert!(granted.detail_json.contains("deny-list+crl:") && granted.detail_json.contains("crl_age_s"), "{}", granted.detail_json);
    Ok(())
}

#[tokio::test]
async fn crl_past_its_next_update_under_a_strict_policy() -> Result<()> {
    // The issuer's CRL runs out two seconds from now and nothing newer
    // comes (an issuer that stopped publishing). An older CRL would not do:
    // the gateway never goes back to an older CRL than it holds.
    let issuer = IssuingCa::generate("card issuer")?;
    let now = time::OffsetDateTime::now_utc();
    let short = issuer.crl(&[], now - time::Duration::minutes(5), now + time::Duration::seconds(2), 1)?;
    let stale = issuer.crl(&[], now - time::Duration::days(3), now - time::Duration::days(1), 2)?;
    let crl_path = scratch("crl").join("issuer.crl");
    std::fs::write(&crl_path, &short)?;
    let path = crl_path.clone();
    let card_ca = IssuingCa { cert_pem: issuer.cert_pem.clone(), key_pem: issuer.key_pem.clone() };
    let site = Site::start_with_issuer(issuer, move |c, _| {
        c.cards.crl_files = vec![path];
        c.cards.crl_strict = true;
        c.cards.crl_refresh_s = 1;
    })
    .await?;
    let profile = Profile::generate_with_ca(card_ca, &Default::default())?;
    let mut agent = site.agent("pi-1", &[T]).await?;
    site.enrol(&profile, "op-1", &[]).await?;
    std::fs::write(&crl_path, &stale)?;
    tokio::time::sleep(Duration::from_millis(2600)).await;
    expect_refusal(&site, pb::DenyReason::CrlStale, tap(&mut agent, T, &mut profile.card(), "123456", pb::Mechanism::Unspecified)).await
}

#[tokio::test]
async fn card_only_proof_where_card_and_pin_is_required() -> Result<()> {
    let (site, mut agent, profile) = setup(&[pb::Mechanism::CardAndPin]).await?;
    // Asking for card-only is refused at once ...
    expect_refusal(&site, pb::DenyReason::MechanismNotAllowed, tap(&mut agent, T, &mut profile.card(), "123456", pb::Mechanism::CardOnly)).await?;
    // ... and a 9E signature on a 9A challenge is recognised as such.
    let mut card = profile.card();
    // The gateway holds the 9E certificate (from an earlier card-only tap).
    let mut admin = site.admin().await?;
    admin
        .enrol_card(pb::EnrolCardRequest {
            operator_id: "op-1".into(),
            certificate: profile.certificates[&Slot::CardAuthentication].clone(),
            slot: pb::KeySlot::CardAuthentication as i32,
            ..Default::default()
        })
        .await?;
    let Ok(c) = begin(&mut agent, T, &mut card, pb::Mechanism::Unspecified).await? else { bail!("begin refused") };
    assert!(c.pin_required);
    // A compromised agent has the no-PIN key sign the PIN challenge.
    use sha2::Digest;
    let sig = sign_digest(&mut card, Slot::CardAuthentication, Algorithm::EccP256, &sha2::Sha256::digest(&c.message), None)?;
    expect_refusal(&site, pb::DenyReason::MechanismNotAllowed, complete(&mut agent, T, &c, sig)).await
}

#[tokio::test]
async fn signature_over_another_challenge() -> Result<()> {
    let (site, mut agent, profile) = setup(&[pb::Mechanism::CardAndPin]).await?;
    let mut card = profile.card();
    let Ok(first) = begin(&mut agent, T, &mut card, pb::Mechanism::Unspecified).await? else { bail!("begin") };
    let Ok(second) = begin(&mut agent, T, &mut card, pb::Mechanism::Unspecified).await? else { bail!("begin") };
    let sig = sign(&mut agent, T, &mut card, &first, "123456")?;
    expect_refusal(&site, pb::DenyReason::BadSignature, complete(&mut agent, T, &second, sig)).await
}

#[tokio::test]
async fn signature_from_another_card() -> Result<()> {
    let (site, mut agent, profile) = setup(&[pb::Mechanism::CardAndPin]).await?;
    let other = site.card(Algorithm::EccP256)?;
    let Ok(c) = begin(&mut agent, T, &mut profile.card(), pb::Mechanism::Unspecified).await? else { bail!("begin") };
    // A compromised agent has another card sign this tap's message.
    use sha2::Digest;
    let sig = sign_digest(&mut other.card(), Slot::Authentication, Algorithm::EccP256, &sha2::Sha256::digest(&c.message), Some("123456"))?;
    expect_refusal(&site, pb::DenyReason::BadSignature, complete(&mut agent, T, &c, sig)).await
}

#[tokio::test]
async fn replayed_proof() -> Result<()> {
    let (site, mut agent, profile) = setup(&[pb::Mechanism::CardAndPin]).await?;
    let mut card = profile.card();
    let Ok(c) = begin(&mut agent, T, &mut card, pb::Mechanism::Unspecified).await? else { bail!("begin") };
    let sig = sign(&mut agent, T, &mut card, &c, "123456")?;
    let Tap::Granted(g) = complete(&mut agent, T, &c, sig.clone()).await? else { bail!("first use refused") };
    site.admin().await?.lock_terminal(pb::LockTerminalRequest { terminal_id: T.into() }).await?;
    expect_refusal(&site, pb::DenyReason::ChallengeReplayed, complete(&mut agent, T, &c, sig)).await?;
    let last = site.application("c").await?.get_terminal_state(pb::GetTerminalStateRequest { terminal_id: T.into() }).await?;
    assert!(last.into_inner().state.unwrap().sequence > g.sequence);
    Ok(())
}

#[tokio::test]
async fn reused_challenge_after_a_failed_attempt() -> Result<()> {
    let (site, mut agent, profile) = setup(&[pb::Mechanism::CardAndPin]).await?;
    let mut card = profile.card();
    let Ok(c) = begin(&mut agent, T, &mut card, pb::Mechanism::Unspecified).await? else { bail!("begin") };
    let good = sign(&mut agent, T, &mut card, &c, "123456")?;
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    expect_refusal(&site, pb::DenyReason::BadSignature, complete(&mut agent, T, &c, bad)).await?;
    expect_refusal(&site, pb::DenyReason::ChallengeReplayed, complete(&mut agent, T, &c, good)).await
}

#[tokio::test]
async fn unknown_challenge() -> Result<()> {
    let (site, mut agent, _) = setup(&[pb::Mechanism::CardAndPin]).await?;
    let c = Challenge {
        id: vec![7; 16],
        message: vec![],
        slot: Slot::Authentication,
        algorithm: Algorithm::EccP256,
        pin_required: true,
        expires_in: Duration::ZERO,
    };
    expect_refusal(&site, pb::DenyReason::ChallengeUnknown, complete(&mut agent, T, &c, vec![0x30, 0x06, 2, 1, 1, 2, 1, 1])).await
}

#[tokio::test]
async fn expired_challenge() -> Result<()> {
    let site = Site::start(|c, _| c.challenge_ttl_s = 1).await?;
    let mut agent = site.agent("pi-1", &[T]).await?;
    let profile = site.enrolled_card("op-1", &[], Algorithm::EccP256).await?;
    let mut card = profile.card();
    let Ok(c) = begin(&mut agent, T, &mut card, pb::Mechanism::Unspecified).await? else { bail!("begin") };
    let sig = sign(&mut agent, T, &mut card, &c, "123456")?;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    expect_refusal(&site, pb::DenyReason::ChallengeExpired, complete(&mut agent, T, &c, sig)).await
}

#[tokio::test]
async fn challenge_issued_for_another_terminal() -> Result<()> {
    let (site, mut agent, profile) = setup(&[pb::Mechanism::CardAndPin]).await?;
    let mut card = profile.card();
    let Ok(c) = begin(&mut agent, "other-terminal", &mut card, pb::Mechanism::Unspecified).await? else { bail!("begin") };
    let sig = sign(&mut agent, "other-terminal", &mut card, &c, "123456")?;
    expect_refusal(&site, pb::DenyReason::ChallengeMismatch, complete(&mut agent, T, &c, sig)).await
}

#[tokio::test]
async fn challenge_issued_to_another_agent() -> Result<()> {
    let (site, mut agent, profile) = setup(&[pb::Mechanism::CardAndPin]).await?;
    let mut thief = site.agent("pi-2", &[T]).await?;
    let mut card = profile.card();
    let Ok(c) = begin(&mut agent, T, &mut card, pb::Mechanism::Unspecified).await? else { bail!("begin") };
    let sig = sign(&mut agent, T, &mut card, &c, "123456")?;
    expect_refusal(&site, pb::DenyReason::ChallengeMismatch, complete(&mut thief, T, &c, sig.clone())).await?;
    // The thief could not burn it: the agent it was issued to completes.
    match complete(&mut agent, T, &c, sig).await? {
        Tap::Granted(g) => assert_eq!(g.operator_id, "op-1"),
        other => bail!("the rightful agent's challenge was spent by another: {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn signature_for_another_algorithm() -> Result<()> {
    let (site, mut agent, profile) = setup(&[pb::Mechanism::CardAndPin]).await?;
    let Ok(c) = begin(&mut agent, T, &mut profile.card(), pb::Mechanism::Unspecified).await? else { bail!("begin") };
    expect_refusal(&site, pb::DenyReason::AlgorithmMismatch, complete(&mut agent, T, &c, vec![0x5A; 256])).await
}

#[tokio::test]
async fn malformed_signature() -> Result<()> {
    let (site, mut agent, profile) = setup(&[pb::Mechanism::CardAndPin]).await?;
    let Ok(c) = begin(&mut agent, T, &mut profile.card(), pb::Mechanism::Unspecified).await? else { bail!("begin") };
    expect_refusal(&site, pb::DenyReason::MalformedSignature, complete(&mut agent, T, &c, vec![1, 2, 3, 4, 5])).await
}

#[tokio::test]
async fn agent_acting_for_a_terminal_it_is_not_bound_to() -> Result<()> {
    let (site, _, profile) = setup(&[pb::Mechanism::CardAndPin]).await?;
    let mut stranger = site.agent("pi-9", &["lobby"]).await?;
    expect_refusal(&site, pb::DenyReason::TerminalNotBound, tap(&mut stranger, T, &mut profile.card(), "123456", pb::Mechanism::Unspecified)).await
}

#[tokio::test]
async fn disabled_operator() -> Result<()> {
    let (site, mut agent, profile) = setup(&[pb::Mechanism::CardAndPin]).await?;
    site.admin()
        .await?
        .add_operator(pb::AddOperatorRequest {
            operator: Some(pb::Operator { operator_id: "op-1".into(), name: "Op".into(), roles: vec!["dispatcher".into()], enabled: false }),
        })
        .await?;
    expect_refusal(&site, pb::DenyReason::OperatorDisabled, tap(&mut agent, T, &mut profile.card(), "123456", pb::Mechanism::Unspecified)).await
}

#[tokio::test]
async fn operator_without_a_role_the_terminal_allows() -> Result<()> {
    let (site, mut agent, profile) = setup(&[pb::Mechanism::CardAndPin]).await?;
    site.policy(T, &[pb::Mechanism::CardAndPin], &["intercom-admin"]).await?;
    expect_refusal(&site, pb::DenyReason::NotAuthorized, tap(&mut agent, T, &mut profile.card(), "123456", pb::Mechanism::Unspecified)).await
}

#[tokio::test]
async fn transport_refusals_are_audited_and_unlock_nothing() -> Result<()> {
    let (site, mut agent, profile) = setup(&[pb::Mechanism::CardAndPin]).await?;
    let mut card = profile.card();
    let Ok(c) = begin(&mut agent, T, &mut card, pb::Mechanism::Unspecified).await? else { bail!("begin") };
    let sig = sign(&mut agent, T, &mut card, &c, "123456")?;
    let complete_req = pb::CompleteAuthenticationRequest { challenge_id: c.id.clone(), terminal_id: T.into(), signature: sig };
    let before = site.audit_len().await?;

    // 1. A client with no certificate: the handshake fails.
    let admin = site.admin_credentials()?;
    let no_cert = tonic::transport::ClientTlsConfig::new().domain_name("localhost").ca_certificate(tonic::transport::Certificate::from_pem(&admin.ca_pem));
    let ch = tonic::transport::Endpoint::from_shared(format!("https://{}", site.addr))?.tls_config(no_cert)?.connect().await;
    if let Ok(ch) = ch {
        let r = AgentServiceClient::new(ch).complete_authentication(complete_req.clone()).await;
        assert!(r.is_err(), "a client without a certificate was served");
    }
    // 2. A client certificate from another CA.
    let other_dir = scratch("other-ca");
    pivgate_gateway::pki::bootstrap(&other_dir, &["localhost".into()])?;
    let mut foreign = pivgate_gateway::client::Credentials::admin_in(&other_dir)?;
    foreign.ca_pem = admin.ca_pem.clone();
    let r = pivgate_gateway::client::connect(&site.addr, "localhost", &foreign).await;
    if let Ok(ch) = r {
        assert!(AgentServiceClient::new(ch).complete_authentication(complete_req.clone()).await.is_err(), "a foreign certificate was served");
    }
    // 3. An application certificate calling the Agent API.
    let app = site.issue(pb::ServiceRole::Application, "console").await?;
    let ch = pivgate_gateway::client::connect(&site.addr, "localhost", &app).await?;
    let err = AgentServiceClient::new(ch).complete_authentication(complete_req.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    // Each is in the audit log; the challenge is still unused and the
    // terminal still locked.
    pivgate_tests::site::eventually(Duration::from_secs(3), || async {
        Ok(site.audit_after(before).await?.iter().filter(|r| r.kind == "tls.refused").count() >= 2)
    })
    .await?;
    let records = site.audit_after(before).await?;
    assert!(records.iter().any(|r| r.kind == "rpc.refused" && r.actor == "application:console"), "{records:?}");
    let state = site.application("checker").await?.get_terminal_state(pb::GetTerminalStateRequest { terminal_id: T.into() }).await?;
    assert!(!state.into_inner().state.unwrap().unlocked);
    // The legitimate agent can still use its challenge.
    let done = agent.rpc().complete_authentication(complete_req).await?.into_inner();
    assert!(matches!(done.outcome, Some(pb::complete_authentication_response::Outcome::Granted(_))));
    Ok(())
}
