//! The TLS libraries a process maps, and where their functions sit in the file.
use std::{
    fs::File,
    path::{Path, PathBuf},
};

use object::{Object, ObjectSection, ObjectSymbol, ReadCache};

use super::{
    Uncovered,
    placement::{self, Exports, Func, Plan},
};
use crate::golang;

#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("{0}: {1}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("{0} is not an ELF file kspan can read: {1}")]
    Elf(PathBuf, #[source] object::Error),
    #[error("the memory maps of process {0} could not be read: {1}")]
    Maps(u32, #[source] procfs::ProcError),
}

/// A file as the kernel knows it: uprobes live on the inode, so two paths to one file (a
/// container's view and the host's) are one library.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    pub dev: (i32, i32),
    pub inode: u64,
}

/// A file a process maps, with a path to it that works from the agent's mount namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapped {
    pub id: FileId,
    /// As the process sees it.
    pub path: PathBuf,
    /// Through `/proc/<pid>/root`: reaches a container's files.
    pub reachable: PathBuf,
}

/// Where kspan's probes go in a file that exports OpenSSL's (or BoringSSL's, same names) API,
/// or in a Go executable; `None` when it is neither. Reads the headers, the symbol tables and
/// the first instructions of the functions: executables with OpenSSL inside (Node.js) are
/// large.
pub fn plan(path: &Path) -> Result<Option<Plan>, LibraryError> {
    let file = File::open(path).map_err(|e| LibraryError::Open(path.to_path_buf(), e))?;
    let map = Mapping::new(&file).map_err(|e| LibraryError::Open(path.to_path_buf(), e))?;
    let elf =
        object::File::parse(map.bytes()).map_err(|e| LibraryError::Elf(path.to_path_buf(), e))?;
    let mut e = Exports::default();
    for sym in elf.dynamic_symbols() {
        if sym.is_undefined() || !sym.is_definition() {
            continue;
        }
        let slot = match sym.name() {
            Ok("SSL_read") => &mut e.read,
            Ok("SSL_write") => &mut e.write,
            Ok("SSL_read_ex") => &mut e.read_ex,
            Ok("SSL_write_ex") => &mut e.write_ex,
            Ok("SSL_write_ex2") => &mut e.write_ex2,
            Ok("SSL_free") => &mut e.free,
            _ => continue,
        };
        *slot = file_func(&elf, &sym);
    }
    let go = golang::symbols(&elf).and_then(|s| golang::plan(&file, &s));
    Ok(match (placement::plan(&file, &e), go) {
        (Some(tls), go) => Some(Plan { go, ..tls }),
        (None, Some(go)) => Some(Plan {
            calls: Vec::new(),
            free: None,
            go: Some(go),
        }),
        (None, None) => None,
    })
}

/// A symbol's file offset and size.
pub fn file_func(elf: &object::File<'_>, sym: &object::Symbol<'_, '_>) -> Option<Func> {
    let section = elf.section_by_index(sym.section_index()?).ok()?;
    let (offset, _) = section.file_range()?;
    let rel = sym.address().checked_sub(section.address())?;
    Some(Func {
        at: rel + offset,
        size: sym.size(),
    })
}

/// A file mapped read-only: only the pages parsing touches are read. (Reading symbol names
/// through `read` calls took 350 ms for Node.js's 75,000 exported symbols.)
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    fn new(file: &File) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let len = file.metadata()?.len() as usize;
        if len == 0 {
            return Err(std::io::Error::other("empty file"));
        }
        // SAFETY: a private read-only mapping of an open file; checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self { ptr, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes and lives as long as `self`. A file
        // truncated meanwhile would fault; libraries and executables in use are not rewritten
        // in place (package managers replace them).
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// Whether a file name is one of the libraries probed by name: OpenSSL's and BoringSSL's
/// `libssl.so[.N]` (not NSS's `libssl3.so`).
pub fn is_libssl(name: &str) -> bool {
    name == "libssl.so" || name.starts_with("libssl.so.")
}

/// The files process `pid` maps, once each, read under `proc_root` (normally `/proc`).
pub fn mapped(proc_root: &Path, pid: u32) -> Result<Vec<Mapped>, LibraryError> {
    let dir = proc_root.join(pid.to_string());
    let maps = procfs::process::Process::new_with_root(dir.clone())
        .and_then(|p| p.maps())
        .map_err(|e| LibraryError::Maps(pid, e))?;
    let mut out: Vec<Mapped> = Vec::new();
    for m in maps {
        let procfs::process::MMapPath::Path(path) = m.pathname else {
            continue;
        };
        let id = FileId {
            dev: m.dev,
            inode: m.inode,
        };
        if m.inode == 0 || out.iter().any(|o| o.id == id) {
            continue;
        }
        let reachable = dir
            .join("root")
            .join(path.strip_prefix("/").unwrap_or(&path));
        out.push(Mapped {
            id,
            path,
            reachable,
        });
    }
    Ok(out)
}

/// Why a process that speaks TLS but maps no hookable library cannot be read, from the files
/// it maps (its executable first).
pub fn uncovered(files: &[Mapped]) -> Uncovered {
    let name = |m: &Mapped| {
        m.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let names: Vec<String> = files.iter().map(name).collect();
    let has = |prefix: &str| names.iter().any(|n| n.starts_with(prefix));
    if has("libjvm.so") {
        Uncovered::Java
    } else if has("libgnutls.so") {
        Uncovered::GnuTls
    } else if has("libnss3.so") || has("libssl3.so") {
        Uncovered::Nss
    } else if files.first().is_some_and(|exe| is_go(&exe.reachable)) {
        Uncovered::Go
    } else {
        Uncovered::Unrecognised
    }
}

/// Go executables carry their build information in a section of their own.
pub fn is_go(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    // The section headers alone: a full parse reads the symbol tables too (55 ms for Node's).
    use object::{Endianness, elf::FileHeader64, read::elf::FileHeader};
    let cache = ReadCache::new(file);
    let Ok(header) = FileHeader64::<Endianness>::parse(&cache) else {
        return false;
    };
    let Ok(endian) = header.endian() else {
        return false;
    };
    header
        .sections(endian, &cache)
        .is_ok_and(|table| table.section_by_name(endian, b".go.buildinfo").is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libssl_by_name_not_nss() {
        for yes in ["libssl.so.3", "libssl.so.1.1", "libssl.so"] {
            assert!(is_libssl(yes), "{yes}");
        }
        for no in ["libssl3.so", "libsslx.so.3", "libcrypto.so.3"] {
            assert!(!is_libssl(no), "{no}");
        }
    }

    #[test]
    fn plan_of_this_systems_openssl() {
        // The test machines install OpenSSL 3 (curl, nginx and Python link it).
        let lib = Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        if cfg!(not(target_arch = "x86_64")) {
            return;
        }
        let ssl = plan(lib).expect("readable").expect("exports SSL_read");
        assert!(ssl.free.is_some());
        assert_ne!(ssl.calls[0].offset, ssl.calls[1].offset);
        // libcrypto exports none of them.
        let crypto = Path::new("/usr/lib/x86_64-linux-gnu/libcrypto.so.3");
        assert_eq!(plan(crypto).expect("readable"), None);
    }

    #[test]
    fn this_process_maps_its_own_executable_first() {
        let files = mapped(Path::new("/proc"), std::process::id()).expect("own maps");
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        assert_eq!(files.first().map(|m| &m.path), Some(&exe));
        assert!(files.first().is_some_and(|m| m.reachable.exists()));
        assert_eq!(uncovered(&files[..1]), Uncovered::Unrecognised, "not Go");
    }
}
