//! `cargo xtask vm`: the kernel matrix. Debian's own kernels boot under qemu (TCG: KVM hangs at
//! early boot on nested hosts) with a small initramfs holding busybox, the release agent, the
//! guest program (`tests/src/bin/kspan-vm-guest/`) and its peers (nginx, curl, nghttp2, wrk,
//! redis, a static Go gateway) with the libraries they link. Its smoke set runs inside each
//! guest, then on the host kernel; `--bench` runs its benchmark in each guest instead and
//! writes a table per kernel into BENCHMARKS.md. Kernels are fetched once into `target/vm/`.
use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// One kernel of the matrix: the default `linux-image-amd64` of a Debian release.
struct Kernel {
    name: &'static str,
    suite: &'static str,
    /// What the agent's start-up line must name when it chooses by itself: the cheapest hook
    /// the kernel allows.
    auto: &'static str,
}

const MATRIX: [Kernel; 3] = [
    // 5.10's BTF types some syscall functions' `pt_regs` as a forward declaration, which its
    // verifier refuses as an fexit argument; it has no bpf_loop either.
    Kernel {
        name: "5.10",
        suite: "bullseye",
        auto: "sys_exit tp_btf, bounded loops",
    },
    Kernel {
        name: "6.1",
        suite: "bookworm",
        auto: "fexit on the socket syscalls, bpf_loop",
    },
    Kernel {
        name: "6.12",
        suite: "trixie",
        auto: "fexit on the socket syscalls, bpf_loop",
    },
];

/// A guest that has not powered off by then has hung.
const GUEST_BOUND: Duration = Duration::from_secs(30 * 60);
const VM_DIR: &str = "target/vm";
/// Executables the smoke set runs in the guest, at the paths it expects them.
const PEERS: [&str; 7] = [
    "/usr/sbin/nginx",
    "/usr/bin/curl",
    "/usr/bin/nghttp",
    "/usr/sbin/nghttpd",
    "/usr/bin/wrk",
    "/usr/bin/redis-server",
    "/usr/bin/redis-benchmark",
];
/// Where `--bench` puts its tables in BENCHMARKS.md (inside the hand-written notes, which
/// `cargo xtask bench` keeps).
const BENCH_BEGIN: &str = "<!-- kernel matrix bench -->";
const BENCH_END: &str = "<!-- /kernel matrix bench -->";

#[derive(clap::Args, Default)]
pub struct VmArgs {
    /// Kernels to boot (default: the whole matrix: 5.10, 6.1, 6.12).
    #[arg(long = "kernel")]
    kernels: Vec<String>,
    /// Leave out the run on the host's own kernel.
    #[arg(long)]
    no_host: bool,
    /// Run the benchmark in each guest instead of the smoke set (BENCHMARKS.md gets a table
    /// per kernel).
    #[arg(long)]
    bench: bool,
}

/// What one kernel's run showed.
/// Boots of one kernel when it panics before the guest program starts.
const BOOT_ATTEMPTS: u32 = 3;

struct Outcome {
    kernel: String,
    chose: String,
    passed: usize,
    failed: usize,
    seconds: u64,
    problem: Option<String>,
    /// `--bench`: the guest's table rows.
    bench: Vec<String>,
    /// The kernel panicked before the guest program started.
    panicked_at_boot: bool,
}

