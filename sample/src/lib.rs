//! Sample CRM data: users in a small hierarchy, existing contacts and
//! accounts (some with won deals), and leads of which a chosen share
//! duplicate existing e-mails and companies, in mixed case and spacing, with
//! Polish, Vietnamese, Turkish and Chinese names. Deterministic for a given
//! `rng_seed`. Written set-based in batches so that a million leads seed in
//! bounded memory.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sqlx::PgPool;

#[derive(Debug, Clone)]
pub struct SeedSpec {
    pub leads: usize,
    /// Share of leads (0.0–1.0) whose e-mail or company repeats an existing
    /// record or an earlier lead.
    pub duplicates: f64,
    pub rng_seed: u64,
}

#[derive(Debug, Clone)]
pub struct Seeded {
    /// A user with `can_convert` who may act for the demo job.
    pub acting_user: i64,
    pub lead_ids: Vec<i64>,
    pub existing_contacts: usize,
    pub existing_accounts: usize,
}

const FIRST: &[&str] = &[
    "Anna",
    "Piotr",
    "Zofia",
    "Łukasz",
    "Małgorzata",
    "Nguyễn Văn",
    "Trần Thị",
    "Lê Hoàng",
    "Ayşe",
    "Mehmet",
    "伟",
    "娜",
    "敏",
    "Maria",
    "John",
];
const LAST: &[&str] = &[
    "Nowak",
    "Kowalski",
    "Wiśniewska",
    "Wójcik",
    "Kamińska",
    "An",
    "Bình",
    "Minh",
    "Yılmaz",
    "Öztürk",
    "王",
    "李",
    "张",
    "Garcia",
    "Smith",
];
const COMPANY_STEMS: &[&str] = &[
    "Acme Sp. z o.o.",
    "Công ty TNHH Sao Mai",
    "北京科技有限公司",
    "Öztürk Tekstil A.Ş.",
    "Żuraw Logistyka",
    "Globex Corporation",
];
const SOURCES: &[&str] = &["Webinar", "Trade Show", "Web Form", "Referral", "Cold Call"];
const STATUSES: &[&str] = &["Qualified", "Contacted", "New"];
const COUNTRIES: &[&str] = &["Poland", "Vietnam", "Türkiye", "China", "Germany"];
const TAGS: &[&str] = &["expo-2026", "vip", "newsletter", "partner"];

const BATCH: usize = 5_000;

