mod common;
use common::*;
use serde_json::json;

#[tokio::test]
async fn converts_a_new_lead_into_account_contact_and_deal() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead = crm.lead(json!({"owner_id": rep, "first_name": "Anna", "last_name": "Nowak", "company": "Acme", "email": "anna@acme.pl"})).await;
    let r = crm.convert(rep, with_deal(), lead).await;
    assert_eq!(r.outcome, "converted", "{r:?}");
    assert_eq!(r.contact_action.map(|a| a.as_str()), Some("created"));
    assert_eq!(r.account_action.map(|a| a.as_str()), Some("created"));
    assert_eq!(r.deal_action.map(|a| a.as_str()), Some("created"));
    let deal = crm.row("deals", r.deal_id.unwrap()).await.unwrap();
    assert_eq!(deal["deal_name"], "Acme");
    let l = crm.row("leads", lead).await.unwrap();
    assert_eq!(l["lead_status"], "Converted");
}
