//! The ceiling `bench` compares against: the same conversions done by
//! Postgres alone, set-based, 1,000 leads per transaction, on one
//! connection. No queue, no per-lead round trips: what the hardware and
//! Postgres can do for this work, so that the queue run's figure reads as
//! a share of it.
//!
//! It does the work the bench's data needs, as the product does it for
//! that data: matching by normalised e-mail (oldest contact) and company,
//! one new account per distinct company and one new contact per distinct
//! e-mail (without one, per name within the lead's account: the contact of
//! that account with the lead's name is its match), linking a matched contact without
//! account, filling matched records' empty fields, a deal per lead with
//! its repeat marks, notes moved to the deal with copies on the contact
//! and account, attachments to the contact, activities to the deal, tags
//! carried over, leads marked, results recorded, one counter update per
//! batch. Rules the bench's data never meets (unique fields, hierarchy,
//! read-only merges) are left out: a
//! ceiling may be a little optimistic, never pessimistic.

use std::time::Instant;

use sqlx::{Connection, PgPool};
use uuid::Uuid;

/// Leads per transaction.
pub const BATCH: i64 = 1_000;

/// Per-session scratch tables, emptied at each commit.
const SCRATCH: &[&str] = &[
    "CREATE TEMP TABLE b (lead_id bigint PRIMARY KEY, owner_id bigint, ekey text, ckey text, merged boolean NOT NULL DEFAULT false,
                          contact_id bigint, account_id bigint, deal_id bigint, repeat boolean NOT NULL DEFAULT false,
                          ckey_contact text) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE mc (ekey text PRIMARY KEY, id bigint, account_id bigint) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE ma (ckey text PRIMARY KEY, id bigint, created boolean) ON COMMIT DELETE ROWS",
    "CREATE TEMP TABLE nc (key text PRIMARY KEY, lead_id bigint, id bigint) ON COMMIT DELETE ROWS",
];

