//! Kubernetes metadata end to end: a process in a kubelet-style cgroup, an API server that
//! knows its pod, and spans whose resources name the pod, namespace, node, container and
//! workload, with the service named after the workload.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kspan_tests::{
    Agent, PyService, Val, assert_root, curl, grpc_collector, runtime, trace_id, wait_metric,
};

const UID: &str = "6d1f0c4e-5a7b-4c3d-9e8f-0a1b2c3d4e5f";

/// A cgroup v1 hierarchy laid out as the kubelet's cgroupfs driver does; removed on drop.
struct PodCgroup(std::path::PathBuf);

impl PodCgroup {
    fn new(container_id: &str) -> Self {
        let dir = std::path::Path::new("/sys/fs/cgroup/pids/kubepods/besteffort")
            .join(format!("pod{UID}"))
            .join(container_id);
        std::fs::create_dir_all(&dir).expect("cgroup v1 pids hierarchy");
        Self(dir)
    }

    fn enter(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // Innermost first, up to kubepods; a cgroup can only go once it has no processes and
        // no children, so ones that existed before (a real node's) stay.
        for dir in self.0.ancestors().take(4) {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Answers the pod list with one pod and holds watches open; records request lines.
fn fake_api_server(pod: serde_json::Value) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (pod, log) = (pod.clone(), log.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut conn = conn;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    // Skip the headers (kube sends no request bodies for these calls).
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    log.lock().unwrap().push(line.trim().to_string());
                    if line.contains("watch=true") || line.contains("watch=1") {
                        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
                        std::thread::sleep(Duration::from_secs(120));
                        return;
                    }
                    let body = serde_json::json!({
                        "apiVersion": "v1", "kind": "PodList",
                        "metadata": {"resourceVersion": "10"},
                        "items": [pod],
                    })
                    .to_string();
                    let _ = conn.write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    );
                }
            });
        }
    });
    (port, seen)
}

#[test]
fn spans_carry_their_pods_metadata() {
    assert_root();
    let rt = runtime();
    let (collector, spans) = grpc_collector(&rt);
    let container = "c0ffee".repeat(10) + "abcd";
    let cgroup = PodCgroup::new(&container);
    let service = PyService::start_with("checkout-pod", None, None);
    cgroup.enter(service.proc.pid());
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "checkout-7d9f8b6c5-x2x9z", "namespace": "shop", "uid": UID,
            "resourceVersion": "9",
            "labels": {"pod-template-hash": "7d9f8b6c5"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "checkout-7d9f8b6c5", "uid": "rs-1"}]
        },
        "spec": {"nodeName": "node-a", "containers": [{"name": "app"}]},
        "status": {"containerStatuses": [{"name": "app", "containerID": format!("containerd://{container}"),
            "image": "shop/checkout:1", "imageID": "", "ready": true, "restartCount": 0}]}
    });
    let (api_port, requests) = fake_api_server(pod);
    let port = service.port.to_string();
    let agent = Agent::start(
        "kspan-k8s",
        &[
            "--kube-api-url",
            &format!("http://127.0.0.1:{api_port}"),
            "--node-name",
            "node-a",
            "--port",
            &port,
            "--linger-ms",
            "50",
        ],
        &kspan_tests::otlp_grpc(collector),
    );
    wait_metric(agent.metrics, "kspan_k8s_pods", |n| n == 1);
    let t = trace_id(61);
    curl(&[
        "-H",
        &format!("b3: {t:032x}-0000000000000f0f-1"),
        &format!("http://127.0.0.1:{port}/cart"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let server = loop {
        if let Some(s) = spans
            .all()
            .into_iter()
            .find(|g| g.trace_id == t && g.kind == "SERVER")
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no server span:\n{}",
            agent.proc.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let res = |k: &str| match server.resource.get(k) {
        Some(Val::S(s)) => s.clone(),
        other => panic!("{k}: {other:?} in {server:#?}"),
    };
    assert_eq!(
        res("service.name"),
        "checkout",
        "named after its Deployment"
    );
    assert_eq!(res("k8s.pod.name"), "checkout-7d9f8b6c5-x2x9z");
    assert_eq!(res("k8s.namespace.name"), "shop");
    assert_eq!(res("k8s.node.name"), "node-a");
    assert_eq!(res("k8s.container.name"), "app");
    assert_eq!(res("k8s.deployment.name"), "checkout");
    assert_eq!(res("k8s.replicaset.name"), "checkout-7d9f8b6c5");
    assert_eq!(res("k8s.pod.uid"), UID);
    assert_eq!(res("container.id"), container);
    // Only this node's pods were asked for.
    let requests = requests.lock().unwrap().clone();
    assert!(!requests.is_empty());
    for r in &requests {
        assert!(
            r.starts_with("GET /api/v1/pods?")
                && r.contains("fieldSelector=spec.nodeName%3Dnode-a"),
            "{r}"
        );
    }
    assert!(agent.terminate().success());
    drop(service);
    drop(cgroup);
}
