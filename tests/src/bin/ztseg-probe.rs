//! A stand-in for an agent process in the integration tests.
//!
//! ```text
//! ztseg-probe [--netns PATH] [--cgroup DIR] once OP...     one line per OP: "ok" or an errno name
//! ztseg-probe [--netns PATH] [--cgroup DIR] loop OP...     repeat all OPs until stdin closes, then
//!                                                           print "OP ok=N EPERM=N other=N" lines
//! ztseg-probe [--netns PATH] [--cgroup DIR] until-denied OP  repeat OP until EPERM; print when the
//!                                                           last allowed try started and the
//!                                                           denied one ended (boot and wall ns)
//! ztseg-probe [--netns PATH] [--cgroup DIR] repeat N OP...  run the OPs N times; print outcome counts
//! ztseg-probe ... gated-repeat N OP...                      the same after printing "ready" and
//!                                                           reading one line from stdin
//! ztseg-probe [--netns PATH] serve ADDR...                   TCP listeners and UDP sockets on every
//!                                                           ADDR; "ready" once bound; runs until killed
//! ztseg-probe hold ADDR                                     a connected UDP socket to ADDR; prints
//!                                                           "pid PID fd FD", waits for stdin to close
//! ztseg-probe [--netns PATH] echo ADDR                     TCP and UDP echo on ADDR; "ready"; prints
//!                                                           "rx BOOT_NS" for each chunk it receives
//! ztseg-probe stream ADDR                                   a TCP connection and a connected UDP
//!                                                           socket to an echo at ADDR; "connected";
//!                                                           a byte on each every 10 ms; prints
//!                                                           "tcp|udp BOOT_NS" per chunk received, and
//!                                                           "tcp-closed ERRNO" when TCP fails
//! ztseg-probe stream-moved CGROUP ADDR                      as stream, its sockets made where it
//!                                                           starts and connected after it moves
//!                                                           itself into CGROUP (a handed-over socket)
//! ztseg-probe dns-hold SERVER N SECS HEX                    N TCP connections to SERVER; "held K";
//!                                                           a framed query (HEX) on each every 5 s
//! ztseg-probe listen ADDR                                  a TCP listener and a UDP socket on ADDR;
//!                                                           "ready"; sends "hi" on each connection
//!                                                           and prints "accepted IP" / "udp IP"
//! ztseg-probe listen-unix PATH|@NAME                        a Unix listener; "ready"; accepts until killed
//! ztseg-probe dns-server ADDR ZONE LOG | race ...           see `probe_dns.rs`, with the dns-* ops
//! OP: tcp:ADDR | udp-sendto:ADDR | udp-connect:ADDR            (ADDR: 1.2.3.4:80, [::1]:80)
//!     | raw4 | udplite4 | mptcp4 | ping4 | ping6 | tcp4-socket     (socket creation only)
//!     side doors: ptrace:PID | environ:PID | mem:PID | vmread:PID | getfd:PID:FD (take the
//!     descriptor) | signal:PID (kill 0) | unix:PATH | unix:@NAME
//!     | vsock | netlink:PROTO | userns | netns | mount-ns | clone-newuser | clone3 | io_uring
//!     | tiocsti (in a new session, into its own pty) | shm:KEY | ipopts:ADDR | rthdr:[Y]:PORT:[X]
//!     inbound (IPv4): tcp-from:SRC:ADDR (connect from SRC and read a byte, 1 s each: ok or
//!     ETIMEDOUT) | udp-from:SRC:ADDR (one datagram from SRC) | udp-ask:ADDR (an unconnected
//!     socket sends to ADDR and waits 1 s for the reply: ok or EAGAIN) | udp-connect-only:ADDR
//!     | recverr4 | recverr6 (setsockopt IP_RECVERR / IPV6_RECVERR on a UDP socket, then read
//!     it back: "on" or "off", or the errno of a failed call)
//! ```
//!
//! It moves itself into the cgroup (and network namespace) before it opens any socket, as
//! `ztseg run` does, because the kernel judges a socket by the cgroup it was created in.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test tool: a panic is the report")]

