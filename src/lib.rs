//! leadconv: bulk conversion of CRM leads into accounts, contacts and deals.
//!
//! One lead's way through the crate: a [`job`] snapshots leads; [`convert`]
//! converts each in one transaction, gathering facts ([`snapshot`]),
//! deciding by the rules ([`plan`], with [`mapping`], [`merge`], [`deal`])
//! and writing ([`apply`]). [`options`] validates what a job asks for
//! before anything is written.

pub mod api;
pub mod apply;
pub mod auth;
pub mod bench;
pub mod convert;
pub mod criteria;
pub mod db;
pub mod demo;
pub mod enqueue;
pub mod error;
pub mod job;
pub mod mapping;
pub mod metrics;
pub mod options;
pub mod producer;
pub mod queue;
pub mod report;
pub mod rules;
pub mod schedule;
pub mod seed;
pub mod serve;
pub mod shutdown;
pub mod snapshot;
pub mod worker;

// The CRM rules live in the `leadconv-domain` crate, which cannot reach the
// database or the queue; they are re-exported under their usual paths.
pub use leadconv_domain::{deal, merge, plan, record, run};

pub use error::{Error, ErrorCode, Refusal};
