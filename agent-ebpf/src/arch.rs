//! Everything that differs between CPU architectures: syscall numbers and where the syscall's
//! number and arguments sit in `struct pt_regs` at `sys_exit` (the return value has already
//! replaced the first return register by then, so arguments come from the saved copies).

#[cfg(bpf_target_arch = "x86_64")]
mod imp {
    pub const NR_READ: i64 = 0;
    pub const NR_WRITE: i64 = 1;
    pub const NR_CLOSE: i64 = 3;
    pub const NR_READV: i64 = 19;
    pub const NR_WRITEV: i64 = 20;
    pub const NR_SENDFILE: i64 = 40;
    pub const NR_CONNECT: i64 = 42;
    pub const NR_ACCEPT: i64 = 43;
    pub const NR_SENDTO: i64 = 44;
    pub const NR_RECVFROM: i64 = 45;
    pub const NR_SENDMSG: i64 = 46;
    pub const NR_RECVMSG: i64 = 47;
    pub const NR_ACCEPT4: i64 = 288;
    pub const NR_DUP: i64 = 32;
    pub const NR_DUP2: i64 = 33;
    pub const NR_DUP3: i64 = 292;

    /// `orig_ax`: the syscall number survives in it after `ax` takes the return value.
    pub const REG_NR: usize = 120;
    pub const REG_ARG0: usize = 112; // di
    pub const REG_ARG1: usize = 104; // si
    pub const REG_ARG2: usize = 96; // dx

    /// Go's register ABI (Go ≥ 1.17): the running goroutine, and the first two arguments.
    pub const REG_GO_G: usize = 8; // r14
    pub const REG_GO_ARG0: usize = 80; // ax
    pub const REG_GO_ARG1: usize = 40; // bx
}

#[cfg(bpf_target_arch = "aarch64")]
mod imp {
    pub const NR_READ: i64 = 63;
    pub const NR_WRITE: i64 = 64;
    pub const NR_CLOSE: i64 = 57;
    pub const NR_READV: i64 = 65;
    pub const NR_WRITEV: i64 = 66;
    pub const NR_SENDFILE: i64 = 71;
    pub const NR_CONNECT: i64 = 203;
    pub const NR_ACCEPT: i64 = 202;
    pub const NR_SENDTO: i64 = 206;
    pub const NR_RECVFROM: i64 = 207;
    pub const NR_SENDMSG: i64 = 211;
    pub const NR_RECVMSG: i64 = 212;
    pub const NR_ACCEPT4: i64 = 242;
    pub const NR_DUP: i64 = 23;
    /// arm64 has no dup2: libc implements it with dup3.
    pub const NR_DUP2: i64 = -1;
    pub const NR_DUP3: i64 = 24;

    /// `syscallno`.
    pub const REG_NR: usize = 280;
    /// `orig_x0`: x0 is overwritten by the return value.
    pub const REG_ARG0: usize = 272;
    pub const REG_ARG1: usize = 8; // regs[1]
    pub const REG_ARG2: usize = 16; // regs[2]

    /// Go's register ABI (Go ≥ 1.18 on arm64): the running goroutine, and the first two
    /// arguments.
    pub const REG_GO_G: usize = 224; // regs[28]
    pub const REG_GO_ARG0: usize = 0;
    pub const REG_GO_ARG1: usize = 8;
}

pub use imp::*;

/// `-EINPROGRESS`: a non-blocking connect() that will complete later is still a connection.
pub const EINPROGRESS: i64 = 115;
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

// Userspace struct layouts (LP64, identical on both architectures).
pub const IOVEC_SIZE: usize = 16;
pub const MSGHDR_IOV: usize = 16;
pub const MSGHDR_IOVLEN: usize = 24;
