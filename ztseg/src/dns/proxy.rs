//! The DNS proxy: UDP and TCP on `[dns] port` of every address of `[dns] proxy_net`, on this
//! host's loopback only. The address a query came to says whose it is (the kernel sent it
//! there from the agent's cgroup); a query to any other address is not read.
//!
//! For each query: a name no rule of the agent allows is refused (REFUSED) before anything is
//! asked upstream; a type other than A or AAAA is refused; otherwise the question is asked
//! upstream, each CNAME of the answer checked against the agent's rules, the addresses written
//! into the kernel's `learned` map, the record written to the audit log, and only then the
//! answer released (SERVFAIL if the addresses could not be written). Every query is recorded.

use std::{
    collections::HashMap,
    io::{self, IoSlice, IoSliceMut},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hickory_proto::op::ResponseCode;
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockProtocol, SockType,
    SockaddrIn, sockopt,
};
use serde_json::{Map, Value};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, unix::AsyncFd},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore, oneshot},
};
use tracing::{debug, info, warn};
use ztseg_common::{decision::reason, dns::reason as dns_reason};

use super::{
    answer::{self, Question, Walked},
    record::{self, Asked, Outcome},
    store::{Admitted, Store, Who, forbidden_answer},
    upstream,
};
use crate::{clock, risk::Observation};

/// Queries being answered at once, all agents together; past it a UDP query waits in the
/// socket's buffer (and is dropped by the kernel when that is full).
const IN_FLIGHT: usize = 1024;
/// Queries of one agent being answered at once: past it the agent's further UDP queries are
/// dropped (counted), so one agent's flood cannot take every slot.
const IN_FLIGHT_PER_AGENT: usize = 128;
/// TCP connections at once, all agents together, and of one agent: past its share an agent's
/// further connections are closed at once, so one agent holding connections open (a query
/// every few seconds keeps one from going idle) cannot take every agent's TCP DNS. And how long
/// one may sit idle.
const TCP_CONNECTIONS: usize = 1024;
const TCP_CONNECTIONS_PER_AGENT: usize = 8;
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Records handed to the audit writer and not yet appended, at most: past it the proxy waits
/// (a stalled log stops answers, never lets one through unrecorded).
const RECORDS_IN_FLIGHT: usize = 4096;

/// Per-agent shares of something the proxy has a limited number of: at most `limit` taken per
/// agent slot at once.
struct Shares {
    limit: usize,
    taken: Arc<Mutex<HashMap<u32, usize>>>,
}

/// One taken share, given back when dropped (a task that ends early, or panics, gives it back).
struct Share {
    taken: Arc<Mutex<HashMap<u32, usize>>>,
    slot: u32,
}

impl Shares {
    fn new(limit: usize) -> Self {
        Self { limit, taken: Arc::default() }
    }

    /// One of `slot`'s share; `None` when it has all of it.
    fn take(&self, slot: u32) -> Option<Share> {
        let mut taken = self.taken.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = taken.entry(slot).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Share { taken: self.taken.clone(), slot })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut taken = self.taken.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = taken.get_mut(&self.slot) {
            *n -= 1;
            if *n == 0 {
                taken.remove(&self.slot);
            }
        }
    }
}

/// Where the proxy's records go: the audit writer in the daemon. Returns, for an allowed
/// answer, what completes once the record is written to the log file.
pub trait Records: Send + Sync + 'static {
    fn send(
        &self,
        fields: Map<String, Value>,
        agent: Option<Arc<str>>,
        observation: Option<Observation>,
        allowed: bool,
        permit: OwnedSemaphorePermit,
    ) -> Option<oneshot::Receiver<()>>;
}

/// Counts, for the daemon's log and the bench.
#[derive(Debug, Default)]
pub struct Counters {
    pub answered: AtomicU64,
    pub refused: AtomicU64,
    pub failed: AtomicU64,
    /// UDP queries dropped unread (an agent with too many in flight, or not addressed to a
    /// proxy address), and TCP connections closed at once (an agent past its share).
    pub dropped: AtomicU64,
}

