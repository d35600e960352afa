//! SPEC §3 rules 8–12 against a real Postgres: the deal (8), the owner
//! override (9), the field mapping table of §3.10 and custom field mappings
//! (10), related records (11), marking the lead and counting the job (12),
//! plus the one-transaction guarantee and the dry run (§4).
//!
//! Every test asserts database state that would differ if the rule it covers
//! were taken out of the code.

mod common;

use chrono::{Days, Months, NaiveDate, Utc};
use common::*;
use leadconv::record::Record;
use leadconv::store::convert::{self, LeadResult};
use leadconv::store::job::{self, Trigger};
use leadconv::store::mapping::{self, CustomMapping};
use leadconv::Error;
use leadconv::ErrorCode;
use leadconv::Refusal;
use serde_json::{json, Value};

// ---------------------------------------------------------------- helpers

async fn exec(crm: &Crm, sql: &str) {
    sqlx::query(sql).execute(crm.pool()).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// One text value (NULL as `None`).
async fn text(crm: &Crm, sql: &str) -> Option<String> {
    sqlx::query_scalar(sql).fetch_one(crm.pool()).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Options from JSON text, so that numbers keep their exact digits (1200.50
/// stays 1200.50, which `json!` would turn into the f64 1200.5).
fn options_from(s: &str) -> Value {
    serde_json::from_str(s).unwrap()
}

/// `with_deal()` with the `deal` object extended by `extra`.
fn deal_with(extra: Value) -> Value {
    let mut opts = with_deal();
    merge(&mut opts["deal"], extra);
    opts
}

async fn deal_of(crm: &Crm, r: &LeadResult) -> Record {
    crm.row("deals", r.deal_id.unwrap_or_else(|| panic!("no deal: {r:?}"))).await.unwrap()
}

async fn contact_of(crm: &Crm, r: &LeadResult) -> Record {
    crm.row("contacts", r.contact_id.unwrap_or_else(|| panic!("no contact: {r:?}"))).await.unwrap()
}

async fn account_of(crm: &Crm, r: &LeadResult) -> Record {
    crm.row("accounts", r.account_id.unwrap_or_else(|| panic!("no account: {r:?}"))).await.unwrap()
}

/// Asks for a job with `options`: it must be refused, and no job (nor any
/// result row) may exist afterwards.
async fn refused(crm: &Crm, acting: i64, options: Value) -> Refusal {
    let lead = crm.lead(json!({"last_name": "Kowalski", "company": "Refused Ltd"})).await;
    let created = job::create_for_leads(crm.pool(), acting, Trigger::Manual, &options, &[lead]).await;
    assert_eq!(
        crm.count("SELECT count(*) FROM conversion_jobs").await,
        0,
        "a refused job leaves no conversion_jobs row: {options}"
    );
    assert_eq!(
        crm.count("SELECT count(*) FROM conversion_results").await,
        0,
        "a refused job leaves no result rows: {options}"
    );
    match created {
        Err(Error::Refused(r)) => r,
        Err(e) => panic!("expected a refusal for {options}, got {e:?}"),
        Ok(id) => panic!("job {id} was accepted with {options}"),
    }
}

fn assert_refusal(r: &Refusal, code: ErrorCode, field: &str, what: &str) {
    assert_eq!(r.code, code, "{what}: {r:?}");
    assert_eq!(r.field, field, "{what}: {r:?}");
    assert!(!r.message.is_empty(), "{what}: a refusal explains itself");
}

/// Compares the contract columns (SPEC §2) of `row` with `expected`; a
/// column missing from `expected` must be NULL.
fn assert_columns(table: &str, row: &Record, columns: &[&str], expected: &Value) {
    for col in columns {
        let got = row.get(*col).unwrap_or(&Value::Null);
        let want = expected.get(*col).unwrap_or(&Value::Null);
        assert_eq!(got, want, "{table}.{col}");
    }
}

// ------------------------------------------------------------ rule 8: deal

// SPEC §3.8: the deal name is a template over lead fields, `{{full_name}}`
// and `{{custom.<api_name>}}`.
#[tokio::test]
async fn deal_name_template_renders_lead_fields_full_name_and_custom_fields() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    exec(
        &crm,
        "INSERT INTO custom_field_defs (module, api_name, data_type, max_length) VALUES ('lead', 'region', 'text', 20)",
    )
    .await;
    let lead = |email: &str| {
        json!({"owner_id": rep, "first_name": "Anna", "last_name": "Nowak", "company": "Acme", "email": email,
               "custom_fields": {"region": "EMEA"}})
    };

    let a = crm.lead(lead("a@acme.pl")).await;
    let r = crm.convert(rep, deal_with(json!({"name": "{{company}} – {{last_name}}"})), a).await;
    assert_eq!(deal_of(&crm, &r).await["deal_name"], "Acme – Nowak");

    let b = crm.lead(lead("b@acme.pl")).await;
    let r = crm.convert(rep, deal_with(json!({"name": "Deal for {{full_name}}"})), b).await;
    assert_eq!(deal_of(&crm, &r).await["deal_name"], "Deal for Anna Nowak");

    let c = crm.lead(lead("c@acme.pl")).await;
    let r = crm.convert(rep, deal_with(json!({"name": "{{company}} ({{custom.region}})"})), c).await;
    assert_eq!(deal_of(&crm, &r).await["deal_name"], "Acme (EMEA)");
}

// SPEC §3.8: default name `{{company}}`; the lead's full name when the
// company is empty.
#[tokio::test]
async fn deal_name_defaults_to_company_then_to_full_name() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let with_company =
        crm.lead(json!({"owner_id": rep, "first_name": "Anna", "last_name": "Nowak", "company": "Acme"})).await;
    let no_company = crm.lead(json!({"owner_id": rep, "first_name": "Jan", "last_name": "Kowalski"})).await;
    let blank_company =
        crm.lead(json!({"owner_id": rep, "first_name": "Nguyễn", "last_name": "Văn An", "company": "   "})).await;
    let (_, rs) = crm.convert_all(rep, with_deal(), &[with_company, no_company, blank_company]).await;
    assert!(rs.iter().all(|r| r.outcome == "converted"), "{rs:?}");
    assert_eq!(deal_of(&crm, &rs[0]).await["deal_name"], "Acme");
    assert_eq!(deal_of(&crm, &rs[1]).await["deal_name"], "Jan Kowalski");
    assert_eq!(deal_of(&crm, &rs[2]).await["deal_name"], "Nguyễn Văn An");
}

// SPEC §3.8: closing date as an ISO date or relative to the conversion day.
#[tokio::test]
async fn closing_date_is_absolute_or_relative_to_the_conversion_day() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    type Expected = fn(NaiveDate) -> NaiveDate;
    let cases: [(&str, Expected); 5] = [
        ("2027-03-15", |_| NaiveDate::from_ymd_opt(2027, 3, 15).unwrap()),
        ("+30d", |d| d.checked_add_days(Days::new(30)).unwrap()),
        ("+2w", |d| d.checked_add_days(Days::new(14)).unwrap()),
        ("+1m", |d| d.checked_add_months(Months::new(1)).unwrap()),
        // Calendar months, not 30 days: twelve of them are never 360 days.
        ("+12m", |d| d.checked_add_months(Months::new(12)).unwrap()),
    ];
    for (i, (closing, expected)) in cases.into_iter().enumerate() {
        let lead = crm.lead(json!({"owner_id": rep, "last_name": format!("L{i}"), "company": format!("C{i}")})).await;
        let before = Utc::now().date_naive();
        let r = crm.convert(rep, deal_with(json!({"closing_date": closing})), lead).await;
        let after = Utc::now().date_naive();
        let stored = deal_of(&crm, &r).await["closing_date"].as_str().unwrap().to_owned();
        let stored = NaiveDate::parse_from_str(&stored, "%Y-%m-%d").unwrap();
        // The day may turn during the conversion: either day is right.
        assert!(stored == expected(before) || stored == expected(after), "{closing}: stored {stored}, today {before}");
    }
}

