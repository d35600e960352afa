//! `leadconv doctor`: checks an installation the way an operator would, one
//! line per check, each failing one with what to do about it.

use clap::Args;
use leadconv::config::Services;
use leadconv::queue::{self, Lane};
use leadconv::store::{db, job};

use super::say;

#[derive(Args)]
pub struct Doctor {}

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Ok,
    Warn,
    Fail,
}

#[derive(Default)]
struct Report {
    failed: bool,
}

impl Report {
    fn line(&mut self, mark: Mark, text: impl std::fmt::Display) -> std::io::Result<()> {
        self.failed |= mark == Mark::Fail;
        let tag = match mark {
            Mark::Ok => "ok  ",
            Mark::Warn => "warn",
            Mark::Fail => "FAIL",
        };
        say(format!("{tag} {text}"))
    }
}

impl Doctor {
    pub async fn run(self, s: &Services) -> anyhow::Result<()> {
        let mut r = Report::default();
        let pool = match db::connect(&s.database_url, 2).await {
            Ok(pool) => {
                let options: sqlx::postgres::PgConnectOptions = s.database_url.parse()?;
                r.line(Mark::Ok, format!("{} reachable", db::describe(&options)))?;
                Some(pool)
            }
            Err(e) => {
                r.line(Mark::Fail, format!("{e:#}"))?;
                None
            }
        };
        let mut pending = Vec::new();
        if let Some(pool) = &pool {
            match db::check_matching_locale(pool).await {
                Ok(()) => r.line(Mark::Ok, "database locale folds non-ASCII letters (matching works)")?,
                Err(e) => r.line(Mark::Fail, format!("{e:#}"))?,
            }
            let expected = db::expected_schema();
            match db::schema_version(pool).await {
                Ok(Some(v)) if v >= expected => {
                    r.line(Mark::Ok, format!("schema at version {v} (this leadconv needs {expected})"))?
                }
                Ok(found) => {
                    let name = pool.connect_options().get_database().unwrap_or("postgres").to_owned();
                    r.line(Mark::Fail, db::schema_problem(&name, found, expected))?
                }
                Err(e) => r.line(Mark::Fail, format!("cannot read the schema version: {e}"))?,
            }
            match job::pending_by_trigger(pool).await {
                Ok(p) => pending = p,
                Err(e) => r.line(Mark::Warn, format!("cannot count pending leads: {e}"))?,
            }
        }

        let topology = s.topology();
        match queue::connect_to(&s.amqp_url).await {
            Err(e) => r.line(Mark::Fail, format!("{e:#}"))?,
            Ok((conn, node)) => {
                r.line(Mark::Ok, format!("{} reachable; connected to {node}", queue::describe(&s.amqp_url)))?;
                for (name, _) in topology.queues() {
                    // A passive declare of a missing queue closes its channel.
                    let state = match conn.create_channel().await {
                        Ok(ch) => topology.state(&ch, &name).await,
                        Err(e) => Err(e),
                    };
                    let lane = [Lane::Bulk, Lane::Workflow].into_iter().find(|&l| topology.work_queue(l) == name);
                    match (state, lane) {
                        (Err(_), _) => r.line(
                            Mark::Fail,
                            format!("queue {name} is not declared; start a worker or `leadconv serve` (they declare it), or load deploy/rabbitmq/definitions.json"),
                        )?,
                        (Ok(q), Some(lane)) => {
                            let waiting: i64 = pending
                                .iter()
                                .filter(|(t, _)| Lane::for_trigger(*t) == lane)
                                .map(|(_, n)| n)
                                .sum();
                            let text = format!(
                                "queue {name}: {} ready, {} consumers, {waiting} leads pending in unfinished jobs",
                                q.messages, q.consumers
                            );
                            match (q.consumers, waiting) {
                                (0, n) if n > 0 => r.line(
                                    Mark::Fail,
                                    format!("{text}; no worker consumes them: start `leadconv worker`"),
                                )?,
                                (0, _) => r.line(Mark::Warn, format!("{text}; no worker is running"))?,
                                _ => r.line(Mark::Ok, text)?,
                            }
                        }
                        (Ok(q), None) if name == topology.dead_queue() && q.messages > 0 => r.line(
                            Mark::Warn,
                            format!("queue {name}: {} parked messages (unreadable or crashed every worker); inspect them in the RabbitMQ console", q.messages),
                        )?,
                        (Ok(q), None) => r.line(Mark::Ok, format!("queue {name}: {} messages", q.messages))?,
                    }
                }
                let _ = conn.close(200, "bye").await;
            }
        }
        if r.failed {
            anyhow::bail!("some checks failed (FAIL lines above)");
        }
        Ok(())
    }
}
