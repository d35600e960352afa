//! The console's HTML. maud escapes every value interpolated with `(…)`,
//! so CRM values (lead names are user input) are always shown as text.

use std::collections::HashMap;

use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use maud::{html, Markup, DOCTYPE};

use crate::automation::{rules::Rule, schedule::Schedule};
use crate::error::ErrorCode;
use crate::report::Progress;
use crate::store::auth::Session;

/// Who is looking, and what the page may offer them: a button the viewer
/// may not use is not shown (and its form is refused anyway).
pub struct Viewer {
    pub session: Session,
    /// May create jobs and preview them (the "New job" page).
    pub may_create_jobs: bool,
    /// May enable, disable or delete rules and schedules (admins).
    pub may_change_automation: bool,
}
use crate::store::console::{Names, ResultFilter, ResultRow};
use crate::store::job::{JobStatus, Trigger};
use crate::store::types::Outcome;

use super::JobForm;

/// A page as an HTML answer.
pub struct Html(Markup);

impl axum::response::IntoResponse for Html {
    fn into_response(self) -> axum::response::Response {
        axum::response::Html(self.0.into_string()).into_response()
    }
}

/// The frame of every page. `live`: the page refreshes its numbers while
/// something on it is still running.
fn layout(title: &str, viewer: Option<&Viewer>, live: bool, body: Markup) -> Html {
    Html(html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · leadconv" }
                link rel="stylesheet" href="/console/app.css";
                script src="/console/app.js" defer {}
            }
            body data-live=(if live { "1" } else { "0" }) {
                header {
                    a.brand href="/console" { "leadconv" }
                    @if let Some(v) = viewer {
                        nav {
                            a href="/console" { "Jobs" }
                            @if v.may_create_jobs { a href="/console/preview" { "New job" } }
                            a href="/console/automation" { "Rules & schedules" }
                        }
                        form.signout method="post" action="/console/logout" {
                            (csrf(&v.session))
                            span.who { (v.session.user_name) }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main id="live" { (body) }
            }
        }
    })
}

fn csrf(s: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(s.csrf_token); }
}

pub fn problem(status: StatusCode, message: &str) -> Html {
    layout(
        status.canonical_reason().unwrap_or("Error"),
        None,
        false,
        html! {
            h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
            p.error { (message) }
            p { a href="/console" { "Back to the jobs" } " · " a href="/console/login" { "Sign in" } }
        },
    )
}

pub fn login(error: Option<&str>) -> Html {
    layout(
        "Sign in",
        None,
        false,
        html! {
            h1 { "Sign in" }
            p { "Paste an API token (" code { "leadconv token create --user ID" } "). Its user acts in the console." }
            @if let Some(e) = error { p.error id="login-error" { (e) } }
            form method="post" action="/console/login" {
                label { "API token " input type="password" name="token" id="token" autocomplete="off" required; }
                button type="submit" id="sign-in" { "Sign in" }
            }
        },
    )
}

