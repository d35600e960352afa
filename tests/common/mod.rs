//! Test helpers: a fresh, migrated database per test, and a small CRM
//! vocabulary (users, leads, contacts, accounts) to set up cases briefly.
#![allow(dead_code)]

pub mod broker;
pub mod cluster;
pub mod proxy;
pub mod server;

use std::sync::atomic::{AtomicU32, Ordering};

use leadconv::record::Record;
use leadconv::store::convert::{self, LeadResult};
use leadconv::store::job::{self, Trigger};
use serde_json::{json, Value};
use sqlx::postgres::PgPoolOptions;
use sqlx::types::Json;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::OnceCell;
use uuid::Uuid;

/// The `leadconv` binary: cargo's path for it in the `leadconv` package's
/// tests; for other packages of the workspace (`leadconv-dev`), the one
/// cargo built in the target directory their test binary runs from.
pub fn leadconv_bin() -> std::path::PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_leadconv") {
        return p.into();
    }
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let bin = dir.join(format!("leadconv{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.is_file(), "{} is missing: run the tests with cargo test --workspace", bin.display());
    bin
}

/// The server's maintenance database; tests create their own next to it.
/// `leadconv ARGS` against `database_url` and a test's own queues
/// (`prefix`) on the shared RabbitMQ, logging warnings only, with no stdin,
/// killed when dropped. Callers add or override the environment.
#[allow(dead_code)]
pub fn leadconv_command(database_url: &str, prefix: &str, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(leadconv_bin());
    c.args(args)
        .env("DATABASE_URL", database_url)
        .env("AMQP_URL", broker::amqp_url())
        .env("LEADCONV_QUEUE_PREFIX", prefix)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    c
}

pub fn admin_url() -> String {
    std::env::var("LEADCONV_TEST_ADMIN_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn url_for(db: &str) -> String {
    let admin = admin_url();
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{db}")
}

static TEMPLATE: OnceCell<String> = OnceCell::const_new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A database migrated once per test binary, copied for every test: copying
/// a template is much faster than running the migrations again.
async fn template() -> &'static str {
    TEMPLATE
        .get_or_init(|| async {
            let mut admin =
                PgConnection::connect(&admin_url()).await.expect("connect to Postgres (is it running? see README)");
            drop_leftovers(&mut admin).await;
            let name = format!("leadconv_t_{}_template", std::process::id());
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await.unwrap();
            create(&mut admin, &name, "template0").await;
            let pool = PgPoolOptions::new().max_connections(1).connect(&url_for(&name)).await.unwrap();
            leadconv::store::db::migrate(&pool).await.expect("migrations run");
            pool.close().await;
            name
        })
        .await
}

async fn create(admin: &mut PgConnection, name: &str, template: &str) {
    // C.UTF-8 so that lower() folds Polish, Vietnamese and Turkish letters
    // whatever the server's default locale is.
    sqlx::query(&format!(
        "CREATE DATABASE {name} TEMPLATE {template} ENCODING 'UTF8' LC_COLLATE 'C.UTF-8' LC_CTYPE 'C.UTF-8'"
    ))
    .execute(admin)
    .await
    .unwrap_or_else(|e| panic!("create database {name}: {e}"));
}

/// Databases left by test processes that are gone (a panicking test cannot
/// drop its database in every case).
async fn drop_leftovers(admin: &mut PgConnection) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'leadconv\\_t\\_%'")
            .fetch_all(&mut *admin)
            .await
            .unwrap();
    for name in names {
        let pid = name.trim_start_matches("leadconv_t_").split('_').next().unwrap_or("");
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut *admin).await;
        }
    }
}

/// A test's own database, dropped when the test ends.
pub struct TestDb {
    pub name: String,
    pub pool: PgPool,
    /// A database this test did not create (a private server's), at this
    /// URL: left alone when the test ends.
    external: Option<String>,
}

impl TestDb {
    pub async fn new() -> TestDb {
        Self::with_connections(10).await
    }

