//! The built-in viewer in a real browser: a chain of three uninstrumented services traced by
//! the agent, the trace found by its B3 id in headless Chromium, its waterfall, one span's
//! attributes and the service map, read from the DOM the page's script built. Screenshots of
//! each view are left in `target/viewer/` (README shows them).
use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use kspan_tests::{
    Agent, PyService, assert_root, curl, grpc_collector, http_get, otlp_grpc, run_ok, runtime,
    trace_id,
};

const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs headless Chromium on `url` with `extra` (`--dump-dom`, `--screenshot=…`) and returns
/// its stdout. Virtual time lets the page's fetches finish before the DOM is read.
fn chromium(url: &str, extra: &[&str]) -> String {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: `cargo xtask setup` installs Debian's chromium"
    );
    let profile = std::env::temp_dir().join(format!("kspan-chromium-{}", std::process::id()));
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", "60", CHROMIUM])
        .args([
            "--headless",
            // Root in CI: Chromium's sandbox refuses to run as root.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--window-size=1400,900",
            "--virtual-time-budget=8000",
            &format!("--user-data-dir={}", profile.display()),
        ])
        .args(extra)
        .arg(url);
    String::from_utf8_lossy(&run_ok(cmd)).into_owned()
}

fn screenshot(url: &str, name: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/viewer");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    let path = dir.join(name);
    chromium(url, &[&format!("--screenshot={}", path.display())]);
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "{} is {size} bytes: no page drawn",
        path.display()
    );
}

/// The attributes of every element in `dom` whose opening tag starts with `prefix` (e.g.
/// `<div class="row"`), in document order.
fn elements(dom: &str, prefix: &str) -> Vec<HashMap<String, String>> {
    dom.match_indices(prefix)
        .map(|(at, _)| {
            let tag = &dom[at..at + dom[at..].find('>').unwrap_or(0)];
            let mut attrs = HashMap::new();
            let mut rest = tag;
            while let Some(eq) = rest.find("=\"") {
                let name = rest[..eq]
                    .rsplit(' ')
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let value_end = rest[eq + 2..].find('"').map_or(rest.len(), |e| eq + 2 + e);
                let value = rest[eq + 2..value_end]
                    .replace("&quot;", "\"")
                    .replace("&lt;", "<")
                    .replace("&gt;", ">")
                    .replace("&amp;", "&");
                attrs.insert(name, value);
                rest = &rest[(value_end + 1).min(rest.len())..];
            }
            attrs
        })
        .collect()
}

