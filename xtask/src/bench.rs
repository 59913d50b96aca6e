//! `cargo xtask bench`: agent overhead measured side by side. For each scenario, runs without
//! (A) and with (B) the agent alternate (A B A B …) so drift in the machine hits both equally;
//! medians and B/A ratios go to BENCHMARKS.md. A replay benchmark measures the userspace
//! pipeline alone. `--smoke` makes every run short and writes to target/ instead.
use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

mod stores;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A/B pairs per scenario.
    #[arg(long, default_value_t = 5)]
    pairs: usize,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// One short pair per scenario; results go to target/bench-smoke.md (used by CI).
    #[arg(long)]
    smoke: bool,
    /// Only scenarios whose name contains this (the one so named, when it is a whole name);
    /// repeatable, so rows to be compared run in one invocation. No replay; results go to
    /// target/bench-partial.md so BENCHMARKS.md always holds a whole run.
    #[arg(long)]
    only: Vec<String>,
    /// Extra kspan flag for the B runs (repeatable), e.g.
    /// `--agent-arg=--traces-sampler=parentbased_traceidratio --agent-arg=--traces-sampler-arg=0.1`;
    /// results go to target/bench-partial.md.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Another kspan binary (an earlier build: `cp target/release/kspan /tmp/kspan-before`)
    /// run in each pair after this one, as a row of its own: a change measured against the
    /// code before it in one run. Results go to target/bench-partial.md.
    #[arg(long)]
    baseline: Option<PathBuf>,
}

/// What drives a scenario.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Load {
    /// wrk against nginx.
    Http,
    /// wrk against nginx over HTTPS (both ends OpenSSL: read at the library).
    Https,
    /// h2load against nghttpd.
    H2,
    /// redis-benchmark's SET and GET, this many commands per write.
    Redis { pipeline: u32 },
    /// pgbench's select-only transactions with prepared statements.
    Pgbench,
}

