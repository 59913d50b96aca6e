//! Resolves kernel struct field offsets from BTF so the kernel program can walk
//! task → fd table → socket → addresses on whatever kernel it runs on.
//!
//! Only the small part of the BTF format needed for member lookup is decoded: type headers,
//! struct/union members and the string table. Anonymous struct/union members are searched
//! through, as the kernel nests most socket fields inside them.
use kspan_common::KernelOffsets;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("BTF data is truncated or malformed at byte {0}")]
    Malformed(usize),
    #[error("not BTF data (bad magic)")]
    BadMagic,
    #[error("kernel BTF has no struct `{0}`")]
    NoStruct(String),
    #[error("kernel BTF struct `{0}` has no member `{1}`")]
    NoMember(String, String),
}

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// Byte offset within the parent.
    offset: u32,
}

#[derive(Debug)]
struct Type {
    name_off: u32,
    kind: u32,
    /// For modifiers and typedefs: the referenced type.
    type_ref: u32,
    members: Vec<Member>,
}

/// Decoded type table of one BTF blob.
pub struct Btf {
    types: Vec<Type>, // index = type id; id 0 is void
    strings: Vec<u8>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, BtfError> {
    data.get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(BtfError::Malformed(at))
}

impl Btf {
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let magic = data.get(0..2).ok_or(BtfError::Malformed(0))?;
        if magic != [0x9f, 0xeb] {
            return Err(BtfError::BadMagic);
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let types_start = hdr_len + type_off;
        let types_end = types_start + type_len;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(BtfError::Malformed(hdr_len + str_off))?
            .to_vec();
        if types_end > data.len() {
            return Err(BtfError::Malformed(types_end));
        }
        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            type_ref: 0,
            members: Vec::new(),
        }];
        let mut at = types_start;
        while at < types_end {
            let name_off = u32_at(data, at)?;
            let info = u32_at(data, at + 4)?;
            let size_or_type = u32_at(data, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let raw = u32_at(data, m + 8)?;
                        let bits = if kind_flag { raw & 0x00ff_ffff } else { raw };
                        members.push(Member {
                            name_off: u32_at(data, m)?,
                            type_id: u32_at(data, m + 4)?,
                            offset: bits / 8,
                        });
                    }
                    vlen * 12
                }
                KIND_ENUM | KIND_FUNC_PROTO => vlen * 8,
                KIND_DATASEC | KIND_ENUM64 => vlen * 12,
                _ => 0,
            };
            at += extra;
            types.push(Type {
                name_off,
                kind,
                type_ref: size_or_type,
                members,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }

    fn struct_id(&self, name: &str) -> Option<u32> {
        self.types
            .iter()
            .position(|t| {
                (t.kind == KIND_STRUCT || t.kind == KIND_UNION)
                    && !t.members.is_empty()
                    && self.name(t.name_off) == name.as_bytes()
            })
            .map(|i| i as u32)
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.type_ref
                }
                _ => break,
            }
        }
        id
    }

    /// Finds `name` in struct/union `id`, descending into anonymous members.
    fn find_member(&self, id: u32, name: &str, depth: u32) -> Option<(u32, u32)> {
        let t = self.types.get(id as usize)?;
        if depth > 8 {
            return None;
        }
        for m in &t.members {
            let mname = self.name(m.name_off);
            if mname == name.as_bytes() {
                return Some((m.offset, m.type_id));
            }
            if mname.is_empty() {
                let inner = self.resolve(m.type_id);
                if let Some((off, ty)) = self.find_member(inner, name, depth + 1) {
                    return Some((m.offset + off, ty));
                }
            }
        }
        None
    }

    /// Byte offset of `path` (member names, each within the previous member's type) from the
    /// start of struct `root`.
    pub fn offset_of(&self, root: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut id = self
            .struct_id(root)
            .ok_or_else(|| BtfError::NoStruct(root.to_string()))?;
        let mut total = 0;
        let mut parent = root.to_string();
        for field in path {
            let (off, ty) = self
                .find_member(id, field, 0)
                .ok_or_else(|| BtfError::NoMember(parent.clone(), field.to_string()))?;
            total += off;
            id = self.resolve(ty);
            parent = field.to_string();
        }
        Ok(total)
    }
}