/// The DNS client ops, the race, and the authoritative server (its own doc lists them).
#[path = "../probe_dns.rs"]
mod dns;

use std::{
    collections::BTreeMap,
    io::{self, BufRead as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use nix::{errno::Errno, sched::CloneFlags};

fn errno_name(e: &io::Error) -> String {
    e.raw_os_error().map_or_else(|| e.to_string(), |n| format!("{:?}", Errno::from_raw(n)))
}

fn run_op(op: &str) -> String {
    let (kind, addr) = op.split_once(':').unwrap_or((op, ""));
    if let Some(outcome) = dns::run_op(kind, addr) {
        return outcome;
    }
    let result = match kind {
        "tcp" => TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5)).map(drop),
        // Closed with a reset (SO_LINGER 0): no TIME_WAIT, so load runs do not run out of ports.
        "tcp-rst" => {
            TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(5)).and_then(|s| {
                let linger = libc::linger { l_onoff: 1, l_linger: 0 };
                nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Linger, &linger)
                    .map_err(io::Error::from)
            })
        }
        "udp-sendto" => {
            let target: SocketAddr = addr.parse().unwrap();
            let local = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            UdpSocket::bind(local).and_then(|s| s.send_to(b"probe", target)).map(drop)
        }
        "udp-connect" => {
            let target: SocketAddr = addr.parse().unwrap();
            let local = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            UdpSocket::bind(local).and_then(|s| s.connect(target).and_then(|()| s.send(b"probe"))).map(drop)
        }
        // A connected UDP socket sending with an IP-level control message (IP_TOS, as QUIC
        // stacks do for ECN): the kernel then runs the sendmsg hook with no address.
        "udp-connect-tos" => {
            let target: SocketAddr = addr.parse().unwrap();
            let local = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            UdpSocket::bind(local).and_then(|s| {
                s.connect(target).and_then(|()| dns::send_with_tos(&s, b"probe", target.is_ipv4()))
            })
        }
        "raw4" => raw_socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
        "udplite4" => raw_socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE),
        "mptcp4" => raw_socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_MPTCP),
        "ping4" => raw_socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
        "ping6" => raw_socket(libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_ICMPV6),
        "packet" => raw_socket(libc::AF_PACKET, libc::SOCK_RAW, 0),
        "tcp4-socket" => raw_socket(libc::AF_INET, libc::SOCK_STREAM, 0),
        "ptrace" => {
            // SAFETY: PTRACE_SEIZE takes integer arguments; on success we detach right away.
            let pid: i32 = addr.parse().unwrap();
            let rc = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) };
            if rc == 0 {
                // SAFETY: as above.
                unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
            }
            check(rc)
        }
        "environ" => std::fs::read(format!("/proc/{addr}/environ")).map(drop),
        "mem" => std::fs::File::open(format!("/proc/{addr}/mem")).map(drop),
        "vmread" => {
            let pid: i32 = addr.parse().unwrap();
            let mut buf = [0u8; 8];
            // Any readable address of the target will do: its stack pointer area is unknown, so ask
            // for the address of our own buffer (same binary, same layout is not assumed: EFAULT
            // also proves the call was permitted).
            let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: 8 };
            let remote = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: 8 };
            // SAFETY: the iovecs describe our own 8-byte buffer.
            let rc = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
            match check(rc as i64) {
                Err(e) if e.raw_os_error() == Some(libc::EFAULT) => Ok(()),
                other => other,
            }
        }
        "getfd" => {
            let (pid, fd) = addr.split_once(':').unwrap();
            let (pid, fd): (i32, i32) = (pid.parse().unwrap(), fd.parse().unwrap());
            // SAFETY: pidfd_open and pidfd_getfd take integers and return new descriptors we own.
            let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            check(pidfd).and_then(|()| {
                let stolen = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd as i32, fd, 0) };
                check(stolen)
            })
        }
        "signal" => {
            // SAFETY: signal 0 only checks permission.
            check(unsafe { libc::kill(addr.parse().unwrap(), 0) }.into())
        }
        "unix" => {
            use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream};
            if let Some(name) = addr.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt as _;
                UnixAddr::from_abstract_name(name).and_then(|a| UnixStream::connect_addr(&a)).map(drop)
            } else {
                UnixStream::connect(addr).map(drop)
            }
        }
        "vsock" => raw_socket(libc::AF_VSOCK, libc::SOCK_STREAM, 0),
        "netlink" => raw_socket(libc::AF_NETLINK, libc::SOCK_RAW, addr.parse().unwrap()),
        "userns" => unshare_in_child(CloneFlags::CLONE_NEWUSER),
        "netns" => unshare_in_child(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET),
        "mount-ns" => unshare_in_child(CloneFlags::CLONE_NEWNS),
        "tiocsti" => in_child(|| {
            // A session leader's exit hangs up its terminal: not the outcome being measured.
            // SAFETY: sets SIGHUP's disposition in this single-threaded child.
            unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
            // A new session whose controlling terminal is a pty of its own: TIOCSTI into one's own
            // terminal is what the kernel allows any user (legacy_tiocsti), so only a filter stops it.
            nix::unistd::setsid().map_err(io::Error::from)?;
            let master = nix::pty::posix_openpt(nix::fcntl::OFlag::O_RDWR).map_err(io::Error::from)?;
            nix::pty::grantpt(&master).and_then(|()| nix::pty::unlockpt(&master)).map_err(io::Error::from)?;
            // SAFETY: ptsname is called once, in this single-threaded child.
            let name = unsafe { nix::pty::ptsname(&master) }.map_err(io::Error::from)?;
            let slave = std::fs::OpenOptions::new().read(true).write(true).open(name)?;
            let byte = b'x';
            // SAFETY: TIOCSTI reads one byte from the pointer.
            check(
                unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&slave), libc::TIOCSTI, &byte) }.into(),
            )
        }),
        "clone3" => {
            // An empty clone_args: the kernel answers EINVAL; a filter that hides clone3, ENOSYS.
            // SAFETY: a null pointer with size 0 is rejected before anything is created.
            check(unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) })
        }
        "clone-newuser" => {
            // clone(2) with CLONE_NEWUSER, fork-like (no new stack): the child exits at once.
            // SAFETY: the child only calls _exit; the parent reaps it.
            let pid =
                unsafe { libc::syscall(libc::SYS_clone, libc::CLONE_NEWUSER | libc::SIGCHLD, 0, 0, 0, 0) };
            if pid == 0 {
                // SAFETY: leaves the child at once.
                unsafe { libc::_exit(0) }
            }
            check(pid).map(|()| {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
            })
        }
        "ipopts" => {
            // A datagram to ADDR with IPv4 options (NOPs and an end marker: harmless ones, which
            // any user may set); the egress program drops any packet with options.
            let target: SocketAddr = addr.parse().unwrap();
            UdpSocket::bind("0.0.0.0:0").and_then(|socket| {
                let options = [1u8, 1, 1, 0];
                // SAFETY: the option value is `options`, whose length is passed with it.
                let rc = unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&socket),
                        libc::IPPROTO_IP,
                        libc::IP_OPTIONS,
                        options.as_ptr().cast(),
                        options.len() as libc::socklen_t,
                    )
                };
                // A refused option is a different outcome from a refused datagram.
                check(rc.into()).map_err(|e| io::Error::other(format!("setsockopt-{}", errno_name(&e))))?;
                socket.send_to(b"options", target).map(drop)
            })
        }
        "shm" => {
            // SAFETY: shmget with integer arguments looks a segment up by key.
            check(unsafe { libc::shmget(addr.parse().unwrap(), 0, 0) }.into())
        }
        "rthdr" => {
            // rthdr:[Y]:PORT:[X]: a UDP datagram to Y with a segment routing header (type 4)
            // whose next segment is X, set with setsockopt(IPV6_RTHDR) as any user may.
            let (to, via) = addr.rsplit_once(":[").unwrap();
            let target: SocketAddr = to.parse().unwrap();
            let via: std::net::Ipv6Addr = via.trim_matches(|c| c == '[' || c == ']').parse().unwrap();
            UdpSocket::bind("[::]:0").and_then(|socket| {
                let mut srh = vec![0u8, 4, 4, 1, 1, 0, 0, 0];
                srh.extend_from_slice(&[0u8; 16]);
                srh.extend_from_slice(&via.octets());
                // SAFETY: the option value is `srh`, whose length is passed with it.
                let rc = unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&socket),
                        libc::IPPROTO_IPV6,
                        libc::IPV6_RTHDR,
                        srh.as_ptr().cast(),
                        srh.len() as libc::socklen_t,
                    )
                };
                // A refused option is a different outcome from a refused datagram.
                check(rc.into()).map_err(|e| io::Error::other(format!("setsockopt-{}", errno_name(&e))))?;
                socket.send_to(b"detour", target).map(drop)
            })
        }
        "tcp-from" => {
            let (src, dst) = addr.split_once(':').unwrap();
            connect_from(src.parse().unwrap(), dst.parse().unwrap()).and_then(|mut stream| {
                use std::io::Read as _;
                stream.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut byte = [0u8; 1];
                match stream.read(&mut byte)? {
                    0 => Err(io::Error::from_raw_os_error(libc::ECONNRESET)),
                    _ => Ok(()),
                }
            })
        }
        "udp-from" => {
            let (src, dst) = addr.split_once(':').unwrap();
            UdpSocket::bind((src, 0)).and_then(|s| s.send_to(b"probe", dst)).map(drop)
        }
        "udp-connect-only" => {
            let target: SocketAddr = addr.parse().unwrap();
            let local = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            UdpSocket::bind(local).and_then(|s| s.connect(target))
        }
        "recverr4" | "recverr6" => {
            // The ICMP error queue: setsockopt(IP_RECVERR / IPV6_RECVERR, 1) on a UDP socket.
            let (local, level, name) = if kind == "recverr4" {
                ("0.0.0.0:0", libc::SOL_IP, libc::IP_RECVERR)
            } else {
                ("[::]:0", libc::SOL_IPV6, libc::IPV6_RECVERR)
            };
            UdpSocket::bind(local).and_then(|socket| {
                let on: libc::c_int = 1;
                // SAFETY: the option value is `on`, whose size is passed with it.
                let rc = unsafe {
                    libc::setsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&socket),
                        level,
                        name,
                        (&raw const on).cast(),
                        size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                check(rc.into())?;
                // Read back what the kernel holds: "on" or "off".
                let (mut value, mut len): (libc::c_int, libc::socklen_t) = (0, size_of::<libc::c_int>() as _);
                // SAFETY: reads an int option into `value`, whose size is passed in `len`.
                let rc = unsafe {
                    libc::getsockopt(
                        std::os::fd::AsRawFd::as_raw_fd(&socket),
                        level,
                        name,
                        (&raw mut value).cast(),
                        &raw mut len,
                    )
                };
                check(rc.into())?;
                Err(io::Error::other(if value == 0 { "off" } else { "on" }))
            })
        }
        "udp-ask" => UdpSocket::bind("0.0.0.0:0").and_then(|s| {
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.send_to(b"ask", addr)?;
            s.recv(&mut [0u8; 64]).map(drop)
        }),
        "io_uring" => {
            let mut params = [0u8; 120];
            // SAFETY: io_uring_setup reads and writes the 120-byte params struct we own.
            let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()) };
            check(fd).map(|()| {
                // SAFETY: we own the new ring's descriptor.
                unsafe { libc::close(fd as i32) };
            })
        }
        other => panic!("unknown op {other}"),
    };
    match result {
        Ok(()) => "ok".to_owned(),
        Err(e) => errno_name(&e),
    }
}