struct Scenario {
    name: &'static str,
    path: &'static str,
    keep_alive: bool,
    load: Load,
    /// Spans each request produces (CLIENT + SERVER, twice when proxied).
    spans_per_request: u64,
    /// kspan flags for this scenario's B runs (before any `--agent-arg`).
    agent_args: &'static [&'static str],
    /// Milliseconds each wrk connection waits between a response and its next request; 0 runs
    /// at saturation.
    think_ms: u32,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "static, keep-alive",
        path: "/static",
        keep_alive: true,
        load: Load::Http,
        spans_per_request: 2,
        agent_args: &[],
        think_ms: 0,
    },
    Scenario {
        name: "static over HTTPS (TLS plaintext read at OpenSSL), keep-alive",
        path: "/static",
        keep_alive: true,
        load: Load::Https,
        spans_per_request: 2,
        agent_args: &[],
        think_ms: 0,
    },
    Scenario {
        name: "static, new connection per request",
        path: "/static",
        keep_alive: false,
        load: Load::Http,
        spans_per_request: 2,
        agent_args: &[],
        think_ms: 0,
    },
    Scenario {
        name: "proxied upstream, keep-alive",
        path: "/proxy",
        keep_alive: true,
        load: Load::Http,
        spans_per_request: 4,
        agent_args: &[],
        think_ms: 0,
    },
    Scenario {
        name: "HTTP/2 (h2load → nghttpd, h2c, 10 streams per connection)",
        path: "/hello",
        keep_alive: true,
        load: Load::H2,
        spans_per_request: 2,
        agent_args: &[],
        think_ms: 0,
    },
    // The same three saturated rows exporting through opentelemetry-otlp's SDK path (the
    // reference encoder), to compare the encoders' cost within one run.
    Scenario {
        name: "static, keep-alive, SDK exporter (reference)",
        path: "/static",
        keep_alive: true,
        load: Load::Http,
        spans_per_request: 2,
        agent_args: &["--otlp-sdk-encoder"],
        think_ms: 0,
    },
    Scenario {
        name: "proxied upstream, keep-alive, SDK exporter (reference)",
        path: "/proxy",
        keep_alive: true,
        load: Load::Http,
        spans_per_request: 4,
        agent_args: &["--otlp-sdk-encoder"],
        think_ms: 0,
    },
    Scenario {
        name: "HTTP/2 (h2load → nghttpd, h2c), SDK exporter (reference)",
        path: "/hello",
        keep_alive: true,
        load: Load::H2,
        spans_per_request: 2,
        agent_args: &["--otlp-sdk-encoder"],
        think_ms: 0,
    },
    // What tracing costs when a 10% head sampler exports one trace in ten (every request is
    // still decoded, linked and counted in the RED metrics).
    Scenario {
        name: "static, keep-alive, 10% of traces sampled",
        path: "/static",
        keep_alive: true,
        load: Load::Http,
        spans_per_request: 2,
        agent_args: &[
            "--traces-sampler=parentbased_traceidratio",
            "--traces-sampler-arg=0.1",
        ],
        think_ms: 0,
    },
    // The built-in viewer's share: the same row with it off (it copies the spans of at most
    // 100 new traces a second and checks every other span against the traces it keeps).
    Scenario {
        name: "static, keep-alive, viewer off (`--ui=false`)",
        path: "/static",
        keep_alive: true,
        load: Load::Http,
        spans_per_request: 2,
        agent_args: &["--ui=false"],
        think_ms: 0,
    },
    // The floor: probes attached and every connection filtered (no port 1 is served, so the
    // kernel marks each connection ignored after its first bytes). Nothing is traced on
    // purpose; this is what the hooks cost by themselves.
    Scenario {
        name: "static, keep-alive, probes only (`--port 1`: every connection filtered)",
        path: "/static",
        keep_alive: true,
        load: Load::Http,
        spans_per_request: 0,
        agent_args: &["--port", "1"],
        think_ms: 0,
    },
    // The TLS probes' own cost: they still run on every `SSL_read`/`SSL_write` of both wrk
    // and nginx, and drop the call once they find its connection filtered.
    Scenario {
        name: "static over HTTPS, probes only (`--port 1`)",
        path: "/static",
        keep_alive: true,
        load: Load::Https,
        spans_per_request: 0,
        agent_args: &["--port", "1"],
        think_ms: 0,
    },
    // Below saturation, as services mostly run: each of the 32 connections waits 1 ms between
    // requests, so the offered load is the same with and without the agent and the latency
    // columns show what tracing adds to a request rather than the queueing of a full machine.
    // Data-store calls: one CLIENT span each (the stores' side is not decoded by default).
    Scenario {
        name: "Redis SET/GET (redis-benchmark, 1 command per write)",
        path: "",
        keep_alive: true,
        load: Load::Redis { pipeline: 1 },
        spans_per_request: 1,
        agent_args: &[],
        think_ms: 0,
    },
    Scenario {
        name: "Redis SET/GET pipelined (redis-benchmark -P 16)",
        path: "",
        keep_alive: true,
        load: Load::Redis { pipeline: 16 },
        spans_per_request: 1,
        agent_args: &[],
        think_ms: 0,
    },
    Scenario {
        name: "PostgreSQL SELECT (pgbench -S -M prepared, 8 clients)",
        path: "",
        keep_alive: true,
        load: Load::Pgbench,
        spans_per_request: 1,
        agent_args: &[],
        think_ms: 0,
    },
    Scenario {
        name: "static, keep-alive, fixed load (1 ms think time per connection)",
        path: "/static",
        keep_alive: true,
        load: Load::Http,
        spans_per_request: 2,
        agent_args: &[],
        think_ms: 1,
    },
];

/// One load run. h2load reports no latency percentiles, hence the options.
#[derive(Clone, Copy, Default, Debug)]
struct Wrk {
    rps: f64,
    requests: u64,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
}

#[derive(Clone, Copy, Default, Debug)]
struct AgentRun {
    cpu_secs: f64,
    /// During the run (start-up's peak left out).
    peak_rss_kb: u64,
    idle_rss_kb: u64,
    /// Of the RSS at the end, the ring buffer's mapping.
    ring_rss_kb: u64,
    lost: u64,
    spans_exported: u64,
    spans_dropped: u64,
    requests_seen: u64,
}

