//! Kernel capture: loads the eBPF programs, attaches them and hands out raw ring-buffer records.
//! Everything after the ring buffer is pure and lives in other modules.
pub mod btf;
pub mod event;
pub mod replay;
pub mod uprobes;

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FExit, Program, ProgramType, RawTracePoint},
    sys::{BpfHelper, is_helper_supported},
};
use kspan_common::{Config, ConnInfo, MAX_PAYLOAD, SOCKET_SYSCALLS, proto, stat};

use self::event::ConnId;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kspan-ebpf"));
const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "kspan needs root (or CAP_BPF + CAP_PERFMON, or CAP_SYS_ADMIN) to load eBPF programs; run it with sudo or as a privileged DaemonSet"
    )]
    NotPrivileged,
    #[error(
        "this kspan binary was built without its eBPF programs (bpf-linker or the nightly toolchain was missing at build time); rebuild with `cargo xtask build`"
    )]
    NoObject,
    #[error("the kernel exposes no BTF at {BTF_PATH} (it needs CONFIG_DEBUG_INFO_BTF=y): {0}")]
    NoBtf(#[source] io::Error),
    #[error("the kernel's BTF could not be used: {0}")]
    Btf(#[from] btf::BtfError),
    #[error("the kernel refused kspan's eBPF programs (is BPF enabled and allowed here?): {0:#}")]
    // Not `#[source]`: aya's message already carries its causes and the verifier's log, and the
    // chain printed at exit would repeat them.
    Load(aya::EbpfError),
    #[error("could not attach the {0} hook: {1}")]
    Attach(&'static str, aya::programs::ProgramError),
    #[error(
        "kspan needs Linux {major}.{minor} or newer (the oldest kernel it is tested on); this kernel is {0}",
        major = MIN_KERNEL.0,
        minor = MIN_KERNEL.1
    )]
    KernelTooOld(String),
    #[error("the kernel's BTF could not be read for the tp_btf hook: {0}")]
    HookBtf(#[source] aya::BtfError),
    #[error("eBPF object is missing `{0}`")]
    Missing(String),
    #[error("eBPF map error: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("--payload-cap must be between 64 and {MAX_PAYLOAD} bytes, got {0}")]
    PayloadCap(u32),
    #[error("--ring-buffer-mb must be a power of two between 1 and 1024, got {0}")]
    RingSize(u32),
}

#[derive(Clone, Copy, Debug)]
pub struct CaptureOptions {
    pub payload_cap: u32,
    pub ring_buffer_mb: u32,
    pub hook: Hook,
    pub loops: Loops,
}

/// The oldest kernel the VM matrix (`cargo xtask vm`) tests. Older ones lack pieces kspan
/// needs (the BPF ring buffer is 5.8) or were never run.
pub const MIN_KERNEL: (u32, u32) = (5, 10);

/// Where the kernel programs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Hook {
    /// The cheapest the kernel allows: fexit, else tp_btf, else the raw tracepoint.
    Auto,
    /// fexit on each socket syscall: no program runs for any other syscall.
    Fexit,
    /// BTF-typed `sys_exit` tracepoint (`tp_btf`): runs on every syscall; registers are read
    /// with plain loads.
    BtfTracepoint,
    /// Raw `sys_exit` tracepoint: a helper call per register read; works without BTF-typed
    /// programs.
    RawTracepoint,
}

impl Hook {
    pub fn describe(self) -> &'static str {
        match self {
            Hook::Auto => "fexit, else tp_btf, else raw tracepoint",
            Hook::Fexit => "fexit on the socket syscalls",
            Hook::BtfTracepoint => "sys_exit tp_btf",
            Hook::RawTracepoint => "sys_exit raw tracepoint",
        }
    }
}

/// How the kernel programs loop over iovec segments and HTTP/2 frames: which build of them
/// is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Loops {
    /// `bpf-loop` where the kernel has the helper, else `bounded`.
    Auto,
    /// The `bpf_loop` helper (5.17+): 64 iovec segments, 8192 HTTP/2 walk steps per syscall.
    BpfLoop,
    /// Bounded loops for older verifiers: 8 iovec segments, 32 HTTP/2 walk steps per syscall.
    Bounded,
}

