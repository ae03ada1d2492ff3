//! Every list call answers a page at a time: a list of any length can be
//! read whole, one bounded message after another, and never fails
//! because it grew past what a client decodes.

use std::collections::BTreeSet;

use anyhow::{ensure, Result};
use pivgate_gateway::store::{AuditEntry, Change, Store};
use pivgate_proto::v1 as pb;
use pivgate_tests::site::Site;
use prost::Message;

/// Every operator id, page by page, checking each page's bounds.
async fn all_operators(admin: &mut pb::admin_service_client::AdminServiceClient<tonic::transport::Channel>, page_size: u32) -> Result<(Vec<String>, usize)> {
    let (mut ids, mut pages, mut page_token) = (Vec::new(), 0, String::new());
    loop {
        let r = admin.list_operators(pb::ListOperatorsRequest { page_size, page_token }).await?.into_inner();
        let expected = if page_size == 0 { 500 } else { page_size.min(1000) as usize };
        ensure!(r.operators.len() <= expected, "a page of {} for page size {page_size}", r.operators.len());
        ensure!(r.encoded_len() < 1 << 20, "a page of {} bytes", r.encoded_len());
        ensure!(r.next_page_token.is_empty() || r.operators.len() == expected, "a short page ({}) that is not the last", r.operators.len());
        ids.extend(r.operators.into_iter().map(|o| o.operator_id));
        pages += 1;
        if r.next_page_token.is_empty() {
            return Ok((ids, pages));
        }
        page_token = r.next_page_token;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_operators_page_whole_and_in_order() -> Result<()> {
    const N: usize = 100_000;
    let mut site = Site::start(|_, _| {}).await?;
    site.stop().await?;
    // Filled through the store itself, a thousand operators per record:
    // as many one-by-one calls would take minutes.
    {
        let store = loop {
            match Store::open(&site.config.data_dir.join("db")) {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        };
        for batch in 0..N / 1000 {
            let changes = (0..1000)
                .map(|i| {
                    let id = format!("op-{:06}", batch * 1000 + i);
                    Change::Operator(pivgate_gateway::model::Operator { name: format!("Operator {id}"), id, roles: vec!["dispatcher".into()], enabled: true })
                })
                .collect();
            let entry = AuditEntry {
                kind: pivgate_gateway::model::AuditKind::AddOperator,
                actor: "test".into(),
                terminal_id: String::new(),
                detail: serde_json::json!({ "batch": batch }),
            };
            store.record(entry, changes, 0)?;
        }
        store.sync()?;
    }
    let site = site.resume().await?;
    let mut admin = site.admin().await?;
    let want: Vec<String> = (0..N).map(|i| format!("op-{i:06}")).collect();
    for page_size in [0, 1000, 5000] {
        let (ids, pages) = all_operators(&mut admin, page_size).await?;
        ensure!(ids == want, "page size {page_size}: {} operators read, in order: {}", ids.len(), ids == want);
        println!("page size {page_size}: {N} operators in {pages} pages");
    }
    Ok(())
}

#[tokio::test]
async fn every_list_pages_and_a_page_resumes_after_its_last_item_while_the_list_changes() -> Result<()> {
    let site = Site::start(|_, _| {}).await?;
    let mut admin = site.admin().await?;
    for i in 0..7 {
        admin
            .add_operator(pb::AddOperatorRequest {
                operator: Some(pb::Operator { operator_id: format!("o{i}"), name: String::new(), roles: vec![], enabled: true }),
            })
            .await?;
        admin.bind_agent(pb::BindAgentRequest { agent_name: format!("pi-{i}"), terminal_ids: vec![format!("t{i}")] }).await?;
    }
    let cards =
        [site.enrolled_card("o1", &[], pivgate_hw::piv::Algorithm::EccP256).await?, site.enrolled_card("o1", &[], pivgate_hw::piv::Algorithm::EccP256).await?];
    site.enrolled_card("o2", &[], pivgate_hw::piv::Algorithm::EccP256).await?;

    // Operators, three at a time; one added behind the cursor and one ahead
    // of it while paging: nothing read twice, the one ahead is seen.
    let r = admin.list_operators(pb::ListOperatorsRequest { page_size: 3, page_token: String::new() }).await?.into_inner();
    let mut seen: Vec<String> = r.operators.iter().map(|o| o.operator_id.clone()).collect();
    ensure!(seen == ["o0", "o1", "o2"], "{seen:?}");
    for id in ["a-behind", "z-ahead"] {
        admin
            .add_operator(pb::AddOperatorRequest { operator: Some(pb::Operator { operator_id: id.into(), name: String::new(), roles: vec![], enabled: true }) })
            .await?;
    }
    let mut token = r.next_page_token;
    while !token.is_empty() {
        let r = admin.list_operators(pb::ListOperatorsRequest { page_size: 3, page_token: token }).await?.into_inner();
        seen.extend(r.operators.into_iter().map(|o| o.operator_id));
        token = r.next_page_token;
    }
    ensure!(seen == ["o0", "o1", "o2", "o3", "o4", "o5", "o6", "z-ahead"], "{seen:?}");

    // Agents and terminals, two at a time.
    let (mut agents, mut token) = (Vec::new(), String::new());
    loop {
        let r = admin.list_agents(pb::ListAgentsRequest { page_size: 2, page_token: token }).await?.into_inner();
        ensure!(r.agents.len() <= 2);
        agents.extend(r.agents.into_iter().map(|a| a.agent_name));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    ensure!(agents == (0..7).map(|i| format!("pi-{i}")).collect::<Vec<_>>(), "{agents:?}");
    let mut app = site.application("console").await?;
    let (mut terminals, mut token, mut pages) = (Vec::new(), String::new(), 0);
    loop {
        let r = app.list_terminal_states(pb::ListTerminalStatesRequest { page_size: 2, page_token: token }).await?.into_inner();
        pages += 1;
        terminals.extend(r.states.into_iter().map(|s| s.terminal_id));
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    ensure!(terminals == (0..7).map(|i| format!("t{i}")).collect::<Vec<_>>() && pages == 4, "{terminals:?} in {pages} pages");

    // Cards: all of them, or one operator's.
    let list_cards = |operator: &str, page_size| pb::ListCardsRequest { page_size, page_token: String::new(), operator_id: operator.into() };
    let all = admin.list_cards(list_cards("", 0)).await?.into_inner();
    ensure!(all.cards.len() == 3 && all.next_page_token.is_empty(), "{:?}", all.cards);
    let first = admin.list_cards(list_cards("o1", 1)).await?.into_inner();
    ensure!(first.cards.len() == 1 && !first.next_page_token.is_empty());
    let second = admin.list_cards(pb::ListCardsRequest { page_token: first.next_page_token, ..list_cards("o1", 1) }).await?.into_inner();
    let o1: BTreeSet<String> = first.cards.iter().chain(&second.cards).map(|c| c.certificate_sha256.clone()).collect();
    let want: BTreeSet<String> =
        cards.iter().map(|p| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&p.certificates[&pivgate_hw::piv::Slot::Authentication]))).collect();
    ensure!(o1 == want && second.cards.iter().all(|c| c.operator_id == "o1"), "o1's cards: {o1:?}");

    // A token the gateway did not give is refused, and says which field.
    for bad in ["not hex", &"ab".repeat(200)] {
        let e = admin.list_operators(pb::ListOperatorsRequest { page_size: 1, page_token: bad.into() }).await.unwrap_err();
        ensure!(e.code() == tonic::Code::InvalidArgument && e.message().contains("page_token"), "{e:?}");
    }
    Ok(())
}
