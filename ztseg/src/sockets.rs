//! Closing an agent's sockets: when its kill switch is pulled, or its rights are revoked or
//! lapse, its TCP and UDP sockets are destroyed (SOCK_DESTROY over sock_diag netlink, what
//! `ss -K` does), so established connections end instead of hanging on dropped packets.
//!
//! sock_diag sees one network namespace per netlink socket: every namespace one of the agent's
//! processes is in gets its own (opened from a thread that joins that namespace). A socket is the
//! agent's when its cgroup id (INET_DIAG_CGROUP_ID) is the agent's cgroup, or when one of the
//! agent's processes holds it (its inode among the `socket:[N]` descriptors of
//! `/proc/PID/task/TID/fd`): a socket another agent made and handed over (SCM_RIGHTS) stays in
//! its maker's cgroup, but is connected, and used, by the holder, and dies with the holder's
//! rights. (A socket handed on again to an agent that is not cut goes on under that agent's
//! state: from then on it is that agent's connection.)

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs, io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const INET_DIAG_CGROUP_ID: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const HEADER: usize = 16;
/// `inet_diag_req_v2`: family, protocol, ext, pad, states, then the 48-byte socket id.
const REQUEST: usize = 56;
/// `inet_diag_msg`: family, state, timer, retrans, the socket id, then 5 u32.
const MESSAGE: usize = 72;

/// A socket to destroy: its cgroup, family and protocol, and its `inet_diag_sockid` as the
/// kernel sent it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Found {
    cgroup_id: u64,
    family: u8,
    protocol: u8,
    id: [u8; 48],
}

fn request(kind: u16, flags: u16, family: u8, protocol: u8, id: &[u8; 48]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER + REQUEST);
    m.extend_from_slice(&((HEADER + REQUEST) as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&[0u8; 8]); // seq, pid
    m.extend_from_slice(&[family, protocol, 0, 0]);
    m.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    m.extend_from_slice(id);
    m
}

/// The netlink messages in a datagram: (type, payload).
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + HEADER <= buf.len() {
        let len = u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        if len < HEADER || at + len > buf.len() {
            break;
        }
        out.push((u16::from_ne_bytes([buf[at + 4], buf[at + 5]]), &buf[at + HEADER..at + len]));
        at += (len + 3) & !3;
    }
    out
}

/// Where `inet_diag_msg` has the socket's inode: after family, state, timer, retrans, the
/// 48-byte id, expires, rqueue, wqueue and uid.
const INODE_AT: usize = 68;

/// The socket in one `inet_diag_msg` (with its attributes), if its cgroup is one of `wanted`, or
/// else if a process of one of them holds it (`held`: socket inode -> the holder's cgroup id).
fn parse_found(
    payload: &[u8],
    protocol: u8,
    wanted: &HashSet<u64>,
    held: &HashMap<u64, u64>,
) -> Option<Found> {
    if payload.len() < MESSAGE {
        return None;
    }
    let mut at = MESSAGE;
    let mut cgroup = None;
    while at + 4 <= payload.len() {
        let len = usize::from(u16::from_ne_bytes([payload[at], payload[at + 1]]));
        let kind = u16::from_ne_bytes([payload[at + 2], payload[at + 3]]);
        if len < 4 || at + len > payload.len() {
            break;
        }
        if kind == INET_DIAG_CGROUP_ID && len >= 12 {
            cgroup = payload[at + 4..at + 12].try_into().ok().map(u64::from_ne_bytes);
        }
        at += (len + 3) & !3;
    }
    let inode = payload[INODE_AT..INODE_AT + 4].try_into().map(u32::from_ne_bytes).ok();
    let cgroup_id =
        cgroup.filter(|c| wanted.contains(c)).or_else(|| held.get(&u64::from(inode?)).copied())?;
    Some(Found {
        cgroup_id,
        family: payload[0],
        protocol,
        // The socket id follows family, state, timer and retrans.
        id: payload[4..52].try_into().unwrap_or([0; 48]),
    })
}

struct Diag {
    fd: OwnedFd,
}

