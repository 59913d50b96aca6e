//! What `cargo xtask vm` runs inside each guest of the kernel matrix (and on the host):
//! `kspan-vm-guest smoke` (the default) or `kspan-vm-guest bench`, with `KSPAN_BIN` naming
//! the agent and `KSPAN_GO_GATEWAY` the static Go gateway (`tests/go/gateway.go`). Both print
//! lines that xtask reads off the serial console.
mod bench;
mod smoke;

use std::time::Duration;

/// Cheapest first, as the agent tries them.
const HOOKS: [&str; 3] = ["fexit", "btf-tracepoint", "raw-tracepoint"];
/// Loading can take many seconds in an emulated guest (the verifier is slow there).
const LOAD_BOUND: Duration = Duration::from_secs(480);

fn main() {
    // Failures are reported by the code that catches them.
    std::panic::set_hook(Box::new(|_| {}));
    match std::env::args().nth(1).as_deref() {
        Some("bench") => bench::run(),
        _ => smoke::run(),
    }
}

/// How the agent's start-up line names each forced hook.
fn hook_words(hook: &str) -> &'static str {
    match hook {
        "fexit" => "fexit",
        "btf-tracepoint" => "tp_btf",
        _ => "raw tracepoint",
    }
}

/// What the agent's start-up line says between "probes attached (" and ")".
fn probes_line(log: &str) -> String {
    log.lines()
        .find_map(|l| l.split_once("probes attached (")?.1.split_once(')'))
        .map(|(what, _)| what.to_string())
        .unwrap_or_else(|| "start-up line missing".to_string())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn say(what: &str) {
    println!("kspan-vm: {what}");
}

fn panic_text(e: Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".to_string())
}
