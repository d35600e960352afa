//! "The same" e-mail, company and name on real, messy, multilingual CRM
//! data (issue 8, SPEC §3): one normalisation in Postgres, used by the
//! locks, the lookups and the dry run alike; merges that never damage the
//! records they merge into.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use leadconv::store::convert;
use leadconv::store::job::{self, Trigger};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use unicode_normalization::UnicodeNormalization;

/// Rust's idea of white space is Unicode's White_Space, as the SQL's.
fn trim(s: &str) -> &str {
    s.trim()
}

/// One person and their company, written in several ways.
struct Entity {
    emails: Vec<String>,
    companies: Vec<String>,
}

fn nfd(s: &str) -> String {
    s.nfd().collect()
}

fn full_width(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' => char::from_u32(c as u32 - 0x21 + 0xFF01).unwrap(),
            c => c,
        })
        .collect()
}

/// Each family writes entity `n` in variants of case, white space (NBSP,
/// tabs, new lines), Unicode form and width. Variants never collide across
/// entities (`n` is in every one).
fn entity(family: usize, n: usize) -> Entity {
    let nb = '\u{a0}';
    let (emails, companies): (Vec<String>, Vec<String>) = match family {
        // Turkish: dotted İ folds to i.
        0 => (
            vec![format!("İPEK{n}@FİRMA.COM.TR"), format!("ipek{n}@firma.com.tr"), format!(" İpek{n}@Firma.com.tr\t")],
            vec![
                format!("İSTANBUL TİCARET {n} A.Ş."),
                format!("İstanbul Ticaret {n} A.Ş."),
                format!("istanbul{nb}ticaret  {n}\ta.ş. "),
            ],
        ),
        // Greek: Σ, σ and final ς alike.
        1 => (
            vec![format!("ΝΙΚΟΣ{n}@x.gr"), format!("νικος{n}@x.gr"), format!("Νικοσ{n}@X.GR{nb}")],
            vec![format!("ΟΔΟΣ ΑΘΗΝΑΣ {n}"), format!("Οδος Αθηνας {n}"), format!("οδοσ\tαθηνασ {n}")],
        ),
        // German: ß and SS alike.
        2 => (
            vec![format!("STRASSE{n}@bau.de"), format!("straße{n}@bau.de"), format!("Strasse{n}@BAU.de\n")],
            vec![format!("GROSSE BAU {n} GMBH"), format!("Große Bau {n} GmbH"), format!("grosse{nb}bau {n} gmbh")],
        ),
        // Polish.
        3 => (
            vec![
                format!("ŁUKASZ{n}@ŻÓŁW.PL"),
                format!("łukasz{n}@żółw.pl"),
                format!("\"Łukasz Żak\" <Łukasz{n}@Żółw.pl>"),
            ],
            vec![
                format!("ZAKŁAD ŁÓDŹ {n} SP. Z O.O."),
                format!("Zakład Łódź {n} sp. z o.o."),
                format!(" zakład łódź {n}  sp. z o.o."),
            ],
        ),
        // Vietnamese: precomposed and combining marks alike.
        4 => (
            vec![format!("việt{n}@công.vn"), nfd(&format!("VIỆT{n}@CÔNG.VN")), format!("mailto:Việt{n}@Công.vn")],
            vec![format!("Công Ty Việt {n}"), nfd(&format!("CÔNG TY VIỆT {n}")), nfd(&format!("công{nb}ty việt {n}"))],
        ),
        // Full-width forms, as Japanese input methods type Latin letters.
        _ => (
            vec![format!("{}{n}@x.jp", full_width("ANNA")), format!("anna{n}@X.JP"), format!("Anna{n}@x.jp\u{3000}")],
            vec![
                format!("{} {n}", full_width("Sony Trading")),
                format!("SONY TRADING {n}"),
                format!("sony\u{3000}trading {n}"),
            ],
        ),
    };
    Entity { emails, companies }
}

const FAMILIES: usize = 6;
const PER_FAMILY: usize = 112; // 6 × 112 entities × 3 leads = 2,016 leads
const TASKS: usize = 16;

