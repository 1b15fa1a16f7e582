//! The probe's DNS parts: a client (the agent's view of name resolution) and an authoritative
//! server with a query log (the test host's resolver, which the daemon's proxy forwards to).
//!
//! ```text
//! ztseg-probe [--netns PATH] dns-server ADDR ZONE LOG   UDP and TCP on ADDR; "ready"; answers
//!                                                       from ZONE (re-read at each query) and
//!                                                       appends "NAME TYPE" to LOG per query
//! ZONE: one record a line, "NAME TYPE VALUE TTL" (TYPE: A, AAAA, CNAME, TXT); NAME without the
//!       trailing dot; "*.zone" answers every name one label below zone that has no record
//! ops:  dns-udp:SERVER/NAME/TYPE     an unconnected UDP socket sends the query (sendto, recvfrom)
//!       dns-conn:SERVER/NAME/TYPE    a connected UDP socket (connect, send, recvfrom)
//!       dns-tcp:SERVER/NAME/TYPE     over TCP
//!       each prints "rcode=RCODE answers=A,B,... ttl=MIN from=SRC peer=PEER" (answers: the
//!       addresses and "cname:NAME"s; from: where recvfrom said the answer came from; peer:
//!       getpeername of a connected socket, "-" otherwise), or an errno name
//!       dns-exfil:SERVER/DOMAIN/N    N queries of distinct base32 labels under DOMAIN, each
//!       over connected UDP: prints the count of each outcome ("Refused=1000")
//!       lookup-connect:SERVER/NAME/PORT   an A query (connected UDP), then a TCP connect to the
//!       first address at PORT: "ok", an errno name, or "rcode=RCODE"
//!       getaddrinfo:NAME:PORT        the C library's resolver (no server given: the host's
//!       /etc/resolv.conf), then a TCP connect to the first address: "ok", an errno name, or
//!       "resolve-failed"
//! ztseg-probe race N THREADS SERVER PORT NAME...       N lookups over THREADS threads, each at
//!       once followed by a TCP connect to the answer: prints "lookups=N answered=A connected=C
//!       refused=R other=O"
//! ```

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME, TXT},
    },
};

const TIMEOUT: Duration = Duration::from_secs(3);

fn errno_name(e: &io::Error) -> String {
    e.raw_os_error().map_or_else(|| e.to_string(), |n| format!("{:?}", nix::errno::Errno::from_raw(n)))
}

fn record_type(text: &str) -> RecordType {
    text.parse().unwrap_or_else(|_| panic!("unknown record type {text}"))
}

/// A query for `name`/`qtype` with a random id.
pub fn query(name: &str, qtype: RecordType) -> Message {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    message
}

/// One line for an answer: rcode, answers, the smallest TTL.
pub fn describe(answer: &Message) -> String {
    let answers: Vec<String> = answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            RData::CNAME(c) => Some(format!("cname:{}", c.0.to_ascii().trim_end_matches('.'))),
            RData::TXT(_) => Some("txt".to_owned()),
            _ => None,
        })
        .collect();
    let ttl = answer.answers.iter().map(|r| r.ttl).min().map_or("-".to_owned(), |t| t.to_string());
    format!("rcode={:?} answers={} ttl={ttl}", answer.metadata.response_code, answers.join(","))
}

fn check_reply(sent: &Message, bytes: &[u8]) -> io::Result<Message> {
    let reply = Message::from_vec(bytes).map_err(|e| io::Error::other(format!("malformed-{e}")))?;
    if reply.metadata.id != sent.metadata.id {
        return Err(io::Error::other("wrong-id"));
    }
    Ok(reply)
}

fn udp_socket(server: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    Ok(socket)
}

/// Asks `server` over UDP (connected or not): the answer, where it came from, and the socket's
/// peer if connected.
/// How a UDP query is sent: to an address, on a connected socket, or on a connected socket
/// with a traffic-class control message (what QUIC stacks add for ECN).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Udp {
    SendTo,
    Connected,
    ConnectedTos,
}