// SPEC §3.8 / §6: stage and pipeline are stored; amount (exactly), contact
// role and campaign source when given, NULL when not.
#[tokio::test]
async fn deal_stores_stage_pipeline_and_optional_fields() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    exec(&crm, "INSERT INTO pipelines (name) VALUES ('Enterprise')").await;
    exec(&crm, "INSERT INTO deal_stages (pipeline, stage, sort_order) VALUES ('Enterprise', 'Discovery', 1), ('Enterprise', 'Won', 2)").await;

    let full = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "company": "Acme"})).await;
    let options = options_from(
        r#"{"create_deal": true, "deal": {"closing_date": "2026-12-31", "stage": "Discovery", "pipeline": "Enterprise",
            "amount": 1200.50, "contact_role": "Purchasing", "campaign_source": "Spring webinar"}}"#,
    );
    let r = crm.convert(rep, options, full).await;
    let deal = deal_of(&crm, &r).await;
    assert_eq!(deal["stage"], "Discovery");
    assert_eq!(deal["pipeline"], "Enterprise");
    assert_eq!(deal["contact_role"], "Purchasing");
    assert_eq!(deal["campaign_source"], "Spring webinar");
    assert_eq!(deal["contact_id"], json!(r.contact_id.unwrap()));
    assert_eq!(deal["account_id"], json!(r.account_id.unwrap()));
    let amount = text(&crm, &format!("SELECT amount::text FROM deals WHERE id = {}", r.deal_id.unwrap())).await;
    assert_eq!(amount.as_deref(), Some("1200.50"));

    let bare = crm.lead(json!({"owner_id": rep, "last_name": "Kowalski", "company": "Globex"})).await;
    let r = crm.convert(rep, deal_with(json!({"stage": "Needs Analysis"})), bare).await;
    let deal = deal_of(&crm, &r).await;
    assert_eq!(deal["stage"], "Needs Analysis");
    assert_eq!(deal["pipeline"], "Standard");
    assert_eq!(deal["amount"], Value::Null);
    assert_eq!(deal["contact_role"], Value::Null);
    assert_eq!(deal["campaign_source"], Value::Null);
}

// SPEC §3.8 / §6: the deal's mandatory fields, template, date, pipeline and
// stage are checked when the job is created; a refused job writes nothing.
#[tokio::test]
async fn invalid_deal_options_refuse_the_job_and_write_nothing() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    exec(&crm, "INSERT INTO pipelines (name) VALUES ('Enterprise')").await;
    exec(&crm, "INSERT INTO deal_stages (pipeline, stage, sort_order) VALUES ('Enterprise', 'Discovery', 1)").await;
    let cases = [
        (
            deal_with(json!({"stage": "Discovery"})),
            ErrorCode::StageNotInPipeline,
            "deal.stage",
            "stage of another pipeline",
        ),
        (
            deal_with(json!({"stage": "Qualification", "pipeline": "Enterprise"})),
            ErrorCode::StageNotInPipeline,
            "deal.stage",
            "Standard stage in Enterprise",
        ),
        (deal_with(json!({"stage": "Made Up"})), ErrorCode::StageNotInPipeline, "deal.stage", "no such stage"),
        (deal_with(json!({"pipeline": "Nope"})), ErrorCode::UnknownPipeline, "deal.pipeline", "unknown pipeline"),
        (
            deal_with(json!({"name": "{{compnay}} deal"})),
            ErrorCode::UnknownPlaceholder,
            "deal.name",
            "typo in placeholder",
        ),
        (
            deal_with(json!({"name": "{{custom.region}}"})),
            ErrorCode::UnknownPlaceholder,
            "deal.name",
            "no such custom field",
        ),
        (
            json!({"create_deal": true, "deal": {"stage": "Qualification"}}),
            ErrorCode::MissingMandatoryField,
            "deal.closing_date",
            "no closing date",
        ),
        (
            json!({"create_deal": true, "deal": {"closing_date": "2026-12-31"}}),
            ErrorCode::MissingMandatoryField,
            "deal.stage",
            "no stage",
        ),
        (
            json!({"create_deal": true, "deal": {"closing_date": "2026-12-31", "stage": "  "}}),
            ErrorCode::MissingMandatoryField,
            "deal.stage",
            "blank stage",
        ),
        (json!({"create_deal": true}), ErrorCode::MissingMandatoryField, "deal", "no deal object"),
        (
            deal_with(json!({"closing_date": "31/12/2026"})),
            ErrorCode::InvalidClosingDate,
            "deal.closing_date",
            "not ISO",
        ),
        (
            deal_with(json!({"closing_date": "2026-02-30"})),
            ErrorCode::InvalidClosingDate,
            "deal.closing_date",
            "no such day",
        ),
        (deal_with(json!({"closing_date": "+3y"})), ErrorCode::InvalidClosingDate, "deal.closing_date", "unknown unit"),
    ];
    for (options, code, field, what) in cases {
        let r = refused(&crm, rep, options).await;
        assert_refusal(&r, code, field, what);
    }
    // The same options with the mistake corrected are accepted: the checks
    // above are about the mistakes, and a job row would be visible.
    let lead = crm.lead(json!({"last_name": "Ok"})).await;
    job::create_for_leads(
        crm.pool(),
        rep,
        Trigger::Manual,
        &deal_with(json!({"stage": "Discovery", "pipeline": "Enterprise"})),
        &[lead],
    )
    .await
    .expect("valid options are accepted");
    assert_eq!(crm.count("SELECT count(*) FROM conversion_jobs").await, 1);
}

// SPEC §6 / §3.11: unknown option keys, and attachments to a deal that
// will not exist, refuse the job.
#[tokio::test]
async fn unknown_option_keys_and_attachments_to_a_missing_deal_refuse_the_job() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;

    let r = refused(&crm, rep, json!({"create_deals": true})).await;
    assert_eq!(r.code, ErrorCode::InvalidOption, "{r:?}");
    assert!(r.field.contains("create_deals") || r.message.contains("create_deals"), "names the key: {r:?}");

    let r = refused(&crm, rep, deal_with(json!({"stgae": "Qualification"}))).await;
    assert_eq!(r.code, ErrorCode::InvalidOption, "{r:?}");
    assert!(r.field.contains("stgae") || r.message.contains("stgae"), "names the key: {r:?}");

    let r = refused(&crm, rep, json!({"move_attachments_to": "deal"})).await;
    assert_refusal(&r, ErrorCode::AttachmentsNeedDeal, "move_attachments_to", "attachments to deal without deal");
    let r = refused(&crm, rep, json!({"create_deal": false, "move_attachments_to": "deal", "deal": {"closing_date": "2026-12-31", "stage": "Qualification"}})).await;
    assert_refusal(&r, ErrorCode::AttachmentsNeedDeal, "move_attachments_to", "deal options but create_deal false");
}

