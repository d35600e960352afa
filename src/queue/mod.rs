//! RabbitMQ: the topology and messages (`topology`, re-exported here), the
//! producer that publishes a job's outbox (`producer`, `enqueue`), and the
//! worker that consumes messages and converts their leads (`worker`).
//!
//! May import: lapin, `crate::store`, `crate::maintenance`, `crate::metrics`.
//! The CRM rules are not here: the worker hands each lead to
//! `store::convert`.

mod acks;
mod batching;
pub mod enqueue;
mod priority;
pub mod producer;
mod topology;
pub mod worker;

pub use topology::*;
