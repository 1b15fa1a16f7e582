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

/// `ztseg-bench worker tcp|udp ADDR N CGROUP NETNS`: times N operations, or as many as fit in
/// two seconds, after a warm-up of a twentieth of that; prints "NS_TOTAL OK FAILED".
pub fn main(args: &[String]) -> Result<()> {
    let [mode, addr, n, cgroup, netns] = args else {
        bail!("usage: ztseg-bench worker tcp|udp ADDR N CGROUP NETNS");
    };
    let addr: SocketAddr = addr.parse()?;
    let n: u64 = n.parse()?;
    join(cgroup, netns)?;
    let (ns, ok, failed) = match mode.as_str() {
        "tcp" => {
            time(n / 20, BUDGET / 20, || tcp_once(addr));
            time(n, BUDGET, || tcp_once(addr))
        }
        "udp" => {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            let payload = [0u8; 64];
            time(n / 20, BUDGET / 20, || socket.send_to(&payload, addr).map(drop));
            time(n, BUDGET, || socket.send_to(&payload, addr).map(drop))
        }
        other => bail!("unknown mode {other}"),
    };
    println!("{ns} {ok} {failed}");
    Ok(())
}

fn time(n: u64, budget: Duration, mut op: impl FnMut() -> io::Result<()>) -> (u128, u64, u64) {
    let (mut ok, mut failed) = (0, 0);
    let start = Instant::now();
    for i in 0..n {
        if op().is_ok() {
            ok += 1
        } else {
            failed += 1
        }
        if i % 64 == 63 && start.elapsed() > budget {
            break;
        }
    }
    (start.elapsed().as_nanos(), ok, failed)
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
/// awaited outcome was first seen.
pub fn spin(args: &[String]) -> Result<()> {
    use std::io::Write as _;
    let [until, addr, cgroup, netns] = args else {
        bail!("usage: ztseg-bench spin until-ok|until-denied ADDR CGROUP NETNS");
    };
    let addr: SocketAddr = addr.parse()?;
    join(cgroup, netns)?;
    let want_ok = until == "until-ok";
    let mut announced = false;
    let give_up = boot_ns() + 30_000_000_000;
    loop {
        let ok = tcp_once(addr).is_ok();
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
    join(cgroup, netns)?;
    println!("ready");
    io::stdout().flush()?;
    io::stdin().lock().read_line(&mut String::new())?;
    let ok = (0..n).filter(|_| tcp_once(addr).is_ok()).count();
    println!("{ok}");
    Ok(())
}