/// A won (or any) deal hanging off an existing contact or account.
async fn existing_deal(crm: &Crm, contact: Option<i64>, account: Option<i64>, stage: &str) -> i64 {
    crm.insert(
        "deals",
        json!({"contact_id": contact, "account_id": account, "deal_name": "Earlier deal", "closing_date": "2025-06-30", "stage": stage}),
    )
    .await
}

// SPEC §3.8 repeat marks: a matched contact or account with a won deal
// makes the new deal `is_repeat` (not `is_repeat_inquiry`).
#[tokio::test]
async fn new_deal_is_repeat_when_the_matched_contact_or_account_has_a_won_deal() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;

    // Matched contact (by e-mail) with a won deal.
    let won_contact = crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl"})).await;
    existing_deal(&crm, Some(won_contact), None, "Closed Won").await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "email": "ANNA@acme.pl"})).await;
    let r = crm.convert(rep, with_deal(), lead).await;
    assert_eq!(r.contact_action.map(|a| a.as_str()), Some("merged"), "{r:?}");
    let deal = deal_of(&crm, &r).await;
    assert_eq!(
        (deal["is_repeat"].clone(), deal["is_repeat_inquiry"].clone()),
        (json!(true), json!(false)),
        "won deal on contact"
    );

    // Matched account (by company) with a won deal; the contact is new.
    let won_account = crm.account(json!({"owner_id": rep, "account_name": "Globex"})).await;
    existing_deal(&crm, None, Some(won_account), "Closed Won").await;
    let lead = crm
        .lead(json!({"owner_id": rep, "last_name": "Kowalski", "email": "jan@globex.pl", "company": "globex"}))
        .await;
    let r = crm.convert(rep, with_deal(), lead).await;
    assert_eq!(
        (r.contact_action.map(|a| a.as_str()), r.account_action.map(|a| a.as_str())),
        (Some("created"), Some("matched")),
        "{r:?}"
    );
    let deal = deal_of(&crm, &r).await;
    assert_eq!(
        (deal["is_repeat"].clone(), deal["is_repeat_inquiry"].clone()),
        (json!(true), json!(false)),
        "won deal on account"
    );

    // A deal that was lost is no win: only a repeat inquiry.
    let lost_contact = crm.contact(json!({"owner_id": rep, "last_name": "Lis", "email": "ewa@lost.pl"})).await;
    existing_deal(&crm, Some(lost_contact), None, "Closed Lost").await;
    existing_deal(&crm, Some(lost_contact), None, "Negotiation/Review").await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Lis", "email": "ewa@lost.pl"})).await;
    let r = crm.convert(rep, with_deal(), lead).await;
    let deal = deal_of(&crm, &r).await;
    assert_eq!(
        (deal["is_repeat"].clone(), deal["is_repeat_inquiry"].clone()),
        (json!(false), json!(true)),
        "lost deal only"
    );
}

// SPEC §3.8 repeat marks: merging without a won deal makes a repeat
// inquiry, and a lead that merged is itself `is_repeat`; a brand-new lead
// is neither.
#[tokio::test]
async fn merged_lead_is_repeat_and_its_deal_a_repeat_inquiry_while_a_new_lead_is_neither() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl"})).await;
    crm.account(json!({"owner_id": rep, "account_name": "Globex Sp. z o.o."})).await;
    let into_contact = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "email": " anna@ACME.pl "})).await;
    let into_account = crm.lead(json!({"owner_id": rep, "last_name": "Kowalski", "email": "jan@globex.pl", "company": "globex  sp. z o.o."})).await;
    let brand_new = crm
        .lead(json!({"owner_id": rep, "last_name": "Wiśniewska", "email": "ola@initech.pl", "company": "Initech"}))
        .await;
    let (job_id, rs) = crm.convert_all(rep, with_deal(), &[into_contact, into_account, brand_new]).await;

    assert_eq!(rs[0].contact_action.map(|a| a.as_str()), Some("merged"), "{:?}", rs[0]);
    assert_eq!(
        (rs[1].contact_action.map(|a| a.as_str()), rs[1].account_action.map(|a| a.as_str())),
        (Some("created"), Some("matched")),
        "{:?}",
        rs[1]
    );
    assert_eq!(
        (rs[2].contact_action.map(|a| a.as_str()), rs[2].account_action.map(|a| a.as_str())),
        (Some("created"), Some("created")),
        "{:?}",
        rs[2]
    );

    for (r, lead, repeat) in [(&rs[0], into_contact, true), (&rs[1], into_account, true), (&rs[2], brand_new, false)] {
        let deal = deal_of(&crm, r).await;
        assert_eq!(deal["is_repeat"], json!(false), "lead {lead}: no won deal anywhere");
        assert_eq!(deal["is_repeat_inquiry"], json!(repeat), "lead {lead}");
        assert_eq!(crm.row("leads", lead).await.unwrap()["is_repeat"], json!(repeat), "leads.is_repeat of {lead}");
        let stored = crm
            .count(&format!("SELECT count(*) FROM conversion_results WHERE job_id = '{job_id}' AND lead_id = {lead} AND is_repeat = {repeat}"))
            .await;
        assert_eq!(stored, 1, "conversion_results.is_repeat of {lead}");
    }
}

// ------------------------------------------------- rule 9: owner override

// SPEC §3.9: the override owns everything created; merged records keep
// their owner.
#[tokio::test]
async fn owner_override_owns_created_records_while_merged_ones_keep_their_owner() {
    let crm = Crm::new().await;
    let boss = crm.user("Boss", json!({})).await;
    let rep = crm.user("Rep", json!({"manager_id": boss})).await;
    let other = crm.user("Other", json!({"can_convert": false})).await;
    let options = |deal: bool| {
        let mut o = if deal { with_deal() } else { json!({}) };
        merge(&mut o, json!({"owner_id": other}));
        o
    };

    let fresh =
        crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "company": "Acme", "email": "anna@acme.pl"})).await;
    let r = crm.convert(boss, options(true), fresh).await;
    assert_eq!(account_of(&crm, &r).await["owner_id"], json!(other));
    assert_eq!(contact_of(&crm, &r).await["owner_id"], json!(other));
    assert_eq!(deal_of(&crm, &r).await["owner_id"], json!(other));

    // Existing contact and account owned by rep, writable by boss (above rep).
    let account = crm.account(json!({"owner_id": rep, "account_name": "Globex"})).await;
    let contact = crm
        .contact(json!({"owner_id": rep, "account_id": account, "last_name": "Kowalski", "email": "jan@globex.pl"}))
        .await;
    let merging = crm.lead(json!({"owner_id": rep, "last_name": "Kowalski", "email": "jan@globex.pl", "company": "Globex", "phone": "+48 1"})).await;
    let r = crm.convert(boss, options(true), merging).await;
    assert_eq!((r.contact_id, r.account_id), (Some(contact), Some(account)), "{r:?}");
    let c = contact_of(&crm, &r).await;
    assert_eq!(c["phone"], "+48 1", "the merge did write the contact");
    assert_eq!(c["owner_id"], json!(rep), "a merged contact keeps its owner");
    assert_eq!(account_of(&crm, &r).await["owner_id"], json!(rep), "a matched account keeps its owner");
    assert_eq!(deal_of(&crm, &r).await["owner_id"], json!(other), "the new deal is the override's");
}

