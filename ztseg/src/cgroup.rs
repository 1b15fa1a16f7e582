//! The agents' cgroups on the cgroup2 hierarchy.
//!
//! An agent is a cgroup: the kernel attests which cgroup a process is in, and a process without
//! write access to the cgroup tree cannot leave it. The cgroup's id (its inode number on cgroup2)
//! is the agent's identity in the BPF maps, so an agent's cgroup is created once and kept.

use std::{
    fs, io,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Component, Path, PathBuf},
    time::{Duration, Instant},
};

use nix::{
    poll::{PollFd, PollFlags, PollTimeout, poll},
    sys::inotify::{AddWatchFlags, InitFlags, Inotify},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 hierarchy is mounted (none in /proc/self/mountinfo); ztseg needs cgroup v2")]
    NoCgroup2,
    #[error("cannot read /proc/self/mountinfo: {0}")]
    MountInfo(#[source] io::Error),
    #[error("cgroup path {0:?} must be relative to the cgroup2 mount and must not contain '..'")]
    BadRelativePath(PathBuf),
    #[error("cannot create cgroup {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot read cgroup {path}: {source}")]
    Stat { path: PathBuf, source: io::Error },
    #[error("{path} is not a cgroup2 directory")]
    NotACgroup { path: PathBuf },
    #[error("cannot move process {pid} into cgroup {path}: {source}")]
    Move { path: PathBuf, pid: u32, source: io::Error },
    #[error("cannot remove cgroup {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("cannot write {file} of cgroup {path}: {source}")]
    Control { path: PathBuf, file: &'static str, source: io::Error },
}

/// The mount point of the cgroup2 hierarchy in a `/proc/self/mountinfo` text: the fifth field of
/// the first line whose filesystem type (after the ` - ` separator) is `cgroup2`.
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(|p| PathBuf::from(unescape_mountinfo(p)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b))
        {
            let v = bytes[i + 1..i + 4].iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 hierarchy of this host.
#[derive(Clone, Debug)]
pub struct CgroupFs {
    mount: PathBuf,
}

impl CgroupFs {
    /// Finds the cgroup2 mount (`/sys/fs/cgroup` on a systemd host, `/sys/fs/cgroup/unified` in
    /// the hybrid layout) from /proc/self/mountinfo.
    pub fn discover() -> Result<Self, CgroupError> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(CgroupError::MountInfo)?;
        let mount = cgroup2_mount(&mountinfo).ok_or(CgroupError::NoCgroup2)?;
        Ok(Self { mount })
    }

    /// A hierarchy mounted at `mount`, for tests whose cgroups are never touched on disk.
    #[cfg(test)]
    pub fn at(mount: impl Into<PathBuf>) -> Self {
        Self { mount: mount.into() }
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The absolute path of `relative` (e.g. `ztseg.slice/analyst-7`) in this hierarchy.
    pub fn resolve(&self, relative: &Path) -> Result<PathBuf, CgroupError> {
        let plain = relative.components().all(|c| matches!(c, Component::Normal(_)));
        if !plain || relative.as_os_str().is_empty() {
            return Err(CgroupError::BadRelativePath(relative.to_owned()));
        }
        Ok(self.mount.join(relative))
    }
}

/// Creates the cgroup directory (and its parents) if missing and returns its id.
pub fn ensure(path: &Path) -> Result<u64, CgroupError> {
    fs::create_dir_all(path).map_err(|source| CgroupError::Create { path: path.to_owned(), source })?;
    id(path)
}

/// The cgroup id of a cgroup2 directory: its inode number, which is what
/// `bpf_get_current_cgroup_id()` returns for processes in it.
pub fn id(path: &Path) -> Result<u64, CgroupError> {
    let meta = fs::metadata(path).map_err(|source| CgroupError::Stat { path: path.to_owned(), source })?;
    if !meta.is_dir() || !path.join("cgroup.procs").exists() {
        return Err(CgroupError::NotACgroup { path: path.to_owned() });
    }
    Ok(meta.ino())
}

/// Moves process `pid` (0: the calling process) into the cgroup.
pub fn move_process(path: &Path, pid: u32) -> Result<(), CgroupError> {
    fs::write(path.join("cgroup.procs"), pid.to_string()).map_err(|source| CgroupError::Move {
        path: path.to_owned(),
        pid,
        source,
    })
}

/// Pids of the processes in the cgroup (not its descendants).
pub fn processes(path: &Path) -> Result<Vec<u32>, CgroupError> {
    let text = fs::read_to_string(path.join("cgroup.procs"))
        .map_err(|source| CgroupError::Stat { path: path.to_owned(), source })?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// Freezes (or thaws) every process of the cgroup and its descendants (`cgroup.freeze`). When
/// freezing, waits up to `wait` for the kernel to report the cgroup frozen (`cgroup.events`) and
/// says whether it did; a task stuck in the kernel can delay it.
pub fn freeze(path: &Path, frozen: bool, wait: Duration) -> Result<bool, CgroupError> {
    let line = if frozen { "frozen 1" } else { "frozen 0" };
    await_event(path, line, wait, || {
        fs::write(path.join("cgroup.freeze"), if frozen { "1" } else { "0" })
            .map_err(|source| CgroupError::Control { path: path.to_owned(), file: "cgroup.freeze", source })
    })
}

/// Does `change`, then waits up to `wait` for `line` ("frozen 1", "populated 0", ...) in the
/// cgroup's `cgroup.events`, woken by inotify rather than a clock; says whether it came. The
/// watch is set before `change`, so the line cannot slip between the two.
pub fn await_event(
    path: &Path,
    line: &str,
    wait: Duration,
    change: impl FnOnce() -> Result<(), CgroupError>,
) -> Result<bool, CgroupError> {
    let control = |source| CgroupError::Control { path: path.to_owned(), file: "cgroup.events", source };
    let events = path.join("cgroup.events");
    let inotify =
        Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).map_err(|e| control(e.into()))?;
    inotify.add_watch(&events, AddWatchFlags::IN_MODIFY).map_err(|e| control(e.into()))?;
    change()?;
    let deadline = Instant::now() + wait;
    loop {
        let text = fs::read_to_string(&events).map_err(control)?;
        if text.lines().any(|l| l == line) {
            return Ok(true);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let timeout = PollTimeout::try_from(left.as_millis().min(1_000) as i32).unwrap_or(PollTimeout::ZERO);
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, timeout).map_err(|e| control(e.into()))?;
        while let Ok(events) = inotify.read_events() {
            if events.is_empty() {
                break;
            }
        }
    }
}

/// Whether the cgroup is frozen or asked to be (`cgroup.freeze` reads 1).
pub fn frozen(path: &Path) -> bool {
    fs::read_to_string(path.join("cgroup.freeze")).is_ok_and(|t| t.trim() == "1")
}

/// Sends SIGKILL to every process of the cgroup and its descendants (`cgroup.kill`, Linux
/// 5.14); returns how many processes the cgroup itself held.
pub fn kill_all(path: &Path) -> Result<usize, CgroupError> {
    let count = processes(path)?.len();
    fs::write(path.join("cgroup.kill"), "1").map_err(|source| CgroupError::Control {
        path: path.to_owned(),
        file: "cgroup.kill",
        source,
    })?;
    Ok(count)
}

/// Removes an empty cgroup directory; a missing one is not an error.
pub fn remove(path: &Path) -> Result<(), CgroupError> {
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CgroupError::Remove { path: path.to_owned(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
42 31 0:39 / /sys/fs/cgroup/memory rw,relatime shared:11 - cgroup cgroup rw,memory
";

    #[test]
    fn finds_cgroup2_in_the_hybrid_layout() {
        assert_eq!(cgroup2_mount(HYBRID), Some(PathBuf::from("/sys/fs/cgroup/unified")));
    }

    #[test]
    fn finds_cgroup2_on_a_systemd_host_and_skips_optional_fields() {
        let unified =
            "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:4 master:1 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(cgroup2_mount(unified), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn unescapes_mount_points() {
        let odd = "35 24 0:30 / /mnt/cg\\040two rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(odd), Some(PathBuf::from("/mnt/cg two")));
    }

    #[test]
    fn no_cgroup2_is_none() {
        let v1 = "42 31 0:39 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(cgroup2_mount(v1), None);
        assert_eq!(cgroup2_mount(""), None);
    }

    #[test]
    fn relative_paths_cannot_climb_out() {
        let fs = CgroupFs { mount: PathBuf::from("/sys/fs/cgroup") };
        assert_eq!(
            fs.resolve(Path::new("ztseg.slice/a")).unwrap(),
            PathBuf::from("/sys/fs/cgroup/ztseg.slice/a")
        );
        for bad in ["../x", "/abs", "a/../../b", "", "./a"] {
            assert!(fs.resolve(Path::new(bad)).is_err(), "{bad:?}");
        }
    }
}
