//! Go executables: where the goroutine probes (`kspan-ebpf/src/go.rs`) go in one.
//!
//! Go moves goroutines between threads, and net/http writes a client request from the
//! connection's own writer goroutine, so relating a Go service's outgoing call to the request
//! it serves takes the runtime's view: who created each goroutine (the calls of `newproc1` and
//! `runqput` inside `runtime.newproc.func1`, direct calls the kernel emulates) and which
//! goroutine hands a request to which connection (`(*persistConn).roundTrip`) and which one
//! writes that connection (`(*persistConn).writeLoop`), probed past their stack check on the
//! conditional jump the kernel emulates. Symbols come from `.symtab`: a binary built with
//! `-ldflags=-s` has none, and its calls are then linked only by trace headers.
use iced_x86::{FlowControl, Register};
use object::{Object, ObjectSymbol};

use crate::tls::{
    library::file_func,
    placement::{self, Func, Point, Text},
};

/// The goroutine probes of one executable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The call of `runtime.newproc1` (creator in the second argument register)…
    pub newproc: Option<Point>,
    /// … and of `runtime.runqput` (the new goroutine in the second argument register).
    pub runqput: Option<Point>,
    pub round_trip: Option<Point>,
    pub write_loop: Option<Point>,
}

impl Plan {
    /// The probes in a fixed order (the kernel program of each is named in that order by
    /// `capture::uprobes`).
    pub fn slots(&self) -> [Option<Point>; 4] {
        [self.newproc, self.runqput, self.round_trip, self.write_loop]
    }

    pub fn points(&self) -> impl Iterator<Item = Point> {
        self.slots().into_iter().flatten()
    }
}

/// The functions the probes go in or look for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Symbols {
    pub newproc_func1: Option<Func>,
    pub newproc1: Option<Func>,
    pub runqput: Option<Func>,
    pub round_trip: Option<Func>,
    pub write_loop: Option<Func>,
}

/// The Go runtime's functions in an ELF file (`None` unless it is a Go executable with its
/// symbol table).
pub fn symbols(elf: &object::File<'_>) -> Option<Symbols> {
    elf.section_by_name(".go.buildinfo")?;
    let mut s = Symbols::default();
    for sym in elf.symbols() {
        let slot = match sym.name() {
            Ok("runtime.newproc.func1") => &mut s.newproc_func1,
            Ok("runtime.newproc1") => &mut s.newproc1,
            Ok("runtime.runqput") => &mut s.runqput,
            Ok("net/http.(*persistConn).roundTrip") => &mut s.round_trip,
            Ok("net/http.(*persistConn).writeLoop") => &mut s.write_loop,
            _ => continue,
        };
        *slot = file_func(elf, &sym);
    }
    (s != Symbols::default()).then_some(s)
}

/// Where the probes go; `None` when no pair of them can be placed.
pub fn plan<T: Text + ?Sized>(text: &T, s: &Symbols) -> Option<Plan> {
    let calls = |target: Option<Func>| {
        let (func1, target) = (s.newproc_func1?, target?);
        call_of(text, func1, target.at)
    };
    // The stack check only reads the goroutine register; the probes read it and the first
    // argument register.
    let entry = |f: Option<Func>| {
        f.map(|f| placement::point(text, f.at, &[Register::RAX, Register::R14], false))
    };
    // Each probe is of use only with its pair.
    let (newproc, runqput) = calls(s.newproc1).zip(calls(s.runqput)).unzip();
    let (round_trip, write_loop) = entry(s.round_trip).zip(entry(s.write_loop)).unzip();
    let plan = Plan {
        newproc,
        runqput,
        round_trip,
        write_loop,
    };
    (plan.points().next().is_some()).then_some(plan)
}