// SPEC §3.9: without an override, created records belong to the lead's
// owner (not to the acting user).
#[tokio::test]
async fn without_override_created_records_belong_to_the_lead_owner() {
    let crm = Crm::new().await;
    let boss = crm.user("Boss", json!({})).await;
    let rep = crm.user("Rep", json!({"manager_id": boss})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "company": "Acme"})).await;
    let r = crm.convert(boss, with_deal(), lead).await;
    assert_eq!(account_of(&crm, &r).await["owner_id"], json!(rep));
    assert_eq!(contact_of(&crm, &r).await["owner_id"], json!(rep));
    assert_eq!(deal_of(&crm, &r).await["owner_id"], json!(rep));
}

// SPEC §3.9: the override must be an existing, active user, checked at
// job creation.
#[tokio::test]
async fn owner_override_must_name_an_existing_active_user() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let gone = crm.user("Gone", json!({"active": false})).await;
    let r = refused(&crm, rep, json!({"owner_id": 987_654_321})).await;
    assert_refusal(&r, ErrorCode::OwnerNotFound, "owner_id", "missing owner");
    let r = refused(&crm, rep, json!({"owner_id": gone})).await;
    assert_refusal(&r, ErrorCode::OwnerInactive, "owner_id", "inactive owner");
}

// ---------------------------------------------------- rule 10: mapping

const CONTACT_COLUMNS: &[&str] = &[
    "owner_id",
    "account_id",
    "salutation",
    "first_name",
    "last_name",
    "title",
    "email",
    "phone",
    "mobile",
    "fax",
    "skype_id",
    "lead_source",
    "email_opt_out",
    "street",
    "city",
    "state",
    "zip_code",
    "country",
    "custom_fields",
    "tags",
];
const ACCOUNT_COLUMNS: &[&str] = &[
    "owner_id",
    "account_name",
    "phone",
    "fax",
    "website",
    "industry",
    "no_of_employees",
    "street",
    "city",
    "state",
    "zip_code",
    "country",
    "custom_fields",
    "tags",
];
const DEAL_COLUMNS: &[&str] = &[
    "owner_id",
    "account_id",
    "contact_id",
    "deal_name",
    "closing_date",
    "stage",
    "pipeline",
    "amount",
    "lead_source",
    "contact_role",
    "campaign_source",
    "rating",
    "is_repeat",
    "is_repeat_inquiry",
    "custom_fields",
    "tags",
];

// SPEC §3.10: every row of the standard mapping table, and nothing else
// copied into the contract columns.
#[tokio::test]
async fn standard_mapping_puts_every_lead_field_where_the_table_says() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead = crm
        .lead(json!({
            "owner_id": rep, "salutation": "Dr.", "first_name": "Anna", "last_name": "Nowak",
            "company": "Acme Sp. z o.o.", "title": "CTO", "email": "anna@acme.pl", "phone": "+48 12 000 01",
            "mobile": "+48 600 000 02", "fax": "+48 12 000 03", "skype_id": "anna.skype", "website": "https://acme.pl",
            "lead_source": "Webinar", "industry": "Manufacturing", "annual_revenue": 1234567.89, "no_of_employees": 250,
            "rating": "Hot", "email_opt_out": true, "street": "ul. Długa 1", "city": "Kraków", "state": "Małopolskie",
            "zip_code": "30-001", "country": "Poland", "lead_status": "Qualified", "description": "Met at the expo"
        }))
        .await;
    let r = crm.convert(rep, with_deal(), lead).await;
    assert_eq!(r.outcome, "converted", "{r:?}");
    let (account_id, contact_id) = (r.account_id.unwrap(), r.contact_id.unwrap());

    let contact = contact_of(&crm, &r).await;
    let expected_contact = json!({
        "owner_id": rep, "account_id": account_id, "salutation": "Dr.", "first_name": "Anna", "last_name": "Nowak",
        "title": "CTO", "email": "anna@acme.pl", "phone": "+48 12 000 01", "mobile": "+48 600 000 02",
        "fax": "+48 12 000 03", "skype_id": "anna.skype", "lead_source": "Webinar", "email_opt_out": true,
        "street": "ul. Długa 1", "city": "Kraków", "state": "Małopolskie", "zip_code": "30-001", "country": "Poland",
        "custom_fields": {}, "tags": []
    });
    assert_columns("contacts", &contact, CONTACT_COLUMNS, &expected_contact);

    let account = account_of(&crm, &r).await;
    let expected_account = json!({
        "owner_id": rep, "account_name": "Acme Sp. z o.o.", "phone": "+48 12 000 01", "fax": "+48 12 000 03",
        "website": "https://acme.pl", "industry": "Manufacturing", "no_of_employees": 250, "street": "ul. Długa 1",
        "city": "Kraków", "state": "Małopolskie", "zip_code": "30-001", "country": "Poland",
        "custom_fields": {}, "tags": []
    });
    assert_columns("accounts", &account, ACCOUNT_COLUMNS, &expected_account);
    let revenue = text(&crm, &format!("SELECT annual_revenue::text FROM accounts WHERE id = {account_id}")).await;
    assert_eq!(revenue.as_deref(), Some("1234567.89"), "accounts.annual_revenue, exactly");

    let deal = deal_of(&crm, &r).await;
    let expected_deal = json!({
        "owner_id": rep, "account_id": account_id, "contact_id": contact_id, "deal_name": "Acme Sp. z o.o.",
        "closing_date": "2026-12-31", "stage": "Qualification", "pipeline": "Standard", "lead_source": "Webinar",
        "rating": "Hot", "is_repeat": false, "is_repeat_inquiry": false, "custom_fields": {}, "tags": []
    });
    assert_columns("deals", &deal, DEAL_COLUMNS, &expected_deal);
}

/// `custom_field_defs` rows: (module, api_name, data_type, max_length).
async fn define_fields(crm: &Crm, defs: &[(&str, &str, &str, Option<i32>)]) {
    for (module, api, ty, max) in defs {
        sqlx::query("INSERT INTO custom_field_defs (module, api_name, data_type, max_length) VALUES ($1, $2, $3, $4)")
            .bind(module)
            .bind(api)
            .bind(ty)
            .bind(max)
            .execute(crm.pool())
            .await
            .unwrap();
    }
}

fn mapping(lead_field: &str, module: &str, target: &str) -> CustomMapping {
    CustomMapping { lead_field: lead_field.into(), target_module: module.into(), target_field: target.into() }
}

// SPEC §3.10: valid custom field mappings carry the lead's values into the
// new records; unmapped custom fields stay behind.
#[tokio::test]
async fn custom_field_mappings_copy_values_at_conversion() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    define_fields(
        &crm,
        &[
            ("lead", "region", "text", Some(50)),
            ("contact", "region", "text", Some(100)),
            ("lead", "budget", "number", None),
            ("contact", "budget", "number", None),
            ("deal", "budget_est", "number", None),
            ("lead", "segment", "picklist", None),
            ("account", "segment", "picklist", None),
            ("lead", "private_note", "text", Some(200)),
        ],
    )
    .await;
    let mut conn = crm.pool().acquire().await.unwrap();
    for m in [
        mapping("region", "contact", "region"),
        mapping("budget", "contact", "budget"),
        mapping("budget", "deal", "budget_est"),
        mapping("segment", "account", "segment"),
    ] {
        mapping::save(&mut conn, &m).await.unwrap_or_else(|e| panic!("{m:?} is valid: {e}"));
    }
    drop(conn);
    assert_eq!(crm.count("SELECT count(*) FROM conversion_mappings").await, 4);

    let lead = crm
        .lead(json!({"owner_id": rep, "last_name": "Nowak", "company": "Acme",
                     "custom_fields": {"region": "EMEA", "budget": 5000, "segment": "SMB", "private_note": "do not copy"}}))
        .await;
    let r = crm.convert(rep, with_deal(), lead).await;
    assert_eq!(contact_of(&crm, &r).await["custom_fields"], json!({"region": "EMEA", "budget": 5000}));
    assert_eq!(account_of(&crm, &r).await["custom_fields"], json!({"segment": "SMB"}));
    assert_eq!(deal_of(&crm, &r).await["custom_fields"], json!({"budget_est": 5000}));
}

