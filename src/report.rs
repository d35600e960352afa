//! What the command line shows of jobs: status with rate and ETA, result
//! exports, dry-run plans.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use chrono::Utc;
use futures::TryStreamExt;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use crate::plan::{Action, Plan, Verdict};
use crate::store::convert::{self, LeadResult};
use crate::store::job::{self, Job};
use crate::store::types::{JobStatus, Outcome};

/// A job with what a person watching it wants to know.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    #[serde(flatten)]
    pub job: Job,
    pub pending_count: i32,
    /// Leads finished per second since the job started.
    pub rate_per_sec: Option<f64>,
    /// Seconds until the pending leads are done at that rate.
    pub eta_secs: Option<f64>,
}

impl Progress {
    pub fn of(job: Job) -> Progress {
        let done = f64::from(job.total_count - job.pending_count());
        let pending = job.pending_count();
        let rate = job.started_at.map(|s| {
            let end = job.finished_at.unwrap_or_else(Utc::now);
            let secs = (end - s).num_milliseconds().max(1) as f64 / 1000.0;
            done / secs
        });
        let eta = match rate {
            _ if pending == 0 => Some(0.0),
            Some(r) if r > 0.0 => Some(f64::from(pending) / r),
            _ => None,
        };
        Progress { pending_count: pending, rate_per_sec: rate, eta_secs: eta, job }
    }

    pub fn line(&self) -> String {
        let j = &self.job;
        let rate = self.rate_per_sec.map_or("-".into(), |r| format!("{r:.1}/s"));
        let eta = self.eta_secs.map_or("-".into(), |e| format!("{e:.0}s"));
        let made = if j.custom_fields_created.is_empty() {
            String::new()
        } else {
            format!("; contact custom fields made: {}", j.custom_fields_created.join(", "))
        };
        format!(
            "job {} {} ({}): total {}, converted {} (merged {}), skipped {}, failed {}, pending {}; rate {rate}, eta {eta}{made}",
            j.id, j.status, j.trigger, j.total_count, j.converted_count, j.merged_count, j.skipped_count, j.failed_count, self.pending_count
        )
    }
}

async fn load(pool: &PgPool, id: Uuid) -> anyhow::Result<Job> {
    job::get(pool, id).await?.ok_or_else(|| crate::store::job::not_found().into())
}

/// `leadconv status`. With `watch`, follows the job until it finishes: a
/// progress bar on a terminal, otherwise (a pipe, a file, a CI log) one line
/// per change, so that `status --watch | tee log` shows the job moving.
/// A watched job that ends `failed` or `cancelled` is an error, so that a
/// script waiting on it stops.
pub async fn status(pool: &PgPool, id: Uuid, json: bool, watch: bool) -> anyhow::Result<()> {
    let job = load(pool, id).await?;
    let mut out = std::io::stdout();
    let line = |p: &Progress| -> anyhow::Result<String> { Ok(if json { serde_json::to_string(p)? } else { p.line() }) };
    if !watch {
        writeln!(out, "{}", line(&Progress::of(job))?)?;
        return Ok(());
    }
    let bar = std::io::stdout().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(job.total_count.max(0) as u64),
            indicatif::ProgressDrawTarget::stdout(),
        );
        bar.set_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {msg}").expect("a valid template"));
        bar
    });
    let mut last: Option<(JobStatus, i32, i32, i32, i32)> = None;
    loop {
        let p = Progress::of(load(pool, id).await?);
        let j = &p.job;
        let now = (j.status, j.converted_count, j.merged_count, j.skipped_count, j.failed_count);
        match &bar {
            Some(bar) => {
                bar.set_position((j.total_count - p.pending_count).max(0) as u64);
                bar.set_message(format!(
                    "{} · converted {} (merged {}) · skipped {} · failed {} · {} · eta {}",
                    j.status,
                    j.converted_count,
                    j.merged_count,
                    j.skipped_count,
                    j.failed_count,
                    p.rate_per_sec.map_or("-".into(), |r| format!("{r:.1}/s")),
                    p.eta_secs.map_or("-".into(), |e| format!("{e:.0}s")),
                ));
            }
            None if last != Some(now) => {
                writeln!(out, "{}", line(&p)?)?;
                out.flush()?;
            }
            None => {}
        }
        last = Some(now);
        if j.is_finished() {
            if let Some(bar) = bar {
                bar.finish();
                if json {
                    writeln!(out, "{}", line(&p)?)?;
                }
            }
            return match j.status {
                JobStatus::Failed | JobStatus::Cancelled => Err(anyhow::anyhow!("job {id} ended {}", j.status)),
                _ => Ok(()),
            };
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated, with a header line (also when there are no rows).
    Csv,
}

/// `leadconv results`: streamed from Postgres, so a million rows never sit
/// in memory.
pub async fn results(pool: &PgPool, id: Uuid, outcome: Option<Outcome>, format: Format) -> anyhow::Result<()> {
    load(pool, id).await?;
    let mut rows = convert::results_page(pool, id, outcome, 0, None);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match format {
        Format::Jsonl => {
            while let Some(r) = rows.try_next().await? {
                serde_json::to_writer(&mut out, &r)?;
                writeln!(out)?;
            }
            out.flush()?;
        }
        Format::Csv => {
            // The header is written here, not by the first row, so that a
            // job with no matching rows still gives a well-formed CSV.
            let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(out);
            w.write_record(convert::RESULT_COLUMNS.split(',').map(str::trim))?;
            while let Some(mut r) = rows.try_next().await? {
                r.error_message = r.error_message.map(spreadsheet_safe);
                w.serialize(&r)?;
            }
            w.flush()?;
        }
    }
    Ok(())
}

/// A CSV cell that a spreadsheet would run as a formula (`=`, `+`, `-`,
/// `@`, or a tab or carriage return first) starts with `'` instead: CRM
/// values and the error messages quoting them are user input, and exports
/// are opened in spreadsheets. Every CSV export goes through this.
pub fn spreadsheet_safe(v: String) -> String {
    if v.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{v}")
    } else {
        v
    }
}

