//! `leadconv-dev`: developer tools that do not ship in the production
//! binary: sample data (`seed`), the README's demo (`demo`) and the
//! benchmark BENCHMARKS.md is made with (`bench`). Same flags and
//! environment (`DATABASE_URL`, `AMQP_URL`, …) as `leadconv`.

mod bench;
mod ceiling;
mod cpu;
mod demo;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use leadconv::config::Services;
use leadconv::store::db;

#[derive(Parser)]
#[command(name = "leadconv-dev", version, about = "leadconv's developer tools: sample data, demo, benchmark")]
struct Cli {
    #[command(flatten)]
    services: Services,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Insert sample users, contacts, accounts and leads.
    Seed {
        #[arg(long, default_value_t = 1000)]
        leads: usize,
        /// Share of leads duplicating an existing e-mail or company (0–1).
        #[arg(long, default_value_t = 0.3)]
        duplicates: f64,
        #[arg(long, default_value_t = 2026)]
        rng_seed: u64,
    },
    /// Create the database if missing, migrate, seed sample leads and
    /// convert them all in one job through RabbitMQ.
    Demo {
        #[arg(long, default_value_t = 2000)]
        leads: usize,
        #[arg(long, default_value_t = 0.3)]
        duplicates: f64,
        /// Conversions running at once.
        #[arg(long, default_value_t = 8)]
        concurrency: u16,
    },
    /// Measure end-to-end throughput through RabbitMQ against direct conversion.
    Bench(bench::BenchArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.services.init_logging("warn,leadconv=info");
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let s = &cli.services;
    match cli.command {
        Command::Seed { leads, duplicates, rng_seed } => {
            let pool = db::connect(&s.database_url, 2).await?;
            let seeded =
                leadconv_sample::seed(&pool, &leadconv_sample::SeedSpec { leads, duplicates, rng_seed }).await?;
            println!("seeded {} leads; user {} may convert them", seeded.lead_ids.len(), seeded.acting_user);
        }
        Command::Demo { leads, duplicates, concurrency } => {
            db::create_database_if_missing(&s.database_url).await?;
            let pool = db::connect(&s.database_url, u32::from(concurrency) + 4).await?;
            db::migrate(&pool).await?;
            let spec = demo::DemoSpec { leads, duplicates, concurrency };
            demo::run(&pool, &s.amqp_url, &s.topology(), &spec).await?;
        }
        Command::Bench(args) => bench::run(&s.database_url, &s.amqp_url, &args).await?,
    }
    Ok(())
}
