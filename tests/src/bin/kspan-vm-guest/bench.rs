//! The kernel matrix's benchmark, run inside each guest by `cargo xtask vm --bench`.
//!
//! For each hook the kernel accepts: wrk against nginx's static `return 200` without the agent
//! (A), with the agent's probes attached and every connection filtered (`--port 1`: the
//! hook's floor), and with the agent tracing every request. A and B runs alternate, in the same
//! guest, so hooks are compared under the same emulation. The kernel's own accounting
//! (`kernel.bpf_stats_enabled`) gives program runs per request and nanoseconds per run. Under
//! TCG absolute costs are distorted: the ratios and run counts are what carry over.
//!
//! Prints one Markdown table row per hook, each line prefixed `kspan-vm-bench: `.
use std::{process::Command, time::Duration};

use kspan_tests::{Agent, Nginx, grpc_collector, metric, otlp_grpc, runtime};

use crate::{HOOKS, LOAD_BOUND, kernel_release, probes_line, say};

/// Pairs per hook; the medians are reported.
const ROUNDS: usize = 3;
const WRK_SECS: u32 = 4;

/// One wrk run against a running agent (or none).
struct Run {
    rps: f64,
    requests: u64,
    /// Program runs and their nanoseconds during the run, when an agent was attached.
    runs: u64,
    run_ns: u64,
}

pub fn run() {
    if let Err(e) = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1") {
        say(&format!("cannot enable bpf_stats: {e}"));
    }
    let rt = runtime();
    let (collector, _spans) = grpc_collector(&rt);
    let env = otlp_grpc(collector);
    let nginx = Nginx::leaf();
    let url = format!("http://127.0.0.1:{}/", nginx.port);
    say(&format!("kernel {}", kernel_release()));
    bench_line(
        "| hook | req/s without kspan | probes only: B/A | probes only: program runs / request | probes only: ns / run | tracing: B/A | tracing: program runs / request | tracing: ns / run |",
    );
    bench_line("|---|---|---|---|---|---|---|---|");
    for hook in HOOKS {
        let probes_args = ["--hook", hook, "--port", "1"];
        let trace_args = ["--hook", hook];
        let mut a = Vec::new();
        let mut probes = Vec::new();
        let mut tracing = Vec::new();
        let mut described = None;
        for _ in 0..ROUNDS {
            a.push(wrk(&url, None));
            let Some((run, what)) = with_agent(&probes_args, &env, &url) else {
                break;
            };
            described = Some(what);
            probes.push(run);
            a.push(wrk(&url, None));
            if let Some((run, _)) = with_agent(&trace_args, &env, &url) {
                tracing.push(run);
            }
        }
        let Some(described) = described else {
            say(&format!("hook {hook} unavailable on this kernel"));
            continue;
        };
        let base = median(a.iter().map(|r| r.rps).collect());
        bench_line(&format!(
            "| {described} | {base:.0} | {} | {} |",
            cells(&probes, base),
            cells(&tracing, base)
        ));
    }
    drop(nginx);
}

/// B/A, runs per request and ns per run: medians over the rounds.
fn cells(runs: &[Run], base: f64) -> String {
    if runs.is_empty() {
        return "n/a | n/a | n/a".to_string();
    }
    let ratio = median(runs.iter().map(|r| r.rps / base).collect());
    let per_req = median(
        runs.iter()
            .map(|r| r.runs as f64 / r.requests.max(1) as f64)
            .collect(),
    );
    let ns = median(
        runs.iter()
            .map(|r| r.run_ns as f64 / r.runs.max(1) as f64)
            .collect(),
    );
    format!("**{ratio:.3}** | {per_req:.1} | {ns:.0}")
}

/// Starts the agent with `args`, runs wrk, stops it; `None` when it does not start.
fn with_agent(args: &[&str], env: &[(&str, String)], url: &str) -> Option<(Run, String)> {
    let agent =
        std::panic::catch_unwind(|| Agent::start_within("kspan", args, env, LOAD_BOUND)).ok()?;
    let described = probes_line(&agent.proc.log());
    let run = wrk(url, Some(&agent));
    let _ = agent.terminate();
    Some((run, described))
}

/// The agent's counters are published once a second: read them settled.
fn program_counters(agent: &Agent) -> (u64, u64) {
    std::thread::sleep(Duration::from_millis(1500));
    (
        metric(agent.metrics, "kspan_kernel_program_runs_total"),
        metric(agent.metrics, "kspan_kernel_program_run_nanoseconds_total"),
    )
}

fn wrk(url: &str, agent: Option<&Agent>) -> Run {
    let before = agent.map(program_counters);
    let out = Command::new("wrk")
        .args(["-t1", "-c8", &format!("-d{WRK_SECS}s"), url])
        .output()
        .expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout);
    let after = agent.map(program_counters);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .unwrap_or(0);
    let (runs, run_ns) = match (before, after) {
        (Some(b), Some(a)) => (a.0.saturating_sub(b.0), a.1.saturating_sub(b.1)),
        _ => (0, 0),
    };
    Run {
        rps,
        requests,
        runs,
        run_ns,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn bench_line(what: &str) {
    println!("kspan-vm-bench: {what}");
}
