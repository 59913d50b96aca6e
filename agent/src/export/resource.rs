//! What every exporter says about the process a span came from: OpenTelemetry resource
//! attributes, from the process cache's record.
use crate::{process::ProcessInfo, trace::span::AttrValue};

/// The resource of `p`'s spans. `command_line` adds `process.command_line` (off by default:
/// command lines often carry secrets).
pub fn attributes(
    p: &ProcessInfo,
    host: &str,
    command_line: bool,
) -> Vec<(&'static str, AttrValue)> {
    let s = |v: &str| AttrValue::Str(v.to_string());
    let mut a = vec![
        ("service.name", s(&p.service_name)),
        ("process.pid", AttrValue::Int(i64::from(p.pid))),
        ("host.name", s(host)),
        ("telemetry.distro.name", AttrValue::Static("kspan")),
        (
            "telemetry.distro.version",
            AttrValue::Static(env!("CARGO_PKG_VERSION")),
        ),
    ];
    if !p.exe.is_empty() {
        a.push(("process.executable.path", s(&p.exe)));
        a.push(("process.executable.name", s(p.exe_name())));
    }
    if command_line && !p.command_line.is_empty() {
        a.push(("process.command_line", s(&p.command_line)));
    }
    if let Some(id) = &p.cgroup.container_id {
        a.push(("container.id", s(id)));
    }
    if let Some(uid) = &p.cgroup.pod_uid {
        a.push(("k8s.pod.uid", s(uid)));
    }
    if let Some(pod) = &p.k8s {
        a.push(("k8s.pod.name", s(&pod.name)));
        a.push(("k8s.namespace.name", s(&pod.namespace)));
        if !pod.node.is_empty() {
            a.push(("k8s.node.name", s(&pod.node)));
        }
        if let Some(c) = pod.container_name(p.cgroup.container_id.as_deref()) {
            a.push(("k8s.container.name", s(c)));
        }
        for (key, name) in &pod.workloads {
            a.push((*key, s(name)));
        }
    }
    a
}

/// The instrumentation scope every kspan span carries.
pub const SCOPE_NAME: &str = "kspan";
pub const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");