pub fn ask_udp(
    server: SocketAddr,
    message: &Message,
    how: Udp,
) -> io::Result<(Message, SocketAddr, Option<SocketAddr>)> {
    let socket = udp_socket(server)?;
    let bytes = message.to_vec().map_err(io::Error::other)?;
    let peer = if how != Udp::SendTo {
        socket.connect(server)?;
        if how == Udp::ConnectedTos {
            send_with_tos(&socket, &bytes, server.is_ipv4())?;
        } else {
            socket.send(&bytes)?;
        }
        Some(socket.peer_addr()?)
    } else {
        socket.send_to(&bytes, server)?;
        None
    };
    let mut buf = [0u8; 4096];
    let (n, from) = socket.recv_from(&mut buf)?;
    Ok((check_reply(message, &buf[..n])?, from, peer))
}

/// Sends `data` on connected `socket` with a traffic-class control message (IP_TOS or
/// IPV6_TCLASS, ECT(0)): the kernel then runs the sendmsg hook with no address.
pub fn send_with_tos(socket: &UdpSocket, data: &[u8], v4: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let (level, kind) =
        if v4 { (libc::IPPROTO_IP, libc::IP_TOS) } else { (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) };
    let value: libc::c_int = 2;
    let mut data = data.to_vec();
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // SAFETY: CMSG_SPACE is a size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: a zeroed msghdr is valid; its pointers are set to live buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: the control buffer holds one header of CMSG_SPACE(int) bytes; CMSG_* walk it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), value);
    }
    // SAFETY: sendmsg reads msg, its iovec and control buffer, all live here.
    if unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn ask_tcp(server: SocketAddr, message: &Message) -> io::Result<(Message, SocketAddr)> {
    let mut stream = TcpStream::connect_timeout(&server, TIMEOUT)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let bytes = message.to_vec().map_err(io::Error::other)?;
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    stream.write_all(&framed)?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf)?;
    Ok((check_reply(message, &buf)?, stream.peer_addr()?))
}