/// unshare(2) in a forked child, so one op's new namespace does not change the next op.
fn unshare_in_child(flags: CloneFlags) -> io::Result<()> {
    in_child(|| nix::sched::unshare(flags).map_err(io::Error::from))
}

/// Runs `f` in a forked child (its session, namespaces or terminal stay there) and returns its
/// outcome: the errno travels back as the exit code.
fn in_child(f: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    // SAFETY: the probe is single-threaded in `once` mode; the child runs `f` and `_exit`s.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Child => {
            let code = match f() {
                Ok(()) => 0,
                Err(e) => e.raw_os_error().unwrap_or(libc::EIO),
            };
            // SAFETY: leaves the child without running any destructor of the parent's state.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => match nix::sys::wait::waitpid(child, None) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Ok(()),
            Ok(nix::sys::wait::WaitStatus::Exited(_, errno)) => Err(io::Error::from_raw_os_error(errno)),
            other => Err(io::Error::other(format!("{other:?}"))),
        },
    }
}

fn check(rc: i64) -> io::Result<()> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn raw_socket(family: i32, kind: i32, protocol: i32) -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is closed right away.
    let fd = unsafe { libc::socket(family, kind, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: we own fd.
    unsafe { libc::close(fd) };
    Ok(())
}

fn boot_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_BOOTTIME)
}

