//! RED and service-graph metrics, scraped by a real Prometheus server.
use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use kspan_tests::{Proc, PyService, curl, env, free_port};

/// Prometheus (Debian's package) scraping the shared agent every second.
struct Prometheus {
    port: u16,
    _proc: Proc,
    dir: PathBuf,
}

impl Prometheus {
    fn start(target: std::net::SocketAddr) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("kspan-prom-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: kspan\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
        let proc = Proc::listening("prometheus", cmd, port);
        Self {
            port,
            _proc: proc,
            dir,
        }
    }

    /// The value of an instant query that yields one sample, once it equals `want`.
    fn wait_value(&self, query: &str, want: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let body = curl(&[
                "-G",
                &format!("http://127.0.0.1:{}/api/v1/query", self.port),
                "--data-urlencode",
                &format!("query={query}"),
            ]);
            let v: serde_json::Value = serde_json::from_str(&body).expect("Prometheus JSON");
            let got = v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok());
            if got == Some(want) {
                return want;
            }
            assert!(
                Instant::now() < deadline,
                "{query}: wanted {want}, Prometheus answers {body}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn red_histograms_and_service_graph_reach_prometheus() {
    let agent = env();
    let prom = Prometheus::start(agent.metrics);
    // Names unique to this run: the agent sees every process on the host.
    let (front_name, back_name) = (
        format!("front-{}", std::process::id()),
        format!("back-{}", std::process::id()),
    );
    let back = PyService::start(&back_name, None);
    let front = PyService::start(&front_name, Some(back.port));
    for _ in 0..3 {
        curl(&[&format!("http://127.0.0.1:{}/orders/12345", front.port)]);
    }
    // One failing call, straight to the backend (the frontend answers /status/ itself).
    curl(&[&format!("http://127.0.0.1:{}/status/503", back.port)]);

    let back_count = |labels: &str| {
        format!(
            r#"sum(http_server_request_duration_seconds_count{{service_name="{back_name}"{labels}}})"#
        )
    };
    // Ids in paths become {id}: one route for all three requests.
    prom.wait_value(
        &back_count(r#",http_route="/orders/{id}",http_response_status_code="200""#),
        3.0,
    );
    prom.wait_value(
        &back_count(r#",http_response_status_code="503",error_type="503""#),
        1.0,
    );
    // Every request took under 10 s: that bucket holds all four.
    prom.wait_value(
        &format!(
            r#"sum(http_server_request_duration_seconds_bucket{{service_name="{back_name}",le="10"}})"#
        ),
        4.0,
    );
    prom.wait_value(
        &format!(
            r#"sum(http_client_request_duration_seconds_count{{service_name="{front_name}",server_port="{}"}})"#,
            back.port
        ),
        3.0,
    );
    // Both ends seen by the agent: linked edges, measured at both ends.
    let edge = |metric: &str, client: &str| {
        format!(r#"sum({metric}{{client="{client}",server="{back_name}"}})"#)
    };
    prom.wait_value(
        &edge("traces_service_graph_request_total", &front_name),
        3.0,
    );
    prom.wait_value(
        &edge("traces_service_graph_request_failed_total", &front_name),
        0.0,
    );
    prom.wait_value(
        &edge(
            "traces_service_graph_request_server_seconds_count",
            &front_name,
        ),
        3.0,
    );
    prom.wait_value(
        &edge(
            "traces_service_graph_request_client_seconds_count",
            &front_name,
        ),
        3.0,
    );
    prom.wait_value(&edge("traces_service_graph_request_total", "curl"), 1.0);
    prom.wait_value(
        &edge("traces_service_graph_request_failed_total", "curl"),
        1.0,
    );
}
