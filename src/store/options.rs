//! Reading what options name (users, pipeline stages, field mapping) and
//! checking them with the domain's rules ([`leadconv_domain::options`]).

use sqlx::PgConnection;

pub use leadconv_domain::options::*;

/// Checks `options` for a job requested by `requested_by`.
pub async fn prepare(
    conn: &mut PgConnection,
    options: &ConversionOptions,
    requested_by: i64,
) -> Result<Settings, crate::Error> {
    let requester = sqlx::query!("SELECT active, can_convert FROM users WHERE id = $1", requested_by)
        .fetch_optional(&mut *conn)
        .await?
        .map(|u| (u.active, u.can_convert));
    let owner_active = match options.owner_id {
        Some(owner) => {
            sqlx::query_scalar!("SELECT active FROM users WHERE id = $1", owner).fetch_optional(&mut *conn).await?
        }
        None => None,
    };
    let fields = crate::store::mapping::load(conn).await?;
    let pipeline_stages = match options.pipeline() {
        Some(pipeline) => {
            // One row per stage; a pipeline without stages gives one NULL
            // row, an unknown pipeline none at all.
            let rows = sqlx::query!(
                r#"SELECT s.stage AS "stage?", s.is_won AS "is_won?"
                   FROM pipelines p LEFT JOIN deal_stages s ON s.pipeline = p.name
                   WHERE p.name = $1 ORDER BY s.sort_order, s.stage"#,
                pipeline
            )
            .fetch_all(&mut *conn)
            .await?;
            (!rows.is_empty()).then(|| {
                let stages =
                    rows.into_iter().filter_map(|r| Some(Stage { stage: r.stage?, is_won: r.is_won.unwrap_or(false) }));
                stages.collect()
            })
        }
        None => None,
    };
    let facts = OptionFacts { requester, owner_active, fields, pipeline_stages };
    Ok(Settings::check(options, requested_by, facts)?)
}

/// What the CRM holds of the records `settings` names to convert into.
pub async fn named(conn: &mut PgConnection, settings: &Settings) -> sqlx::Result<NamedFacts> {
    let contact = match settings.into_contact {
        Some(id) => {
            sqlx::query_scalar::<_, Option<i64>>("SELECT account_id FROM contacts WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?
        }
        None => None,
    };
    let account_exists = match settings.into_account {
        Some(id) => {
            sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM accounts WHERE id = $1)")
                .bind(id)
                .fetch_one(&mut *conn)
                .await?
        }
        None => false,
    };
    Ok(NamedFacts { contact, account_exists })
}