fn unix_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_REALTIME)
}

fn clock_ns(clock: nix::time::ClockId) -> u64 {
    let t = nix::time::clock_gettime(clock).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// Writes one line with one write(2): lines of the probe's threads never interleave, and no
/// thread waits on std's stdout lock (a thread that exits the process could be holding it).
fn emit(line: &str) {
    let line = format!("{line}\n");
    // SAFETY: writes the bytes of `line` to fd 1.
    unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
}

/// Ends the process when stdin closes (the test's "stop"), after stdout is flushed.
fn exit_on_stdin_close() {
    thread::spawn(|| {
        let mut buf = [0u8; 64];
        // SAFETY: reads raw fd 0 into our buffer until end of file.
        while unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        // SAFETY: ends the process at once; every line was written with one write(2).
        unsafe { libc::_exit(0) }
    });
}

fn echo(addr: &str) {
    use std::io::Read as _;
    exit_on_stdin_close();
    let addr: SocketAddr = addr.parse().unwrap();
    let listener = TcpListener::bind(addr).unwrap();
    let udp = UdpSocket::bind(addr).unwrap();
    // Besides echoing, it sends a byte of its own every 10 ms to each peer it has heard from,
    // so what reaches the agent does not depend on what the agent sends.
    let push = udp.try_clone().unwrap();
    let last_peer = Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
    let heard = last_peer.clone();
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, peer)) = udp.recv_from(&mut buf) {
            emit(&format!("rx {}", boot_ns()));
            *heard.lock().unwrap() = Some(peer);
            let _ = udp.send_to(&buf[..n], peer);
        }
    });
    thread::spawn(move || {
        loop {
            if let Some(peer) = *last_peer.lock().unwrap() {
                let _ = push.send_to(b"p", peer);
            }
            thread::sleep(Duration::from_millis(10));
        }
    });
    emit("ready");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut pusher = stream.try_clone().unwrap();
        thread::spawn(move || {
            while pusher.write_all(b"p").is_ok() {
                thread::sleep(Duration::from_millis(10));
            }
        });
        thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    return;
                }
                emit(&format!("rx {}", boot_ns()));
                let _ = stream.write_all(&buf[..n]);
            }
        });
    }
}

