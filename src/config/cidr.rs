//! Address blocks, as `allow_cidrs` and `trusted_proxies` list them. Plain values: the config
//! holds them, and the authentication stage matches addresses against them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address block such as `203.0.113.0/24` or `2001:db8::/32`. A bare address is a block of
/// one. IPv4-mapped IPv6 blocks (`::ffff:203.0.113.0/120`) are stored as the IPv4 block they
/// denote, and addresses are canonicalised before matching, so `::ffff:a.b.c.d` peers match IPv4
/// blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| "not an IP address or CIDR block (write e.g. `203.0.113.0/24`)")?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && !p.starts_with('+') => n,
                _ => return Err(format!("prefix length must be a number from 0 to {max}")),
            },
        };
        let mut cidr = Cidr { addr, prefix };
        if let IpAddr::V6(v6) = addr {
            if let (Some(v4), true) = (v6.to_ipv4_mapped(), prefix >= 96) {
                cidr = Cidr {
                    addr: IpAddr::V4(v4),
                    prefix: prefix - 96,
                };
            }
        }
        let network = cidr.network();
        if network != cidr.addr {
            return Err(format!(
                "host bits are set (the block starting there is `{network}/{}`)",
                cidr.prefix
            ));
        }
        Ok(cidr)
    }

    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(self.prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(self.prefix))),
        }
    }

    /// Whether `ip` lies inside the block (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let m = mask32(self.prefix);
                u32::from(ip) & m == u32::from(net) & m
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let m = mask128(self.prefix);
                u128::from(ip) & m == u128::from(net) & m
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_parsing() {
        assert_eq!(cidr("203.0.113.0/24").to_string(), "203.0.113.0/24");
        assert_eq!(cidr(" 10.1.2.3 ").to_string(), "10.1.2.3/32");
        assert_eq!(cidr("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(cidr("::1").to_string(), "::1/128");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("::/0").to_string(), "::/0");
        // An IPv4-mapped block is the IPv4 block it denotes.
        assert_eq!(cidr("::ffff:203.0.113.0/120").to_string(), "203.0.113.0/24");
        for bad in [
            "",
            "nope",
            "10.0.0.0/33",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/",
            "2001:db8::/129",
            "10.0.0.0/8/8",
        ] {
            assert!(Cidr::parse(bad).is_err(), "{bad:?} parsed");
        }
        let err = Cidr::parse("203.0.113.5/24").unwrap_err();
        assert!(err.contains("203.0.113.0/24"), "{err}");
    }

    #[test]
    fn cidr_matching() {
        let v4 = cidr("203.0.113.0/24");
        assert!(v4.contains(ip("203.0.113.0")));
        assert!(v4.contains(ip("203.0.113.255")));
        assert!(!v4.contains(ip("203.0.114.1")));
        assert!(!v4.contains(ip("2001:db8::1")));
        // IPv4-mapped IPv6 peers (dual-stack listeners) match IPv4 blocks.
        assert!(v4.contains(ip("::ffff:203.0.113.7")));
        assert!(!v4.contains(ip("::ffff:198.51.100.7")));
        let v6 = cidr("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("203.0.113.1")));
        assert!(cidr("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")));
        assert!(cidr("::/0").contains(ip("::1")));
        assert!(cidr("10.1.2.3").contains(ip("10.1.2.3")));
        assert!(!cidr("10.1.2.3").contains(ip("10.1.2.4")));
        assert!(cidr("::ffff:10.0.0.0/104").contains(ip("10.9.9.9")));
    }
}
