//! The address guard for URLs a job names: unless private sources are
//! allowed, a URL may not reach loopback, private, link-local (cloud
//! metadata), CGNAT, multicast or otherwise reserved addresses. The check
//! runs on every address DNS returns (a resolver bound to the client, so a
//! rebinding name cannot slip through between check and connect) and on
//! IP-literal hosts, first and after every redirect.

use std::error::Error as StdError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Which addresses a job-named URL may reach.
#[derive(Debug, Clone)]
pub struct AddressGuard {
    allow_private: bool,
    allow_nets: Arc<Vec<ipnet::IpNet>>,
}

impl AddressGuard {
    /// `allow_private` opens every private range; `allow_nets` opens just
    /// those networks.
    pub fn new(allow_private: bool, allow_nets: Vec<ipnet::IpNet>) -> Self {
        Self {
            allow_private,
            allow_nets: Arc::new(allow_nets),
        }
    }

    pub fn refuses(&self, ip: IpAddr) -> bool {
        !self.allow_private
            && is_forbidden_ip(ip)
            && !self.allow_nets.iter().any(|net| net.contains(&ip))
    }

    /// IP-literal hosts (names are checked by the resolver).
    pub fn check_literal_host(&self, url: &url::Url) -> Result<(), ForbiddenTarget> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(url::Host::Ipv6(v6)) => IpAddr::V6(v6),
            _ => return Ok(()),
        };
        if self.refuses(ip) {
            return Err(ForbiddenTarget {
                host: url.host_str().unwrap_or_default().to_owned(),
                ip,
            });
        }
        Ok(())
    }

    /// A resolver that refuses any name whose addresses include one this
    /// guard refuses; bind it to the client with `dns_resolver`.
    pub fn resolver(&self) -> Arc<GuardedResolver> {
        Arc::new(GuardedResolver {
            guard: self.clone(),
        })
    }
}

/// Resolves names and refuses any whose addresses include a forbidden one.
pub struct GuardedResolver {
    guard: AddressGuard,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(bad) = addrs.iter().find(|a| guard.refuses(a.ip())) {
                return Err(Box::new(ForbiddenTarget { host, ip: bad.ip() })
                    as Box<dyn StdError + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// A URL whose host is (or resolves to) an address the guard refuses.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{host} is {ip}, a loopback/private/link-local or reserved address")]
pub struct ForbiddenTarget {
    pub host: String,
    pub ip: IpAddr,
}

/// Addresses a job-named URL may not reach unless private sources are allowed.
pub fn is_forbidden_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return is_forbidden_v4(v4);
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
                // 64:ff9b:1::/48: local-use NAT64 (RFC 8215), a gateway into
                // the operator's own IPv4 network.
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1)
                // Teredo (2001::/32) tunnels to an obfuscated IPv4 address.
                || (s[0] == 0x2001 && s[1] == 0)
                // discard-only 100::/64
                || (s[0] == 0x100 && s[1..4] == [0, 0, 0])
                // site-local (deprecated) and documentation ranges
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] == 0x2001 && s[1] == 0x0db8)
        }
    }
}

/// The IPv4 address an IPv6 address stands for, judged like any IPv4:
/// IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d` (deprecated,
/// but some stacks still route it), NAT64 `64:ff9b::a.b.c.d` and 6to4
/// `2002:aabb:ccdd::/48`.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = v6.octets();
    let s = v6.segments();
    let last = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0, 0, 0, 0, 0, 0] && !v6.is_loopback() && !v6.is_unspecified() {
        return Some(last);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(last);
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

fn is_forbidden_v4(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || v4.is_unspecified()
        || v4.is_broadcast()
        || v4.is_multicast()
        || v4.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // 100.64.0.0/10 CGNAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0.0/24 IETF
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // 198.18.0.0/15 benchmarking
        || o[0] >= 240 // reserved
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forbidden_ranges_cover_ssrf_targets() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            // 6to4 of 127.0.0.1, 10.0.0.1 and 169.254.169.254
            "2002:7f00:1::",
            "2002:a00:1::1",
            "2002:a9fe:a9fe::",
            // IPv4-compatible ::127.0.0.1 and ::169.254.169.254
            "::7f00:1",
            "::a9fe:a9fe",
            // local-use NAT64, Teredo
            "64:ff9b:1::a00:1",
            "64:ff9b:1:ffff::808:808",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        ] {
            assert!(is_forbidden_ip(ip.parse().unwrap()), "{ip} must be refused");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "::808:808",
        ] {
            assert!(
                !is_forbidden_ip(ip.parse().unwrap()),
                "{ip} must be allowed"
            );
        }
    }

    #[test]
    fn literal_hosts_are_checked_without_dns() {
        let guard = |allow_private, nets: &[&str]| {
            AddressGuard::new(
                allow_private,
                nets.iter().map(|n| n.parse().unwrap()).collect(),
            )
        };
        let url = url::Url::parse("http://[::1]:8080/x.jpg").unwrap();
        assert!(guard(false, &[]).check_literal_host(&url).is_err());
        assert!(guard(true, &[]).check_literal_host(&url).is_ok());
        let url = url::Url::parse("http://2130706433/x.jpg").unwrap(); // 127.0.0.1 as an integer
        assert!(guard(false, &[]).check_literal_host(&url).is_err(), "{url}");
        // An allowed network opens exactly that network.
        let nets = guard(false, &["127.0.0.1/32", "10.20.0.0/16"]);
        for (url, ok) in [
            ("http://127.0.0.1/x.jpg", true),
            ("http://10.20.3.4/x.jpg", true),
            ("http://127.0.0.2/x.jpg", false),
            ("http://10.21.0.1/x.jpg", false),
            ("http://169.254.169.254/latest/", false),
        ] {
            let url = url::Url::parse(url).unwrap();
            assert_eq!(nets.check_literal_host(&url).is_ok(), ok, "{url}");
        }
    }
}
