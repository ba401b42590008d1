//! `KLING_RESULT_HOSTS` entries: where segment PNGs may be downloaded from.

/// An entry of `KLING_RESULT_HOSTS`: `host`, `host:port` or `*.domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// Lower-case host, without the `*.` of a wildcard.
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

/// A `KLING_RESULT_HOSTS` entry that is not a host pattern.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not host, host:port or *.domain")]
pub struct HostPatternError(pub String);

impl HostPattern {
    pub fn parse(s: &str) -> Result<Self, HostPatternError> {
        let s = s.trim().to_ascii_lowercase();
        let bad = || HostPatternError(s.clone());
        let (wildcard, rest) = match s.strip_prefix("*.") {
            Some(r) => (true, r.to_owned()),
            None => (false, s.clone()),
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.starts_with('[') => {
                (h.to_owned(), Some(p.parse::<u16>().map_err(|_| bad())?))
            }
            _ => (rest, None),
        };
        if host.is_empty() || host.contains('/') || host.contains('*') {
            return Err(bad());
        }
        Ok(Self {
            host,
            wildcard,
            port,
        })
    }

    /// Every non-blank entry of a list, parsed.
    pub fn parse_list(list: &[String]) -> Result<Vec<Self>, HostPatternError> {
        list.iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| Self::parse(s))
            .collect()
    }

    /// Does this URL's host (and port) match? Without a port in the pattern
    /// only the scheme's default port matches.
    pub fn matches(&self, url: &url::Url) -> bool {
        let Some(host) = url.host_str() else {
            return false;
        };
        let host = host.to_ascii_lowercase();
        let host_ok = if self.wildcard {
            host.strip_suffix(&self.host)
                .is_some_and(|head| head.ends_with('.') && head.len() > 1)
        } else {
            host == self.host
        };
        let port_ok = match self.port {
            Some(p) => url.port_or_known_default() == Some(p),
            None => url.port().is_none(),
        };
        host_ok && port_ok
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.host)?;
        if let Some(p) = self.port {
            write!(f, ":{p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> url::Url {
        url::Url::parse(s).unwrap()
    }

    #[test]
    fn host_patterns_match_exactly_what_they_say() {
        let exact = HostPattern::parse("cdn.klingai.com").unwrap();
        assert!(exact.matches(&url("https://cdn.klingai.com/a.png")));
        assert!(exact.matches(&url("https://CDN.klingai.com/a.png")));
        assert!(!exact.matches(&url("https://cdn.klingai.com:8443/a.png")));
        assert!(!exact.matches(&url("https://evil-cdn.klingai.com/a.png")));
        assert!(!exact.matches(&url("https://cdn.klingai.com.evil.net/a.png")));

        let wild = HostPattern::parse("*.klingai.com").unwrap();
        assert!(wild.matches(&url("https://v15-kling.klingai.com/x.png")));
        assert!(!wild.matches(&url("https://klingai.com/x.png")));
        assert!(!wild.matches(&url("https://evilklingai.com/x.png")));

        let port = HostPattern::parse("127.0.0.1:8089").unwrap();
        assert!(port.matches(&url("http://127.0.0.1:8089/cdn/x.png")));
        assert!(!port.matches(&url("http://127.0.0.1:8090/cdn/x.png")));
        assert_eq!(port.to_string(), "127.0.0.1:8089");

        for bad in ["", "a/b", "x:notaport", "*.", "a*.b"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lists_skip_blanks() {
        let list = ["a.test".to_owned(), " ".to_owned(), "*.b.test".to_owned()];
        assert_eq!(HostPattern::parse_list(&list).unwrap().len(), 2);
    }
}
