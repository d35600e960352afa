//! The states of jobs and results as Rust enums, stored as the text values
//! SPEC §2 names (`conversion_jobs.status`, `.trigger`,
//! `conversion_results.outcome`, `*_action`). One definition each: the
//! database mapping (`sqlx::Type`), JSON (`serde`), the command line
//! (`clap`) and metric labels (`as_str`) all use it.

use serde::{Deserialize, Serialize};

/// Declares a text-valued enum with its SPEC spellings.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, sqlx::Type, clap::ValueEnum)]
        #[sqlx(type_name = "text", rename_all = "snake_case")]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }

            pub fn parse(s: &str) -> Option<$name> {
                match s {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        /// Compares with the stored spelling, as SQL and JSON readers do.
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}

text_enum!(
    /// `conversion_schedules.overlap`: what a tick does while the previous
    /// run of the same schedule is still in progress.
    Overlap {
        Skip => "skip",
        Allow => "allow",
    }
);

text_enum!(
    /// `conversion_jobs.status`.
    JobStatus {
        Scheduled => "scheduled",
        InProgress => "in_progress",
        Completed => "completed",
        Failed => "failed",
        Cancelled => "cancelled",
    }
);

impl JobStatus {
    /// No lead of the job will be converted any more.
    pub fn is_finished(self) -> bool {
        matches!(self, JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled)
    }
}

text_enum!(
    /// `conversion_jobs.trigger`: who made the job. `schedule` and
    /// `workflow` are set by the system (schedules, rules, convert-now).
    Trigger {
        Manual => "manual",
        Schedule => "schedule",
        Workflow => "workflow",
        Api => "api",
    }
);

text_enum!(
    /// `conversion_results.outcome`. `undone`: a lead an undo job took back
    /// (only undo jobs record it; counted in `converted_count`).
    Outcome {
        Pending => "pending",
        Converted => "converted",
        Skipped => "skipped",
        Failed => "failed",
        Undone => "undone",
    }
);

text_enum!(
    /// `conversion_results.contact_action`.
    ContactAction {
        Created => "created",
        Merged => "merged",
        None => "none",
    }
);

text_enum!(
    /// `conversion_results.account_action`.
    AccountAction {
        Created => "created",
        Matched => "matched",
        None => "none",
    }
);

text_enum!(
    /// `conversion_results.deal_action`.
    DealAction {
        Created => "created",
        None => "none",
    }
);