/// Prints "pkt DST NEXT" for every IPv6 packet that arrives on interface `iface` (the raw view
/// of the wire, before any protocol handling), until stdin closes.
fn capture(iface: &str) {
    exit_on_stdin_close();
    const ETH_P_IPV6: u16 = 0x86dd;
    // SAFETY: socket(2) returns a new descriptor, kept for the life of the process.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(ETH_P_IPV6.to_be())) };
    assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
    let index = nix::net::if_::if_nametoindex(iface).unwrap();
    // SAFETY: a zeroed sockaddr_ll with family, protocol and ifindex set is a valid address.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_IPV6.to_be();
    sll.sll_ifindex = index as i32;
    // SAFETY: binds fd to the address above.
    let rc = unsafe { libc::bind(fd, (&raw const sll).cast(), size_of::<libc::sockaddr_ll>() as u32) };
    assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
    emit("ready");
    let mut buf = [0u8; 2048];
    loop {
        // SAFETY: receives at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 40 {
            continue;
        }
        let dst = std::net::Ipv6Addr::from(<[u8; 16]>::try_from(&buf[24..40]).unwrap());
        emit(&format!("pkt {dst} {}", buf[6]));
    }
}

fn stream(addr: &str) {
    exit_on_stdin_close();
    let target: SocketAddr = addr.parse().unwrap();
    let tcp = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
    let udp = UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
    udp.connect(target).unwrap();
    stream_on(tcp, udp);
}

