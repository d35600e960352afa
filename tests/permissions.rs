//! Who may do what (SPEC §5, issue 20), over HTTP against `leadconv serve`:
//! every role × every `/v1` operation and every console page and form
//! (CSV export and dry-run preview included), over objects inside and
//! outside each caller's reach. Each cell asserts the status; that a denied
//! call changed nothing (jobs and their states, results, rules, schedules,
//! converted leads, sessions); that an allowed change did change something;
//! and that a 404 is word for word the answer for an id that does not exist.
//!
//! The expectations are written out here from SPEC §5 (the oracle is this
//! file's [`Role`], not the product's own decision function).

mod common;

use std::collections::BTreeSet;

use common::broker::TestBroker;
use common::server::{serve, Server};
use common::*;
use leadconv::store::job::{self, Dispatch, NewJob, Trigger};
use reqwest::header::{COOKIE, SET_COOKIE};
use reqwest::{redirect, Method, StatusCode};
use serde_json::{json, Value};
use uuid::Uuid;

/// The organisation: a director over a read-only VP (a dashboard user)
/// over a manager over two reps; an inactive rep under the manager; an
/// admin outside the tree.
struct Org {
    admin: i64,
    director: i64,
    viewer: i64,
    manager: i64,
    rep: i64,
    peer: i64,
    inactive: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Admin,
    Director,
    /// Active, without `can_convert`: reads what it reaches.
    ReadOnlyUser,
    Manager,
    Rep,
    PeerRep,
    InactiveUser,
    RevokedToken,
    ExpiredToken,
    /// The manager's token with `--scope read`.
    ReadToken,
    /// The manager's token with `--scope convert`.
    ConvertToken,
}

const ROLES: [Role; 11] = [
    Role::Admin,
    Role::Director,
    Role::ReadOnlyUser,
    Role::Manager,
    Role::Rep,
    Role::PeerRep,
    Role::InactiveUser,
    Role::RevokedToken,
    Role::ExpiredToken,
    Role::ReadToken,
    Role::ConvertToken,
];

impl Role {
    fn user(self, o: &Org) -> i64 {
        match self {
            Role::Admin => o.admin,
            Role::Director => o.director,
            Role::ReadOnlyUser => o.viewer,
            Role::Manager | Role::ReadToken | Role::ConvertToken => o.manager,
            Role::Rep | Role::RevokedToken | Role::ExpiredToken => o.rep,
            Role::PeerRep => o.peer,
            Role::InactiveUser => o.inactive,
        }
    }

    /// The status every call gets before any permission is looked at.
    fn refused_outright(self) -> Option<StatusCode> {
        match self {
            Role::RevokedToken | Role::ExpiredToken => Some(StatusCode::UNAUTHORIZED),
            Role::InactiveUser => Some(StatusCode::FORBIDDEN),
            _ => None,
        }
    }

    /// Whether the caller sees what `owner` requested (or acts as).
    fn sees(self, o: &Org, owner: i64) -> bool {
        let below: &[i64] = match self {
            Role::Admin => return true,
            Role::Director => &[o.director, o.viewer, o.manager, o.rep, o.peer, o.inactive],
            Role::ReadOnlyUser => &[o.viewer, o.manager, o.rep, o.peer, o.inactive],
            Role::Manager | Role::ReadToken | Role::ConvertToken => &[o.manager, o.rep, o.peer, o.inactive],
            Role::Rep => &[o.rep],
            Role::PeerRep => &[o.peer],
            Role::InactiveUser | Role::RevokedToken | Role::ExpiredToken => &[],
        };
        below.contains(&owner)
    }

    /// Full rights of a user who may convert.
    fn writes(self) -> bool {
        matches!(self, Role::Admin | Role::Director | Role::Manager | Role::Rep | Role::PeerRep)
    }

    fn converts_now(self) -> bool {
        self.writes() || self == Role::ConvertToken
    }

    fn signs_in(self) -> bool {
        matches!(
            self,
            Role::Admin
                | Role::Director
                | Role::ReadOnlyUser
                | Role::Manager
                | Role::Rep
                | Role::PeerRep
                | Role::ReadToken
        )
    }