/// One batch, in order; `$1` is the job, `$2` the last lead of the
/// previous batch, `$3` the batch size (only the first statement uses them).
const STEPS: &[&str] = &[
    // The batch, its leads locked.
    "INSERT INTO b (lead_id, owner_id, ekey, ckey)
     SELECT l.id, l.owner_id, leadconv_norm_email(l.email), leadconv_norm_company(l.company)
     FROM leads l WHERE l.id IN (SELECT lead_id FROM conversion_results
                                  WHERE job_id = $1 AND outcome = 'pending' AND lead_id > $2 ORDER BY lead_id LIMIT $3)
       AND l.converted_at IS NULL
     ORDER BY l.id FOR UPDATE OF l",
    // Every key's advisory lock, in one global order.
    "SELECT pg_advisory_xact_lock(k) FROM (
         SELECT k FROM (SELECT leadconv_lock_key('email', ekey) AS k FROM b
                        UNION SELECT leadconv_lock_key('company', ckey) FROM b) keys
         WHERE k IS NOT NULL ORDER BY k) sorted",
    // Matches: the oldest contact per e-mail, the oldest account per company.
    "INSERT INTO mc SELECT DISTINCT ON (k.ekey) k.ekey, c.id, c.account_id
     FROM (SELECT DISTINCT ekey FROM b WHERE ekey IS NOT NULL) k
     JOIN contacts c ON leadconv_norm_email(c.email) = k.ekey ORDER BY k.ekey, c.created_at, c.id",
    "INSERT INTO ma SELECT DISTINCT ON (k.ckey) k.ckey, a.id, false
     FROM (SELECT DISTINCT ckey FROM b WHERE ckey IS NOT NULL) k
     JOIN accounts a ON leadconv_norm_company(a.account_name) = k.ckey ORDER BY k.ckey, a.created_at, a.id",
    "UPDATE b SET merged = true, contact_id = mc.id, account_id = mc.account_id FROM mc WHERE mc.ekey = b.ekey",
    // New accounts, one per company that neither a matched contact's
    // account nor an existing account stands for; ids drawn first, so each
    // lead knows its account without reading it back.
    "WITH need AS (SELECT DISTINCT ON (b.ckey) b.ckey, b.lead_id FROM b
                   WHERE b.ckey IS NOT NULL AND b.account_id IS NULL AND NOT EXISTS (SELECT 1 FROM ma WHERE ma.ckey = b.ckey)
                   ORDER BY b.ckey, b.lead_id),
          ids AS (SELECT ckey, lead_id, nextval(pg_get_serial_sequence('accounts', 'id')) AS id FROM need),
          made AS (INSERT INTO accounts (id, owner_id, account_name, phone, fax, website, industry, annual_revenue,
                                         no_of_employees, street, city, state, zip_code, country, tags)
                   OVERRIDING SYSTEM VALUE
                   SELECT ids.id, l.owner_id, btrim(l.company), l.phone, l.fax, l.website, l.industry, l.annual_revenue,
                          l.no_of_employees, l.street, l.city, l.state, l.zip_code, l.country, l.tags
                   FROM ids JOIN leads l ON l.id = ids.lead_id RETURNING id)
     INSERT INTO ma SELECT ckey, id, true FROM ids",
    "UPDATE b SET account_id = ma.id FROM ma WHERE b.account_id IS NULL AND ma.ckey = b.ckey",
    // Matched accounts: empty fields filled from the batch's first lead of that company.
    "UPDATE accounts a SET phone = coalesce(a.phone, l.phone), website = coalesce(a.website, l.website),
            industry = coalesce(a.industry, l.industry), annual_revenue = coalesce(a.annual_revenue, l.annual_revenue),
            no_of_employees = coalesce(a.no_of_employees, l.no_of_employees), city = coalesce(a.city, l.city),
            country = coalesce(a.country, l.country),
            tags = ARRAY(SELECT DISTINCT t FROM unnest(a.tags || l.tags) t ORDER BY t), updated_at = now()
     FROM (SELECT DISTINCT ON (ckey) ckey, lead_id FROM b WHERE ckey IS NOT NULL ORDER BY ckey, lead_id) f
     JOIN ma ON ma.ckey = f.ckey AND NOT ma.created JOIN leads l ON l.id = f.lead_id
     WHERE a.id = ma.id",
    // A lead without e-mail whose account is known: the oldest contact of
    // that account with its first and last name.
    "UPDATE b SET merged = true, contact_id = m.id FROM (
         SELECT DISTINCT ON (x.lead_id) x.lead_id, c.id FROM b x JOIN leads l ON l.id = x.lead_id
         JOIN contacts c ON c.account_id = x.account_id AND leadconv_norm(c.last_name) = leadconv_norm(l.last_name)
                        AND leadconv_norm(c.first_name) IS NOT DISTINCT FROM leadconv_norm(l.first_name)
         WHERE x.ekey IS NULL AND x.contact_id IS NULL AND x.account_id IS NOT NULL
         ORDER BY x.lead_id, c.created_at, c.id) m
     WHERE m.lead_id = b.lead_id",
    // New contacts: one per e-mail no contact has; without e-mail, one per
    // name within the account, or per lead. Later leads of the batch with
    // the same key merge into the contact the first one creates.
    "UPDATE b SET ckey_contact = coalesce(b.ekey, CASE WHEN b.account_id IS NOT NULL
                 THEN 'name:' || b.account_id || ':' || coalesce(leadconv_norm(l.first_name), '') || ':' || leadconv_norm(l.last_name) END,
                 'lead:' || b.lead_id)
     FROM leads l WHERE l.id = b.lead_id AND b.contact_id IS NULL",
    "INSERT INTO nc SELECT DISTINCT ON (ckey_contact) ckey_contact, lead_id, nextval(pg_get_serial_sequence('contacts', 'id'))
     FROM b WHERE contact_id IS NULL ORDER BY ckey_contact, lead_id",
    "INSERT INTO contacts (id, owner_id, account_id, salutation, first_name, last_name, title, email, phone, mobile, fax,
                           skype_id, lead_source, email_opt_out, street, city, state, zip_code, country, tags)
     OVERRIDING SYSTEM VALUE
     SELECT nc.id, l.owner_id, b.account_id, l.salutation, btrim(l.first_name), btrim(l.last_name), l.title, btrim(l.email),
            l.phone, l.mobile, l.fax, l.skype_id, l.lead_source, l.email_opt_out, l.street, l.city, l.state, l.zip_code,
            l.country, l.tags
     FROM nc JOIN b ON b.lead_id = nc.lead_id JOIN leads l ON l.id = nc.lead_id",
    "UPDATE b SET contact_id = nc.id, merged = nc.lead_id <> b.lead_id FROM nc WHERE b.contact_id IS NULL AND nc.key = b.ckey_contact",
    // Matched contacts: linked to the account when they have none, empty fields filled.
    "UPDATE contacts c SET account_id = coalesce(c.account_id, f.account_id), phone = coalesce(c.phone, l.phone),
            mobile = coalesce(c.mobile, l.mobile), title = coalesce(c.title, l.title), city = coalesce(c.city, l.city),
            country = coalesce(c.country, l.country), lead_source = coalesce(c.lead_source, l.lead_source),
            email_opt_out = c.email_opt_out OR coalesce(l.email_opt_out, false),
            tags = ARRAY(SELECT DISTINCT t FROM unnest(c.tags || l.tags) t ORDER BY t), updated_at = now()
     FROM (SELECT DISTINCT ON (contact_id) contact_id, account_id, lead_id FROM b WHERE merged ORDER BY contact_id, lead_id) f
     JOIN leads l ON l.id = f.lead_id
     WHERE c.id = f.contact_id",
    // Repeat marks: a won deal on the contact or the account.
    "UPDATE b SET repeat = true
     WHERE EXISTS (SELECT 1 FROM deals d JOIN deal_stages s ON s.pipeline = d.pipeline AND s.stage = d.stage
                   WHERE s.is_won AND d.contact_id = b.contact_id)
        OR EXISTS (SELECT 1 FROM deals d JOIN deal_stages s ON s.pipeline = d.pipeline AND s.stage = d.stage
                   WHERE s.is_won AND d.account_id = b.account_id)",
    "UPDATE b SET deal_id = nextval(pg_get_serial_sequence('deals', 'id'))",
    "INSERT INTO deals (id, owner_id, account_id, contact_id, deal_name, closing_date, stage, pipeline, lead_source, rating,
                        is_repeat, is_repeat_inquiry, tags)
     OVERRIDING SYSTEM VALUE
     SELECT b.deal_id, l.owner_id, b.account_id, b.contact_id, coalesce(btrim(l.company), '') || ' – ' || btrim(l.last_name),
            current_date + 30, 'Qualification', 'Standard', l.lead_source, l.rating, b.repeat, b.merged AND NOT b.repeat, l.tags
     FROM b JOIN leads l ON l.id = b.lead_id",
    // Related records.
    "INSERT INTO notes (parent_module, parent_id, title, body)
     SELECT m.module, m.id, n.title, n.body FROM b
     JOIN notes n ON n.parent_module = 'lead' AND n.parent_id = b.lead_id
     CROSS JOIN LATERAL (VALUES ('contact', b.contact_id), ('account', b.account_id)) AS m(module, id)
     WHERE m.id IS NOT NULL",
    "UPDATE notes n SET parent_module = 'deal', parent_id = b.deal_id FROM b WHERE n.parent_module = 'lead' AND n.parent_id = b.lead_id",
    "UPDATE attachments x SET parent_module = 'contact', parent_id = b.contact_id FROM b
     WHERE x.parent_module = 'lead' AND x.parent_id = b.lead_id",
    "UPDATE activities x SET parent_module = 'deal', parent_id = b.deal_id FROM b
     WHERE x.parent_module = 'lead' AND x.parent_id = b.lead_id",
    // The leads, their results, the job's counters.
    "UPDATE leads l SET converted_at = now(), converted_contact_id = b.contact_id, converted_account_id = b.account_id,
            converted_deal_id = b.deal_id, lead_status = 'Converted', is_repeat = l.is_repeat OR b.merged, updated_at = now()
     FROM b WHERE l.id = b.lead_id",
];