/// The proxy's settings and shared state.
pub struct Proxy {
    pub store: Arc<Mutex<Store>>,
    kernel: ztseg_common::dns::DnsConfig,
    upstream: Vec<SocketAddr>,
    timeout: Duration,
    records: Arc<dyn Records>,
    record_permits: Arc<Semaphore>,
    in_flight: Arc<Semaphore>,
    /// Queries being answered per agent slot (UDP), and TCP connections per agent slot.
    per_agent: Shares,
    tcp_per_agent: Shares,
    pub counters: Counters,
}

/// The proxy's sockets, bound before the daemon says it is ready.
pub struct Bound {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
}

/// A socket of `kind` on 0.0.0.0:`port`, bound to the loopback device: only traffic that
/// arrives on `lo` (this host's own) reaches it, whatever address it was sent to.
fn loopback_socket(kind: SockType, port: u16) -> io::Result<OwnedFd> {
    let protocol = if kind == SockType::Datagram { SockProtocol::Udp } else { SockProtocol::Tcp };
    let fd = socket::socket(
        AddressFamily::Inet,
        kind,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        protocol,
    )?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from("lo"))?;
    if kind == SockType::Datagram {
        socket::setsockopt(&fd, sockopt::Ipv4PacketInfo, &true)?;
    }
    socket::bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))?;
    if kind == SockType::Stream {
        socket::listen(&fd, socket::Backlog::new(1024).unwrap_or(socket::Backlog::MAXCONN))?;
    }
    Ok(fd)
}

/// Binds the proxy's UDP and TCP sockets on `port`.
pub fn bind(port: u16) -> io::Result<Bound> {
    let udp = loopback_socket(SockType::Datagram, port)?;
    let tcp = loopback_socket(SockType::Stream, port)?;
    Ok(Bound { udp: std::net::UdpSocket::from(udp), tcp: std::net::TcpListener::from(tcp) })
}

/// One datagram and the address it was sent to.
fn recv_udp(fd: i32, buf: &mut [u8]) -> io::Result<(usize, SocketAddrV4, Ipv4Addr)> {
    let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<SockaddrIn>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT)?;
    let from = msg.address.map(SocketAddrV4::from).ok_or_else(|| io::Error::other("no sender"))?;
    let mut to = Ipv4Addr::UNSPECIFIED;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::Ipv4PacketInfo(info) = c {
            to = Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr));
        }
    }
    Ok((msg.bytes, from, to))
}

/// Sends `bytes` to `to` from the local address `from` (the proxy address the query came to).
fn send_udp(fd: i32, bytes: &[u8], from: Ipv4Addr, to: SocketAddrV4) -> io::Result<()> {
    // SAFETY: in_pktinfo is plain data; all zero is valid (ifindex 0: the route decides).
    let mut info: libc::in_pktinfo = unsafe { std::mem::zeroed() };
    info.ipi_spec_dst.s_addr = u32::from(from).to_be();
    let iov = [IoSlice::new(bytes)];
    let cmsgs = [ControlMessage::Ipv4PacketInfo(&info)];
    socket::sendmsg(fd, &iov, &cmsgs, MsgFlags::MSG_DONTWAIT, Some(&SockaddrIn::from(to)))?;
    Ok(())
}