// Acceptance: ≥ 2,000 leads whose e-mails and companies come in variants,
// against existing records in other variants, converted by 16 concurrent
// conversions: one contact per e-mail, one account per company.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn variants_converted_concurrently_make_one_contact_per_email_and_one_account_per_company() {
    let crm = Crm { db: TestDb::with_connections(TASKS as u32 + 2).await };
    let boss = crm.user("Boss", json!({"is_admin": true})).await;

    let mut email_of: HashMap<String, usize> = HashMap::new();
    let mut company_of: HashMap<String, usize> = HashMap::new();
    let mut leads = Vec::new();
    let mut entities = 0;
    for n in 0..PER_FAMILY {
        for family in 0..FAMILIES {
            let e = entity(family, n);
            let id = entities;
            entities += 1;
            for v in &e.emails {
                email_of.insert(trim(v).to_owned(), id);
            }
            for v in &e.companies {
                company_of.insert(trim(v).to_owned(), id);
            }
            // A third already exist, written in yet another way: stray
            // white space that only Unicode knows about.
            if n % 3 == 0 {
                let email = format!("{}\u{2003}\n", e.emails[1].to_uppercase());
                let company = format!("{}\u{a0}", e.companies[1].replace(' ', "\u{a0}"));
                email_of.insert(trim(&email).to_owned(), id);
                company_of.insert(trim(&company).to_owned(), id);
                let a = crm.account(json!({"owner_id": boss, "account_name": company})).await;
                crm.contact(json!({"owner_id": boss, "account_id": a, "last_name": "Old", "email": email})).await;
            }
            // Neighbouring leads share the entity, so they are converted at
            // the same moment.
            for (k, (email, company)) in e.emails.iter().zip(&e.companies).enumerate() {
                let lead = crm
                    .lead(json!({"owner_id": boss, "last_name": format!("L{k}"), "email": email, "company": company}))
                    .await;
                leads.push(lead);
            }
        }
    }
    assert!(leads.len() >= 2_000);

    let options = with_deal();
    let job_id = job::create_for_leads(crm.pool(), boss, Trigger::Manual, &options, &leads).await.unwrap();
    let settings =
        Arc::new(job::settings(crm.pool(), &job::get(crm.pool(), job_id).await.unwrap().unwrap()).await.unwrap());
    let gate = Arc::new(Semaphore::new(TASKS));
    let mut handles = Vec::new();
    for &lead in &leads {
        let (pool, settings, gate) = (crm.pool().clone(), settings.clone(), gate.clone());
        handles.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            convert::convert_lead(&pool, job_id, &settings, lead).await.expect("conversion runs")
        }));
    }
    for h in handles {
        assert_eq!(h.await.unwrap().outcome, "converted");
    }

    let mut contacts_per_entity = vec![0; entities];
    let emails: Vec<String> = sqlx::query_scalar("SELECT email FROM contacts").fetch_all(crm.pool()).await.unwrap();
    for e in &emails {
        let id = *email_of.get(trim(e)).unwrap_or_else(|| panic!("contact e-mail {e:?} is none of the variants"));
        contacts_per_entity[id] += 1;
    }
    let names: Vec<String> =
        sqlx::query_scalar("SELECT account_name FROM accounts").fetch_all(crm.pool()).await.unwrap();
    let mut accounts_per_entity = vec![0; entities];
    for a in &names {
        let id = *company_of.get(trim(a)).unwrap_or_else(|| panic!("account {a:?} is none of the variants"));
        accounts_per_entity[id] += 1;
    }
    let doubled = |per: &[i32]| per.iter().filter(|&&n| n != 1).count();
    assert_eq!(
        (doubled(&contacts_per_entity), doubled(&accounts_per_entity)),
        (0, 0),
        "entities without exactly one contact / account ({} contacts, {} accounts for {entities} entities)",
        emails.len(),
        names.len()
    );
    // New records are written trimmed.
    let untrimmed = crm
        .count("SELECT count(*) FROM contacts WHERE last_name <> 'Old' AND email <> btrim(email, E' \\t\\n\\u00a0\\u3000')")
        .await;
    assert_eq!(untrimmed, 0);
}