/// The one direct call of `target` in `f` (a call instruction is emulated, and its argument
/// registers are set).
fn call_of<T: Text + ?Sized>(text: &T, f: Func, target: u64) -> Option<Point> {
    let size = usize::try_from(f.size.min(1024)).ok()?;
    let mut calls = placement::decode(text, f.at, size)
        .1
        .into_iter()
        .filter(|i| i.flow_control() == FlowControl::Call && i.near_branch_target() == target);
    let call = calls.next()?;
    calls.next().is_none().then_some(Point {
        offset: call.ip(),
        stepped: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `runtime.newproc.func1` as Go 1.19 compiles it, at offset 0x100; `newproc1` at 0x180,
    /// `runqput` at 0x200.
    const FUNC1: [u8; 0x46] = [
        0x49, 0x3b, 0x66, 0x10, // cmp 0x10(%r14),%rsp
        0x76, 0x57, // jbe morestack
        0x48, 0x83, 0xec, 0x20, // sub $0x20,%rsp
        0x48, 0x89, 0x6c, 0x24, 0x18, // mov %rbp,0x18(%rsp)
        0x48, 0x8d, 0x6c, 0x24, 0x18, // lea 0x18(%rsp),%rbp
        0x48, 0x8b, 0x5a, 0x10, // mov 0x10(%rdx),%rbx
        0x48, 0x8b, 0x4a, 0x18, // mov 0x18(%rdx),%rcx
        0x48, 0x8b, 0x42, 0x08, // mov 0x8(%rdx),%rax
        0xe8, 0x5b, 0x00, 0x00, 0x00, // call 0x180 (from 0x125)
        0x49, 0x8b, 0x56, 0x30, // mov 0x30(%r14),%rdx
        0x48, 0x8b, 0x92, 0xd0, 0x00, 0x00, 0x00, // mov 0xd0(%rdx),%rdx
        0x48, 0x89, 0xc3, // mov %rax,%rbx
        0xb9, 0x01, 0x00, 0x00, 0x00, // mov $1,%ecx
        0x48, 0x89, 0xd0, // mov %rdx,%rax
        0x90, // nop
        0xe8, 0xbf, 0x00, 0x00, 0x00, // call 0x200 (from 0x141)
        0x48, 0x83, 0xc4, 0x20, // add $0x20,%rsp
        0xc3, // ret
    ];

    #[test]
    fn goroutine_creation_is_probed_on_its_two_calls() {
        let mut text = vec![0xccu8; 0x300];
        text[0x100..0x146].copy_from_slice(&FUNC1);
        // persistConn.roundTrip: lea -0x230(%rsp),%r12; cmp 0x10(%r14),%r12; jbe …
        let round_trip = [
            0x4c, 0x8d, 0xa4, 0x24, 0xd0, 0xfd, 0xff, 0xff, 0x4d, 0x3b, 0x66, 0x10, 0x0f, 0x86,
            0xc3, 0x0e, 0x00, 0x00,
        ];
        text[0x260..0x272].copy_from_slice(&round_trip);
        let f = |at, size| Some(Func { at, size });
        let s = Symbols {
            newproc_func1: f(0x100, 0x46),
            newproc1: f(0x180, 0x40),
            runqput: f(0x200, 0x40),
            round_trip: f(0x260, 0x20),
            write_loop: None,
        };
        let plan = plan(text.as_slice(), &s).expect("a plan");
        let at = |offset| {
            Some(Point {
                offset,
                stepped: false,
            })
        };
        assert_eq!(plan.newproc, at(0x120));
        assert_eq!(plan.runqput, at(0x13c));
        assert_eq!(plan.round_trip, None, "of no use without writeLoop");
        let both = Symbols {
            write_loop: s.round_trip,
            ..s
        };
        let plan = super::plan(text.as_slice(), &both).expect("a plan");
        assert_eq!(plan.round_trip, at(0x26c), "the jbe after the stack check");
        assert_eq!(plan.points().count(), 4);
    }

    #[test]
    fn not_go_no_plan() {
        let exe = std::fs::read("/proc/self/exe").expect("own executable");
        let elf = object::File::parse(&*exe).expect("ELF");
        assert_eq!(symbols(&elf), None);
    }
}
