//! The default sink: finished traces printed as trees, for a person at a terminal.
use std::{
    collections::HashMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use crate::trace::span::{AttrValue, SpanKind, SpanRecord};

/// Groups spans by trace and renders a trace once no span of it arrived for `quiet`.
pub struct TreePrinter {
    quiet: Duration,
    traces: HashMap<u128, (Instant, Vec<SpanRecord>)>,
    max_traces: usize,
}

impl TreePrinter {
    pub fn new(quiet: Duration) -> Self {
        Self {
            quiet,
            traces: HashMap::new(),
            max_traces: 10_000,
        }
    }

    pub fn add(&mut self, spans: Vec<SpanRecord>, now: Instant) {
        for s in spans {
            if self.traces.len() >= self.max_traces && !self.traces.contains_key(&s.trace_id) {
                // Memory stays bounded even if nothing ever goes quiet.
                continue;
            }
            let entry = self
                .traces
                .entry(s.trace_id)
                .or_insert_with(|| (now, Vec::new()));
            entry.0 = now;
            entry.1.push(s);
        }
    }

    /// Renders every trace quiet at `now` (all of them when `all`).
    pub fn take_ready(&mut self, now: Instant, all: bool) -> Vec<String> {
        let quiet = self.quiet;
        let ready: Vec<u128> = self
            .traces
            .iter()
            .filter(|(_, (last, _))| all || now.duration_since(*last) >= quiet)
            .map(|(id, _)| *id)
            .collect();
        let mut out = Vec::new();
        for id in ready {
            if let Some((_, spans)) = self.traces.remove(&id) {
                out.push(render(id, spans));
            }
        }
        out
    }
}

fn describe(s: &SpanRecord) -> String {
    let str_attr = |k: &str| {
        s.attr(k)
            .and_then(AttrValue::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let system = str_attr("db.system.name");
    let (target, status) = if system.is_empty() {
        let target = match s.kind {
            SpanKind::Server => str_attr("url.path"),
            SpanKind::Client => str_attr("url.full"),
        };
        let status = match s.attr("http.response.status_code") {
            Some(AttrValue::Int(c)) => c.to_string(),
            _ => "-".into(),
        };
        (target, status)
    } else {
        // A data-store call: the store and its (sanitised) statement.
        let code = str_attr("db.response.status_code");
        let status = if code.is_empty() { "ok".into() } else { code };
        (format!("{system}: {}", str_attr("db.query.text")), status)
    };
    let kind = match s.kind {
        SpanKind::Server => "SERVER",
        SpanKind::Client => "CLIENT",
    };
    let ms = s.end_unix_ns.saturating_sub(s.start_unix_ns) as f64 / 1e6;
    let err = s
        .error
        .as_deref()
        .map(|e| format!("  ERROR: {e}"))
        .unwrap_or_default();
    format!(
        "{kind} {} [pid {}] {} {target} -> {status} ({ms:.3} ms) span {:016x}{err}",
        s.process.service_name, s.process.pid, s.name, s.span_id
    )
}

pub fn render(trace_id: u128, mut spans: Vec<SpanRecord>) -> String {
    spans.sort_by_key(|s| (s.start_unix_ns, s.span_id));
    let ids: std::collections::HashSet<u64> = spans.iter().map(|s| s.span_id).collect();
    let mut children: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut roots = Vec::new();
    for (i, s) in spans.iter().enumerate() {
        match s.parent_span_id {
            Some(p) if ids.contains(&p) => children.entry(p).or_default().push(i),
            _ => roots.push(i),
        }
    }
    let mut out = format!("trace {trace_id:032x} ({} spans)\n", spans.len());
    fn walk(
        out: &mut String,
        spans: &[SpanRecord],
        children: &HashMap<u64, Vec<usize>>,
        i: usize,
        prefix: &str,
        last: bool,
        depth: usize,
    ) {
        let s = &spans[i];
        let remote = match (depth, s.parent_span_id) {
            (0, Some(p)) => format!(" (parent {p:016x} not seen here)"),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "{prefix}{}{}{remote}",
            if last { "└─ " } else { "├─ " },
            describe(s)
        );
        let next = format!("{prefix}{}", if last { "   " } else { "│  " });
        if depth > 64 {
            return;
        }
        if let Some(kids) = children.get(&s.span_id) {
            for (k, &c) in kids.iter().enumerate() {
                walk(
                    out,
                    spans,
                    children,
                    c,
                    &next,
                    k + 1 == kids.len(),
                    depth + 1,
                );
            }
        }
    }
    for (k, &r) in roots.iter().enumerate() {
        walk(&mut out, &spans, &children, r, "", k + 1 == roots.len(), 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::process::ProcessInfo;

    fn span(id: u64, parent: Option<u64>, kind: SpanKind, service: &str, start: u64) -> SpanRecord {
        SpanRecord {
            trace_id: 7,
            span_id: id,
            parent_span_id: parent,
            kind,
            name: "GET".into(),
            start_unix_ns: start,
            end_unix_ns: start + 1_000_000,
            attributes: vec![
                ("url.path", "/x".into()),
                ("http.response.status_code", 200i64.into()),
            ],
            error: None,
            process: Arc::new(ProcessInfo {
                pid: 1,
                comm: String::new(),
                exe: String::new(),
                command_line: String::new(),
                service_name: service.into(),
                cgroup: Default::default(),
                k8s: None,
                runtime: Default::default(),
            }),
        }
    }

    #[test]
    fn renders_nested_tree_once_quiet() {
        let mut p = TreePrinter::new(Duration::from_millis(100));
        let t0 = Instant::now();
        p.add(
            vec![
                span(2, Some(1), SpanKind::Server, "back", 20),
                span(1, Some(99), SpanKind::Server, "front", 10),
            ],
            t0,
        );
        assert!(p.take_ready(t0, false).is_empty());
        let out = p.take_ready(t0 + Duration::from_millis(150), false);
        assert_eq!(out.len(), 1);
        let lines: Vec<&str> = out[0].lines().collect();
        assert_eq!(lines[0], format!("trace {:032x} (2 spans)", 7));
        assert!(
            lines[1].starts_with("└─ SERVER front")
                && lines[1].ends_with("(parent 0000000000000063 not seen here)"),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("   └─ SERVER back [pid 1] GET /x -> 200 (1.000 ms)"),
            "{}",
            lines[2]
        );
    }
}
