//! OTLP export over TLS, both protocols: `https://` endpoints, the collector's certificate
//! signed by a private CA that the agent trusts through OTEL_EXPORTER_OTLP_CERTIFICATE.
use std::net::SocketAddr;

use kspan_tests::{
    Agent, PyService, Spans, assert_root, certificates, curl, grpc_collector_with,
    http_collector_with, runtime, trace_id,
};

fn exported_over(
    protocol: &str,
    endpoint: String,
    spans: &Spans,
    ca_file: &std::path::Path,
    tag: u16,
) {
    let back = PyService::start("tls-backend", None);
    let port = back.port.to_string();
    let agent = Agent::start(
        &format!("kspan-tls-{tag}"),
        &["--port", &port, "--linger-ms", "50"],
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.into()),
            (
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
                ca_file.display().to_string(),
            ),
        ],
    );
    let t = trace_id(tag);
    curl(&[
        "-H",
        &format!("b3: {t:032x}-0000000000000d1d-1"),
        &format!("http://127.0.0.1:{port}/secure"),
    ]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while spans.all().iter().filter(|g| g.trace_id == t).count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no spans over {protocol} with TLS:\n{}",
            agent.proc.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(agent.terminate().success());
}

#[test]
fn otlp_export_over_tls_with_a_private_ca() {
    assert_root();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = runtime();
    let (ca, cert, key) = certificates();
    let dir = std::env::temp_dir().join(format!("kspan-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();

    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (grpc, grpc_spans) = grpc_collector_with(&rt, any, Some((&cert, &key)));
    exported_over(
        "grpc",
        format!("https://localhost:{}", grpc.port()),
        &grpc_spans,
        &ca_file,
        71,
    );

    // Without the CA the collector's certificate is not trusted: nothing is delivered, and the
    // failures are counted.
    let back = PyService::start("tls-untrusted", None);
    let port = back.port.to_string();
    let agent = Agent::start(
        "kspan-tls-untrusted",
        &["--port", &port, "--linger-ms", "50"],
        &[
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                format!("https://localhost:{}", grpc.port()),
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
        ],
    );
    let t = trace_id(73);
    curl(&[
        "-H",
        &format!("b3: {t:032x}-0000000000000d1e-1"),
        &format!("http://127.0.0.1:{port}/untrusted"),
    ]);
    kspan_tests::wait_metric(agent.metrics, "kspan_spans_export_failed_total", |n| n >= 2);
    assert!(grpc_spans.all().iter().all(|g| g.trace_id != t));
    assert!(agent.terminate().success());
    drop(back);

    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            rustls_pemfile_certs(&cert),
            rustls::pki_types::PrivateKeyDer::try_from(
                rcgen::KeyPair::from_pem(&key).unwrap().serialize_der(),
            )
            .unwrap(),
        )
        .unwrap();
    let (http, http_spans) = http_collector_with(
        &rt,
        Some(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server))),
    );
    exported_over(
        "http/protobuf",
        format!("https://127.0.0.1:{}/v1/traces", http.port()),
        &http_spans,
        &ca_file,
        72,
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn rustls_pemfile_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap())
        .collect()
}