impl Loops {
    /// `Auto` resolved for the running kernel.
    fn resolve(self) -> Self {
        if self != Loops::Auto {
            return self;
        }
        // bpf_loop is a base helper: any program type tells.
        match is_helper_supported(ProgramType::TracePoint, BpfHelper::BPF_FUNC_loop) {
            Ok(false) => Loops::Bounded,
            _ => Loops::BpfLoop,
        }
    }

    /// The name of the build of program `base` that uses these loops.
    fn program(self, base: &str) -> String {
        match self {
            Loops::Bounded => format!("{base}_bounded"),
            Loops::Auto | Loops::BpfLoop => base.to_string(),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Loops::Auto => "bpf_loop, else bounded loops",
            Loops::BpfLoop => "bpf_loop",
            Loops::Bounded => "bounded loops",
        }
    }
}

/// Kernel-side counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub events: u64,
    pub lost: u64,
    pub truncated: u64,
    pub conns_tracked: u64,
    pub conns_not_http: u64,
    pub read_faults: u64,
    pub conn_insert_failed: u64,
    pub conns_discovered: u64,
    pub tls_unbound: u64,
    pub tls_calls_dropped: u64,
    /// Runs of the attached programs and their total time, from the kernel's own accounting:
    /// they only move while the sysctl `kernel.bpf_stats_enabled` is 1.
    pub program_runs: u64,
    pub program_run_ns: u64,
}

pub struct Capture {
    // Dropping `Ebpf` detaches the programs, so it lives as long as the capture.
    ebpf: Ebpf,
    ring: RingBuf<MapData>,
    stats: PerCpuArray<MapData, u64>,
    conns: BpfHashMap<MapData, u64, ConnInfo>,
    /// The hook and loops in use (`Auto` resolved).
    pub hook: Hook,
    pub loops: Loops,
    /// Why the TLS probes did not load, when they did not.
    pub tls_unavailable: Option<String>,
}

/// The kernel function behind syscall `name`.
fn syscall_function(name: &str) -> String {
    #[cfg(target_arch = "aarch64")]
    const PREFIX: &str = "__arm64_sys_";
    #[cfg(not(target_arch = "aarch64"))]
    const PREFIX: &str = "__x64_sys_";
    format!("{PREFIX}{name}")
}

fn program<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &str,
    hook: &'static str,
) -> Result<&'a mut P, CaptureError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(CaptureError::Missing(name.to_string()))?
        .try_into()
        .map_err(|e| CaptureError::Attach(hook, e))
}

const FEXIT: &str = "fexit";

/// The syscalls of [`SOCKET_SYSCALLS`] this architecture has.
fn syscalls() -> impl Iterator<Item = &'static &'static str> {
    // arm64 has no dup2 (libc calls dup3).
    SOCKET_SYSCALLS
        .iter()
        .filter(|s| cfg!(not(target_arch = "aarch64")) || **s != "dup2")
}

/// One fexit program per socket syscall (a partial set would miss events; see [`attach`]).
fn attach_fexit(ebpf: &mut Ebpf, btf: &aya::Btf, loops: Loops) -> Result<Hook, CaptureError> {
    for syscall in syscalls() {
        let prog: &mut FExit = program(ebpf, &loops.program(&format!("fexit_{syscall}")), FEXIT)?;
        prog.load(&syscall_function(syscall), btf)
            .and_then(|()| prog.attach().map(drop))
            .map_err(|e| CaptureError::Attach(FEXIT, e))?;
    }
    attach_destroy_btf(ebpf, btf)?;
    Ok(Hook::Fexit)
}

/// Detaches and unloads every program: a hook that attached only in part must leave nothing
/// behind before the next is tried (two hooks at once would report each syscall twice).
fn unload_all(ebpf: &mut Ebpf) {
    for (_, prog) in ebpf.programs_mut() {
        // Programs never loaded answer with an error, which is fine.
        let _ = match prog {
            Program::FExit(p) => p.unload(),
            Program::BtfTracePoint(p) => p.unload(),
            Program::RawTracePoint(p) => p.unload(),
            _ => Ok(()),
        };
    }
}

