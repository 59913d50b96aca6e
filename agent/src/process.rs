//! Process metadata from procfs, cached per tgid.
pub mod cgroup;

use crate::{
    capture::event::Opener,
    k8s::{PodIndex, PodMeta},
};

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProcessInfo {
    pub pid: u32,
    /// The kernel's name for the process (`/proc/<pid>/comm`, or the kernel's when gone).
    pub comm: String,
    /// Absolute path of the executable, empty when the process was gone before we looked.
    pub exe: String,
    pub command_line: String,
    /// `OTEL_SERVICE_NAME` from the process's environment, else the executable's name.
    pub service_name: String,
    /// Its cgroup, and the container and pod that cgroup names.
    pub cgroup: cgroup::Cgroup,
    /// The pod, when Kubernetes metadata is on and the pod is known.
    pub k8s: Option<Arc<PodMeta>>,
    /// Whether it is a Go program, found out when first asked (see [`ProcessInfo::go`]).
    pub runtime: Runtime,
}

/// What the executable's runtime is, read from the file when first needed: only linking asks,
/// and only when several requests of the process are open at once.
#[derive(Clone, Debug, Default)]
pub struct Runtime {
    /// The executable through `/proc/<pid>/exe` (a container's file too); `None` when unknown.
    exe: Option<PathBuf>,
    go: std::sync::OnceLock<bool>,
}

impl Runtime {
    pub fn of(exe: PathBuf) -> Self {
        Self {
            exe: Some(exe),
            go: std::sync::OnceLock::new(),
        }
    }

    /// A runtime known without reading a file (tests).
    pub fn known(go: bool) -> Self {
        Self {
            exe: None,
            go: std::sync::OnceLock::from(go),
        }
    }
}

// Metadata identity: the runtime follows from the executable.
impl PartialEq for Runtime {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Runtime {}
impl std::hash::Hash for Runtime {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl ProcessInfo {
    /// A Go program: its goroutines move between OS threads, so the thread that makes a call
    /// says nothing about the request it serves. Reads the executable's section headers once.
    pub fn go(&self) -> bool {
        *self.runtime.go.get_or_init(|| {
            self.runtime
                .exe
                .as_deref()
                .is_some_and(crate::tls::library::is_go)
        })
    }

    pub fn exe_name(&self) -> &str {
        self.exe.rsplit('/').next().unwrap_or(&self.exe)
    }

    /// Whether the process was gone before /proc was read.
    pub fn gone(&self) -> bool {
        self.exe.is_empty()
    }