    /// The status of an act on an object of `owner`: `allowed` when the
    /// caller may, 404 outside the reach, 403 when the object is seen but
    /// the act not the caller's.
    fn on_object(self, o: &Org, owner: i64, may: bool, allowed: StatusCode) -> StatusCode {
        if let Some(s) = self.refused_outright() {
            s
        } else if !self.sees(o, owner) {
            StatusCode::NOT_FOUND
        } else if may {
            allowed
        } else {
            StatusCode::FORBIDDEN
        }
    }

    /// The status of an act about no object.
    fn plain(self, may: bool, allowed: StatusCode) -> StatusCode {
        match self.refused_outright() {
            Some(s) => s,
            None if may => allowed,
            None => StatusCode::FORBIDDEN,
        }
    }
}

struct World {
    server: Server,
    crm: Crm,
    _broker: TestBroker,
    http: reqwest::Client,
    org: Org,
    tokens: Vec<(Role, String)>,
}

impl World {
    async fn new() -> World {
        let crm = Crm::new().await;
        let broker = TestBroker::new().await;
        let server = serve(&crm.db, &broker).await;
        let admin = crm.user("Ada Admin", json!({"is_admin": true})).await;
        let director = crm.user("Dora Director", json!({})).await;
        let viewer = crm.user("Vera Viewer", json!({"manager_id": director, "can_convert": false})).await;
        let manager = crm.user("Mia Manager", json!({"manager_id": viewer})).await;
        let rep = crm.user("Rex Rep", json!({"manager_id": manager})).await;
        let peer = crm.user("Pia Peer", json!({"manager_id": manager})).await;
        let inactive = crm.user("Ina Inactive", json!({"manager_id": manager})).await;
        let org = Org { admin, director, viewer, manager, rep, peer, inactive };
        use leadconv::store::auth::{create_scoped_token, TokenGrant};
        use leadconv_domain::access::Scope;
        let mut tokens = Vec::new();
        for role in ROLES {
            let scope = match role {
                Role::ReadToken => Scope::Read,
                Role::ConvertToken => Scope::Convert,
                _ => Scope::Full,
            };
            let grant = TokenGrant { scope, expires_in: None };
            let token = create_scoped_token(crm.pool(), role.user(&org), &format!("{role:?}"), grant).await.unwrap();
            tokens.push((role, token));
        }
        // The inactive user's token was made while they were active.
        sqlx::query("UPDATE users SET active = false WHERE id = $1").bind(inactive).execute(crm.pool()).await.unwrap();
        sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE name = 'RevokedToken'")
            .execute(crm.pool())
            .await
            .unwrap();
        sqlx::query("UPDATE api_tokens SET expires_at = now() - interval '1 minute' WHERE name = 'ExpiredToken'")
            .execute(crm.pool())
            .await
            .unwrap();
        let http = reqwest::Client::builder().redirect(redirect::Policy::none()).build().unwrap();
        World { server, crm, _broker: broker, http, org, tokens }
    }