impl Diag {
    /// A sock_diag socket in the network namespace of `/proc/PID/ns/net` (or this thread's).
    fn open(netns: Option<&Path>) -> io::Result<Self> {
        let open = || -> io::Result<Self> {
            // SAFETY: socket(2) returns a new descriptor we own.
            let fd = unsafe {
                libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, libc::NETLINK_SOCK_DIAG)
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: just created, owned here only.
            Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
        };
        let Some(netns) = netns else { return open() };
        let ns = fs::File::open(netns)?;
        // setns changes only the calling thread: a short-lived one joins, opens, and ends.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                    open()
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the namespace thread panicked")))
        })
    }

    fn send(&self, message: &[u8]) -> io::Result<()> {
        // SAFETY: sends the bytes of `message` to the kernel (netlink address 0).
        let rc = unsafe { libc::send(self.fd.as_raw_fd(), message.as_ptr().cast(), message.len(), 0) };
        if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: receives at most `buf.len()` bytes into `buf`.
        let rc = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(rc).map_err(|_| io::Error::last_os_error())
    }

    /// Every socket of `family`/`protocol` whose cgroup is one of `wanted`, or held by one of
    /// their processes (`held`).
    fn dump(
        &self,
        family: u8,
        protocol: u8,
        wanted: &HashSet<u64>,
        held: &HashMap<u64, u64>,
    ) -> io::Result<Vec<Found>> {
        self.send(&request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, family, protocol, &[0; 48]))?;
        let mut found = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf)?;
            for (kind, payload) in messages(&buf[..n]) {
                match kind {
                    NLMSG_DONE => return Ok(found),
                    NLMSG_ERROR => {
                        return Err(netlink_error(payload).unwrap_or_else(|| io::Error::other("dump failed")));
                    }
                    _ => found.extend(parse_found(payload, protocol, wanted, held)),
                }
            }
        }
    }

    fn destroy(&self, socket: &Found) -> io::Result<()> {
        self.send(&request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            socket.family,
            socket.protocol,
            &socket.id,
        ))?;
        let mut buf = [0u8; 512];
        let n = self.recv(&mut buf)?;
        match messages(&buf[..n]).first() {
            Some((NLMSG_ERROR, payload)) => netlink_error(payload).map_or(Ok(()), Err),
            _ => Err(io::Error::other("no answer to SOCK_DESTROY")),
        }
    }
}

/// The error an NLMSG_ERROR carries (`None` for an acknowledgement).
fn netlink_error(payload: &[u8]) -> Option<io::Error> {
    let code = i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?);
    (code != 0).then(|| io::Error::from_raw_os_error(-code))
}

/// The network namespaces of the processes in `cgroups` (one `/proc/PID/ns/net` path each), the
/// daemon's own first.
fn namespaces<'a>(cgroups: impl IntoIterator<Item = &'a Path>) -> Vec<Option<std::path::PathBuf>> {
    let own = fs::read_link("/proc/self/ns/net").ok();
    let mut by_ns = BTreeMap::new();
    for cgroup in cgroups {
        for pid in fs::read_to_string(cgroup.join("cgroup.procs")).unwrap_or_default().lines() {
            let path = Path::new("/proc").join(pid.trim()).join("ns/net");
            if let Ok(ns) = fs::read_link(&path)
                && Some(&ns) != own.as_ref()
            {
                by_ns.entry(ns).or_insert(path);
            }
        }
    }
    std::iter::once(None).chain(by_ns.into_values().map(Some)).collect()
}

/// Descriptor links read at most in one scan: an agent's processes could otherwise make its own
/// kill read billions (10,000 threads with tables of their own, each filled to the limit) while
/// the daemon waits. Past it the scan stops, says so, and the sockets found so far are closed.
const MAX_LINKS: usize = 1 << 20;

