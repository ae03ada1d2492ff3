//! The gateway and pivgatectl as processes, the way a site runs them:
//! `pivgate-gateway --data-dir DIR --listen ADDR` on embedded defaults, and
//! the admin CLI against it.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use pivgate_hw::piv::Algorithm;
use pivgate_tests::process::GatewayProcess;
use pivgate_tests::{binary, site::scratch};
use pivgate_vcard::{Profile, ProfileOptions};

fn ctl(dir: &Path, port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new(binary("pivgatectl")?).args(["--gateway", &format!("127.0.0.1:{port}"), "--data-dir"]).arg(dir).args(args).output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("pivgatectl {args:?} failed: {text}");
    }
    Ok(text)
}

#[test]
fn an_administrator_sets_up_a_site_with_pivgatectl() -> Result<()> {
    let dir = scratch("cli");
    let data = dir.join("data");
    // The card issuer's CA must be trusted: a config file names it.
    let profile = Profile::generate(&ProfileOptions { algorithm: Algorithm::EccP256, ..Default::default() })?;
    profile.save(&dir.join("card"))?;
    let config = dir.join("gateway.toml");
    std::fs::write(&config, format!("[cards]\ntrust_anchors = [{:?}]\n", dir.join("card/issuing-ca.pem")))?;
    let gw = GatewayProcess::start(&data, &["--config", config.to_str().context("path")?])?;
    let port = gw.port;

    // Embedded defaults: the PKI is generated, file names say what they are.
    for f in ["service-ca.pem", "service-ca-key.pem", "admin.pem", "admin-key.pem", "gateway.pem", "gateway-key.pem"] {
        assert!(data.join(f).exists(), "{f} missing");
    }
    ctl(&data, port, &["operator", "add", "op-17", "--name", "Ana Silva", "--role", "dispatcher"])?;
    let cert = dir.join("card/cert-9a.pem");
    let enrolled = ctl(&data, port, &["card", "enrol", "--operator", "op-17", "--cert", cert.to_str().context("path")?])?;
    assert!(enrolled.contains(&profile.chuid.uuid_string()), "{enrolled}");
    ctl(&data, port, &["agent", "bind", "pi-3", "--terminal", "dispatch-03"])?;
    ctl(&data, port, &["terminal", "policy", "dispatch-03", "--mechanism", "card-and-pin", "--role", "dispatcher"])?;
    let issued = ctl(&data, port, &["cert", "issue", "--role", "agent", "--name", "pi-3", "--out-dir", dir.join("pi-3").to_str().context("path")?])?;
    assert!(issued.contains("pi-3.pem") && dir.join("pi-3/pi-3-key.pem").exists());
    let show = ctl(&data, port, &["operator", "show", "op-17"])?;
    assert!(show.contains("Ana Silva") && show.contains(&profile.chuid.uuid_string()), "{show}");
    let terminals = ctl(&data, port, &["terminal", "list"])?;
    assert!(terminals.contains("dispatch-03\tlocked"), "{terminals}");
    let revoked = ctl(&data, port, &["card", "revoke", &profile.chuid.uuid_string(), "--reason", "lost"])?;
    assert!(revoked.contains("revoked"));
    let cards = ctl(&data, port, &["card", "list", "--operator", "op-17"])?;
    let columns: Vec<&str> = cards.trim_end().split('\t').collect();
    assert_eq!((columns[0], columns[1]), (profile.chuid.uuid_string().as_str(), "op-17"), "{cards}");
    assert_eq!(&columns[3..], ["revoked", "fips201"], "card id, operator, certificate, state, identity rule: {cards}");
    assert!(ctl(&data, port, &["card", "list", "--operator", "nobody"])?.trim().is_empty());

    // The audit log: every action is there; exported, it verifies offline,
    // and a single edited byte is caught.
    let tail = ctl(&data, port, &["audit", "tail"])?;
    for kind in ["admin.add_operator", "admin.enrol_card", "admin.bind_agent", "admin.set_terminal_policy", "admin.issue_certificate", "admin.revoke_card"] {
        assert!(tail.contains(kind), "{kind} not audited:\n{tail}");
    }
    assert!(ctl(&data, port, &["audit", "verify"])?.contains("intact"));
    let export = dir.join("audit.jsonl");
    ctl(&data, port, &["audit", "export", "--out", export.to_str().context("path")?])?;
    let text = std::fs::read_to_string(&export)?;
    // Six admin actions, plus the refused handshake of the start-up probe.
    let n = text.lines().count();
    assert!(n >= 6, "{text}");
    assert!(ctl(&data, port, &["audit", "verify", "--file", export.to_str().context("path")?])?.contains(&format!("intact: {n} records")));
    std::fs::write(&export, text.replacen("Ana Silva", "Eve Silva", 1))?;
    let tampered = ctl(&data, port, &["audit", "verify", "--file", export.to_str().context("path")?]);
    let err = tampered.unwrap_err().to_string();
    let edited = text.lines().position(|l| l.contains("Ana Silva")).context("no record names the operator")? + 1;
    assert!(err.contains(&format!("broken at record {edited}")), "{err}");
    Ok(())
}

#[test]
fn a_broken_configuration_is_refused_with_a_clear_error() -> Result<()> {
    let dir = scratch("badconf");
    let config = dir.join("gateway.toml");
    std::fs::write(&config, "challenge_ttl_s = 300\n")?;
    let out = Command::new(binary("pivgate-gateway")?).args(["--config", config.to_str().context("path")?]).output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("challenge_ttl_s"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&config, "lisen = \"127.0.0.1:1\"\n")?;
    let out = Command::new(binary("pivgate-gateway")?).args(["--config", config.to_str().context("path")?]).output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lisen"));
    Ok(())
}