/// A `dns-*` or `lookup-connect` op; `None` if `kind` is none of them.
pub fn run_op(kind: &str, arg: &str) -> Option<String> {
    let outcome = match kind {
        "dns-udp" | "dns-conn" | "dns-conn-tos" | "dns-tcp" => {
            let (server, name, qtype) = three(arg);
            let message = query(name, record_type(qtype));
            let server: SocketAddr = server.parse().unwrap();
            let result = match kind {
                "dns-tcp" => ask_tcp(server, &message).map(|(m, peer)| (m, peer, Some(peer))),
                "dns-conn" => ask_udp(server, &message, Udp::Connected),
                "dns-conn-tos" => ask_udp(server, &message, Udp::ConnectedTos),
                _ => ask_udp(server, &message, Udp::SendTo),
            };
            match result {
                Ok((answer, from, peer)) => format!(
                    "{} from={from} peer={}",
                    describe(&answer),
                    peer.map_or("-".to_owned(), |p| p.to_string())
                ),
                Err(e) => errno_name(&e),
            }
        }
        "dns-exfil" => {
            // N queries of names shaped like data smuggled out: a base32 label per query.
            let (server, domain, n) = three(arg);
            let server: SocketAddr = server.parse().unwrap();
            let mut rcodes: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
            for i in 0..n.parse::<u64>().unwrap() {
                let secret =
                    format!("{:016x}{:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15), std::process::id());
                let label = base32(secret.as_bytes());
                let outcome = match ask_udp(
                    server,
                    &query(&format!("{label}.{domain}"), RecordType::A),
                    Udp::Connected,
                ) {
                    Ok((answer, _, _)) => format!("{:?}", answer.metadata.response_code),
                    Err(e) => errno_name(&e),
                };
                *rcodes.entry(outcome).or_default() += 1;
            }
            rcodes.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
        }
        "lookup-connect" => {
            let (server, name, port) = three(arg);
            lookup_connect(server.parse().unwrap(), name, port.parse().unwrap())
        }
        "getaddrinfo" => {
            let (name, port) = arg.rsplit_once(':').unwrap();
            match std::net::ToSocketAddrs::to_socket_addrs(&(name, port.parse::<u16>().unwrap())) {
                Ok(mut addrs) => match addrs.next() {
                    Some(addr) => match TcpStream::connect_timeout(&addr, TIMEOUT) {
                        Ok(_) => "ok".to_owned(),
                        Err(e) => errno_name(&e),
                    },
                    None => "resolve-failed".to_owned(),
                },
                Err(_) => "resolve-failed".to_owned(),
            }
        }
        "dns-case" => {
            // N queries of NAME, the case of its letters spelling i (0x20 bits): one name to
            // every rule and budget, N distinct messages to whoever reads them.
            let (server, name, n) = three(arg);
            let server: SocketAddr = server.parse().unwrap();
            let mut rcodes: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
            for i in 0..n.parse::<u64>().unwrap() {
                let mut bit = 0;
                let cased: String = name
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphabetic() {
                            bit += 1;
                            if (i >> (bit - 1)) & 1 == 1 { c.to_ascii_uppercase() } else { c }
                        } else {
                            c
                        }
                    })
                    .collect();
                let outcome = match ask_udp(server, &query(&cased, RecordType::A), Udp::Connected) {
                    Ok((answer, _, _)) => format!("{:?}", answer.metadata.response_code),
                    Err(e) => errno_name(&e),
                };
                *rcodes.entry(outcome).or_default() += 1;
            }
            rcodes.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
        }
        "dns-raw-udp" => {
            // Raw bytes (hex) over a connected UDP socket: the reply described, or an errno.
            let (server, hex) = arg.rsplit_once('/').unwrap();
            let server: SocketAddr = server.parse().unwrap();
            let bytes = unhex(hex);
            let result = udp_socket(server).and_then(|s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                s.connect(server)?;
                s.send(&bytes)?;
                let mut buf = [0u8; 65535];
                let n = s.recv(&mut buf)?;
                Ok(buf[..n].to_vec())
            });
            match result {
                Ok(reply) => raw_describe(&reply),
                Err(e) => errno_name(&e),
            }
        }
        "dns-raw-tcp" => {
            // Raw bytes (hex, the caller frames them) over TCP; then every framed reply until
            // the proxy closes or 3 s pass: "replies=N ..." and how it ended.
            let (server, hex) = arg.rsplit_once('/').unwrap();
            let server: SocketAddr = server.parse().unwrap();
            let bytes = unhex(hex);
            match TcpStream::connect_timeout(&server, TIMEOUT) {
                Err(e) => errno_name(&e),
                Ok(mut stream) => {
                    stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                    if let Err(e) = stream.write_all(&bytes) {
                        return Some(format!("write-{}", errno_name(&e)));
                    }
                    let mut replies = Vec::new();
                    let end = loop {
                        let mut len = [0u8; 2];
                        if let Err(e) = stream.read_exact(&mut len) {
                            break errno_name(&e);
                        }
                        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        if let Err(e) = stream.read_exact(&mut buf) {
                            break errno_name(&e);
                        }
                        replies.push(raw_describe(&buf));
                    };
                    format!(
                        "replies={} [{}] end={}",
                        replies.len(),
                        replies.join("; "),
                        end.replace(' ', "_")
                    )
                }
            }
        }
        "tfo" => {
            // A TCP Fast Open send (sendto MSG_FASTOPEN, no connect) of a framed query.
            let (server, hex) = arg.rsplit_once('/').unwrap();
            let server: SocketAddr = server.parse().unwrap();
            let bytes = unhex(hex);
            tfo(server, &bytes)
        }
        "sendmmsg" => {
            // One sendmmsg of N copies of a query (hex) to SERVER from an unconnected socket,
            // then the replies read within 2 s: "sent=N replies=R" or an errno.
            let (server, hex, n) = three(arg);
            let server: SocketAddr = server.parse().unwrap();
            sendmmsg(server, &unhex(hex), n.parse().unwrap())
        }
        _ => return None,
    };
    Some(outcome)
}

/// The bytes of a hex argument.
pub fn unhex(text: &str) -> Vec<u8> {
    hex::decode(text).unwrap()
}

fn raw_describe(reply: &[u8]) -> String {
    match Message::from_vec(reply) {
        Ok(m) => format!("id={} {}", m.metadata.id, describe(&m)).replace(' ', ","),
        Err(_) => format!("undecodable-{}", reply.len()),
    }
}

