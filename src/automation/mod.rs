//! Conversions nobody starts by hand: rules (a lead that starts matching an
//! enabled rule is converted by a one-lead `workflow` job) and schedules
//! (cron ticks that create `schedule` jobs).
//!
//! May import: `crate::store`, `crate::queue` (to publish the jobs they
//! make). HTTP and the CLI call into it.

pub mod rules;
pub mod schedule;