pub fn run(args: BenchArgs, kspan: &Path) -> anyhow::Result<()> {
    let (pairs, secs) = if args.smoke {
        (1, 1)
    } else {
        (args.pairs.max(1), args.secs.max(1))
    };
    let dir = std::env::temp_dir().join(format!("kspan-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let front = free_port()?;
    let upstream = free_port()?;
    let tls = free_port()?;
    let _nginx = start_nginx(&dir, front, upstream, tls)?;
    let h2_port = free_port()?;
    let _nghttpd = start_nghttpd(&dir, h2_port)?;
    let sink = Sink::start()?;

    let mut report = String::new();
    let mut rows = Vec::new();
    // A whole name picks that row alone ("static, keep-alive" begins several).
    let exact = |o: &String| SCENARIOS.iter().any(|sc| sc.name == o);
    let picks = |sc: &Scenario, o: &String| {
        if exact(o) {
            sc.name == o
        } else {
            sc.name.contains(o.as_str())
        }
    };
    let chosen: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|sc| args.only.is_empty() || args.only.iter().any(|o| picks(sc, o)))
        .collect();
    let wants = |f: fn(Load) -> bool| chosen.iter().any(|sc| f(sc.load));
    let redis = wants(|l| matches!(l, Load::Redis { .. }))
        .then(stores::Redis::start)
        .transpose()?;
    let postgres = wants(|l| l == Load::Pgbench)
        .then(|| stores::Postgres::start(&dir))
        .transpose()?;
    for sc in chosen {
        let url = match sc.load {
            Load::H2 => format!("http://127.0.0.1:{h2_port}{}", sc.path),
            Load::Https => format!("https://127.0.0.1:{tls}{}", sc.path),
            _ => format!("http://127.0.0.1:{front}{}", sc.path),
        };
        let load = |url: &str| match sc.load {
            Load::Http | Load::Https => wrk(
                url,
                sc.keep_alive,
                secs,
                args.connections,
                sc.think_ms,
                &dir,
            ),
            Load::H2 => h2load(url, secs, args.connections),
            // About `secs` of work at this machine's rates.
            Load::Redis { pipeline } => stores::redis_benchmark(
                redis.as_ref().context("redis-server")?.port,
                secs * if pipeline > 1 { 400_000 } else { 40_000 },
                args.connections,
                pipeline,
            ),
            Load::Pgbench => stores::pgbench(postgres.as_ref().context("postgres")?.port, secs, 8),
        };
        let mut a_runs = Vec::new();
        let mut b_runs = Vec::new();
        let mut baseline_runs = Vec::new();
        let extra: Vec<&str> = sc
            .agent_args
            .iter()
            .copied()
            .chain(args.agent_args.iter().map(String::as_str))
            .collect();
        let with_agent = |bin: &Path| -> anyhow::Result<(Wrk, AgentRun)> {
            let agent = Agent::start_with(bin, sink.port, &dir, &extra)?;
            let w = load(&url)?;
            Ok((w, agent.finish()?))
        };
        for pair in 0..pairs {
            eprintln!("bench: {} — pair {}/{pairs}", sc.name, pair + 1);
            a_runs.push(load(&url)?);
            b_runs.push(with_agent(kspan)?);
            if let Some(base) = &args.baseline {
                baseline_runs.push(with_agent(base)?);
            }
        }
        rows.push(summarise(sc.name, sc, &a_runs, &b_runs));
        if let Some(base) = &args.baseline {
            let name = format!("{}, baseline `{}`", sc.name, base.display());
            rows.push(summarise(&name, sc, &a_runs, &baseline_runs));
        }
    }

    let partial = !args.only.is_empty() || !args.agent_args.is_empty() || args.baseline.is_some();
    let replay = if partial {
        String::new()
    } else {
        replay_bench(&args, kspan, &dir, front, sink.port)?
    };
    let machine = machine();
    let _ = writeln!(report, "# Benchmarks\n");
    let _ = writeln!(
        report,
        "Produced by `cargo xtask bench{}` ({pairs} A/B pairs per scenario, {secs} s per wrk run, wrk -t1 -c{}, nginx 1 worker; redis-benchmark -c{} and pgbench -c8 -j2 against local redis-server and PostgreSQL; agent exporting OTLP/HTTP to a local sink). For the data stores a request is one call.\n",
        if args.smoke { " --smoke" } else { "" },
        args.connections,
        args.connections
    );
    let _ = writeln!(report, "Machine: {machine}\n");
    let _ = writeln!(
        report,
        "A = without kspan, B = with kspan; values are medians over the pairs. kspan's CPU is counted from the moment it is ready (its start-up, parsing BTF and loading the programs, is left out). kspan's RSS: idle is once ready, before the load; peak is the highest during the run (start-up's peak is reset, see /proc/PID/clear_refs); in parentheses, the kernel ring buffer's share (its pages are mapped twice for wrap-around, all of them from start-up, so the 16 MiB default shows as 32 MiB), then idle → peak with the ring buffer counted once, the memory the agent holds. Rows marked \"SDK exporter (reference)\" export through opentelemetry-otlp instead of kspan's encoder; rows marked \"baseline\" run another kspan build (`--baseline`) in the same pairs, right after this one.\n"
    );
    let _ = writeln!(
        report,
        "| scenario | req/s A | req/s B | throughput B/A | p50 A → B (µs) | p50 B/A | p99 A → B (µs) | p99 B/A | kspan CPU s / 10k req | kspan RSS idle → peak (ring buffer; once: ring counted once) | lost events | spans exported / requests |"
    );
    let _ = writeln!(report, "|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let _ = writeln!(report, "{r}");
    }
    let _ = writeln!(report, "\n{replay}");
    let out = if args.smoke {
        PathBuf::from("target/bench-smoke.md")
    } else if partial {
        PathBuf::from("target/bench-partial.md")
    } else {
        PathBuf::from("BENCHMARKS.md")
    };
    let existing = std::fs::read_to_string(&out).unwrap_or_default();
    // Keep hand-written analysis below the generated part.
    let notes = existing
        .split_once("<!-- notes -->")
        .map(|(_, n)| n.to_string())
        .unwrap_or_default();
    std::fs::write(&out, format!("{report}\n<!-- notes -->{notes}"))?;
    println!("{report}");
    eprintln!("bench: wrote {}", out.display());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn summarise(name: &str, sc: &Scenario, a: &[Wrk], b: &[(Wrk, AgentRun)]) -> String {
    let m = |f: &dyn Fn(&Wrk) -> f64, runs: &[Wrk]| median(runs.iter().map(f).collect());
    let mo = |f: &dyn Fn(&Wrk) -> Option<f64>, runs: &[Wrk]| {
        runs.iter().map(f).collect::<Option<Vec<f64>>>().map(median)
    };
    let bw: Vec<Wrk> = b.iter().map(|(w, _)| *w).collect();
    let (rps_a, rps_b) = (m(&|w| w.rps, a), m(&|w| w.rps, &bw));
    let latency = |f: &dyn Fn(&Wrk) -> Option<f64>| match (mo(f, a), mo(f, &bw)) {
        (Some(x), Some(y)) => (format!("{x:.0} → {y:.0}"), format!("{:.2}", y / x.max(1.0))),
        _ => ("n/a".to_string(), "n/a".to_string()),
    };
    let (p50, p50_ratio) = latency(&|w| w.p50_us);
    let (p99, p99_ratio) = latency(&|w| w.p99_us);
    let cpu_per_10k = median(
        b.iter()
            .map(|(w, r)| r.cpu_secs / (w.requests.max(1) as f64 / 10_000.0))
            .collect(),
    );
    let rss = b.iter().map(|(_, r)| r.peak_rss_kb).max().unwrap_or(0);
    let idle = b.iter().map(|(_, r)| r.idle_rss_kb).max().unwrap_or(0);
    let ring = b.iter().map(|(_, r)| r.ring_rss_kb).max().unwrap_or(0);
    let lost: u64 = b.iter().map(|(_, r)| r.lost).sum();
    let per_req = sc.spans_per_request;
    let exported: u64 = b.iter().map(|(_, r)| r.spans_exported).sum();
    let expected: u64 = b.iter().map(|(w, _)| w.requests * per_req).sum();
    let dropped: u64 = b.iter().map(|(_, r)| r.spans_dropped).sum();
    let seen: u64 = b.iter().map(|(_, r)| r.requests_seen).sum();
    let spans = if per_req == 0 {
        format!("{exported} (nothing traced on purpose; {seen} requests decoded)")
    } else {
        format!(
            "{exported} / {expected} ({:.1}%; {dropped} dropped, {seen} requests decoded)",
            100.0 * exported as f64 / expected.max(1) as f64,
        )
    };
    format!(
        "| {} | {:.0} | {:.0} | **{:.3}** | {p50} | {p50_ratio} | {p99} | {p99_ratio} | {:.3} | {:.1} → {:.1} MiB ({:.1}; once: {:.1} → {:.1}) | {} | {spans} |",
        name,
        rps_a,
        rps_b,
        rps_b / rps_a.max(1.0),
        cpu_per_10k,
        idle as f64 / 1024.0,
        rss as f64 / 1024.0,
        ring as f64 / 1024.0,
        idle.saturating_sub(ring / 2) as f64 / 1024.0,
        rss.saturating_sub(ring / 2) as f64 / 1024.0,
        lost,
    )
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        // SAFETY: plain syscall on our own child's process group.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

fn start_nginx(dir: &Path, front: u16, upstream: u16, tls: u16) -> anyhow::Result<Killed> {
    let d = dir.display();
    // A throwaway certificate for the HTTPS row (wrk does not verify it).
    crate::run(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
            ])
            .arg(dir.join("key.pem"))
            .arg("-out")
            .arg(dir.join("cert.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    let conf = format!(
        "worker_processes 1;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\nevents {{ worker_connections 4096; }}\n\
         http {{\n access_log off;\n client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n\
         upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}\n\
         server {{ listen 127.0.0.1:{front} backlog=4096; keepalive_requests 1000000;\n\
           location /static {{ return 200 \"hello from kspan bench\\n\"; }}\n\
           location /proxy {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}\n\
         server {{ listen 127.0.0.1:{upstream} backlog=4096; keepalive_requests 1000000; location / {{ return 200 \"hello from upstream\\n\"; }} }}\n\
         server {{ listen 127.0.0.1:{tls} ssl backlog=4096; keepalive_requests 1000000; ssl_certificate {d}/cert.pem; ssl_certificate_key {d}/key.pem;\n\
           location /static {{ return 200 \"hello from kspan bench\\n\"; }} }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = Killed(cmd.spawn().context("starting nginx")?);
    wait_port(front)?;
    wait_port(upstream)?;
    wait_port(tls)?;
    Ok(child)
}

fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on {port}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn wrk(
    url: &str,
    keep_alive: bool,
    secs: u64,
    connections: u32,
    think_ms: u32,
    dir: &Path,
) -> anyhow::Result<Wrk> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t1",
        &format!("-c{connections}"),
        &format!("-d{secs}s"),
        "--latency",
    ]);
    if !keep_alive {
        cmd.args(["-H", "Connection: close"]);
    }
    if think_ms > 0 {
        // wrk calls delay() before each request on a connection.
        let script = dir.join(format!("think-{think_ms}.lua"));
        std::fs::write(
            &script,
            format!("function delay()\n  return {think_ms}\nend\n"),
        )?;
        cmd.arg("-s").arg(&script);
    }
    let out = cmd.arg(url).output().context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}");
    }
    parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))
}

