//! Where a run's CPU went: Postgres, RabbitMQ, leadconv's processes, the
//! reference's `psql` loops, summed from `/proc` while the run goes.
//!
//! Throughput alone does not say why one run beats another on a machine
//! whose speed swings between runs; CPU per lead, by process, does (a
//! run that keeps the cores busy is limited by the work per lead, one that
//! leaves them idle by its waits). Linux only: elsewhere no figures.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The groups a process is counted in, in the order they are reported:
/// the named processes of a run (see [`CpuWatch::name`]) come under their
/// names.
pub const GROUPS: [&str; 8] = ["Postgres", "RabbitMQ", "worker", "enqueue", "serve", "psql", "bench", "other"];

/// CPU seconds by group over a run, and the run's wall time.
#[derive(Debug, Clone, Default)]
pub struct CpuUse {
    pub seconds: HashMap<&'static str, f64>,
    pub wall: Duration,
    pub cores: usize,
}

impl CpuUse {
    /// The share of the machine's cores the run kept busy.
    pub fn busy(&self) -> f64 {
        self.seconds.values().sum::<f64>() / (self.wall.as_secs_f64() * self.cores as f64).max(1e-9)
    }
}

/// Samples `/proc` until stopped.
pub struct CpuWatch {
    stop: Arc<AtomicBool>,
    names: Names,
    /// The sampling thread, until stopped.
    thread: Mutex<Option<std::thread::JoinHandle<CpuUse>>>,
    /// What it counted, once stopped.
    used: std::sync::OnceLock<CpuUse>,
}

type Names = Arc<Mutex<HashMap<u32, &'static str>>>;

impl CpuWatch {
    /// Starts counting; this process is counted as "bench".
    pub fn start() -> CpuWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let names: Names = Arc::new(Mutex::new(HashMap::from([(std::process::id(), "bench")])));
        let (flag, known) = (stop.clone(), names.clone());
        let thread = std::thread::spawn(move || watch(&flag, &known));
        CpuWatch { stop, names, thread: Mutex::new(Some(thread)), used: std::sync::OnceLock::new() }
    }

    /// Counts the process `pid` (a child just started) as `name`.
    pub fn name(&self, pid: u32, name: &'static str) {
        self.names.lock().expect("names lock").insert(pid, name);
    }

    /// Stops counting (the first call) and returns what was counted: a
    /// run's clock may stop before its processes exit, and the CPU with it.
    pub fn stop(&self) -> CpuUse {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.lock().expect("thread lock").take() {
            let _ = self.used.set(thread.join().unwrap_or_default());
        }
        self.used.get().cloned().unwrap_or_default()
    }
}

/// Clock ticks per second of `/proc/*/stat` (`USER_HZ`): 100 on every
/// Linux this runs on.
const TICKS: f64 = 100.0;

fn watch(stop: &AtomicBool, names: &Mutex<HashMap<u32, &'static str>>) -> CpuUse {
    let started = Instant::now();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Some(boot_ticks) = uptime_ticks() else { return CpuUse::default() };
    let mut seen: HashMap<(u32, u64), u64> = HashMap::new();
    let mut ticks: HashMap<&'static str, u64> = HashMap::new();
    loop {
        let last = stop.load(Ordering::SeqCst);
        let named = names.lock().expect("names lock").clone();
        for (pid, start, used, comm) in processes() {
            let g = named.get(&pid).copied().unwrap_or_else(|| group(&comm));
            match seen.get_mut(&(pid, start)) {
                Some(before) => {
                    *ticks.entry(g).or_default() += used.saturating_sub(*before);
                    *before = used;
                }
                None => {
                    // Started during the run: all of it counts; before it,
                    // only what it uses from now on.
                    if start >= boot_ticks {
                        *ticks.entry(g).or_default() += used;
                    }
                    seen.insert((pid, start), used);
                }
            }
        }
        if last {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    CpuUse { seconds: ticks.into_iter().map(|(g, t)| (g, t as f64 / TICKS)).collect(), wall: started.elapsed(), cores }
}

fn uptime_ticks() -> Option<u64> {
    let up = std::fs::read_to_string("/proc/uptime").ok()?;
    let secs: f64 = up.split_whitespace().next()?.parse().ok()?;
    Some((secs * TICKS) as u64)
}

/// Every process: pid, start time, CPU ticks used, command name.
fn processes() -> Vec<(u32, u64, u64, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return vec![] };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces and parentheses: fields start
        // after the last ')'.
        let (head, rest) = stat.rsplit_once(')')?;
        let comm = head.split_once('(')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        let used = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        let start = f.get(19)?.parse().ok()?;
        Some((pid, start, used, comm.to_owned()))
    })
    .collect()
}

fn group(comm: &str) -> &'static str {
    match comm {
        c if c.starts_with("postgres") => "Postgres",
        "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost" => "RabbitMQ",
        // A run names its worker and enqueue processes: a leadconv process
        // not named is the `serve` the convert-now callers call.
        "leadconv" => "serve",
        "psql" => "psql",
        _ => "other",
    }
}