    /// The identity of `child`, gone before it could be read, from a live relative (the
    /// process that opened its socket, or its parent). A forked copy (same `comm`: a fork
    /// keeps it, an exec changes it) is its relative under its own pid; a program it exec'ed
    /// keeps its own name but shares the relative's container and pod.
    pub fn inherited(child: &ProcessInfo, kin: &ProcessInfo) -> ProcessInfo {
        if child.comm == kin.comm {
            return ProcessInfo {
                pid: child.pid,
                ..kin.clone()
            };
        }
        let service_name = match &kin.k8s {
            Some(pod) => pod.service_name(kin.cgroup.container_id.as_deref()),
            None => child.service_name.clone(),
        };
        ProcessInfo {
            service_name,
            cgroup: kin.cgroup.clone(),
            k8s: kin.k8s.clone(),
            ..child.clone()
        }
    }
}

/// Reads one process's metadata. `root` is normally `/proc`. `comm` (from the kernel) names a
/// process that already exited. `pods` resolves the pod its cgroup names.
pub fn read(root: &Path, pid: u32, comm: &[u8], pods: Option<&PodIndex>) -> ProcessInfo {
    // Every read goes through one handle on the process's directory: a pid reused midway
    // cannot mix two processes' files.
    let proc = procfs::process::Process::new_with_root(root.join(pid.to_string())).ok();
    let proc = proc.as_ref();
    let exe = proc
        .and_then(|p| p.exe().ok())
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let command_line = proc
        .and_then(|p| p.cmdline().ok())
        .map(|args| args.join(" "))
        .unwrap_or_default();
    let env_name = proc.and_then(|p| p.environ().ok()).and_then(|env| {
        env.get(std::ffi::OsStr::new("OTEL_SERVICE_NAME"))
            .map(|v| v.to_string_lossy().trim().to_string())
            .filter(|v| !v.is_empty())
    });
    let cgroup = proc
        .and_then(|p| p.cgroups().ok())
        .map(|groups| cgroup::parse(&groups))
        .unwrap_or_default();
    let k8s = pods
        .zip(cgroup.pod_uid.as_deref())
        .and_then(|(p, uid)| p.get(uid));
    // The process's own name for itself wins, then its pod's.
    let declared = env_name.or_else(|| {
        k8s.as_ref()
            .map(|pod| pod.service_name(cgroup.container_id.as_deref()))
    });
    let exe_name = exe.rsplit('/').next().unwrap_or_default().to_string();
    let comm = proc
        .and_then(|p| p.stat().ok())
        .map(|stat| stat.comm)
        .unwrap_or_else(|| {
            String::from_utf8_lossy(comm.split(|&b| b == 0).next().unwrap_or_default()).into_owned()
        });
    let service_name = declared.unwrap_or_else(|| match (exe_name.is_empty(), comm.is_empty()) {
        (false, _) => exe_name,
        (true, false) => comm.clone(),
        (true, true) => format!("unknown_service:{pid}"),
    });
    ProcessInfo {
        pid,
        comm,
        exe,
        command_line,
        service_name,
        cgroup,
        k8s,
        runtime: Runtime::of(root.join(pid.to_string()).join("exe")),
    }
}

const NEGATIVE_TTL: Duration = Duration::from_secs(1);

/// Bounded cache. Entries are re-read after `ttl`, which also covers pid reuse.
pub struct ProcessCache {
    root: PathBuf,
    ttl: Duration,
    max: usize,
    /// Expiry time and metadata.
    entries: HashMap<u32, (Instant, Arc<ProcessInfo>)>,
    pods: Option<Arc<PodIndex>>,
}

impl ProcessCache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            ttl: Duration::from_secs(30),
            max: 16_384,
            entries: HashMap::new(),
            pods: None,
        }
    }

    /// Resolves processes' pods through `pods` (Kubernetes metadata on).
    pub fn with_pods(mut self, pods: Arc<PodIndex>) -> Self {
        self.pods = Some(pods);
        self
    }

    /// The metadata of `pid`; `comm` (from the kernel) and `kin` (the socket's opener and its
    /// parent) stand in for a process that exited before it could be read.
    pub fn get(&mut self, pid: u32, comm: &[u8], kin: Opener) -> Arc<ProcessInfo> {
        let info = self.get_one(pid, comm);
        if !info.gone() {
            return info;
        }
        for relative in [kin.tgid, kin.parent] {
            if relative == 0 || relative == pid {
                continue;
            }
            let relative = self.get_one(relative, b"");
            if !relative.gone() {
                let inherited = Arc::new(ProcessInfo::inherited(&info, &relative));
                let expires = Instant::now() + NEGATIVE_TTL;
                self.entries.insert(pid, (expires, inherited.clone()));
                return inherited;
            }
        }
        info
    }

    fn get_one(&mut self, pid: u32, comm: &[u8]) -> Arc<ProcessInfo> {
        let now = Instant::now();
        if let Some((expires, info)) = self.entries.get(&pid)
            && now < *expires
        {
            return info.clone();
        }
        if self.entries.len() >= self.max {
            self.entries.retain(|_, (expires, _)| now < *expires);
            if self.entries.len() >= self.max {
                self.entries.clear();
            }
        }
        let info = Arc::new(read(&self.root, pid, comm, self.pods.as_deref()));
        // A process already gone is remembered only briefly, so a reuse of its pid is soon
        // read afresh (while a burst of its late events does not hammer procfs); so is one in
        // a pod the watch has not reported yet.
        let pod_pending =
            self.pods.is_some() && info.cgroup.pod_uid.is_some() && info.k8s.is_none();
        let ttl = if info.exe.is_empty() || pod_pending {
            NEGATIVE_TTL
        } else {
            self.ttl
        };
        self.entries.insert(pid, (now + ttl, info.clone()));
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process directory `root/pid` with its `exe` link and `files`.
    fn fake_process(root: &Path, pid: u32, exe: &str, files: &[(&str, &[u8])]) -> PathBuf {
        let p = root.join(pid.to_string());
        std::fs::create_dir_all(&p).unwrap();
        std::os::unix::fs::symlink(exe, p.join("exe")).unwrap();
        for (name, contents) in files {
            std::fs::write(p.join(name), contents).unwrap();
        }
        p
    }

    #[test]
    fn reads_service_name_from_environment_or_exe() {
        let dir = std::env::temp_dir().join(format!("kspan-proc-{}", std::process::id()));
        let p = fake_process(
            &dir,
            42,
            "/usr/bin/python3.11",
            &[
                ("cmdline", b"python3\0app.py\0--port\x008080\0"),
                ("environ", b"HOME=/root\0OTEL_SERVICE_NAME=checkout\0"),
            ],
        );
        let info = read(&dir, 42, b"", None);
        assert_eq!(info.service_name, "checkout");
        assert_eq!(info.command_line, "python3 app.py --port 8080");
        assert_eq!(info.exe_name(), "python3.11");
        assert_eq!(info.cgroup, cgroup::Cgroup::default(), "no cgroup file");
        std::fs::write(
            p.join("cgroup"),
            format!("0::/system.slice/docker-{}.scope\n", "ab".repeat(32)),
        )
        .unwrap();
        assert_eq!(
            read(&dir, 42, b"", None).cgroup.container_id,
            Some("ab".repeat(32))
        );
        std::fs::write(p.join("environ"), b"HOME=/root\0").unwrap();
        assert_eq!(read(&dir, 42, b"ignored", None).service_name, "python3.11");
        // Gone before we looked: the kernel's comm still names it.
        assert_eq!(read(&dir, 43, b"curl\0\0\0", None).service_name, "curl");
        assert_eq!(read(&dir, 43, b"", None).service_name, "unknown_service:43");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `/proc/<pid>/stat` of a sleeping process named `comm`.
    fn stat_line(pid: u32, comm: &str) -> String {
        format!(
            "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 100 0 0 0 1 1 0 0 20 0 1 0 1000 10000000 \
             500 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        )
    }

    /// A forked child gone before /proc was read is its opener under its own pid; a program
    /// exec'ed by a live parent keeps its name and takes the parent's container.
    #[test]
    fn gone_children_take_their_relatives_identity() {
        let dir = std::env::temp_dir().join(format!("kspan-kin-{}", std::process::id()));
        let container = "cd".repeat(32);
        fake_process(
            &dir,
            42,
            "/usr/bin/python3.11",
            &[
                ("stat", stat_line(42, "python3").as_bytes()),
                ("environ", b"OTEL_SERVICE_NAME=checkout\0"),
                (
                    "cgroup",
                    format!("0::/system.slice/docker-{container}.scope\n").as_bytes(),
                ),
            ],
        );
        let mut cache = ProcessCache::new(&dir);
        let comm = |name: &str| {
            let mut c = [0u8; 16];
            c[..name.len()].copy_from_slice(name.as_bytes());
            c
        };
        let child = cache.get(
            43,
            &comm("python3"),
            Opener {
                tgid: 42,
                parent: 1,
            },
        );
        assert_eq!((child.pid, child.service_name.as_str()), (43, "checkout"));
        assert_eq!(child.exe, "/usr/bin/python3.11");
        let execed = cache.get(
            44,
            &comm("curl"),
            Opener {
                tgid: 44,
                parent: 42,
            },
        );
        assert_eq!((execed.pid, execed.service_name.as_str()), (44, "curl"));
        assert_eq!(
            execed.cgroup.container_id.as_deref(),
            Some(container.as_str())
        );
        let orphan = cache.get(
            45,
            &comm("curl"),
            Opener {
                tgid: 45,
                parent: 46,
            },
        );
        assert_eq!(
            orphan.service_name, "curl",
            "no live relative: the kernel's name"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn own_process_is_readable() {
        let mut cache = ProcessCache::new("/proc");
        let me = cache.get(std::process::id(), b"", Opener::default());
        assert!(!me.exe.is_empty());
        assert!(Arc::ptr_eq(
            &me,
            &cache.get(std::process::id(), b"", Opener::default())
        ));
    }
}
