//! The TLS library probes and the Go runtime's: loaded with the other programs, attached per
//! file by [`crate::tls::attach::Attacher`].
use std::path::Path;

use aya::{
    Ebpf,
    programs::{
        ProgramError, UProbe,
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
    },
};

use super::{Capture, Loops};
use crate::tls::{
    attach::Probes,
    placement::{Abi, Plan},
};

/// Entry probes; one return probe serves every call.
const ENTRY: [&str; 6] = [
    "kspan_ssl_read",
    "kspan_ssl_read_ex",
    "kspan_ssl_write",
    "kspan_ssl_write_ex",
    "kspan_ssl_write_ex2",
    FREE,
];
const FREE: &str = "kspan_ssl_free";

/// The entry program that reads a hooked function's arguments.
fn entry(abi: Abi) -> &'static str {
    match abi {
        Abi::Read => ENTRY[0],
        Abi::ReadEx => ENTRY[1],
        Abi::Write => ENTRY[2],
        Abi::WriteEx => ENTRY[3],
        Abi::WriteEx2 => ENTRY[4],
    }
}
const RETURN: &str = "kspan_ssl_ret";
/// The goroutine probes (`kspan-ebpf/src/go.rs`), in `golang::Plan::slots` order.
const GO: [&str; 4] = [
    "kspan_go_newproc",
    "kspan_go_runqput",
    "kspan_go_round_trip",
    "kspan_go_write_loop",
];

/// The probes of one library file.
pub struct TlsLink(Vec<(String, UProbeLinkId)>);

#[derive(Debug, thiserror::Error)]
pub enum TlsProbeError {
    #[error("the TLS probes did not load on this kernel: {0}")]
    Unavailable(String),
    /// The cause is in the message: the error is logged, not walked.
    #[error("attaching {0}: {1}{cause}", cause = cause(.1))]
    Attach(String, ProgramError),
}

fn cause(e: &ProgramError) -> String {
    std::error::Error::source(e)
        .map(|s| format!(": {s}"))
        .unwrap_or_default()
}

/// Loads the TLS programs; the reason when the kernel refuses them (TLS plaintext is then
/// not read, which the agent says, but the rest works).
pub(super) fn load(ebpf: &mut Ebpf, loops: Loops) -> Result<(), String> {
    let ret = loops.program(RETURN);
    for name in ENTRY.iter().chain(&GO).copied().chain([ret.as_str()]) {
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
    fn tls_attach(&mut self, path: &Path, plan: &Plan) -> Result<TlsLink, TlsProbeError> {
        if let Some(e) = &self.tls_unavailable {
            return Err(TlsProbeError::Unavailable(e.clone()));
        }
        let ret = self.loops.program(RETURN);
        let mut probes: Vec<(&str, u64)> = Vec::new();
        for hook in &plan.calls {
            probes.push((entry(hook.abi), hook.offset));
            probes.push((ret.as_str(), hook.offset));
        }
        if let Some(free) = plan.free {
            probes.push((FREE, free.offset));
        }
        if let Some(go) = plan.go {
            for (name, point) in GO.into_iter().zip(go.slots()) {
                if let Some(p) = point {
                    probes.push((name, p.offset));
                }
            }
        }
        let mut link = TlsLink(Vec::with_capacity(probes.len()));
        for (name, offset) in probes {
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

    fn attach(&mut self, path: &Path, plan: &Plan) -> Result<TlsLink, TlsProbeError> {
        self.tls_attach(path, plan)
    }

    fn detach(&mut self, link: TlsLink) {
        self.tls_detach(link)
    }
}