// SPEC §3.10: a mapping between different data types, or text into shorter
// text, is refused when saved, by leadconv and by the database itself.
#[tokio::test]
async fn invalid_custom_mappings_are_refused_when_saved() {
    let crm = Crm::new().await;
    define_fields(
        &crm,
        &[
            ("lead", "code", "text", Some(80)),
            ("contact", "code_num", "number", None),
            ("contact", "code_short", "text", Some(40)),
            ("contact", "code_same", "text", Some(80)),
            ("lead", "free_text", "text", None),
        ],
    )
    .await;
    let mut conn = crm.pool().acquire().await.unwrap();
    let invalid = [
        mapping("code", "contact", "code_num"),       // text -> number
        mapping("code", "contact", "code_short"),     // text 80 -> text 40
        mapping("free_text", "contact", "code_same"), // unlimited text -> text 80
    ];
    for m in &invalid {
        match mapping::save(&mut conn, m).await {
            Err(Error::Refused(r)) => assert_eq!(r.code, ErrorCode::InvalidMapping, "{m:?}: {r:?}"),
            other => panic!("{m:?} should be refused, got {other:?}"),
        }
    }
    assert_eq!(crm.count("SELECT count(*) FROM conversion_mappings").await, 0, "nothing saved through leadconv");

    // Another system writing SQL directly is refused just the same.
    for (m, constraint) in
        invalid.iter().zip(["mapping_type_mismatch", "mapping_length_mismatch", "mapping_length_mismatch"])
    {
        let err = sqlx::query(
            "INSERT INTO conversion_mappings (lead_field, target_module, target_field) VALUES ($1, $2, $3)",
        )
        .bind(&m.lead_field)
        .bind(&m.target_module)
        .bind(&m.target_field)
        .execute(crm.pool())
        .await
        .expect_err("the trigger refuses an invalid mapping");
        let db = err.as_database_error().unwrap_or_else(|| panic!("{m:?}: {err}"));
        assert_eq!(db.code().as_deref(), Some("23514"), "{m:?}: {db}");
        assert_eq!(db.constraint(), Some(constraint), "{m:?}: {db}");
    }
    assert_eq!(crm.count("SELECT count(*) FROM conversion_mappings").await, 0, "nothing saved through SQL");

    // Equal length is allowed ("equal or greater").
    mapping::save(&mut conn, &mapping("code", "contact", "code_same")).await.expect("text 80 into text 80 is valid");
    assert_eq!(crm.count("SELECT count(*) FROM conversion_mappings").await, 1);
}

// -------------------------------------------- rule 11: related records

async fn note(crm: &Crm, lead: i64, title: &str) -> i64 {
    crm.insert(
        "notes",
        json!({"parent_module": "lead", "parent_id": lead, "title": title, "body": format!("{title} body")}),
    )
    .await
}

async fn notes_on(crm: &Crm, module: &str, id: i64) -> Vec<(String, String)> {
    sqlx::query_as("SELECT title, body FROM notes WHERE parent_module = $1 AND parent_id = $2 ORDER BY title")
        .bind(module)
        .bind(id)
        .fetch_all(crm.pool())
        .await
        .unwrap()
}

// SPEC §3.11: with a deal, notes move to the deal and a copy of each goes
// to the contact and to the account.
#[tokio::test]
async fn with_a_deal_notes_move_to_it_and_are_copied_to_contact_and_account() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "company": "Acme"})).await;
    let bystander = crm.lead(json!({"owner_id": rep, "last_name": "Other"})).await;
    let n1 = note(&crm, lead, "Call").await;
    let n2 = note(&crm, lead, "Visit").await;
    let untouched = note(&crm, bystander, "Elsewhere").await;

    let r = crm.convert(rep, with_deal(), lead).await;
    let (deal, contact, account) = (r.deal_id.unwrap(), r.contact_id.unwrap(), r.account_id.unwrap());
    assert_eq!(crm.parent_of("notes", n1).await, ("deal".into(), deal), "the note itself moved");
    assert_eq!(crm.parent_of("notes", n2).await, ("deal".into(), deal));
    let both = vec![("Call".to_owned(), "Call body".to_owned()), ("Visit".to_owned(), "Visit body".to_owned())];
    assert_eq!(notes_on(&crm, "contact", contact).await, both, "copies on the contact");
    assert_eq!(notes_on(&crm, "account", account).await, both, "copies on the account");
    assert_eq!(notes_on(&crm, "lead", lead).await, vec![], "nothing left on the lead");
    assert_eq!(crm.parent_of("notes", untouched).await, ("lead".into(), bystander), "other leads' notes stay");
    assert_eq!(crm.count("SELECT count(*) FROM notes").await, 3 + 4);
}

// SPEC §3.11: without a deal, notes move to the contact and are not copied.
#[tokio::test]
async fn without_a_deal_notes_move_to_the_contact_only() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "company": "Acme"})).await;
    let n1 = note(&crm, lead, "Call").await;
    let n2 = note(&crm, lead, "Visit").await;
    let r = crm.convert(rep, json!({}), lead).await;
    let contact = r.contact_id.unwrap();
    assert_eq!(crm.parent_of("notes", n1).await, ("contact".into(), contact));
    assert_eq!(crm.parent_of("notes", n2).await, ("contact".into(), contact));
    assert_eq!(notes_on(&crm, "account", r.account_id.unwrap()).await, vec![], "no copies on the account");
    assert_eq!(crm.count("SELECT count(*) FROM notes").await, 2, "moved, not copied");
}

async fn attachment(crm: &Crm, lead: i64, file: &str) -> i64 {
    crm.insert(
        "attachments",
        json!({"parent_module": "lead", "parent_id": lead, "file_name": file, "content_type": "application/pdf",
               "size_bytes": 1024, "storage_key": format!("s3://bucket/{file}")}),
    )
    .await
}

// SPEC §3.11: attachments go to the contact by default (even when a deal is
// created), to the account or the deal when the job says so.
#[tokio::test]
async fn attachments_move_where_the_job_says_contact_by_default() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let new_lead = |n: &str| json!({"owner_id": rep, "last_name": n, "company": format!("{n} Ltd")});

    let lead = crm.lead(new_lead("Default")).await;
    let file = attachment(&crm, lead, "default.pdf").await;
    let r = crm.convert(rep, with_deal(), lead).await;
    assert_eq!(crm.parent_of("attachments", file).await, ("contact".into(), r.contact_id.unwrap()));

    let lead = crm.lead(new_lead("ToAccount")).await;
    let file = attachment(&crm, lead, "account.pdf").await;
    let r = crm.convert(rep, json!({"move_attachments_to": "account"}), lead).await;
    assert_eq!(crm.parent_of("attachments", file).await, ("account".into(), r.account_id.unwrap()));

    let lead = crm.lead(new_lead("ToDeal")).await;
    let file = attachment(&crm, lead, "deal.pdf").await;
    let mut options = with_deal();
    merge(&mut options, json!({"move_attachments_to": "deal"}));
    let r = crm.convert(rep, options, lead).await;
    assert_eq!(crm.parent_of("attachments", file).await, ("deal".into(), r.deal_id.unwrap()));

    assert_eq!(crm.count("SELECT count(*) FROM attachments").await, 3, "moved, never copied");
}

