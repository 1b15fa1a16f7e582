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
//! OP: tcp:ADDR | udp-sendto:ADDR | udp-connect:ADDR            (ADDR: 1.2.3.4:80, [::1]:80)
//!     | raw4 | udplite4 | mptcp4 | ping4 | ping6 | tcp4-socket     (socket creation only)
//! ```
//!
//! It moves itself into the cgroup (and network namespace) before it opens any socket, as
//! `ztseg run` does, because the kernel judges a socket by the cgroup it was created in.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test tool: a panic is the report")]

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
        "raw4" => raw_socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP),
        "udplite4" => raw_socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE),
        "mptcp4" => raw_socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_MPTCP),
        "ping4" => raw_socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
        "ping6" => raw_socket(libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_ICMPV6),
        "packet" => raw_socket(libc::AF_PACKET, libc::SOCK_RAW, 0),
        "tcp4-socket" => raw_socket(libc::AF_INET, libc::SOCK_STREAM, 0),
        other => panic!("unknown op {other}"),
    };
    match result {
        Ok(()) => "ok".to_owned(),
        Err(e) => errno_name(&e),
    }
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

fn serve(addrs: &[String]) {
    let mut keep = Vec::new();
    for addr in addrs {
        let addr: SocketAddr = addr.parse().unwrap();
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}"));
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
        other => panic!("unknown mode {other}"),
    }
}
