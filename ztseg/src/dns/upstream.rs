//! The resolvers the proxy asks: `[dns] upstream`, or the host's /etc/resolv.conf; and the
//! asking itself (UDP from a fresh port with a fresh id, then TCP if the answer was truncated).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use hickory_proto::op::Message;
use ipnet::Ipv4Net;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
};

use super::answer::{self, Question};

/// The nameservers of a resolv.conf text (port 53), less any inside `proxy_net` (the proxy
/// would ask itself) and the unspecified address.
pub fn from_resolv_conf(text: &str, proxy_net: Ipv4Net) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next()).flatten()
        })
        // A link-local IPv6 server may carry a scope (`fe80::1%eth0`), which this does not use.
        .filter_map(|addr| addr.split('%').next()?.parse::<IpAddr>().ok())
        .filter(|ip| !ip.is_unspecified() && !matches!(ip, IpAddr::V4(v4) if proxy_net.contains(v4)))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The resolvers to ask: the configured ones, or the host's.
pub fn resolvers(config: &crate::config::Dns) -> Vec<SocketAddr> {
    if !config.upstream.is_empty() {
        return config.upstream.clone();
    }
    let path = Path::new("/etc/resolv.conf");
    match std::fs::read_to_string(path) {
        Ok(text) => from_resolv_conf(&text, config.proxy_net),
        Err(e) => {
            tracing::error!(error = %e, "cannot read /etc/resolv.conf for the DNS proxy's resolvers; set [dns] upstream");
            Vec::new()
        }
    }
}

/// Why asking upstream failed, said in the record.
#[derive(Debug)]
pub struct Failed(pub String);

/// Asks `question` of `servers` in turn, each for `timeout`; the first answer to it.
pub async fn ask(servers: &[SocketAddr], question: &Question, timeout: Duration) -> Result<Message, Failed> {
    let mut why = Vec::new();
    for &server in servers {
        match tokio::time::timeout(timeout, ask_one(server, question)).await {
            Ok(Ok(answer)) => return Ok(answer),
            Ok(Err(e)) => why.push(format!("{server}: {e}")),
            Err(_) => why.push(format!("{server}: no answer in {} ms", timeout.as_millis())),
        }
    }
    if servers.is_empty() {
        why.push("no upstream resolver is configured".to_owned());
    }
    Err(Failed(why.join("; ")))
}

fn random_id() -> u16 {
    let mut id = [0u8; 2];
    // A failing getrandom leaves 0: the answer still has to come from the server's address to
    // the fresh port, with our question.
    let _ = getrandom::fill(&mut id);
    u16::from_ne_bytes(id)
}

async fn ask_one(server: SocketAddr, question: &Question) -> std::io::Result<Message> {
    let id = random_id();
    let query = answer::upstream_query(question, id);
    let local: SocketAddr = if server.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    socket.send(&query).await?;
    let mut buf = vec![0u8; 65_535];
    loop {
        // Connected: only the server's datagrams arrive; one that is not the answer is skipped.
        let n = socket.recv(&mut buf).await?;
        let Some(answer) = answer::upstream_answer(&buf[..n], id, question) else { continue };
        if answer.metadata.truncation {
            return ask_tcp(server, question).await;
        }
        return Ok(answer);
    }
}

async fn ask_tcp(server: SocketAddr, question: &Question) -> std::io::Result<Message> {
    let id = random_id();
    let query = answer::upstream_query(question, id);
    let mut stream = TcpStream::connect(server).await?;
    let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(&query);
    stream.write_all(&framed).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await?;
    answer::upstream_answer(&buf, id, question)
        .ok_or_else(|| std::io::Error::other("an answer to another question"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_come_from_resolv_conf_without_the_proxy_itself() {
        let net: Ipv4Net = "127.53.0.0/16".parse().unwrap();
        let text = "# comment\nsearch corp.example\nnameserver 10.0.2.3\nnameserver 127.53.0.9\nnameserver fe80::1%eth0\nnameserver  2001:db8::53 \nnameserver 0.0.0.0\noptions edns0\nnameserver bogus\n";
        let servers: Vec<String> = from_resolv_conf(text, net).iter().map(ToString::to_string).collect();
        assert_eq!(servers, ["10.0.2.3:53", "[fe80::1]:53", "[2001:db8::53]:53"]);
        assert!(from_resolv_conf("", net).is_empty());
    }
}