/// The inodes of the sockets the processes in `targets` (path, id) hold, each with its holder's
/// cgroup id. Each descriptor table is read once: the process's, and a thread's own only when
/// it has one (made without CLONE_FILES; `kcmp` says). A process or descriptor gone meanwhile is
/// skipped, and so is a process no longer in the cgroup once its descriptors are read: its pid
/// may have been reused by a process that is no agent's, whose sockets must not be closed.
fn held_sockets(targets: &[(&Path, u64)]) -> HashMap<u64, u64> {
    let mut held = HashMap::new();
    // Agents' cgroups exist only below a cgroup2 mount: without one there is nothing to scan.
    let Ok(cgroups) = crate::cgroup::CgroupFs::discover() else { return held };
    let mut budget = MAX_LINKS;
    for (cgroup, id) in targets {
        for pid in crate::cgroup::processes(cgroup).unwrap_or_default() {
            let Ok(pid) = i32::try_from(pid) else { continue };
            let process = Path::new("/proc").join(pid.to_string());
            let mut inodes = Vec::new();
            read_table(&process.join("fd"), &mut inodes, &mut budget);
            for task in fs::read_dir(process.join("task")).into_iter().flatten().flatten() {
                let tid = task.file_name().to_str().and_then(|t| t.parse::<i32>().ok());
                if tid.is_some_and(|tid| tid != pid && !same_table(pid, tid)) {
                    read_table(&task.path().join("fd"), &mut inodes, &mut budget);
                }
            }
            if still_in(&process, cgroup, cgroups.mount()) {
                held.extend(inodes.into_iter().map(|inode| (inode, *id)));
            }
            if budget == 0 {
                tracing::warn!(cgroup = %cgroup.display(), "stopped reading the agent's descriptors after {MAX_LINKS}: sockets it holds past them stay open (their packets are still judged by their maker's state)");
                return held;
            }
        }
    }
    held
}

/// Adds the socket inodes of descriptor table `dir` (`/proc/.../fd`) to `inodes`, spending a
/// link of `budget` per descriptor.
fn read_table(dir: &Path, inodes: &mut Vec<u64>, budget: &mut usize) {
    for fd in fs::read_dir(dir).into_iter().flatten().flatten() {
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        if let Ok(link) = fs::read_link(fd.path()) {
            inodes.extend(socket_inode(&link));
        }
    }
}

/// Whether thread `tid` shares process `pid`'s descriptor table (`kcmp` KCMP_FILES); not known
/// reads as not shared, so its table is read.
fn same_table(pid: i32, tid: i32) -> bool {
    const KCMP_FILES: libc::c_long = 2;
    // SAFETY: kcmp takes integers only and reads nothing of ours.
    let rc = unsafe { libc::syscall(libc::SYS_kcmp, pid, tid, KCMP_FILES, 0, 0) };
    rc == 0
}

/// The inode of a descriptor's `socket:[N]` link.
fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// Whether `/proc/PID` is (still) a process of `cgroup`: its cgroup2 line (`0::/a/b`) names the
/// cgroup, below the cgroup2 `mount`.
fn still_in(process: &Path, cgroup: &Path, mount: &Path) -> bool {
    let Ok(text) = fs::read_to_string(process.join("cgroup")) else { return false };
    text.lines()
        .find_map(|line| line.strip_prefix("0::/"))
        .is_some_and(|relative| mount.join(relative) == cgroup)
}