pub fn run(args: &VmArgs, kspan: &Path, guest: &Path) -> anyhow::Result<()> {
    let kernels: Vec<&Kernel> = if args.kernels.is_empty() {
        MATRIX.iter().collect()
    } else {
        args.kernels
            .iter()
            .map(|k| {
                MATRIX
                    .iter()
                    .find(|m| m.name == k)
                    .with_context(|| format!("no kernel {k} in the matrix (5.10, 6.1, 6.12)"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    crate::apt_install(&[
        ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
        ("busybox-static", "/usr/share/doc/busybox-static"),
        ("wrk", "/usr/bin/wrk"),
        ("golang-go", "/usr/bin/go"),
    ])?;
    std::fs::create_dir_all(VM_DIR)?;
    // apt takes relative paths as relative to its own root, not to the working directory.
    let dir = PathBuf::from(VM_DIR).canonicalize()?;
    let initramfs = build_initramfs(&dir, kspan, guest)?;
    let mut outcomes = Vec::new();
    for k in &kernels {
        let vmlinuz = fetch_kernel(&dir, k)?;
        let mut outcome = boot(k, &vmlinuz, &initramfs, &dir, args.bench)?;
        for attempt in 2..=BOOT_ATTEMPTS {
            if !outcome.panicked_at_boot {
                break;
            }
            // Seen once in a while under TCG: an int3 Oops while the kernel patches its own
            // text, long before init. Nothing of kspan ran; another boot tells.
            eprintln!(
                "xtask: Debian {} panicked at boot, before kspan ran (console-{}-panicked.log); boot {attempt} of {BOOT_ATTEMPTS}",
                k.name, k.name
            );
            let console = dir.join(format!("console-{}.log", k.name));
            std::fs::rename(
                &console,
                dir.join(format!("console-{}-panicked.log", k.name)),
            )?;
            outcome = boot(k, &vmlinuz, &initramfs, &dir, args.bench)?;
        }
        outcomes.push(outcome);
    }
    if args.bench {
        return write_bench(&outcomes);
    }
    if !args.no_host {
        outcomes.push(on_host(kspan, guest, &dir.join("go-gateway"))?);
    }
    report(&outcomes)
}

/// Puts each kernel's table between the bench markers of BENCHMARKS.md.
fn write_bench(outcomes: &[Outcome]) -> anyhow::Result<()> {
    let mut tables = format!(
        "{BENCH_BEGIN}\n### Kernel matrix (`cargo xtask vm --bench`: in each guest under qemu TCG, \
         wrk -t1 -c8 for 4 s against nginx `return 200`, medians of 3 A/B rounds)\n"
    );
    for o in outcomes {
        tables.push_str(&format!("\n#### {}\n\n", o.kernel));
        for row in &o.bench {
            tables.push_str(row);
            tables.push('\n');
        }
    }
    tables.push_str(BENCH_END);
    std::fs::write(PathBuf::from(VM_DIR).join("bench.md"), &tables)?;
    let doc = std::fs::read_to_string("BENCHMARKS.md").unwrap_or_default();
    let doc = match (doc.find(BENCH_BEGIN), doc.find(BENCH_END)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{tables}{}", &doc[..b], &doc[e + BENCH_END.len()..])
        }
        _ => format!("{}\n{tables}\n", doc.trim_end()),
    };
    std::fs::write("BENCHMARKS.md", doc)?;
    eprintln!("{tables}");
    let empty: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.bench.len() < 3)
        .map(|o| o.kernel.as_str())
        .collect();
    if !empty.is_empty() {
        bail!("no benchmark rows from {empty:?}");
    }
    Ok(())
}

fn report(outcomes: &[Outcome]) -> anyhow::Result<()> {
    eprintln!("\nkernel matrix:");
    eprintln!(
        "{:<28} {:<44} {:>6} {:>6} {:>6}",
        "kernel", "hook chosen by auto", "passed", "failed", "secs"
    );
    for o in outcomes {
        eprintln!(
            "{:<28} {:<44} {:>6} {:>6} {:>6}{}",
            o.kernel,
            o.chose,
            o.passed,
            o.failed,
            o.seconds,
            o.problem
                .as_ref()
                .map(|p| format!("  <- {p}"))
                .unwrap_or_default()
        );
    }
    let bad: Vec<&str> = outcomes
        .iter()
        .filter(|o| o.problem.is_some())
        .map(|o| o.kernel.as_str())
        .collect();
    if !bad.is_empty() {
        bail!("the kernel matrix failed on {bad:?}");
    }
    Ok(())
}

/// Debian's archive for every suite of the matrix, through apt with a private configuration
/// (the host's own sources and state stay untouched).
fn apt(dir: &Path, tool: &str) -> Command {
    let root = dir.join("apt");
    let mut cmd = Command::new(tool);
    for (k, v) in [
        ("Dir::Etc::SourceList", root.join("sources.list")),
        ("Dir::Etc::SourceParts", PathBuf::from("/dev/null")),
        ("Dir::State::Lists", root.join("lists")),
        ("Dir::Cache", root.join("cache")),
    ] {
        cmd.arg("-o").arg(format!("{k}={}", v.display()));
    }
    cmd.args(["-o", "APT::Sandbox::User=root", "-q"]);
    cmd
}

fn apt_update(dir: &Path) -> anyhow::Result<()> {
    let root = dir.join("apt");
    std::fs::create_dir_all(root.join("lists/partial"))?;
    std::fs::create_dir_all(root.join("cache/archives/partial"))?;
    let sources: String = MATRIX
        .iter()
        .map(|k| format!("deb http://deb.debian.org/debian {} main\n", k.suite))
        .collect();
    std::fs::write(root.join("sources.list"), sources)?;
    crate::run(apt(dir, "apt-get").arg("update"))
}

/// Other distributions' OpenSSL builds, unpacked once under `target/vm/tls-libs/<package>`,
/// for the TLS probe tests: 1.1.1 (bullseye), and 3.5 (trixie, whose `SSL_write_ex` goes
/// through `SSL_write_ex2`) with the C library it needs, run through that library's loader.
pub fn tls_libraries() -> anyhow::Result<PathBuf> {
    const PACKAGES: [(&str, &str); 3] = [
        ("libssl1.1", "bullseye"),
        ("libssl3t64", "trixie"),
        ("libc6", "trixie"),
    ];
    std::fs::create_dir_all(VM_DIR)?;
    let dir = PathBuf::from(VM_DIR).canonicalize()?;
    let out = dir.join("tls-libs");
    for (package, suite) in PACKAGES {
        let unpacked = out.join(package);
        if unpacked.exists() {
            continue;
        }
        let work = out.join(format!("{package}.download"));
        let deb = download(&dir, &format!("{package}/{suite}"), &work)?;
        crate::run(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(work.join("root")),
        )?;
        std::fs::rename(work.join("root"), &unpacked)?;
        std::fs::remove_dir_all(&work)?;
    }
    Ok(out)
}

/// Downloads package `spec` (`name` or `name/suite`) into `work`; the `.deb`'s path.
fn download(dir: &Path, spec: &str, work: &Path) -> anyhow::Result<PathBuf> {
    if !dir.join("apt/lists").exists() {
        apt_update(dir)?;
    }
    std::fs::create_dir_all(work)?;
    crate::run(
        apt(dir, "apt-get")
            .args(["download", spec])
            .current_dir(work),
    )?;
    std::fs::read_dir(work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")
}

/// The kernel image of `k`, downloaded and unpacked once.
fn fetch_kernel(dir: &Path, k: &Kernel) -> anyhow::Result<PathBuf> {
    let kdir = dir.join(format!("kernel-{}", k.name));
    let vmlinuz = kdir.join("vmlinuz");
    if vmlinuz.exists() {
        return Ok(vmlinuz);
    }
    if !dir.join("apt/lists").exists() {
        apt_update(dir)?;
    }
    // The suite's default kernel: the package its `linux-image-amd64` depends on.
    let meta = crate::output(apt(dir, "apt-cache").args([
        "show",
        "--no-all-versions",
        &format!("linux-image-amd64/{}", k.suite),
    ]))
    .context("apt-cache show linux-image-amd64")?;
    let package = meta
        .lines()
        .find_map(|l| l.strip_prefix("Depends: "))
        .and_then(|d| d.split([' ', ',']).next())
        .with_context(|| format!("no kernel package behind linux-image-amd64/{}", k.suite))?
        .to_string();
    let work = kdir.join("download");
    let deb = download(dir, &package, &work)?;
    crate::run(Command::new("sh").arg("-c").arg(format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' --wildcards './boot/vmlinuz-*'",
        deb.display(),
        work.display()
    )))?;
    let image = std::fs::read_dir(work.join("boot"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .next()
        .context("the kernel package holds no vmlinuz")?;
    std::fs::rename(&image, &vmlinuz)?;
    std::fs::write(kdir.join("package"), &package)?;
    std::fs::remove_dir_all(&work)?;
    Ok(vmlinuz)
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
ip link set lo up
hostname kspan-vm
mode=smoke
grep -q kspan.bench /proc/cmdline && mode=bench
KSPAN_BIN=/kspan KSPAN_GO_GATEWAY=/go-gateway /kspan-vm-guest $mode
echo "kspan-vm: $mode exit $?"
poweroff -f
"#;

/// The guest's root: busybox, the init script, the agent and the smoke set, the peers and
/// every library they link.
fn build_initramfs(dir: &Path, kspan: &Path, guest: &Path) -> anyhow::Result<PathBuf> {
    let root = dir.join("initramfs");
    if root.exists() {
        std::fs::remove_dir_all(&root)?;
    }
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "var/log/nginx"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("static busybox")?;
    std::fs::write(root.join("init"), INIT)?;
    crate::set_executable(&root.join("init"));
    // nginx's workers switch to nobody/nogroup.
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )?;
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    std::fs::write(root.join("etc/hosts"), "127.0.0.1 localhost kspan-vm\n")?;
    add_elf(&root, kspan, Path::new("/kspan"))?;
    add_elf(&root, guest, Path::new("/kspan-vm-guest"))?;
    for peer in PEERS {
        add_elf(&root, Path::new(peer), Path::new(peer))?;
    }
    add_elf(&root, &go_gateway(dir)?, Path::new("/go-gateway"))?;
    let cpio = dir.join("initramfs.cpio");
    crate::run(Command::new("sh").current_dir(&root).arg("-c").arg(format!(
        "find . | /bin/busybox cpio -o -H newc > '{}'",
        cpio.display()
    )))?;
    Ok(cpio)
}

/// Copies an executable (without debug info) and the shared libraries it links.
/// The linking tests' Go gateway (`tests/go/gateway.go`), static, for the goroutine check.
fn go_gateway(dir: &Path) -> anyhow::Result<PathBuf> {
    let out = std::path::absolute(dir.join("go-gateway"))?;
    crate::run(
        Command::new("go")
            .args(["build", "-o"])
            .arg(&out)
            .arg("tests/go/gateway.go")
            .env("GO111MODULE", "off")
            .env("CGO_ENABLED", "0")
            .env("GOFLAGS", "")
            .env("GOCACHE", std::path::absolute(dir.join("gocache"))?),
    )?;
    Ok(out)
}

fn add_elf(root: &Path, from: &Path, to: &Path) -> anyhow::Result<()> {
    let dest = root.join(to.strip_prefix("/")?);
    std::fs::create_dir_all(dest.parent().context("no parent")?)?;
    if crate::run(
        Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&dest)
            .arg(from),
    )
    .is_err()
    {
        std::fs::copy(from, &dest).with_context(|| format!("copying {}", from.display()))?;
    }
    let libs = crate::output(Command::new("ldd").arg(from)).unwrap_or_default();
    for lib in libs
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(Path::new)
    {
        let dest = root.join(lib.strip_prefix("/")?);
        if !dest.exists() {
            std::fs::create_dir_all(dest.parent().context("no parent")?)?;
            std::fs::copy(lib, &dest).with_context(|| format!("copying {}", lib.display()))?;
        }
    }
    Ok(())
}

fn boot(
    k: &Kernel,
    vmlinuz: &Path,
    initramfs: &Path,
    dir: &Path,
    bench: bool,
) -> anyhow::Result<Outcome> {
    eprintln!(
        "xtask: booting Debian {} ({}) under qemu TCG",
        k.name, k.suite
    );
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "2048",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(if bench {
            "console=ttyS0 panic=-1 quiet kspan.bench"
        } else {
            "console=ttyS0 panic=-1 quiet"
        })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let pid = child.id();
    // A hung guest is killed at the bound; reading its console then ends.
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + GUEST_BOUND;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_secs(1));
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(pid as i32, 0) } != 0 {
                return;
            }
        }
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let console = child.stdout.take().context("qemu stdout")?;
    let mut log = String::new();
    let mut echoing = false;
    for line in BufReader::new(console).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).replace('\r', "");
        echoing |= line.contains("kspan-vm:");
        if echoing {
            eprintln!("  [{}] {line}", k.name);
        }
        log.push_str(&line);
        log.push('\n');
    }
    let _ = child.wait();
    let _ = watchdog.join();
    std::fs::write(dir.join(format!("console-{}.log", k.name)), &log)?;
    let mut outcome = read_outcome(&log, start.elapsed());
    if bench {
        outcome.problem = None;
        return Ok(outcome);
    }
    if outcome.problem.is_none() && outcome.chose != k.auto {
        outcome.problem = Some(format!("auto should choose `{}`", k.auto));
    }
    if start.elapsed() >= GUEST_BOUND {
        outcome.problem = Some("the guest hung".into());
    }
    Ok(outcome)
}