fn sockaddr_of(server: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match server {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: v6.ip().octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn tfo(server: SocketAddr, bytes: &[u8]) -> String {
    let family = if server.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain syscalls on a socket we own.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return errno_name(&io::Error::last_os_error());
        }
        let (ss, len) = sockaddr_of(server);
        let tv = libc::timeval { tv_sec: 3, tv_usec: 0 };
        libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const tv).cast(), 16);
        let sent = libc::sendto(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_FASTOPEN,
            (&raw const ss).cast(),
            len,
        );
        if sent < 0 {
            let e = io::Error::last_os_error();
            libc::close(fd);
            return format!("send-{}", errno_name(&e));
        }
        let mut buf = [0u8; 4096];
        let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
        let out = if n < 2 {
            format!("recv-{}", if n < 0 { errno_name(&io::Error::last_os_error()) } else { n.to_string() })
        } else {
            raw_describe(&buf[2..n as usize])
        };
        libc::close(fd);
        out
    }
}

fn sendmmsg(server: SocketAddr, bytes: &[u8], n: usize) -> String {
    let socket = match udp_socket(server) {
        Ok(s) => s,
        Err(e) => return errno_name(&e),
    };
    socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    use std::os::fd::AsRawFd as _;
    let (mut ss, len) = sockaddr_of(server);
    let mut data = bytes.to_vec();
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // SAFETY: zeroed mmsghdr is valid; pointers set to live buffers.
    let mut msgs: Vec<libc::mmsghdr> = (0..n)
        .map(|_| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (&raw mut ss).cast();
            m.msg_hdr.msg_namelen = len;
            m.msg_hdr.msg_iov = &raw mut iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    // SAFETY: msgs and everything they point to live across the call.
    let sent = unsafe { libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
    if sent < 0 {
        return errno_name(&io::Error::last_os_error());
    }
    let mut replies = 0;
    let mut buf = [0u8; 4096];
    while socket.recv_from(&mut buf).is_ok() {
        replies += 1;
    }
    format!("sent={sent} replies={replies}")
}

/// RFC 4648 base32, lower case, unpadded (what DNS tunnels put in labels).
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let (mut out, mut buffer, mut bits) = (String::new(), 0u32, 0u32);
    for &byte in data {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

fn three(arg: &str) -> (&str, &str, &str) {
    let mut parts = arg.splitn(3, '/');
    (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap())
}

fn first_address(answer: &Message) -> Option<IpAddr> {
    answer.answers.iter().find_map(|r| match &r.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    })
}

/// An A query, then at once a TCP connect to the first address: "ok", an errno, "rcode=...".
fn lookup_connect(server: SocketAddr, name: &str, port: u16) -> String {
    match ask_udp(server, &query(name, RecordType::A), Udp::Connected) {
        Err(e) => format!("lookup-{}", errno_name(&e)),
        Ok((answer, _, _)) => match first_address(&answer) {
            None => format!("rcode={:?}", answer.metadata.response_code),
            Some(ip) => match TcpStream::connect_timeout(&SocketAddr::new(ip, port), TIMEOUT) {
                Ok(stream) => {
                    // Closed with a reset: no TIME_WAIT, so a long race does not run out of ports.
                    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
                    let _ = nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &linger);
                    "ok".to_owned()
                }
                Err(e) => errno_name(&e),
            },
        },
    }
}

/// `race N THREADS SERVER PORT NAME...`
pub fn race(args: &[String]) {
    let n: u64 = args[0].parse().unwrap();
    let threads: u64 = args[1].parse().unwrap();
    let server: SocketAddr = args[2].parse().unwrap();
    let port: u16 = args[3].parse().unwrap();
    let names: Arc<Vec<String>> = Arc::new(args[4..].to_vec());
    let counts: Arc<[AtomicU64; 5]> = Arc::new(Default::default());
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (names, counts, next) = (names.clone(), counts.clone(), next.clone());
            thread::spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return;
                    }
                    let name = &names[(i as usize) % names.len()];
                    let outcome = lookup_connect(server, name, port);
                    let slot = match outcome.as_str() {
                        "ok" => 2,
                        "EPERM" => 3,
                        o if o.starts_with("rcode=") || o.starts_with("lookup-") => 4,
                        _ => 4,
                    };
                    counts[0].fetch_add(1, Ordering::Relaxed);
                    if slot == 2 || slot == 3 {
                        counts[1].fetch_add(1, Ordering::Relaxed);
                    }
                    counts[slot].fetch_add(1, Ordering::Relaxed);
                    if slot == 4 {
                        eprintln!("race: {name}: {outcome}");
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let c: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    println!("lookups={} answered={} connected={} refused={} other={}", c[0], c[1], c[2], c[3], c[4]);
}

/// One zone record.
struct ZoneRecord {
    name: String,
    qtype: RecordType,
    value: String,
    ttl: u32,
}

fn read_zone(path: &str) -> Vec<ZoneRecord> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            ZoneRecord {
                name: f[0].to_ascii_lowercase(),
                qtype: record_type(f[1]),
                value: f[2].to_owned(),
                ttl: f[3].parse().unwrap(),
            }
        })
        .collect()
}

