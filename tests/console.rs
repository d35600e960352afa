//! The console's security, over HTTP against `leadconv serve`: sign-in
//! with a token for a session cookie, redirects without one, 401 for a
//! forged or revoked session, 403 for a wrong CSRF token, CRM values shown
//! as text, and the Content-Security-Policy on every page.

mod common;

use common::broker::TestBroker;
use common::server::{serve_with, Server};
use common::*;
use reqwest::header::{CONTENT_SECURITY_POLICY, COOKIE, LOCATION, SET_COOKIE};
use reqwest::{redirect, StatusCode};
use serde_json::json;

struct Console {
    server: Server,
    crm: Crm,
    _broker: TestBroker,
    http: reqwest::Client,
    token: String,
    user: i64,
}

impl Console {
    async fn new() -> Console {
        let crm = Crm::new().await;
        let broker = TestBroker::new().await;
        let server =
            serve_with(&crm.db, &broker, &["--crm-record-url", "https://crm.example.com/{module}s/{id}"]).await;
        let user = crm.user("Ada Admin", json!({"is_admin": true})).await;
        let token = leadconv::store::auth::create_token(crm.pool(), user, "console").await.unwrap();
        // Redirects are looked at, not followed.
        let http = reqwest::Client::builder().redirect(redirect::Policy::none()).build().unwrap();
        Console { server, crm, _broker: broker, http, token, user }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base)
    }

    /// Signs in; returns the `Set-Cookie` header and the cookie to send.
    async fn sign_in(&self, extra: &[(&str, &str)]) -> (String, String) {
        let mut req = self.http.post(self.url("/console/login")).form(&[("token", self.token.as_str())]);
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        let set = r.headers()[SET_COOKIE].to_str().unwrap().to_owned();
        let cookie = set.split(';').next().unwrap().to_owned();
        (set, cookie)
    }

    async fn page(&self, path: &str, cookie: &str) -> (StatusCode, String) {
        let r = self.http.get(self.url(path)).header(COOKIE, cookie).send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    }

    /// The CSRF token of the signed-in session, as its pages carry it.
    async fn csrf(&self, cookie: &str) -> String {
        let (_, html) = self.page("/console", cookie).await;
        let at =
            html.find(r#"name="csrf" value=""#).expect("a form with a CSRF token") + r#"name="csrf" value=""#.len();
        html[at..].split('"').next().unwrap().to_owned()
    }

    async fn status(&self, job: uuid::Uuid) -> String {
        sqlx::query_scalar("SELECT status FROM conversion_jobs WHERE id = $1")
            .bind(job)
            .fetch_one(self.crm.pool())
            .await
            .unwrap()
    }

    async fn job(&self, leads: &[i64]) -> uuid::Uuid {
        let checked = leadconv::store::job::check(
            self.crm.pool(),
            leadconv::store::job::NewJob {
                criteria: json!({"ids": leads}),
                options: json!({}),
                requested_by: self.user,
                trigger: leadconv::store::job::Trigger::Manual,
            },
        )
        .await
        .unwrap();
        let lease = leadconv::queue::producer::Lease::new(std::time::Duration::from_secs(30));
        leadconv::store::job::create(self.crm.pool(), &checked, leadconv::store::job::Dispatch::Queue { lease })
            .await
            .unwrap()
            .id
    }
}