/// Records the batch's results and counts; `$1` is the job.
const RECORD: &[&str] = &[
    "UPDATE conversion_results r SET outcome = 'converted',
            contact_action = CASE WHEN b.merged THEN 'merged' ELSE 'created' END,
            account_action = CASE WHEN b.account_id IS NULL THEN 'none'
                                  WHEN EXISTS (SELECT 1 FROM ma WHERE ma.id = b.account_id AND ma.created) THEN 'created'
                                  ELSE 'matched' END,
            deal_action = 'created', contact_id = b.contact_id, account_id = b.account_id, deal_id = b.deal_id,
            is_repeat = b.merged, attempts = r.attempts + 1, finished_at = now()
     FROM b WHERE r.job_id = $1 AND r.lead_id = b.lead_id",
    "INSERT INTO conversion_job_counters AS c (job_id, shard, converted, merged)
     SELECT $1, pg_backend_pid(), count(*), count(*) FILTER (WHERE merged) FROM b
     ON CONFLICT (job_id, shard) DO UPDATE SET converted = c.converted + excluded.converted,
         merged = c.merged + excluded.merged, last_at = now()",
];

/// Converts every pending lead of `job_id` set-based; returns how many.
pub async fn convert(pool: &PgPool, job_id: Uuid) -> anyhow::Result<u64> {
    let mut conn = pool.acquire().await?;
    for sql in SCRATCH {
        sqlx::query(sql).execute(&mut *conn).await?;
    }
    let (mut after, mut done) = (0i64, 0u64);
    loop {
        let t = Instant::now();
        let mut tx = conn.begin().await?;
        let n = sqlx::query(STEPS[0]).bind(job_id).bind(after).bind(BATCH).execute(&mut *tx).await?.rows_affected();
        if n == 0 {
            tx.rollback().await?;
            break;
        }
        for sql in &STEPS[1..] {
            sqlx::query(sql).execute(&mut *tx).await?;
        }
        for sql in RECORD {
            sqlx::query(sql).bind(job_id).execute(&mut *tx).await?;
        }
        after = sqlx::query_scalar("SELECT max(lead_id) FROM b").fetch_one(&mut *tx).await?;
        tx.commit().await?;
        done += n;
        tracing::debug!(done, batch_ms = t.elapsed().as_millis() as u64, "set-based batch committed");
    }
    Ok(done)
}
