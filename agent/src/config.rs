//! Command line, environment and configuration file. Precedence, highest first: flags,
//! environment variables (`KSPAN_*`, the standard `OTEL_EXPORTER_OTLP_*`), the file
//! (`--config`), defaults.
pub mod file;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

use crate::{capture::event::Endpoints, process::ProcessInfo, trace::sampler::Sampler};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "kspan",
    version,
    about = "Zero-code HTTP tracing with eBPF; spans linked through B3, exported over OTLP"
)]
pub struct Args {
    /// TOML configuration file; keys are the long flag names (e.g. `port = [8080]`). Flags and
    /// environment variables win over it.
    #[arg(long, env = "KSPAN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (after flags, environment and file) and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Trace only these process ids (repeat or comma-separate). Default: every process.
    #[arg(long, value_delimiter = ',', env = "KSPAN_PID")]
    pub pid: Vec<u32>,
    /// Trace only connections with this local or peer port.
    #[arg(long, value_delimiter = ',', env = "KSPAN_PORT")]
    pub port: Vec<u16>,
    /// Trace only processes whose executable name or full path matches this glob (`*`, `?`).
    #[arg(long, value_delimiter = ',', env = "KSPAN_EXE")]
    pub exe: Vec<String>,
    /// Trace only processes in containers whose id starts with this (12 or more hex digits).
    #[arg(
        long = "container-id",
        value_delimiter = ',',
        env = "KSPAN_CONTAINER_ID"
    )]
    pub container_ids: Vec<String>,
    /// Trace only processes whose cgroup path matches this glob, e.g. `/kubepods*`.
    #[arg(long, value_delimiter = ',', env = "KSPAN_CGROUP")]
    pub cgroup: Vec<String>,

    /// OTLP traces endpoint, e.g. http://collector:4317 (gRPC) or http://collector:4318/v1/traces.
    /// Default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, then OTEL_EXPORTER_OTLP_ENDPOINT; with none,
    /// traces are printed as trees on stdout.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf`. Default: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    /// OTEL_EXPORTER_OTLP_PROTOCOL, else http/protobuf as the OTLP spec says.
    #[arg(long)]
    pub otlp_protocol: Option<String>,
    /// PEM file of the CA that signed the collector's certificate (for https endpoints), in
    /// addition to the system's. Default: OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE, then
    /// OTEL_EXPORTER_OTLP_CERTIFICATE.
    #[arg(long)]
    pub otlp_certificate: Option<PathBuf>,
    /// Extra export header `key=value` (repeatable); added to OTEL_EXPORTER_OTLP_HEADERS.
    #[arg(long = "otlp-header")]
    pub otlp_headers: Vec<String>,
    /// Which spans are exported: always_on, always_off, traceidratio, parentbased_always_on
    /// (default), parentbased_always_off, parentbased_traceidratio. Default:
    /// OTEL_TRACES_SAMPLER. RED metrics count every request regardless.
    #[arg(long)]
    pub traces_sampler: Option<String>,
    /// The sampler's ratio (0..=1) for the traceidratio samplers. Default: OTEL_TRACES_SAMPLER_ARG.
    #[arg(long)]
    pub traces_sampler_arg: Option<String>,
    /// Also print trace trees on stdout when exporting over OTLP.
    #[arg(long)]
    pub stdout: bool,
    /// Where spans go: `otlp`, `zipkin`, `console` (trace trees on stdout) or `none`;
    /// comma-separate for several. Default: OTEL_TRACES_EXPORTER, else `otlp` when an OTLP
    /// endpoint is configured and `console` when none is.
    #[arg(long, value_delimiter = ',')]
    pub traces_exporter: Vec<String>,
    /// How long one OTLP export attempt may take, in milliseconds. Default:
    /// OTEL_EXPORTER_OTLP_TRACES_TIMEOUT, OTEL_EXPORTER_OTLP_TIMEOUT, else 10000.
    #[arg(long)]
    pub otlp_timeout: Option<String>,
    /// `gzip` or `none`. Default: OTEL_EXPORTER_OTLP_TRACES_COMPRESSION,
    /// OTEL_EXPORTER_OTLP_COMPRESSION, else none.
    #[arg(long)]
    pub otlp_compression: Option<String>,
    /// Encode OTLP through the OpenTelemetry SDK's exporter instead of kspan's own encoder (the
    /// reference the encoder is tested against; slower, for comparisons).
    #[arg(long, hide = true)]
    pub otlp_sdk_encoder: bool,
    /// Zipkin v2 JSON endpoint for `--traces-exporter=zipkin`. Default:
    /// OTEL_EXPORTER_ZIPKIN_ENDPOINT, else http://localhost:9411/api/v2/spans.
    #[arg(long)]
    pub zipkin_endpoint: Option<String>,

    /// Export this request header as `http.request.header.<name>` (repeat or comma-separate).
    /// Authorization, Proxy-Authorization, Cookie, Set-Cookie and `--redact-header` names are
    /// never captured.
    #[arg(long, value_delimiter = ',', env = "KSPAN_CAPTURE_HEADER")]
    pub capture_header: Vec<String>,
    /// Never capture this header, even if `--capture-header` names it.
    #[arg(long, value_delimiter = ',', env = "KSPAN_REDACT_HEADER")]
    pub redact_header: Vec<String>,
    /// Export URL query values as they are (by default each value is replaced by REDACTED).
    #[arg(long, env = "KSPAN_KEEP_QUERY_VALUES")]
    pub keep_query_values: bool,
    /// Export each process's command line as `process.command_line` (off by default: command
    /// lines often carry passwords and tokens).
    #[arg(long, env = "KSPAN_EXPORT_COMMAND_LINE")]
    pub export_command_line: bool,
    /// Also export the semantic conventions' opt-in span attributes: client.port,
    /// network.local.address/port, network.type, network.transport, network.protocol.name,
    /// http.request/response.body.size, and user_agent.original on CLIENT spans.
    #[arg(long, env = "KSPAN_OPT_IN_ATTRIBUTES")]
    pub opt_in_attributes: bool,
    /// Export data-store query text with its literal values (by default each string and number
    /// is replaced by `?`). Credentials (Redis AUTH, HELLO) are never exported.
    #[arg(long, env = "KSPAN_KEEP_DB_LITERALS")]
    pub keep_db_literals: bool,
    /// Also decode data-store servers' side of their connections (SERVER spans for
    /// redis-server, postgres, mysqld). Off by default: the clients' spans are the ones wanted,
    /// and the servers' would double the cost.
    #[arg(long, env = "KSPAN_DB_SERVER_SPANS")]
    pub db_server_spans: bool,

    /// Kubernetes pod metadata (`k8s.*` resource attributes, service names): `auto` turns it on
    /// in a cluster (KUBERNETES_SERVICE_HOST set) or when --kube-api-url is given.
    #[arg(long, value_enum, default_value_t = KubernetesMode::Auto, env = "KSPAN_KUBERNETES")]
    pub kubernetes: KubernetesMode,
    /// API server to read pods from instead of the in-cluster service account, e.g.
    /// `kubectl proxy`'s http://127.0.0.1:8001.
    #[arg(long, env = "KSPAN_KUBE_API_URL")]
    pub kube_api_url: Option<String>,
    /// This node's name: only its pods are watched (the downward API's spec.nodeName).
    #[arg(long, env = "KSPAN_NODE_NAME")]
    pub node_name: Option<String>,

    /// Where the host's procfs is mounted (a DaemonSet mounts it at /host/proc).
    #[arg(long, default_value = "/proc", env = "KSPAN_PROC_ROOT")]
    pub proc_root: PathBuf,
    /// Address of the /metrics and /readyz endpoint.
    #[arg(long, default_value = "127.0.0.1:9464", env = "KSPAN_METRICS_ADDR")]
    pub metrics_addr: SocketAddr,
    /// Serve the built-in trace viewer and its JSON API on the metrics address (`--ui=false`
    /// turns both off).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "KSPAN_UI")]
    pub ui: bool,
    /// Traces the viewer keeps in memory at most (the oldest leave first).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub ui_max_traces: u64,
    /// Memory the viewer's traces may hold, in MiB.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub ui_max_mb: u64,
    /// New traces the viewer keeps per second at most; the others are exported all the same
    /// (counted in kspan_ui_traces_skipped_total).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub ui_traces_per_sec: u32,
    /// Payload bytes copied per syscall (64..=8192). Byte counts stay exact beyond it.
    #[arg(long, default_value_t = kspan_common::DEFAULT_PAYLOAD_CAP)]
    pub payload_cap: u32,
    /// Kernel ring buffer size in MiB (power of two).
    #[arg(long, default_value_t = 16, env = "KSPAN_RING_BUFFER_MB")]
    pub ring_buffer_mb: u32,
    /// Where the kernel programs run: the socket syscalls' exits (fexit) or sys_exit.
    #[arg(long, value_enum, default_value_t = crate::capture::Hook::Auto, env = "KSPAN_HOOK")]
    pub hook: crate::capture::Hook,
    /// Which build of the kernel programs to load: with the bpf_loop helper (5.17+) or with
    /// bounded loops (fewer iovec segments and HTTP/2 frames followed per syscall).
    #[arg(long, value_enum, default_value_t = crate::capture::Loops::Auto, env = "KSPAN_KERNEL_LOOPS")]
    pub kernel_loops: crate::capture::Loops,
    /// Spans buffered for export; beyond it spans are dropped and counted.
    #[arg(long, default_value_t = 65_536)]
    pub export_queue: usize,
    /// Bytes of spans buffered for export, in MiB; beyond it spans are dropped and counted.
    /// Room for the exporter's pauses at line rate (a third of a second of HTTP/2 spans at
    /// 200k spans/s on two busy cores); 16 dropped half of them.
    #[arg(long, default_value_t = 64)]
    pub export_queue_mb: usize,
    /// How long finished spans wait for late events of linked spans before export (ms).
    #[arg(long, default_value_t = 300)]
    pub linger_ms: u64,
    /// Bytes finished spans may hold while they linger, in MiB; beyond it the oldest leave
    /// early (counted in kspan_spans_linger_cut_total).
    #[arg(long, default_value_t = 16)]
    pub linger_mb: usize,

    /// Write every kernel event to this file (for replay).
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Read events from a recording instead of the kernel, then exit.
    #[arg(long, conflicts_with = "record")]
    pub replay: Option<PathBuf>,
    /// Stop after this many seconds (0: run until SIGINT/SIGTERM).
    #[arg(long, default_value_t = 0)]
    pub duration_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KubernetesMode {
    Auto,
    On,
    Off,
}

