//! The agent's own health: counters for every stage (nothing is dropped without a count), and
//! their Prometheus text (served by [`crate::endpoint`]).
pub mod red;

use std::{
    fmt::Write as _,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
};

use crate::tls::Uncovered;

macro_rules! metrics {
    ($( $field:ident : $kind:literal, $name:literal, $help:literal; )*) => {
        /// Counters and gauges, written by the pipeline and exporter threads.
        #[derive(Default, Debug)]
        pub struct Metrics {
            $( pub $field: AtomicU64, )*
            /// Probes attached and exporter running.
            pub ready: AtomicBool,
            /// RED and service-graph series, rendered by the pipeline thread.
            pub red: Mutex<String>,
            /// TLS connections whose plaintext was not read, by why.
            pub tls_unsupported: [AtomicU64; Uncovered::COUNT],
        }

        impl Metrics {
            pub fn render(&self) -> String {
                let mut out = String::with_capacity(4096);
                $(
                    let _ = writeln!(out, "# HELP {} {}\n# TYPE {} {}\n{} {}", $name, $help, $name, $kind, $name, self.$field.load(Relaxed));
                )*
                self.render_tls_unsupported(&mut out);
                out.push_str(&self.red.lock().unwrap_or_else(|e| e.into_inner()));
                out
            }
        }
    };
}

impl Metrics {
    fn render_tls_unsupported(&self, out: &mut String) {
        const NAME: &str = "kspan_connections_tls_unsupported_total";
        let _ = writeln!(
            out,
            "# HELP {NAME} TLS connections whose plaintext was not read, by reason (a library kspan does not hook, or none seen).\n# TYPE {NAME} counter"
        );
        for why in Uncovered::ALL {
            let n = self.tls_unsupported[why.index()].load(Relaxed);
            let _ = writeln!(out, "{NAME}{{reason=\"{}\"}} {n}", why.label());
        }
    }
}

