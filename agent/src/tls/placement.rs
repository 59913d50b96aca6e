//! Where on a TLS function its probes go.
//!
//! A uprobe replaces one instruction with a breakpoint. The kernel emulates a few instructions
//! (a register `push`, direct jumps and calls, `nop`); any other is copied out of line and
//! single-stepped, a second trap. Under a hypervisor that second trap is the cost: measured on
//! this Firecracker VM, 30 µs per hit against 0.7 µs on an emulated `push` (a return probe adds
//! 0.4 µs), and one probe on OpenSSL 3.0's `SSL_read`, which opens with `sub $0x18,%rsp`, took
//! wrk → nginx over HTTPS from 37k to 8.9k requests/s. OpenSSL's public wrappers open with a
//! stack adjustment, but the internal function that the plain and `_ex` forms both call
//! (`ssl_read_internal`, `ssl_write_internal`) opens with pushes. So each probe goes on the first
//! emulated instruction of the function, or of that shared callee, and on a single-stepped entry
//! only when neither has one.
use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess, Register,
};

/// What the entry probe reads at a hooked function: the arguments of the public forms, or of
/// the internal function (the `_ex` shape; OpenSSL ≥ 3.3's `ssl_write_internal` takes a flags
/// argument before the count pointer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abi {
    /// `int SSL_read(SSL *, void *, int)`: the result is the byte count.
    Read,
    /// `int SSL_read_ex(SSL *, void *, size_t, size_t *count)`.
    ReadEx,
    Write,
    WriteEx,
    /// `int ssl_write_internal(SSL *, const void *, size_t, uint64_t flags, size_t *count)`.
    WriteEx2,
}

impl Abi {
    /// The argument registers the entry probe reads (System V AMD64).
    fn reads(self) -> &'static [Register] {
        match self {
            Abi::Read | Abi::Write => &[Register::RDI, Register::RSI],
            Abi::ReadEx | Abi::WriteEx => &[Register::RDI, Register::RSI, Register::RCX],
            Abi::WriteEx2 => &[Register::RDI, Register::RSI, Register::R8],
        }
    }
}

/// One entry-and-return probe pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    /// File offset of the probed instruction.
    pub offset: u64,
    pub abi: Abi,
    /// The instruction there is single-stepped (slow under a hypervisor).
    pub stepped: bool,
}

/// An entry-only probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Point {
    pub offset: u64,
    pub stepped: bool,
}

/// An exported function: its file offset and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Func {
    pub at: u64,
    pub size: u64,
}

/// The OpenSSL API a file exports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exports {
    pub read: Option<Func>,
    pub write: Option<Func>,
    pub read_ex: Option<Func>,
    pub write_ex: Option<Func>,
    /// OpenSSL ≥ 3.3; `SSL_write_ex` may reach the internal function only through it.
    pub write_ex2: Option<Func>,
    pub free: Option<Func>,
}

/// Where the probes of one file go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub calls: Vec<Hook>,
    /// `SSL_free`'s entry probe (reads only the `SSL *`).
    pub free: Option<Point>,
    /// A Go executable's goroutine probes (it has no OpenSSL then).
    pub go: Option<crate::golang::Plan>,
}

impl Plan {
    /// Probes in the plan, return probes left out.
    pub fn probes(&self) -> usize {
        self.points().count()
    }

    /// Probes whose instruction is single-stepped.
    pub fn stepped(&self) -> usize {
        self.points().filter(|p| p.stepped).count()
    }

    /// Whether the file's TLS plaintext is read (not only its goroutines followed).
    pub fn reads_tls(&self) -> bool {
        !self.calls.is_empty()
    }

    fn points(&self) -> impl Iterator<Item = Point> + '_ {
        let calls = self.calls.iter().map(|h| Point {
            offset: h.offset,
            stepped: h.stepped,
        });
        let go = self.go.iter().flat_map(|g| g.points());
        calls.chain(self.free).chain(go)
    }
}