/// One line of a human-readable dry run.
pub fn plan_line(p: &Plan) -> String {
    match &p.verdict {
        Verdict::Skipped { code, message } => format!("lead {}: skip ({code}): {message}", p.lead_id),
        Verdict::Failed { code, message } => format!("lead {}: FAIL ({code}): {message}", p.lead_id),
        Verdict::Convert(c) => {
            let target = |t: &crate::plan::Target, what: &str| {
                let read_only = if t.writable { "" } else { " (read-only)" };
                match (&t.id, &t.matched_by) {
                    (None, Some(_)) if t.created_by_lead.is_some() => format!(
                        "{what} {} the one lead {} creates{read_only}",
                        if t.action == Action::Merged { "merged into" } else { "matched:" },
                        t.created_by_lead.unwrap_or_default()
                    ),
                    (Some(id), Some(rule)) => format!(
                        "{what} {} {id} by {}{read_only}",
                        serde_json::to_value(t.action).map(|v| v.as_str().unwrap_or("").to_owned()).unwrap_or_default(),
                        serde_json::to_value(rule)
                            .map(|v| v.to_string().trim_matches('"').to_owned())
                            .unwrap_or_default(),
                    ),
                    _ => format!("new {what}"),
                }
            };
            let mut parts = vec![c.contact.as_ref().map_or("no contact".into(), |t| target(t, "contact"))];
            if c.contact.as_ref().is_some_and(|t| t.email_opt_out_applied) {
                parts.push("e-mail opt-out set".into());
            }
            parts.push(c.account.as_ref().map_or("no account".into(), |a| target(a, "account")));
            if let Some(d) = &c.deal {
                let mark = if d.is_repeat {
                    ", repeat"
                } else if d.is_repeat_inquiry {
                    ", repeat inquiry"
                } else {
                    ""
                };
                parts.push(format!("deal {:?} closing {} at {}{mark}", d.deal_name, d.closing_date, d.stage));
            }
            format!("lead {}: {}", p.lead_id, parts.join("; "))
        }
    }
}

/// Counts of a dry run by what would happen.
#[derive(Debug, Default)]
pub struct PlanSummary(BTreeMap<String, u64>);

impl PlanSummary {
    pub fn add(&mut self, p: &Plan) {
        let key = match &p.verdict {
            Verdict::Convert(c) if c.contact.as_ref().is_some_and(|t| t.action == Action::Merged) => "merge".to_owned(),
            Verdict::Convert(_) => "create".to_owned(),
            Verdict::Skipped { code, .. } => format!("skip {code}"),
            Verdict::Failed { code, .. } => format!("fail {code}"),
        };
        *self.0.entry(key).or_default() += 1;
    }
}

impl std::fmt::Display for PlanSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|(k, n)| format!("{k} {n}")).collect();
        f.write_str(&parts.join(", "))
    }
}