metrics! {
    kernel_events: "counter", "kspan_kernel_events_total", "Events the kernel programs wrote to the ring buffer.";
    kernel_lost: "counter", "kspan_kernel_lost_events_total", "Events the kernel dropped because the ring buffer was full.";
    kernel_truncated: "counter", "kspan_kernel_truncated_payloads_total", "Syscalls whose payload exceeded the copy cap (byte counts stay exact).";
    kernel_read_faults: "counter", "kspan_kernel_read_faults_total", "Payload copies from process memory that faulted.";
    kernel_conns_tracked: "counter", "kspan_kernel_connections_tracked_total", "TCP connections the kernel started tracking.";
    kernel_conns_not_http: "counter", "kspan_kernel_connections_unrecognised_total", "Connections dropped in kernel because their first bytes were no protocol kspan decodes.";
    kernel_conns_discovered: "counter", "kspan_kernel_connections_discovered_total", "Sockets opened before the agent started, found and tracked on first use.";
    kernel_conn_insert_failed: "counter", "kspan_kernel_connection_insert_failures_total", "Connections the kernel could not track (table full).";
    kernel_program_runs: "counter", "kspan_kernel_program_runs_total", "Runs of kspan's kernel programs (the kernel counts them only while sysctl kernel.bpf_stats_enabled is 1).";
    kernel_program_run_ns: "counter", "kspan_kernel_program_run_nanoseconds_total", "Time kspan's kernel programs ran, in nanoseconds (only while kernel.bpf_stats_enabled is 1).";
    events_decoded: "counter", "kspan_events_total", "Events received by userspace.";
    decode_errors: "counter", "kspan_event_decode_errors_total", "Ring-buffer records that could not be decoded.";
    requests: "counter", "kspan_requests_total", "Requests decoded: HTTP requests, gRPC calls and data-store calls.";
    desyncs: "counter", "kspan_stream_desyncs_total", "Times a connection's stream lost framing and resynchronised.";
    gaps: "counter", "kspan_stream_gaps_total", "Events seen after kernel-side losses on the same connection.";
    conns_filtered: "counter", "kspan_connections_filtered_total", "Connections excluded by --pid/--port/--exe.";
    conns_unsupported: "counter", "kspan_connections_unsupported_total", "Connections no longer decoded: upgraded to another protocol (e.g. WebSocket), HTTP/2 framing lost for good, or a Redis connection turned subscriber.";
    kernel_tls_unbound: "counter", "kspan_kernel_tls_calls_unbound_total", "TLS library calls whose connection could not be told (no socket syscall inside, session never seen on one): plaintext dropped.";
    kernel_tls_calls_dropped: "counter", "kspan_kernel_tls_calls_dropped_total", "TLS library calls not followed (per-thread call table full).";
    conns_tls: "counter", "kspan_connections_tls_total", "Connections that spoke TLS (their plaintext is read at the TLS library where it is hooked).";
    tls_libraries: "gauge", "kspan_tls_libraries_probed", "TLS library files (or executables with OpenSSL inside) carrying kspan's probes.";
    tls_probe_errors: "counter", "kspan_tls_probe_errors_total", "TLS library files whose probes could not be attached.";
    conns_db_server: "counter", "kspan_connections_db_server_total", "Data-store connections seen from the server's side and not decoded (--db-server-spans decodes them).";
    conns_evicted: "counter", "kspan_connections_evicted_total", "Connections forgotten while idle or at the table limit.";
    conns_close_lost: "counter", "kspan_connections_close_lost_total", "Connections whose close was lost with ring-buffer records, forgotten once the kernel no longer tracked their socket.";
    spans_finished: "counter", "kspan_spans_finished_total", "Spans completed by the linker.";
    spans_unsampled: "counter", "kspan_spans_unsampled_total", "Spans not exported because B3/traceparent said not sampled.";
    spans_abandoned: "counter", "kspan_spans_abandoned_total", "Exchanges given up (lost framing, or no response in time).";
    spans_overflow: "counter", "kspan_spans_overflow_total", "Requests not traced because too many spans were open.";
    spans_linger_cut: "counter", "kspan_spans_linger_cut_total", "Spans exported before their linger ended because lingering spans reached --linger-mb (a late event of a linked span may then be missed).";
    spans_queue_dropped: "counter", "kspan_spans_queue_dropped_total", "Spans dropped because the export queue was full.";
    spans_exported: "counter", "kspan_spans_exported_total", "Spans delivered to the exporters' destinations (each exporter counts its own: with OTLP and Zipkin both on, a span counts twice).";
    spans_export_rejected: "counter", "kspan_spans_export_rejected_total", "Spans the collector received and rejected (OTLP partial_success.rejected_spans).";
    spans_export_failed: "counter", "kspan_spans_export_failed_total", "Spans in export batches the destination rejected or did not receive.";
    bad_context: "counter", "kspan_trace_context_invalid_total", "Requests whose B3/traceparent headers were malformed (treated as absent).";
    spans_partial: "counter", "kspan_spans_partial_total", "Spans marked kspan.partial=true (HTTP/2 joined mid-connection or a header block not captured, or a data-store reply followed past skipped bytes).";
    h2_resyncs: "counter", "kspan_http2_resyncs_total", "HTTP/2 connection directions that resumed decoding at a frame start after lost events.";
    h2_headers_lost: "counter", "kspan_http2_headers_lost_total", "HTTP/2 request header blocks not captured in full (no span possible).";
    links_same_agent: "counter", "kspan_links_same_agent_total", "SERVER spans parented to a CLIENT span seen by this agent.";
    links_ambiguous: "counter", "kspan_links_ambiguous_total", "CLIENT spans given no parent because several open requests of their process could have made them (marked kspan.link=ambiguous).";
    metric_series_dropped: "counter", "kspan_metric_series_dropped_total", "Request observations left out of RED and service-graph metrics because a series cap was reached.";
    metric_series: "gauge", "kspan_metric_series", "RED and service-graph series currently exported.";
    k8s_pods: "gauge", "kspan_k8s_pods", "Pods of this node known from the Kubernetes API.";
    k8s_watch_errors: "counter", "kspan_k8s_watch_errors_total", "Errors watching this node's pods (retried with backoff).";
    open_conns: "gauge", "kspan_open_connections", "Connections currently tracked in userspace.";
    open_spans: "gauge", "kspan_open_spans", "Spans in flight or lingering before export.";
    queue_spans: "gauge", "kspan_export_queue_spans", "Finished spans waiting in the export queue.";
    queue_bytes: "gauge", "kspan_export_queue_bytes", "Bytes the export queue holds (encoded OTLP when kspan's encoder is the only exporter, else span records), bounded by --export-queue-mb.";
    ui_traces: "gauge", "kspan_ui_traces", "Traces the built-in viewer holds (bounded by --ui-max-traces).";
    ui_bytes: "gauge", "kspan_ui_bytes", "Bytes the viewer's traces hold (bounded by --ui-max-mb).";
    ui_traces_skipped: "counter", "kspan_ui_traces_skipped_total", "New traces the viewer did not keep because --ui-traces-per-sec was reached (they are exported all the same).";
    ui_traces_evicted: "counter", "kspan_ui_traces_evicted_total", "Traces the viewer let go, oldest first, to stay inside its bounds.";
    ui_spans_cut: "counter", "kspan_ui_spans_cut_total", "Spans the viewer did not keep because their trace already had 1,000 (they are exported all the same).";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.kernel_lost.store(3, Relaxed);
        let text = m.render();
        assert!(text.contains(
            "# TYPE kspan_kernel_lost_events_total counter\nkspan_kernel_lost_events_total 3\n"
        ));
        assert!(text.contains("# TYPE kspan_open_spans gauge\n"));
    }
}