/// The plan for a file whose bytes are `text` (offsets are file offsets); `None` when it does
/// not export `SSL_read` and `SSL_write`.
pub fn plan<T: Text + ?Sized>(text: &T, e: &Exports) -> Option<Plan> {
    let (read, write) = (e.read?, e.write?);
    let mut calls = direction(
        text,
        (read, Abi::Read),
        e.read_ex.map(|f| (f, Abi::ReadEx)),
        e.read_ex.map(|f| (f, Abi::ReadEx)),
    );
    let via = match e.write_ex2 {
        Some(f) => Some((f, Abi::WriteEx2)),
        None => e.write_ex.map(|f| (f, Abi::WriteEx)),
    };
    calls.extend(direction(
        text,
        (write, Abi::Write),
        e.write_ex.map(|f| (f, Abi::WriteEx)),
        via,
    ));
    let free = e.free.map(|f| point(text, f.at, &[Register::RDI], false));
    Some(Plan {
        calls,
        free,
        go: None,
    })
}

/// The hooks of one direction: the public forms where they open with an emulated instruction,
/// else the one callee the plain form and `via` share, else the public forms' entries.
fn direction<T: Text + ?Sized>(
    text: &T,
    plain: (Func, Abi),
    ex: Option<(Func, Abi)>,
    via: Option<(Func, Abi)>,
) -> Vec<Hook> {
    let public: Vec<Hook> = [Some(plain), ex]
        .into_iter()
        .flatten()
        .map(|(f, abi)| Hook::at(point(text, f.at, abi.reads(), true), abi))
        .collect();
    if public.iter().any(|h| h.stepped)
        && let Some((via, abi)) = via
        && let Some(offset) = shared_callee(text, plain.0, via)
            .and_then(|callee| emulated_from(text, callee, abi.reads(), true))
    {
        return vec![Hook {
            offset,
            abi,
            stepped: false,
        }];
    }
    public
}

/// The emulated instruction [`emulated_from`] finds, else the entry, single-stepped.
pub(crate) fn point<T: Text + ?Sized>(text: &T, at: u64, reads: &[Register], frame: bool) -> Point {
    match emulated_from(text, at, reads, frame) {
        Some(offset) => Point {
            offset,
            stepped: false,
        },
        None => Point {
            offset: at,
            stepped: true,
        },
    }
}

impl Hook {
    fn at(p: Point, abi: Abi) -> Self {
        Self {
            offset: p.offset,
            abi,
            stepped: p.stepped,
        }
    }
}

/// The instruction within [`REACH`] instructions of `at` the kernel emulates, reached without a
/// branch and without writing the registers the probe reads or, for a return probe (`frame`),
/// the stack pointer (the kernel takes the return address from the top of the stack).
fn emulated_from<T: Text + ?Sized>(
    text: &T,
    at: u64,
    reads: &[Register],
    frame: bool,
) -> Option<u64> {
    const REACH: usize = 6;
    let mut info = InstructionInfoFactory::new();
    let (bytes, insns) = decode(text, at, REACH * 15);
    for insn in insns.iter().take(REACH) {
        let start = usize::try_from(insn.ip() - at).ok()?;
        if emulated(bytes.get(start..start + insn.len())?) {
            return Some(insn.ip());
        }
        if insn.flow_control() != FlowControl::Next {
            return None;
        }
        let used = info.info(insn);
        let clobbers = used.used_registers().iter().any(|r| {
            writes(r.access())
                && (reads.contains(&r.register().full_register())
                    || (frame && r.register().full_register() == Register::RSP))
        });
        let stores = used.used_memory().iter().any(|m| writes(m.access()));
        if clobbers || (frame && stores) {
            return None;
        }
    }
    None
}

fn writes(access: OpAccess) -> bool {
    !matches!(
        access,
        OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess | OpAccess::None
    )
}

/// The opcodes x86 uprobes emulate instead of single-stepping: `push` of a register (only the
/// REX.B prefix is accepted), `nop`, and direct `call`, `jmp` and `jcc` without prefixes.
fn emulated(insn: &[u8]) -> bool {
    matches!(
        insn,
        [0x50..=0x57]
            | [0x41, 0x50..=0x57]
            | [0x90]
            | [0xe8, _, _, _, _]
            | [0xe9, _, _, _, _]
            | [0xeb, _]
            | [0x70..=0x7f, _]
            | [0x0f, 0x80..=0x8f, _, _, _, _]
    )
}