// SPEC §3.11: activities go to the deal when one is created, else to the
// contact.
#[tokio::test]
async fn activities_move_to_the_deal_or_else_the_contact() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let activity = |lead: i64, subject: &str| {
        json!({"parent_module": "lead", "parent_id": lead, "kind": "call", "subject": subject, "status": "open",
               "due_at": "2026-07-01T10:00:00Z"})
    };

    let with = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "company": "Acme"})).await;
    let a1 = crm.insert("activities", activity(with, "Follow up")).await;
    let r = crm.convert(rep, with_deal(), with).await;
    assert_eq!(crm.parent_of("activities", a1).await, ("deal".into(), r.deal_id.unwrap()));

    let without = crm.lead(json!({"owner_id": rep, "last_name": "Kowalski", "company": "Globex"})).await;
    let a2 = crm.insert("activities", activity(without, "Demo")).await;
    let r = crm.convert(rep, json!({}), without).await;
    assert_eq!(crm.parent_of("activities", a2).await, ("contact".into(), r.contact_id.unwrap()));
}

// SPEC §3.11: tags are carried to the created account, contact and deal,
// without duplicates.
#[tokio::test]
async fn tags_are_carried_to_created_records_without_duplicates() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead = crm
        .lead(json!({"owner_id": rep, "last_name": "Nowak", "company": "Acme", "tags": ["expo", "new", "expo"]}))
        .await;
    let r = crm.convert(rep, with_deal(), lead).await;
    assert_eq!(account_of(&crm, &r).await["tags"], json!(["expo", "new"]));
    assert_eq!(contact_of(&crm, &r).await["tags"], json!(["expo", "new"]));
    assert_eq!(deal_of(&crm, &r).await["tags"], json!(["expo", "new"]));
}

// SPEC §3.11: tags are added to merged records as a union: existing ones
// kept, none twice.
#[tokio::test]
async fn tags_are_united_with_those_of_merged_records() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let account = crm.account(json!({"owner_id": rep, "account_name": "Acme", "tags": ["partner", "new"]})).await;
    let contact = crm.contact(json!({"owner_id": rep, "account_id": account, "last_name": "Nowak", "email": "anna@acme.pl", "tags": ["vip", "expo"]})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl", "company": "Acme", "tags": ["expo", "new"]})).await;
    let r = crm.convert(rep, with_deal(), lead).await;
    assert_eq!((r.contact_id, r.account_id), (Some(contact), Some(account)), "{r:?}");
    assert_eq!(crm.row("contacts", contact).await.unwrap()["tags"], json!(["vip", "expo", "new"]));
    assert_eq!(crm.row("accounts", account).await.unwrap()["tags"], json!(["partner", "new", "expo"]));
    assert_eq!(deal_of(&crm, &r).await["tags"], json!(["expo", "new"]));
}

// SPEC §3.11: `carry_over_tags: false` adds no tags anywhere.
#[tokio::test]
async fn carry_over_tags_false_adds_no_tags() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let contact =
        crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl", "tags": ["vip"]})).await;
    let merging =
        crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl", "tags": ["expo"]})).await;
    let fresh =
        crm.lead(json!({"owner_id": rep, "last_name": "Kowalski", "company": "Globex", "tags": ["expo"]})).await;
    let mut options = with_deal();
    merge(&mut options, json!({"carry_over_tags": false}));
    let (_, rs) = crm.convert_all(rep, options, &[merging, fresh]).await;
    assert_eq!(rs[0].contact_id, Some(contact), "{:?}", rs[0]);
    assert_eq!(crm.row("contacts", contact).await.unwrap()["tags"], json!(["vip"]));
    assert_eq!(deal_of(&crm, &rs[0]).await["tags"], json!([]));
    assert_eq!(contact_of(&crm, &rs[1]).await["tags"], json!([]));
    assert_eq!(account_of(&crm, &rs[1]).await["tags"], json!([]));
    assert_eq!(deal_of(&crm, &rs[1]).await["tags"], json!([]));
}

// ---------------------------------------------- rule 12: mark the lead

#[derive(Debug, sqlx::FromRow)]
struct ResultRow {
    outcome: String,
    contact_action: Option<String>,
    account_action: Option<String>,
    deal_action: Option<String>,
    contact_id: Option<i64>,
    account_id: Option<i64>,
    deal_id: Option<i64>,
    is_repeat: Option<bool>,
    error_code: Option<String>,
    attempts: i32,
    finished_at: Option<chrono::DateTime<Utc>>,
}

async fn result_row(crm: &Crm, job: uuid::Uuid, lead: i64) -> ResultRow {
    sqlx::query_as(
        "SELECT outcome, contact_action, account_action, deal_action, contact_id, account_id, deal_id, is_repeat,
                error_code, attempts, finished_at
         FROM conversion_results WHERE job_id = $1 AND lead_id = $2",
    )
    .bind(job)
    .bind(lead)
    .fetch_one(crm.pool())
    .await
    .unwrap()
}

// SPEC §3.12: the lead is marked converted with links to what it became,
// and the result row says what happened.
#[tokio::test]
async fn converted_lead_is_marked_and_its_result_recorded() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let full =
        crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "company": "Acme", "lead_status": "Qualified"})).await;
    let bare = crm.lead(json!({"owner_id": rep, "last_name": "Kowalski", "lead_status": "Contacted"})).await;
    let (with_deal_job, rs) = crm.convert_all(rep, with_deal(), &[full]).await;
    let r = &rs[0];

    let lead = crm.row("leads", full).await.unwrap();
    assert!(!lead["converted_at"].is_null(), "converted_at set");
    assert_eq!(lead["converted_account_id"], json!(r.account_id.unwrap()));
    assert_eq!(lead["converted_contact_id"], json!(r.contact_id.unwrap()));
    assert_eq!(lead["converted_deal_id"], json!(r.deal_id.unwrap()));
    assert_eq!(lead["lead_status"], "Converted");
    assert_eq!(lead["is_repeat"], json!(false));
    assert!(crm.row("accounts", r.account_id.unwrap()).await.is_some());
    assert!(crm.row("contacts", r.contact_id.unwrap()).await.is_some());
    assert!(crm.row("deals", r.deal_id.unwrap()).await.is_some());

    let row = result_row(&crm, with_deal_job, full).await;
    assert_eq!(row.outcome, "converted");
    assert_eq!(
        (row.contact_action.as_deref(), row.account_action.as_deref(), row.deal_action.as_deref()),
        (Some("created"), Some("created"), Some("created"))
    );
    assert_eq!((row.contact_id, row.account_id, row.deal_id), (r.contact_id, r.account_id, r.deal_id));
    assert_eq!(row.is_repeat, Some(false));
    assert_eq!(row.error_code, None);
    assert!(row.attempts >= 1, "{row:?}");
    assert!(row.finished_at.is_some(), "{row:?}");

    // No company, no deal: no account, actions `none`.
    let (bare_job, rs) = crm.convert_all(rep, json!({}), &[bare]).await;
    let lead = crm.row("leads", bare).await.unwrap();
    assert!(!lead["converted_at"].is_null());
    assert_eq!(lead["converted_contact_id"], json!(rs[0].contact_id.unwrap()));
    assert_eq!((lead["converted_account_id"].clone(), lead["converted_deal_id"].clone()), (Value::Null, Value::Null));
    assert_eq!(lead["lead_status"], "Converted");
    let row = result_row(&crm, bare_job, bare).await;
    assert_eq!(
        (row.contact_action.as_deref(), row.account_action.as_deref(), row.deal_action.as_deref()),
        (Some("created"), Some("none"), Some("none"))
    );
    assert_eq!((row.account_id, row.deal_id), (None, None));
}

