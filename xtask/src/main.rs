//! `cargo xtask setup|build|run|test`: the project's entry points. Every command installs what
//! it needs first, so they work on a fresh machine.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::Parser;

mod bench;
mod vm;

const BPF_LINKER_VERSION: &str = "0.10.3";

#[derive(Parser)]
#[command(about = "kspan developer tasks")]
enum Cmd {
    /// Install the eBPF toolchain (nightly rust-src, bpf-linker) and the test peers.
    Setup,
    /// Build the agent with its kernel programs.
    Build {
        #[arg(long)]
        debug: bool,
    },
    /// Build and start the agent (through sudo when not root). Arguments go to kspan.
    Run {
        #[arg(long)]
        debug: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Unit tests, integration tests that load the real probes, then the kernel matrix (root).
    Test,
    /// The kernel matrix: Debian's 5.10, 6.1 and 6.12 kernels under qemu, and the host's, each
    /// running the smoke set with every hook it allows (needs root).
    Vm(vm::VmArgs),
    /// Agent overhead, with and without kspan side by side; writes BENCHMARKS.md (needs root).
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root()?;
    std::env::set_current_dir(&root)?;
    match Cmd::parse() {
        Cmd::Setup => {
            setup_toolchain()?;
            setup_test_peers(&[("wrk", "/usr/bin/wrk")])?;
            vm::tls_libraries().map(|_| ())
        }
        Cmd::Build { debug } => {
            setup_toolchain()?;
            build(debug).map(|_| ())
        }
        Cmd::Run { debug, args } => {
            setup_toolchain()?;
            let bin = build(debug)?;
            let mut cmd = if is_root() {
                Command::new(&bin)
            } else if which("sudo") {
                eprintln!("xtask: kspan needs root; running it with sudo");
                let mut c = Command::new("sudo");
                c.arg("-E").arg(&bin);
                c
            } else {
                Command::new(&bin)
            };
            let status = cmd.args(args).status().context("starting kspan")?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Test => {
            setup_toolchain()?;
            setup_test_peers(&[])?;
            test()
        }
        Cmd::Vm(args) => {
            setup_toolchain()?;
            setup_test_peers(&[])?;
            vm_matrix(&args)
        }
        Cmd::Bench(args) => {
            setup_toolchain()?;
            setup_test_peers(&[("wrk", "/usr/bin/wrk")])?;
            if !is_root() {
                bail!("the benchmark loads eBPF programs: run `cargo xtask bench` as root");
            }
            let bin = build(false)?;
            bench::run(args, &bin)
        }
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf())
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    cmd.output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

/// Nightly with rust-src (for `-Z build-std=core`) and bpf-linker, pinned to the release that
/// links with rustc's own LLVM (newer ones need a system LLVM this platform lacks).
fn setup_toolchain() -> anyhow::Result<()> {
    let toolchains =
        output(Command::new("rustup").args(["toolchain", "list"])).context("rustup is required")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        run(Command::new("cargo").args([
            "+nightly",
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ]))?;
    }
    Ok(())
}

/// Real peers the integration tests (nginx, curl, python3) and benchmarks (`extra`) drive.
fn setup_test_peers(extra: &[(&'static str, &str)]) -> anyhow::Result<()> {
    let peers: Vec<(&str, &str)> = [
        ("nginx-light", "/usr/sbin/nginx"),
        ("curl", "/usr/bin/curl"),
        ("nghttp2-server", "/usr/sbin/nghttpd"),
        ("nghttp2-client", "/usr/bin/nghttp"),
        ("prometheus", "/usr/bin/prometheus"),
        // Servers that hand sockets between processes (tests/tests/sockets.rs).
        ("apache2", "/usr/sbin/apache2"),
        ("busybox-static", "/bin/busybox"),
        // Data stores (tests/tests/datastores.rs), with redis-benchmark.
        ("redis-server", "/usr/bin/redis-server"),
        ("redis-tools", "/usr/bin/redis-benchmark"),
        ("postgresql", "/usr/bin/pg_ctlcluster"),
        ("mariadb-server", "/usr/sbin/mariadbd"),
        ("mariadb-client", "/usr/bin/mariadb-slap"),
        // TLS peers (tests/tests/https.rs): Node.js's own OpenSSL, and wget's GnuTLS, which
        // kspan does not hook.
        ("nodejs", "/usr/bin/node"),
        ("wget", "/usr/bin/wget"),
        // Certificates for the benchmark's HTTPS row.
        ("openssl", "/usr/bin/openssl"),
        // A Go gateway (tests/tests/linking.rs), built offline from the standard library.
        ("golang-go", "/usr/bin/go"),
        // A real browser for the built-in viewer (tests/tests/viewer.rs), headless, with a
        // font for its screenshots.
        ("chromium", "/usr/bin/chromium"),
        (
            "fonts-dejavu-core",
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        ),
    ]
    .iter()
    .chain(extra)
    .copied()
    .collect();
    if !which("python3") {
        bail!("python3 is required for the integration tests");
    }
    // The gRPC peers are python grpcio (a real HTTP/2 stack: grpc's C core); the data-store
    // clients are the common python drivers.
    for (module, package) in [
        ("grpc", "grpcio"),
        ("redis", "redis"),
        ("psycopg2", "psycopg2-binary"),
        ("psycopg", "psycopg[binary]"),
        ("pymysql", "PyMySQL"),
        ("mysql.connector", "mysql-connector-python"),
    ] {
        if !Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            run(Command::new("python3").args(["-m", "pip", "install", "--quiet", package]))?;
        }
    }
    apt_install(&peers)
}

/// Installs the Debian packages of `wanted` whose marker path is missing.
fn apt_install(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, path)| !Path::new(path).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() || !which("apt-get") {
        bail!("missing packages {missing:?}: install them as root with apt-get");
    }
    run(Command::new("apt-get").arg("update"))?;
    // The tests start their own servers; keep the packages' services from starting (unless
    // the machine already has a policy of its own).
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists() && std::fs::write(policy, "#!/bin/sh\nexit 101\n").is_ok();
    if ours {
        set_executable(policy);
    }
    let result = run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if ours {
        std::fs::remove_file(policy).ok();
    }
    result
}

fn set_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755));
}

