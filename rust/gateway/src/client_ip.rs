//! The client's address behind load balancers and proxies: `X-Forwarded-For` and the
//! PROXY protocol (v2), believed only when they come from a peer in `trusted_proxies`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::HeaderMap;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::ipset::IpSet;

/// The client of a request that arrived from `peer`: the rightmost `X-Forwarded-For` hop
/// that is not a trusted proxy, when `peer` itself is trusted. Everything left of that hop
/// was written by the client and proves nothing; from an untrusted peer the header is
/// ignored altogether (anyone can send it).
pub(crate) fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &IpSet) -> IpAddr {
    if trusted.is_empty() || !trusted.contains(peer, 0) {
        return peer;
    }
    let mut client = peer;
    // Several header lines form one list, in order.
    let values = headers
        .get_all("x-forwarded-for")
        .iter()
        .collect::<Vec<_>>();
    for value in values.iter().rev() {
        let Ok(text) = value.to_str() else {
            return client;
        };
        for hop in text.rsplit(',') {
            let Some(ip) = parse_hop(hop.trim()) else {
                // A hop that is not an address ends the chain we can vouch for.
                return client;
            };
            client = ip;
            if !trusted.contains(ip, 0) {
                return client;
            }
        }
    }
    client
}

/// `a.b.c.d`, `x::y`, and the `a.b.c.d:port` / `[x::y]:port` forms some proxies write.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

/// The 12-byte signature that starts a PROXY protocol v2 header.
const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Longest address-plus-TLV block accepted (load balancers add a few small TLVs).
const MAX_BLOCK: usize = 4096;

/// Why a PROXY header was not accepted; the connection is then closed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ProxyHeaderError {
    /// Not a v2 header (the listener requires one on every connection).
    Malformed,
    /// The connection ended or failed while the header was read.
    Io,
}

/// Read a PROXY protocol v2 header, and nothing past it. `Some(source)` for a proxied
/// TCP connection; `None` for a `LOCAL` one (the balancer's own health check) or an
/// address family other than TCP over IPv4/IPv6.
pub(crate) async fn read_proxy_v2<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut head = [0u8; 16];
    io.read_exact(&mut head)
        .await
        .map_err(|_| ProxyHeaderError::Io)?;
    parse_head(&head)?;
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > MAX_BLOCK {
        return Err(ProxyHeaderError::Malformed);
    }
    let mut block = vec![0u8; len];
    io.read_exact(&mut block)
        .await
        .map_err(|_| ProxyHeaderError::Io)?;
    parse_v2(&head, &block)
}

fn parse_head(head: &[u8; 16]) -> Result<(), ProxyHeaderError> {
    if head[..12] != SIGNATURE || head[12] >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed);
    }
    Ok(())
}

/// The source address of a v2 header, given its 16-byte head and the block after it.
pub(crate) fn parse_v2(
    head: &[u8; 16],
    block: &[u8],
) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    parse_head(head)?;
    match head[12] & 0x0f {
        // LOCAL: the proxy speaking for itself.
        0 => return Ok(None),
        1 => {}
        _ => return Err(ProxyHeaderError::Malformed),
    }
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    match head[13] {
        // TCP over IPv4: source, destination, source port, destination port.
        0x11 => {
            let b = block.get(..12).ok_or(ProxyHeaderError::Malformed)?;
            let ip = Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port(&b[8..10]))))
        }
        // TCP over IPv6.
        0x21 => {
            let b = block.get(..36).ok_or(ProxyHeaderError::Malformed)?;
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[..16]);
            Ok(Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)),
                port(&b[32..34]),
            )))
        }
        // UNSPEC, UDP or UNIX: no TCP source to speak of.
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn trusted(cidrs: &[&str]) -> IpSet {
        IpSet::from_entries(cidrs.iter().map(|c| (*c, None))).unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = xff(&["203.0.113.9"]);
        assert_eq!(client_ip(ip("198.51.100.1"), &h, &t), ip("198.51.100.1"));
        assert_eq!(client_ip(ip("10.1.1.1"), &h, &t), ip("203.0.113.9"));
        assert_eq!(
            client_ip(ip("10.1.1.1"), &h, &IpSet::default()),
            ip("10.1.1.1")
        );
    }

    #[test]
    fn rightmost_untrusted_hop_wins() {
        let t = trusted(&["10.0.0.0/8"]);
        // The client forged the first entry; the trusted proxy appended the real one.
        let h = xff(&["1.2.3.4, 203.0.113.9, 10.0.0.7"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &t), ip("203.0.113.9"));
        let split = xff(&["1.2.3.4", "203.0.113.9:5555, 10.0.0.7"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &split, &t), ip("203.0.113.9"));
        let all_trusted = xff(&["10.9.9.9, 10.0.0.7"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &all_trusted, &t), ip("10.9.9.9"));
        let garbage = xff(&["203.0.113.9, not-an-ip, 10.0.0.7"]);
        assert_eq!(client_ip(ip("10.0.0.1"), &garbage, &t), ip("10.0.0.7"));
        assert_eq!(
            client_ip(ip("10.0.0.1"), &HeaderMap::new(), &t),
            ip("10.0.0.1")
        );
    }

    fn header(cmd: u8, fam: u8, block: &[u8]) -> Vec<u8> {
        let mut v = SIGNATURE.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        v.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
        v.extend_from_slice(block);
        v
    }

    #[tokio::test]
    async fn proxy_v2_headers_parse() {
        let mut v4 = vec![203, 0, 113, 9, 10, 0, 0, 1, 0x30, 0x39, 0x01, 0xbb];
        v4.extend_from_slice(&[0x04, 0, 1, b'x']); // a TLV, skipped
        let bytes = [header(1, 0x11, &v4), b"GET / HTTP/1.1\r\n".to_vec()].concat();
        let mut io = &bytes[..];
        let src = read_proxy_v2(&mut io).await.unwrap();
        assert_eq!(src, Some("203.0.113.9:12345".parse().unwrap()));
        assert_eq!(io, b"GET / HTTP/1.1\r\n", "nothing past the header is read");

        let mut v6 = [0u8; 36];
        v6[..16].copy_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        v6[32..34].copy_from_slice(&443u16.to_be_bytes());
        let bytes = header(1, 0x21, &v6);
        let got = read_proxy_v2(&mut &bytes[..]).await.unwrap();
        assert_eq!(got, Some("[2001:db8::7]:443".parse().unwrap()));

        let local = header(0, 0x00, &[]);
        assert_eq!(read_proxy_v2(&mut &local[..]).await.unwrap(), None);

        let http = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        assert_eq!(
            read_proxy_v2(&mut &http[..]).await,
            Err(ProxyHeaderError::Malformed)
        );
        let short = header(1, 0x11, &[1, 2, 3]);
        assert_eq!(
            read_proxy_v2(&mut &short[..]).await,
            Err(ProxyHeaderError::Malformed)
        );
        let cut = &header(1, 0x11, &v4)[..20];
        assert_eq!(
            read_proxy_v2(&mut &cut[..]).await,
            Err(ProxyHeaderError::Io)
        );
    }
}