/// Which API server to read pod metadata from, if any.
pub fn kubernetes(
    args: &Args,
    env: impl Fn(&str) -> Option<String>,
) -> Option<crate::k8s::ApiServer> {
    use crate::k8s::ApiServer;
    let in_cluster = env("KUBERNETES_SERVICE_HOST").is_some_and(|h| !h.is_empty());
    match (args.kubernetes, &args.kube_api_url) {
        (KubernetesMode::Off, _) => None,
        (_, Some(url)) => Some(ApiServer::Url(url.clone())),
        (KubernetesMode::On, None) => Some(ApiServer::InCluster),
        (KubernetesMode::Auto, None) => in_cluster.then_some(ApiServer::InCluster),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpConfig {
    pub endpoint: String,
    pub protocol: Protocol,
    pub headers: Vec<(String, String)>,
    /// Extra trusted CA (PEM) for https endpoints.
    pub certificate: Option<PathBuf>,
    /// Per export attempt.
    pub timeout: Duration,
    pub compression: Compression,
    /// Encode through opentelemetry-otlp (the reference) instead of kspan's encoder.
    pub sdk_encoder: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("unsupported OTLP protocol {0:?}: use grpc or http/protobuf")]
    Protocol(String),
    #[error("bad OTLP header {0:?}: expected key=value")]
    Header(String),
    #[error("bad OTLP endpoint {0:?}: expected an http:// or https:// URL")]
    Endpoint(String),
    #[error("bad OTLP timeout {0:?}: expected milliseconds")]
    Timeout(String),
    #[error("unsupported OTLP compression {0:?}: use gzip or none")]
    Compression(String),
    #[error("unknown traces exporter {0:?}: use otlp, zipkin, console or none")]
    Exporter(String),
    #[error("bad Zipkin endpoint {0:?}: expected an http:// or https:// URL")]
    ZipkinEndpoint(String),
    #[error("{0}")]
    Sampler(#[from] crate::trace::sampler::SamplerError),
}

/// Flags that standard OpenTelemetry variables also set, with those variables. `otlp` and
/// `sampler` read the variables only when the flag is absent, so a configuration file (which
/// becomes flags) must not claim these settings while a variable is set, or it would beat the
/// environment. Every variable those functions read for a flag belongs here.
pub const OTEL_VARIABLES: &[(&str, &[&str])] = &[
    (
        "otlp-endpoint",
        &[
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ],
    ),
    (
        "otlp-protocol",
        &[
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ],
    ),
    (
        "otlp-certificate",
        &[
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
        ],
    ),
    (
        "otlp-timeout",
        &[
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ],
    ),
    (
        "otlp-compression",
        &[
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ],
    ),
    ("traces-exporter", &["OTEL_TRACES_EXPORTER"]),
    ("zipkin-endpoint", &["OTEL_EXPORTER_ZIPKIN_ENDPOINT"]),
    ("traces-sampler", &["OTEL_TRACES_SAMPLER"]),
    ("traces-sampler-arg", &["OTEL_TRACES_SAMPLER_ARG"]),
];

/// Resolves the OTLP exporter settings; `None` when no endpoint is configured.
pub fn otlp(
    args: &Args,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<OtlpConfig>, ConfigError> {
    otlp_or_default(args, env, false)
}

/// The OTLP settings; with `required` (OTLP chosen explicitly) and no endpoint configured, the
/// specification's default endpoint on localhost.
fn otlp_or_default(
    args: &Args,
    env: impl Fn(&str) -> Option<String>,
    required: bool,
) -> Result<Option<OtlpConfig>, ConfigError> {
    let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let protocol = match args
        .otlp_protocol
        .clone()
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .as_deref()
        .map(str::trim)
    {
        None | Some("http/protobuf") => Protocol::HttpProtobuf,
        Some("grpc") => Protocol::Grpc,
        Some(other) => return Err(ConfigError::Protocol(other.to_string())),
    };
    // A signal-specific endpoint is used as is; the generic one gets /v1/traces for HTTP.
    let endpoint = match (
        &args.otlp_endpoint,
        env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
        env("OTEL_EXPORTER_OTLP_ENDPOINT"),
    ) {
        (Some(e), _, _) => e.clone(),
        (None, Some(e), _) => e,
        (None, None, Some(base)) => match protocol {
            Protocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
            Protocol::Grpc => base,
        },
        (None, None, None) if !required => return Ok(None),
        (None, None, None) => match protocol {
            Protocol::HttpProtobuf => "http://localhost:4318/v1/traces".to_string(),
            Protocol::Grpc => "http://localhost:4317".to_string(),
        },
    };
    let endpoint = endpoint.trim().to_string();
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(ConfigError::Endpoint(endpoint));
    }
    let mut headers = Vec::new();
    let from_env = env("OTEL_EXPORTER_OTLP_TRACES_HEADERS")
        .or_else(|| env("OTEL_EXPORTER_OTLP_HEADERS"))
        .unwrap_or_default();
    for kv in from_env
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .chain(args.otlp_headers.iter().map(String::as_str))
    {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| ConfigError::Header(kv.to_string()))?;
        let k = k.trim();
        if k.is_empty() {
            return Err(ConfigError::Header(kv.to_string()));
        }
        headers.push((k.to_string(), percent_decode(v.trim())));
    }
    let certificate = args.otlp_certificate.clone().or_else(|| {
        env("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE")
            .or_else(|| env("OTEL_EXPORTER_OTLP_CERTIFICATE"))
            .map(PathBuf::from)
    });
    let timeout = args
        .otlp_timeout
        .clone()
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT"))
        .map(|t| millis(&t).ok_or(ConfigError::Timeout(t)))
        .transpose()?
        .unwrap_or(DEFAULT_EXPORT_TIMEOUT);
    let compression = match args
        .otlp_compression
        .clone()
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_COMPRESSION"))
        .as_deref()
        .map(str::trim)
    {
        None | Some("none") => Compression::None,
        Some("gzip") => Compression::Gzip,
        Some(other) => return Err(ConfigError::Compression(other.to_string())),
    };
    Ok(Some(OtlpConfig {
        endpoint,
        protocol,
        headers,
        certificate,
        timeout,
        compression,
        sdk_encoder: args.otlp_sdk_encoder,
    }))
}

/// The exporter specification's default per-export timeout.
pub const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// A timeout in milliseconds, as the OTEL_*_TIMEOUT variables give it.
fn millis(v: &str) -> Option<Duration> {
    v.trim()
        .parse::<u64>()
        .ok()
        .filter(|&ms| ms > 0)
        .map(Duration::from_millis)
}

/// Where spans go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exporters {
    pub otlp: Option<OtlpConfig>,
    pub zipkin: Option<ZipkinConfig>,
    /// Trace trees on stdout.
    pub console: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZipkinConfig {
    pub endpoint: String,
    pub timeout: Duration,
}

/// The exporters `--traces-exporter` / OTEL_TRACES_EXPORTER name, with their settings.
pub fn exporters(
    args: &Args,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Exporters, ConfigError> {
    let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let named: Vec<String> = if args.traces_exporter.is_empty() {
        env("OTEL_TRACES_EXPORTER")
            .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
            .unwrap_or_default()
    } else {
        args.traces_exporter
            .iter()
            .map(|s| s.trim().to_string())
            .collect()
    };
    let mut out = Exporters {
        otlp: None,
        zipkin: None,
        console: args.stdout,
    };
    if named.is_empty() {
        out.otlp = otlp_or_default(args, env, false)?;
        out.console |= out.otlp.is_none();
        return Ok(out);
    }
    for name in named.iter().filter(|n| !n.is_empty()) {
        match name.as_str() {
            "otlp" => out.otlp = otlp_or_default(args, env, true)?,
            "console" => out.console = true,
            "zipkin" => {
                let endpoint = args
                    .zipkin_endpoint
                    .clone()
                    .or_else(|| env("OTEL_EXPORTER_ZIPKIN_ENDPOINT"))
                    .unwrap_or_else(|| "http://localhost:9411/api/v2/spans".to_string());
                if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                    return Err(ConfigError::ZipkinEndpoint(endpoint));
                }
                let timeout = match env("OTEL_EXPORTER_ZIPKIN_TIMEOUT") {
                    Some(t) => millis(&t).ok_or(ConfigError::Timeout(t))?,
                    None => DEFAULT_EXPORT_TIMEOUT,
                };
                out.zipkin = Some(ZipkinConfig { endpoint, timeout });
            }
            "none" => {}
            other => return Err(ConfigError::Exporter(other.to_string())),
        }
    }
    Ok(out)
}

/// The sampler from the flags, else the standard variables. A bad flag is an error; bad
/// variables are reported and ignored, as the OpenTelemetry specification requires of them.
pub fn sampler(args: &Args, env: impl Fn(&str) -> Option<String>) -> Result<Sampler, ConfigError> {
    if let Some(name) = &args.traces_sampler {
        return Sampler::parse(name, args.traces_sampler_arg.as_deref())
            .map_err(ConfigError::Sampler);
    }
    let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let Some(name) = env("OTEL_TRACES_SAMPLER") else {
        return Ok(Sampler::default());
    };
    let arg = args
        .traces_sampler_arg
        .clone()
        .or_else(|| env("OTEL_TRACES_SAMPLER_ARG"));
    Ok(Sampler::parse(&name, arg.as_deref()).unwrap_or_else(|e| {
        eprintln!("kspan: ignoring OTEL_TRACES_SAMPLER: {e}");
        Sampler::default()
    }))
}

/// OTEL_EXPORTER_OTLP_HEADERS values are URL-encoded (W3C baggage format).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let digit = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (digit(b[i + 1]), digit(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which connections are traced. Each empty list admits everything; the lists that are set
/// must all admit a connection.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub pids: Vec<u32>,
    pub ports: Vec<u16>,
    /// Globs over the executable's name or full path.
    pub exes: Vec<String>,
    /// Container id prefixes.
    pub container_ids: Vec<String>,
    /// Globs over the cgroup path.
    pub cgroups: Vec<String>,
}

