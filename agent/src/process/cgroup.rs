//! Container and pod identity from a process's cgroup paths (`/proc/<pid>/cgroup`).
//!
//! Runtimes name a container's cgroup after its 64-hex id, and the kubelet nests it under a
//! cgroup named after the pod's UID, in one of two layouts:
//! - cgroupfs: `/kubepods/burstable/pod<uid>/<container id>`
//! - systemd: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope`
//!
//! Docker (`/docker/<id>`, `docker-<id>.scope`), CRI-O (`crio-<id>.scope`) and Podman
//! (`libpod-<id>.scope`) follow the same pattern.

use procfs::ProcessCGroups;

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Cgroup {
    /// The unified (v2) path, else the first v1 path that names a container.
    pub path: String,
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
}

/// Picks the path that identifies the process's container from its cgroup memberships.
pub fn parse(groups: &ProcessCGroups) -> Cgroup {
    let unified = || {
        groups
            .0
            .iter()
            .find(|g| g.hierarchy == 0 && g.controllers.is_empty())
    };
    // A v1 hierarchy can name the container where the v2 path is just "/" (hybrid hosts).
    let path = unified()
        .filter(|g| container_id(&g.pathname).is_some())
        .or_else(|| {
            groups
                .0
                .iter()
                .find(|g| container_id(&g.pathname).is_some())
        })
        .or_else(unified)
        .or_else(|| groups.0.first())
        .map(|g| g.pathname.as_str())
        .unwrap_or_default();
    Cgroup {
        path: path.to_string(),
        container_id: container_id(path),
        pod_uid: pod_uid(path),
    }
}

/// [`parse`] of the text of a `/proc/<pid>/cgroup` file (tests).
#[cfg(test)]
pub fn parse_text(contents: &str) -> Cgroup {
    use procfs::FromRead as _;
    let groups = ProcessCGroups::from_read(contents.as_bytes());
    parse(&groups.unwrap_or(ProcessCGroups(Vec::new())))
}

/// The innermost path segment that carries a 64-hex container id.
fn container_id(path: &str) -> Option<String> {
    path.rsplit('/').find_map(|seg| {
        let seg = seg.strip_suffix(".scope").unwrap_or(seg);
        // `cri-containerd-<id>`, `docker-<id>`: the id follows the last dash.
        let id = seg.rsplit('-').next().unwrap_or(seg);
        (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| id.to_ascii_lowercase())
    })
}

/// The pod UID from a `pod<uid>` segment (systemd writes its dashes as underscores).
fn pod_uid(path: &str) -> Option<String> {
    path.split('/').find_map(|seg| {
        let seg = seg.strip_suffix(".slice").unwrap_or(seg);
        let at = seg.rfind("pod")?;
        let uid = seg[at + 3..].replace('_', "-");
        is_uuid(&uid).then(|| uid.to_ascii_lowercase())
    })
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, &c)| match i {
            8 | 13 | 18 | 23 => c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::parse_text as parse;

    const ID: &str = "4b1a5e3c9d2f8e7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a";
    const UID: &str = "0f8e2b9a-1c3d-4e5f-8a7b-6c5d4e3f2a1b";

    #[test]
    fn kubernetes_systemd_layout() {
        let uid_ = UID.replace('-', "_");
        let c = parse(&format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope\n"
        ));
        assert_eq!(c.container_id.as_deref(), Some(ID));
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert!(c.path.starts_with("/kubepods.slice/"));
    }

    #[test]
    fn kubernetes_cgroupfs_v1_layout() {
        let c = parse(&format!(
            "12:pids:/kubepods/besteffort/pod{UID}/{ID}\n11:memory:/kubepods/besteffort/pod{UID}/{ID}\n0::/\n"
        ));
        assert_eq!(c.container_id.as_deref(), Some(ID));
        assert_eq!(c.pod_uid.as_deref(), Some(UID));
        assert_eq!(c.path, format!("/kubepods/besteffort/pod{UID}/{ID}"));
    }

    #[test]
    fn plain_runtimes_and_hosts() {
        for (line, id) in [
            (format!("0::/system.slice/docker-{ID}.scope"), Some(ID)),
            (format!("0::/docker/{ID}"), Some(ID)),
            (
                format!("0::/machine.slice/libpod-{ID}.scope/container"),
                Some(ID),
            ),
            (format!("0::/crio-{ID}.scope"), Some(ID)),
            (
                "0::/user.slice/user-0.slice/session-3.scope".to_string(),
                None,
            ),
            ("0::/".to_string(), None),
        ] {
            let c = parse(&line);
            assert_eq!(c.container_id.as_deref(), id, "{line}");
            assert_eq!(c.pod_uid, None, "{line}");
        }
    }

    #[test]
    fn garbage_gives_nothing_and_never_panics() {
        for s in [
            "",
            ":::",
            "no colons at all",
            "0::/pod",
            "0::/podé̀é",
            "0::/kubepods/podnot-a-uuid/abc",
            &format!("0::/{}", "f".repeat(63)),
        ] {
            let c = parse(s);
            assert_eq!((c.container_id, c.pod_uid), (None, None), "{s:?}");
        }
    }
}
