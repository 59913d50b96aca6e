//! Process metadata from procfs, cached per tgid.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProcessInfo {
    pub pid: u32,
    /// Absolute path of the executable, empty when the process was gone before we looked.
    pub exe: String,
    pub command_line: String,
    /// `OTEL_SERVICE_NAME` from the process's environment, else the executable's name.
    pub service_name: String,
}

impl ProcessInfo {
    pub fn exe_name(&self) -> &str {
        self.exe.rsplit('/').next().unwrap_or(&self.exe)
    }
}

/// Reads one process's metadata. `root` is normally `/proc`.
pub fn read(root: &Path, pid: u32) -> ProcessInfo {
    let dir = root.join(pid.to_string());
    let exe = std::fs::read_link(dir.join("exe"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let command_line = std::fs::read(dir.join("cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .map(String::from_utf8_lossy)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let env_name = std::fs::read(dir.join("environ")).ok().and_then(|raw| {
        raw.split(|&b| b == 0)
            .find_map(|kv| kv.strip_prefix(b"OTEL_SERVICE_NAME="))
            .map(|v| String::from_utf8_lossy(v).trim().to_string())
            .filter(|v| !v.is_empty())
    });
    let exe_name = exe.rsplit('/').next().unwrap_or_default().to_string();
    let service_name = env_name.unwrap_or_else(|| {
        if exe_name.is_empty() {
            format!("unknown_service:{pid}")
        } else {
            exe_name
        }
    });
    ProcessInfo {
        pid,
        exe,
        command_line,
        service_name,
    }
}

/// Bounded cache. Entries are re-read after `ttl`, which also covers pid reuse.
pub struct ProcessCache {
    root: PathBuf,
    ttl: Duration,
    max: usize,
    entries: HashMap<u32, (Instant, Arc<ProcessInfo>)>,
}

impl ProcessCache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            ttl: Duration::from_secs(30),
            max: 16_384,
            entries: HashMap::new(),
        }
    }

    pub fn get(&mut self, pid: u32) -> Arc<ProcessInfo> {
        let now = Instant::now();
        if let Some((at, info)) = self.entries.get(&pid)
            && now.duration_since(*at) < self.ttl
        {
            return info.clone();
        }
        if self.entries.len() >= self.max {
            let ttl = self.ttl;
            self.entries
                .retain(|_, (at, _)| now.duration_since(*at) < ttl);
            if self.entries.len() >= self.max {
                self.entries.clear();
            }
        }
        let info = Arc::new(read(&self.root, pid));
        // A process that already exited is not cached, so a later pid reuse is read afresh.
        if !info.exe.is_empty() {
            self.entries.insert(pid, (now, info.clone()));
        }
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_service_name_from_environment_or_exe() {
        let dir = std::env::temp_dir().join(format!("kspan-proc-{}", std::process::id()));
        let p = dir.join("42");
        std::fs::create_dir_all(&p).unwrap();
        std::os::unix::fs::symlink("/usr/bin/python3.11", p.join("exe")).unwrap();
        std::fs::write(p.join("cmdline"), b"python3\0app.py\0--port\x008080\0").unwrap();
        std::fs::write(
            p.join("environ"),
            b"HOME=/root\0OTEL_SERVICE_NAME=checkout\0",
        )
        .unwrap();
        let info = read(&dir, 42);
        assert_eq!(info.service_name, "checkout");
        assert_eq!(info.command_line, "python3 app.py --port 8080");
        assert_eq!(info.exe_name(), "python3.11");
        std::fs::write(p.join("environ"), b"HOME=/root\0").unwrap();
        assert_eq!(read(&dir, 42).service_name, "python3.11");
        assert_eq!(read(&dir, 43).service_name, "unknown_service:43");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn own_process_is_readable() {
        let mut cache = ProcessCache::new("/proc");
        let me = cache.get(std::process::id());
        assert!(!me.exe.is_empty());
        assert!(Arc::ptr_eq(&me, &cache.get(std::process::id())));
    }
}
