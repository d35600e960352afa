//! Everything that talks to Postgres.
//!
//! Gathers the facts the domain's rules decide on (`snapshot`, `options`,
//! `mapping`), writes what they decided (`apply`), runs one conversion in
//! one transaction and records its result (`convert`), keeps jobs, their
//! results and counters (`job`), compiles criteria to SQL (`criteria`), API
//! tokens (`auth`), connections and migrations (`db`), takes conversions
//! back from their journal (`undo`).
//!
//! May import: `leadconv_domain`, sqlx, `crate::error`, `crate::metrics`.
//! Never lapin or axum: the queue and HTTP layers call into the store, not
//! the other way round.

pub mod apply;
pub mod auth;
pub mod console;
pub mod convert;
pub mod criteria;
pub mod db;
pub mod finished;
pub mod history;
pub mod job;
pub mod mapping;
pub mod options;
pub mod snapshot;
pub mod types;
pub mod undo;