// Stored values with white space only Unicode knows (new line, NBSP, tab,
// NBSP inside) are matched by clean leads; new records keep no stray space.
#[tokio::test]
async fn stored_values_with_unicode_white_space_match_clean_leads() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let carol = crm.contact(json!({"owner_id": rep, "last_name": "Carol", "email": "carol@example.com\n"})).await;
    let dan = crm.contact(json!({"owner_id": rep, "last_name": "Dan", "email": "dan@example.com\u{a0}"})).await;
    let gamma = crm.account(json!({"owner_id": rep, "account_name": "Gamma Ltd\t"})).await;
    let acme = crm.account(json!({"owner_id": rep, "account_name": "Acme\u{a0}Corp"})).await;
    let l1 = crm
        .lead(json!({"owner_id": rep, "last_name": "Carol", "email": "carol@example.com", "company": "Gamma Ltd"}))
        .await;
    let l2 = crm
        .lead(json!({"owner_id": rep, "last_name": "Dan", "email": "DAN@example.com", "company": "acme corp"}))
        .await;
    let l3 = crm.lead(json!({"owner_id": rep, "last_name": "Wang", "email": " wang@bj.cn\u{3000}", "company": " 北京科技有限公司 "})).await;
    let (_, r) = crm.convert_all(rep, json!({}), &[l1, l2, l3]).await;
    assert_eq!((r[0].contact_id, r[0].account_id), (Some(carol), Some(gamma)), "{:?}", r[0]);
    assert_eq!((r[1].contact_id, r[1].account_id), (Some(dan), Some(acme)), "{:?}", r[1]);
    let wang = crm.row("contacts", r[2].contact_id.unwrap()).await.unwrap();
    let bj = crm.row("accounts", r[2].account_id.unwrap()).await.unwrap();
    assert_eq!((&wang["email"], &bj["account_name"]), (&json!("wang@bj.cn"), &json!("北京科技有限公司")));
}

// Point 3: the matched contact's own account stands; a unique-field account
// elsewhere does not pull the deal and the lead away from it.
#[tokio::test]
async fn contact_matched_by_email_keeps_its_account_over_a_unique_field_account() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({"is_admin": true})).await;
    sqlx::query(
        "INSERT INTO custom_field_defs (module, api_name, data_type, max_length, is_unique)
         VALUES ('lead', 'linkedin', 'text', 100, false), ('account', 'linkedin', 'text', 100, true)",
    )
    .execute(crm.pool())
    .await
    .unwrap();
    sqlx::query("INSERT INTO conversion_mappings VALUES ('linkedin', 'account', 'linkedin')")
        .execute(crm.pool())
        .await
        .unwrap();
    let old = crm.account(json!({"owner_id": rep, "account_name": "Old Employer"})).await;
    let li = crm
        .account(json!({"owner_id": rep, "account_name": "LI Match", "custom_fields": {"linkedin": "li/123"}}))
        .await;
    let anna =
        crm.contact(json!({"owner_id": rep, "account_id": old, "last_name": "Anna", "email": "anna@x.com"})).await;
    let lead = crm
        .lead(json!({"owner_id": rep, "last_name": "Anna", "email": "anna@x.com", "company": "LI Match",
                     "website": "li.example", "custom_fields": {"linkedin": "li/123"}}))
        .await;
    let r = crm.convert(rep, with_deal(), lead).await;
    assert_eq!((r.contact_id, r.account_id), (Some(anna), Some(old)), "{r:?}");
    let deal = crm.row("deals", r.deal_id.unwrap()).await.unwrap();
    assert_eq!(deal["account_id"], json!(old));
    assert_eq!(crm.row("leads", lead).await.unwrap()["converted_account_id"], json!(old));
    assert_eq!(crm.row("contacts", anna).await.unwrap()["account_id"], json!(old));
    // Neither company is filled with the lead's data.
    assert_eq!(crm.row("accounts", old).await.unwrap()["website"], Value::Null);
    assert_eq!(crm.row("accounts", li).await.unwrap()["website"], Value::Null);
}

// Point 4: an opt-out on the lead always wins, even in a read-only merge,
// and the result says so.
#[tokio::test]
async fn email_opt_out_on_the_lead_always_wins_and_the_result_says_so() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let peer = crm.user("Peer", json!({})).await;
    let mine =
        crm.contact(json!({"owner_id": rep, "last_name": "A", "email": "a@x.com", "email_opt_out": false})).await;
    let theirs =
        crm.contact(json!({"owner_id": peer, "last_name": "B", "email": "b@x.com", "email_opt_out": false})).await;
    let l1 = crm.lead(json!({"owner_id": rep, "last_name": "A", "email": "a@x.com", "email_opt_out": true})).await;
    let l2 = crm.lead(json!({"owner_id": rep, "last_name": "B", "email": "b@x.com", "email_opt_out": true})).await;
    let (_, r) = crm.convert_all(rep, json!({}), &[l1, l2]).await;
    for (r, contact) in r.iter().zip([mine, theirs]) {
        assert_eq!(r.contact_id, Some(contact));
        assert_eq!(crm.row("contacts", contact).await.unwrap()["email_opt_out"], json!(true), "{r:?}");
        let said: Option<bool> =
            sqlx::query_scalar("SELECT email_opt_out_applied FROM conversion_results WHERE lead_id = $1")
                .bind(r.lead_id)
                .fetch_one(crm.pool())
                .await
                .unwrap();
        assert_eq!(said, Some(true), "{r:?}");
    }
}

