//! A stand-in for systemd-journald: a datagram socket, read by a thread of its own, that a
//! daemon launched with [`crate::LogTo::Journal`] finds at `/run/systemd/journal/socket` in a
//! mount namespace of its own, stderr being a file that `JOURNAL_STREAM` names. No journald
//! runs on the test machines, and a test must not write into a real one.

use std::{
    collections::BTreeMap,
    ffi::CString,
    fs,
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

/// One journal entry: field name to value (the last one, should a name repeat).
pub type Entry = BTreeMap<String, String>;

/// Where the daemon's journal client looks (tracing-journald's fixed path).
const SOCKET_DIR: &str = "/run/systemd/journal";

pub struct FakeJournal {
    /// Holds `socket` (bound here) and `stderr` (the daemon's stderr).
    dir: PathBuf,
    entries: Arc<Mutex<Vec<Entry>>>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl FakeJournal {
    /// Binds the socket in `dir` (created) and starts reading it.
    pub fn new(dir: &Path) -> Self {
        let mut journal = Self::down(dir);
        let socket = UnixDatagram::bind(dir.join("socket")).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let reader = {
            let (entries, stop) = (journal.entries.clone(), journal.stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0; 1 << 20];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = socket.recv(&mut buf) else { continue };
                    // tracing-journald's probe at connect is an empty datagram.
                    if let Some(entry) = parse_entry(&buf[..n]).filter(|e| !e.is_empty()) {
                        entries.lock().unwrap().push(entry);
                    }
                }
            })
        };
        journal.reader = Some(reader);
        journal
    }

    /// A journal that is not running: its socket is missing (`dir` is created).
    pub fn down(dir: &Path) -> Self {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("stderr"), "").unwrap();
        Self { dir: dir.to_owned(), entries: Arc::default(), stop: Arc::default(), reader: None }
    }

    /// The entries received so far.
    pub fn entries(&self) -> Vec<Entry> {
        self.entries.lock().unwrap().clone()
    }

    /// The daemon's stderr: a file, which `JOURNAL_STREAM` names.
    pub fn stderr(&self) -> PathBuf {
        self.dir.join("stderr")
    }

    /// `JOURNAL_STREAM` naming [`FakeJournal::stderr`]: `DEV:INODE`.
    pub fn stream(&self) -> String {
        let meta = fs::metadata(self.stderr()).unwrap();
        format!("{}:{}", meta.dev(), meta.ino())
    }

    /// Makes, in a child between fork and exec, a mount namespace in which this journal's
    /// socket is at `/run/systemd/journal/socket`: a tmpfs over `/run/systemd` (or `/run`,
    /// should that not exist), and this journal's directory bound at `/run/systemd/journal`.
    /// Returns the closure for `CommandExt::pre_exec`; the paths are made before the fork.
    pub fn enter(&self) -> impl FnMut() -> std::io::Result<()> + Send + Sync + 'static {
        use nix::{
            mount::{MsFlags, mount},
            sched::{CloneFlags, unshare},
            sys::stat::Mode,
            unistd::mkdir,
        };
        let base = if Path::new("/run/systemd").is_dir() { "/run/systemd" } else { "/run" };
        let cstr = |p: &[u8]| CString::new(p).unwrap();
        let (base, systemd, journal) =
            (cstr(base.as_bytes()), cstr(b"/run/systemd"), cstr(SOCKET_DIR.as_bytes()));
        let source = cstr(self.dir.as_os_str().as_bytes());
        let (root, tmpfs, mode) = (cstr(b"/"), cstr(b"tmpfs"), cstr(b"mode=0755"));
        move || {
            unshare(CloneFlags::CLONE_NEWNS)?;
            mount(
                None::<&std::ffi::CStr>,
                root.as_c_str(),
                None::<&std::ffi::CStr>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&std::ffi::CStr>,
            )?;
            mount(
                Some(tmpfs.as_c_str()),
                base.as_c_str(),
                Some(tmpfs.as_c_str()),
                MsFlags::empty(),
                Some(mode.as_c_str()),
            )?;
            for dir in [&systemd, &journal] {
                match mkdir(dir.as_c_str(), Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            mount(
                Some(source.as_c_str()),
                journal.as_c_str(),
                None::<&std::ffi::CStr>,
                MsFlags::MS_BIND,
                None::<&std::ffi::CStr>,
            )?;
            Ok(())
        }
    }
}

impl Drop for FakeJournal {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(reader) = self.reader.take()
            && reader.join().is_err()
            && !std::thread::panicking()
        {
            panic!("the fake journal's reader panicked");
        }
    }
}

/// An entry in the journal's native protocol: `NAME=value\n`, or `NAME\n`, the value's length
/// (u64, little endian), the value and `\n`. `None` if it does not parse.
pub fn parse_entry(mut data: &[u8]) -> Option<Entry> {
    let mut entry = Entry::new();
    while !data.is_empty() {
        let end = data.iter().position(|&b| b == b'\n' || b == b'=')?;
        let name = String::from_utf8_lossy(&data[..end]).into_owned();
        let rest = &data[end + 1..];
        let (value, after) = if data[end] == b'=' {
            let nl = rest.iter().position(|&b| b == b'\n')?;
            (&rest[..nl], &rest[nl + 1..])
        } else {
            let len = usize::try_from(u64::from_le_bytes(rest.get(..8)?.try_into().ok()?)).ok()?;
            let value = rest.get(8..8 + len)?;
            (value, rest.get(8 + len + 1..)?)
        };
        entry.insert(name, String::from_utf8_lossy(value).into_owned());
        data = after;
    }
    Some(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_field_forms_parse() {
        let mut data = b"PRIORITY=6\nMESSAGE\n".to_vec();
        data.extend_from_slice(&5u64.to_le_bytes());
        data.extend_from_slice(b"a\nb=c\nAGENT=x\n");
        let entry = parse_entry(&data).unwrap();
        assert_eq!(entry["PRIORITY"], "6");
        assert_eq!(entry["MESSAGE"], "a\nb=c");
        assert_eq!(entry["AGENT"], "x");
        assert_eq!(parse_entry(b"MESSAGE\n\x05\0\0\0\0\0\0\0ab"), None);
    }
}