const DESTROY: &str = "tcp_destroy_sock";

const EXEC: &str = "sched_process_exec";

/// The socket-destruction hook that ends connections and the exec hook, BTF-typed (with
/// fexit and tp_btf).
fn attach_destroy_btf(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<(), CaptureError> {
    for (name, hook) in [("kspan_sock_destroy", DESTROY), ("kspan_exec", EXEC)] {
        let prog: &mut BtfTracePoint = program(ebpf, name, hook)?;
        prog.load(hook, btf)
            .and_then(|()| prog.attach().map(drop))
            .map_err(|e| CaptureError::Attach(hook, e))?;
    }
    Ok(())
}

fn attach_btf(ebpf: &mut Ebpf, btf: &aya::Btf, loops: Loops) -> Result<Hook, CaptureError> {
    const HOOK: &str = "tp_btf sys_exit";
    let prog: &mut BtfTracePoint = program(ebpf, &loops.program("kspan_sys_exit"), HOOK)?;
    prog.load("sys_exit", btf)
        .and_then(|()| prog.attach().map(drop))
        .map_err(|e| CaptureError::Attach(HOOK, e))?;
    attach_destroy_btf(ebpf, btf)?;
    Ok(Hook::BtfTracepoint)
}

fn attach_raw(ebpf: &mut Ebpf, loops: Loops) -> Result<Hook, CaptureError> {
    const HOOK: &str = "raw tracepoint sys_exit";
    let prog: &mut RawTracePoint = program(ebpf, &loops.program("kspan_sys_exit_raw"), HOOK)?;
    prog.load()
        .and_then(|()| prog.attach("sys_exit").map(drop))
        .map_err(|e| CaptureError::Attach(HOOK, e))?;
    for (name, hook) in [
        ("kspan_sock_destroy_raw", DESTROY),
        ("kspan_exec_raw", EXEC),
    ] {
        let prog: &mut RawTracePoint = program(ebpf, name, hook)?;
        prog.load()
            .and_then(|()| prog.attach(hook).map(drop))
            .map_err(|e| CaptureError::Attach(hook, e))?;
    }
    Ok(Hook::RawTracepoint)
}

/// Attaches `hook`; `Auto` takes the cheapest one the kernel accepts.
fn attach(ebpf: &mut Ebpf, raw_btf: &[u8], hook: Hook, loops: Loops) -> Result<Hook, CaptureError> {
    let btf =
        aya::Btf::parse(raw_btf, aya::Endianness::default()).map_err(CaptureError::HookBtf)?;
    let attached = match hook {
        Hook::Fexit => attach_fexit(ebpf, &btf, loops),
        Hook::BtfTracepoint => attach_btf(ebpf, &btf, loops),
        Hook::RawTracepoint => attach_raw(ebpf, loops),
        Hook::Auto => attach_fexit(ebpf, &btf, loops)
            .or_else(|e| {
                log::info!("fexit unavailable ({e}); hooking sys_exit");
                unload_all(ebpf);
                attach_btf(ebpf, &btf, loops)
            })
            .or_else(|e| {
                log::warn!("tp_btf unavailable ({e}); using the raw tracepoint");
                unload_all(ebpf);
                attach_raw(ebpf, loops)
            }),
    };
    if attached.is_err() {
        unload_all(ebpf);
    }
    attached
}

/// The running kernel's release, when it is older than [`MIN_KERNEL`].
fn kernel_too_old() -> Option<String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let release = release.trim();
    older_than_minimum(release).then(|| release.to_string())
}

/// Whether a release string (`5.4.0-150-generic`) names a kernel below [`MIN_KERNEL`]; an
/// unreadable one is given the benefit of the doubt (the verifier then has the last word).
fn older_than_minimum(release: &str) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) < MIN_KERNEL,
        _ => false,
    }
}

