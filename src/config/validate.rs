//! [`WorkerArgs`] → [`Config`]: every check of the worker's flags, in one
//! place, once. An error names the environment variable to fix and says
//! what a good value looks like.

use std::net::SocketAddr;
use std::time::Duration;

use secrecy::SecretString;

use super::{
    ArchiveTarget, BreakerConfig, Config, ConfigError, DEFAULT_ARCHIVE, FetchConfig, KlingConfig,
    WorkerArgs, default_prefetch, secret_from_env,
};

fn invalid(name: &'static str, reason: String) -> ConfigError {
    ConfigError::Invalid { name, reason }
}

impl WorkerArgs {
    /// `--archive` / `ARCHIVE_URL`, or the worker's default.
    pub fn archive_url(&self) -> &str {
        self.archive_url.as_deref().unwrap_or(DEFAULT_ARCHIVE)
    }

    /// Validate flags into a [`Config`]. Kling keys come from the environment.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let access_key = secret_from_env("KLING_ACCESS_KEY")?;
        let secret_key = secret_from_env("KLING_SECRET_KEY")?;
        self.into_config_with_keys(
            secrecy::ExposeSecret::expose_secret(&access_key).to_owned(),
            secret_key,
        )
    }

    /// Validate flags with keys given directly (the demo mints its own).
    pub fn into_config_with_keys(
        self,
        access_key: String,
        secret_key: SecretString,
    ) -> Result<Config, ConfigError> {
        let prefetch = self.checked_prefetch()?;
        let (base_url, proxy) = self.kling_endpoint()?;
        let archive = ArchiveTarget::parse(self.archive_url())
            .map_err(|reason| invalid("ARCHIVE_URL", reason))?;
        let result_hosts = self.checked_result_hosts()?;
        if self.kling_max_attempts == 0 {
            return Err(invalid("KLING_MAX_ATTEMPTS", "must be at least 1".into()));
        }
        let pixel_budget = self.checked_pixel_budget()?;
        if self.memory_budget_mb < 4 {
            return Err(invalid("MEMORY_BUDGET_MB", "must be at least 4".into()));
        }
        let http_addr = self.checked_http_addr()?;
        let (lease_ttl, job_deadline) = self.checked_deadlines()?;
        let kling = self.kling_config(base_url, proxy, access_key, secret_key);
        let fetch = self.fetch_config();
        Ok(Config {
            amqp_url: self.amqp_url,
            queue: self.queue,
            concurrency: usize::from(self.concurrency),
            prefetch: usize::from(prefetch),
            delivery_limit: self.delivery_limit,
            retry_delays: self
                .retry_delays_secs
                .iter()
                .map(|s| Duration::from_secs(*s))
                .collect(),
            kling,
            archive,
            archive_local_ok: self.archive_local_ok,
            s3_force_path_style: self.s3_force_path_style,
            fetch,
            result_hosts,
            max_image_pixels: self.max_image_pixels,
            pixel_budget,
            memory_budget_mb: self.memory_budget_mb,
            share_recognitions: self.share_recognitions,
            source_masks: self.source_masks,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout_secs),
            lease_ttl,
            job_deadline,
            allow_unsafe_conditional_writes: self.allow_unsafe_conditional_writes,
            http_addr,
        })
    }

    /// The consumer's settings (queue, ceiling, retries, delivery limit),
    /// and the prefetch, defaulted from the ceiling.
    fn checked_prefetch(&self) -> Result<u16, ConfigError> {
        if self.queue.is_empty() || self.queue.len() > 200 {
            return Err(invalid("WORKER_QUEUE", "must be 1..=200 characters".into()));
        }
        if self.concurrency == 0 {
            return Err(invalid("WORKER_CONCURRENCY", "must be at least 1".into()));
        }
        let prefetch = self
            .prefetch
            .unwrap_or_else(|| default_prefetch(self.concurrency));
        if prefetch == 0 {
            return Err(invalid("WORKER_PREFETCH", "must be at least 1".into()));
        }
        if self.retry_delays_secs.is_empty() || self.retry_delays_secs.contains(&0) {
            return Err(invalid(
                "WORKER_RETRY_DELAYS_SECS",
                "give one or more delays of at least 1 second".into(),
            ));
        }
        if self.delivery_limit == 0 {
            return Err(invalid(
                "WORKER_DELIVERY_LIMIT",
                "must be at least 1".into(),
            ));
        }
        Ok(prefetch)
    }

    /// Kling's base URL (https, or http to a loopback simulator) and the
    /// optional proxy in front of it.
    fn kling_endpoint(&self) -> Result<(url::Url, Option<url::Url>), ConfigError> {
        let base_url = url::Url::parse(&self.kling_base_url)
            .map_err(|e| invalid("KLING_BASE_URL", e.to_string()))?;
        let loopback = match base_url.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
            None => false,
        };
        match base_url.scheme() {
            "https" => {}
            "http" if loopback => {}
            "http" => {
                return Err(invalid(
                    "KLING_BASE_URL",
                    "must be https (http would send the JWT in clear); http is allowed only for a loopback simulator".into(),
                ));
            }
            _ => return Err(invalid("KLING_BASE_URL", "must be an https URL".into())),
        }
        let proxy = match self.kling_proxy.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(p) => Some(
                url::Url::parse(p)
                    .map_err(|e| invalid("KLING_PROXY", format!("{e}: give http://host:port")))?,
            ),
        };
        Ok((base_url, proxy))
    }

    /// `KLING_RESULT_HOSTS`, trimmed, blanks dropped; at least one.
    fn checked_result_hosts(&self) -> Result<Vec<String>, ConfigError> {
        let result_hosts: Vec<String> = self
            .result_hosts
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if result_hosts.is_empty() {
            return Err(invalid("KLING_RESULT_HOSTS", "lists no host".into()));
        }
        Ok(result_hosts)
    }

    /// The pixel budget, in pixels: room for at least the largest image.
    fn checked_pixel_budget(&self) -> Result<u64, ConfigError> {
        let pixel_budget = u64::from(self.pixel_budget_mp) * 1_000_000;
        if pixel_budget < self.max_image_pixels {
            return Err(invalid(
                "PIXEL_BUDGET_MP",
                format!(
                    "budget {pixel_budget} px is below MAX_IMAGE_PIXELS {}; the largest allowed image could never run",
                    self.max_image_pixels
                ),
            ));
        }
        Ok(pixel_budget)
    }

    /// The ops listener's address; `None` for `off`.
    fn checked_http_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        Ok(match self.http_addr.trim() {
            "off" | "" => None,
            addr => Some(addr.parse().map_err(|e| {
                invalid(
                    "HTTP_ADDR",
                    format!("{e}: give ip:port (e.g. 0.0.0.0:9464) or off"),
                )
            })?),
        })
    }

    /// The lease TTL and the job deadline, which must outlive the job's
    /// Kling budget plus a claim's wait.
    fn checked_deadlines(&self) -> Result<(Duration, Duration), ConfigError> {
        if self.lease_ttl_secs == 0 {
            return Err(invalid("LEASE_TTL_SECS", "must be at least 1".into()));
        }
        let lease_ttl = Duration::from_secs(self.lease_ttl_secs);
        // A job must outlive its own Kling budget plus a claim's wait.
        let floor = self.kling_job_deadline_secs + 2 * self.lease_ttl_secs;
        if self.job_deadline_secs <= floor {
            return Err(invalid(
                "JOB_DEADLINE_SECS",
                format!(
                    "{} s leaves no room: it must exceed KLING_JOB_DEADLINE_SECS + 2 x LEASE_TTL_SECS = {floor} s",
                    self.job_deadline_secs
                ),
            ));
        }
        Ok((lease_ttl, Duration::from_secs(self.job_deadline_secs)))
    }

    fn kling_config(
        &self,
        base_url: url::Url,
        proxy: Option<url::Url>,
        access_key: String,
        secret_key: SecretString,
    ) -> KlingConfig {
        KlingConfig {
            base_url,
            proxy,
            access_key,
            secret_key,
            max_attempts: self.kling_max_attempts,
            job_deadline: Duration::from_secs(self.kling_job_deadline_secs),
            request_timeout: Duration::from_secs(self.kling_request_timeout_secs),
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            max_in_flight: usize::from(self.concurrency),
            probe_interval: Duration::from_secs(self.kling_probe_interval_secs.max(1)),
            breaker: BreakerConfig::default(),
        }
    }

    fn fetch_config(&self) -> FetchConfig {
        FetchConfig {
            s3_buckets: self
                .source_s3_buckets
                .iter()
                .map(|b| b.trim().to_owned())
                .filter(|b| !b.is_empty())
                .collect(),
            deadline: Duration::from_secs(self.source_fetch_deadline_secs.max(1)),
            allow_private: self.source_allow_private,
            allow_nets: self.source_allow_nets.clone(),
            max_bytes: self.source_max_bytes,
            ..FetchConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::Cli;

    #[test]
    fn kling_base_url_is_https_unless_loopback() {
        let cfg = |url: &str| {
            Cli::try_parse_from(["worker", "--kling-base-url", url])
                .unwrap()
                .worker
                .into_config_with_keys("ak".into(), SecretString::from("sk"))
        };
        assert!(cfg("https://api-singapore.klingai.com").is_ok());
        assert!(cfg("http://127.0.0.1:8089").is_ok());
        assert!(cfg("http://localhost:8089").is_ok());
        assert!(cfg("http://[::1]:8089").is_ok());
        let err = cfg("http://api.klingai.com").unwrap_err().to_string();
        assert!(
            err.contains("KLING_BASE_URL") && err.contains("https"),
            "{err}"
        );
        assert!(cfg("ftp://x").is_err());
    }

    #[test]
    fn prefetch_defaults_to_twice_the_kling_ceiling() {
        let cfg = |args: &[&str]| {
            Cli::try_parse_from(args)
                .unwrap()
                .worker
                .into_config_with_keys("ak".into(), SecretString::from("sk"))
        };
        let c = cfg(&["worker", "--concurrency", "32"]).unwrap();
        assert_eq!(
            (c.concurrency, c.prefetch, c.kling.max_in_flight),
            (32, 64, 32)
        );
        let c = cfg(&["worker", "--concurrency", "32", "--prefetch", "40"]).unwrap();
        assert_eq!(
            (c.concurrency, c.prefetch, c.kling.max_in_flight),
            (32, 40, 32)
        );
        assert_eq!(default_prefetch(u16::MAX), u16::MAX, "saturates");
        assert!(cfg(&["worker", "--prefetch", "0"]).is_err());
    }

    #[test]
    fn config_debug_redacts_secrets() {
        let cli = Cli::try_parse_from(["worker", "--amqp-url", "amqp://u:hunter2@h/%2f"]).unwrap();
        let flags = format!("{:?}", cli.worker);
        assert!(!flags.contains("hunter2"), "{flags}");
        let cfg = cli
            .worker
            .into_config_with_keys("ak".into(), SecretString::from("very-secret-key"))
            .unwrap();
        let dbg = format!("{cfg:?}");
        assert!(!dbg.contains("very-secret-key"), "{dbg}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
    }
}