impl Filter {
    pub fn from_args(a: &Args) -> Self {
        Self {
            pids: a.pid.clone(),
            ports: a.port.clone(),
            exes: a.exe.clone(),
            container_ids: a
                .container_ids
                .iter()
                .map(|c| c.to_ascii_lowercase())
                .collect(),
            cgroups: a.cgroup.clone(),
        }
    }

    pub fn admits(&self, p: &ProcessInfo, e: Option<&Endpoints>) -> bool {
        let pid_ok = self.pids.is_empty() || self.pids.contains(&p.pid);
        let port_ok = self.ports.is_empty()
            || e.is_some_and(|e| {
                self.ports.contains(&e.local.port()) || self.ports.contains(&e.peer.port())
            });
        let exe_ok = self.exes.is_empty()
            || self
                .exes
                .iter()
                .any(|g| glob(g, &p.exe) || glob(g, p.exe_name()));
        let container_ok = self.container_ids.is_empty()
            || p.cgroup.container_id.as_deref().is_some_and(|id| {
                self.container_ids
                    .iter()
                    .any(|c| id.starts_with(c.as_str()))
            });
        let cgroup_ok =
            self.cgroups.is_empty() || self.cgroups.iter().any(|g| glob(g, &p.cgroup.path));
        pid_ok && port_ok && exe_ok && container_ok && cgroup_ok
    }
}