/// `stream-moved CGROUP ADDR`: makes its TCP and UDP sockets where it starts (in one agent's
/// cgroup), moves itself into CGROUP (another agent's), connects them there and streams as
/// `stream` does: the state of a socket one agent made and handed to another (SCM_RIGHTS),
/// which the other connected under its own rules.
fn stream_moved(cgroup: &str, addr: &str) {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, connect, socket};
    exit_on_stdin_close();
    let target: SocketAddr = addr.parse().unwrap();
    let family = if target.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let tcp = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    let udp = UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
    std::fs::write(format!("{cgroup}/cgroup.procs"), "0").unwrap();
    connect(std::os::fd::AsRawFd::as_raw_fd(&tcp), &SockaddrStorage::from(target)).unwrap();
    udp.connect(target).unwrap();
    stream_on(TcpStream::from(tcp), udp);
}

fn stream_on(mut tcp: TcpStream, udp: UdpSocket) {
    use std::io::Read as _;
    // Said before the readers start, so it is always the first line.
    emit("connected");
    // Each socket has a reader of its own that stamps a chunk the moment it is taken off the
    // socket, so a backlog cannot show up as late arrivals.
    let udp_reader = udp.try_clone().unwrap();
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        loop {
            match udp_reader.recv(&mut buf) {
                Ok(_) => emit(&format!("udp {}", boot_ns())),
                // Refused (ICMP) or closed: the socket stays; keep reading.
                Err(_) => thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    let reader = tcp.try_clone().unwrap();
    thread::spawn(move || {
        let mut reader = reader;
        let mut buf = [0u8; 64];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => {
                    emit("tcp-closed EOF");
                    return;
                }
                Ok(_) => emit(&format!("tcp {}", boot_ns())),
                Err(e) => {
                    emit(&format!("tcp-closed {}", errno_name(&e)));
                    return;
                }
            }
        }
    });
    let mut write_failed = false;
    loop {
        // The abort's error goes to whichever of reader and writer asks first.
        if let Err(e) = tcp.write_all(b"t")
            && !write_failed
        {
            write_failed = true;
            emit(&format!("tcp-closed {}", errno_name(&e)));
        }
        let _ = udp.send(b"u");
        thread::sleep(Duration::from_millis(10));
    }
}

/// A TCP connection from `src` (port chosen by the kernel) to `dst`, given up after 1 s.
fn connect_from(src: std::net::Ipv4Addr, dst: std::net::SocketAddrV4) -> io::Result<TcpStream> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
    };
    let fd = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(std::net::SocketAddrV4::new(src, 0)))?;
    // A blocking connect gives up after the send timeout, with EINPROGRESS.
    setsockopt(&fd, sockopt::SendTimeout, &nix::sys::time::TimeVal::new(1, 0))?;
    match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(dst)) {
        Ok(()) => Ok(TcpStream::from(fd)),
        Err(Errno::EINPROGRESS) => Err(io::Error::from_raw_os_error(libc::ETIMEDOUT)),
        Err(e) => Err(e.into()),
    }
}