#[tokio::test]
async fn without_a_cookie_every_page_redirects_to_sign_in() {
    let c = Console::new().await;
    for path in
        ["/console", "/console/preview", "/console/automation", "/console/jobs/8d7ef0a4-40a6-4d4e-9d3b-3f8f1c0d2a11"]
    {
        let r = c.http.get(c.url(path)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER, "{path}");
        assert_eq!(r.headers()[LOCATION], "/console/login", "{path}");
    }
    // A form posted without a session changes nothing either.
    let lead = c.crm.lead(json!({"owner_id": c.user, "last_name": "Nowak"})).await;
    let job = c.job(&[lead]).await;
    let r = c.http.post(c.url(&format!("/console/jobs/{job}/cancel"))).form(&[("csrf", "x")]).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let status = c.status(job).await;
    assert_eq!(status, "scheduled");
    // The sign-in page itself is served.
    let r = c.http.get(c.url("/console/login")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn sign_in_sets_a_strict_http_only_cookie_and_a_bad_token_is_refused() {
    let c = Console::new().await;
    let (set, cookie) = c.sign_in(&[]).await;
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(set.contains(flag), "{set}");
    }
    assert!(!set.contains("Secure"), "no TLS, no Secure flag: {set}");
    let (s, html) = c.page("/console", &cookie).await;
    assert_eq!(s, StatusCode::OK);
    assert!(html.contains("Ada Admin"), "the signed-in user is named");
    // Behind a TLS-terminating proxy the cookie is Secure.
    let (set, _) = c.sign_in(&[("x-forwarded-proto", "https")]).await;
    assert!(set.contains("; Secure"), "{set}");
    // The cookie holds no token, and only its hash is stored.
    assert!(!cookie.contains(&c.token[4..]));
    assert_eq!(
        c.crm
            .count(&format!(
                "SELECT count(*) FROM console_sessions WHERE session_hash::text LIKE '%{}%'",
                &cookie[17..25]
            ))
            .await,
        0
    );
    // A wrong token: 401 and the form again, no session.
    let sessions = c.crm.count("SELECT count(*) FROM console_sessions").await;
    let r = c.http.post(c.url("/console/login")).form(&[("token", "lcv_wrong")]).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers().get(SET_COOKIE).is_none());
    assert_eq!(c.crm.count("SELECT count(*) FROM console_sessions").await, sessions);
}

#[tokio::test]
async fn a_forged_expired_or_revoked_session_gets_401() {
    let c = Console::new().await;
    let (s, _) = c.page("/console", "leadconv_session=forged-value").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (_, cookie) = c.sign_in(&[]).await;
    assert_eq!(c.page("/console", &cookie).await.0, StatusCode::OK);
    sqlx::query("UPDATE console_sessions SET expires_at = now() - interval '1 second'")
        .execute(c.crm.pool())
        .await
        .unwrap();
    assert_eq!(c.page("/console", &cookie).await.0, StatusCode::UNAUTHORIZED, "expired");
    let (_, cookie) = c.sign_in(&[]).await;
    sqlx::query("UPDATE api_tokens SET revoked_at = now()").execute(c.crm.pool()).await.unwrap();
    assert_eq!(c.page("/console", &cookie).await.0, StatusCode::UNAUTHORIZED, "its token revoked");
}

