//! Source-address sets: a key's `allowed_ips` and the snapshot's `blocked_ips`, compiled
//! once per snapshot so a request only does integer compares.
//!
//! Exact addresses (the common case for blocks raised by attack interception) sit in a hash
//! set; prefixes are scanned, longest first, and are expected to be few.

use std::collections::HashMap;
use std::net::IpAddr;

/// A parsed CIDR: network bits in the upper part of a u128 (IPv4 mapped into the low 32
/// bits of the v4 space so the two families never match each other).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cidr {
    v6: bool,
    bits: u128,
    prefix: u8,
}

impl Cidr {
    /// `a.b.c.d`, `a.b.c.d/n`, `x::y`, `x::y/n`. Host bits must be zero only in the sense
    /// that they are ignored: `10.1.2.3/8` means `10.0.0.0/8`.
    pub(crate) fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.trim(), Some(p.trim().parse::<u8>().ok()?)),
            None => (s.trim(), None),
        };
        let ip: IpAddr = addr.parse().ok()?;
        let (v6, max) = match ip {
            IpAddr::V4(_) => (false, 32u8),
            IpAddr::V6(_) => (true, 128u8),
        };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return None;
        }
        let bits = key_bits(normalize(ip));
        Some(Cidr {
            v6,
            bits: bits & mask(v6, prefix),
            prefix,
        })
    }

    fn is_host(&self) -> bool {
        self.prefix == if self.v6 { 128 } else { 32 }
    }

    fn contains(&self, v6: bool, bits: u128) -> bool {
        self.v6 == v6 && bits & mask(v6, self.prefix) == self.bits
    }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`, what a dual-stack listener reports) is treated as
/// the IPv4 address it carries.
fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn key_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn mask(v6: bool, prefix: u8) -> u128 {
    match (v6, u32::from(prefix)) {
        (_, 0) => 0,
        (true, p) => u128::MAX << (128 - p.min(128)),
        (false, p) => u128::from(u32::MAX << (32 - p.min(32))),
    }
}

/// A set of CIDRs, each with an optional expiry (unix seconds; the entry applies while
/// `now < until`).
#[derive(Debug, Default)]
pub(crate) struct IpSet {
    hosts: HashMap<(bool, u128), i64>,
    /// Prefixes, longest first.
    nets: Vec<(Cidr, i64)>,
}

/// An entry with no expiry.
const FOREVER: i64 = i64::MAX;

impl IpSet {
    /// Build from CIDR strings; the error names the first entry that does not parse.
    pub(crate) fn from_entries<'a>(
        entries: impl IntoIterator<Item = (&'a str, Option<i64>)>,
    ) -> Result<IpSet, String> {
        let mut set = IpSet::default();
        for (text, until) in entries {
            let cidr = Cidr::parse(text).ok_or_else(|| format!("invalid CIDR {text:?}"))?;
            let until = until.unwrap_or(FOREVER);
            if cidr.is_host() {
                let e = set.hosts.entry((cidr.v6, cidr.bits)).or_insert(until);
                *e = (*e).max(until);
            } else {
                set.nets.push((cidr, until));
            }
        }
        set.nets.sort_by_key(|n| std::cmp::Reverse(n.0.prefix));
        Ok(set)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.hosts.is_empty() && self.nets.is_empty()
    }

    /// Whether `ip` is in the set at unix time `now`.
    pub(crate) fn contains(&self, ip: IpAddr, now: i64) -> bool {
        let ip = normalize(ip);
        let v6 = ip.is_ipv6();
        let bits = key_bits(ip);
        if self
            .hosts
            .get(&(v6, bits))
            .is_some_and(|&until| now < until)
        {
            return true;
        }
        self.nets
            .iter()
            .any(|(c, until)| now < *until && c.contains(v6, bits))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_and_v6_prefixes() {
        let set = IpSet::from_entries([
            ("10.0.0.0/8", None),
            ("192.168.1.7", None),
            ("2001:db8::/32", None),
            ("::1/128", None),
        ])
        .unwrap();
        assert!(set.contains(ip("10.255.1.2"), 0));
        assert!(!set.contains(ip("11.0.0.1"), 0));
        assert!(set.contains(ip("192.168.1.7"), 0));
        assert!(!set.contains(ip("192.168.1.8"), 0));
        assert!(set.contains(ip("2001:db8:ffff::1"), 0));
        assert!(!set.contains(ip("2001:db9::1"), 0));
        assert!(set.contains(ip("::1"), 0));
        assert!(
            set.contains(ip("::ffff:10.1.2.3"), 0),
            "v4-mapped v6 is its v4 address"
        );
        assert!(!set.contains(ip("::a01:203"), 0), "families never mix");
    }

    #[test]
    fn zero_prefix_and_host_bits() {
        let all4 = IpSet::from_entries([("0.0.0.0/0", None)]).unwrap();
        assert!(all4.contains(ip("8.8.8.8"), 0));
        assert!(!all4.contains(ip("2001:db8::1"), 0));
        let sloppy = IpSet::from_entries([("10.1.2.3/8", None)]).unwrap();
        assert!(sloppy.contains(ip("10.9.9.9"), 0));
        let v6_edge = IpSet::from_entries([("2001:db8::/127", None)]).unwrap();
        assert!(v6_edge.contains(ip("2001:db8::1"), 0));
        assert!(!v6_edge.contains(ip("2001:db8::2"), 0));
    }

    #[test]
    fn expiry_and_errors() {
        let set =
            IpSet::from_entries([("203.0.113.7/32", Some(100)), ("198.51.100.0/24", Some(50))])
                .unwrap();
        assert!(set.contains(ip("203.0.113.7"), 99));
        assert!(!set.contains(ip("203.0.113.7"), 100));
        assert!(set.contains(ip("198.51.100.9"), 49));
        assert!(!set.contains(ip("198.51.100.9"), 50));
        for bad in ["10.0.0.0/33", "::/129", "not-an-ip", "10.0.0.0/x", ""] {
            assert!(IpSet::from_entries([(bad, None)]).is_err(), "{bad}");
        }
    }
}
