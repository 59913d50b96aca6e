//! The TLS library probes: loaded with the other programs, attached per library file by
//! [`crate::tls::attach::Attacher`].
use std::path::Path;

use aya::{
    Ebpf,
    programs::{
        ProgramError, UProbe,
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
    },
};

use super::{Capture, Loops};
use crate::tls::{attach::Probes, library::Symbols};

/// Entry probes by the function they go on; one return probe serves all four calls.
const ENTRY: [&str; 5] = [
    "kspan_ssl_read",
    "kspan_ssl_read_ex",
    "kspan_ssl_write",
    "kspan_ssl_write_ex",
    "kspan_ssl_free",
];
const RETURN: &str = "kspan_ssl_ret";

/// The probes of one library file.
pub struct TlsLink(Vec<(String, UProbeLinkId)>);

#[derive(Debug, thiserror::Error)]
pub enum TlsProbeError {
    #[error("the TLS probes did not load on this kernel: {0}")]
    Unavailable(String),
    #[error("attaching {0}: {1}")]
    Attach(String, #[source] ProgramError),
}

/// Loads the TLS programs; the reason when the kernel refuses them (TLS plaintext is then
/// not read, which the agent says, but the rest works).
pub(super) fn load(ebpf: &mut Ebpf, loops: Loops) -> Result<(), String> {
    let ret = loops.program(RETURN);
    for name in ENTRY.iter().copied().chain([ret.as_str()]) {
        let prog: &mut UProbe = ebpf
            .program_mut(name)
            .ok_or_else(|| format!("missing program {name}"))?
            .try_into()
            .map_err(|e: ProgramError| e.to_string())?;
        prog.load().map_err(|e| format!("{name}: {e:#}"))?;
    }
    Ok(())
}

impl Capture {
    fn tls_attach(&mut self, path: &Path, symbols: &Symbols) -> Result<TlsLink, TlsProbeError> {
        if let Some(e) = &self.tls_unavailable {
            return Err(TlsProbeError::Unavailable(e.clone()));
        }
        let ret = self.loops.program(RETURN);
        let calls = [
            (ENTRY[0], Some(symbols.read)),
            (ENTRY[1], symbols.read_ex),
            (ENTRY[2], Some(symbols.write)),
            (ENTRY[3], symbols.write_ex),
        ];
        let mut plan: Vec<(&str, u64)> = Vec::new();
        for (entry, offset) in calls {
            if let Some(offset) = offset {
                plan.push((entry, offset));
                plan.push((ret.as_str(), offset));
            }
        }
        if let Some(free) = symbols.free {
            plan.push((ENTRY[4], free));
        }
        let mut link = TlsLink(Vec::with_capacity(plan.len()));
        for (name, offset) in plan {
            match self.uprobe(name).and_then(|p| {
                p.attach(
                    UProbeAttachLocation::AbsoluteOffset(offset),
                    path,
                    UProbeScope::AllProcesses,
                )
            }) {
                Ok(id) => link.0.push((name.to_string(), id)),
                Err(e) => {
                    // All or nothing: half a set would miss calls silently.
                    self.tls_detach(link);
                    return Err(TlsProbeError::Attach(name.to_string(), e));
                }
            }
        }
        Ok(link)
    }

    fn uprobe(&mut self, name: &str) -> Result<&mut UProbe, ProgramError> {
        match self.ebpf.program_mut(name) {
            Some(p) => p.try_into(),
            None => Err(ProgramError::NotLoaded),
        }
    }

    fn tls_detach(&mut self, link: TlsLink) {
        for (name, id) in link.0 {
            if let Ok(p) = self.uprobe(&name) {
                let _ = p.detach(id);
            }
        }
    }
}

impl Probes for Capture {
    type Link = TlsLink;
    type Error = TlsProbeError;

    fn attach(&mut self, path: &Path, symbols: &Symbols) -> Result<TlsLink, TlsProbeError> {
        self.tls_attach(path, symbols)
    }

    fn detach(&mut self, link: TlsLink) {
        self.tls_detach(link)
    }
}