    pub async fn with_connections(n: u32) -> TestDb {
        let template = template().await;
        let name = format!("leadconv_t_{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
        let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
        create(&mut admin, &name, template).await;
        let pool = PgPoolOptions::new().max_connections(n).connect(&url_for(&name)).await.unwrap();
        TestDb { name, pool, external: None }
    }

    /// An empty, unmigrated database with the given `LC_CTYPE`.
    pub async fn blank_with_ctype(ctype: &str) -> TestDb {
        let _ = template().await;
        let name = format!("leadconv_t_{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::SeqCst));
        let mut admin = PgConnection::connect(&admin_url()).await.unwrap();
        sqlx::query(&format!(
            "CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE '{ctype}'"
        ))
        .execute(&mut admin)
        .await
        .unwrap();
        let pool = PgPoolOptions::new().max_connections(2).connect(&url_for(&name)).await.unwrap();
        TestDb { name, pool, external: None }
    }

    pub fn url(&self) -> String {
        self.external.clone().unwrap_or_else(|| url_for(&self.name))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.external.is_some() {
            return;
        }
        let name = self.name.clone();
        // Drop runs outside async; a thread with its own runtime does the
        // async work. FORCE ends the pool's connections.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(mut admin) = PgConnection::connect(&admin_url()).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await;
                }
            })
        })
        .join();
    }
}

/// Users, records and conversions in a test database.
pub struct Crm {
    pub db: TestDb,
}

impl std::ops::Deref for Crm {
    type Target = TestDb;
    fn deref(&self) -> &TestDb {
        &self.db
    }
}

impl Crm {
    pub async fn new() -> Crm {
        Crm { db: TestDb::new().await }
    }

    /// The CRM in a database of a private server, at `url` (migrated).
    pub async fn at(url: &str) -> Crm {
        let pool = PgPoolOptions::new().max_connections(4).connect(url).await.unwrap();
        Crm { db: TestDb { name: url.into(), pool, external: Some(url.into()) } }
    }

    pub fn pool(&self) -> &PgPool {
        &self.db.pool
    }

    /// A user who may convert (override with `can_convert`, `active`,
    /// `is_admin`, `manager_id` in `extra`).
    pub async fn user(&self, name: &str, extra: Value) -> i64 {
        let mut v = json!({"name": name, "active": true, "can_convert": true, "is_admin": false});
        merge(&mut v, extra);
        self.insert("users", v).await
    }

    /// Inserts any row from JSON; returns its id.
    pub async fn insert(&self, table: &str, values: Value) -> i64 {
        let obj = values.as_object().expect("an object");
        let cols: Vec<&str> = obj.keys().map(String::as_str).collect();
        let list = cols.join(", ");
        sqlx::query_scalar(&format!(
            "INSERT INTO {table} ({list}) SELECT {list} FROM jsonb_populate_record(NULL::{table}, $1) RETURNING id"
        ))
        .bind(Json(&values))
        .fetch_one(self.pool())
        .await
        .unwrap_or_else(|e| panic!("insert into {table}: {e}"))
    }

    pub async fn lead(&self, values: Value) -> i64 {
        self.insert("leads", values).await
    }

    pub async fn contact(&self, values: Value) -> i64 {
        self.insert("contacts", values).await
    }

    pub async fn account(&self, values: Value) -> i64 {
        self.insert("accounts", values).await
    }