// Point 4: the matched contact's account of another company is linked, not
// filled with the lead's website, industry and phone.
#[tokio::test]
async fn the_contacts_account_of_another_company_is_not_filled() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let other = crm.account(json!({"owner_id": rep, "account_name": "Other Co"})).await;
    crm.contact(json!({"owner_id": rep, "account_id": other, "last_name": "A", "email": "a@x.com"})).await;
    let lead = crm
        .lead(json!({"owner_id": rep, "last_name": "A", "email": "a@x.com", "company": "Lead Co",
                     "website": "lead.example", "industry": "Mining", "phone": "+48 1"}))
        .await;
    let r = crm.convert(rep, json!({}), lead).await;
    assert_eq!(r.account_id, Some(other));
    let a = crm.row("accounts", other).await.unwrap();
    assert_eq!((&a["website"], &a["industry"], &a["phone"]), (&Value::Null, &Value::Null, &Value::Null));

    // The same account named by the lead's company (in other case and
    // spacing) is filled.
    let lead = crm
        .lead(json!({"owner_id": rep, "last_name": "A", "email": "a@x.com", "company": " OTHER\u{a0}co",
                     "website": "other.example"}))
        .await;
    crm.convert(rep, json!({}), lead).await;
    assert_eq!(crm.row("accounts", other).await.unwrap()["website"], json!("other.example"));
}

// Point 4: a read-only merged contact without account is linked to the new
// account, as the deal is.
#[tokio::test]
async fn a_read_only_merged_contact_without_account_is_linked_to_the_account() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let peer = crm.user("Peer", json!({})).await;
    let c = crm.contact(json!({"owner_id": peer, "last_name": "A", "email": "a@x.com"})).await;
    let lead = crm
        .lead(json!({"owner_id": rep, "last_name": "A", "email": "a@x.com", "company": "New Co", "phone": "1"}))
        .await;
    let r = crm.convert(rep, with_deal(), lead).await;
    assert_eq!(r.contact_id, Some(c));
    let contact = crm.row("contacts", c).await.unwrap();
    assert_eq!(contact["account_id"], json!(r.account_id.unwrap()), "linked like the deal");
    assert_eq!(contact["phone"], Value::Null, "read-only: not filled");
}

// Point 4: a lead marked repeat by hand stays repeat.
#[tokio::test]
async fn a_lead_marked_repeat_by_hand_stays_repeat() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": "A", "email": "new@x.com", "is_repeat": true})).await;
    let r = crm.convert(rep, json!({}), lead).await;
    assert_eq!(r.contact_action.map(|a| a.as_str()), Some("created"));
    assert_eq!(crm.row("leads", lead).await.unwrap()["is_repeat"], json!(true));
}

// Point 6: a blank last name fails clearly, before anything is written.
#[tokio::test]
async fn a_blank_last_name_fails_as_missing_mandatory_field_writing_nothing() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let lead = crm.lead(json!({"owner_id": rep, "last_name": " \u{a0}\t", "email": "a@x.com", "company": "Co"})).await;
    let r = crm.convert(rep, with_deal(), lead).await;
    assert_eq!((r.outcome.as_str(), r.error_code.as_deref()), ("failed", Some("missing_mandatory_field")), "{r:?}");
    assert!(r.error_message.as_deref().unwrap_or("").contains("last_name"), "{r:?}");
    let written = crm
        .count(
            "SELECT (SELECT count(*) FROM contacts) + (SELECT count(*) FROM accounts) + (SELECT count(*) FROM deals)",
        )
        .await;
    assert_eq!(written, 0);
    assert_eq!(crm.row("leads", lead).await.unwrap()["converted_at"], Value::Null);
}

// Seed 000: a lead without e-mail whose account was matched merges into the
// contact of that account with its name, and never into a namesake of
// another account.
#[tokio::test]
async fn a_lead_without_email_matches_a_namesake_only_within_its_account() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let acme = crm.account(json!({"owner_id": rep, "account_name": "Acme"})).await;
    let other = crm.account(json!({"owner_id": rep, "account_name": "Other"})).await;
    let jan =
        crm.contact(json!({"owner_id": rep, "account_id": acme, "first_name": "Jan", "last_name": "Kowalski"})).await;
    crm.contact(json!({"owner_id": rep, "account_id": other, "first_name": "Anna", "last_name": "Nowak"})).await;
    let l1 = crm
        .lead(json!({"owner_id": rep, "first_name": " JAN", "last_name": "kowalski\u{a0}", "company": "ACME"}))
        .await;
    let l2 = crm.lead(json!({"owner_id": rep, "first_name": "Anna", "last_name": "Nowak", "company": "Acme"})).await;
    let (_, r) = crm.convert_all(rep, json!({}), &[l1, l2]).await;
    assert_eq!((r[0].contact_action.map(|a| a.as_str()), r[0].contact_id), (Some("merged"), Some(jan)), "{:?}", r[0]);
    assert_eq!(r[1].contact_action.map(|a| a.as_str()), Some("created"), "Anna Nowak of Other is another person");
}