// SPEC §3.12 / §2: each lead is counted in its job; the job completes, with
// its finish time, when the last lead is done.
#[tokio::test]
async fn job_counts_each_lead_and_completes_after_the_last() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    crm.contact(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl"})).await;
    let fresh = crm.lead(json!({"owner_id": rep, "last_name": "Kowalski", "company": "Globex"})).await;
    let merging = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "email": "anna@acme.pl"})).await;
    let taken = crm.lead(json!({"owner_id": rep, "last_name": "Lis"})).await;
    let leads = [fresh, merging, taken];

    let job_id = job::create_for_leads(crm.pool(), rep, Trigger::Manual, &with_deal(), &leads).await.unwrap();
    let job = job::get(crm.pool(), job_id).await.unwrap().unwrap();
    assert_eq!((job.status.as_str(), job.total_count), ("scheduled", 3));
    let settings = job::settings(crm.pool(), &job).await.unwrap();
    // Another job converts `taken` after this job's snapshot: this job skips it.
    assert_eq!(crm.convert(rep, json!({}), taken).await.outcome, "converted");

    let mut outcomes = Vec::new();
    for (i, &lead) in leads.iter().enumerate() {
        outcomes.push(convert::convert_lead(crm.pool(), job_id, &settings, lead).await.unwrap().outcome);
        let job = job::get(crm.pool(), job_id).await.unwrap().unwrap();
        assert!(job.started_at.is_some());
        if i + 1 < leads.len() {
            assert_eq!(job.status, "in_progress", "after lead {}", i + 1);
            assert_eq!(job.finished_at, None, "after lead {}", i + 1);
            assert_eq!(job.pending_count(), (leads.len() - i - 1) as i32);
        }
    }
    assert_eq!(outcomes, ["converted", "converted", "skipped"]);
    let job = job::get(crm.pool(), job_id).await.unwrap().unwrap();
    assert_eq!(job.status, "completed");
    assert_eq!(
        (job.total_count, job.converted_count, job.merged_count, job.skipped_count, job.failed_count),
        (3, 2, 1, 1, 0)
    );
    assert_eq!(job.pending_count(), 0);
    let last_lead: chrono::DateTime<Utc> =
        sqlx::query_scalar("SELECT max(finished_at) FROM conversion_results WHERE job_id = $1")
            .bind(job_id)
            .fetch_one(crm.pool())
            .await
            .unwrap();
    let finished = job.finished_at.expect("a completed job has finished_at");
    assert!(finished >= last_lead && finished >= job.started_at.unwrap(), "finished {finished}, last lead {last_lead}");

    // The contract table itself, once rolled up as a worker does.
    job::rollup(crm.pool(), job_id).await.unwrap();
    let row: (String, i32, i32, i32, i32, i32, Option<chrono::DateTime<Utc>>) = sqlx::query_as(
        "SELECT status, total_count, converted_count, merged_count, skipped_count, failed_count, finished_at
         FROM conversion_jobs WHERE id = $1",
    )
    .bind(job_id)
    .fetch_one(crm.pool())
    .await
    .unwrap();
    assert_eq!(row, ("completed".to_owned(), 3, 2, 1, 1, 0, Some(finished)));
}

// ------------------------------------------------------------ atomicity

// SPEC §3 (one transaction): a statement failing half-way leaves nothing of
// the lead's conversion behind, and the lead fails with the reason.
#[tokio::test]
async fn a_failure_half_way_rolls_back_the_whole_conversion() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    exec(&crm, "ALTER TABLE deals ADD CONSTRAINT no_boom CHECK (deal_name <> 'Boom Ltd')").await;
    let lead = crm
        .lead(json!({"owner_id": rep, "last_name": "Nowak", "company": "Boom Ltd", "email": "anna@boom.pl",
                     "lead_status": "Qualified", "tags": ["expo"]}))
        .await;
    let n = note(&crm, lead, "Call").await;
    let a = attachment(&crm, lead, "offer.pdf").await;
    let act = crm.insert("activities", json!({"parent_module": "lead", "parent_id": lead, "kind": "call"})).await;

    let (job_id, rs) = crm.convert_all(rep, with_deal(), &[lead]).await;
    let r = &rs[0];
    assert_eq!(r.outcome, "failed", "{r:?}");
    assert_eq!(r.error_code.as_deref(), Some("constraint_violation"), "{r:?}");
    assert!(r.error_message.as_deref().is_some_and(|m| m.contains("no_boom")), "{r:?}");
    assert_eq!((r.contact_id, r.account_id, r.deal_id), (None, None, None));

    assert_eq!(crm.count("SELECT count(*) FROM accounts").await, 0, "the account insert was rolled back");
    assert_eq!(crm.count("SELECT count(*) FROM contacts").await, 0, "the contact insert was rolled back");
    assert_eq!(crm.count("SELECT count(*) FROM deals").await, 0);
    assert_eq!(crm.parent_of("notes", n).await, ("lead".into(), lead));
    assert_eq!(crm.count("SELECT count(*) FROM notes").await, 1, "no copies");
    assert_eq!(crm.parent_of("attachments", a).await, ("lead".into(), lead));
    assert_eq!(crm.parent_of("activities", act).await, ("lead".into(), lead));
    let l = crm.row("leads", lead).await.unwrap();
    assert_eq!(l["converted_at"], Value::Null);
    assert_eq!(l["converted_contact_id"], Value::Null);
    assert_eq!(l["lead_status"], "Qualified");

    let job = job::get(crm.pool(), job_id).await.unwrap().unwrap();
    assert_eq!((job.converted_count, job.failed_count, job.merged_count), (0, 1, 0));
    assert!(job.finished_at.is_some(), "the job's only lead is done");
    let row = result_row(&crm, job_id, lead).await;
    assert_eq!((row.outcome.as_str(), row.error_code.as_deref()), ("failed", Some("constraint_violation")));
}

// --------------------------------------------------------------- dry run