fn parse_us(v: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|x| x * mult)
}

fn parse_wrk(text: &str) -> Option<Wrk> {
    let mut w = Wrk::default();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["Requests/sec:", v] => w.rps = v.parse().ok()?,
            ["50%", v] => w.p50_us = Some(parse_us(v)?),
            ["99%", v] => w.p99_us = Some(parse_us(v)?),
            [n, "requests", "in", ..] => w.requests = n.parse().ok()?,
            _ => {}
        }
    }
    (w.rps > 0.0 && w.requests > 0).then_some(w)
}

/// nghttpd serving a small file over h2c (prior knowledge).
fn start_nghttpd(dir: &Path, port: u16) -> anyhow::Result<Killed> {
    let docroot = dir.join("h2");
    std::fs::create_dir_all(&docroot)?;
    std::fs::write(docroot.join("hello"), "hello from kspan bench\n")?;
    let mut cmd = Command::new("nghttpd");
    cmd.args(["--no-tls", "-d"])
        .arg(&docroot)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = Killed(cmd.spawn().context("starting nghttpd")?);
    wait_port(port)?;
    Ok(child)
}

/// h2load at saturation: `connections` connections with 10 concurrent streams each.
fn h2load(url: &str, secs: u64, connections: u32) -> anyhow::Result<Wrk> {
    let out = Command::new("h2load")
        .args([
            "-c",
            &connections.to_string(),
            "-m",
            "10",
            "-D",
            &secs.to_string(),
            url,
        ])
        .output()
        .context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("h2load failed: {text}");
    }
    parse_h2load(&text).with_context(|| format!("unexpected h2load output:\n{text}"))
}