#[tokio::test]
async fn a_form_without_the_sessions_csrf_token_gets_403_and_changes_nothing() {
    let c = Console::new().await;
    let (_, cookie) = c.sign_in(&[]).await;
    let lead = c.crm.lead(json!({"owner_id": c.user, "last_name": "Nowak"})).await;
    let job = c.job(&[lead]).await;
    let post = |path: String, form: Vec<(&'static str, String)>| {
        c.http.post(c.url(&path)).header(COOKIE, cookie.as_str()).form(&form).send()
    };
    for csrf in ["", "wrong", "-En2aMpwoea6J9I1OVLQJAxh3lxk4vbtxxFgd0NOD3o"] {
        let r = post(format!("/console/jobs/{job}/cancel"), vec![("csrf", csrf.to_owned())]).await.unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "csrf {csrf:?}");
    }
    let r = post("/console/jobs".into(), vec![("csrf", "wrong".into()), ("criteria", r#"{"all_leads": true}"#.into())])
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let status = c.status(job).await;
    assert_eq!(status, "scheduled", "not cancelled");
    assert_eq!(c.crm.count("SELECT count(*) FROM conversion_jobs").await, 1, "no job created");
    // With the session's token the same form works.
    let csrf = c.csrf(&cookie).await;
    let r = post(format!("/console/jobs/{job}/cancel"), vec![("csrf", csrf)]).await.unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let status = c.status(job).await;
    assert_eq!(status, "cancelled");
}

#[tokio::test]
async fn crm_values_are_shown_as_text_under_a_content_security_policy() {
    let c = Console::new().await;
    let (_, cookie) = c.sign_in(&[]).await;
    let payload = "<script>alert(1)</script>";
    let lead = c
        .crm
        .lead(json!({"owner_id": c.user, "first_name": payload, "last_name": "\"><img src=x onerror=alert(2)>", "email": "x@example.com", "company": "<b>Evil</b> & Co"}))
        .await;
    let job = c.job(&[lead]).await;
    let r = c.http.get(c.url(&format!("/console/jobs/{job}"))).header(COOKIE, cookie.as_str()).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let csp = r.headers()[CONTENT_SECURITY_POLICY].to_str().unwrap().to_owned();
    for directive in ["script-src 'self'", "default-src 'none'", "frame-ancestors 'none'", "form-action 'self'"] {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let html = r.text().await.unwrap();
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "the name is escaped");
    assert!(!html.contains(payload), "no live script tag from CRM data");
    assert!(!html.contains("<img src=x"), "no live attribute injection");
    assert!(html.contains("&lt;b&gt;Evil&lt;/b&gt; &amp; Co"));
    // Every page carries the policy, the sign-in page and errors too.
    for path in ["/console/login", "/console", "/console/jobs/not-a-uuid"] {
        let r = c.http.get(c.url(path)).header(COOKIE, cookie.as_str()).send().await.unwrap();
        assert!(r.headers().get(CONTENT_SECURITY_POLICY).is_some(), "{path}");
    }
}

#[tokio::test]
async fn results_export_as_csv_filtered_and_rules_switch_off_and_on() {
    let c = Console::new().await;
    let (_, cookie) = c.sign_in(&[]).await;
    let good =
        c.crm.lead(json!({"owner_id": c.user, "last_name": "Łukasiewicz, Jan", "email": "jan@example.com", "company": "=HYPERLINK(1)"})).await;
    let bad = c.crm.lead(json!({"owner_id": c.user, "last_name": " ", "email": "nobody@example.com"})).await;
    let (job, results) = c.crm.convert_all(c.user, json!({}), &[good, bad]).await;
    // The records a lead became link to where the CRM shows them.
    let (_, page) = c.page(&format!("/console/jobs/{job}"), &cookie).await;
    let contact = results.iter().find_map(|r| r.contact_id).unwrap();
    assert!(page.contains(&format!(r#"href="https://crm.example.com/contacts/{contact}""#)), "{page}");
    let csv = |q: &'static str| {
        c.http.get(c.url(&format!("/console/jobs/{job}/results.csv{q}"))).header(COOKIE, cookie.as_str()).send()
    };
    let r = csv("").await.unwrap();
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    assert!(r.headers()["content-disposition"].to_str().unwrap().starts_with("attachment"));
    let body = r.text().await.unwrap();
    let mut lines = body.lines();
    assert!(lines.next().unwrap().starts_with("lead_id,lead_name,email,company,outcome"));
    assert_eq!(lines.count(), 2, "{body}");
    assert!(body.contains("\"Łukasiewicz, Jan\""), "a comma inside a value is quoted: {body}");
    assert!(body.contains(",'=HYPERLINK(1),"), "a formula is defused: {body}");
    let failed = csv("?outcome=failed&code=missing_mandatory_field").await.unwrap().text().await.unwrap();
    assert_eq!(failed.lines().count(), 2, "header and the one failed lead: {failed}");
    assert!(failed.contains("nobody@example.com"));
    let none = csv("?code=poison_message").await.unwrap().text().await.unwrap();
    assert_eq!(none.lines().count(), 1, "the header alone: {none}");
    let r = csv("?outcome=bogus").await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // A rule switched off and on again from the rules page.
    let rule = leadconv::automation::rules::create(
        c.crm.pool(),
        leadconv::automation::rules::NewRule {
            name: "Webinar leads".into(),
            criteria: json!({"field": "lead_source", "op": "eq", "value": "Webinar"}),
            options: json!({}),
            acting_user: c.user,
            enabled: true,
        },
    )
    .await
    .unwrap();
    let (s, page) = c.page("/console/automation", &cookie).await;
    assert_eq!(s, StatusCode::OK);
    assert!(page.contains("Webinar leads"));
    let csrf = c.csrf(&cookie).await;
    let enabled = || async {
        sqlx::query_scalar::<_, bool>("SELECT enabled FROM conversion_rules WHERE id = $1")
            .bind(rule.id)
            .fetch_one(c.crm.pool())
            .await
            .unwrap()
    };
    for (action, expected) in [("disable", false), ("enable", true)] {
        let r = c
            .http
            .post(c.url(&format!("/console/rules/{}/{action}", rule.id)))
            .header(COOKIE, cookie.as_str())
            .form(&[("csrf", csrf.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SEE_OTHER);
        assert_eq!(enabled().await, expected, "{action}");
    }
}

#[tokio::test]
async fn a_sign_in_from_another_site_and_a_stale_cookie_are_refused() {
    let c = Console::new().await;
    for (header, value) in [("sec-fetch-site", "cross-site"), ("origin", "https://evil.example")] {
        let r = c
            .http
            .post(c.url("/console/login"))
            .header(header, value)
            .form(&[("token", c.token.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{header}: {value}");
        assert!(r.headers().get(SET_COOKIE).is_none());
    }
    assert_eq!(c.crm.count("SELECT count(*) FROM console_sessions").await, 0);
    // The browser's own sign-in passes.
    let (_, cookie) = c.sign_in(&[("sec-fetch-site", "same-origin")]).await;
    // A form without a CSRF field at all: 403 too.
    let r =
        c.http.post(c.url("/console/logout")).header(COOKIE, cookie.as_str()).form(&[("x", "y")]).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // A stale cookie: 401, and the browser is told to drop it.
    let r = c.http.get(c.url("/console")).header(COOKIE, "leadconv_session=stale").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers()[SET_COOKIE].to_str().unwrap().contains("Max-Age=0"));
}

// Issue 24: the new-job form names the options choosing which records a
// lead becomes and what happens to unmapped custom fields; its preview shows
// a lead converted without a contact and lists the unmapped fields.
#[tokio::test]
async fn the_new_job_form_offers_the_choice_of_records_and_previews_it() {
    let c = Console::new().await;
    let (_, cookie) = c.sign_in(&[]).await;
    let (status, html) = c.page("/console/preview", &cookie).await;
    assert_eq!(status, StatusCode::OK);
    let help = &html[html.find(r#"id="options-help""#).expect("the options are explained")..];
    assert!(help.contains("create_contact") && help.contains("create_account"), "{help}");

    assert!(help.contains("unmapped_custom_fields"), "{help}");
    sqlx::query(
        "INSERT INTO custom_field_defs (module, api_name, data_type, max_length) VALUES ('lead', 'bolge', 'text', 30)",
    )
    .execute(c.crm.pool())
    .await
    .unwrap();
    let lead = c.crm.lead(json!({"owner_id": c.user, "last_name": "Yılmaz", "company": "Şirket A.Ş."})).await;
    let csrf = c.csrf(&cookie).await;
    let form = [
        ("csrf", csrf),
        ("criteria", json!({"ids": [lead]}).to_string()),
        ("options", json!({"create_contact": false}).to_string()),
    ];
    let r = c.http.post(c.url("/console/preview")).header(COOKIE, cookie.as_str()).form(&form).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let html = r.text().await.unwrap();
    assert!(html.contains("no contact; new account"), "the plan names what is made: {html}");
    let unmapped = &html[html.find(r#"id="preview-unmapped""#).expect("the unmapped fields are listed")..];
    assert!(unmapped.contains("bolge"), "{unmapped}");
}
