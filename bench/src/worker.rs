//! The load generator: a child process that joins a cgroup (the agent's, or one outside the
//! agents' root) and the bench's network namespace, then times N operations.

use std::{
    io,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sched::CloneFlags;

/// A configuration this slow (an nftables list walked per packet) is timed on fewer operations.
const BUDGET: Duration = Duration::from_secs(2);

/// Operations a worker runs per turn: a turn lasts well under a millisecond, so the two
/// workers of a pair see the same machine.
const TURN_OPS: u64 = 64;

/// `ztseg-bench worker tcp|udp ADDR N CGROUP NETNS`: warms up, prints "ready", then runs
/// [`TURN_OPS`] operations each time it reads "go" from stdin (printing "done"), each timed on
/// its own, until it reads "end" or has run N or spent two seconds; then prints
/// "OK FAILED P50_NS P99_NS". Two workers taking turns (the case's and the baseline's, see
/// `measure_pair`) are measured over the same stretch of time, so a change in the machine's
/// load moves both.
pub fn main(args: &[String]) -> Result<()> {
    use std::io::{BufRead as _, Write as _};
    let [mode, addr, n, cgroup, netns] = args else {
        bail!("usage: ztseg-bench worker tcp|udp ADDR N CGROUP NETNS");
    };
    let addr: SocketAddr = addr.parse()?;
    let n: u64 = n.parse()?;
    join(cgroup, netns)?;
    let udp = UdpSocket::bind("0.0.0.0:0")?;
    let payload = [0u8; 64];
    let op = || -> io::Result<()> {
        match mode.as_str() {
            "tcp" => tcp_once(addr),
            _ => udp.send_to(&payload, addr).map(drop),
        }
    };
    if mode != "tcp" && mode != "udp" {
        bail!("unknown mode {mode}");
    }
    for _ in 0..(n / 20).min(2_000) {
        let _ = op();
    }
    let mut out = io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    let (mut ok, mut failed, mut spent) = (0u64, 0u64, Duration::ZERO);
    let mut each = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    let mut line = String::new();
    while io::stdin().lock().read_line(&mut line)? > 0 && line.trim() == "go" {
        line.clear();
        let start = Instant::now();
        for _ in 0..TURN_OPS {
            let t = Instant::now();
            if op().is_ok() {
                ok += 1
            } else {
                failed += 1
            }
            each.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
        spent += start.elapsed();
        let finished = ok + failed >= n || spent > BUDGET;
        writeln!(out, "{}", if finished { "finished" } else { "done" })?;
        out.flush()?;
    }
    let each: Vec<f64> = each.into_iter().map(|ns| ns as f64).collect();
    let (p50, p99) = (crate::stats::percentile(&each, 50.0), crate::stats::percentile(&each, 99.0));
    writeln!(out, "{ok} {failed} {p50:.0} {p99:.0}")?;
    Ok(())
}

/// Connect and close with a reset (SO_LINGER 0): no TIME_WAIT, so long runs keep their ports.
fn tcp_once(addr: SocketAddr) -> io::Result<()> {
    let stream = TcpStream::connect(addr)?;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &linger).map_err(io::Error::from)
}

fn boot_ns() -> u64 {
    ztseg::clock::boot_now_ns()
}

fn join(cgroup: &str, netns: &str) -> Result<()> {
    nix::sched::setns(std::fs::File::open(netns)?, CloneFlags::CLONE_NEWNET).context("setns")?;
    std::fs::write(format!("{cgroup}/cgroup.procs"), "0").context("join cgroup")
}

/// `ztseg-bench spin until-ok|until-denied ADDR CGROUP NETNS`: connects in a tight loop; prints
/// "spinning" once the first outcome is the opposite one, then the CLOCK_BOOTTIME ns at which the
/// awaited outcome was first seen. ADDR has no listener: an allowed connect is refused at once by
/// the peer's reset (ECONNREFUSED), a denied one by the hook (EPERM), so no connect can wait on
/// an accept queue and the time measured is the enforcement's.
pub fn spin(args: &[String]) -> Result<()> {
    use std::io::Write as _;
    let [until, addr, cgroup, netns] = args else {
        bail!("usage: ztseg-bench spin until-ok|until-denied ADDR CGROUP NETNS");
    };
    let addr: SocketAddr = addr.parse()?;
    set_nice(0);
    join(cgroup, netns)?;
    let want_ok = until == "until-ok";
    let mut announced = false;
    let give_up = boot_ns() + 30_000_000_000;
    loop {
        let ok = match TcpStream::connect(addr) {
            Ok(_) => true,
            Err(e) => e.raw_os_error() != Some(libc::EPERM),
        };
        if ok == want_ok {
            let at = boot_ns();
            if !announced {
                bail!("the awaited outcome came before the change");
            }
            println!("{at}");
            return Ok(());
        }
        if !announced {
            println!("spinning");
            io::stdout().flush()?;
            announced = true;
        }
        if boot_ns() > give_up {
            bail!("gave up after 30 s");
        }
    }
}

/// `ztseg-bench burst N ADDR CGROUP NETNS`: prints "ready", waits for a line on stdin, then makes
/// N connects and prints how many succeeded.
pub fn burst(args: &[String]) -> Result<()> {
    use std::io::{BufRead as _, Write as _};
    let [n, addr, cgroup, netns] = args else {
        bail!("usage: ztseg-bench burst N ADDR CGROUP NETNS");
    };
    let (n, addr): (u64, SocketAddr) = (n.parse()?, addr.parse()?);
    set_nice(0);
    join(cgroup, netns)?;
    println!("ready");
    io::stdout().flush()?;
    io::stdin().lock().read_line(&mut String::new())?;
    let ok = (0..n).filter(|_| tcp_once(addr).is_ok()).count();
    println!("{ok}");
    Ok(())
}

/// `ztseg-bench flow ADDR CGROUP NETNS`: a TCP connection with bytes flowing both ways between
/// this process's agent side (a socket made in CGROUP) and its server side (a listener made
/// before joining CGROUP, so the kernel charges it and its connection to the outside). Prints
/// "flowing" once chunks went both ways; then, once the agent's socket failed (the kill closed
/// it) and a further watch window passed, "LAST_IN LAST_OUT CLOSED": the boot-clock ns at which
/// the agent last received a chunk, the server last received one from the agent, and the agent's
/// socket reported its end.
pub fn flow(args: &[String]) -> Result<()> {
    use std::{
        io::{Read as _, Write as _},
        net::TcpListener,
        sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        },
    };
    let [addr, cgroup, netns] = args else {
        bail!("usage: ztseg-bench flow ADDR CGROUP NETNS");
    };
    let addr: SocketAddr = addr.parse()?;
    set_nice(0);
    nix::sched::setns(std::fs::File::open(netns)?, CloneFlags::CLONE_NEWNET).context("setns")?;
    let listener = TcpListener::bind(addr)?;
    std::fs::write(format!("{cgroup}/cgroup.procs"), "0").context("join cgroup")?;
    let agent = TcpStream::connect(addr)?;
    let (server, _) = listener.accept()?;
    agent.set_nodelay(true)?;
    server.set_nodelay(true)?;
    // Stamps: [agent received, server received, agent's socket ended], and chunk counts.
    let stamps: Arc<[AtomicU64; 5]> = Arc::new(Default::default());
    let reader = |mut socket: TcpStream, at: usize, end: Option<usize>| {
        let stamps = stamps.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match socket.read(&mut buf) {
                    Ok(n) if n > 0 => {
                        stamps[at].store(boot_ns(), Ordering::SeqCst);
                        stamps[at + 3].fetch_add(1, Ordering::SeqCst);
                    }
                    _ => {
                        if let Some(end) = end {
                            stamps[end].store(boot_ns(), Ordering::SeqCst);
                        }
                        return;
                    }
                }
            }
        })
    };
    // A chunk every 100 µs each way: a steady flow that never fills a socket buffer, so a
    // chunk is read the moment it is delivered.
    let writer = |mut socket: TcpStream| {
        std::thread::spawn(move || {
            while socket.write_all(&[0u8; 64]).is_ok() {
                std::thread::sleep(Duration::from_micros(100));
            }
        })
    };
    reader(agent.try_clone()?, 0, Some(2));
    reader(server.try_clone()?, 1, None);
    writer(agent.try_clone()?);
    writer(server.try_clone()?);
    let give_up = boot_ns() + 10_000_000_000;
    while stamps[3].load(Ordering::SeqCst) < 10 || stamps[4].load(Ordering::SeqCst) < 10 {
        if boot_ns() > give_up {
            bail!("no flow after 10 s");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    println!("flowing");
    io::stdout().flush()?;
    while stamps[2].load(Ordering::SeqCst) == 0 {
        if boot_ns() > give_up + 10_000_000_000 {
            bail!("the agent's socket was not closed within 10 s");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    // Absence cannot be awaited: watch 20 ms more (200 chunks' worth each way) for late bytes.
    std::thread::sleep(Duration::from_millis(20));
    let s = |i: usize| stamps[i].load(Ordering::SeqCst);
    println!("{} {} {}", s(0), s(1), s(2));
    Ok(())
}

/// `ztseg-bench bulk ADDR MILLIS CGROUP NETNS`: sends as fast as TCP allows for MILLIS ms to a
/// sink at ADDR; prints the bytes per second.
pub fn bulk(args: &[String]) -> Result<()> {
    use std::io::Write as _;
    let [addr, millis, cgroup, netns] = args else {
        bail!("usage: ztseg-bench bulk ADDR MILLIS CGROUP NETNS");
    };
    let (addr, millis): (SocketAddr, u64) = (addr.parse()?, millis.parse()?);
    join(cgroup, netns)?;
    let mut stream = TcpStream::connect(addr)?;
    let chunk = vec![0u8; 64 * 1024];
    let (start, mut sent) = (Instant::now(), 0u64);
    while start.elapsed() < Duration::from_millis(millis) {
        stream.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    println!("{:.0}", sent as f64 / start.elapsed().as_secs_f64());
    Ok(())
}

/// Sets the calling thread's nice value (best effort: the figures stay valid without it, only
/// noisier).
pub fn set_nice(nice: i32) {
    // SAFETY: setpriority on our own thread id.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
}

/// Puts the calling thread on `SCHED_FIFO` at the daemon's control priority, with the threads
/// and processes it starts falling back to the normal policy (`SCHED_RESET_ON_FORK`): the bench's
/// requests and its watchers then wait for a CPU no longer than the daemon's control thread
/// does, so the latencies time the daemon, not the bench.
pub fn set_fifo() -> Result<()> {
    const SCHED_RESET_ON_FORK: libc::c_int = 0x4000_0000;
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: sched_setscheduler reads `param` for the calling thread (0).
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO | SCHED_RESET_ON_FORK, &param) };
    if rc != 0 {
        bail!(
            "cannot run the bench's measuring thread at real-time priority: {}",
            io::Error::last_os_error()
        );
    }
    Ok(())
}

/// `ztseg-bench udp-flood COUNT ADDR CGROUP NETNS`: prints "ready", waits for a line on stdin,
/// then sends COUNT datagrams to ADDR from one unconnected socket (each a `sendmsg4` decision) as
/// fast as it can and prints how many were sent.
pub fn udp_flood(args: &[String]) -> Result<()> {
    use std::io::{BufRead as _, Write as _};
    let [count, addr, cgroup, netns] = args else {
        bail!("usage: ztseg-bench udp-flood COUNT ADDR CGROUP NETNS");
    };
    let (count, addr): (u64, SocketAddr) = (count.parse()?, addr.parse()?);
    set_nice(0);
    join(cgroup, netns)?;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    println!("ready");
    io::stdout().flush()?;
    io::stdin().lock().lines().next();
    let mut sent = 0u64;
    for _ in 0..count {
        if socket.send_to(b"x", addr).is_ok() {
            sent += 1;
        }
    }
    println!("{sent}");
    Ok(())
}
