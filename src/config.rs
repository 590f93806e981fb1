//! What to watch and how often: [`Config`] and the [`ConfigError`] a bad value gives.

use std::fmt;
use std::time::Duration;

/// How poolwatch watches one pool. Build it with [`Config::new`] and the setters; every
/// field documents its default. Values are checked by [`instrument_pool`](crate::instrument_pool).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// The `db_client_connection_pool_name` label value. 1-64 characters from
    /// `A-Z a-z 0-9 _ - . :`. No default: you name the pool.
    pub pool_name: String,
    /// How often the pool's own gauges are sampled. Default 5 s.
    pub sample_interval: Duration,
    /// How often the server census runs (`pg_stat_activity` + own sockets). Default 15 s.
    pub census_interval: Duration,
    /// Connect and statement timeout of the census's dedicated connection. Default 5 s.
    pub census_timeout: Duration,
    /// How long a connection checked out through [`WatchedPool`](crate::WatchedPool) may be
    /// held before it is reported as a leak or stuck suspect. Default `None` (off).
    pub leak_threshold: Option<Duration>,
}

impl Config {
    /// A config with defaults for the pool named `pool_name`.
    pub fn new(pool_name: impl Into<String>) -> Self {
        Config {
            pool_name: pool_name.into(),
            sample_interval: Duration::from_secs(5),
            census_interval: Duration::from_secs(15),
            census_timeout: Duration::from_secs(5),
            leak_threshold: None,
        }
    }

    /// Sets [`Config::sample_interval`].
    pub fn sample_interval(mut self, every: Duration) -> Self {
        self.sample_interval = every;
        self
    }

    /// Sets [`Config::census_interval`].
    pub fn census_interval(mut self, every: Duration) -> Self {
        self.census_interval = every;
        self
    }

    /// Sets [`Config::census_timeout`].
    pub fn census_timeout(mut self, timeout: Duration) -> Self {
        self.census_timeout = timeout;
        self
    }

    /// Sets [`Config::leak_threshold`], e.g. `Some(Duration::from_secs(30))`.
    pub fn leak_threshold(mut self, threshold: Option<Duration>) -> Self {
        self.leak_threshold = threshold;
        self
    }

    /// Checks every field; the error names the first bad one and how to fix it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.pool_name;
        if name.is_empty() {
            return Err(ConfigError::new("pool_name", "is empty", "name the pool, e.g. Config::new(\"main\")"));
        }
        if name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.:".contains(c)) {
            return Err(ConfigError::new(
                "pool_name",
                format!("{name:?} is not a valid label value"),
                "use 1-64 characters from A-Z a-z 0-9 _ - . :",
            ));
        }
        for (field, value) in [
            ("sample_interval", self.sample_interval),
            ("census_interval", self.census_interval),
            ("census_timeout", self.census_timeout),
            ("leak_threshold", self.leak_threshold.unwrap_or(Duration::MAX)),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(field, "is zero", "use a positive duration (see the field's default)"));
            }
        }
        Ok(())
    }
}

/// A [`Config`] value poolwatch cannot use, or a setup it cannot run in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The field at fault, e.g. `census_interval`.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
    /// How to fix it.
    pub fix: &'static str,
}

impl ConfigError {
    pub(crate) fn new(field: &'static str, problem: impl Into<String>, fix: &'static str) -> Self {
        ConfigError { field, problem: problem.into(), fix }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "poolwatch: `{}` {}; fix: {}", self.field, self.problem, self.fix)
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Config::new("main").validate(), Ok(()));
    }

    #[test]
    fn each_bad_value_names_its_field() {
        let cases = [
            (Config::new(""), "pool_name"),
            (Config::new("has space"), "pool_name"),
            (Config::new("x".repeat(65)), "pool_name"),
            (Config::new("a").sample_interval(Duration::ZERO), "sample_interval"),
            (Config::new("a").census_interval(Duration::ZERO), "census_interval"),
            (Config::new("a").census_timeout(Duration::ZERO), "census_timeout"),
            (Config::new("a").leak_threshold(Some(Duration::ZERO)), "leak_threshold"),
        ];
        for (config, field) in cases {
            let err = config.validate().expect_err(field);
            assert_eq!(err.field, field);
            assert!(err.to_string().contains(field) && err.to_string().contains("fix:"), "{err}");
        }
    }
}