/// True when the effective capabilities allow loading tracing programs.
fn privileged() -> bool {
    let Ok(status) = procfs::process::Process::myself().and_then(|p| p.status()) else {
        return false;
    };
    const SYS_ADMIN: u64 = 1 << 21;
    const PERFMON: u64 = 1 << 38;
    const BPF: u64 = 1 << 39;
    let caps = status.capeff;
    caps & SYS_ADMIN != 0 || (caps & PERFMON != 0 && caps & BPF != 0)
}

impl Capture {
    pub fn load(opts: CaptureOptions) -> Result<Self, CaptureError> {
        if !(64..=MAX_PAYLOAD as u32).contains(&opts.payload_cap) {
            return Err(CaptureError::PayloadCap(opts.payload_cap));
        }
        if !opts.ring_buffer_mb.is_power_of_two() || opts.ring_buffer_mb > 1024 {
            return Err(CaptureError::RingSize(opts.ring_buffer_mb));
        }
        if !privileged() {
            return Err(CaptureError::NotPrivileged);
        }
        if OBJECT.is_empty() {
            return Err(CaptureError::NoObject);
        }
        if let Some(release) = kernel_too_old() {
            return Err(CaptureError::KernelTooOld(release));
        }
        let raw_btf = std::fs::read(BTF_PATH).map_err(CaptureError::NoBtf)?;
        let offsets = btf::kernel_offsets(&btf::Btf::parse(&raw_btf)?)?;
        let config = Config {
            self_tgid: std::process::id(),
            payload_cap: opts.payload_cap,
            // An eighth of the ring: far from overflow, yet rare enough to keep wakeups cheap.
            wakeup_bytes: opts.ring_buffer_mb * 1024 * 1024 / 8,
            _pad: 0,
        };

        // Older kernels charge BPF memory to RLIMIT_MEMLOCK; raising it is harmless elsewhere.
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: plain syscall with a valid pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };

        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &config, true)
            .override_global("OFFSETS", &offsets, true)
            .map_max_entries("EVENTS", opts.ring_buffer_mb * 1024 * 1024)
            .load(OBJECT)
            .map_err(CaptureError::Load)?;
        let loops = opts.loops.resolve();
        let hook = attach(&mut ebpf, &raw_btf, opts.hook, loops)?;
        let tls_unavailable = uprobes::load(&mut ebpf, loops).err();
        for (name, prog) in ebpf.programs() {
            if let Some(n) = prog
                .info()
                .ok()
                .and_then(|i| i.verified_instruction_count())
            {
                log::debug!("{name}: the verifier went through {n} instructions");
            }
        }
        if let Some(e) = &tls_unavailable {
            log::warn!("TLS plaintext will not be read: {e}");
        }

        let ring = RingBuf::try_from(
            ebpf.take_map("EVENTS")
                .ok_or(CaptureError::Missing("EVENTS".into()))?,
        )?;
        let stats = PerCpuArray::try_from(
            ebpf.take_map("STATS")
                .ok_or(CaptureError::Missing("STATS".into()))?,
        )?;
        let conns = BpfHashMap::try_from(
            ebpf.take_map("CONNS")
                .ok_or(CaptureError::Missing("CONNS".into()))?,
        )?;
        Ok(Self {
            ebpf,
            ring,
            stats,
            conns,
            hook,
            loops,
            tls_unavailable,
        })
    }

    /// Readable when records are waiting.
    pub fn ring_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }

    /// Hands up to `budget` waiting records to `f`; returns how many there were.
    pub fn drain(&mut self, budget: usize, mut f: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        while n < budget {
            let Some(item) = self.ring.next() else { break };
            f(&item);
            n += 1;
        }
        n
    }

    pub fn stats(&self) -> Result<KernelStats, CaptureError> {
        let sum = |i: u32| -> Result<u64, CaptureError> { Ok(self.stats.get(&i, 0)?.iter().sum()) };
        // Programs never loaded (the other builds, the hooks not chosen) have no info.
        let infos: Vec<_> = self
            .ebpf
            .programs()
            .filter_map(|(_, p)| p.info().ok())
            .collect();
        Ok(KernelStats {
            program_runs: infos.iter().map(|i| i.run_count()).sum(),
            program_run_ns: infos.iter().map(|i| i.run_time().as_nanos() as u64).sum(),
            events: sum(stat::EVENTS)?,
            lost: sum(stat::LOST_RINGBUF)?,
            truncated: sum(stat::TRUNCATED)?,
            conns_tracked: sum(stat::CONNS_TRACKED)?,
            conns_not_http: sum(stat::CONNS_NOT_HTTP)?,
            read_faults: sum(stat::READ_FAULTS)?,
            conn_insert_failed: sum(stat::CONN_INSERT_FAILED)?,
            conns_discovered: sum(stat::CONNS_DISCOVERED)?,
            tls_unbound: sum(stat::TLS_UNBOUND)?,
            tls_calls_dropped: sum(stat::TLS_CALLS_DROPPED)?,
        })
    }

    /// Whether the kernel still tracks connection `id`'s socket. Errors other than "gone"
    /// answer yes: a connection is only forgotten on the kernel's word.
    pub fn tracks(&self, id: ConnId) -> bool {
        match self.conns.get(&id.sock, 0) {
            Ok(info) => info.generation == id.generation,
            Err(aya::maps::MapError::KeyNotFound) => false,
            Err(_) => true,
        }
    }

    /// Tells the kernel to stop copying payload for a connection the filters exclude.
    pub fn ignore(&mut self, sock: u64, generation: u64) {
        if let Ok(mut info) = self.conns.get(&sock, 0) {
            // The address may already belong to a newer socket that the filters never judged.
            if info.generation == generation {
                info.proto = proto::IGNORED;
                let _ = self.conns.insert(sock, info, 0);
            }
        }
    }
}