/// Lead results summed by action, for the demo and the benchmark.
pub fn actions(results: &[LeadResult]) -> BTreeMap<String, usize> {
    let mut actions: BTreeMap<String, usize> = BTreeMap::new();
    for r in results {
        let done = [
            ("contact", r.contact_action.map(|a| a.as_str())),
            ("account", r.account_action.map(|a| a.as_str())),
            ("deal", r.deal_action.map(|a| a.as_str())),
        ];
        for (kind, a) in done {
            if let Some(a) = a {
                *actions.entry(format!("{kind} {a}")).or_default() += 1;
            }
        }
        if let Some(code) = &r.error_code {
            *actions.entry(format!("{} {code}", r.outcome)).or_default() += 1;
        }
    }
    actions
}

/// One line of an undo's dry run for people: what taking the lead back
/// would do, or why it would be skipped.
pub fn undo_line(lead_id: i64, v: &crate::undo::UndoVerdict) -> String {
    use crate::undo::UndoVerdict;
    match v {
        UndoVerdict::Skipped { code, message, .. } => format!("lead {lead_id}: skipped, {code}: {message}"),
        UndoVerdict::Undo(t) => {
            let mut parts = Vec::new();
            if !t.delete.is_empty() {
                let names: Vec<String> = t.delete.iter().map(|(m, id)| format!("{} {id}", m.as_str())).collect();
                parts.push(format!("delete {}", names.join(", ")));
            }
            let mut restored: Vec<String> = Vec::new();
            for r in &t.restore {
                let name = format!("{} {}", r.module.as_str(), r.id);
                match restored.iter_mut().find(|x| x.starts_with(&format!("{name} ("))) {
                    Some(x) => {
                        x.pop();
                        x.push_str(&format!(", {})", r.field));
                    }
                    None => restored.push(format!("{name} ({})", r.field)),
                }
            }
            if !restored.is_empty() {
                parts.push(format!("set back {}", restored.join(", ")));
            }
            if !t.move_back.is_empty() {
                parts.push(format!("move {} related record(s) back to the lead", t.move_back.len()));
            }
            if !t.delete_copies.is_empty() {
                parts.push(format!("delete {} note copy(ies)", t.delete_copies.len()));
            }
            if let Some(c) = t.opt_out_kept {
                parts.push(format!("keep the e-mail opt-out on {c}"));
            }
            format!(
                "lead {lead_id}: undo: {}",
                if parts.is_empty() { "unmark the lead".into() } else { parts.join("; ") }
            )
        }
    }
}

/// The summary of an undo's dry run: how many leads would be taken back,
/// how many skipped, by code.
pub fn undo_summary(verdicts: &[(i64, crate::undo::UndoVerdict)]) -> String {
    use crate::undo::UndoVerdict;
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let mut undone = 0;
    for (_, v) in verdicts {
        match v {
            UndoVerdict::Undo(_) => undone += 1,
            UndoVerdict::Skipped { code, .. } => *codes.entry(code.to_string()).or_default() += 1,
        }
    }
    let skipped: usize = codes.values().sum();
    let mut s = format!("{} leads: {undone} would be taken back, {skipped} skipped", verdicts.len());
    if !codes.is_empty() {
        let by: Vec<String> = codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        s.push_str(&format!(" ({})", by.join(", ")));
    }
    s
}

/// The lead custom fields no mapping carries, which a dry run lists either
/// way (`unmapped_custom_fields`, seed 001): an admin sees what would stay
/// behind, or what `"create"` would make.
pub fn unmapped_fields(settings: &crate::store::options::Settings) -> Vec<String> {
    settings.fields.unmapped_lead_fields().into_iter().map(|d| d.api_name.clone()).collect()
}

/// [`unmapped_fields`] as a line for people; `None` when every lead custom
/// field is carried.
pub fn unmapped_line(settings: &crate::store::options::Settings) -> Option<String> {
    let fields = unmapped_fields(settings);
    if fields.is_empty() {
        return None;
    }
    let what = match settings.unmapped_custom_fields {
        crate::store::options::UnmappedCustomFields::Create => {
            "the job makes a contact custom field and a mapping for each"
        }
        crate::store::options::UnmappedCustomFields::KeepOnLead => {
            "their values stay on the lead; unmapped_custom_fields \"create\" carries them"
        }
    };
    Some(format!("lead custom fields no mapping carries ({what}): {}", fields.join(", ")))
}