// `migrate` refuses a database where lower() folds only ASCII, naming the fix.
#[tokio::test]
async fn migrate_refuses_a_database_whose_lower_is_ascii_only() {
    let db = TestDb::blank_with_ctype("C").await;
    let err = leadconv::store::db::migrate(&db.pool).await.expect_err("a C database is refused").to_string();
    assert!(err.contains("LC_CTYPE") && err.contains("C.UTF-8") && err.contains("--create-database"), "{err}");
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename = 'leads'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(tables, 0, "nothing was migrated");
}

// Point 5: an earlier lead of the run gives the shared contact an account;
// the dry run sees it, as the conversion does.
#[tokio::test]
async fn dry_run_sees_the_account_an_earlier_lead_gives_the_shared_contact() {
    let crm = Crm::new().await;
    let rep = crm.user("Rep", json!({})).await;
    let won = crm.account(json!({"owner_id": rep, "account_name": "Xco"})).await;
    crm.insert(
        "deals",
        json!({"owner_id": rep, "account_id": won, "deal_name": "Old", "closing_date": "2025-01-01", "stage": "Closed Won"}),
    )
    .await;
    let l1 = crm.lead(json!({"owner_id": rep, "last_name": "E", "email": "e@x.com"})).await;
    let l2 = crm.lead(json!({"owner_id": rep, "last_name": "E", "email": "e@x.com", "company": "Xco"})).await;
    let l3 = crm.lead(json!({"owner_id": rep, "last_name": "E", "email": "e@x.com", "company": "Yco"})).await;
    let leads = [l1, l2, l3];
    let plans = crm.dry_run(rep, &with_deal(), &leads).await;
    let (_, results) = crm.convert_all(rep, with_deal(), &leads).await;
    for (plan, r) in plans.iter().zip(&results) {
        let deal = crm.row("deals", r.deal_id.unwrap()).await.unwrap();
        assert_eq!(
            (
                &plan["deal"]["is_repeat"],
                &plan["deal"]["is_repeat_inquiry"],
                plan["account"].get("action").unwrap_or(&json!("none"))
            ),
            (&deal["is_repeat"], &deal["is_repeat_inquiry"], &json!(r.account_action)),
            "lead {}: {plan} vs {r:?}",
            r.lead_id
        );
    }
    // The third lead's contact is in Xco, which has a won deal.
    assert_eq!(results[2].account_id, Some(won));
    assert_eq!(plans[2]["deal"]["is_repeat"], json!(true));
}

// Migration 0009 rebuilds the matching indexes: rows stored before it, with
// keys of the old definition, are found through the index by the new one.
#[tokio::test]
async fn existing_data_is_reindexed_under_the_new_normalisation() {
    let db = TestDb::blank_with_ctype("C.UTF-8").await;
    let before = std::env::temp_dir().join(format!("leadconv_migrations_{}", std::process::id()));
    std::fs::create_dir_all(&before).unwrap();
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if name.as_str() < "0009" {
            std::fs::copy(&path, before.join(name)).unwrap();
        }
    }
    sqlx::migrate::Migrator::new(before.as_path()).await.unwrap().run(&db.pool).await.unwrap();
    std::fs::remove_dir_all(&before).unwrap();
    sqlx::query("INSERT INTO contacts (last_name, email) VALUES ('Carol', E'Carol@Example.com\\n')")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO accounts (account_name) VALUES (E'İSTANBUL\\u00a0TİCARET')")
        .execute(&db.pool)
        .await
        .unwrap();

    leadconv::store::db::migrate(&db.pool).await.unwrap();
    let mut conn = db.pool.acquire().await.unwrap();
    // Only the indexes may answer.
    sqlx::query("SET enable_seqscan = off").execute(&mut *conn).await.unwrap();
    let found: (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM contacts WHERE leadconv_norm_email(email) = 'carol@example.com'),
                (SELECT count(*) FROM accounts WHERE leadconv_norm_company(account_name) = 'istanbul ticaret')",
    )
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    assert_eq!(found, (1, 1));
}