// SPEC §4 dry run: says what each lead would become, by which rule it
// matched and what would fail, and writes nothing.
#[tokio::test]
async fn dry_run_reports_the_plan_and_writes_nothing() {
    let crm = Crm::new().await;
    let boss = crm.user("Boss", json!({})).await;
    let rep = crm.user("Rep", json!({"manager_id": boss})).await;
    let account = crm.account(json!({"owner_id": rep, "account_name": "Acme"})).await;
    let contact = crm
        .contact(json!({"owner_id": rep, "account_id": account, "last_name": "Nowak", "email": "anna@acme.pl"}))
        .await;
    let initech = crm.account(json!({"owner_id": rep, "account_name": "Initech"})).await;
    crm.contact(json!({"owner_id": boss, "last_name": "Szef", "email": "szef@umbrella.pl"})).await;
    let merging = crm.lead(json!({"owner_id": rep, "last_name": "Nowak", "email": "Anna@Acme.pl", "company": "Acme", "phone": "+48 1"})).await;
    let fresh =
        crm.lead(json!({"owner_id": rep, "first_name": "Jan", "last_name": "Kowalski", "company": "Globex"})).await;
    let by_company =
        crm.lead(json!({"owner_id": rep, "last_name": "Lis", "email": "ewa@initech.pl", "company": " initech "})).await;
    let blocked = crm.lead(json!({"owner_id": boss, "last_name": "Szef", "email": "szef@umbrella.pl"})).await;
    let done = crm.lead(json!({"owner_id": rep, "last_name": "Done", "converted_at": "2026-01-01T00:00:00Z"})).await;
    let n = note(&crm, merging, "Call").await;

    let counts = "SELECT (SELECT count(*) FROM accounts) * 1000000 + (SELECT count(*) FROM contacts) * 10000
                        + (SELECT count(*) FROM deals) * 100 + (SELECT count(*) FROM notes) * 10
                        + (SELECT count(*) FROM conversion_jobs) + (SELECT count(*) FROM conversion_results)";
    let before = crm.count(counts).await;
    let contact_before = crm.row("contacts", contact).await;

    let options = deal_with(json!({"name": "{{company}} – {{last_name}}", "closing_date": "2027-01-15"}));
    let new = job::NewJob {
        criteria: json!({"ids": [merging, fresh, by_company, blocked, done]}),
        options,
        requested_by: rep,
        trigger: Trigger::Manual,
    };
    let checked = job::check(crm.pool(), new).await.expect("valid job");
    let mut plans = Vec::new();
    let n_plans = convert::dry_run(crm.pool(), &checked.settings, &checked.criteria, |p| {
        plans.push(serde_json::to_value(&p).unwrap());
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(n_plans, 4, "the converted lead does not match: {plans:?}");
    let plan_of =
        |lead: i64| plans.iter().find(|p| p["lead_id"] == json!(lead)).unwrap_or_else(|| panic!("no plan for {lead}"));
    assert!(plans.iter().all(|p| p["lead_id"] != json!(done)));

    let p = plan_of(merging);
    assert_eq!(p["outcome"], "convert", "{p}");
    assert_eq!(p["contact"]["action"], "merged", "{p}");
    assert_eq!(p["contact"]["matched_by"], "email", "{p}");
    assert_eq!(p["contact"]["id"], json!(contact), "{p}");
    assert_eq!(p["account"]["action"], "matched", "{p}");
    assert_eq!(p["account"]["id"], json!(account), "{p}");
    assert_eq!(p["deal"]["deal_name"], "Acme – Nowak", "{p}");
    assert_eq!(p["deal"]["closing_date"], "2027-01-15", "{p}");
    assert_eq!(p["deal"]["is_repeat_inquiry"], json!(true), "{p}");

    let p = plan_of(fresh);
    assert_eq!(p["outcome"], "convert", "{p}");
    assert_eq!(p["contact"]["action"], "created", "{p}");
    assert_eq!(p["contact"].get("matched_by"), None, "{p}");
    assert_eq!(p["account"]["action"], "created", "{p}");
    assert_eq!(p["deal"]["deal_name"], "Globex – Kowalski", "{p}");

    let p = plan_of(by_company);
    assert_eq!(p["contact"]["action"], "created", "{p}");
    assert_eq!(p["account"]["action"], "matched", "{p}");
    assert_eq!(p["account"]["matched_by"], "company", "{p}");
    assert_eq!(p["account"]["id"], json!(initech), "{p}");

    let p = plan_of(blocked);
    assert_eq!(p["outcome"], "failed", "{p}");
    assert_eq!(p["code"], "blocked_by_hierarchy", "{p}");

    assert_eq!(crm.count(counts).await, before, "no row added anywhere");
    assert_eq!(crm.row("contacts", contact).await, contact_before, "the matched contact is not filled");
    assert_eq!(crm.parent_of("notes", n).await, ("lead".into(), merging));
    for lead in [merging, fresh, by_company, blocked] {
        let l = crm.row("leads", lead).await.unwrap();
        assert_eq!(l["converted_at"], Value::Null, "lead {lead}");
        assert_ne!(l["lead_status"], "Converted", "lead {lead}");
    }
}

// A dry run plans leads as the job converts them, one after another: leads
// sharing an e-mail or a company with an earlier lead of the same run merge
// into the contact and account that lead creates, and the plan agrees with
// what the conversion then does.
#[tokio::test]
async fn dry_run_plans_leads_sharing_an_email_or_company_as_the_conversion_does() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let first = crm
        .lead(json!({"owner_id": rep, "last_name": "Wiśniewska", "email": "ola@hanoi.vn", "company": "Công ty Sao"}))
        .await;
    let second = crm
        .lead(json!({"owner_id": rep, "last_name": "Wiśniewska", "email": " OLA@hanoi.vn ", "company": "công ty  sao", "phone": "+84 1"}))
        .await;
    let third = crm.lead(json!({"owner_id": rep, "last_name": "W", "email": "ola@hanoi.vn", "phone": "+84 2"})).await;
    let colleague =
        crm.lead(json!({"owner_id": rep, "last_name": "Trần", "email": "tran@sao.vn", "company": "CÔNG TY SAO"})).await;
    let leads = [first, second, third, colleague];

    let plans = crm.dry_run(rep, &with_deal(), &leads).await;
    assert_eq!(crm.count("SELECT count(*) FROM contacts").await, 0, "the dry run wrote nothing");

    let p = &plans[0];
    assert_eq!((&p["contact"]["action"], &p["account"]["action"]), (&json!("created"), &json!("created")), "{p}");
    let p = &plans[1];
    assert_eq!(p["contact"]["action"], "merged", "{p}");
    assert_eq!(
        (&p["contact"]["matched_by"], &p["contact"]["created_by_lead"]),
        (&json!("email"), &json!(first)),
        "{p}"
    );
    assert_eq!(p["contact"]["values"]["phone"], "+84 1", "fills the empty phone: {p}");
    assert_eq!(
        (&p["account"]["matched_by"], &p["account"]["created_by_lead"]),
        (&json!("company"), &json!(first)),
        "{p}"
    );
    assert_eq!(p["deal"]["is_repeat_inquiry"], json!(true), "{p}");
    let p = &plans[2];
    assert_eq!(
        (&p["contact"]["matched_by"], &p["contact"]["created_by_lead"]),
        (&json!("email"), &json!(first)),
        "{p}"
    );
    assert_eq!(p["contact"]["values"].get("phone"), None, "the phone was filled by the second lead: {p}");
    let p = &plans[3];
    assert_eq!(p["contact"]["action"], "created", "{p}");
    assert_eq!(
        (&p["account"]["matched_by"], &p["account"]["created_by_lead"]),
        (&json!("company"), &json!(first)),
        "{p}"
    );

    // The conversion does what the plan said, lead by lead.
    let (_, results) = crm.convert_all(rep, with_deal(), &leads).await;
    for (plan, result) in plans.iter().zip(&results) {
        assert_eq!(plan["lead_id"], json!(result.lead_id));
        assert_eq!(plan["contact"]["action"], json!(result.contact_action), "{plan} vs {result:?}");
        assert_eq!(plan["account"]["action"], json!(result.account_action), "{plan} vs {result:?}");
    }
    assert_eq!(crm.count("SELECT count(*) FROM contacts").await, 2);
    assert_eq!(crm.count("SELECT count(*) FROM accounts").await, 1);
}
