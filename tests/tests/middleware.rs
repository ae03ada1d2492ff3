//! Standard PIV middleware accepts the virtual card as a PIV card: the
//! `pivgate-vcard` binary sits in a real pcscd reader, and OpenSC
//! (opensc-tool, pkcs11-tool with opensc-pkcs11) and yubico-piv-tool use it
//! as they would a real card.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use pivgate_tests::{opensc_module, run_tool as run};
use pivgate_tests::{reader, run_dir, verify_signature};
use pivgate_vcard::profile::pem_decode;
use sha2::Digest;

use pivgate_tests::binary as bin;

struct Card(Child);
impl Drop for Card {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn opensc_and_yubico_piv_tool_use_the_virtual_card_as_a_piv_card() -> Result<()> {
    let r = reader()?;
    let dir = run_dir()?.join(format!("middleware-card-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _card = Card(
        Command::new(bin("pivgate-vcard")?)
            .args(["--vpcd", &r.addr.to_string(), "--profile"])
            .arg(&dir)
            .args(["--pin", "123456", "--once"])
            .stderr(Stdio::null())
            .spawn()?,
    );
    let ctx = pivgate_hw::pcsc::establish()?;
    if !pivgate_hw::pcsc::wait_for_card(&ctx, &r.name, true, Duration::from_secs(20))? {
        bail!("the pivgate-vcard card never appeared in {}", r.name);
    }
    // The binary wrote its PEM files, named for what they are.
    for f in ["issuing-ca.pem", "cert-9a.pem", "cert-9e.pem"] {
        assert!(dir.join(f).exists(), "{f} missing");
    }

    // yubico-piv-tool first, while the PIN is not verified.
    let status = run(Command::new("yubico-piv-tool").args(["-r", &r.name, "-a", "status"]))?;
    assert!(status.contains("CHUID:\t30"), "{status}");
    assert!(status.contains("Slot 9a:") && status.contains("Slot 9e:"), "{status}");
    assert!(status.contains("Algorithm:\tECCP256"), "{status}");
    assert!(status.contains("PIN tries left:\t3"), "{status}");

    let name = run(Command::new("opensc-tool").args(["-r", &r.name, "-n"]))?;
    assert!(name.contains("Personal Identity Verification Card"), "{name}");

    let module = opensc_module()?;
    let objects = run(Command::new("pkcs11-tool").arg("--module").arg(&module).arg("--list-objects"))?;
    assert!(objects.contains("Certificate Object"), "{objects}");
    assert!(objects.contains("Private Key Object; EC"), "{objects}");

    let digest = sha2::Sha256::digest(b"signed through OpenSC");
    let input = dir.join("digest.bin");
    let output = dir.join("signature.der");
    std::fs::write(&input, digest)?;
    run(Command::new("pkcs11-tool")
        .arg("--module")
        .arg(&module)
        .args(["--login", "--pin", "123456", "--sign", "--id", "01", "--mechanism", "ECDSA", "--signature-format", "openssl"])
        .arg("--input-file")
        .arg(&input)
        .arg("--output-file")
        .arg(&output))?;
    let cert = pem_decode(&std::fs::read_to_string(dir.join("cert-9a.pem"))?)?;
    verify_signature(&cert, &digest, &std::fs::read(&output)?)?;

    // A wrong PIN through OpenSC costs a try, as on a real card.
    let bad = Command::new("pkcs11-tool")
        .arg("--module")
        .arg(&module)
        .args(["--login", "--pin", "000000", "--sign", "--id", "01", "--mechanism", "ECDSA"])
        .arg("--input-file")
        .arg(&input)
        .arg("--output-file")
        .arg(&output)
        .output()?;
    assert!(!bad.status.success(), "a wrong PIN signed");
    let verify = Command::new("yubico-piv-tool").args(["-r", &r.name, "-a", "verify-pin", "-P", "654321"]).output()?;
    let text = String::from_utf8_lossy(&verify.stdout).to_string() + &String::from_utf8_lossy(&verify.stderr);
    assert!(text.contains("1 tries left"), "{text}");
    Ok(())
}

#[test]
fn an_integrator_personalises_the_virtual_card_with_yubico_piv_tool() -> Result<()> {
    use pivgate_hw::piv::{Algorithm, PinStatus, PivClient, Slot};
    use pivgate_hw::Pin;
    use pivgate_vcard::{vpcd, Profile, ProfileOptions, Validity};

    let r = reader()?;
    let dir = run_dir()?.join(format!("personalise-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let profile = Profile::generate(&ProfileOptions::default())?;
    let inserted = vpcd::insert(profile.card(), r.addr)?;
    let ctx = pivgate_hw::pcsc::establish()?;
    assert!(pivgate_hw::pcsc::wait_for_card(&ctx, &r.name, true, Duration::from_secs(10))?);
    let tool = |args: &[&str]| run(Command::new("yubico-piv-tool").args(["-r", &r.name]).args(args));

    // CHANGE REFERENCE DATA.
    tool(&["-a", "change-pin", "-P", "123456", "-N", "246810"])?;
    // Management key authentication (3DES mutual, default key) and
    // GENERATE ASYMMETRIC KEY PAIR in 9C.
    let public = dir.join("9c-public.pem");
    tool(&["-a", "generate", "-s", "9c", "-A", "ECCP256", "-o", public.to_str().context("path")?])?;
    // A certificate for that key from the card's issuer, written with PUT
    // DATA (management key again).
    let spki = pem_decode(&std::fs::read_to_string(&public)?)?;
    let cert = profile.ca.issue_for_spki(Slot::Signature, &spki, &profile.chuid, "Integrator", Validity::days(30))?;
    let cert_pem = dir.join("9c-cert.pem");
    std::fs::write(&cert_pem, pivgate_vcard::profile::pem_encode("CERTIFICATE", &cert))?;
    tool(&["-a", "import-certificate", "-s", "9c", "-i", cert_pem.to_str().context("path")?])?;
    // Block the PIN, then RESET RETRY COUNTER with the PUK.
    for _ in 0..3 {
        let _ = tool(&["-a", "verify-pin", "-P", "000000"]);
    }
    let blocked = tool(&["-a", "verify-pin", "-P", "246810"]);
    assert!(blocked.is_err(), "a blocked PIN verified");
    tool(&["-a", "unblock-pin", "-P", "12345678", "-N", "135790"])?;

    // The pivgate client sees the result: new PIN, new 9C key and its
    // certificate, and 9C's PIN-always rule.
    let mut card = pivgate_tests::connect_card(&r.name)?;
    {
        let mut piv = PivClient::new(card.transaction()?);
        piv.select()?;
        assert_eq!(piv.pin_status()?, PinStatus::TriesLeft(3));
        assert_eq!(piv.read_certificate(Slot::Signature)?, cert);
        let digest = sha2::Sha256::digest(b"signed with the generated key");
        piv.verify_pin(&Pin::new(b"135790")?)?;
        let sig = piv.sign(Slot::Signature, Algorithm::EccP256, &digest)?;
        verify_signature(&cert, &digest, &sig)?;
        assert!(piv.sign(Slot::Signature, Algorithm::EccP256, &digest).is_err(), "9C signed twice on one VERIFY");
    }
    card.disconnect(false)?;
    inserted.remove();
    Ok(())
}