/// The smoke set's verdict from its `kspan-vm:` lines.
fn read_outcome(log: &str, took: Duration) -> Outcome {
    let said: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split_once("kspan-vm: ").map(|(_, r)| r))
        .collect();
    let kernel = said
        .iter()
        .find_map(|l| l.strip_prefix("kernel "))
        .unwrap_or("(did not start)")
        .to_string();
    let chose = said
        .iter()
        .find_map(|l| l.strip_prefix("auto chose: "))
        .unwrap_or("")
        .to_string();
    let counts = said.iter().rev().find_map(|l| {
        let (p, f) = l.split_once(" passed, ")?;
        Some((p.parse().ok()?, f.strip_suffix(" failed")?.parse().ok()?))
    });
    let (passed, failed) = counts.unwrap_or((0, 0));
    let problem = match counts {
        None => Some("the smoke set did not finish".to_string()),
        Some((_, f)) if f > 0 => Some(format!("{f} checks failed")),
        Some((0, _)) => Some("no check passed".to_string()),
        _ => None,
    };
    let bench = log
        .lines()
        .filter_map(|l| l.split_once("kspan-vm-bench: ").map(|(_, r)| r.to_string()))
        .collect();
    Outcome {
        kernel,
        chose,
        passed,
        failed,
        seconds: took.as_secs(),
        problem,
        bench,
        panicked_at_boot: said.is_empty() && log.contains("Kernel panic"),
    }
}

