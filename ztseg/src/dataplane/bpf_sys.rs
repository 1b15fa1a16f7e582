//! The few bpf(2) commands aya 0.14 does not expose: opening a pinned link as a plain fd,
//! storing into a map-in-map through plain fds (the RCU barrier, waited on off the dataplane),
//! replacing a link's program in place, forcing a link to detach, and reading which cgroup a
//! link is attached to; and, for cgroup/setsockopt (whose aya link does not convert to a
//! pinnable `FdLink`), creating and pinning a cgroup link; and a program's run-time statistics. Layouts follow include/uapi/linux/bpf.h (`union bpf_attr`,
//! `struct bpf_link_info`); the kernel zero-fills what a shorter attr leaves out.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `BPF_LINK_TYPE_CGROUP`.
pub const LINK_TYPE_CGROUP: u32 = 3;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a repr(C) prefix of `union bpf_attr` for `cmd`, valid for its size.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, std::ptr::from_mut(attr), size_of::<T>()) };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// Stores map `value` at index `key` of a map-in-map (BPF_MAP_UPDATE_ELEM, BPF_ANY).
pub fn map_update_fd(map: BorrowedFd<'_>, key: u32, value: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let value = value.as_raw_fd() as u32;
    let mut attr = Attr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(&key) as u64,
        value: std::ptr::from_ref(&value) as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
}

/// A path as bpf(2) takes it.
fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// Opens a pinned BPF object (BPF_OBJ_GET).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let path = c_path(path)?;
    let mut attr = Attr { pathname: path.as_ptr() as u64, bpf_fd: 0, file_flags: 0, path_fd: 0, _pad: 0 };
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: BPF_OBJ_GET returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a BPF object at `path` (BPF_OBJ_PIN).
pub fn obj_pin(object: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let path = c_path(path)?;
    let mut attr = Attr {
        pathname: path.as_ptr() as u64,
        bpf_fd: object.as_raw_fd() as u32,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Attaches `program` to the cgroup `target` at hook `attach_type` through a new link
/// (BPF_LINK_CREATE, no flags: the link is the hook's only program of ztseg's).
pub fn link_create(program: BorrowedFd<'_>, target: BorrowedFd<'_>, attach_type: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        _rest: [u64; 4],
    }
    let mut attr = Attr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        flags: 0,
        _rest: [0; 4],
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: BPF_LINK_CREATE returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Atomically replaces the program of a link (BPF_LINK_UPDATE): every operation runs either the
/// old program or the new one, never neither.
pub fn link_update(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// Detaches a link from its hook even while other fds or pins still refer to it.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        link_fd: u32,
    }
    let mut attr = Attr { link_fd: link.as_raw_fd() as u32 };
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

/// What a link is: its type, the program it runs, and for cgroup links the cgroup and hook.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    pub cgroup_id: u64,
    pub attach_type: u32,
}

pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    /// The head of `struct bpf_link_info` and its `cgroup` union member (8-byte aligned).
    #[repr(C)]
    #[derive(Default)]
    struct Info {
        link_type: u32,
        id: u32,
        prog_id: u32,
        _pad: u32,
        cgroup_id: u64,
        attach_type: u32,
        _pad2: u32,
    }
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = Info::default();
    let mut attr = Attr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<Info>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(LinkInfo {
        link_type: info.link_type,
        id: info.id,
        prog_id: info.prog_id,
        cgroup_id: info.cgroup_id,
        attach_type: info.attach_type,
    })
}

/// Opens the program with id `id` (BPF_PROG_GET_FD_BY_ID).
fn prog_by_id(id: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        prog_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = Attr { prog_id: id, next_id: 0, open_flags: 0 };
    let fd = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: BPF_PROG_GET_FD_BY_ID returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The head of `struct bpf_prog_info` up to its run-time statistics (the kernel fills what
/// fits; every pointer field it could write through stays zero, so it writes nothing else).
#[repr(C)]
struct ProgInfoHead {
    /// `type` .. `prog_tags`, not read here.
    _fields: [u8; PROG_INFO_RUN_TIME_OFFSET],
    run_time_ns: u64,
    run_cnt: u64,
}

/// Offset of `run_time_ns` in `struct bpf_prog_info` (checked against aya-obj's bindings).
const PROG_INFO_RUN_TIME_OFFSET: usize = 192;

/// Cumulative run time (ns) and run count of the program behind a link, as the kernel counts
/// them while `kernel.bpf_stats_enabled` is on.
pub fn link_program_stats(link: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let prog = prog_by_id(link_info(link)?.prog_id)?;
    let mut info = ProgInfoHead { _fields: [0; PROG_INFO_RUN_TIME_OFFSET], run_time_ns: 0, run_cnt: 0 };
    let mut attr = Attr {
        bpf_fd: prog.as_raw_fd() as u32,
        info_len: size_of::<ProgInfoHead>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok((info.run_time_ns, info.run_cnt))
}

#[cfg(test)]
mod tests {
    use aya_obj::generated::bpf_prog_info;

    use super::*;

    #[test]
    fn the_prog_info_head_matches_the_kernel_layout() {
        assert_eq!(std::mem::offset_of!(bpf_prog_info, run_time_ns), PROG_INFO_RUN_TIME_OFFSET);
        assert_eq!(std::mem::offset_of!(bpf_prog_info, run_cnt), PROG_INFO_RUN_TIME_OFFSET + 8);
        assert_eq!(std::mem::offset_of!(ProgInfoHead, run_cnt), PROG_INFO_RUN_TIME_OFFSET + 8);
    }
}