fn parse_h2load(text: &str) -> Option<Wrk> {
    let mut w = Wrk::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("finished in ") {
            let rps = rest.split(", ").nth(1)?.strip_suffix(" req/s")?;
            w.rps = rps.parse().ok()?;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            // "requests: N total, N started, N done, N succeeded, ..."
            let succeeded = rest
                .split(", ")
                .find_map(|f| f.strip_suffix(" succeeded"))?;
            w.requests = succeeded.parse().ok()?;
        }
    }
    (w.rps > 0.0 && w.requests > 0).then_some(w)
}

/// A minimal OTLP/HTTP receiver: accepts POST /v1/traces and answers 200. The agent's own
/// counter of exported spans is what the benchmark reports.
struct Sink {
    port: u16,
}

impl Sink {
    fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                thread::spawn(move || serve_sink(conn));
            }
        });
        Ok(Self { port })
    }
}

fn serve_sink(conn: TcpStream) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut r = BufReader::new(conn);
    loop {
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        if out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n").is_err() {
            return;
        }
    }
}

struct Agent {
    child: Killed,
    metrics: u16,
    /// CPU seconds spent getting ready (BTF, loading the programs), left out of the run's.
    cpu_at_ready: f64,
    /// Resident memory once ready, before any load.
    idle_rss_kb: u64,
}

