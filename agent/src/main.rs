//! `kspan`: the agent binary. The pipeline runs on this thread (it is CPU-bound and
//! synchronous); exporting and the metrics endpoint run on a small tokio runtime.
use std::{
    fs::File,
    io::{BufReader, BufWriter},
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use kspan::{
    capture::{Capture, CaptureOptions, LossWatch, event, replay, uprobes::TlsLink},
    config::{self, Args, Filter},
    endpoint,
    export::{self, Sinks, SpanQueue, otlp::OtlpSink, tree::TreePrinter, zipkin::ZipkinSink},
    k8s,
    metrics::Metrics,
    pipeline::{Pipeline, PipelineOptions},
    process::ProcessCache,
    tls::{Coverage, Uncovered, attach::Attacher},
    trace::{privacy::Privacy, span::SpanRecord},
    view::{self, Viewer},
};

// The pipeline allocates per message and span; glibc's allocator showed up as a third of the
// agent's CPU profile under load.
#[global_allocator]
static ALLOC: kspan::allocator::MiMalloc = kspan::allocator::MiMalloc;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = match config::file::load(std::env::args_os(), |k| std::env::var(k).ok()) {
        Ok(args) => args,
        Err(config::file::FileError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("kspan: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.print_config {
        println!("{args:#?}");
        return ExitCode::SUCCESS;
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kspan: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Kernel event times are CLOCK_MONOTONIC; spans need wall-clock time.
fn clock_offset() -> i128 {
    clock_ns(libc::CLOCK_REALTIME) as i128 - clock_ns(libc::CLOCK_MONOTONIC) as i128
}

/// Loading parses the kernel's BTF (tens of MiB, freed once the programs are loaded); the
/// allocator would otherwise keep those pages for the agent's whole life.
fn release_startup_memory() {
    // SAFETY: no arguments to get wrong; mimalloc is the global allocator.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

fn host_name() -> String {
    std::env::var("KSPAN_HOST_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn run(args: Args) -> anyhow::Result<()> {
    let exporters = config::exporters(&args, |k| std::env::var(k).ok())?;
    let sampler = config::sampler(&args, |k| std::env::var(k).ok())?;
    let (mut privacy, refused) = Privacy::new(
        &args.capture_header,
        &args.redact_header,
        args.keep_query_values,
    );
    privacy.opt_in_attributes = args.opt_in_attributes;
    privacy.keep_db_literals = args.keep_db_literals;
    for h in refused {
        eprintln!(
            "kspan: not capturing header {h:?}: it may carry credentials (--redact-header or built in)"
        );
    }
    let metrics = Arc::new(Metrics::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("kspan-io")
        .build()?;

    let mut source = match &args.replay {
        Some(path) => Source::Replay(replay::Player::new(BufReader::new(
            File::open(path).with_context(|| format!("opening recording {}", path.display()))?,
        ))?),
        None => {
            let mut cap = Capture::load(CaptureOptions {
                payload_cap: args.payload_cap,
                ring_buffer_mb: args.ring_buffer_mb,
                hook: args.hook,
                loops: args.kernel_loops,
            })?;
            let mut tls = Attacher::new(&args.proc_root);
            tls.start(&mut cap);
            release_startup_memory();
            Source::Kernel(cap, tls)
        }
    };
    let mut recorder = match &args.record {
        Some(path) => Some(replay::Recorder::new(BufWriter::new(
            File::create(path).with_context(|| format!("creating recording {}", path.display()))?,
        ))?),
        None => None,
    };

    let listener = rt
        .block_on(endpoint::bind(args.metrics_addr))
        .with_context(|| format!("binding the metrics endpoint {}", args.metrics_addr))?;
    let viewer = args.ui.then(|| {
        let limits = view::store::Limits {
            traces: usize::try_from(args.ui_max_traces).unwrap_or(usize::MAX),
            bytes: usize::try_from(args.ui_max_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX),
            per_sec: args.ui_traces_per_sec,
        };
        let resource = view::api::ResourceView {
            host: host_name(),
            command_line: args.export_command_line,
        };
        Arc::new(Viewer::new(limits, resource))
    });
    rt.spawn(endpoint::serve(listener, metrics.clone(), viewer.clone()));

    let sinks = {
        // Building the gRPC client needs the runtime's context.
        let _guard = rt.enter();
        let host = host_name();
        let otlp = exporters
            .otlp
            .as_ref()
            .map(|c| OtlpSink::new(c, host.clone(), args.export_command_line))
            .transpose()?;
        let zipkin = exporters
            .zipkin
            .as_ref()
            .map(|c| ZipkinSink::new(c, host, args.export_command_line))
            .transpose()?;
        let tree = exporters
            .console
            .then(|| TreePrinter::new(Duration::from_secs(1)));
        Sinks { otlp, zipkin, tree }
    };
    if let Some(c) = &exporters.otlp {
        log::info!("exporting spans to {} over {:?}", c.endpoint, c.protocol);
    }
    if let Some(z) = &exporters.zipkin {
        log::info!("exporting spans to {} as Zipkin v2 JSON", z.endpoint);
    }
    if exporters.otlp.is_none() && exporters.zipkin.is_none() && exporters.console {
        eprintln!("kspan: no OTLP endpoint configured; printing traces on stdout");
    }
    let (queue, rx) = SpanQueue::new(
        args.export_queue,
        args.export_queue_mb.saturating_mul(1 << 20),
        metrics.clone(),
        sinks.queue_encoder(),
    );
    let exporter = rt.spawn(export::run(rx, sinks, metrics.clone()));
    let mut outlets = Outlets { queue, viewer };

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        rt.spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        log::error!("cannot watch SIGTERM: {e}");
                        return;
                    }
                };
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            stop.store(true, Relaxed);
            // Shutdown flushes spans, but must never keep a node's agent from stopping: a
            // second signal, or a flush that overruns, ends the process regardless.
            tokio::select! {
                _ = term.recv() => eprintln!("kspan: second signal; exiting without flushing"),
                _ = tokio::signal::ctrl_c() => eprintln!("kspan: second signal; exiting without flushing"),
                _ = tokio::time::sleep(SHUTDOWN_LIMIT) => eprintln!("kspan: shutdown took over {SHUTDOWN_LIMIT:?}; exiting"),
            }
            std::process::exit(1);
        });
    }

    let pods = match config::kubernetes(&args, |k| std::env::var(k).ok()) {
        Some(api) => Some(start_pod_watch(&rt, &api, &args, &metrics)?),
        None => None,
    };
    let procs = ProcessCache::new(&args.proc_root);
    let procs = match pods {
        Some(p) => procs.with_pods(p),
        None => procs,
    };
    let mut pipeline = Pipeline::new(
        PipelineOptions {
            filter: Filter::from_args(&args),
            linger_ns: args.linger_ms * 1_000_000,
            max_linger_bytes: args.linger_mb.saturating_mul(1 << 20),
            max_open_spans: 100_000,
            max_conns: 65_536,
            clock_offset_ns: clock_offset(),
            privacy,
            sampler,
            db_server_spans: args.db_server_spans,
        },
        procs,
    );
    metrics.ready.store(true, Relaxed);
    if let Source::Kernel(cap, tls) = &source {
        let tls = match &cap.tls_unavailable {
            Some(e) => format!("TLS plaintext not read ({e})"),
            None => format!("TLS plaintext from {} library files", tls.attached()),
        };
        eprintln!(
            "kspan: probes attached ({}, {}); tracing HTTP/1.x, HTTP/2, gRPC, Redis, PostgreSQL and MySQL; {tls} ({}metrics on http://{}/metrics)",
            cap.hook.describe(),
            cap.loops.describe(),
            if args.ui {
                format!("traces and service map on http://{}/, ", args.metrics_addr)
            } else {
                String::new()
            },
            args.metrics_addr
        );
    }
    let deadline =
        (args.duration_secs > 0).then(|| Instant::now() + Duration::from_secs(args.duration_secs));
    let loop_result = run_loop(
        &mut source,
        &mut pipeline,
        recorder.as_mut(),
        &mut outlets,
        &metrics,
        &stop,
        deadline,
    );

    // Flush: every finished span leaves, then the exporter drains its queue.
    let mut out = Vec::new();
    outlets.hand_over(&mut pipeline, u64::MAX, &mut out);
    publish(&pipeline, &source, &outlets, &metrics);
    if let Some(r) = recorder.as_mut() {
        r.flush().context("writing the recording")?;
    }
    drop(outlets);
    rt.block_on(async {
        if tokio::time::timeout(Duration::from_secs(15), exporter)
            .await
            .is_err()
        {
            log::warn!("exporter did not finish within 15 s; remaining spans were dropped");
        }
    });
    // Dropping a runtime waits without limit for blocking tasks (HTTP clients use them);
    // shutdown must stay bounded even with a wedged exporter.
    rt.shutdown_timeout(Duration::from_secs(2));
    loop_result
}

/// Starts watching this node's pods and waits (bounded) for the first full list, so the first
/// spans already carry their pods' metadata.
fn start_pod_watch(
    rt: &tokio::runtime::Runtime,
    api: &k8s::ApiServer,
    args: &Args,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Arc<k8s::PodIndex>> {
    let node = args
        .node_name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or(k8s::K8sError::NoNodeName)?;
    let client = {
        let _guard = rt.enter();
        k8s::client(api)?
    };
    let index = Arc::new(k8s::PodIndex::default());
    rt.spawn(k8s::watch(client, node.clone(), index.clone()));
    {
        let (index, metrics) = (index.clone(), metrics.clone());
        rt.spawn(async move {
            loop {
                metrics.k8s_pods.store(index.len() as u64, Relaxed);
                metrics
                    .k8s_watch_errors
                    .store(index.watch_errors.load(Relaxed), Relaxed);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !index.synced.load(Relaxed) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if index.synced.load(Relaxed) {
        log::info!("{} pods on node {node}", index.len());
    } else {
        eprintln!(
            "kspan: the pods of node {node} could not be listed yet; spans lack k8s.* attributes until they are"
        );
    }
    Ok(index)
}

// One value per run; the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Source {
    Kernel(Capture, Attacher<TlsLink>),
    Replay(replay::Player<BufReader<File>>),
}

/// Longest a graceful shutdown may take.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(20);

/// Longest an event waits in the ring buffer when no backlog forces a wakeup. Not longer when
/// idle: the first events of a short-lived client must be read while its /proc entry (service
/// name, executable) still exists; 50 ms lost the identity of a gRPC client that made one call.
/// (2 ms was tried under load for shorter slices of work: no change in the served processes'
/// p99 at saturation, and more wakeups.)
const POLL_MS: i32 = 10;

/// How often TLS library files no process maps any more are unprobed.
const TLS_SWEEP: Duration = Duration::from_secs(60);

/// How long a connection must have been quiet before a missing kernel entry means its close
/// was lost (the entry leaves just before the close record is written).
const RECONCILE_QUIET_NS: u64 = 1_000_000_000;

/// Most records handled before the loop attends to timers again. Also what one tick's spans
/// are made of: at HTTP/2 rates (several spans per record) 8192 records made ticks of ~30k
/// spans, whose records and observations all existed at once.
const DRAIN_BUDGET: usize = 1024;

fn run_loop(
    source: &mut Source,
    pipeline: &mut Pipeline,
    mut recorder: Option<&mut replay::Recorder<BufWriter<File>>>,
    outlets: &mut Outlets,
    metrics: &Metrics,
    stop: &AtomicBool,
    deadline: Option<Instant>,
) -> anyhow::Result<()> {
    let mut out = Vec::new();
    let mut last_publish = Instant::now();
    let mut last_expire = Instant::now();
    let mut last_sweep = Instant::now();
    let mut last_reconcile = Instant::now();
    let mut losses = LossWatch::default();
    let mut record_err = None;
    loop {
        if stop.load(Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
        let now_ns = match source {
            Source::Kernel(cap, tls) => {
                let mut pfd = libc::pollfd {
                    fd: cap.ring_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // The kernel only wakes us for a backlog (Config::wakeup_bytes); this timeout is
                // what normally paces the loop, bounding how long an event waits.
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
                let drained = cap.drain(DRAIN_BUDGET, |bytes| {
                    if let Some(r) = recorder.as_deref_mut()
                        && let Err(e) = r.record(bytes)
                    {
                        record_err.get_or_insert(e);
                    }
                    match event::decode(bytes) {
                        Ok(ev) => pipeline.handle(ev),
                        Err(e) => {
                            metrics.decode_errors.fetch_add(1, Relaxed);
                            log::debug!("bad ring-buffer record: {e}");
                        }
                    }
                });
                for c in pipeline.to_ignore.drain(..) {
                    cap.ignore(c.sock, c.generation);
                }
                let now = Instant::now();
                for pid in pipeline.execs.drain(..) {
                    tls.exec(pid, now);
                }
                for pid in tls.due(cap, now) {
                    pipeline.set_tls_coverage(pid, Coverage::Hooked);
                }
                let mut seen = std::mem::take(&mut pipeline.tls_seen);
                seen.sort_unstable();
                seen.dedup();
                for tgid in seen.drain(..) {
                    pipeline.set_tls_coverage(tgid, tls.process(cap, tgid));
                }
                pipeline.tls_seen = seen;
                if last_sweep.elapsed() >= TLS_SWEEP {
                    tls.sweep(cap);
                    last_sweep = Instant::now();
                }
                let now_ns = clock_ns(libc::CLOCK_MONOTONIC);
                // Only with the ring buffer emptied: a close still waiting in it is not lost.
                if drained < DRAIN_BUDGET && last_reconcile.elapsed() >= Duration::from_secs(1) {
                    last_reconcile = Instant::now();
                    // The count `publish` read from the kernel at most a second ago.
                    if losses.due(metrics.kernel_lost.load(Relaxed), last_reconcile) {
                        let quiet_since = now_ns.saturating_sub(RECONCILE_QUIET_NS);
                        pipeline.reconcile(quiet_since, |id| cap.tracks(id));
                    }
                }
                now_ns
            }
            Source::Replay(player) => {
                let mut last_ts = 0;
                for _ in 0..DRAIN_BUDGET {
                    let Some(bytes) = player.next_record()? else {
                        outlets.hand_over(pipeline, u64::MAX, &mut out);
                        return Ok(());
                    };
                    match event::decode(bytes) {
                        Ok(ev) => {
                            last_ts = ev.ts_ns;
                            pipeline.handle(ev);
                        }
                        Err(_) => {
                            metrics.decode_errors.fetch_add(1, Relaxed);
                        }
                    }
                }
                pipeline.to_ignore.clear();
                last_ts
            }
        };
        if let Some(e) = record_err.take() {
            return Err(e).context("writing the recording");
        }
        outlets.hand_over(pipeline, now_ns, &mut out);
        if last_publish.elapsed() >= Duration::from_secs(1) {
            publish(pipeline, source, outlets, metrics);
            last_publish = Instant::now();
        }
        if last_expire.elapsed() >= Duration::from_secs(10) {
            pipeline.expire(now_ns);
            last_expire = Instant::now();
        }
    }
}

/// Spans handed to the queue at a time (its chunk size): the records of a burst never all
/// exist at once.
const TICK_SPANS: usize = 512;

/// Where finished spans go: the export queue, and the viewer when it is on.
struct Outlets {
    queue: SpanQueue,
    viewer: Option<Arc<Viewer>>,
}

impl Outlets {
    /// The pipeline's ready spans out, [`TICK_SPANS`] at a time.
    fn hand_over(&mut self, pipeline: &mut Pipeline, now_ns: u64, out: &mut Vec<SpanRecord>) {
        loop {
            let more = pipeline.tick_at_most(now_ns, out, TICK_SPANS);
            if let Some(v) = &self.viewer {
                v.offer(out);
            }
            self.queue.push_all(out);
            if !more {
                return;
            }
        }
    }
}

/// Copies the stages' counters into the shared metrics.
fn publish(pipeline: &Pipeline, source: &Source, outlets: &Outlets, m: &Metrics) {
    let store =
        |pairs: &[(&AtomicU64, u64)]| pairs.iter().for_each(|(cell, v)| cell.store(*v, Relaxed));
    let p = pipeline.stats;
    let t = pipeline.tracer_stats();
    let queued = outlets.queue.held();
    store(&[
        (&m.events_decoded, p.events),
        (&m.requests, p.requests),
        (&m.desyncs, p.desyncs),
        (&m.gaps, p.gaps),
        (&m.conns_filtered, p.conns_filtered),
        (&m.conns_unsupported, p.conns_unsupported),
        (&m.conns_db_server, p.conns_db_server),
        (&m.conns_tls, p.conns_tls),
        (&m.conns_evicted, p.conns_evicted),
        (&m.conns_close_lost, p.conns_close_lost),
        (&m.spans_finished, t.spans_finished),
        (&m.spans_unsampled, t.spans_unsampled),
        (&m.spans_abandoned, t.spans_abandoned),
        (&m.spans_overflow, t.spans_dropped_overflow),
        (&m.bad_context, t.bad_context),
        (&m.links_same_agent, t.links_same_agent),
        (&m.links_ambiguous, t.links_ambiguous),
        (&m.spans_partial, t.spans_partial),
        (&m.spans_linger_cut, t.spans_linger_cut),
        (&m.h2_headers_lost, p.h2_headers_lost),
        (&m.h2_resyncs, p.h2_resyncs),
        (&m.open_conns, pipeline.conns() as u64),
        (&m.open_spans, pipeline.open_spans() as u64),
        (&m.queue_spans, queued.0 as u64),
        (&m.queue_bytes, queued.1 as u64),
        (&m.metric_series_dropped, pipeline.red.dropped),
        (&m.metric_series, pipeline.red.series() as u64),
    ]);
    for why in Uncovered::ALL {
        m.tls_unsupported[why.index()].store(p.conns_tls_unsupported[why.index()], Relaxed);
    }
    if let Some(v) = &outlets.viewer {
        v.record_graph(pipeline.red.edges());
        let ui = v.stats();
        store(&[
            (&m.ui_traces, ui.traces as u64),
            (&m.ui_bytes, ui.bytes as u64),
            (&m.ui_traces_skipped, ui.traces_skipped),
            (&m.ui_traces_evicted, ui.traces_evicted),
            (&m.ui_spans_cut, ui.spans_cut),
        ]);
    }
    let mut red = String::new();
    pipeline.red.render(&mut red);
    *m.red.lock().unwrap_or_else(|e| e.into_inner()) = red;
    if let Source::Kernel(cap, tls) = source {
        store(&[
            (&m.tls_libraries, tls.attached() as u64),
            (&m.tls_probe_errors, tls.attach_errors),
        ]);
        match cap.stats() {
            Ok(k) => store(&[
                (&m.kernel_events, k.events),
                (&m.kernel_lost, k.lost),
                (&m.kernel_truncated, k.truncated),
                (&m.kernel_read_faults, k.read_faults),
                (&m.kernel_conns_tracked, k.conns_tracked),
                (&m.kernel_conns_not_http, k.conns_not_http),
                (&m.kernel_conn_insert_failed, k.conn_insert_failed),
                (&m.kernel_conns_discovered, k.conns_discovered),
                (&m.kernel_tls_unbound, k.tls_unbound),
                (&m.kernel_tls_calls_dropped, k.tls_calls_dropped),
                (&m.kernel_program_runs, k.program_runs),
                (&m.kernel_program_run_ns, k.program_run_ns),
            ]),
            Err(e) => log::warn!("reading kernel counters: {e}"),
        }
    }
}
