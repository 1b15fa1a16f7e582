//! The bench's network namespace (loopback only), its servers, and the nftables baselines.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{TcpListener, UdpSocket},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
};

use anyhow::{Context as _, Result, bail};
use nix::sched::CloneFlags;

/// The allowed destination, and one no rule allows; both have a listener.
pub const ALLOWED: &str = "127.0.0.2:9000";
pub const DENIED: &str = "127.0.0.3:9000";
/// Granted like [`ALLOWED`] but with no listener: a connect there is answered at once, refused by
/// the peer (allowed) or by the hook (denied), and never waits on an accept queue.
pub const SPIN: &str = "127.0.0.2:9002";
/// The flow of the kill-cut figure: a listener the flow worker makes itself.
pub const FLOW: &str = "127.0.0.2:9001";
/// The far end of the veth link of the throughput figure, and its sink.
pub const FAR: &str = "10.201.0.2";
pub const SINK: &str = "10.201.0.2:9100";

/// A network namespace with `lo` up and listeners on both destinations; deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self { name: name.to_owned() };
        run(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        ns.serve()?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Listeners created from a thread that joined the namespace (sockets keep their namespace).
    fn serve(&self) -> Result<()> {
        let path = self.path();
        let sockets = thread::spawn(move || -> Result<Vec<(TcpListener, UdpSocket)>> {
            nix::sched::setns(std::fs::File::open(path)?, CloneFlags::CLONE_NEWNET)?;
            [ALLOWED, DENIED].iter().map(|a| Ok((listener(a)?, UdpSocket::bind(a)?))).collect()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
        for (listener, udp) in sockets {
            thread::spawn(move || {
                for stream in listener.incoming() {
                    drop(stream);
                }
            });
            // Received datagrams are drained so the socket never backs up.
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while udp.recv(&mut buf).is_ok() {}
            });
        }
        Ok(())
    }

    /// Loads an nftables ruleset into this namespace. `nsenter --net` (not `ip netns exec`,
    /// which remounts /sys) so nft can resolve cgroupv2 paths.
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", self.path().display()))
            .args(["nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("cannot run nft")?;
        child.stdin.take().context("nft stdin")?.write_all(ruleset.as_bytes())?;
        let status = child.wait()?;
        if !status.success() {
            bail!("nft -f failed");
        }
        Ok(())
    }

    pub fn nft_flush(&self) -> Result<()> {
        self.nft("flush ruleset\n")
    }
}

/// A TCP listener with an accept queue of 4096 (the kernel's default `somaxconn`), not the
/// standard library's 128: a worker connecting while the accepting thread waits for a CPU must
/// not overflow the queue, whose dropped SYNs come back only after a 1 s retransmission.
fn listener(addr: &str) -> Result<TcpListener> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, socket};
    use std::os::fd::AsRawFd as _;
    let addr: std::net::SocketAddrV4 = addr.parse()?;
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
    // nix's `Backlog` stops at the C library's SOMAXCONN (128), the queue this is meant to avoid.
    // SAFETY: listen(2) on a socket we own.
    if unsafe { libc::listen(fd.as_raw_fd(), 4096) } != 0 {
        return Err(std::io::Error::last_os_error()).context("listen");
    }
    Ok(TcpListener::from(fd))
}

/// The namespace's TCP trouble counters: accept-queue overflows and drops, and retransmitted
/// segments. Any of them growing during a case means some connects stalled for a
/// retransmission timeout (1 s for a SYN), which the case's figures then carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpTrouble {
    pub listen_overflows: u64,
    pub listen_drops: u64,
    pub retransmits: u64,
}

impl TcpTrouble {
    pub fn since(self, before: Self) -> Self {
        Self {
            listen_overflows: self.listen_overflows.saturating_sub(before.listen_overflows),
            listen_drops: self.listen_drops.saturating_sub(before.listen_drops),
            retransmits: self.retransmits.saturating_sub(before.retransmits),
        }
    }

    pub fn any(self) -> bool {
        self != Self::default()
    }
}