/// The same smoke set on the host's own kernel.
fn on_host(kspan: &Path, guest: &Path, go_gateway: &Path) -> anyhow::Result<Outcome> {
    eprintln!("xtask: the smoke set on the host kernel");
    let start = Instant::now();
    let out = Command::new(guest)
        .arg("smoke")
        .env("KSPAN_BIN", kspan)
        .env("KSPAN_GO_GATEWAY", go_gateway)
        .stderr(Stdio::inherit())
        .output()
        .context("running the smoke set")?;
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        eprintln!("  [host] {line}");
    }
    let mut outcome = read_outcome(&text, start.elapsed());
    outcome.kernel = format!("host {}", outcome.kernel);
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_guests_verdict() {
        let log = "noise\r\nkspan-vm: kernel 6.1.0-50-amd64\nkspan-vm: PASS auto load x\n\
                   kspan-vm: auto chose: fexit on the socket syscalls, bpf_loop\n\
                   kspan-vm-bench: | a | b |\nkspan-vm: 15 passed, 0 failed\n";
        let o = read_outcome(log, Duration::from_secs(3));
        assert_eq!(o.kernel, "6.1.0-50-amd64");
        assert_eq!(o.chose, "fexit on the socket syscalls, bpf_loop");
        assert_eq!((o.passed, o.failed), (15, 0));
        assert!(o.problem.is_none());
        assert_eq!(o.bench, ["| a | b |"]);
    }

    #[test]
    fn a_guest_that_fails_or_stops_early_is_a_problem() {
        let failed = read_outcome("kspan-vm: 9 passed, 1 failed\n", Duration::ZERO);
        assert_eq!(failed.problem.as_deref(), Some("1 checks failed"));
        let cut = read_outcome(
            "kspan-vm: kernel 5.10\nkspan-vm: PASS auto load\n",
            Duration::ZERO,
        );
        assert_eq!(cut.problem.as_deref(), Some("the smoke set did not finish"));
        let none = read_outcome("kspan-vm: 0 passed, 0 failed\n", Duration::ZERO);
        assert!(none.problem.is_some());
    }
}