/// Offsets of everything the kernel program reads, from the running kernel's BTF.
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    let sk = |field: &str| btf.offset_of("sock", &["__sk_common", field]);
    // IPv6 fields only exist with CONFIG_IPV6; without them IPv6 sockets report no addresses.
    let (v6_d, v6_s) = match (sk("skc_v6_daddr"), sk("skc_v6_rcv_saddr")) {
        (Ok(d), Ok(s)) => (d, s),
        _ => (0, 0),
    };
    Ok(KernelOffsets {
        task_files: btf.offset_of("task_struct", &["files"])?,
        files_fdt: btf.offset_of("files_struct", &["fdt"])?,
        fdt_fd: btf.offset_of("fdtable", &["fd"])?,
        fdt_max_fds: btf.offset_of("fdtable", &["max_fds"])?,
        file_private_data: btf.offset_of("file", &["private_data"])?,
        socket_sk: btf.offset_of("socket", &["sk"])?,
        skc_family: sk("skc_family")?,
        skc_daddr: sk("skc_daddr")?,
        skc_rcv_saddr: sk("skc_rcv_saddr")?,
        skc_dport: sk("skc_dport")?,
        skc_num: sk("skc_num")?,
        skc_v6_daddr: v6_d,
        skc_v6_rcv_saddr: v6_s,
        skc_net: sk("skc_net")?,
        net_ns_inum: btf.offset_of("net", &["ns", "inum"])?,
        socket_type: btf.offset_of("socket", &["type"])?,
        socket_file: btf.offset_of("socket", &["file"])?,
        task_real_parent: btf.offset_of("task_struct", &["real_parent"])?,
        task_tgid: btf.offset_of("task_struct", &["tgid"])?,
        valid: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob: `struct outer { int a; union { int b; struct inner c; }; }` with
    /// `struct inner { int x; int y; }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0inner\0x\0y\0".to_vec();
        let s = |name: &str| -> u32 {
            let pat = format!("\0{name}\0");
            strings
                .windows(pat.len())
                .position(|w| w == pat.as_bytes())
                .unwrap() as u32
                + 1
        };
        let mut t = Vec::new();
        let mut ty = |name: u32, kind: u32, vlen: u32, size: u32, extra: &[u32]| {
            for v in [name, (kind << 24) | vlen, size].iter().chain(extra) {
                t.extend_from_slice(&v.to_le_bytes());
            }
        };
        ty(s("int"), KIND_INT, 0, 4, &[32]); // 1
        ty(
            s("inner"),
            KIND_STRUCT,
            2,
            8,
            &[s("x"), 1, 0, s("y"), 1, 32],
        ); // 2
        ty(0, KIND_UNION, 2, 8, &[s("b"), 1, 0, s("c"), 4, 0]); // 3
        ty(0, KIND_TYPEDEF, 0, 2, &[]); // 4 = typedef to inner (anonymous name, fine for test)
        ty(s("outer"), KIND_STRUCT, 2, 12, &[s("a"), 1, 0, 0, 3, 32]); // 5
        let mut out = Vec::new();
        out.extend_from_slice(&[0x9f, 0xeb, 1, 0]);
        out.extend_from_slice(&24u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(t.len() as u32).to_le_bytes());
        out.extend_from_slice(&(t.len() as u32).to_le_bytes());
        out.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        out.extend_from_slice(&t);
        out.extend_from_slice(&strings);
        out
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_typedefs() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.offset_of("outer", &["a"]).unwrap(), 0);
        assert_eq!(btf.offset_of("outer", &["b"]).unwrap(), 4);
        assert_eq!(btf.offset_of("outer", &["c", "y"]).unwrap(), 8);
        assert!(matches!(
            btf.offset_of("outer", &["z"]),
            Err(BtfError::NoMember(..))
        ));
        assert!(matches!(
            btf.offset_of("nope", &["a"]),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(matches!(Btf::parse(b"xx"), Err(BtfError::BadMagic)));
        let mut blob = sample();
        blob.truncate(40);
        assert!(Btf::parse(&blob).is_err());
        assert!(Btf::parse(&[]).is_err());
    }

    #[test]
    fn running_kernel_offsets_resolve() {
        // Every machine kspan supports has BTF; a missing file is a real failure here.
        let data = std::fs::read("/sys/kernel/btf/vmlinux").expect("kernel BTF");
        let offs = kernel_offsets(&Btf::parse(&data).unwrap()).unwrap();
        // sock_common starts with the address pair on every kernel since 2.6.
        assert_eq!(offs.skc_daddr, 0);
        assert_eq!(offs.skc_rcv_saddr, 4);
        assert!(offs.task_files > 0 && offs.skc_num > offs.skc_dport);
    }
}