/// A `/proc/<pid>/status` field in kB.
fn status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0))
}

/// Resident kB of the process's BPF map mappings: the ring buffer, whose data pages the kernel
/// maps twice (for wrap-around) and populates when it is mapped, so a 16 MiB buffer shows as
/// 32 MiB from start-up on (measured on 6.18: 32,772 kB idle, before any event).
fn ring_buffer_kb(pid: u32) -> anyhow::Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut in_map, mut kb) = (false, 0);
    for l in smaps.lines() {
        if l.split_whitespace().nth(1).is_some_and(|p| p.len() == 4) && l.contains('-') {
            in_map = l.ends_with("anon_inode:bpf-map");
        } else if in_map && let Some(v) = l.strip_prefix("Rss:") {
            kb += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    Ok(kb)
}

impl Agent {
    fn start_with(kspan: &Path, sink: u16, dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let metrics = free_port()?;
        let mut cmd = Command::new(kspan);
        cmd.args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
            .args([
                "--otlp-endpoint",
                &format!("http://127.0.0.1:{sink}/v1/traces"),
                "--otlp-protocol",
                "http/protobuf",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("kspan.log"))?);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = Killed(cmd.spawn().context("starting kspan")?);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !get(metrics, "/readyz").is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
            if Instant::now() > deadline {
                bail!(
                    "kspan never became ready: {}",
                    std::fs::read_to_string(dir.join("kspan.log")).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        let pid = child.0.id();
        let cpu_at_ready = cpu_secs(pid)?;
        let idle_rss_kb = status_kb(pid, "VmRSS:")?;
        // Resets VmHWM, so the peak read at the end is the run's, not start-up's (parsing the
        // kernel's BTF).
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
        Ok(Self {
            child,
            metrics,
            cpu_at_ready,
            idle_rss_kb,
        })
    }

    /// Lets the last spans leave, then reads the agent's counters and resource use.
    fn finish(self) -> anyhow::Result<AgentRun> {
        let pid = self.child.0.id();
        let (mut last, mut still) = ((u64::MAX, u64::MAX), 0);
        // Wait until the exported and decoded counts stop moving (bounded). The pipeline's
        // counters are published once a second: still for 1.25 s means they are final.
        for _ in 0..60 {
            thread::sleep(Duration::from_millis(250));
            let now = (
                metric(self.metrics, "kspan_spans_exported_total")?,
                metric(self.metrics, "kspan_requests_total")?,
            );
            still = if now == last { still + 1 } else { 0 };
            if still == 5 {
                break;
            }
            last = now;
        }
        let cpu = cpu_secs(pid)? - self.cpu_at_ready;
        let run = AgentRun {
            cpu_secs: cpu,
            peak_rss_kb: status_kb(pid, "VmHWM:")?,
            idle_rss_kb: self.idle_rss_kb,
            ring_rss_kb: ring_buffer_kb(pid)?,
            lost: metric(self.metrics, "kspan_kernel_lost_events_total")?,
            spans_exported: metric(self.metrics, "kspan_spans_exported_total")?,
            spans_dropped: metric(self.metrics, "kspan_spans_queue_dropped_total")?
                + metric(self.metrics, "kspan_spans_export_failed_total")?,
            requests_seen: metric(self.metrics, "kspan_requests_total")?,
        };
        // SAFETY: plain syscall.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        // A clean exit flushes the recording; the drop below only cleans up stragglers.
        let mut child = self.child;
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.0.try_wait()?.is_none() {
            if Instant::now() > deadline {
                bail!("kspan did not exit within 20 s of SIGTERM");
            }
            thread::sleep(Duration::from_millis(20));
        }
        drop(child);
        Ok(run)
    }
}

/// User and system CPU seconds a process has used.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime, in clock ticks of 1/100 s.
    Ok((ticks(11) + ticks(12)) / 100.0)
}

fn get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn metric(port: u16, name: &str) -> anyhow::Result<u64> {
    let body = get(port, "/metrics")?;
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("metric {name} missing"))
}

/// Records real events under load, then replays them through the userspace pipeline (the
/// `replay` bench target: no kernel, spans converted for export and dropped) for
/// messages/s/core.
fn replay_bench(
    args: &BenchArgs,
    kspan: &Path,
    dir: &Path,
    front: u16,
    sink: u16,
) -> anyhow::Result<String> {
    let rec = dir.join("events.rec");
    let agent = Agent::start_with(
        kspan,
        sink,
        dir,
        &["--record", rec.to_str().context("path")?],
    )?;
    wrk(
        &format!("http://127.0.0.1:{front}/proxy"),
        true,
        if args.smoke { 1 } else { 5 },
        args.connections,
        0,
        dir,
    )?;
    agent.finish()?;
    let out = Command::new("cargo")
        .args([
            "bench",
            "--quiet",
            "--package",
            "kspan",
            "--bench",
            "replay",
            "--",
        ])
        .arg(&rec)
        .arg(if args.smoke { "1" } else { "5" })
        .stderr(Stdio::inherit())
        .output()
        .context("running the replay bench")?;
    if !out.status.success() {
        bail!(
            "replay bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} × {cpu}, Linux {}", kernel.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let text = "Running 1s test @ http://127.0.0.1:1/static\n  1 threads and 32 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   306.43us  120.00us   2.10ms   90.00%\n  Latency Distribution\n     50%  289.00us\n     75%  330.00us\n     90%  400.00us\n     99%    1.20ms\n  97000 requests in 1.00s, 14.2MB read\nRequests/sec:  96998.50\nTransfer/sec:     14.20MB\n";
        let w = parse_wrk(text).unwrap();
        assert_eq!(w.requests, 97000);
        assert_eq!(w.p50_us, Some(289.0));
        assert_eq!(w.p99_us, Some(1200.0));
        assert!((w.rps - 96998.5).abs() < 1e-6);
        assert!(parse_wrk("garbage").is_none());
        let h2 = "finished in 5.00s, 41234.60 req/s, 3.40MB/s\nrequests: 206173 total, 206173 started, 206173 done, 206173 succeeded, 0 failed, 0 errored, 0 timeout\n";
        let w = parse_h2load(h2).unwrap();
        assert_eq!((w.requests, w.p50_us), (206173, None));
        assert!((w.rps - 41234.6).abs() < 1e-6);
        assert!(parse_h2load("nothing").is_none());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
