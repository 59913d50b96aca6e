//! TLS plaintext: which files carry a TLS library kspan can hook, which processes use one, and
//! why a TLS connection's plaintext could not be read. The hooks themselves are the kernel's
//! (`kspan-ebpf/src/tls.rs`); `capture` attaches them where [`attach::Attacher`] says.
pub mod attach;
pub mod library;
pub mod placement;

/// Whether a process's TLS is read at its library.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coverage {
    Hooked,
    Not(Uncovered),
}

/// Why a TLS connection's plaintext was not read: the label of
/// `kspan_connections_tls_unsupported_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Uncovered {
    /// Go's `crypto/tls`, compiled into the executable.
    Go,
    /// Java's JSSE, in the JVM.
    Java,
    GnuTls,
    /// Mozilla NSS.
    Nss,
    /// A TLS library was found but its probes could not be attached.
    AttachFailed,
    /// No library kspan knows is mapped: rustls, or OpenSSL/BoringSSL linked in statically
    /// without exported symbols (grpcio, Envoy).
    Unrecognised,
    /// The library is hooked, yet no plaintext was read (a connection that only shook hands,
    /// or calls whose socket could not be told).
    NoPlaintext,
    /// The connection ended before its process was looked at.
    Unclassified,
}

impl Uncovered {
    pub const COUNT: usize = 8;
    pub const ALL: [Uncovered; Self::COUNT] = [
        Uncovered::Go,
        Uncovered::Java,
        Uncovered::GnuTls,
        Uncovered::Nss,
        Uncovered::AttachFailed,
        Uncovered::Unrecognised,
        Uncovered::NoPlaintext,
        Uncovered::Unclassified,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn label(self) -> &'static str {
        match self {
            Uncovered::Go => "go_crypto_tls",
            Uncovered::Java => "java_jsse",
            Uncovered::GnuTls => "gnutls",
            Uncovered::Nss => "nss",
            Uncovered::AttachFailed => "attach_failed",
            Uncovered::Unrecognised => "unrecognised_library",
            Uncovered::NoPlaintext => "no_plaintext",
            Uncovered::Unclassified => "unclassified",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_slot_and_label() {
        for (i, why) in Uncovered::ALL.iter().enumerate() {
            assert_eq!(why.index(), i);
        }
        let mut labels: Vec<_> = Uncovered::ALL.iter().map(|w| w.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Uncovered::COUNT);
    }
}