/// The one function both `a` and `b` call directly (or jump to outside themselves); `None`
/// when they share none or several (error paths share `ERR_new`, which is why the plain form
/// alone is not trusted).
fn shared_callee<T: Text + ?Sized>(text: &T, a: Func, b: Func) -> Option<u64> {
    let (ca, cb) = (callees(text, a), callees(text, b));
    let mut shared = ca.iter().filter(|t| cb.contains(t));
    let one = *shared.next()?;
    shared.all(|&t| t == one).then_some(one)
}

fn callees<T: Text + ?Sized>(text: &T, f: Func) -> Vec<u64> {
    let size = usize::try_from(f.size.min(4096)).unwrap_or(0);
    let inside = |t: u64| t >= f.at && t < f.at + f.size;
    decode(text, f.at, size)
        .1
        .into_iter()
        .filter(|i| match i.flow_control() {
            FlowControl::Call => true,
            FlowControl::UnconditionalBranch => !inside(i.near_branch_target()),
            _ => false,
        })
        .map(|i| i.near_branch_target())
        .filter(|&t| t != 0 && t != f.at)
        .collect()
}

/// Instructions from file offset `at`, at most `len` bytes of them, using file offsets as
/// addresses (direct branches within the text segment keep their targets), with those bytes.
pub(crate) fn decode<T: Text + ?Sized>(
    text: &T,
    at: u64,
    len: usize,
) -> (Vec<u8>, Vec<Instruction>) {
    let bytes = text.bytes(at, len);
    let insns = Decoder::with_ip(64, &bytes, at, DecoderOptions::NONE)
        .into_iter()
        .take_while(|i| !i.is_invalid())
        .collect();
    (bytes, insns)
}

/// A file's bytes as stored. Read, not mapped: the kernel puts the breakpoints of probes
/// already on a file (another agent's, or kspan's own before a restart) into every mapping of
/// it, and a plan made from a breakpoint would find nothing to emulate.
pub trait Text {
    /// Up to `len` bytes from offset `at`; fewer at the end of the file or on an error.
    fn bytes(&self, at: u64, len: usize) -> Vec<u8>;
}

/// Synthetic code in the tests.
#[cfg(test)]
impl Text for [u8] {
    fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let start = usize::try_from(at).unwrap_or(usize::MAX).min(self.len());
        self[start..start.saturating_add(len).min(self.len())].to_vec()
    }
}