    fn token(&self, role: Role) -> &str {
        &self.tokens.iter().find(|(r, _)| *r == role).unwrap().1
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base)
    }

    async fn call(
        &self,
        role: Role,
        method: Method,
        path: impl AsRef<str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, self.url(path.as_ref())).bearer_auth(self.token(role));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Everything a call could change, as one string.
    async fn state(&self) -> String {
        sqlx::query_scalar(
            "SELECT concat_ws(' | ',
                (SELECT string_agg(id::text || ':' || status, ',' ORDER BY id) FROM conversion_jobs),
                (SELECT string_agg(job_id::text || lead_id || outcome, ',' ORDER BY job_id, lead_id) FROM conversion_results),
                (SELECT string_agg(id || ':' || enabled, ',' ORDER BY id) FROM conversion_rules),
                (SELECT string_agg(id || ':' || enabled, ',' ORDER BY id) FROM conversion_schedules),
                (SELECT count(*) FROM leads WHERE converted_at IS NOT NULL),
                (SELECT count(*) FROM console_sessions))",
        )
        .fetch_one(self.crm.pool())
        .await
        .unwrap()
    }

    async fn lead(&self, last_name: &str) -> i64 {
        self.crm.lead(json!({"owner_id": self.org.rep, "last_name": last_name, "company": "Acme"})).await
    }

    /// A job of `owner`, waiting in the queue (nobody consumes it here).
    async fn pending_job(&self, owner: i64) -> Uuid {
        let lead = self.lead("Pending").await;
        let new = NewJob {
            criteria: json!({"ids": [lead]}),
            options: json!({}),
            requested_by: owner,
            trigger: Trigger::Manual,
        };
        let checked = job::check(self.crm.pool(), new).await.unwrap();
        let lease = job::Lease::new(std::time::Duration::from_secs(30));
        job::create(self.crm.pool(), &checked, Dispatch::Queue { lease }).await.unwrap().id
    }

    /// A finished job of `owner` with one failed lead (no last name).
    async fn failed_job(&self, owner: i64) -> Uuid {
        let lead = self.lead(" ").await;
        let (id, results) = self.crm.convert_all(owner, json!({}), &[lead]).await;
        assert_eq!(results[0].outcome.to_string(), "failed");
        id
    }

    async fn rule(&self, acting_user: i64) -> i64 {
        let new = leadconv::automation::rules::NewRule {
            name: format!("rule {}", Uuid::new_v4()),
            criteria: json!({"field": "lead_status", "op": "eq", "value": "Never"}),
            options: json!({}),
            acting_user,
            enabled: true,
        };
        leadconv::automation::rules::create(self.crm.pool(), new).await.unwrap().id
    }

    async fn schedule(&self, acting_user: i64) -> i64 {
        let new = leadconv::automation::schedule::NewSchedule {
            name: format!("schedule {}", Uuid::new_v4()),
            cron: "0 3 * * *".into(),
            criteria: json!({"field": "lead_status", "op": "eq", "value": "Never"}),
            options: json!({}),
            acting_user,
            enabled: true,
            overlap: leadconv::store::types::Overlap::Skip,
        };
        leadconv::automation::schedule::create(self.crm.pool(), new).await.unwrap().id
    }
}

/// Runs one cell: the call, its status, and what it changed.
async fn cell<F, Fut>(w: &World, what: &str, expected: StatusCode, call: F) -> Value
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = (StatusCode, Value)>,
{
    let before = w.state().await;
    let (status, body) = call().await;
    assert_eq!(status, expected, "{what}: {body}");
    let after = w.state().await;
    if !status.is_success() && !status.is_redirection() {
        assert_eq!(before, after, "{what}: a denied call changed something");
    }
    body
}

