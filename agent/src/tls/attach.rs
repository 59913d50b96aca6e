//! Which TLS library files carry kspan's probes. A uprobe lives on a file (its inode), not in
//! a process: once a library is probed, every process that maps it, now or later, is read.
//! So the host's own `libssl` is probed at start (a `curl` that lives 50 ms is read from its
//! first call), and a container's copy, or an executable with OpenSSL inside (Node.js), when a
//! process using it is first seen. Files no process maps any more are unprobed by [`sweep`].
//! A Go executable is probed the same way for its goroutines ([`crate::golang`]).
//!
//! [`sweep`]: Attacher::sweep
use std::{
    collections::{HashMap, HashSet, VecDeque},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::{
    Coverage, Uncovered,
    library::{self, FileId, Mapped},
    placement::Plan,
};

/// What attaches the probes: the kernel capture, or a test double.
pub trait Probes {
    type Link;
    type Error: std::fmt::Display;
    fn attach(&mut self, path: &Path, plan: &Plan) -> Result<Self::Link, Self::Error>;
    fn detach(&mut self, link: Self::Link);
}

struct Attached<L> {
    link: L,
    path: PathBuf,
    /// Its TLS plaintext is read (else only a Go executable's goroutines are followed).
    tls: bool,
    /// Found on the host at start: kept for processes not started yet.
    pinned: bool,
}

/// Files examined and processes classified are remembered up to these counts (then forgotten
/// all at once: the cost is a re-read, never a wrong answer).
const MAX_FILES: usize = 16_384;
const MAX_PROCESSES: usize = 16_384;
/// Exec'ed processes waiting to be looked at; beyond, the oldest are skipped (counted): they
/// are still looked at when they first speak TLS.
const MAX_EXECS: usize = 4096;
/// How long after its exec a process is looked at: the dynamic loader maps its libraries
/// first (a millisecond or two).
const EXEC_SETTLE: Duration = Duration::from_millis(15);

/// Where distributions keep shared libraries.
const LIBRARY_DIRS: [&str; 7] = [
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
];

pub struct Attacher<L> {
    proc_root: PathBuf,
    /// The probe plan of each file looked at (`None`: nothing to probe).
    files: HashMap<FileId, Option<Plan>>,
    attached: HashMap<FileId, Attached<L>>,
    processes: HashMap<u32, Coverage>,
    /// Exec'ed processes to look at, and when.
    execs: VecDeque<(Instant, u32)>,
    /// Attach attempts that failed (each logged once per file).
    pub attach_errors: u64,
    /// Exec'ed processes not looked at because too many waited.
    pub execs_skipped: u64,
}

impl<L> Attacher<L> {
    pub fn new(proc_root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: proc_root.into(),
            files: HashMap::new(),
            attached: HashMap::new(),
            processes: HashMap::new(),
            execs: VecDeque::new(),
            attach_errors: 0,
            execs_skipped: 0,
        }
    }

    /// Library files carrying probes.
    pub fn attached(&self) -> usize {
        self.attached.len()
    }

    /// Probes the host's libssl files and those of every running process.
    pub fn start<P: Probes<Link = L>>(&mut self, probes: &mut P) {
        for dir in LIBRARY_DIRS {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                if !library::is_libssl(&name.to_string_lossy()) {
                    continue;
                }
                let path = entry.path();
                let Ok(meta) = std::fs::metadata(&path) else {
                    continue;
                };
                let id = file_id(&meta);
                if self.probe(probes, id, &path).is_ok()
                    && let Some(a) = self.attached.get_mut(&id)
                {
                    a.pinned = true;
                }
            }
        }
        for pid in self.pids() {
            self.process(probes, pid);
        }
    }

    /// Whether process `pid`'s TLS is read, probing its library if that is new.
    pub fn process<P: Probes<Link = L>>(&mut self, probes: &mut P, pid: u32) -> Coverage {
        if let Some(c) = self.processes.get(&pid) {
            return *c;
        }
        let coverage = match library::mapped(&self.proc_root, pid) {
            Ok(files) => self.cover(probes, &files),
            // Gone already: nothing to probe; its connections are judged by their close.
            Err(_) => return Coverage::Not(Uncovered::Unclassified),
        };
        if self.processes.len() >= MAX_PROCESSES {
            self.processes.clear();
        }
        self.processes.insert(pid, coverage);
        coverage
    }

    /// Process `pid` exec'ed: another program now, to be looked at once its libraries are
    /// mapped ([`Attacher::due`]), before its first connection.
    pub fn exec(&mut self, pid: u32, now: Instant) {
        self.processes.remove(&pid);
        if self.execs.len() >= MAX_EXECS {
            self.execs.pop_front();
            self.execs_skipped += 1;
        }
        self.execs.push_back((now + EXEC_SETTLE, pid));
    }

    /// Looks at the exec'ed processes whose libraries are mapped by `now`; returns those whose
    /// TLS is read. Others are not remembered: a program may load its TLS library later
    /// (Python imports `ssl` when first used), and is looked at again when it speaks TLS.
    pub fn due<P: Probes<Link = L>>(&mut self, probes: &mut P, now: Instant) -> Vec<u32> {
        let mut hooked = Vec::new();
        while let Some(&(at, pid)) = self.execs.front() {
            if at > now {
                break;
            }
            self.execs.pop_front();
            let Ok(files) = library::mapped(&self.proc_root, pid) else {
                continue;
            };
            if self.cover(probes, &files) == Coverage::Hooked {
                self.processes.insert(pid, Coverage::Hooked);
                hooked.push(pid);
            }
        }
        hooked
    }

    /// Probes the TLS library among `files` (the executable first, then what it maps).
    fn cover<P: Probes<Link = L>>(&mut self, probes: &mut P, files: &[Mapped]) -> Coverage {
        let mut failed = false;
        for (i, f) in files.iter().enumerate() {
            let named = f
                .path
                .file_name()
                .is_some_and(|n| library::is_libssl(&n.to_string_lossy()));
            // The executable may carry OpenSSL inside, exported (Node.js).
            if !named && i != 0 {
                continue;
            }
            match self.probe(probes, f.id, &f.reachable) {
                Ok(true) => return Coverage::Hooked,
                Ok(false) => {}
                Err(()) => failed = true,
            }
        }
        Coverage::Not(if failed {
            Uncovered::AttachFailed
        } else {
            library::uncovered(files)
        })
    }

    /// Probes file `id` at `path` unless done: whether it carries probes now.
    fn probe<P: Probes<Link = L>>(
        &mut self,
        probes: &mut P,
        id: FileId,
        path: &Path,
    ) -> Result<bool, ()> {
        if let Some(a) = self.attached.get(&id) {
            return Ok(a.tls);
        }
        if self.files.len() >= MAX_FILES {
            self.files.clear();
        }
        let started = Instant::now();
        let Some(plan) = self.plan(id, path) else {
            return Ok(false);
        };
        match probes.attach(path, &plan) {
            Ok(link) => {
                log::info!(
                    "{} {} (probed in {:?}; {} of {} probes single-step, which costs tens of \
                     µs per call under a hypervisor)",
                    if plan.reads_tls() {
                        "reading TLS plaintext at"
                    } else {
                        "following the goroutines of"
                    },
                    path.display(),
                    started.elapsed(),
                    plan.stepped(),
                    plan.probes(),
                );
                self.attached.insert(
                    id,
                    Attached {
                        link,
                        path: path.to_path_buf(),
                        tls: plan.reads_tls(),
                        pinned: false,
                    },
                );
                Ok(plan.reads_tls())
            }
            Err(e) if !path.exists() => {
                // The process exited while being probed, taking its `/proc/<pid>/root` view
                // of the file: the next process that maps it probes it.
                log::debug!("TLS library {} went with its process: {e}", path.display());
                Ok(false)
            }
            Err(e) => {
                self.attach_errors += 1;
                // Not retried: the same file would fail the same way.
                self.files.insert(id, None);
                log::warn!("could not probe {}: {e}", path.display());
                Err(())
            }
        }
    }

    /// Where file `id`'s probes go, remembered per file; `None` when it exports no TLS API
    /// and is not a Go executable with its symbols.
    fn plan(&mut self, id: FileId, path: &Path) -> Option<Plan> {
        if let Some(plan) = self.files.get(&id) {
            return plan.clone();
        }
        let plan = library::plan(path).unwrap_or_else(|e| {
            log::debug!("TLS library lookup: {e}");
            None
        });
        // A path gone with its process says nothing about the file.
        if plan.is_some() || path.exists() {
            self.files.insert(id, plan.clone());
        }
        plan
    }

    /// Unprobes library files that no process maps any more (pinned host files stay), and
    /// forgets processes that are gone.
    pub fn sweep<P: Probes<Link = L>>(&mut self, probes: &mut P) {
        let mut in_use: HashSet<FileId> = HashSet::new();
        let mut alive: HashSet<u32> = HashSet::new();
        for pid in self.pids() {
            alive.insert(pid);
            if let Ok(files) = library::mapped(&self.proc_root, pid) {
                in_use.extend(files.iter().map(|f| f.id));
            }
        }
        let unused: Vec<FileId> = self
            .attached
            .iter()
            .filter(|(id, a)| !a.pinned && !in_use.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for id in unused {
            if let Some(a) = self.attached.remove(&id) {
                log::info!("no process maps {} any more: unprobed", a.path.display());
                probes.detach(a.link);
            }
        }
        self.processes.retain(|pid, _| alive.contains(pid));
    }

    fn pids(&self) -> Vec<u32> {
        std::fs::read_dir(&self.proc_root)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A file's identity as `/proc/<pid>/maps` writes it.
fn file_id(meta: &std::fs::Metadata) -> FileId {
    let dev = meta.dev();
    FileId {
        dev: (libc::major(dev) as i32, libc::minor(dev) as i32),
        inode: meta.ino(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what would be attached.
    #[derive(Default)]
    struct Fake {
        attached: Vec<PathBuf>,
        detached: usize,
        fail: bool,
        /// The file disappears during the attach, as when its process exits.
        vanish: bool,
    }

    impl Probes for Fake {
        type Link = PathBuf;
        type Error = &'static str;
        fn attach(&mut self, path: &Path, _: &Plan) -> Result<PathBuf, &'static str> {
            if self.vanish {
                std::fs::remove_file(path).map_err(|_| "could not remove")?;
                return Err("no such file");
            }
            if self.fail {
                return Err("refused");
            }
            self.attached.push(path.to_path_buf());
            Ok(path.to_path_buf())
        }
        fn detach(&mut self, _: PathBuf) {
            self.detached += 1;
        }
    }

    #[test]
    fn host_libssl_is_probed_once_at_start_and_kept() {
        let mut fake = Fake::default();
        let mut attacher = Attacher::new("/proc");
        attacher.start(&mut fake);
        // libssl.so, libssl.so.3 and the multiarch symlinks are one file.
        assert_eq!(attacher.attached(), 1, "{:?}", fake.attached);
        assert_eq!(fake.attached.len(), 1);
        attacher.sweep(&mut fake);
        assert_eq!(
            fake.detached, 0,
            "a host library stays probed for later processes"
        );
    }

    #[test]
    fn a_process_without_tls_library_is_uncovered_and_remembered() {
        let mut fake = Fake::default();
        let mut attacher = Attacher::new("/proc");
        // `sleep` links no TLS library (this test binary may: features unify in a workspace).
        let mut sleep = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .expect("sleep");
        let maps = format!("/proc/{}/maps", sleep.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !std::fs::read_to_string(&maps).is_ok_and(|m| m.contains("libc.so")) {
            assert!(
                std::time::Instant::now() < deadline,
                "sleep never mapped libc"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let coverage = attacher.process(&mut fake, sleep.id());
        let _ = sleep.kill();
        let _ = sleep.wait();
        assert_eq!(coverage, Coverage::Not(Uncovered::Unrecognised));
        assert!(fake.attached.is_empty());
        assert_eq!(
            attacher.process(&mut fake, u32::MAX),
            Coverage::Not(Uncovered::Unclassified),
            "gone"
        );
    }

    #[test]
    fn a_failed_attach_is_said_and_not_retried() {
        let mut fake = Fake {
            fail: true,
            ..Fake::default()
        };
        let mut attacher: Attacher<PathBuf> = Attacher::new("/proc");
        attacher.start(&mut fake);
        assert_eq!(attacher.attach_errors, 1);
        attacher.start(&mut fake);
        assert_eq!(attacher.attach_errors, 1, "not retried");
    }

    #[test]
    fn a_library_gone_with_its_process_is_neither_failed_nor_forgotten() {
        let dir = std::env::temp_dir().join(format!("kspan-vanish-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let copy = dir.join("libssl.so.3");
        std::fs::copy("/usr/lib/x86_64-linux-gnu/libssl.so.3", &copy).expect("copy libssl");
        let id = FileId {
            dev: (0, 0),
            inode: 1,
        };
        let mut fake = Fake {
            vanish: true,
            ..Fake::default()
        };
        let mut attacher: Attacher<PathBuf> = Attacher::new("/proc");
        assert_eq!(attacher.probe(&mut fake, id, &copy), Ok(false));
        assert_eq!(attacher.attach_errors, 0);
        assert!(
            attacher.files.get(&id).is_some_and(|p| p.is_some()),
            "plan kept"
        );
        // Looked up through a path already gone: nothing is remembered for the file.
        let other = FileId {
            dev: (0, 0),
            inode: 2,
        };
        assert_eq!(attacher.probe(&mut fake, other, &copy), Ok(false));
        assert!(!attacher.files.contains_key(&other));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
