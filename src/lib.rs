//! leadconv: bulk conversion of CRM leads into accounts, contacts and deals.
//!
//! The house by layer (each folder's module doc says what it may import):
//!
//! - `leadconv_domain` (the `domain/` crate, re-exported here as [`plan`],
//!   [`record`], [`merge`], [`deal`], [`run`]): the CRM rules as plain Rust.
//! - [`store`]: everything that talks to Postgres.
//! - [`queue`]: RabbitMQ topology, producer and worker.
//! - [`maintenance`]: outbox sweep, counter rollup, gauges.
//! - [`automation`]: conversion rules and schedules.
//! - [`http`]: the API and `serve`.
//! - [`report`], [`metrics`], [`error`], [`shutdown`]: shared by the layers.
//!
//! One lead's way: [`store::job`] snapshots a job's leads, [`queue`]
//! carries one message per lead, [`store::convert`] converts each in one
//! transaction: facts ([`store::snapshot`]), the decision ([`plan`]), the
//! writes ([`store::apply`]), the result row.

pub mod automation;
pub mod config;
pub mod error;
pub mod http;
pub mod maintenance;
pub mod metrics;
pub mod queue;
pub mod report;
pub mod shutdown;
pub mod store;

// The CRM rules live in the `leadconv-domain` crate, which cannot reach the
// database or the queue.
pub use leadconv_domain::{deal, journal, merge, plan, record, run, undo};

pub use error::{Error, ErrorCode, Refusal};