fn build(debug: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "--package", "kspan", "--bin", "kspan"]);
    if !debug {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(PathBuf::from("target")
        .join(if debug { "debug" } else { "release" })
        .join("kspan")
        .canonicalize()?)
}

/// Seconds each fuzz target runs in `cargo xtask test`: long enough to catch shallow crashes
/// in every decoder of untrusted input on each change; longer campaigns are run by hand.
const FUZZ_SECONDS: u32 = 20;

/// Builds the cargo-fuzz targets (nightly, sanitizers; no eBPF needed) and runs each briefly.
fn fuzz() -> anyhow::Result<()> {
    if !which("cargo-fuzz") {
        run(Command::new("cargo").args(["+nightly", "install", "cargo-fuzz", "--locked"]))?;
    }
    for target in ["http1", "http2", "events", "redis", "postgres", "mysql"] {
        run(Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={FUZZ_SECONDS}"))
            .arg("-rss_limit_mb=4096")
            .current_dir("agent/fuzz")
            .env("AYA_BUILD_SKIP", "1"))?;
    }
    Ok(())
}

fn test() -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the integration tests load eBPF programs: run `cargo xtask test` as root (e.g. sudo -E)"
        );
    }
    // Unit tests of every crate (parsers, linker, exporters) run in parallel.
    // (kspan-ebpf only builds for the BPF target.)
    run(Command::new("cargo").args([
        "test",
        "--workspace",
        "--exclude",
        "kspan-tests",
        "--exclude",
        "kspan-ebpf",
    ]))?;
    fuzz()?;
    // The integration tests share one agent and start real servers: one at a time.
    let bin = build(true)?;
    let tls_libs = vm::tls_libraries()?;
    run(Command::new("cargo")
        .args(["test", "--package", "kspan-tests", "--", "--test-threads=1"])
        .env("KSPAN_BIN", bin)
        .env("KSPAN_TLS_LIBS", tls_libs))?;
    vm_matrix(&vm::VmArgs::default())
}

/// Builds the release agent and the guest program, then runs the kernel matrix.
fn vm_matrix(args: &vm::VmArgs) -> anyhow::Result<()> {
    if !is_root() {
        bail!("the kernel matrix loads eBPF programs on the host too: run it as root");
    }
    let kspan = build(false)?;
    run(Command::new("cargo").args([
        "build",
        "--package",
        "kspan-tests",
        "--bin",
        "kspan-vm-guest",
    ]))?;
    let guest = PathBuf::from("target/debug/kspan-vm-guest").canonicalize()?;
    vm::run(args, &kspan, &guest)
}