/// Watches the kernel's count of lost records: a lost close leaves a connection (and its open
/// spans) in userspace until the idle timeout, so for a while after each loss the connections
/// are checked against the kernel's table ([`Capture::tracks`]).
#[derive(Debug, Default)]
pub struct LossWatch {
    seen: u64,
    until: Option<Instant>,
}

impl LossWatch {
    /// How long after the last loss connections are checked: longer than any record waits in
    /// the ring buffer, so a connection whose close was lost has gone quiet by then.
    pub const WINDOW: Duration = Duration::from_secs(10);

    /// Given the lost-record total now, whether to check the connections.
    pub fn due(&mut self, lost: u64, now: Instant) -> bool {
        if lost > self.seen {
            self.seen = lost;
            self.until = Some(now + Self::WINDOW);
        }
        self.until.is_some_and(|u| now < u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_checked_for_a_while_after_each_loss() {
        let mut w = LossWatch::default();
        let t0 = Instant::now();
        assert!(!w.due(0, t0), "no loss, no check");
        assert!(w.due(3, t0));
        assert!(w.due(3, t0 + LossWatch::WINDOW / 2));
        assert!(!w.due(3, t0 + LossWatch::WINDOW));
        assert!(
            w.due(4, t0 + LossWatch::WINDOW * 2),
            "a new loss opens a new window"
        );
    }

    #[test]
    fn kernels_below_the_tested_minimum_are_named() {
        for old in ["5.4.0-150-generic", "4.18.0-553.el8_10.x86_64", "5.9.16"] {
            assert!(older_than_minimum(old), "{old}");
        }
        for ok in [
            "5.10.0-32-amd64",
            "6.1.0-50-amd64",
            "6.12.117+deb13-amd64",
            "10.0",
        ] {
            assert!(!older_than_minimum(ok), "{ok}");
        }
        assert!(!older_than_minimum("garbage"));
    }

    #[test]
    fn each_loop_build_has_its_own_programs() {
        assert_eq!(Loops::BpfLoop.program("fexit_read"), "fexit_read");
        assert_eq!(Loops::Bounded.program("fexit_read"), "fexit_read_bounded");
        assert_eq!(syscall_function("sendfile64"), "__x64_sys_sendfile64");
    }
}