impl Proxy {
    pub fn new(
        store: Arc<Mutex<Store>>,
        config: &crate::config::Dns,
        upstream: Vec<SocketAddr>,
        records: Arc<dyn Records>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            kernel: config.kernel_config(),
            upstream,
            timeout: Duration::from_millis(config.upstream_timeout_ms),
            records,
            record_permits: Arc::new(Semaphore::new(RECORDS_IN_FLIGHT)),
            in_flight: Arc::new(Semaphore::new(IN_FLIGHT)),
            per_agent: Shares::new(IN_FLIGHT_PER_AGENT),
            tcp_per_agent: Shares::new(TCP_CONNECTIONS_PER_AGENT),
            counters: Counters::default(),
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Serves `bound` until the runtime ends: UDP, TCP, and the sweep of expired entries.
    pub async fn serve(self: Arc<Self>, bound: Bound) {
        let sweeper = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                sweeper.store().sweep(clock::boot_now_ns());
            }
        });
        let tcp = self.clone();
        tokio::spawn(async move { tcp.serve_tcp(bound.tcp).await });
        self.serve_udp(bound.udp).await;
    }

    async fn serve_udp(self: Arc<Self>, udp: std::net::UdpSocket) {
        // SAFETY: the AsyncFd owns the socket: it stays open, and the same, while registered.
        let udp = match unsafe { AsyncFd::register_with_interest(udp, tokio::io::Interest::READABLE) } {
            Ok(fd) => Arc::new(fd),
            Err(e) => return warn!(error = %e, "the DNS proxy cannot serve UDP"),
        };
        let mut buf = vec![0u8; 65_535];
        loop {
            let Ok(mut ready) = udp.readable().await else { return };
            let (n, from, to) = match ready.try_io(|fd| recv_udp(fd.get_ref().as_raw_fd(), &mut buf)) {
                Ok(Ok(got)) => got,
                Ok(Err(e)) => {
                    debug!(error = %e, "DNS proxy: a datagram could not be read");
                    continue;
                }
                Err(_would_block) => continue,
            };
            let Some(slot) = self.kernel.slot_of(to.octets()) else {
                // Not to a proxy address (another local address of this port): not a query.
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Some(share) = self.per_agent.take(slot) else {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Ok(permit) = self.in_flight.clone().acquire_owned().await else { return };
            let query = buf[..n].to_vec();
            let (proxy, udp) = (self.clone(), udp.clone());
            tokio::spawn(async move {
                if let Some(reply) = proxy.answer(slot, &query, "udp").await {
                    let sent = udp.get_ref().as_raw_fd();
                    if let Err(e) = send_udp(sent, &reply, to, from) {
                        debug!(error = %e, "DNS proxy: an answer could not be sent");
                    }
                }
                drop(share);
                drop(permit);
            });
        }
    }

    async fn serve_tcp(self: Arc<Self>, listener: std::net::TcpListener) {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => return warn!(error = %e, "the DNS proxy cannot serve TCP"),
        };
        let connections = Arc::new(Semaphore::new(TCP_CONNECTIONS));
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let slot = match stream.local_addr() {
                Ok(SocketAddr::V4(local)) => self.kernel.slot_of(local.ip().octets()),
                _ => None,
            };
            let (Some(slot), Ok(permit)) = (slot, connections.clone().try_acquire_owned()) else {
                continue;
            };
            let Some(share) = self.tcp_per_agent.take(slot) else {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let proxy = self.clone();
            tokio::spawn(async move {
                proxy.serve_connection(slot, stream).await;
                drop(share);
                drop(permit);
            });
        }
    }

    async fn serve_connection(&self, slot: u32, mut stream: TcpStream) {
        loop {
            let mut len = [0u8; 2];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if !matches!(tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await, Ok(Ok(_))) {
                return;
            }
            let Some(reply) = self.answer(slot, &query, "tcp").await else { return };
            let Ok(len) = u16::try_from(reply.len()) else { return };
            let mut framed = len.to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }

    /// The answer to one query of the agent in `slot`, once its record is handed over (and,
    /// for one that grants addresses, written to the log); `None`: nothing to answer.
    pub async fn answer(&self, slot: u32, bytes: &[u8], proto: &'static str) -> Option<Vec<u8>> {
        let who = self.store().who(slot);
        let ts_us = clock::unix_now_ns() / 1_000;
        let question = match answer::question(bytes) {
            Ok(question) => question,
            Err(unusable) => {
                let outcome = Outcome {
                    reason: dns_reason::MALFORMED,
                    rcode: unusable.answer.map_or("-".to_owned(), |(_, code)| rcode_name(code)),
                    detail: Some(unusable.detail),
                    ..Outcome::default()
                };
                let asked = Asked { who: who.as_ref(), proto, qname: "", qtype: "", ts_us };
                self.finish(&asked, &outcome).await;
                return unusable.answer.map(|(id, code)| answer::error(id, code));
            }
        };
        let qtype = question.qtype.to_string();
        let asked = Asked { who: who.as_ref(), proto, qname: &question.name, qtype: &qtype, ts_us };
        let udp = proto == "udp";
        let (code, outcome, walked) = self.resolve(slot, &question, who.as_ref()).await;
        let reply = match &walked {
            Some((walked, ttls)) => answer::response(&question, code, Some((walked, ttls)), udp),
            None => answer::response(&question, code, None, udp),
        };
        self.finish(&asked, &outcome).await;
        Some(reply)
    }

    /// Hands the record over; for an allowed answer waits until it is written.
    async fn finish(&self, asked: &Asked<'_>, outcome: &Outcome) {
        let counter = match (outcome.allowed, outcome.reason) {
            (true, _) => &self.counters.answered,
            (false, dns_reason::UPSTREAM | dns_reason::INSTALL) => &self.counters.failed,
            _ => &self.counters.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let (fields, observation) = record::record(asked, outcome);
        let Ok(permit) = self.record_permits.clone().acquire_owned().await else { return };
        let agent = asked.who.map(|w| w.agent.clone());
        if let Some(written) = self.records.send(fields, agent, observation, outcome.allowed, permit) {
            let _ = written.await;
        }
    }

    /// What to answer `question` with, the record's outcome, and the walk of the upstream
    /// answer with the TTLs granted (when addresses are released).
    async fn resolve(
        &self,
        slot: u32,
        question: &Question,
        who: Option<&Who>,
    ) -> (ResponseCode, Outcome, Option<(Walked, Vec<u32>)>) {
        let refused = |reason: u8, rule_id: Option<u32>, detail: String| Outcome {
            reason,
            rule_id,
            rcode: rcode_name(ResponseCode::Refused),
            detail: Some(detail),
            ..Outcome::default()
        };
        if who.is_none() {
            let outcome = refused(reason::UNREGISTERED, None, "no agent has this proxy address".into());
            return (ResponseCode::Refused, outcome, None);
        }
        // The type first: a query refused for its type spends none of a wildcard's budget.
        if !answer::forwarded_type(question.qtype) {
            let detail = format!("{} queries are not forwarded (only A and AAAA)", question.qtype);
            return (ResponseCode::Refused, refused(dns_reason::QTYPE, None, detail), None);
        }
        let admitted = match self.store().admit(slot, &question.name, clock::boot_now_ns()) {
            Ok(admitted) => admitted,
            Err(r) => return (ResponseCode::Refused, refused(r.reason, r.rule_id, r.detail), None),
        };
        let upstream = match upstream::ask(&self.upstream, question, self.timeout).await {
            Ok(answer) => answer,
            Err(upstream::Failed(why)) => {
                let outcome = Outcome {
                    reason: dns_reason::UPSTREAM,
                    rcode: rcode_name(ResponseCode::ServFail),
                    detail: Some(why),
                    ..Outcome::default()
                };
                return (ResponseCode::ServFail, outcome, None);
            }
        };
        let code = upstream.metadata.response_code;
        if !matches!(code, ResponseCode::NoError | ResponseCode::NXDomain) {
            let outcome = Outcome {
                reason: dns_reason::UPSTREAM,
                rcode: rcode_name(code),
                detail: Some(format!("the upstream resolver answered {}", rcode_name(code))),
                ..Outcome::default()
            };
            return (code, outcome, None);
        }
        let mut walked = answer::walk(&upstream, question);
        let cnames: Vec<String> = walked.targets().collect();
        if let Some(bad) = cnames.iter().find(|target| !Store::link_allowed(&admitted, target)) {
            let detail =
                format!("the answer leads through the CNAME {bad}, which no rule of the agent allows");
            let mut outcome = refused(dns_reason::CNAME, None, detail);
            outcome.cnames = cnames;
            return (ResponseCode::Refused, outcome, None);
        }
        let dropped: Vec<IpAddr> =
            walked.addrs.iter().map(|a| a.1).filter(|a| forbidden_answer(*a)).collect();
        walked.addrs.retain(|a| !forbidden_answer(a.1));
        self.grant(question, &admitted, walked, cnames, dropped, code)
    }

    /// Writes the answer's addresses for the agent; the outcome to record and release.
    fn grant(
        &self,
        question: &Question,
        admitted: &Admitted,
        walked: Walked,
        cnames: Vec<String>,
        dropped: Vec<IpAddr>,
        code: ResponseCode,
    ) -> (ResponseCode, Outcome, Option<(Walked, Vec<u32>)>) {
        let addrs: Vec<(IpAddr, u32)> = walked.addrs.iter().map(|(_, a, ttl)| (*a, *ttl)).collect();
        let installed = if addrs.is_empty() {
            // Nothing to grant (NXDOMAIN, no address of this type): released as it is.
            let rule_id =
                admitted.grants.first().and_then(|&g| admitted.rules.grants.get(g)).map(|g| g.rule_id);
            Ok(super::store::Installed { ttls: Vec::new(), rule_id: rule_id.unwrap_or(u32::MAX) })
        } else {
            self.store().install(admitted, &question.name, &addrs, clock::boot_now_ns())
        };
        match installed {
            Ok(installed) => {
                let outcome = Outcome {
                    allowed: true,
                    reason: reason::RULE,
                    rule_id: Some(installed.rule_id),
                    rcode: rcode_name(code),
                    answers: addrs.iter().map(|a| a.0).collect(),
                    cnames,
                    dropped,
                    ttl: installed.ttls.iter().copied().min(),
                    detail: None,
                };
                (code, outcome, Some((walked, installed.ttls)))
            }
            Err(r) => {
                let failed = r.reason == dns_reason::INSTALL;
                let code = if failed { ResponseCode::ServFail } else { ResponseCode::Refused };
                let outcome = Outcome {
                    reason: r.reason,
                    rule_id: r.rule_id,
                    rcode: rcode_name(code),
                    cnames,
                    dropped,
                    detail: Some(r.detail),
                    ..Outcome::default()
                };
                if failed {
                    warn!(name = %question.name, "{}", outcome.detail.as_deref().unwrap_or_default());
                }
                (code, outcome, None)
            }
        }
    }
}

/// A response code as records name it (`NOERROR`, `NXDOMAIN`, ...).
fn rcode_name(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        other => u16::from(other).to_string(),
    }
}

/// Starts the proxy on a thread of its own (`ztseg-dns`, its own runtime, the record threads'
/// priority): it never runs on, or waits for, the control thread.
pub fn spawn(proxy: Arc<Proxy>, bound: Bound) -> io::Result<()> {
    let upstream = proxy.upstream.clone();
    std::thread::Builder::new().name("ztseg-dns".into()).spawn(move || {
        crate::daemon::lower_priority();
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(proxy.serve(bound)),
            Err(e) => warn!(error = %e, "cannot start the DNS proxy's runtime; agents' DNS is unanswered"),
        }
    })?;
    info!(upstream = ?upstream, "DNS proxy up");
    Ok(())
}

#[cfg(test)]
mod share_tests {
    use super::*;

    #[test]
    fn an_agent_takes_at_most_its_share_and_a_dropped_share_comes_back() {
        let shares = Shares::new(2);
        let (a, b) = (shares.take(7).unwrap(), shares.take(7).unwrap());
        assert!(shares.take(7).is_none(), "past its share");
        // Another agent's share is its own.
        let other = shares.take(8).unwrap();
        drop(a);
        let again = shares.take(7).expect("a share given back is taken again");
        drop((b, again, other));
        assert!(shares.taken.lock().unwrap().is_empty(), "nothing left taken");
    }
}