/// Shell-style match: `*` any run of characters (also `/`), `?` one character.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // Iterative matcher with one backtrack point: linear for patterns without nested stars.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("kspan").chain(extra.iter().copied())).unwrap()
    }

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn no_endpoint_means_stdout() {
        assert_eq!(otlp(&args(&[]), env(&[])).unwrap(), None);
    }

    #[test]
    fn standard_variables() {
        let c = otlp(
            &args(&[]),
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%20b, tenant=t1"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(
            c.headers,
            vec![
                ("api-key".into(), "a b".into()),
                ("tenant".into(), "t1".into())
            ]
        );
        assert_eq!(percent_decode("%zz%é%4"), "%zz%é%4");

        let c = otlp(
            &args(&[]),
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (c.endpoint.as_str(), c.protocol),
            ("http://traces:4317", Protocol::Grpc)
        );
    }

    #[test]
    fn flags_win_and_bad_values_are_errors() {
        let a = args(&[
            "--otlp-endpoint",
            "http://x:1",
            "--otlp-protocol",
            "grpc",
            "--otlp-header",
            "k=v",
        ]);
        let c = otlp(&a, env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]))
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.endpoint.as_str(), c.protocol),
            ("http://x:1", Protocol::Grpc)
        );
        assert_eq!(c.headers, vec![("k".into(), "v".into())]);
        assert!(matches!(
            otlp(&args(&["--otlp-endpoint", "x:1"]), env(&[])),
            Err(ConfigError::Endpoint(_))
        ));
        assert!(matches!(
            otlp(
                &args(&[
                    "--otlp-endpoint",
                    "http://x",
                    "--otlp-protocol",
                    "http/json"
                ]),
                env(&[])
            ),
            Err(ConfigError::Protocol(_))
        ));
        assert!(matches!(
            otlp(
                &args(&["--otlp-endpoint", "http://x", "--otlp-header", "novalue"]),
                env(&[])
            ),
            Err(ConfigError::Header(_))
        ));
    }

    #[test]
    fn exporters_from_flags_or_variables() {
        let none = exporters(&args(&[]), env(&[])).unwrap();
        assert_eq!((none.otlp, none.zipkin, none.console), (None, None, true));
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ];
        let e = exporters(&args(&[]), env(&vars)).unwrap();
        let otlp = e.otlp.unwrap();
        assert_eq!(
            (otlp.compression, otlp.timeout, e.console),
            (Compression::Gzip, Duration::from_millis(2500), false)
        );
        // Chosen explicitly with no endpoint: the specification's default.
        let e = exporters(&args(&["--traces-exporter", "otlp,console"]), env(&[])).unwrap();
        assert_eq!(
            e.otlp.map(|o| (o.endpoint, o.timeout)),
            Some((
                "http://localhost:4318/v1/traces".to_string(),
                DEFAULT_EXPORT_TIMEOUT
            ))
        );
        assert!(e.console);
        let e = exporters(
            &args(&[]),
            env(&[
                ("OTEL_TRACES_EXPORTER", "zipkin"),
                (
                    "OTEL_EXPORTER_ZIPKIN_ENDPOINT",
                    "http://z:9411/api/v2/spans",
                ),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (e.otlp, e.zipkin.map(|z| z.endpoint), e.console),
            (None, Some("http://z:9411/api/v2/spans".to_string()), false)
        );
        let e = exporters(&args(&["--traces-exporter", "none"]), env(&vars)).unwrap();
        assert_eq!((e.otlp, e.zipkin, e.console), (None, None, false));
        for (a, v, bad) in [
            (
                vec!["--traces-exporter", "jaeger"],
                vec![],
                "unknown traces exporter",
            ),
            (
                vec!["--otlp-compression", "zstd"],
                vars.to_vec(),
                "compression",
            ),
            (
                vec![],
                vec![("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"), vars[0]],
                "timeout",
            ),
            (
                vec!["--traces-exporter", "zipkin", "--zipkin-endpoint", "z:9411"],
                vec![],
                "Zipkin endpoint",
            ),
        ] {
            let err = exporters(&args(&a), env(&v)).unwrap_err().to_string();
            assert!(err.contains(bad), "{a:?}: {err}");
        }
    }

    #[test]
    fn sampler_from_flags_or_variables() {
        use crate::trace::sampler::Root;
        let vars = env(&[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
        ]);
        assert_eq!(
            sampler(&args(&[]), &vars).unwrap(),
            Sampler::ParentBased(Root::TraceIdRatio(0.1))
        );
        assert_eq!(
            sampler(&args(&["--traces-sampler", "always_off"]), &vars).unwrap(),
            Sampler::AlwaysOff,
            "the flag wins"
        );
        assert!(matches!(
            sampler(&args(&["--traces-sampler", "sometimes"]), env(&[])),
            Err(ConfigError::Sampler(_))
        ));
        assert_eq!(
            sampler(&args(&[]), env(&[("OTEL_TRACES_SAMPLER", "sometimes")])).unwrap(),
            Sampler::default(),
            "a bad variable is ignored"
        );
        assert_eq!(sampler(&args(&[]), env(&[])).unwrap(), Sampler::default());
    }

    #[test]
    fn filters() {
        let p = ProcessInfo {
            pid: 10,
            comm: String::new(),
            exe: "/usr/sbin/nginx".into(),
            command_line: String::new(),
            service_name: "nginx".into(),
            cgroup: Default::default(),
            k8s: None,
            runtime: Default::default(),
        };
        let e = Endpoints {
            local: "127.0.0.1:80".parse().unwrap(),
            peer: "127.0.0.1:5000".parse().unwrap(),
            netns: 1,
        };
        assert!(Filter::default().admits(&p, Some(&e)));
        assert!(
            Filter {
                exes: vec!["nginx".into()],
                ..Default::default()
            }
            .admits(&p, Some(&e))
        );
        assert!(
            Filter {
                exes: vec!["/usr/sbin/nginx".into()],
                ..Default::default()
            }
            .admits(&p, Some(&e))
        );
        assert!(
            !Filter {
                exes: vec!["python3".into()],
                ..Default::default()
            }
            .admits(&p, Some(&e))
        );
        assert!(
            Filter {
                ports: vec![5000],
                ..Default::default()
            }
            .admits(&p, Some(&e))
        );
        assert!(
            !Filter {
                ports: vec![81],
                ..Default::default()
            }
            .admits(&p, Some(&e))
        );
        assert!(
            !Filter {
                pids: vec![11],
                ..Default::default()
            }
            .admits(&p, Some(&e))
        );
        assert!(
            !Filter {
                ports: vec![80],
                ..Default::default()
            }
            .admits(&p, None)
        );
        assert!(
            Filter {
                exes: vec!["ngin?".into(), "python*".into()],
                ..Default::default()
            }
            .admits(&p, Some(&e))
        );
        assert!(
            Filter {
                exes: vec!["/usr/*/nginx".into()],
                ..Default::default()
            }
            .admits(&p, Some(&e))
        );
        let mut in_pod = p.clone();
        in_pod.cgroup = crate::process::cgroup::parse_text(&format!(
            "0::/kubepods/burstable/pod0f8e2b9a-1c3d-4e5f-8a7b-6c5d4e3f2a1b/{}\n",
            "ab12".repeat(16)
        ));
        let by_container = |prefix: &str| Filter {
            container_ids: vec![prefix.into()],
            ..Default::default()
        };
        assert!(by_container("ab12ab12ab12").admits(&in_pod, Some(&e)));
        assert!(!by_container("ffff").admits(&in_pod, Some(&e)));
        assert!(
            !by_container("ab12").admits(&p, Some(&e)),
            "not in a container"
        );
        let by_cgroup = |g: &str| Filter {
            cgroups: vec![g.into()],
            ..Default::default()
        };
        assert!(by_cgroup("/kubepods/*").admits(&in_pod, Some(&e)));
        assert!(!by_cgroup("/system.slice/*").admits(&in_pod, Some(&e)));
    }

    #[test]
    fn globs() {
        for (pat, text, want) in [
            ("*", "", true),
            ("*", "anything/at/all", true),
            ("py*n", "python", true),
            ("py*n", "pythons", false),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("*a*b*c*", "xxaxxbxxcxx", true),
            ("*a*b*c*", "xxaxxcxxbxx", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("", "", true),
            ("", "x", false),
        ] {
            assert_eq!(glob(pat, text), want, "{pat:?} {text:?}");
        }
    }
}