/// A TCP listener and a UDP socket on `addr`: says "hi" to each connection and names every peer.
fn listen(addr: &str) {
    let addr: SocketAddr = addr.parse().unwrap();
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
    let udp = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
    thread::spawn(move || {
        let mut buf = [0u8; 64];
        loop {
            if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                emit(&format!("udp {}", peer.ip()));
            }
        }
    });
    emit("ready");
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                // Closed under it (the kill switch): say so and wait to be stopped.
                emit(&format!("accept-error {}", errno_name(&e)));
                loop {
                    thread::park();
                }
            }
        };
        if let Ok(peer) = stream.peer_addr() {
            emit(&format!("accepted {}", peer.ip()));
        }
        let _ = stream.write_all(b"hi");
    }
}

/// A TCP listener with an accept queue of 4096, not the standard library's 128: a load test's
/// connects must not overflow it while the accepting thread waits for a CPU (each dropped SYN
/// comes back only after a 1 s retransmission).
fn listener(addr: SocketAddr) -> io::Result<TcpListener> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, bind, socket};
    use std::os::fd::AsRawFd as _;
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReuseAddr, &true)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    // SAFETY: listen(2) on a socket we own.
    check(unsafe { libc::listen(fd.as_raw_fd(), 4096) }.into())?;
    Ok(TcpListener::from(fd))
}

