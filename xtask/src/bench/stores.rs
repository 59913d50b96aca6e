//! The data stores of the benchmark and their own load generators: redis-server driven by
//! redis-benchmark, PostgreSQL driven by pgbench. Each call is one CLIENT span (the stores'
//! own side is not decoded by default).
use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use super::{Killed, Wrk, free_port, wait_port};

pub struct Redis {
    pub port: u16,
    _server: Killed,
}

impl Redis {
    pub fn start() -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let server = Killed(cmd.spawn().context("starting redis-server")?);
        wait_port(port)?;
        Ok(Self {
            port,
            _server: server,
        })
    }
}

/// redis-benchmark's SET and GET, `requests` of each over `connections` connections,
/// `pipeline` commands per write.
pub fn redis_benchmark(
    port: u16,
    requests: u64,
    connections: u32,
    pipeline: u32,
) -> anyhow::Result<Wrk> {
    let out = Command::new("redis-benchmark")
        .args(["-p", &port.to_string(), "-t", "set,get", "--csv"])
        .args(["-n", &requests.to_string(), "-c", &connections.to_string()])
        .args(["-P", &pipeline.to_string()])
        .output()
        .context("running redis-benchmark")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("redis-benchmark failed: {text}");
    }
    parse_redis_benchmark(&text, 2 * requests)
        .with_context(|| format!("unexpected redis-benchmark output:\n{text}"))
}

/// `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms",…`: the
/// tests' rates and latencies averaged.
pub fn parse_redis_benchmark(text: &str, requests: u64) -> Option<Wrk> {
    let rows: Vec<Vec<f64>> = text
        .lines()
        .skip_while(|l| !l.starts_with("\"test\""))
        .skip(1)
        .map(|l| {
            l.split(',')
                .skip(1)
                .map(|f| f.trim_matches('"').parse().ok())
                .collect::<Option<Vec<f64>>>()
        })
        .collect::<Option<_>>()?;
    if rows.is_empty() || rows.iter().any(|r| r.len() < 6) {
        return None;
    }
    let mean = |i: usize| rows.iter().map(|r| r[i]).sum::<f64>() / rows.len() as f64;
    // Each test runs alone: the pair's rate is the requests over both tests' time.
    let secs: f64 = rows
        .iter()
        .map(|r| requests as f64 / rows.len() as f64 / r[0])
        .sum();
    Some(Wrk {
        rps: requests as f64 / secs,
        requests,
        p50_us: Some(mean(3) * 1000.0),
        p99_us: Some(mean(5) * 1000.0),
    })
}

/// A PostgreSQL server of its own (run as `postgres`) with pgbench's tables at scale 1.
pub struct Postgres {
    pub port: u16,
    _server: Killed,
}

impl Postgres {
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .context("postgresql is not installed")?
            .filter_map(|e| Some(e.ok()?.path().join("bin")))
            .max()
            .context("no postgresql version")?;
        let pg = dir.join("pg");
        std::fs::create_dir_all(&pg)?;
        run(Command::new("chown").arg("postgres:postgres").arg(&pg))?;
        let data = pg.join("data");
        let as_postgres = |program: &str| {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin.join(program));
            c
        };
        run(as_postgres("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust"]))?;
        let port = free_port()?;
        let mut cmd = as_postgres("postgres");
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&pg)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "max_connections=50"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let server = Killed(cmd.spawn().context("starting postgres")?);
        wait_port(port)?;
        run(pgbench_cmd(port).args(["-i", "-q", "-s", "1", "postgres"]))?;
        Ok(Self {
            port,
            _server: server,
        })
    }
}

fn pgbench_cmd(port: u16) -> Command {
    let mut c = Command::new("pgbench");
    c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"]);
    c
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// pgbench's read-only transaction (one SELECT) with prepared statements, `clients`
/// connections for `secs`.
pub fn pgbench(port: u16, secs: u64, clients: u32) -> anyhow::Result<Wrk> {
    let out = pgbench_cmd(port)
        .args(["-S", "-n", "-M", "prepared", "-j", "2"])
        .args(["-c", &clients.to_string(), "-T", &secs.to_string()])
        .arg("postgres")
        .output()
        .context("running pgbench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "pgbench failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_pgbench(&text).with_context(|| format!("unexpected pgbench output:\n{text}"))
}

pub fn parse_pgbench(text: &str) -> Option<Wrk> {
    let mut w = Wrk::default();
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("number of transactions actually processed: ") {
            w.requests = n.split('/').next()?.trim().parse().ok()?;
        } else if let Some(rest) = line.strip_prefix("tps = ") {
            w.rps = rest.split_whitespace().next()?.parse().ok()?;
        } else if let Some(rest) = line.strip_prefix("latency average = ") {
            // pgbench gives no percentiles; its mean stands in the p50 column.
            let ms: f64 = rest.split_whitespace().next()?.parse().ok()?;
            w.p50_us = Some(ms * 1000.0);
        }
    }
    (w.rps > 0.0 && w.requests > 0).then_some(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_store_benchmarks() {
        let redis = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"SET\",\"100000.00\",\"0.300\",\"0.100\",\"0.287\",\"0.500\",\"0.700\",\"2.000\"\n\"GET\",\"50000.00\",\"0.200\",\"0.100\",\"0.187\",\"0.400\",\"0.500\",\"1.000\"\n";
        let w = parse_redis_benchmark(redis, 2000).unwrap();
        assert_eq!(w.requests, 2000);
        // 1000 at 100k/s and 1000 at 50k/s: 0.03 s for 2000.
        assert!((w.rps - 2000.0 / 0.03).abs() < 1e-6, "{}", w.rps);
        assert!((w.p50_us.unwrap() - 237.0).abs() < 1e-6);
        assert!((w.p99_us.unwrap() - 600.0).abs() < 1e-6);
        assert!(parse_redis_benchmark("oops", 1).is_none());
        let pg = "transaction type: <builtin: select only>\nnumber of transactions actually processed: 41234\nlatency average = 0.194 ms\ntps = 4123.456789 (without initial connection time)\n";
        let w = parse_pgbench(pg).unwrap();
        assert_eq!(w.requests, 41234);
        assert!((w.rps - 4123.456789).abs() < 1e-9);
        assert_eq!(w.p50_us, Some(194.0));
        assert!(parse_pgbench("").is_none());
    }
}
