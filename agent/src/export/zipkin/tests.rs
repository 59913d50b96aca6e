use serde_json::Value;

use super::Encoder;
use crate::{export::otlp::tests::corpus_spans, trace::span::SpanRecord};

fn json(spans: &[SpanRecord]) -> Vec<Value> {
    let mut out = String::new();
    Encoder::new("node-1".into(), false).encode(spans, &mut out);
    match serde_json::from_str(&out) {
        Ok(Value::Array(v)) => v,
        other => panic!("not a JSON array: {other:?}\n{out}"),
    }
}

#[test]
fn corpus_spans_map_one_to_one() {
    let spans = corpus_spans(true);
    let got = json(&spans);
    assert_eq!(got.len(), spans.len());
    for (s, z) in spans.iter().zip(&got) {
        assert_eq!(z["id"], format!("{:016x}", s.span_id));
        assert_eq!(
            z["parentId"].as_str(),
            s.parent_span_id.map(|p| format!("{p:016x}")).as_deref()
        );
        assert_eq!(z["name"], &*s.name);
        assert_eq!(z["timestamp"], s.start_unix_ns / 1000);
        assert_eq!(
            z["localEndpoint"]["serviceName"],
            s.process.service_name.as_str()
        );
        let tags = z["tags"].as_object().expect("tags");
        assert!(tags.values().all(Value::is_string), "{tags:?}");
        assert_eq!(tags["process.pid"], s.process.pid.to_string());
        for (k, v) in &s.attributes {
            assert!(tags.contains_key(*k), "{k} = {v}");
        }
        assert_eq!(
            tags.get("error").and_then(Value::as_str),
            s.error.as_deref()
        );
        if s.error.is_some() {
            assert_eq!(tags["otel.status_code"], "ERROR");
        }
    }
    let arrays: Vec<&Value> = got
        .iter()
        .filter_map(|z| z["tags"].get("http.request.header.x-tenant"))
        .collect();
    assert!(!arrays.is_empty());
    assert!(arrays.iter().all(|v| v == &&Value::from("[\"acme\"]")));
    assert!(got.iter().any(
        |z| z["remoteEndpoint"]["ipv4"] == "127.0.0.1" && z["remoteEndpoint"]["port"].is_u64()
    ));
}

#[test]
fn b3_trace_ids_keep_their_width_and_text_is_escaped() {
    let mut s = corpus_spans(false).remove(0);
    s.trace_id = 0x463ac35c9f6413ad;
    s.name = "GET \"/a\\b\"\n\u{1}é".into();
    s.end_unix_ns = s.start_unix_ns;
    let z = &json(std::slice::from_ref(&s))[0];
    assert_eq!(z["traceId"], "463ac35c9f6413ad");
    assert_eq!(z["name"], &*s.name);
    assert_eq!(z["duration"], 1, "Zipkin reads 0 as unknown");
    s.trace_id = 0x1_0000_0000_0000_0000;
    let z = &json(std::slice::from_ref(&s))[0];
    assert_eq!(z["traceId"], "00000000000000010000000000000000");
}