fn serve(addrs: &[String]) {
    let mut keep = Vec::new();
    for addr in addrs {
        let addr: SocketAddr = addr.parse().unwrap();
        let listener = listener(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
        keep.push(UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}")));
        thread::spawn(move || {
            for stream in listener.incoming() {
                drop(stream);
            }
        });
    }
    println!("ready");
    io::stdout().flush().unwrap();
    loop {
        thread::park();
    }
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    while args.first().is_some_and(|a| a.starts_with("--")) {
        let flag = args.remove(0);
        let value = args.remove(0);
        match flag.as_str() {
            "--netns" => {
                let ns = std::fs::File::open(&value).unwrap();
                nix::sched::setns(ns, CloneFlags::CLONE_NEWNET).unwrap();
            }
            "--cgroup" => {
                std::fs::write(format!("{value}/cgroup.procs"), "0").unwrap();
            }
            other => panic!("unknown flag {other}"),
        }
    }
    let mode = args.remove(0);
    let mut out = io::stdout().lock();
    match mode.as_str() {
        "once" => {
            for op in &args {
                writeln!(out, "{}", run_op(op)).unwrap();
            }
        }
        "loop" => {
            let stop = Arc::new(AtomicBool::new(false));
            let stop_reader = stop.clone();
            thread::spawn(move || {
                for _ in io::stdin().lock().lines() {}
                stop_reader.store(true, Ordering::SeqCst);
            });
            let mut counts: BTreeMap<&str, BTreeMap<String, u64>> = BTreeMap::new();
            let mut first = true;
            while !stop.load(Ordering::SeqCst) {
                for op in &args {
                    *counts.entry(op).or_default().entry(run_op(op)).or_default() += 1;
                }
                if first {
                    writeln!(out, "started").unwrap();
                    out.flush().unwrap();
                    first = false;
                }
            }
            for (op, outcomes) in counts {
                let ok = outcomes.get("ok").copied().unwrap_or(0);
                let eperm = outcomes.get("EPERM").copied().unwrap_or(0);
                let other: u64 =
                    outcomes.iter().filter(|(k, _)| *k != "ok" && *k != "EPERM").map(|(_, v)| v).sum();
                writeln!(out, "{op} ok={ok} EPERM={eperm} other={other}").unwrap();
            }
        }
        "until-denied" => {
            let op = &args[0];
            writeln!(out, "first {}", run_op(op)).unwrap();
            out.flush().unwrap();
            // Polls the kernel's verdict: the deadline passing is not an event anyone announces.
            let give_up = boot_ns() + 30_000_000_000;
            let (mut last_ok_started, mut last_ok_started_unix) = (0, 0);
            loop {
                let (started, started_unix) = (boot_ns(), unix_ns());
                match run_op(op).as_str() {
                    "ok" => (last_ok_started, last_ok_started_unix) = (started, started_unix),
                    "EPERM" => {
                        let (ended, ended_unix) = (boot_ns(), unix_ns());
                        writeln!(
                            out,
                            "last-ok-started {last_ok_started} denied-ended {ended} \
                             last-ok-started-unix {last_ok_started_unix} denied-ended-unix {ended_unix}"
                        )
                        .unwrap();
                        break;
                    }
                    other => panic!("{op}: {other}"),
                }
                if started > give_up {
                    writeln!(out, "never-denied").unwrap();
                    break;
                }
                thread::sleep(Duration::from_millis(2));
            }
        }
        "repeat" | "gated-repeat" => {
            if mode == "gated-repeat" {
                // Lets the test start the agent first and then, say, stop the daemon.
                writeln!(out, "ready").unwrap();
                out.flush().unwrap();
                io::stdin().lock().read_line(&mut String::new()).unwrap();
            }
            let n: u64 = args[0].parse().unwrap();
            let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
            for _ in 0..n {
                for op in &args[1..] {
                    *outcomes.entry(run_op(op)).or_default() += 1;
                }
            }
            let line: Vec<String> = outcomes.iter().map(|(k, v)| format!("{k}={v}")).collect();
            writeln!(out, "{}", line.join(" ")).unwrap();
        }
        "serve" => serve(&args),
        "hold" => {
            use std::os::fd::AsRawFd as _;
            let target: SocketAddr = args[0].parse().unwrap();
            let local = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let socket = UdpSocket::bind(local).unwrap();
            socket.connect(target).unwrap();
            println!("pid {} fd {}", std::process::id(), socket.as_raw_fd());
            io::stdout().flush().unwrap();
            let mut line = String::new();
            while io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {}
        }
        "echo" => echo(&args[0]),
        "dns-server" => dns::server(&args),
        "dns-hold" => {
            // dns-hold SERVER N SECS HEX: N TCP connections to SERVER; "held K"; then every 5 s a
            // framed query (HEX) on each still open, for SECS s; "alive K" at the end.
            let server: SocketAddr = args[0].parse().unwrap();
            let n: usize = args[1].parse().unwrap();
            let secs: u64 = args[2].parse().unwrap();
            let query = dns::unhex(&args[3]);
            let mut conns: Vec<TcpStream> = (0..n)
                .filter_map(|_| TcpStream::connect_timeout(&server, Duration::from_secs(3)).ok())
                .collect();
            writeln!(out, "held {}", conns.len()).unwrap();
            out.flush().unwrap();
            let end = std::time::Instant::now() + Duration::from_secs(secs);
            while std::time::Instant::now() < end {
                thread::sleep(Duration::from_secs(5));
                conns.retain_mut(|c| {
                    use std::io::Read as _;
                    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut len = [0u8; 2];
                    c.write_all(&query).is_ok() && c.read_exact(&mut len).is_ok() && {
                        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        c.read_exact(&mut buf).is_ok()
                    }
                });
            }
            writeln!(out, "alive {}", conns.len()).unwrap();
        }
        "race" => dns::race(&args),
        "capture" => capture(&args[0]),
        "stream" => stream(&args[0]),
        "stream-moved" => stream_moved(&args[0], &args[1]),
        "listen" => listen(&args[0]),
        "listen-unix" => {
            use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener};
            let listener = if let Some(name) = args[0].strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt as _;
                UnixListener::bind_addr(&UnixAddr::from_abstract_name(name).unwrap()).unwrap()
            } else {
                let listener = UnixListener::bind(&args[0]).unwrap();
                // World-writable: only the mechanism under test may stop a connect, not the mode.
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&args[0], std::fs::Permissions::from_mode(0o777)).unwrap();
                listener
            };
            println!("ready");
            io::stdout().flush().unwrap();
            for stream in listener.incoming() {
                drop(stream);
            }
        }
        other => panic!("unknown mode {other}"),
    }
}