impl Text for std::fs::File {
    fn bytes(&self, at: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; len];
        let mut got = 0;
        while got < len {
            match self.read_at(&mut buf[got..], at + got as u64) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        buf.truncate(got);
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn func(at: u64, size: u64) -> Option<Func> {
        Some(Func { at, size })
    }

    /// A text with functions at fixed offsets, padded with `int3`.
    fn text(parts: &[(u64, &[u8])]) -> Vec<u8> {
        let mut t = vec![0xcc; 0x400];
        for (at, bytes) in parts {
            t[*at as usize..*at as usize + bytes.len()].copy_from_slice(bytes);
        }
        t
    }

    /// `call` from `at` (5 bytes) to `to`.
    fn call(at: u64, to: u64) -> [u8; 5] {
        let rel = (to as i64 - (at as i64 + 5)) as i32;
        let r = rel.to_le_bytes();
        [0xe8, r[0], r[1], r[2], r[3]]
    }

    // sub $0x18,%rsp ; OpenSSL's wrappers open this way.
    const SUB_RSP: [u8; 4] = [0x48, 0x83, 0xec, 0x18];
    const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
    const PUSH_R13: [u8; 2] = [0x41, 0x55];

    #[test]
    fn wrappers_that_share_an_internal_function_are_hooked_there_once() {
        let (read, read_ex, internal) = (0x100, 0x140, 0x200);
        let t = text(&[
            (read, &SUB_RSP),
            (read + 4, &call(read + 4, internal)),
            (read + 9, &[0xc3]),
            (read_ex, &SUB_RSP),
            (read_ex + 4, &call(read_ex + 4, internal)),
            (read_ex + 9, &[0xc3]),
            (internal, &ENDBR64),
            (internal + 4, &PUSH_R13),
        ]);
        let e = Exports {
            read: func(read, 10),
            read_ex: func(read_ex, 10),
            write: func(read, 10),
            ..Exports::default()
        };
        let plan = plan(&t[..], &e).expect("read and write");
        assert_eq!(
            plan.calls[0],
            Hook {
                offset: internal + 4,
                abi: Abi::ReadEx,
                stepped: false
            },
            "after endbr64, on the push"
        );
        assert_eq!(
            plan.calls.len(),
            2,
            "one read hook; write has no _ex form to pair with"
        );
        assert!(plan.calls[1].stepped);
    }

    #[test]
    fn an_emulated_first_instruction_keeps_the_public_entry() {
        // push %rbp ; mov %rsp,%rbp — Node.js's OpenSSL.
        let t = text(&[
            (0x100, &[0x55, 0x48, 0x89, 0xe5]),
            (0x140, &[0x55, 0x48, 0x89, 0xe5]),
        ]);
        let e = Exports {
            read: func(0x100, 4),
            write: func(0x140, 4),
            ..Exports::default()
        };
        let plan = plan(&t[..], &e).expect("plan");
        assert_eq!(
            plan.calls,
            vec![
                Hook {
                    offset: 0x100,
                    abi: Abi::Read,
                    stepped: false
                },
                Hook {
                    offset: 0x140,
                    abi: Abi::Write,
                    stepped: false
                },
            ]
        );
        assert_eq!(plan.stepped(), 0);
    }

    #[test]
    fn several_shared_callees_are_not_trusted() {
        let (read, read_ex, a, b) = (0x100u64, 0x140u64, 0x200u64, 0x280u64);
        let t = text(&[
            (read, &call(read, a)),
            (read + 5, &call(read + 5, b)),
            (read_ex, &call(read_ex, b)),
            (read_ex + 5, &call(read_ex + 5, a)),
            (a, &PUSH_R13),
            (b, &PUSH_R13),
        ]);
        // Both wrappers open with a call, which is emulated: their entries are used as they are.
        let e = Exports {
            read: func(read, 10),
            read_ex: func(read_ex, 10),
            write: func(read, 10),
            ..Exports::default()
        };
        assert!(!plan(&t[..], &e).expect("plan").calls[0].stepped);
        assert_eq!(
            shared_callee(
                &t[..],
                Func { at: read, size: 10 },
                Func {
                    at: read_ex,
                    size: 10
                }
            ),
            None
        );
    }

    #[test]
    fn a_probe_never_moves_past_a_write_to_what_it_reads() {
        // mov %rcx,%r8 ; push %rbx: the count pointer is gone by the push.
        let t = text(&[(0x100, &[0x49, 0x89, 0xc8, 0x53])]);
        assert_eq!(
            emulated_from(&t[..], 0x100, Abi::WriteEx2.reads(), true),
            None
        );
        assert_eq!(
            emulated_from(&t[..], 0x100, Abi::Write.reads(), true),
            Some(0x103)
        );
        // test %rdi,%rdi ; je — SSL_free's probe can go on the branch; a return probe cannot
        // follow a stack adjustment.
        let t = text(&[
            (0x100, &[0x48, 0x85, 0xff, 0x74, 0x10]),
            (0x140, &[0x48, 0x83, 0xec, 0x18, 0x53]),
        ]);
        assert_eq!(
            emulated_from(&t[..], 0x100, &[Register::RDI], false),
            Some(0x103)
        );
        assert_eq!(emulated_from(&t[..], 0x140, &[Register::RDI], true), None);
        assert_eq!(
            emulated_from(&t[..], 0x140, &[Register::RDI], false),
            Some(0x144)
        );
    }

    /// The installed OpenSSL 3.0 (Debian bookworm): both directions land on the internal
    /// functions, nothing single-stepped.
    #[test]
    fn this_systems_openssl_needs_no_single_step() {
        let lib = std::path::Path::new("/usr/lib/x86_64-linux-gnu/libssl.so.3");
        let plan = crate::tls::library::plan(lib)
            .expect("readable")
            .expect("OpenSSL");
        assert_eq!(plan.stepped(), 0, "{plan:?}");
        let abis: Vec<Abi> = plan.calls.iter().map(|h| h.abi).collect();
        assert_eq!(abis, vec![Abi::ReadEx, Abi::WriteEx]);
    }
}
