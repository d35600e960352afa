//! The CRM rules of lead conversion (SPEC §3, §4, §6), as plain Rust.
//!
//! What lives here: who may do what ([`access`]), records as the rules see them ([`record`]), the field
//! mapping ([`mapping`]), criteria parsing ([`criteria`]), options and their
//! validation against facts the caller read ([`options`]), the deal
//! template and dates ([`deal`]), the merge ([`merge`]), the decision for
//! one lead ([`plan`]) and the memory of a run ([`run`]), and the error
//! codes ([`error`]).
//!
//! What may not: anything that talks to Postgres, RabbitMQ or HTTP. This
//! crate depends on no sqlx, lapin, axum or tokio, so the compiler keeps it
//! that way; the `leadconv` crate gathers facts, writes plans and moves
//! messages around these rules.

pub mod access;
pub mod criteria;
pub mod deal;
pub mod error;
pub mod journal;
pub mod mapping;
pub mod merge;
pub mod options;
pub mod plan;
pub mod record;
pub mod run;
pub mod undo;

pub use error::{ErrorCode, Refusal};