/// Waits (bounded) until the agent's `path` answers a body for which `pred` holds.
fn wait_api(agent: SocketAddr, path: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = http_get(agent, path)
            .ok()
            .and_then(|r| r.split_once("\r\n\r\n").map(|(_, b)| b.to_string()))
            .and_then(|b| serde_json::from_str(&b).ok());
        if body.as_ref().is_some_and(&pred) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never answered as expected: {body:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_chain_s_trace_and_service_map_in_a_real_browser() {
    assert_root();
    let rt = runtime();
    let (collector, spans) = grpc_collector(&rt);
    let agent = Agent::start(
        "kspan-viewer",
        &["--linger-ms", "200"],
        &otlp_grpc(collector),
    );
    // Names unique to this run: the agent sees every process on the host.
    let pid = std::process::id();
    let names = [0, 1, 2].map(|i| format!("{}-{pid}", ["front", "middle", "back"][i]));
    let back = PyService::start(&names[2], None);
    let middle = PyService::start(&names[1], Some(back.port));
    let front = PyService::start(&names[0], Some(middle.port));
    let t = trace_id(0x71);
    let b3 = format!("{t:032x}-000000000000f300-1");
    curl(&[
        "-H",
        &format!("b3: {b3}"),
        &format!("http://127.0.0.1:{}/orders/7", front.port),
    ]);
    for _ in 0..2 {
        curl(&[&format!("http://127.0.0.1:{}/orders/8", front.port)]);
    }
    // curl, and each service's SERVER span; front and middle's CLIENT spans.
    let exported = spans.wait_trace(t, 6, 20);
    let base = format!("http://{}", agent.metrics);
    let hex = format!("{t:032x}");
    wait_api(agent.metrics, &format!("/api/traces/{hex}"), |v| {
        v["data"][0]["spans"]
            .as_array()
            .is_some_and(|s| s.len() == 6)
    });
    // The map's series are published once a second.
    wait_api(agent.metrics, "/api/graph", |v| {
        let edges = v["edges"].as_array().cloned().unwrap_or_default();
        [(0, 1), (1, 2)].iter().all(|&(c, s)| {
            edges.iter().any(|e| {
                e["client"] == names[c].as_str()
                    && e["server"] == names[s].as_str()
                    && e["requests_total"] == 3
            })
        })
    });

    // The list, filtered by the root service: the trace is there, with its root and size.
    let list = chromium(&format!("{base}/?service={}", names[0]), &["--dump-dom"]);
    let listed = elements(&list, "<tr class=\"trace\"");
    assert_eq!(listed.len(), 3, "three requests through front:\n{list}");
    assert!(
        listed.iter().any(|r| r["data-trace-id"] == hex),
        "the B3 trace is listed:\n{list}"
    );

    // The trace opened by the B3 header as pasted, one span selected.
    let back_server = exported
        .iter()
        .find(|s| s.kind == "SERVER" && s.service() == names[2])
        .expect("back's SERVER span");
    let url = format!("{base}/trace/{b3}?span={:016x}", back_server.span_id);
    let dom = chromium(&url, &["--dump-dom"]);
    let rows = elements(&dom, "<div class=\"row");
    let got: Vec<(String, String, usize)> = rows
        .iter()
        .map(|r| {
            (
                r["data-service"].clone(),
                r["data-kind"].clone(),
                r["data-depth"].parse().unwrap_or(99),
            )
        })
        .collect();
    let want: Vec<(String, String, usize)> = [
        ("curl", "client"),
        (&names[0], "server"),
        (&names[0], "client"),
        (&names[1], "server"),
        (&names[1], "client"),
        (&names[2], "server"),
    ]
    .iter()
    .enumerate()
    .map(|(depth, (s, k))| (s.to_string(), k.to_string(), depth))
    .collect();
    assert_eq!(
        got, want,
        "one row per span, nested by parent, in order:\n{dom}"
    );
    // Every row's span is one the collector received, under the parent it received.
    for r in &rows {
        let id = u64::from_str_radix(&r["data-span-id"], 16).expect("span id");
        let span = exported
            .iter()
            .find(|s| s.span_id == id)
            .expect("exported span");
        let parent = span.parent.map(|p| format!("{p:016x}")).unwrap_or_default();
        assert_eq!(r["data-parent-id"], parent);
    }
    assert_eq!(
        rows[0]["data-orphan"], "true",
        "curl's parent was never seen here"
    );
    assert!(dom.contains("parent not seen here"));
    assert!(rows[1..].iter().all(|r| r["data-orphan"] == "false"));
    // Bars on one time axis: each child's lies inside its parent's.
    let at = |r: &HashMap<String, String>, k: &str| r[k].parse::<u64>().expect("µs");
    for pair in rows.windows(2) {
        let (parent, child) = (&pair[0], &pair[1]);
        assert!(
            at(child, "data-start") >= at(parent, "data-start")
                && at(child, "data-end") <= at(parent, "data-end"),
            "{child:?} outside {parent:?}"
        );
    }
    // The selected span's attributes and resource, as exported.
    let attributes = &dom[dom.find("id=\"span-attributes\"").expect("attribute panel")..];
    let value = |key: &str| {
        let row = &attributes[attributes
            .find(&format!("data-key=\"{key}\""))
            .unwrap_or_else(|| panic!("{key} in the panel"))..];
        let cell = &row[row.find("class=\"mono\">").expect("value cell") + 13..];
        cell[..cell.find('<').unwrap_or(0)].to_string()
    };
    assert_eq!(value("url.path"), "/orders/7");
    assert_eq!(value("http.response.status_code"), "200");
    assert_eq!(value("span.kind"), "server");
    let resource = &dom[dom.find("id=\"span-resource\"").expect("resource panel")..];
    assert!(
        resource.contains(&format!(">{}<", names[2])),
        "service.name"
    );

    // The map: the chain's two edges with their counts, each a link to its traces.
    let map = chromium(&format!("{base}/map"), &["--dump-dom"]);
    let edges = elements(&map, "<g class=\"edge");
    for (c, s) in [(0, 1), (1, 2)] {
        let e = edges
            .iter()
            .find(|e| e["data-client"] == names[c] && e["data-server"] == names[s])
            .unwrap_or_else(|| panic!("edge {} → {}:\n{map}", names[c], names[s]));
        assert_eq!(e["data-requests"], "3");
    }
    assert!(map.contains(&format!(
        "href=\"/?service={}&amp;peer={}\"",
        names[0], names[1]
    )));
    let nodes = elements(&map, "<g class=\"node");
    assert!(
        names
            .iter()
            .all(|n| nodes.iter().any(|x| x["data-node"] == *n))
    );
    // The edge's link finds the traces that crossed it.
    wait_api(
        agent.metrics,
        &format!("/api/traces?service={}&peer={}", names[1], names[2]),
        |v| v["total"] == 3,
    );

    screenshot(&format!("{base}/?service={}", names[0]), "traces.png");
    screenshot(&url, "trace.png");
    screenshot(&format!("{base}/map"), "map.png");
    drop(agent);
    drop(rt);
}

/// With the agent tracing h2load at saturation and 10,000 traces in the viewer's memory, its
/// API keeps answering within 200 ms, and the store stays bounded: new traces beyond
/// `--ui-traces-per-sec` are counted as skipped, the oldest evicted past `--ui-max-traces`.
#[test]
fn the_api_stays_responsive_under_http2_load() {
    assert_root();
    let rt = runtime();
    let (collector, _spans) = grpc_collector(&rt);
    // Admission fast enough to fill the store within the run, and room for all of it.
    let agent = Agent::start(
        "kspan-viewer-load",
        &["--ui-traces-per-sec", "5000", "--ui-max-mb", "64"],
        &otlp_grpc(collector),
    );
    let dir = std::env::temp_dir().join(format!("kspan-viewer-h2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("docroot");
    std::fs::write(dir.join("hello"), b"hello\n").expect("file");
    let (port, _server) = kspan_tests::nghttpd(&dir);
    let load = Command::new("h2load")
        .args(["-D", "20", "-c", "8", "-m", "10"])
        .arg(format!("http://127.0.0.1:{port}/hello"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("h2load (nghttp2-client)");
    let deadline = Instant::now() + Duration::from_secs(8);
    while kspan_tests::metric(agent.metrics, "kspan_ui_traces") < 10_000 {
        assert!(Instant::now() < deadline, "the viewer's store never filled");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut took = Vec::new();
    let mut trace = None;
    for i in 0..40 {
        let path = match (i % 4, &trace) {
            // As the page asks.
            (0, _) => "/api/traces?limit=50".to_string(),
            (1, _) => "/api/graph".to_string(),
            (2, Some(id)) => format!("/api/traces/{id}"),
            _ => "/api/services".to_string(),
        };
        let started = Instant::now();
        let answer = http_get(agent.metrics, &path).expect("the agent answers");
        took.push((started.elapsed(), path.clone()));
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer:.300}");
        // The newest listed trace, fetched next (older ones leave the full store fast).
        if path.starts_with("/api/traces?")
            && let Some(at) = answer.find("\"traceID\":\"")
        {
            trace = Some(
                answer[at + 11..at + 11 + answer[at + 11..].find('"').unwrap_or(0)].to_string(),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let report = load.wait_with_output().expect("h2load ran");
    let report = String::from_utf8_lossy(&report.stdout);
    assert!(report.contains("succeeded"), "{report}");
    took.sort();
    let (slowest, path) = &took[took.len() - 1];
    let p90 = took[took.len() * 9 / 10].0;
    println!(
        "viewer API under h2load: median {:?}, p90 {p90:?}, slowest {slowest:?} ({path})",
        took[took.len() / 2].0
    );
    println!("{took:?}");
    assert!(p90 < Duration::from_millis(200), "p90 {p90:?}: {took:?}");
    assert!(trace.is_some(), "traces were listed under load");
    let skipped = kspan_tests::metric(agent.metrics, "kspan_ui_traces_skipped_total");
    let kept = kspan_tests::metric(agent.metrics, "kspan_ui_traces");
    let bytes = kspan_tests::metric(agent.metrics, "kspan_ui_bytes");
    let evicted = kspan_tests::metric(agent.metrics, "kspan_ui_traces_evicted_total");
    println!(
        "viewer store under load: {kept} traces in {bytes} bytes, {skipped} skipped, {evicted} evicted"
    );
    assert!(skipped > 0, "admission is bounded under load");
    assert_eq!(kept, 10_000, "full, and no fuller");
    assert!(evicted > 0 && bytes <= 64 << 20);
    let _ = std::fs::remove_dir_all(&dir);
    drop(agent);
    drop(rt);
}