fn when(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(|| "–".into(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
}

fn secs(s: f64) -> String {
    // A one-lead job takes milliseconds: "0s" would read as "not measured".
    // Rounded first, so that 0.9996 s reads "1.0s", not "1000 ms".
    if (s * 1000.0).round() < 1000.0 {
        return format!("{:.0} ms", s * 1000.0);
    }
    if (s * 10.0).round() < 100.0 {
        return format!("{s:.1}s");
    }
    let s = s.round() as i64;
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{}h {}m", s / 3600, (s % 3600) / 60),
    }
}

/// Rate and ETA while running, elapsed time once done.
fn timing(p: &Progress) -> String {
    let j = &p.job;
    let rate = p.rate_per_sec.map_or("–".into(), |r| format!("{r:.1} leads/s"));
    match (j.started_at, j.finished_at) {
        (Some(s), Some(f)) => format!("{rate}, took {}", secs((f - s).num_milliseconds() as f64 / 1000.0)),
        (Some(_), None) => format!("{rate}, ETA {}", p.eta_secs.map_or("–".into(), secs)),
        _ => "not started".into(),
    }
}

fn origin(p: &Progress, names: &Names) -> Markup {
    let j = &p.job;
    html! {
        @if let Some(r) = j.rule_id {
            "rule " (names.rules.get(&r).map_or("(deleted)", String::as_str))
        } @else if let Some(s) = j.schedule_id {
            "schedule " (names.schedules.get(&s).map_or("(deleted)", String::as_str))
        } @else if let Some(of) = j.retry_of {
            "retry of " a href={ "/console/jobs/" (of) } { (short(of)) }
        } @else if let Some(of) = j.undo_of {
            "undo of " a href={ "/console/jobs/" (of) } { (short(of)) }
        } @else {
            "–"
        }
    }
}

fn short(id: uuid::Uuid) -> String {
    id.simple().to_string()[..8].to_owned()
}

fn user(names: &Names, id: i64) -> String {
    names.users.get(&id).map_or_else(|| format!("user {id}"), |n| format!("{n} (#{id})"))
}

fn counts(p: &Progress) -> Markup {
    let j = &p.job;
    html! {
        span.n.converted { (j.converted_count) " converted" }
        " (" (j.merged_count) " merged) · "
        span.n.skipped { (j.skipped_count) " skipped" } " · "
        span.n.failed { (j.failed_count) " failed" } " · "
        span.n.pending { (p.pending_count) " pending" }
    }
}

fn bar(p: &Progress) -> Markup {
    let j = &p.job;
    let done = j.total_count - p.pending_count;
    let pct = if j.total_count == 0 { 100 } else { i64::from(done) * 100 / i64::from(j.total_count) };
    html! {
        progress.bar value=(done) max=(j.total_count.max(1)) { (pct) "%" }
        span.pct { (pct) " %" }
    }
}

fn is_running(p: &Progress) -> bool {
    matches!(p.job.status, JobStatus::Scheduled | JobStatus::InProgress)
}

pub fn jobs(
    viewer: &Viewer,
    jobs: &[Progress],
    names: &Names,
    status: Option<JobStatus>,
    trigger: Option<Trigger>,
) -> Html {
    let live = jobs.iter().any(is_running);
    layout(
        "Jobs",
        Some(viewer),
        live,
        html! {
            h1 { "Jobs" }
            form.filters method="get" action="/console" {
                label { "Status " select name="status" {
                    option value="" { "any" }
                    @for s in JobStatus::ALL { option value=(s.as_str()) selected[status == Some(*s)] { (s.as_str()) } }
                } }
                label { "Trigger " select name="trigger" {
                    option value="" { "any" }
                    @for t in Trigger::ALL { option value=(t.as_str()) selected[trigger == Some(*t)] { (t.as_str()) } }
                } }
                button type="submit" { "Filter" }
            }
            @if jobs.is_empty() {
                p { "No jobs yet. " @if viewer.may_create_jobs { a href="/console/preview" { "Start one." } } }
            } @else {
                table.jobs {
                    thead { tr { th { "Job" } th { "Status" } th { "Progress" } th { "Counts" } th { "Time" } th { "Requested by" } th { "Made by" } th { "Created" } } }
                    tbody {
                        @for p in jobs {
                            tr data-job=(p.job.id) {
                                td { a href={ "/console/jobs/" (p.job.id) } { (short(p.job.id)) } }
                                td { span class={ "status " (p.job.status.as_str()) } { (p.job.status.as_str()) } " " small { (p.job.trigger.as_str()) } }
                                td { (bar(p)) }
                                td { (p.job.total_count) " leads: " (counts(p)) }
                                td { (timing(p)) }
                                td { (user(names, p.job.requested_by)) }
                                td { (origin(p, names)) }
                                td { (when(Some(p.job.created_at))) }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// Everything the job page shows.
pub struct JobView {
    pub progress: Progress,
    pub names: Names,
    pub failures: Vec<(String, i64)>,
    pub rows: Vec<ResultRow>,
    pub filter: ResultFilter,
    pub after: i64,
    pub next: Option<i64>,
    /// See `AppState::record_url`.
    pub record_url: Option<std::sync::Arc<str>>,
    /// The viewer may cancel and retry this job.
    pub may_steer: bool,
}

fn query(filter: &ResultFilter, after: Option<i64>) -> String {
    let mut q = Vec::new();
    if let Some(o) = filter.outcome {
        q.push(format!("outcome={o}"));
    }
    if let Some(c) = &filter.code {
        q.push(format!("code={}", urlencode(c)));
    }
    if let Some(a) = after {
        q.push(format!("after={a}"));
    }
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

/// Percent-encodes everything but unreserved characters.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A created or merged record: its action, and its id linked to where the
/// CRM shows it when `serve --crm-record-url` says where that is.
fn record(action: &Option<String>, module: &str, id: Option<i64>, url: Option<&str>) -> Markup {
    html! {
        @match (action, id, url) {
            (Some(a), Some(id), Some(url)) => {
                (a) " " a.record href=(url.replace("{module}", module).replace("{id}", &id.to_string())) { "#" (id) }
                " " a.history href={ "/console/records/" (module) "/" (id) "/history" } { "history" }
            },
            (Some(a), Some(id), None) => {
                (a) " #" (id) " " a.history href={ "/console/records/" (module) "/" (id) "/history" } { "history" }
            },
            (Some(a), None, _) => { (a) },
            _ => { "–" },
        }
    }
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

pub fn job(viewer: &Viewer, v: &JobView) -> Html {
    let p = &v.progress;
    let j = &p.job;
    let base = format!("/console/jobs/{}", j.id);
    layout(
        &format!("Job {}", short(j.id)),
        Some(viewer),
        is_running(p),
        html! {
            h1 { "Job " code id="job-id" { (j.id) } }
            p.summary {
                span id="job-status" class={ "status " (j.status.as_str()) } { (j.status.as_str()) }
                " · trigger " (j.trigger.as_str())
                " · requested by " (user(&v.names, j.requested_by))
                " · made by " (origin(p, &v.names))
                " · created " (when(Some(j.created_at)))
            }
            div.progress id="job-progress" { (bar(p)) }
            p.counts id="job-counts" { (j.total_count) " leads: " (counts(p)) " · " (timing(p)) }
            @if !j.custom_fields_created.is_empty() {
                p id="job-custom-fields" {
                    "Contact custom fields this job made (and mapped): " (j.custom_fields_created.join(", "))
                }
            }
            @if j.undone_count > 0 {
                p id="job-undone" { (j.undone_count) " of its conversions were taken back since." }
            }
            div.actions {
                @if v.may_steer && is_running(p) {
                    form method="post" action={ (base) "/cancel" } {
                        (csrf(&viewer.session))
                        button type="submit" id="cancel" { "Cancel the job" }
                    }
                }
                @if v.may_steer && j.undo_of.is_none() && p.job.is_finished() && j.converted_count > j.undone_count {
                    a.button id="undo" href={ (base) "/undo" } { "Undo this job…" }
                }
                @if v.may_steer && j.failed_count > 0 {
                    form method="post" action={ (base) "/retry" } {
                        (csrf(&viewer.session))
                        @if let Some(c) = &v.filter.code { input type="hidden" name="code" value=(c); }
                        button type="submit" id="retry" {
                            @if let Some(c) = &v.filter.code { "Retry the failed leads with code " (c) } @else { "Retry the failed leads" }
                        }
                    }
                }
            }
            details {
                summary { "Criteria and options" }
                div.columns {
                    div { h3 { "Criteria" } pre { (pretty(&j.criteria)) } }
                    div { h3 { "Options" } pre { (pretty(&j.options)) } }
                }
            }
            @if !v.failures.is_empty() {
                h2 { "Failures by reason" }
                table.failures id="failures" {
                    thead { tr { th { "Code" } th { "Leads" } th { "What it means" } } }
                    tbody {
                        @for (code, n) in &v.failures {
                            tr {
                                td { a href={ (base) (query(&ResultFilter { outcome: Some(Outcome::Failed), code: Some(code.clone()) }, None)) } { (code) } }
                                td { (n) }
                                td { (describe(code)) }
                            }
                        }
                    }
                }
            }
            h2 { "Leads" }
            form.filters method="get" action=(base) {
                label { "Outcome " select name="outcome" {
                    option value="" { "any" }
                    @for o in Outcome::ALL { option value=(o.as_str()) selected[v.filter.outcome == Some(*o)] { (o.as_str()) } }
                } }
                label { "Code " input type="text" name="code" value=(v.filter.code.clone().unwrap_or_default()); }
                button type="submit" { "Show" }
                " "
                a id="export" href={ (base) "/results.csv" (query(&v.filter, None)) } { "Export CSV" }
            }
            table.results id="results" {
                thead { tr { th { "Lead" } th { "E-mail" } th { "Company" } th { "Outcome" } th { "Contact" } th { "Account" } th { "Deal" } th { "Error" } } }
                tbody {
                    @for r in &v.rows {
                        tr data-lead=(r.lead_id) {
                            td.lead { "#" (r.lead_id) " " (r.lead_name.as_deref().unwrap_or("(deleted)")) }
                            td { (r.email.as_deref().unwrap_or("")) }
                            td { (r.company.as_deref().unwrap_or("")) }
                            td { span class={ "outcome " (r.outcome.as_str()) } { (r.outcome.as_str()) } }
                            td { (record(&r.contact_action, "contact", r.contact_id, v.record_url.as_deref())) }
                            td { (record(&r.account_action, "account", r.account_id, v.record_url.as_deref())) }
                            td { (record(&r.deal_action, "deal", r.deal_id, v.record_url.as_deref())) }
                            td.error {
                                @if let Some(c) = &r.error_code { code { (c) } ": " }
                                (r.error_message.as_deref().unwrap_or(""))
                            }
                        }
                    }
                }
            }
            p.paging {
                @if v.after > 0 { a href={ (base) (query(&v.filter, None)) } { "First page" } " " }
                @if let Some(n) = v.next { a id="next-page" href={ (base) (query(&v.filter, Some(n))) } { "Next page" } }
            }
        },
    )
}

fn describe(code: &str) -> &'static str {
    serde_json::from_value::<ErrorCode>(serde_json::Value::String(code.to_owned())).map_or("", |c| c.describe())
}

/// A dry run's figures.
pub struct Preview {
    pub total: u64,
    pub summary: String,
    pub plans: Vec<String>,
    /// The lead custom fields no mapping carries, when there are any.
    pub unmapped: Option<String>,
}

pub fn preview(viewer: &Viewer, form: &JobForm, error: Option<&str>, shown: Option<&Preview>) -> Html {
    layout(
        "New job",
        Some(viewer),
        false,
        html! {
            h1 { "New job" }
            p { "Criteria and options as JSON (SPEC §6). Preview first: a dry run writes nothing." }
            @if let Some(e) = error { p.error id="preview-error" { (e) } }
            form method="post" action="/console/preview" {
                (csrf(&viewer.session))
                label.block { "Criteria" textarea name="criteria" id="criteria" rows="6" { (form.criteria) } }
                label.block { "Options" textarea name="options" id="options" rows="6" { (form.options) } }
                p.hint id="options-help" {
                    "Options (every key optional): "
                    code { "create_contact" } " and " code { "create_account" } " (default true; with "
                    code { "create_deal" } ", any non-empty combination of records), "
                    code { "deal" } " (name, closing_date, stage, pipeline, amount, contact_role, campaign_source), "
                    code { "owner_id" } ", " code { "move_attachments_to" } " (contact, account, deal), "
                    code { "carry_over_tags" } ", " code { "unmapped_custom_fields" }
                    " (keep_on_lead, or create: admins only)."
                }
                button type="submit" id="preview" { "Preview" }
            }
            @if let Some(p) = shown {
                h2 { "Dry run" }
                p id="preview-summary" { (p.total) " leads would be processed: " (p.summary) }
                @if let Some(u) = &p.unmapped { p id="preview-unmapped" { (u) } }
                @if !p.plans.is_empty() {
                    p { "The first " (p.plans.len()) ":" }
                    ol.plans { @for line in &p.plans { li { (line) } } }
                }
                form method="post" action="/console/jobs" {
                    (csrf(&viewer.session))
                    input type="hidden" name="criteria" value=(form.criteria);
                    input type="hidden" name="options" value=(form.options);
                    button type="submit" id="create" { "Create this job" }
                }
            }
        },
    )
}

type Runs = HashMap<i64, (DateTime<Utc>, i64)>;

fn switch_form(viewer: &Viewer, kind: &str, id: i64, enabled: bool) -> Markup {
    let (action, label) = if enabled { ("disable", "Disable") } else { ("enable", "Enable") };
    html! {
        @if viewer.may_change_automation {
        form.inline method="post" action={ "/console/" (kind) "/" (id) "/" (action) } {
            (csrf(&viewer.session))
            button type="submit" { (label) }
        }
        }
    }
}

pub fn automation(
    viewer: &Viewer,
    rules: &[Rule],
    rule_runs: &Runs,
    schedules: &[Schedule],
    schedule_runs: &Runs,
) -> Html {
    let last = |runs: &Runs, id: i64| runs.get(&id).map_or(("–".to_owned(), 0), |(at, n)| (when(Some(*at)), *n));
    layout(
        "Rules & schedules",
        Some(viewer),
        false,
        html! {
            h1 { "Rules" }
            p { "A rule converts a lead the moment it is inserted or updated to match, as a one-lead workflow job." }
            table {
                thead { tr { th { "Name" } th { "Enabled" } th { "Acting user" } th { "Last job" } th { "Leads converted" } th {} } }
                tbody {
                    @for r in rules {
                        @let (at, n) = last(rule_runs, r.id);
                        tr { td { (r.name) } td { (if r.enabled { "yes" } else { "no" }) } td { "#" (r.acting_user) } td { (at) } td { (n) } td { (switch_form(viewer, "rules", r.id, r.enabled)) } }
                    }
                }
            }
            h1 { "Schedules" }
            table {
                thead { tr { th { "Name" } th { "Cron (UTC)" } th { "Enabled" } th { "Next run" } th { "Last run" } th { "Last job" } th { "Leads converted" } th {} } }
                tbody {
                    @for s in schedules {
                        @let (at, n) = last(schedule_runs, s.id);
                        tr {
                            td { (s.name) } td { code { (s.cron) } } td { (if s.enabled { "yes" } else { "no" }) }
                            td { (when(Some(s.next_run_at))) } td { (when(s.last_run_at)) }
                            td { @if let Some(j) = s.last_job_id { a href={ "/console/jobs/" (j) } { (short(j)) } } @else { (at) } }
                            td { (n) } td { (switch_form(viewer, "schedules", s.id, s.enabled)) }
                        }
                    }
                }
            }
        },
    )
}

/// The undo's confirmation: its dry run (or why there is nothing to undo)
/// and the button that takes the conversions back.
pub fn undo(viewer: &Viewer, p: &Progress, shown: Result<(String, Vec<String>), String>) -> Html {
    let j = &p.job;
    let base = format!("/console/jobs/{}", j.id);
    layout(
        &format!("Undo job {}", short(j.id)),
        Some(viewer),
        false,
        html! {
            h1 { "Undo job " a href=(base) { code { (j.id) } } }
            p {
                "Takes back what this job's conversions did, lead by lead: records they created are deleted, "
                "fields they filled are set back, notes, attachments and activities go back to their lead. "
                "Work done since is kept: a lead whose records someone changed or uses since is skipped, "
                "with the record named. E-mail opt-outs stay."
            }
            @match &shown {
                Ok((summary, lines)) => {
                    p id="undo-summary" { (summary) }
                    @if !lines.is_empty() {
                        p { "The first " (lines.len()) ":" }
                        ol.plans { @for line in lines { li { (line) } } }
                    }
                    form method="post" action={ (base) "/undo" } {
                        (csrf(&viewer.session))
                        button type="submit" id="confirm-undo" { "Take these conversions back" }
                    }
                }
                Err(why) => { p.error id="undo-error" { (why) } }
            }
        },
    )
}

/// A record's history: each conversion and undo that created or changed it.
pub fn history(
    viewer: &Viewer,
    module: crate::record::Module,
    id: i64,
    events: &[crate::store::history::Event],
) -> Html {
    layout(
        &format!("History of {} {id}", module.as_str()),
        Some(viewer),
        false,
        html! {
            h1 { "History of " (module.as_str()) " #" (id) }
            @if events.is_empty() {
                p id="no-history" { "No conversion or undo of the jobs you can see touched it." }
            } @else {
                table.history {
                    thead { tr { th { "When" } th { "What" } th { "Job" } th { "Lead" } th { "By" } th { "Fields (before → after)" } } }
                    tbody {
                        @for e in events {
                            tr {
                                td { (when(Some(e.at))) }
                                td { (e.kind) ": " (format!("{:?}", e.what).to_lowercase()) }
                                td { a href={ "/console/jobs/" (e.job_id) } { (short(e.job_id)) } }
                                td { "#" (e.lead_id) }
                                td { "user #" (e.by) @if let Some(a) = e.asked_by { " (asked by #" (a) ")" } }
                                td { ul { @for c in &e.changes { li { code { (c.field) } ": " (c.before.to_string()) " → " (c.after.to_string()) } } } }
                            }
                        }
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::secs;

    #[test]
    fn durations_read_at_every_scale() {
        assert_eq!(secs(0.004), "4 ms");
        assert_eq!(secs(0.9996), "1.0s");
        assert_eq!(secs(2.46), "2.5s");
        assert_eq!(secs(9.96), "10s");
        assert_eq!(secs(42.4), "42s");
        assert_eq!(secs(125.0), "2m 5s");
        assert_eq!(secs(7384.0), "2h 3m");
    }
}