/// The value of `key` in a /proc/net/{netstat,snmp} table whose rows come in pairs
/// ("Prefix: names..." then "Prefix: values...").
fn proc_net_value(text: &str, prefix: &str, key: &str) -> Option<u64> {
    let mut rows = text.lines().filter(|l| l.starts_with(prefix));
    let (names, values) = (rows.next()?, rows.next()?);
    let at = names.split_whitespace().position(|n| n == key)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

impl Netns {
    /// The namespace's [`TcpTrouble`] counters, read by a thread that joins it.
    pub fn tcp_trouble(&self) -> Result<TcpTrouble> {
        let path = self.path();
        thread::spawn(move || -> Result<TcpTrouble> {
            nix::sched::setns(std::fs::File::open(path)?, CloneFlags::CLONE_NEWNET)?;
            let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat")?;
            let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
            let get = |text: &str, prefix: &str, key: &str| {
                proc_net_value(text, prefix, key).with_context(|| format!("no {prefix} {key} in /proc/net"))
            };
            Ok(TcpTrouble {
                listen_overflows: get(&netstat, "TcpExt:", "ListenOverflows")?,
                listen_drops: get(&netstat, "TcpExt:", "ListenDrops")?,
                retransmits: get(&snmp, "Tcp:", "RetransSegs")?,
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("counter thread panicked"))?
    }

    /// A second namespace joined to this one by a veth pair (this side 10.201.0.1, the far
    /// side [`FAR`]), with a sink on [`SINK`] that reads and discards whatever it is sent.
    pub fn far_sink(&self, name: &str, id: u32) -> Result<Self> {
        let far = Self::new(name)?;
        let (a, b) = (format!("ztb{id}a"), format!("ztb{id}b"));
        run(Command::new("ip").args([
            "-n", &self.name, "link", "add", &a, "type", "veth", "peer", "name", &b, "netns", &far.name,
        ]))?;
        run(Command::new("ip").args(["-n", &self.name, "addr", "add", "10.201.0.1/24", "dev", &a]))?;
        run(Command::new("ip").args(["-n", &far.name, "addr", "add", &format!("{FAR}/24"), "dev", &b]))?;
        run(Command::new("ip").args(["-n", &self.name, "link", "set", &a, "up"]))?;
        run(Command::new("ip").args(["-n", &far.name, "link", "set", &b, "up"]))?;
        let path = far.path();
        let listener = thread::spawn(move || -> Result<TcpListener> {
            nix::sched::setns(std::fs::File::open(path)?, CloneFlags::CLONE_NEWNET)?;
            Ok(TcpListener::bind(SINK)?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("sink thread panicked"))??;
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                thread::spawn(move || {
                    let mut buf = vec![0u8; 256 * 1024];
                    while std::io::Read::read(&mut stream, &mut buf).is_ok_and(|n| n > 0) {}
                });
            }
        });
        Ok(far)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

fn run(command: &mut Command) -> Result<()> {
    let status = command.status().with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed");
    }
    Ok(())
}

/// What a user would write by hand to give one cgroup exactly one destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NftShape {
    /// One rule per allowed destination, the matching one last (the list is walked in order).
    List(usize),
    /// One set lookup: `ip daddr . meta l4proto . th dport @allowed`.
    Set(usize),
}

impl NftShape {
    pub fn label(self) -> String {
        match self {
            Self::List(n) => format!("nftables rule list, {n} rules"),
            Self::Set(n) => format!("nftables set, {n} elements"),
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::List(n) | Self::Set(n) => n,
        }
    }
}

/// Filler destination `i`: distinct addresses in 10/8.
fn filler(i: usize) -> String {
    format!("10.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff)
}

/// The ruleset: default reject for the agent's cgroup, its allowed destinations accepted.
/// `cgroup` is relative to /sys/fs/cgroup (how nft resolves it), `level` its depth in cgroup2.
pub fn nft_ruleset(shape: NftShape, cgroup: &str, level: usize) -> String {
    let m = format!("socket cgroupv2 level {level} \"{cgroup}\"");
    let mut text = String::from("table inet ztbench {\n");
    match shape {
        NftShape::List(n) => {
            text.push_str("  chain out {\n    type filter hook output priority 0; policy accept;\n");
            for i in 0..n.saturating_sub(1) {
                let _ = writeln!(text, "    {m} ip daddr {} th dport 9000 accept", filler(i));
            }
            let _ = writeln!(text, "    {m} ip daddr 127.0.0.2 th dport 9000 accept");
        }
        NftShape::Set(n) => {
            text.push_str(
                "  set allowed {\n    type ipv4_addr . inet_proto . inet_service\n    elements = {\n",
            );
            for i in 0..n.saturating_sub(1) {
                let _ = writeln!(text, "      {} . tcp . 9000, {} . udp . 9000,", filler(i), filler(i));
            }
            text.push_str("      127.0.0.2 . tcp . 9000, 127.0.0.2 . udp . 9000\n    }\n  }\n");
            text.push_str("  chain out {\n    type filter hook output priority 0; policy accept;\n");
            let _ = writeln!(text, "    {m} ip daddr . meta l4proto . th dport @allowed accept");
        }
    }
    let _ = writeln!(text, "    {m} meta l4proto tcp reject with tcp reset");
    let _ = writeln!(text, "    {m} drop");
    text.push_str("  }\n}\n");
    text
}

/// `path` relative to /sys/fs/cgroup and its depth below the cgroup2 mount.
pub fn nft_cgroup(mount: &Path, cgroup: &Path) -> Result<(String, usize)> {
    let relative = cgroup.strip_prefix(mount).context("cgroup outside the cgroup2 mount")?;
    let level = relative.components().count();
    let for_nft = cgroup.strip_prefix("/sys/fs/cgroup").context("cgroup2 is not under /sys/fs/cgroup")?;
    Ok((for_nft.display().to_string(), level))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_values_are_found_by_name() {
        let text = "TcpExt: SyncookiesSent ListenOverflows ListenDrops\nTcpExt: 0 7 9\nIpExt: InNoRoutes\nIpExt: 3\n";
        assert_eq!(proc_net_value(text, "TcpExt:", "ListenOverflows"), Some(7));
        assert_eq!(proc_net_value(text, "TcpExt:", "ListenDrops"), Some(9));
        assert_eq!(proc_net_value(text, "IpExt:", "InNoRoutes"), Some(3));
        assert_eq!(proc_net_value(text, "TcpExt:", "Missing"), None);
    }
}