/// Seeds `spec.leads` leads plus the users and records they relate to.
pub async fn seed(pool: &PgPool, spec: &SeedSpec) -> sqlx::Result<Seeded> {
    let mut rng = StdRng::seed_from_u64(spec.rng_seed);
    let run: u32 = rng.gen();
    let mut tx = pool.begin().await?;

    // A director above a manager above three reps; an admin beside them.
    let director: i64 = insert_user(&mut tx, &format!("Dorota Director {run}"), None, true, false).await?;
    let manager: i64 = insert_user(&mut tx, &format!("Marek Manager {run}"), Some(director), true, false).await?;
    let mut reps = Vec::new();
    for name in ["Ola", "Minh", "Emre"] {
        reps.push(insert_user(&mut tx, &format!("{name} Rep {run}"), Some(manager), true, false).await?);
    }
    let _admin = insert_user(&mut tx, &format!("Ada Admin {run}"), None, true, true).await?;

    // Existing CRM data: about one account and contact per 20 leads.
    let existing = (spec.leads / 20).max(3);
    let mut emails: Vec<String> = Vec::new();
    let mut companies: Vec<String> = Vec::new();
    for i in 0..existing {
        let company = format!("{} {run}-{i}", COMPANY_STEMS[i % COMPANY_STEMS.len()]);
        let email = format!("contact{i}.{run}@example.com");
        let owner = reps[i % reps.len()];
        let account: i64 =
            sqlx::query_scalar("INSERT INTO accounts (owner_id, account_name, city) VALUES ($1, $2, $3) RETURNING id")
                .bind(owner)
                .bind(&company)
                .bind(if i % 2 == 0 { Some("Kraków") } else { None })
                .fetch_one(&mut *tx)
                .await?;
        let contact: i64 = sqlx::query_scalar(
            "INSERT INTO contacts (owner_id, account_id, first_name, last_name, email, phone) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(owner)
        .bind(account)
        .bind(FIRST[i % FIRST.len()])
        .bind(LAST[i % LAST.len()])
        .bind(&email)
        .bind(if i % 3 == 0 { Some("+48 12 000 00 00") } else { None })
        .fetch_one(&mut *tx)
        .await?;
        if i % 4 == 0 {
            sqlx::query("INSERT INTO deals (owner_id, account_id, contact_id, deal_name, closing_date, stage) VALUES ($1, $2, $3, $4, current_date - 30, 'Closed Won')")
                .bind(owner)
                .bind(account)
                .bind(contact)
                .bind(format!("{company} – first order"))
                .execute(&mut *tx)
                .await?;
        }
        emails.push(email);
        companies.push(company);
    }

    let mut lead_ids = Vec::with_capacity(spec.leads);
    let mut done = 0;
    while done < spec.leads {
        let n = BATCH.min(spec.leads - done);
        let mut cols = LeadColumns::default();
        for k in 0..n {
            let i = done + k;
            let first = FIRST[rng.gen_range(0..FIRST.len())];
            let last = LAST[rng.gen_range(0..LAST.len())];
            let duplicate = rng.gen_bool(spec.duplicates.clamp(0.0, 1.0));
            let (email, company) = if duplicate {
                // Same person or company as before, written differently.
                let e = emails.choose(&mut rng).expect("existing e-mails").clone();
                let c = companies.choose(&mut rng).expect("existing companies").clone();
                match rng.gen_range(0..3) {
                    0 => (Some(format!("  {}  ", e.to_uppercase())), Some(c)),
                    1 => (Some(e), Some(format!(" {} ", c.to_uppercase().replace(' ', "  ")))),
                    _ => (None, Some(c.to_lowercase())),
                }
            } else {
                let e = format!("lead{i}.{run}@example.org");
                let c = (i % 5 != 0).then(|| format!("{} {run}/{i}", COMPANY_STEMS[i % COMPANY_STEMS.len()]));
                if i % 10 == 0 && emails.len() < 50_000 {
                    emails.push(e.clone());
                }
                (Some(e), c)
            };
            cols.owner.push(reps[rng.gen_range(0..reps.len())]);
            cols.first.push(first.to_owned());
            cols.last.push(last.to_owned());
            cols.company.push(company);
            cols.email.push(email);
            cols.phone.push(format!("+48 600 {:03} {:03}", i % 1000, (i / 1000) % 1000));
            cols.city.push(["Kraków", "Hà Nội", "İstanbul", "北京", "Berlin"][i % 5].to_owned());
            cols.country.push(COUNTRIES[i % COUNTRIES.len()].to_owned());
            cols.source.push(SOURCES[rng.gen_range(0..SOURCES.len())].to_owned());
            cols.status.push(STATUSES[rng.gen_range(0..STATUSES.len())].to_owned());
            cols.revenue.push(format!("{}.50", rng.gen_range(10_000..5_000_000)));
            cols.employees.push(rng.gen_range(1..5_000));
            let n_tags = rng.gen_range(0..3);
            cols.tags.push(TAGS.choose_multiple(&mut rng, n_tags).copied().collect::<Vec<_>>().join(","));
        }
        let ids: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO leads (owner_id, first_name, last_name, company, email, phone, city, country, lead_source,
                                lead_status, annual_revenue, no_of_employees, tags, rating, industry)
             SELECT o, f, l, c, e, p, ci, co, s, st, r::numeric, ne, coalesce(string_to_array(NULLIF(t, ''), ','), '{}'), 'Warm', 'Manufacturing'
             FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::text[], $10::text[], $11::text[], $12::int[], $13::text[])
                  AS u(o, f, l, c, e, p, ci, co, s, st, r, ne, t)
             RETURNING id",
        )
        .bind(&cols.owner)
        .bind(&cols.first)
        .bind(&cols.last)
        .bind(&cols.company)
        .bind(&cols.email)
        .bind(&cols.phone)
        .bind(&cols.city)
        .bind(&cols.country)
        .bind(&cols.source)
        .bind(&cols.status)
        .bind(&cols.revenue)
        .bind(&cols.employees)
        .bind(&cols.tags)
        .fetch_all(&mut *tx)
        .await?;
        // Related records to carry over: a note on every third lead, an
        // activity on every fourth, an attachment on every fifth.
        sqlx::query(
            "INSERT INTO notes (parent_module, parent_id, title, body)
             SELECT 'lead', id, 'First call', 'Interested in a demo.' FROM unnest($1::bigint[]) id WHERE id % 3 = 0",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO activities (parent_module, parent_id, kind, subject, due_at, status)
             SELECT 'lead', id, 'call', 'Follow-up call', now() + interval '3 days', 'open' FROM unnest($1::bigint[]) id WHERE id % 4 = 0",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO attachments (parent_module, parent_id, file_name, content_type, size_bytes, storage_key)
             SELECT 'lead', id, 'brief.pdf', 'application/pdf', 48213, 'leads/' || id || '/brief.pdf' FROM unnest($1::bigint[]) id WHERE id % 5 = 0",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        lead_ids.extend(ids);
        done += n;
    }
    tx.commit().await?;
    Ok(Seeded { acting_user: manager, lead_ids, existing_contacts: existing, existing_accounts: existing })
}

#[derive(Default)]
struct LeadColumns {
    owner: Vec<i64>,
    first: Vec<String>,
    last: Vec<String>,
    company: Vec<Option<String>>,
    email: Vec<Option<String>>,
    phone: Vec<String>,
    city: Vec<String>,
    country: Vec<String>,
    source: Vec<String>,
    status: Vec<String>,
    revenue: Vec<String>,
    employees: Vec<i32>,
    tags: Vec<String>,
}

async fn insert_user(
    conn: &mut sqlx::PgConnection,
    name: &str,
    manager: Option<i64>,
    can_convert: bool,
    is_admin: bool,
) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO users (name, email, manager_id, can_convert, is_admin) VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(name)
    .bind(format!("{}@crm.example", name.to_lowercase().replace(' ', ".")))
    .bind(manager)
    .bind(can_convert)
    .bind(is_admin)
    .fetch_one(conn)
    .await
}