fn owners(o: &Org) -> [(&'static str, i64); 3] {
    [("rep", o.rep), ("peer", o.peer), ("admin", o.admin)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_against_every_api_operation() {
    let w = World::new().await;
    let o = &w.org;
    // Jobs to read: one per owner, finished with a failed lead.
    let mut readable = Vec::new();
    for (name, owner) in owners(o) {
        readable.push((name, owner, w.failed_job(owner).await));
    }
    let rules = [(o.rep, w.rule(o.rep).await), (o.admin, w.rule(o.admin).await)];
    let schedules = [(o.rep, w.schedule(o.rep).await), (o.admin, w.schedule(o.admin).await)];
    let missing_job = format!("/v1/jobs/{}", Uuid::new_v4());

    for role in ROLES {
        let user = role.user(o);
        // Listing: only what the caller reaches.
        let expected = role.plain(true, StatusCode::OK);
        let body = cell(&w, &format!("{role:?} GET /v1/jobs"), expected, || {
            w.call(role, Method::GET, "/v1/jobs?limit=500", None)
        })
        .await;
        if expected == StatusCode::OK {
            let listed: BTreeSet<String> =
                body["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_owned()).collect();
            for (name, owner, id) in &readable {
                assert_eq!(listed.contains(&id.to_string()), role.sees(o, *owner), "{role:?} lists {name}'s job");
            }
        }

        for (name, owner, id) in &readable {
            for suffix in ["", "/results"] {
                let path = format!("/v1/jobs/{id}{suffix}");
                let expected = role.on_object(o, *owner, true, StatusCode::OK);
                let body = cell(&w, &format!("{role:?} GET {name}'s job{suffix}"), expected, || {
                    w.call(role, Method::GET, &path, None)
                })
                .await;
                if expected == StatusCode::NOT_FOUND {
                    let (s, absent) = w.call(role, Method::GET, format!("{missing_job}{suffix}"), None).await;
                    assert_eq!((s, &absent), (StatusCode::NOT_FOUND, &body), "{role:?}: a hidden job reads as missing");
                }
            }

            // Cancel, on a job of its own per cell.
            let pending = w.pending_job(*owner).await;
            let expected = role.on_object(o, *owner, role.writes(), StatusCode::OK);
            let path = format!("/v1/jobs/{pending}/cancel");
            let body = cell(&w, &format!("{role:?} cancels {name}'s job"), expected, || {
                w.call(role, Method::POST, &path, None)
            })
            .await;
            match expected {
                StatusCode::OK => assert_eq!(body["status"], "cancelled"),
                StatusCode::NOT_FOUND => {
                    let (_, absent) = w.call(role, Method::POST, format!("{missing_job}/cancel"), None).await;
                    assert_eq!(absent, body, "{role:?}: cancelling a hidden job reads as missing");
                }
                _ => {}
            }

            // Retry keeps the first job's requester and records who asked.
            let failed = w.failed_job(*owner).await;
            let expected = role.on_object(o, *owner, role.writes(), StatusCode::ACCEPTED);
            let path = format!("/v1/jobs/{failed}/retry");
            let body = cell(&w, &format!("{role:?} retries {name}'s job"), expected, || {
                w.call(role, Method::POST, &path, Some(json!({})))
            })
            .await;
            if expected == StatusCode::ACCEPTED {
                let retry: Uuid = body["job_id"].as_str().unwrap().parse().unwrap();
                let made = job::get(w.crm.pool(), retry).await.unwrap().unwrap();
                assert_eq!(made.requested_by, *owner, "{role:?}: a retry acts as the first job's requester");
                assert_eq!(made.asked_by, (user != *owner).then_some(user), "{role:?}: who asked is recorded");
            } else if expected == StatusCode::NOT_FOUND {
                let (_, absent) = w.call(role, Method::POST, format!("{missing_job}/retry"), Some(json!({}))).await;
                assert_eq!(absent, body);
            }
        }

        // Undo (its dry run: the same check, nothing written) and history.
        for (name, owner) in owners(o) {
            let lead = w.lead(&format!("Undoable {role:?} {name}")).await;
            let (converted, results) = w.crm.convert_all(owner, json!({}), &[lead]).await;
            let expected = role.on_object(o, owner, role.writes(), StatusCode::OK);
            let path = format!("/v1/jobs/{converted}/undo?dry_run=true");
            let body = cell(&w, &format!("{role:?} previews the undo of {name}'s job"), expected, || {
                w.call(role, Method::POST, &path, Some(json!({})))
            })
            .await;
            if expected == StatusCode::NOT_FOUND {
                let (_, absent) =
                    w.call(role, Method::POST, format!("{missing_job}/undo?dry_run=true"), Some(json!({}))).await;
                assert_eq!(absent, body, "{role:?}: undoing a hidden job reads as missing");
            }
            // And the undo itself: made, or refused with nothing changed.
            let expected = role.on_object(o, owner, role.writes(), StatusCode::ACCEPTED);
            let path = format!("/v1/jobs/{converted}/undo");
            let body = cell(&w, &format!("{role:?} undoes {name}'s job"), expected, || {
                w.call(role, Method::POST, &path, Some(json!({})))
            })
            .await;
            if expected == StatusCode::ACCEPTED {
                assert_eq!(body["undo_of"], json!(converted));
            }
            let contact = results[0].contact_id.unwrap();
            let expected = role.plain(true, StatusCode::OK);
            let body = cell(&w, &format!("{role:?} reads the history of {name}'s contact"), expected, || {
                w.call(role, Method::GET, format!("/v1/records/contact/{contact}/history"), None)
            })
            .await;
            if expected == StatusCode::OK {
                let events = body["events"].as_array().unwrap().len();
                assert_eq!(events, usize::from(role.sees(o, owner)), "{role:?}: history follows job visibility");
            }
        }

        // Converting: jobs, dry runs, convert-now.
        let lead = w.lead("Fresh").await;
        let expected = role.plain(role.writes(), StatusCode::ACCEPTED);
        let body = cell(&w, &format!("{role:?} creates a job"), expected, || {
            w.call(role, Method::POST, "/v1/jobs", Some(json!({"criteria": {"ids": [lead]}})))
        })
        .await;
        if expected == StatusCode::ACCEPTED {
            let made =
                job::get(w.crm.pool(), body["job_id"].as_str().unwrap().parse().unwrap()).await.unwrap().unwrap();
            assert_eq!(made.requested_by, user);
        }
        let expected = role.plain(role.writes(), StatusCode::OK);
        cell(&w, &format!("{role:?} previews a job"), expected, || {
            w.call(role, Method::POST, "/v1/jobs?dry_run=true", Some(json!({"criteria": {"ids": [lead]}})))
        })
        .await;
        let lead = w.lead("Now").await;
        let expected = role.plain(role.converts_now(), StatusCode::ACCEPTED);
        cell(&w, &format!("{role:?} converts a lead now"), expected, || {
            w.call(role, Method::POST, format!("/v1/leads/{lead}/convert"), Some(json!({"timeout_ms": 0})))
        })
        .await;

        // Rules and schedules.
        for (kind, existing) in [("rules", rules), ("schedules", schedules)] {
            let what = &kind[..kind.len() - 1];
            let missing = format!("/v1/{kind}/999999999");
            let expected = role.plain(true, StatusCode::OK);
            let body = cell(&w, &format!("{role:?} GET /v1/{kind}"), expected, || {
                w.call(role, Method::GET, format!("/v1/{kind}"), None)
            })
            .await;
            if expected == StatusCode::OK {
                let listed: BTreeSet<i64> =
                    body[kind].as_array().unwrap().iter().map(|r| r["id"].as_i64().unwrap()).collect();
                for (acting, id) in existing {
                    assert_eq!(listed.contains(&id), role.sees(o, acting), "{role:?} lists {what} {id}");
                }
            }
            for (acting, id) in existing {
                let expected = role.on_object(o, acting, true, StatusCode::OK);
                let body = cell(&w, &format!("{role:?} GET {what} of {acting}"), expected, || {
                    w.call(role, Method::GET, format!("/v1/{kind}/{id}"), None)
                })
                .await;
                if expected == StatusCode::NOT_FOUND {
                    assert_eq!(w.call(role, Method::GET, &missing, None).await.1, body, "{role:?}: hidden {what}");
                }
                for (method, suffix, allowed) in [
                    (Method::POST, "/disable", StatusCode::OK),
                    (Method::POST, "/enable", StatusCode::OK),
                    (Method::DELETE, "", StatusCode::NO_CONTENT),
                ] {
                    // A fresh one per cell: disabling twice changes nothing.
                    let fresh = if kind == "rules" { w.rule(acting).await } else { w.schedule(acting).await };
                    if suffix == "/enable" {
                        sqlx::query(&format!("UPDATE conversion_{kind} SET enabled = false WHERE id = $1"))
                            .bind(fresh)
                            .execute(w.crm.pool())
                            .await
                            .unwrap();
                    }
                    let expected = role.on_object(o, acting, role.writes() && role == Role::Admin, allowed);
                    let path = format!("/v1/{kind}/{fresh}{suffix}");
                    let body = cell(&w, &format!("{role:?} {method} {what} of {acting}{suffix}"), expected, || {
                        w.call(role, method.clone(), &path, None)
                    })
                    .await;
                    if expected == StatusCode::NOT_FOUND {
                        let (_, absent) = w.call(role, method.clone(), format!("{missing}{suffix}"), None).await;
                        assert_eq!(absent, body, "{role:?}: {method} a hidden {what}");
                    }
                }
            }
            // Created disabled: an enabled rule over all leads would convert
            // the leads this test inserts, behind its back.
            let mut create =
                json!({"name": format!("{role:?} {kind}"), "criteria": {"all_leads": true}, "enabled": false});
            if kind == "schedules" {
                create["cron"] = json!("0 2 * * *");
            }
            let expected = role.plain(role == Role::Admin, StatusCode::CREATED);
            let body = cell(&w, &format!("{role:?} creates a {what}"), expected, || {
                w.call(role, Method::POST, format!("/v1/{kind}"), Some(create))
            })
            .await;
            if expected == StatusCode::CREATED {
                assert_eq!(body["acting_user"].as_i64(), Some(user));
            }
        }
    }

    // An admin names the acting user of a rule; its jobs are then seen by
    // those who reach that user, and by no one else.
    let (s, rule) = w
        .call(
            Role::Admin,
            Method::POST,
            "/v1/rules",
            Some(
                json!({"name": "for the rep", "criteria": {"all_leads": true}, "acting_user": o.rep, "enabled": false}),
            ),
        )
        .await;
    assert_eq!((s, rule["acting_user"].as_i64()), (StatusCode::CREATED, Some(o.rep)), "{rule}");
    let (s, _) = w.call(Role::Manager, Method::GET, format!("/v1/rules/{}", rule["id"]), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = w.call(Role::PeerRep, Method::GET, format!("/v1/rules/{}", rule["id"]), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // The acting user must be allowed to convert.
    let (s, v) = w
        .call(
            Role::Admin,
            Method::POST,
            "/v1/rules",
            Some(json!({"name": "as the viewer", "criteria": {"all_leads": true}, "acting_user": o.viewer, "enabled": false})),
        )
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("requester_cannot_convert")), "{v}");
}

/// A signed-in console session of `role`, or why there is none.
struct Session {
    cookie: String,
    csrf: String,
}

async fn sign_in(w: &World, role: Role) -> Result<Session, StatusCode> {
    let r = w.http.post(w.url("/console/login")).form(&[("token", w.token(role))]).send().await.unwrap();
    if r.status() != StatusCode::SEE_OTHER {
        return Err(r.status());
    }
    let set = r.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    let cookie = set.split(';').next().unwrap().to_owned();
    let (_, html) = page(w, &cookie, "/console").await;
    let at = html.find(r#"name="csrf" value=""#).expect("a CSRF field") + r#"name="csrf" value=""#.len();
    let csrf = html[at..].split('"').next().unwrap().to_owned();
    Ok(Session { cookie, csrf })
}

async fn page(w: &World, cookie: &str, path: &str) -> (StatusCode, String) {
    let r = w.http.get(w.url(path)).header(COOKIE, cookie).send().await.unwrap();
    (r.status(), r.text().await.unwrap())
}

async fn form(w: &World, s: &Session, path: impl AsRef<str>, fields: Vec<(&str, &str)>) -> (StatusCode, Value) {
    let mut all = vec![("csrf", s.csrf.as_str())];
    all.extend(fields);
    let r = w.http.post(w.url(path.as_ref())).header(COOKIE, &s.cookie).form(&all).send().await.unwrap();
    (r.status(), Value::String(r.text().await.unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_against_every_console_page_and_form() {
    let w = World::new().await;
    let o = &w.org;
    let mut readable = Vec::new();
    for (name, owner) in owners(o) {
        readable.push((name, owner, w.pending_job(owner).await));
    }
    let rules = [(o.rep, w.rule(o.rep).await), (o.admin, w.rule(o.admin).await)];
    let missing_job = format!("/console/jobs/{}", Uuid::new_v4());

    for role in ROLES {
        let before = w.state().await;
        let session = match sign_in(&w, role).await {
            Ok(s) => {
                assert!(role.signs_in(), "{role:?} signed in");
                s
            }
            Err(status) => {
                assert!(!role.signs_in(), "{role:?} could not sign in: {status}");
                let expected = match role {
                    Role::RevokedToken | Role::ExpiredToken => StatusCode::UNAUTHORIZED,
                    _ => StatusCode::FORBIDDEN,
                };
                assert_eq!(status, expected, "{role:?} signing in");
                assert_eq!(w.state().await, before, "{role:?}: a refused sign-in opened a session");
                continue;
            }
        };
        let c = &session.cookie;

        // The jobs page lists what the role reaches, and offers "New job"
        // only to those who may create one.
        let (s, html) = page(&w, c, "/console").await;
        assert_eq!(s, StatusCode::OK);
        for (name, owner, id) in &readable {
            let listed = html.contains(&format!("/console/jobs/{id}\""));
            assert_eq!(listed, role.sees(o, *owner), "{role:?} lists {name}'s job");
        }
        assert_eq!(html.contains(r#"href="/console/preview""#), role.writes(), "{role:?}: New job link");

        for (name, owner, id) in &readable {
            // A job's page and its CSV; buttons only for who may steer.
            let expected = role.on_object(o, *owner, true, StatusCode::OK);
            let (s, html) = page(&w, c, &format!("/console/jobs/{id}")).await;
            assert_eq!(s, expected, "{role:?} opens {name}'s job");
            if s == StatusCode::OK {
                let steers = role.writes();
                assert_eq!(html.contains(r#"id="cancel""#), steers, "{role:?}: cancel button on {name}'s job");
            } else {
                let (_, absent) = page(&w, c, &missing_job).await;
                assert_eq!(html, absent, "{role:?}: a hidden job's page reads as a missing one");
            }
            let (s, csv) = page(&w, c, &format!("/console/jobs/{id}/results.csv")).await;
            assert_eq!(s, expected, "{role:?} exports {name}'s job");
            if s == StatusCode::NOT_FOUND {
                let (_, absent) = page(&w, c, &format!("{missing_job}/results.csv")).await;
                assert_eq!(csv, absent);
            }

            let pending = w.pending_job(*owner).await;
            let expected = role.on_object(o, *owner, role.writes(), StatusCode::SEE_OTHER);
            cell(&w, &format!("{role:?} cancels {name}'s job in the console"), expected, || {
                form(&w, &session, format!("/console/jobs/{pending}/cancel"), vec![])
            })
            .await;
            let failed = w.failed_job(*owner).await;
            cell(&w, &format!("{role:?} retries {name}'s job in the console"), expected, || {
                form(&w, &session, format!("/console/jobs/{failed}/retry"), vec![])
            })
            .await;
        }

        // Undo: its confirmation page (the dry run) and the form; history.
        for (name, owner) in owners(o) {
            let lead = w.lead(&format!("Console undo {role:?} {name}")).await;
            let (converted, results) = w.crm.convert_all(owner, json!({}), &[lead]).await;
            let (s, html) = page(&w, c, &format!("/console/jobs/{converted}/undo")).await;
            assert_eq!(
                s,
                role.on_object(o, owner, role.writes(), StatusCode::OK),
                "{role:?} opens the undo of {name}'s job"
            );
            if s == StatusCode::NOT_FOUND {
                assert_eq!(
                    html,
                    page(&w, c, &format!("{missing_job}/undo")).await.1,
                    "{role:?}: hidden reads as missing"
                );
            }
            let expected = role.on_object(o, owner, role.writes(), StatusCode::SEE_OTHER);
            cell(&w, &format!("{role:?} undoes {name}'s job in the console"), expected, || {
                form(&w, &session, format!("/console/jobs/{converted}/undo"), vec![])
            })
            .await;
            let contact = results[0].contact_id.unwrap();
            let (s, html) = page(&w, c, &format!("/console/records/contact/{contact}/history")).await;
            assert_eq!(s, StatusCode::OK);
            assert_eq!(
                html.contains(&converted.to_string()[..8]),
                role.sees(o, owner),
                "{role:?}: history of {name}'s contact"
            );
        }

        // Preview and create.
        let lead = w.lead("Console").await;
        let criteria = format!(r#"{{"ids": [{lead}]}}"#);
        let (s, _) = page(&w, c, "/console/preview").await;
        assert_eq!(s, role.plain(role.writes(), StatusCode::OK), "{role:?} opens the preview page");
        cell(&w, &format!("{role:?} previews"), role.plain(role.writes(), StatusCode::OK), || {
            form(&w, &session, "/console/preview", vec![("criteria", &criteria), ("options", "{}")])
        })
        .await;
        cell(&w, &format!("{role:?} creates a job"), role.plain(role.writes(), StatusCode::SEE_OTHER), || {
            form(&w, &session, "/console/jobs", vec![("criteria", &criteria), ("options", "{}")])
        })
        .await;

        // Rules: listed by reach; switches for admins only.
        let (s, html) = page(&w, c, "/console/automation").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(html.contains("/disable\""), role == Role::Admin, "{role:?}: switch buttons");
        for (acting, _) in rules {
            let fresh = w.rule(acting).await;
            let expected = role.on_object(o, acting, role == Role::Admin, StatusCode::SEE_OTHER);
            let body = cell(&w, &format!("{role:?} switches a rule of {acting} off"), expected, || {
                form(&w, &session, format!("/console/rules/{fresh}/disable"), vec![])
            })
            .await;
            if expected == StatusCode::NOT_FOUND {
                let (_, absent) = form(&w, &session, "/console/rules/999999999/disable", vec![]).await;
                assert_eq!(body, absent, "{role:?}: a hidden rule reads as a missing one");
            }
            let fresh = w.schedule(acting).await;
            cell(&w, &format!("{role:?} switches a schedule of {acting} off"), expected, || {
                form(&w, &session, format!("/console/schedules/{fresh}/disable"), vec![])
            })
            .await;
        }
        for (acting, id) in rules {
            assert_eq!(html.contains(&format!("/console/rules/{id}/")), role == Role::Admin && role.sees(o, acting));
        }
    }

    // A session outlives neither its user's deactivation (403) nor its
    // token's expiry (401), and keeps its token's scope.
    let s = sign_in(&w, Role::Rep).await.unwrap();
    sqlx::query("UPDATE users SET active = false WHERE id = $1").bind(o.rep).execute(w.crm.pool()).await.unwrap();
    assert_eq!(page(&w, &s.cookie, "/console").await.0, StatusCode::FORBIDDEN);
    sqlx::query("UPDATE users SET active = true WHERE id = $1").bind(o.rep).execute(w.crm.pool()).await.unwrap();
    assert_eq!(page(&w, &s.cookie, "/console").await.0, StatusCode::OK);
    sqlx::query("UPDATE api_tokens SET expires_at = now() WHERE name = 'Rep'").execute(w.crm.pool()).await.unwrap();
    assert_eq!(page(&w, &s.cookie, "/console").await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn token_create_takes_a_scope_and_an_expiry_and_list_shows_them() {
    let crm = Crm::new().await;
    let broker = TestBroker::new().await;
    let user = crm.user("Rep", json!({})).await.to_string();
    let run = |args: &[&str]| leadconv_command(&crm.url(), broker.prefix(), args).output();
    let out = run(&["token", "create", "--user", &user, "--scope", "read", "--expires-in", "2h"]).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).trim().starts_with("lcv_"));
    let row: (String, bool) = sqlx::query_as(
        "SELECT scope, expires_at BETWEEN now() + interval '119 minutes' AND now() + interval '121 minutes' FROM api_tokens",
    )
    .fetch_one(crm.pool())
    .await
    .unwrap();
    assert_eq!(row, ("read".to_owned(), true));
    let out = run(&["token", "list", "--json"]).await.unwrap();
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["scope"], "read");
    assert!(listed["expires_at"].is_string() && listed.get("last_used_at").is_some(), "{listed}");
    for bad in [["--scope", "admin"], ["--expires-in", "soon"], ["--expires-in", "0s"]] {
        let mut args = vec!["token", "create", "--user", &user];
        args.extend(bad);
        let out = run(&args).await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?} is refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(bad[0]), "{bad:?}: the error names the flag: {err}");
    }
    assert_eq!(crm.count("SELECT count(*) FROM api_tokens").await, 1, "refused tokens are not written");
}