/// The records of `name` in the zone (its own, or a wildcard's one label up).
fn records_of<'z>(zone: &'z [ZoneRecord], name: &str) -> Vec<&'z ZoneRecord> {
    let own: Vec<&ZoneRecord> = zone.iter().filter(|r| r.name == name).collect();
    if !own.is_empty() {
        return own;
    }
    let Some((_, parent)) = name.split_once('.') else { return own };
    let wildcard = format!("*.{parent}");
    zone.iter().filter(|r| r.name == wildcard).collect()
}

/// The authoritative answer to `request` from `zone`.
fn answer(zone: &[ZoneRecord], request: &Message) -> Message {
    let mut reply = Message::response(request.metadata.id, OpCode::Query);
    reply.metadata.authoritative = true;
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.add_queries(request.queries.iter().cloned());
    let Some(query) = request.queries.first() else {
        reply.metadata.response_code = ResponseCode::FormErr;
        return reply;
    };
    let mut name = query.name().to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let mut owner = query.name().clone();
    for _ in 0..8 {
        let records = records_of(zone, &name);
        if records.is_empty() {
            if reply.answers.is_empty() {
                reply.metadata.response_code = ResponseCode::NXDomain;
            }
            return reply;
        }
        if let Some(cname) = records.iter().find(|r| r.qtype == RecordType::CNAME) {
            let target = Name::from_ascii(&cname.value).unwrap();
            reply.add_answer(Record::from_rdata(
                owner.clone(),
                cname.ttl,
                RData::CNAME(CNAME(target.clone())),
            ));
            name = cname.value.to_ascii_lowercase();
            owner = target;
            continue;
        }
        for r in records.iter().filter(|r| r.qtype == query.query_type()) {
            let data = match r.qtype {
                RecordType::A => RData::A(A(r.value.parse().unwrap())),
                RecordType::AAAA => RData::AAAA(AAAA(r.value.parse().unwrap())),
                RecordType::TXT => RData::TXT(TXT::new(vec![r.value.clone()])),
                _ => continue,
            };
            reply.add_answer(Record::from_rdata(owner.clone(), r.ttl, data));
        }
        return reply;
    }
    reply
}

fn log_query(log: &str, request: &Message) {
    if let Some(query) = request.queries.first() {
        let line = format!("{} {}\n", query.name().to_ascii().trim_end_matches('.'), query.query_type());
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        file.write_all(line.as_bytes()).unwrap();
    }
}

/// `dns-server ADDR ZONE LOG`: runs until killed.
pub fn server(args: &[String]) {
    let addr: SocketAddr = args[0].parse().unwrap();
    let (zone, log) = (args[1].clone(), args[2].clone());
    let udp = UdpSocket::bind(addr).unwrap();
    let listener = TcpListener::bind(addr).unwrap();
    {
        let (zone, log) = (zone.clone(), log.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok((n, peer)) = udp.recv_from(&mut buf) {
                let Ok(request) = Message::from_vec(&buf[..n]) else { continue };
                if request.metadata.message_type != MessageType::Query {
                    continue;
                }
                log_query(&log, &request);
                let reply = answer(&read_zone(&zone), &request);
                let _ = udp.send_to(&reply.to_vec().unwrap(), peer);
            }
        });
    }
    println!("ready");
    io::stdout().flush().unwrap();
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let (zone, log) = (zone.clone(), log.clone());
        thread::spawn(move || {
            loop {
                let mut len = [0u8; 2];
                if stream.read_exact(&mut len).is_err() {
                    return;
                }
                let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if stream.read_exact(&mut buf).is_err() {
                    return;
                }
                let Ok(request) = Message::from_vec(&buf) else { return };
                log_query(&log, &request);
                let reply = answer(&read_zone(&zone), &request).to_vec().unwrap();
                let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                if stream.write_all(&framed).is_err() {
                    return;
                }
            }
        });
    }
}