    /// A row as JSON, `None` when it does not exist.
    pub async fn row(&self, table: &str, id: i64) -> Option<Record> {
        sqlx::query_scalar::<_, Json<Record>>(&format!("SELECT to_jsonb(t) FROM {table} t WHERE id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await
            .unwrap()
            .map(|j| j.0)
    }

    /// Where a note, attachment or activity hangs: its parent module and id.
    pub async fn parent_of(&self, table: &str, id: i64) -> (String, i64) {
        sqlx::query_as(&format!("SELECT parent_module, parent_id FROM {table} WHERE id = $1"))
            .bind(id)
            .fetch_one(self.pool())
            .await
            .unwrap()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(self.pool()).await.unwrap()
    }

    /// Leads converted so far, by any job.
    pub async fn converted_leads(&self) -> i64 {
        self.count("SELECT count(*) FROM leads WHERE converted_at IS NOT NULL").await
    }

    /// Creates a job over `leads` and converts them one after another.
    pub async fn convert_all(&self, acting: i64, options: Value, leads: &[i64]) -> (Uuid, Vec<LeadResult>) {
        let job_id =
            job::create_for_leads(self.pool(), acting, Trigger::Manual, &options, leads).await.expect("job accepted");
        let job = job::get(self.pool(), job_id).await.unwrap().unwrap();
        let settings = job::settings(self.pool(), &job).await.unwrap();
        let mut out = Vec::new();
        for &l in leads {
            out.push(convert::convert_lead(self.pool(), job_id, &settings, l).await.expect("conversion runs"));
        }
        // Bring conversion_jobs' own columns up to date, as a worker does.
        job::rollup(self.pool(), job_id).await.unwrap();
        (job_id, out)
    }

    /// Creates a job over `leads` and converts them in batches of `size`
    /// (each batch one transaction, as a worker's bulk lane does).
    pub async fn convert_in_batches(
        &self,
        acting: i64,
        options: Value,
        leads: &[i64],
        size: usize,
    ) -> (Uuid, Vec<LeadResult>) {
        let job_id =
            job::create_for_leads(self.pool(), acting, Trigger::Manual, &options, leads).await.expect("job accepted");
        let job = job::get(self.pool(), job_id).await.unwrap().unwrap();
        let settings = job::settings(self.pool(), &job).await.unwrap();
        let mut out = Vec::new();
        for batch in leads.chunks(size) {
            let items: Vec<convert::Item> = batch
                .iter()
                .map(|&lead_id| convert::Item { lead_id, enqueued_at: None, earlier_attempts: 0 })
                .collect();
            let results = convert::convert_batch(self.pool(), job_id, &settings, &items).await.expect("batch runs");
            out.extend(results.into_iter().map(|r| r.expect("conversion runs")));
        }
        job::rollup(self.pool(), job_id).await.unwrap();
        (job_id, out)
    }

    /// A dry run's plans, as JSON, for `leads` converted by `acting`.
    pub async fn dry_run(&self, acting: i64, options: &Value, leads: &[i64]) -> Vec<Value> {
        let new = job::NewJob {
            criteria: json!({"ids": leads}),
            options: options.clone(),
            requested_by: acting,
            trigger: Trigger::Manual,
        };
        let checked = job::check(self.pool(), new).await.expect("valid job");
        let mut plans = Vec::new();
        convert::dry_run(self.pool(), &checked.settings, &checked.criteria, |p| {
            plans.push(serde_json::to_value(&p).unwrap());
            Ok(())
        })
        .await
        .unwrap();
        plans
    }

    /// An undo job of job `of` (its leads `leads`, or all), created for
    /// this process to take back (nothing published), and its settings.
    pub async fn undo_job(&self, of: Uuid, leads: Option<Vec<i64>>) -> (job::Job, leadconv::store::options::Settings) {
        use leadconv::store::job::{Dispatch, UndoOf};
        let undo = job::create_undo(
            self.pool(),
            &UndoOf { job_id: of, lead_ids: leads },
            None,
            None,
            Trigger::Manual,
            Dispatch::InProcess,
        )
        .await
        .expect("an undo job");
        let settings = job::settings(self.pool(), &undo).await.unwrap();
        (undo, settings)
    }

    /// Takes back job `of` (its leads `leads`, or all) in this process, as
    /// workers do: lead by lead, a lead waiting for another of the same job
    /// tried again after the others. Returns the undo job and its results.
    pub async fn undo(&self, of: Uuid, leads: Option<Vec<i64>>) -> (Uuid, Vec<LeadResult>) {
        use leadconv::store::convert::{ConvertError, Item};
        let (undo, settings) = self.undo_job(of, leads).await;
        let mut todo: Vec<i64> =
            sqlx::query_scalar("SELECT lead_id FROM conversion_results WHERE job_id = $1 ORDER BY lead_id")
                .bind(undo.id)
                .fetch_all(self.pool())
                .await
                .unwrap();
        let mut done = Vec::new();
        for _round in 0..20 {
            if todo.is_empty() {
                break;
            }
            let items: Vec<Item> =
                todo.iter().map(|&lead_id| Item { lead_id, enqueued_at: None, earlier_attempts: 0 }).collect();
            let results = leadconv::store::undo::undo_batch(self.pool(), undo.id, of, &settings, &items).await.unwrap();
            let mut again = Vec::new();
            for (lead, r) in todo.iter().zip(results) {
                match r {
                    Ok(r) => done.push(r),
                    Err(ConvertError::Waits(_)) => again.push(*lead),
                    Err(e) => panic!("lead {lead}: {e}"),
                }
            }
            todo = again;
        }
        assert!(todo.is_empty(), "leads {todo:?} still wait");
        job::rollup(self.pool(), undo.id).await.unwrap();
        done.sort_by_key(|r| r.lead_id);
        (undo.id, done)
    }

    /// Converts one lead in a job of its own.
    pub async fn convert(&self, acting: i64, options: Value, lead: i64) -> LeadResult {
        self.convert_all(acting, options, &[lead]).await.1.remove(0)
    }
}

/// Every lead of the job converted exactly once, the job complete, the
/// counts exact and the CRM tables in agreement with the results.
pub async fn assert_exactly_once(crm: &Crm, job_id: Uuid, total: i64) {
    job::rollup(crm.pool(), job_id).await.unwrap();
    let j = job::get(crm.pool(), job_id).await.unwrap().unwrap();
    let codes: Vec<(Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT error_code, error_message FROM conversion_results WHERE job_id = $1 AND outcome <> 'converted' LIMIT 5",
    )
    .bind(job_id)
    .fetch_all(crm.pool())
    .await
    .unwrap();
    assert!(codes.is_empty(), "leads not converted: {codes:?}");
    assert_eq!(j.status, "completed");
    assert_eq!(
        (i64::from(j.total_count), i64::from(j.converted_count), j.skipped_count, j.failed_count),
        (total, total, 0, 0)
    );
    assert_eq!(crm.converted_leads().await, total);
    assert_eq!(
        crm.count("SELECT count(*) FROM deals WHERE stage = 'Qualification'").await,
        total,
        "one deal per lead, none twice"
    );
    let created = crm.count("SELECT count(*) FROM conversion_results WHERE contact_action = 'created'").await;
    let seeded_contacts = crm.count("SELECT count(*) FROM contacts WHERE id NOT IN (SELECT contact_id FROM conversion_results WHERE contact_action = 'created')").await;
    assert_eq!(crm.count("SELECT count(*) FROM contacts").await, created + seeded_contacts);
    assert_eq!(
        crm.count("SELECT count(*) FROM (SELECT 1 FROM contacts WHERE email IS NOT NULL GROUP BY leadconv_norm_email(email) HAVING count(*) > 1) d").await,
        0,
        "no contact twice"
    );
    assert_eq!(
        crm.count(
            "SELECT count(*) FROM conversion_results r JOIN leads l ON l.id = r.lead_id
             WHERE l.converted_contact_id IS DISTINCT FROM r.contact_id OR l.converted_deal_id IS DISTINCT FROM r.deal_id"
        )
        .await,
        0
    );
}

/// Shallow merge of JSON objects.
pub fn merge(base: &mut Value, extra: Value) {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        for (k, v) in e {
            b.insert(k, v);
        }
    }
}

/// Options asking for a deal with the mandatory fields.
pub fn with_deal() -> Value {
    json!({"create_deal": true, "deal": {"closing_date": "2026-12-31", "stage": "Qualification"}})
}
