//! Builds the kernel programs with nightly + bpf-linker and leaves them in OUT_DIR.
//!
//! When the eBPF toolchain is missing (plain `cargo check` on a laptop) or `AYA_BUILD_SKIP=1`,
//! an empty stub object is written instead so the userspace crate still compiles; the binary
//! then refuses to start with a message that says how to build it properly.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

const OBJECT: &str = "kspan-ebpf";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let stub = out_dir.join(OBJECT);
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let have_linker = which("bpf-linker");
    if skip || !have_linker {
        println!(
            "cargo:warning=building kspan without eBPF programs ({}); run `cargo xtask setup` for a working agent",
            if skip {
                "AYA_BUILD_SKIP set"
            } else {
                "bpf-linker not found"
            }
        );
        fs::write(&stub, b"").context("writing eBPF stub")?;
        // Build again once `cargo xtask setup` installs the linker (a path that does not
        // exist keeps the script running on every build until it does).
        println!("cargo:rerun-if-env-changed=PATH");
        if let Some(home) = env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        {
            println!(
                "cargo:rerun-if-changed={}",
                home.join("bin/bpf-linker").display()
            );
        }
        return Ok(());
    }
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?)
        .join("../agent-ebpf");
    let root = root.to_str().context("non-UTF-8 path")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "kspan-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}

fn which(program: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}
