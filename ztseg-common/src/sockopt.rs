//! The socket options that never take effect for an agent: those that would let something the
//! socket hooks never judge reach it. Setting one succeeds and changes nothing.

/// `SOL_IP` and `SOL_IPV6`.
pub const SOL_IP: i32 = 0;
pub const SOL_IPV6: i32 = 41;
/// Queue ICMP errors, with the payload of the packet they quote, on the socket's error queue
/// (`recvmsg(MSG_ERRQUEUE)`). ICMP errors are handed to the socket by the kernel's error
/// handlers, not by the socket receive path, so no cgroup_skb program sees them: any host could
/// forge one and put bytes into the agent.
pub const IP_RECVERR: i32 = 11;
pub const IP_RECVERR_RFC4884: i32 = 26;
pub const IPV6_RECVERR: i32 = 25;
pub const IPV6_RECVERR_RFC4884: i32 = 31;

/// Whether setting option `name` at `level` is neutralised for agents.
pub const fn neutralised(level: i32, name: i32) -> bool {
    match level {
        SOL_IP => matches!(name, IP_RECVERR | IP_RECVERR_RFC4884),
        SOL_IPV6 => matches!(name, IPV6_RECVERR | IPV6_RECVERR_RFC4884),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_error_queue_options_are_neutralised() {
        for (level, name) in [
            (SOL_IP, IP_RECVERR),
            (SOL_IP, IP_RECVERR_RFC4884),
            (SOL_IPV6, IPV6_RECVERR),
            (SOL_IPV6, IPV6_RECVERR_RFC4884),
        ] {
            assert!(neutralised(level, name), "{level} {name}");
        }
        // Same numbers at other levels, and ordinary options, pass: IP_TOS (1), IPV6_V6ONLY
        // (26), SO_REUSEADDR (SOL_SOCKET 1, 2), TCP_NODELAY (SOL_TCP 6, 1).
        for (level, name) in
            [(SOL_IP, 1), (SOL_IPV6, 26), (1, 2), (1, IP_RECVERR), (6, 1), (17, IPV6_RECVERR)]
        {
            assert!(!neutralised(level, name), "{level} {name}");
        }
    }
}
