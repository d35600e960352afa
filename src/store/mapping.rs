//! Reading and saving the field mapping (`custom_field_defs`,
//! `conversion_mappings`); the mapping itself is the domain's
//! ([`leadconv_domain::mapping`]).

use sqlx::PgConnection;

pub use leadconv_domain::mapping::*;

use crate::error::{ErrorCode, Refusal};
use crate::record::Module;

/// Everything about fields that a conversion needs, read once per job.
pub async fn load(conn: &mut PgConnection) -> sqlx::Result<FieldMapping> {
    let custom = sqlx::query_as!(
        CustomMapping,
        "SELECT lead_field, target_module, target_field FROM conversion_mappings
         ORDER BY target_module, target_field, lead_field"
    )
    .fetch_all(&mut *conn)
    .await?;
    let defs = sqlx::query_as!(
        CustomFieldDef,
        "SELECT module, api_name, data_type, max_length, is_unique FROM custom_field_defs
         ORDER BY module, api_name"
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(FieldMapping { custom, defs })
}

/// Saves a custom field mapping. The database trigger is the judge; this
/// turns its refusal into a [`Refusal`] naming the fields.
pub async fn save(conn: &mut PgConnection, mapping: &CustomMapping) -> Result<(), crate::Error> {
    if Module::parse(&mapping.target_module).is_none_or(|m| m == Module::Lead) {
        return Err(Refusal::new(
            ErrorCode::InvalidMapping,
            "target_module",
            format!("{:?} is not one of account, contact, deal", mapping.target_module),
        )
        .into());
    }
    let saved = sqlx::query!(
        "INSERT INTO conversion_mappings (lead_field, target_module, target_field) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
        mapping.lead_field,
        mapping.target_module,
        mapping.target_field
    )
    .execute(conn)
    .await;
    match saved {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(db))
            if db.code().as_deref() == Some("23514") && db.constraint().is_some_and(|c| c.starts_with("mapping_")) =>
        {
            Err(Refusal::new(
                ErrorCode::InvalidMapping,
                format!("{} -> {}.{}", mapping.lead_field, mapping.target_module, mapping.target_field),
                db.message().to_owned(),
            )
            .into())
        }
        Err(e) => Err(e.into()),
    }
}