/// Destroys every TCP and UDP socket (v4 and v6) of the cgroups in `targets` (path, id), and
/// every one their processes hold, in each network namespace their processes are in, with one
/// dump per namespace, family and protocol however many cgroups there are. Returns how many were
/// closed per cgroup id. One failure does not stop the rest: every socket that can be closed is,
/// and the first error is returned afterwards.
pub fn close_all(targets: &[(&Path, u64)]) -> io::Result<HashMap<u64, usize>> {
    let wanted: HashSet<u64> = targets.iter().map(|(_, id)| *id).collect();
    let held = held_sockets(targets);
    let mut closed: HashMap<u64, usize> = wanted.iter().map(|id| (*id, 0)).collect();
    let mut first_error = None;
    for netns in namespaces(targets.iter().map(|(path, _)| *path)) {
        let diag = match Diag::open(netns.as_deref()) {
            Ok(diag) => diag,
            // The process left, and its namespace with it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                first_error.get_or_insert(e);
                continue;
            }
        };
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            for protocol in [libc::IPPROTO_TCP as u8, libc::IPPROTO_UDP as u8] {
                let found = match diag.dump(family, protocol, &wanted, &held) {
                    Ok(found) => found,
                    Err(e) => {
                        first_error.get_or_insert(e);
                        continue;
                    }
                };
                for socket in found {
                    match diag.destroy(&socket) {
                        Ok(()) => *closed.entry(socket.cgroup_id).or_default() += 1,
                        // Gone already (closed between the dump and now).
                        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
        }
    }
    first_error.map_or(Ok(closed), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_a_header_and_an_inet_diag_req_v2() {
        let id = [7u8; 48];
        let m = request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 2, 6, &id);
        assert_eq!(m.len(), 72);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 72);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), SOCK_DESTROY);
        assert_eq!(&m[16..20], &[2, 6, 0, 0]);
        assert_eq!(&m[24..72], &id);
    }

    #[test]
    fn a_message_is_the_agents_when_its_cgroup_attribute_says_so_or_one_of_its_processes_holds_it() {
        let mut msg = vec![0u8; MESSAGE];
        msg[0] = 10;
        msg[4..52].copy_from_slice(&[9u8; 48]);
        msg[INODE_AT..INODE_AT + 4].copy_from_slice(&4242u32.to_ne_bytes());
        let mut attr = vec![12, 0, INET_DIAG_CGROUP_ID as u8, 0];
        attr.extend_from_slice(&77u64.to_ne_bytes());
        msg.extend_from_slice(&attr);
        let wanted = |ids: &[u64]| ids.iter().copied().collect::<HashSet<u64>>();
        let none = HashMap::new();
        assert_eq!(
            parse_found(&msg, 6, &wanted(&[5, 77]), &none),
            Some(Found { cgroup_id: 77, family: 10, protocol: 6, id: [9; 48] })
        );
        assert_eq!(parse_found(&msg, 6, &wanted(&[78]), &none), None);
        assert_eq!(parse_found(&msg[..MESSAGE], 6, &wanted(&[77]), &none), None, "no cgroup attribute");
        // Made in cgroup 77, held by a process of agent 78: 78's.
        let held: HashMap<u64, u64> = [(4242, 78)].into();
        assert_eq!(
            parse_found(&msg, 6, &wanted(&[78]), &held),
            Some(Found { cgroup_id: 78, family: 10, protocol: 6, id: [9; 48] })
        );
        assert_eq!(parse_found(&msg, 6, &wanted(&[78]), &[(4243, 78)].into()), None, "another inode");
    }

    #[test]
    fn a_descriptor_is_a_socket_by_its_link() {
        assert_eq!(socket_inode(Path::new("socket:[4242]")), Some(4242));
        assert_eq!(socket_inode(Path::new("pipe:[4242]")), None);
        assert_eq!(socket_inode(Path::new("/tmp/socket:[4242]")), None);
        assert_eq!(socket_inode(Path::new("socket:[x]")), None);
    }

    #[test]
    fn a_process_is_the_cgroups_only_while_its_cgroup_line_names_it() {
        // This process: its own cgroup is the path its line names, and no other.
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let relative = own.lines().find_map(|l| l.strip_prefix("0::/")).unwrap().to_owned();
        let me = Path::new("/proc/self");
        let mount = Path::new("/sys/fs/cgroup");
        let cgroup = mount.join(&relative);
        assert!(still_in(me, &cgroup, mount));
        // A cgroup whose path merely ends in the same names is another one.
        assert!(!still_in(me, &mount.join("ztseg-elsewhere.slice").join(&relative), mount));
        assert!(!still_in(me, &mount.join(format!("{relative}-other")), mount));
        assert!(!still_in(me, Path::new("/sys/fs/cgroup/ztseg-no-such.slice/agent"), mount));
        assert!(!still_in(Path::new("/proc/no-such-process"), &cgroup, mount));
    }

    #[test]
    fn a_thread_shares_its_process_table_unless_it_has_its_own() {
        let pid = std::process::id() as i32;
        // This test's thread (the harness runs each test on a thread of its own, made by std
        // with CLONE_FILES) shares the process's table.
        let own = nix::unistd::gettid().as_raw();
        assert_ne!(own, pid, "the test runs on a thread other than the main one");
        assert!(same_table(pid, own));
        // An unknown task reads as not shared, so its table would be read.
        assert!(!same_table(pid, i32::MAX));
    }

    #[test]
    fn the_daemons_own_namespace_comes_first_and_only_once() {
        assert_eq!(namespaces([Path::new("/nonexistent")]), vec![None]);
        // A cgroup listing this process (in the daemon's namespace) twice, and pid 1 (the host's):
        // the own namespace is not repeated; another one comes once.
        let dir = std::env::temp_dir().join(format!("ztseg-sockets-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let me = std::process::id();
        fs::write(dir.join("cgroup.procs"), format!("{me}\n{me}\n")).unwrap();
        let found = namespaces([dir.as_path(), dir.as_path()]);
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found, vec![None]);
    }
}
