//! The TOML config: parsed, validated, then typed (SPEC §3).
//!
//! This runs before anything binds a socket: `main` calls [`Config::load`] for `serve` and
//! `check` (and again on SIGHUP), and every later module reads only the typed [`Config`], never
//! raw TOML. Parsing happens in two steps. Serde fills the `Raw*` structs below, which
//! reject unknown keys and carry the SPEC defaults; then `validate` checks each value and
//! builds the typed structs. Every failure becomes one [`ConfigError`] that names the dotted
//! key and, when the key is in the file, its line, so `cph-cache check` can point at the mistake.
//!
//! Line numbers come from `toml::Spanned`: serde errors carry the span of the bad value, and
//! every raw value that `validate` checks is wrapped in `At`, which remembers its span.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// Everything the sidecar is configured with; see SPEC §3 for the file format.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    pub cache: CacheConfig,
    pub log: LogConfig,
}

/// `[server]`: the two listeners and the limits on what clients may ask of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub max_header_bytes: usize,
}

impl ServerConfig {
    /// Whether `listen` is reachable only from this host (127.0.0.0/8, ::1; `localhost` is
    /// parsed to 127.0.0.1): aksk mode relies on it (SPEC §5).
    pub fn listen_is_loopback(&self) -> bool {
        self.listen.ip().is_loopback()
    }
}

/// `[upstream]`: where the real CPH API is and how patiently we talk to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    pub endpoint: Endpoint,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub max_body: usize,
    pub ca_file: Option<PathBuf>,
    pub passthrough: Passthrough,
}

/// The upstream base URL, split so the client can build request URIs without re-parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: Scheme,
    pub authority: http::uri::Authority,
    /// `""` or a prefix such as `"/prefix"`: leading slash, no trailing slash.
    pub base_path: String,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happens to CPH calls other than the cached route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Passthrough {
    /// Refused with 404.
    None,
    /// GET and HEAD are forwarded, anything else gets 405.
    ReadOnly,
    /// Everything is forwarded.
    All,
}

impl Passthrough {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::ReadOnly => "read-only",
            Self::All => "all",
        }
    }
}

/// `[auth]`: whose credentials go upstream (SPEC §5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    pub mode: AuthMode,
    pub share: Share,
    pub verify_ttl: Duration,
    /// Names of environment variables, never the secrets themselves.
    pub access_key_env: String,
    pub secret_key_env: String,
    pub security_token_env: Option<String>,
    pub client_token_env: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// Forward the caller's `X-Auth-Token` / `Authorization`.
    Passthrough,
    /// Drop the caller's credentials and sign with our own AK/SK.
    Aksk,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passthrough => "passthrough",
            Self::Aksk => "aksk",
        }
    }
}

/// Passthrough mode: who may read an entry another caller's request stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Share {
    /// Any caller whose token upstream accepted for the project within `verify_ttl`.
    Verified,
    /// Only callers presenting the same credential.
    Credential,
}

impl Share {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verified => "verified",
            Self::Credential => "credential",
        }
    }
}

/// `[cache]`: freshness windows, the memory bound and per-project overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    pub defaults: Freshness,
    pub max_size: u64,
    /// Project id → its freshness, with unset fields already filled from `defaults`.
    pub projects: HashMap<String, Freshness>,
}

impl CacheConfig {
    /// The freshness rules for `project`: its override if it has one, else the defaults.
    pub fn freshness(&self, project: &str) -> Freshness {
        self.projects.get(project).copied().unwrap_or(self.defaults)
    }
}

/// How long an entry is fresh, then servable stale, and when a hit starts a refresh.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Freshness {
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// Fraction of `ttl` in `[0, 1)`; 0 disables refresh-ahead.
    pub refresh_ahead: f64,
}

/// `[log]`; `RUST_LOG` overrides `level` at startup (that is `main`'s business).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// An `EnvFilter` directive string, e.g. `"info"` or `"debug,hyper=warn"`.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    Text,
    Json,
}

/// A config that cannot be used, naming the offending key and line where there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// Dotted path such as `server.listen` or `cache.projects.<id>.ttl`.
    pub key: Option<String>,
    /// 1-based line in the file.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("config error")?;
        if let Some(key) = &self.key {
            write!(f, " in `{key}`")?;
        }
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl Config {
    /// Parses and validates a config held in memory; touches no files and no environment.
    pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_path_to_error::deserialize(toml::Deserializer::new(s))
            .map_err(|e| deserialize_error(s, &e))?;
        Check { src: s }.validate(raw)
    }

    /// Reads `path` and parses it with [`Config::from_toml_str`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            key: None,
            line: None,
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        Self::from_toml_str(&text)
    }
}

// ---------------------------------------------------------------------------------------------
// Raw layer: what serde reads. The `Default` impls are SPEC §3's defaults, in its order.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    upstream: RawUpstream,
    auth: RawAuth,
    cache: RawCache,
    log: RawLog,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawServer {
    listen: At<String>,
    admin_listen: At<String>,
    request_timeout: At<Dur>,
    shutdown_grace: At<Dur>,
    max_header_bytes: At<Size>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: At::default_to("127.0.0.1:8080".into()),
            admin_listen: At::default_to("127.0.0.1:9090".into()),
            request_timeout: At::secs(15),
            shutdown_grace: At::secs(10),
            max_header_bytes: At::default_to(Size(32 * 1024)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawUpstream {
    /// Required: there is no sensible default region.
    endpoint: Option<At<String>>,
    connect_timeout: At<Dur>,
    timeout: At<Dur>,
    retries: u32,
    max_body: At<Size>,
    ca_file: String,
    /// Absent means "follow `auth.mode`", which is only known after the whole file is read.
    passthrough: Option<Passthrough>,
}

impl Default for RawUpstream {
    fn default() -> Self {
        Self {
            endpoint: None,
            connect_timeout: At::secs(2),
            timeout: At::secs(10),
            retries: 1,
            max_body: At::default_to(Size(8 * 1024 * 1024)),
            ca_file: String::new(),
            passthrough: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawAuth {
    mode: AuthMode,
    share: Share,
    verify_ttl: At<Dur>,
    access_key_env: At<String>,
    secret_key_env: At<String>,
    security_token_env: At<String>,
    client_token_env: At<String>,
}

impl Default for RawAuth {
    fn default() -> Self {
        Self {
            mode: AuthMode::Passthrough,
            share: Share::Verified,
            verify_ttl: At::secs(5 * 60),
            access_key_env: At::default_to("CPH_ACCESS_KEY".into()),
            secret_key_env: At::default_to("CPH_SECRET_KEY".into()),
            security_token_env: At::default_to(String::new()),
            client_token_env: At::default_to(String::new()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawCache {
    ttl: At<Dur>,
    stale_while_revalidate: At<Dur>,
    stale_if_error: At<Dur>,
    refresh_ahead: At<f64>,
    max_size: At<Size>,
    projects: HashMap<ProjectKey, RawProject>,
}

impl Default for RawCache {
    fn default() -> Self {
        Self {
            ttl: At::secs(60),
            stale_while_revalidate: At::secs(60),
            stale_if_error: At::secs(60 * 60),
            refresh_ahead: At::default_to(0.8),
            max_size: At::default_to(Size(64 * 1024 * 1024)),
            projects: HashMap::new(),
        }
    }
}

/// `[cache.projects."<id>"]`: each key left out falls back to the `[cache]` value.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawProject {
    ttl: Option<At<Dur>>,
    stale_while_revalidate: Option<At<Dur>>,
    stale_if_error: Option<At<Dur>>,
    refresh_ahead: Option<At<f64>>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawLog {
    level: At<String>,
    format: LogFormat,
}

impl Default for RawLog {
    fn default() -> Self {
        Self {
            level: At::default_to("info".into()),
            format: LogFormat::Text,
        }
    }
}

/// A raw value and the byte range it was written at; `span` is `None` for a default.
#[derive(Debug)]
struct At<T> {
    value: T,
    span: Option<Range<usize>>,
}

impl<T> At<T> {
    fn default_to(value: T) -> Self {
        Self { value, span: None }
    }
}

impl At<Dur> {
    fn secs(secs: u64) -> Self {
        Self::default_to(Dur(Duration::from_secs(secs)))
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for At<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let spanned = toml::Spanned::<T>::deserialize(d)?;
        Ok(Self {
            span: Some(spanned.span()),
            value: spanned.into_inner(),
        })
    }
}

/// The longest duration accepted anywhere: other modules add these to `Instant::now()`, which
/// panics on overflow, and no real TTL or timeout comes near ten years.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);

/// A humantime duration (`"250ms"`, `"30s"`, `"5m"`), parsed here rather than through
/// `humantime_serde` so the error says which unit was wrong instead of only "expected a duration".
#[derive(Debug, Clone, Copy)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a duration string such as "250ms", "30s" or "5m""#)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
                let d = humantime::parse_duration(s)
                    .map_err(|e| E::custom(format!("invalid duration {s:?}: {e}")))?;
                if d > MAX_DURATION {
                    return Err(E::custom(format!("duration {s:?} is longer than 10 years")));
                }
                Ok(Dur(d))
            }
        }
        d.deserialize_str(V)
    }
}

/// A byte size: a string such as `"64MiB"` or `"32KiB"` (bytesize's syntax), or plain bytes.
#[derive(Debug, Clone, Copy)]
struct Size(u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a size such as "64MiB" or a number of bytes"#)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Size, E> {
                Ok(Size(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Size, E> {
                u64::try_from(n)
                    .map(Size)
                    .map_err(|_| E::custom(format!("size {n} is negative")))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Size, E> {
                s.trim()
                    .parse::<ByteSize>()
                    .map(|b| Size(b.as_u64()))
                    .map_err(|e| {
                        E::custom(format!(
                            r#"invalid size {s:?}: {e} (expected e.g. "64MiB", "32KiB", "8MB")"#
                        ))
                    })
            }
        }
        d.deserialize_any(V)
    }
}

/// A `[cache.projects]` key, checked while parsing so the error carries the key's line.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ProjectKey(String);

impl<'de> Deserialize<'de> for ProjectKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let id = String::deserialize(d)?;
        if is_project_id(&id) {
            Ok(Self(id))
        } else {
            Err(de::Error::custom(format!(
                "invalid project id {id:?}: must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'"
            )))
        }
    }
}

/// The same rule the proxy applies to request paths (SPEC §4), so an override can always match.
fn is_project_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Turns a serde/toml error into a [`ConfigError`] with the dotted path serde was at.
fn deserialize_error(src: &str, err: &serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
    use serde_path_to_error::Segment;
    let mut segments: Vec<String> = err
        .path()
        .iter()
        .filter_map(|seg| match seg {
            // `At<T>` goes through `toml::Spanned`, whose private field names are no config key.
            Segment::Map { key } if key.starts_with("$__serde_spanned") => None,
            Segment::Map { key } => Some(key.clone()),
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect();
    // A bad project id is a fault of the table, not a key inside it.
    if let [first, second, id] = segments.as_slice()
        && first == "cache"
        && second == "projects"
        && !is_project_id(id)
    {
        segments.truncate(2);
    }
    let inner = err.inner();
    ConfigError {
        key: (!segments.is_empty()).then(|| segments.join(".")),
        line: inner.span().map(|s| line_of(src, s.start)),
        // toml's syntax messages span two lines ("invalid table header\nexpected ..."); one
        // line reads better in logs and in `check` output.
        message: inner.message().trim().replace('\n', "; "),
    }
}

/// 1-based line containing byte `offset` of `src`.
fn line_of(src: &str, offset: usize) -> usize {
    let end = offset.min(src.len());
    src.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

// ---------------------------------------------------------------------------------------------
// Validation: raw → typed. Each check names its key; `src` turns spans into line numbers.
// ---------------------------------------------------------------------------------------------

struct Check<'a> {
    src: &'a str,
}

impl Check<'_> {
    fn fail<T>(
        &self,
        key: &str,
        span: Option<&Range<usize>>,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError {
            key: Some(key.to_owned()),
            line: span.map(|s| line_of(self.src, s.start)),
            message: message.into(),
        })
    }

    fn validate(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let server = self.server(raw.server)?;
        let auth = self.auth(raw.auth, &server)?;
        let upstream = self.upstream(raw.upstream, auth.mode)?;
        let cache = self.cache(raw.cache)?;
        let log = self.log(raw.log)?;
        Ok(Config {
            server,
            upstream,
            auth,
            cache,
            log,
        })
    }

    fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        Ok(ServerConfig {
            listen: self.socket_addr("server.listen", &raw.listen)?,
            admin_listen: self.socket_addr("server.admin_listen", &raw.admin_listen)?,
            request_timeout: self.positive("server.request_timeout", &raw.request_timeout)?,
            // 0 is a legitimate choice: drop in-flight requests at once on shutdown.
            shutdown_grace: raw.shutdown_grace.value.0,
            // Below 1 KiB even a bare request with a token does not fit.
            max_header_bytes: self.size("server.max_header_bytes", &raw.max_header_bytes, 1024)?,
        })
    }

    fn upstream(&self, raw: RawUpstream, mode: AuthMode) -> Result<UpstreamConfig, ConfigError> {
        let Some(endpoint) = raw.endpoint else {
            return self.fail(
                "upstream.endpoint",
                None,
                r#"is required, e.g. endpoint = "https://cph.cn-east-3.myhuaweicloud.com""#,
            );
        };
        Ok(UpstreamConfig {
            endpoint: self.endpoint(&endpoint)?,
            connect_timeout: self.positive("upstream.connect_timeout", &raw.connect_timeout)?,
            timeout: self.positive("upstream.timeout", &raw.timeout)?,
            retries: raw.retries,
            max_body: self.size("upstream.max_body", &raw.max_body, 1)?,
            ca_file: (!raw.ca_file.is_empty()).then(|| PathBuf::from(raw.ca_file)),
            // In aksk mode anyone reaching the listener acts as us, so only the cached
            // read is exposed unless the operator opts in (SPEC §5).
            passthrough: raw.passthrough.unwrap_or(match mode {
                AuthMode::Passthrough => Passthrough::All,
                AuthMode::Aksk => Passthrough::None,
            }),
        })
    }

    fn auth(&self, raw: RawAuth, server: &ServerConfig) -> Result<AuthConfig, ConfigError> {
        let aksk = raw.mode == AuthMode::Aksk;
        let access_key_env = self.env_name("auth.access_key_env", raw.access_key_env, aksk)?;
        let secret_key_env = self.env_name("auth.secret_key_env", raw.secret_key_env, aksk)?;
        let security_token_env =
            self.optional_env_name("auth.security_token_env", &raw.security_token_env)?;
        let client_token_env =
            self.optional_env_name("auth.client_token_env", &raw.client_token_env)?;
        if aksk && !server.listen_is_loopback() && client_token_env.is_none() {
            return self.fail(
                "auth.client_token_env",
                raw.client_token_env.span.as_ref(),
                format!(
                    "must be set in aksk mode when `server.listen` ({}) is not a loopback \
                     address: otherwise anyone who can reach the listener acts with our AK/SK",
                    server.listen
                ),
            );
        }
        Ok(AuthConfig {
            mode: raw.mode,
            share: raw.share,
            // 0 is allowed: a verification then never outlives its own request.
            verify_ttl: raw.verify_ttl.value.0,
            access_key_env,
            secret_key_env,
            security_token_env,
            client_token_env,
        })
    }

    fn cache(&self, raw: RawCache) -> Result<CacheConfig, ConfigError> {
        let defaults = Freshness {
            ttl: self.positive("cache.ttl", &raw.ttl)?,
            stale_while_revalidate: raw.stale_while_revalidate.value.0,
            stale_if_error: raw.stale_if_error.value.0,
            refresh_ahead: self.fraction("cache.refresh_ahead", &raw.refresh_ahead)?,
        };
        let mut projects = HashMap::with_capacity(raw.projects.len());
        for (ProjectKey(id), p) in raw.projects {
            let key = |field: &str| format!("cache.projects.{id}.{field}");
            let freshness = Freshness {
                ttl: match &p.ttl {
                    Some(ttl) => self.positive(&key("ttl"), ttl)?,
                    None => defaults.ttl,
                },
                stale_while_revalidate: p
                    .stale_while_revalidate
                    .map_or(defaults.stale_while_revalidate, |d| d.value.0),
                stale_if_error: p
                    .stale_if_error
                    .map_or(defaults.stale_if_error, |d| d.value.0),
                refresh_ahead: match &p.refresh_ahead {
                    Some(r) => self.fraction(&key("refresh_ahead"), r)?,
                    None => defaults.refresh_ahead,
                },
            };
            projects.insert(id, freshness);
        }
        Ok(CacheConfig {
            defaults,
            max_size: self.size("cache.max_size", &raw.max_size, 1)?,
            projects,
        })
    }

    fn log(&self, raw: RawLog) -> Result<LogConfig, ConfigError> {
        let level = raw.level.value.trim();
        let span = raw.level.span.as_ref();
        if level.is_empty() {
            return self.fail("log.level", span, r#"must not be empty (e.g. "info")"#);
        }
        // EnvFilter reads a lone word that is not a level as a target name ("inof" would
        // silently log nothing of ours), so a single bare word must be a level.
        const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
        if !level.contains([',', '=', '[', ':'])
            && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(level))
        {
            return self.fail(
                "log.level",
                span,
                format!(
                    "unknown level {level:?}: expected one of {} or directives such as \
                     \"debug,hyper=warn\"",
                    LEVELS.join(", ")
                ),
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(level) {
            return self.fail("log.level", span, format!("invalid filter {level:?}: {e}"));
        }
        Ok(LogConfig {
            level: level.to_owned(),
            format: raw.format,
        })
    }

    fn positive(&self, key: &str, d: &At<Dur>) -> Result<Duration, ConfigError> {
        if d.value.0.is_zero() {
            return self.fail(key, d.span.as_ref(), "must be greater than 0");
        }
        Ok(d.value.0)
    }

    fn fraction(&self, key: &str, r: &At<f64>) -> Result<f64, ConfigError> {
        // `contains` is false for NaN as well.
        if !(0.0..1.0).contains(&r.value) {
            return self.fail(
                key,
                r.span.as_ref(),
                format!("{} is out of range: must be >= 0 and < 1", r.value),
            );
        }
        Ok(r.value)
    }

    fn size<T: TryFrom<u64>>(&self, key: &str, s: &At<Size>, min: u64) -> Result<T, ConfigError> {
        let n = s.value.0;
        if n < min {
            let need = if min == 1 {
                "must be greater than 0".to_owned()
            } else {
                format!("must be at least {}", ByteSize(min).display().iec())
            };
            return self.fail(
                key,
                s.span.as_ref(),
                format!("{n} bytes is too small: {need}"),
            );
        }
        T::try_from(n).or_else(|_| {
            self.fail(
                key,
                s.span.as_ref(),
                format!("{n} bytes is too large for this platform"),
            )
        })
    }

    /// `"IP:port"`, `"[IPv6]:port"` or `"localhost:port"` (always 127.0.0.1, never a lookup).
    fn socket_addr(&self, key: &str, raw: &At<String>) -> Result<SocketAddr, ConfigError> {
        let s = raw.value.trim();
        let parsed = match s.strip_prefix("localhost:") {
            Some(port) => port
                .parse::<u16>()
                .map(|port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
                .map_err(|e| format!("invalid port {port:?}: {e}")),
            None => s.parse::<SocketAddr>().map_err(|e| e.to_string()),
        };
        parsed.or_else(|e| {
            self.fail(
                key,
                raw.span.as_ref(),
                format!("{s:?}: {e}; expected IP:port, [IPv6]:port or localhost:port"),
            )
        })
    }

    fn endpoint(&self, raw: &At<String>) -> Result<Endpoint, ConfigError> {
        const KEY: &str = "upstream.endpoint";
        let s = raw.value.trim();
        let bad = |why: &str| -> Result<Endpoint, ConfigError> {
            self.fail(KEY, raw.span.as_ref(), format!("{s:?}: {why}"))
        };
        if s.is_empty() {
            return self.fail(KEY, raw.span.as_ref(), "is empty; it is required");
        }
        // `http::Uri` silently drops a fragment; a stray '#' is a mistake worth reporting.
        if s.contains('#') {
            return bad("must not have a fragment ('#')");
        }
        let uri = match s.parse::<http::Uri>() {
            Ok(uri) => uri,
            Err(e) => return bad(&format!("not a URL ({e})")),
        };
        let scheme = match uri.scheme_str() {
            Some(x) if x.eq_ignore_ascii_case("https") => Scheme::Https,
            Some(x) if x.eq_ignore_ascii_case("http") => Scheme::Http,
            _ => return bad("must start with https:// or http://"),
        };
        let Some(authority) = uri.authority().cloned() else {
            return bad("has no host");
        };
        if authority.host().is_empty() {
            return bad("has no host");
        }
        if authority.as_str().contains('@') {
            return bad("must not contain user info; credentials belong in [auth]");
        }
        // `Authority` keeps a port it cannot read ("h:99999", "h:"); connecting would fail later.
        let has_port = authority.as_str().len() > authority.host().len();
        if has_port && authority.port_u16().is_none_or(|p| p == 0) {
            return bad("has an invalid port");
        }
        if uri.query().is_some() {
            return bad("must not have a query string");
        }
        Ok(Endpoint {
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    fn env_name(&self, key: &str, raw: At<String>, required: bool) -> Result<String, ConfigError> {
        if required && raw.value.is_empty() {
            return self.fail(
                key,
                raw.span.as_ref(),
                "must name an environment variable in aksk mode",
            );
        }
        self.check_env_name(key, &raw)?;
        Ok(raw.value)
    }

    fn optional_env_name(
        &self,
        key: &str,
        raw: &At<String>,
    ) -> Result<Option<String>, ConfigError> {
        self.check_env_name(key, raw)?;
        Ok((!raw.value.is_empty()).then(|| raw.value.clone()))
    }

    /// Names that the environment can never hold are typos (or a pasted secret).
    fn check_env_name(&self, key: &str, raw: &At<String>) -> Result<(), ConfigError> {
        if raw.value.contains(['=', '\0']) || raw.value.chars().any(char::is_whitespace) {
            return self.fail(
                key,
                raw.span.as_ref(),
                "must be the NAME of an environment variable (no '=', spaces or NUL), \
                 never the secret itself",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[upstream]\nendpoint = \"https://cph.cn-east-3.myhuaweicloud.com\"\n";

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(s)
    }

    /// `MINIMAL` plus `extra`, so line numbers in `extra` start at 3.
    fn with(extra: &str) -> Result<Config, ConfigError> {
        parse(&format!("{MINIMAL}{extra}"))
    }

    /// Asserts a rejection naming `key` (in the field and in Display) at `line`.
    #[track_caller]
    fn rejects(result: Result<Config, ConfigError>, key: &str, line: Option<usize>) -> ConfigError {
        let err = result.expect_err("config should be rejected");
        assert_eq!(err.key.as_deref(), Some(key), "{err}");
        assert_eq!(err.line, line, "{err}");
        let shown = err.to_string();
        assert!(shown.contains(&format!("`{key}`")), "{shown}");
        if let Some(line) = line {
            assert!(shown.contains(&format!("(line {line})")), "{shown}");
        }
        err
    }

    #[test]
    fn minimal_config_gets_every_default() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(
            c.server,
            ServerConfig {
                listen: "127.0.0.1:8080".parse().unwrap(),
                admin_listen: "127.0.0.1:9090".parse().unwrap(),
                request_timeout: Duration::from_secs(15),
                shutdown_grace: Duration::from_secs(10),
                max_header_bytes: 32 * 1024,
            }
        );
        assert_eq!(
            c.upstream,
            UpstreamConfig {
                endpoint: Endpoint {
                    scheme: Scheme::Https,
                    authority: "cph.cn-east-3.myhuaweicloud.com".parse().unwrap(),
                    base_path: String::new(),
                },
                connect_timeout: Duration::from_secs(2),
                timeout: Duration::from_secs(10),
                retries: 1,
                max_body: 8 * 1024 * 1024,
                ca_file: None,
                passthrough: Passthrough::All,
            }
        );
        assert_eq!(
            c.auth,
            AuthConfig {
                mode: AuthMode::Passthrough,
                share: Share::Verified,
                verify_ttl: Duration::from_secs(300),
                access_key_env: "CPH_ACCESS_KEY".into(),
                secret_key_env: "CPH_SECRET_KEY".into(),
                security_token_env: None,
                client_token_env: None,
            }
        );
        assert_eq!(
            c.cache,
            CacheConfig {
                defaults: Freshness {
                    ttl: Duration::from_secs(60),
                    stale_while_revalidate: Duration::from_secs(60),
                    stale_if_error: Duration::from_secs(3600),
                    refresh_ahead: 0.8,
                },
                max_size: 64 * 1024 * 1024,
                projects: HashMap::new(),
            }
        );
        assert_eq!(
            c.log,
            LogConfig {
                level: "info".into(),
                format: LogFormat::Text,
            }
        );
        assert_eq!(
            c.upstream.endpoint.to_string(),
            "https://cph.cn-east-3.myhuaweicloud.com"
        );
    }

    #[test]
    fn shipped_config_is_the_spec_example_with_spec_defaults() {
        let c = parse(include_str!("../config/cph-cache.toml")).unwrap();
        let defaults = parse(MINIMAL).unwrap();
        let mut expected = defaults.clone();
        let project = Freshness {
            ttl: Duration::from_secs(300),
            ..defaults.cache.defaults
        };
        expected
            .cache
            .projects
            .insert("0123456789abcdef0123456789abcdef".into(), project);
        assert_eq!(c, expected);
        assert_eq!(
            c.cache.freshness("0123456789abcdef0123456789abcdef"),
            project
        );
    }

    #[test]
    fn demo_config_parses() {
        let c = parse(include_str!("../config/demo.toml")).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.server.admin_listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.upstream.endpoint.to_string(), "http://127.0.0.1:1");
        assert_eq!(c.cache.defaults.ttl, Duration::from_secs(30));
        assert_eq!(c.auth.mode, AuthMode::Aksk);
        assert_eq!(c.log.level, "info");
    }

    #[test]
    fn every_key_set_explicitly() {
        let c = parse(
            r#"
[server]
listen = "0.0.0.0:8443"
admin_listen = "[::1]:9100"
request_timeout = "2s 500ms"
shutdown_grace = "0s"
max_header_bytes = 65536

[upstream]
endpoint = "http://fake-cph:8080/prefix/"
connect_timeout = "250ms"
timeout = "1s"
retries = 0
max_body = "1MB"
ca_file = "/etc/ssl/private-ca.pem"
passthrough = "read-only"

[auth]
mode = "aksk"
share = "credential"
verify_ttl = "1m"
access_key_env = "AK"
secret_key_env = "SK"
security_token_env = "TOKEN"
client_token_env = "CLIENT"

[cache]
ttl = "5m"
stale_while_revalidate = "0s"
stale_if_error = "1d"
refresh_ahead = 0
max_size = "1GiB"

[log]
level = "debug,hyper=warn"
format = "json"
"#,
        )
        .unwrap();
        assert!(!c.server.listen_is_loopback());
        assert_eq!(c.server.admin_listen, "[::1]:9100".parse().unwrap());
        assert_eq!(c.server.request_timeout, Duration::from_millis(2500));
        assert_eq!(c.server.shutdown_grace, Duration::ZERO);
        assert_eq!(c.server.max_header_bytes, 65536);
        let e = &c.upstream.endpoint;
        assert_eq!(
            (e.scheme, e.authority.as_str()),
            (Scheme::Http, "fake-cph:8080")
        );
        assert_eq!(e.base_path, "/prefix");
        assert_eq!(e.to_string(), "http://fake-cph:8080/prefix");
        assert_eq!(c.upstream.max_body, 1_000_000);
        assert_eq!(c.upstream.retries, 0);
        assert_eq!(
            c.upstream.ca_file,
            Some(PathBuf::from("/etc/ssl/private-ca.pem"))
        );
        assert_eq!(c.upstream.passthrough, Passthrough::ReadOnly);
        assert_eq!(
            (c.auth.mode, c.auth.share),
            (AuthMode::Aksk, Share::Credential)
        );
        assert_eq!(c.auth.security_token_env.as_deref(), Some("TOKEN"));
        assert_eq!(c.auth.client_token_env.as_deref(), Some("CLIENT"));
        assert_eq!(c.cache.defaults.stale_if_error, Duration::from_secs(86400));
        assert_eq!(c.cache.defaults.refresh_ahead, 0.0);
        assert_eq!(c.cache.max_size, 1 << 30);
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn passthrough_default_follows_auth_mode() {
        let aksk = with("[auth]\nmode = \"aksk\"\n").unwrap();
        assert_eq!(aksk.upstream.passthrough, Passthrough::None);
        let c = parse(
            "[upstream]\nendpoint = \"https://h\"\npassthrough = \"all\"\n[auth]\nmode = \"aksk\"\n",
        )
        .unwrap();
        assert_eq!(c.upstream.passthrough, Passthrough::All);
        for (value, expected) in [
            ("none", Passthrough::None),
            ("read-only", Passthrough::ReadOnly),
            ("all", Passthrough::All),
        ] {
            let toml = format!("[upstream]\nendpoint = \"https://h\"\npassthrough = \"{value}\"\n");
            assert_eq!(parse(&toml).unwrap().upstream.passthrough, expected);
            assert_eq!(expected.as_str(), value);
        }
        let bad = parse("[upstream]\nendpoint = \"https://h\"\npassthrough = \"readonly\"\n");
        let err = rejects(bad, "upstream.passthrough", Some(3));
        assert!(err.message.contains("read-only"), "{err}");
    }

    #[test]
    fn localhost_and_ipv6_listen_addresses() {
        let c =
            with("[server]\nlisten = \"localhost:8081\"\nadmin_listen = \"[::1]:0\"\n").unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8081".parse().unwrap());
        assert!(c.server.listen_is_loopback());
        assert_eq!(c.server.admin_listen, "[::1]:0".parse().unwrap());

        let c = with("[server]\nlisten = \"[::1]:8080\"\n").unwrap();
        assert!(c.server.listen_is_loopback());
        let c = with("[server]\nlisten = \"127.1.2.3:8080\"\n").unwrap();
        assert!(c.server.listen_is_loopback());
        let c = with("[server]\nlisten = \"[::]:8080\"\n").unwrap();
        assert!(!c.server.listen_is_loopback());

        for bad in [
            "localhost",
            "localhost:http",
            "example.com:80",
            "127.0.0.1",
            "::1:80",
            "",
        ] {
            let toml = format!("[server]\nlisten = \"{bad}\"\n");
            rejects(with(&toml), "server.listen", Some(4));
        }
        let err = rejects(
            with("[server]\nadmin_listen = \"127.0.0.1:99999\"\n"),
            "server.admin_listen",
            Some(4),
        );
        assert!(err.message.contains("99999"), "{err}");
    }

    #[test]
    fn display_formats() {
        let err = rejects(
            with("[server]\nlisten = \"nope\"\n"),
            "server.listen",
            Some(4),
        );
        assert_eq!(
            err.to_string(),
            "config error in `server.listen` (line 4): \"nope\": invalid socket address syntax; \
             expected IP:port, [IPv6]:port or localhost:port"
        );
        let bare = ConfigError {
            key: None,
            line: None,
            message: "boom".into(),
        };
        assert_eq!(bare.to_string(), "config error: boom");
        let syntax = parse("[server\n").unwrap_err();
        assert_eq!((syntax.key.as_deref(), syntax.line), (None, Some(1)));
        assert!(!syntax.message.contains('\n'));
        assert!(
            syntax.to_string().starts_with("config error (line 1): "),
            "{syntax}"
        );
    }

    #[test]
    fn unknown_keys_are_named_with_their_full_path() {
        let err = rejects(
            with("[server]\nlisen = \"127.0.0.1:1\"\n"),
            "server.lisen",
            Some(4),
        );
        assert!(err.message.contains("lisen"), "{err}");
        rejects(with("[upstreams]\n"), "upstreams", Some(3));
        rejects(with("[log]\nlevels = \"info\"\n"), "log.levels", Some(4));
        rejects(
            with("[auth]\nmode = \"aksk\"\nsecret = \"x\"\n"),
            "auth.secret",
            Some(5),
        );
        rejects(
            with("[cache.projects.abc]\nttl = \"1s\"\nmax_size = \"1MiB\"\n"),
            "cache.projects.abc.max_size",
            Some(5),
        );
        rejects(parse("endpoint = \"https://h\"\n"), "endpoint", Some(1));
    }

    #[test]
    fn bad_durations() {
        let err = rejects(
            with("[server]\nrequest_timeout = \"5 parsecs\"\n"),
            "server.request_timeout",
            Some(4),
        );
        assert!(err.message.contains("parsecs"), "{err}");
        rejects(with("[cache]\nttl = 60\n"), "cache.ttl", Some(4));
        rejects(
            with("[auth]\nverify_ttl = \"-5s\"\n"),
            "auth.verify_ttl",
            Some(4),
        );
        rejects(
            with("[cache]\nstale_if_error = \"100years\"\n"),
            "cache.stale_if_error",
            Some(4),
        );
        rejects(
            with("[cache.projects.p1]\nstale_while_revalidate = \"soon\"\n"),
            "cache.projects.p1.stale_while_revalidate",
            Some(4),
        );
    }

    #[test]
    fn zero_timeouts_and_ttls_are_rejected() {
        for (table, key) in [
            ("server", "request_timeout"),
            ("upstream", "connect_timeout"),
            ("upstream", "timeout"),
            ("cache", "ttl"),
        ] {
            // TOML forbids reopening [upstream], so its keys go right after the endpoint.
            let toml = if table == "upstream" {
                format!("[upstream]\nendpoint = \"https://h\"\n{key} = \"0s\"\n")
            } else {
                format!("{MINIMAL}[{table}]\n{key} = \"0ms\"\n")
            };
            let line = if table == "upstream" { 3 } else { 4 };
            let err = rejects(parse(&toml), &format!("{table}.{key}"), Some(line));
            assert!(err.message.contains("greater than 0"), "{err}");
        }
        rejects(
            with("[cache.projects.p1]\nttl = \"0s\"\n"),
            "cache.projects.p1.ttl",
            Some(4),
        );
        // Zero is meaningful for these.
        with("[server]\nshutdown_grace = \"0s\"\n[auth]\nverify_ttl = \"0s\"\n").unwrap();
        with("[cache]\nstale_while_revalidate = \"0s\"\nstale_if_error = \"0s\"\n").unwrap();
    }

    #[test]
    fn bad_sizes() {
        let err = rejects(
            with("[cache]\nmax_size = \"64 MiBs\"\n"),
            "cache.max_size",
            Some(4),
        );
        assert!(err.message.contains("64 MiBs"), "{err}");
        let err = rejects(with("[cache]\nmax_size = -1\n"), "cache.max_size", Some(4));
        assert!(err.message.contains("negative"), "{err}");
        rejects(
            with("[cache]\nmax_size = \"-5MiB\"\n"),
            "cache.max_size",
            Some(4),
        );
        rejects(with("[cache]\nmax_size = 0\n"), "cache.max_size", Some(4));
        rejects(with("[cache]\nmax_size = 1.5\n"), "cache.max_size", Some(4));
        let err = rejects(
            with("[server]\nmax_header_bytes = \"1023B\"\n"),
            "server.max_header_bytes",
            Some(4),
        );
        assert!(err.message.contains("1.0 KiB"), "{err}");
        assert_eq!(
            with("[server]\nmax_header_bytes = \"1KiB\"\n")
                .unwrap()
                .server
                .max_header_bytes,
            1024
        );
        rejects(
            parse("[upstream]\nendpoint = \"https://h\"\nmax_body = \"0B\"\n"),
            "upstream.max_body",
            Some(3),
        );
    }

    #[test]
    fn endpoint_rules() {
        let err = rejects(parse(""), "upstream.endpoint", None);
        assert!(err.message.contains("required"), "{err}");
        rejects(
            parse("[upstream]\nretries = 2\n"),
            "upstream.endpoint",
            None,
        );
        for bad in [
            "",
            "cph.cn-east-3.myhuaweicloud.com",
            "ftp://cph.example.com",
            "https://",
            "https:///path",
            "https://cph.example.com/?region=x",
            "https://user:pw@cph.example.com",
            "https://cph example.com",
            "https://cph.example.com#frag",
            "https://cph.example.com:99999",
            "https://cph.example.com:",
            "https://cph.example.com:0",
            "/v1/x",
        ] {
            let toml = format!("[upstream]\nendpoint = \"{bad}\"\n");
            rejects(parse(&toml), "upstream.endpoint", Some(2));
        }
        let ok = |s: &str| {
            parse(&format!("[upstream]\nendpoint = \"{s}\"\n"))
                .unwrap()
                .upstream
                .endpoint
        };
        assert_eq!(ok("https://cph.example.com/").base_path, "");
        assert_eq!(ok("HTTPS://cph.example.com").scheme, Scheme::Https);
        assert_eq!(
            ok("http://[::1]:8080/a/b/").to_string(),
            "http://[::1]:8080/a/b"
        );
        assert_eq!(ok("http://127.0.0.1:1").authority.port_u16(), Some(1));
        assert_eq!(ok("http://[::1]").authority.host(), "[::1]");
    }

    #[test]
    fn refresh_ahead_range() {
        for bad in ["1.0", "1", "-0.1", "nan", "inf"] {
            let toml = format!("[cache]\nrefresh_ahead = {bad}\n");
            rejects(with(&toml), "cache.refresh_ahead", Some(4));
        }
        rejects(
            with("[cache.projects.p1]\nrefresh_ahead = 1.5\n"),
            "cache.projects.p1.refresh_ahead",
            Some(4),
        );
        assert_eq!(
            with("[cache]\nrefresh_ahead = 0.99\n")
                .unwrap()
                .cache
                .defaults
                .refresh_ahead,
            0.99
        );
    }

    #[test]
    fn auth_rules() {
        rejects(with("[auth]\nmode = \"sigv4\"\n"), "auth.mode", Some(4));
        rejects(
            with("[auth]\nshare = \"everyone\"\n"),
            "auth.share",
            Some(4),
        );
        let err = rejects(
            with("[auth]\nmode = \"aksk\"\naccess_key_env = \"\"\n"),
            "auth.access_key_env",
            Some(5),
        );
        assert!(err.message.contains("aksk"), "{err}");
        rejects(
            with("[auth]\nmode = \"aksk\"\nsecret_key_env = \"\"\n"),
            "auth.secret_key_env",
            Some(5),
        );
        // Unused in passthrough mode, so an empty name is harmless there.
        with("[auth]\naccess_key_env = \"\"\n").unwrap();
        // A pasted secret is not a variable name.
        let err = rejects(
            with("[auth]\nsecret_key_env = \"CPH_SECRET_KEY=abc\"\n"),
            "auth.secret_key_env",
            Some(4),
        );
        assert!(!err.message.contains("abc"), "{err}");

        let c = with("[auth]\nsecurity_token_env = \"\"\nclient_token_env = \"\"\n").unwrap();
        assert_eq!(
            (c.auth.security_token_env, c.auth.client_token_env),
            (None, None)
        );
    }

    #[test]
    fn aksk_on_a_public_listener_needs_a_client_token() {
        let public = "[server]\nlisten = \"0.0.0.0:8080\"\n[auth]\nmode = \"aksk\"\n";
        let err = rejects(with(public), "auth.client_token_env", None);
        assert!(err.message.contains("server.listen"), "{err}");
        let err = rejects(
            with(&format!("{public}client_token_env = \"\"\n")),
            "auth.client_token_env",
            Some(7),
        );
        assert!(err.to_string().contains("server.listen"), "{err}");
        let ok = with(&format!("{public}client_token_env = \"CPH_CACHE_TOKEN\"\n")).unwrap();
        assert_eq!(ok.auth.client_token_env.as_deref(), Some("CPH_CACHE_TOKEN"));
        for loopback in ["127.0.0.1:8080", "localhost:8080", "[::1]:8080"] {
            with(&format!(
                "[server]\nlisten = \"{loopback}\"\n[auth]\nmode = \"aksk\"\n"
            ))
            .unwrap();
        }
        // Passthrough mode forwards callers' own credentials: any listener is fine.
        with("[server]\nlisten = \"0.0.0.0:8080\"\n").unwrap();
    }

    #[test]
    fn log_rules() {
        assert_eq!(
            with("[log]\nlevel = \"DEBUG\"\n").unwrap().log.level,
            "DEBUG"
        );
        with("[log]\nlevel = \"cph_cache=trace\"\n").unwrap();
        rejects(with("[log]\nlevel = \"inof\"\n"), "log.level", Some(4));
        rejects(with("[log]\nlevel = \"\"\n"), "log.level", Some(4));
        rejects(
            with("[log]\nlevel = \"info,hyper=loud\"\n"),
            "log.level",
            Some(4),
        );
        rejects(with("[log]\nformat = \"yaml\"\n"), "log.format", Some(4));
    }

    #[test]
    fn project_overrides_fall_back_to_cache_values() {
        let c = with(
            r#"[cache]
ttl = "2m"
stale_if_error = "10m"
refresh_ahead = 0.5
[cache.projects."0123456789abcdef0123456789abcdef"]
ttl = "5m"
refresh_ahead = 0
[cache.projects.other_project-2]
stale_while_revalidate = "1s"
"#,
        )
        .unwrap();
        let defaults = Freshness {
            ttl: Duration::from_secs(120),
            stale_while_revalidate: Duration::from_secs(60),
            stale_if_error: Duration::from_secs(600),
            refresh_ahead: 0.5,
        };
        assert_eq!(c.cache.defaults, defaults);
        assert_eq!(
            c.cache.freshness("0123456789abcdef0123456789abcdef"),
            Freshness {
                ttl: Duration::from_secs(300),
                refresh_ahead: 0.0,
                ..defaults
            }
        );
        assert_eq!(
            c.cache.freshness("other_project-2"),
            Freshness {
                stale_while_revalidate: Duration::from_secs(1),
                ..defaults
            }
        );
        assert_eq!(c.cache.freshness("unknown"), defaults);

        // Dotted keys and inline tables are the same TOML.
        let dotted = with("[cache]\nprojects.p1.ttl = \"7s\"\n").unwrap();
        assert_eq!(dotted.cache.freshness("p1").ttl, Duration::from_secs(7));
        let inline = with("[cache]\nprojects = { p1 = { ttl = \"7s\" } }\n").unwrap();
        assert_eq!(inline.cache, dotted.cache);
    }

    #[test]
    fn project_ids_must_be_valid() {
        for bad in ["..", "a/b", "a b", "", &"a".repeat(65)] {
            let toml = format!("[cache.projects.\"{bad}\"]\nttl = \"5m\"\n");
            let err = rejects(with(&toml), "cache.projects", Some(3));
            assert!(err.message.contains("project id"), "{err}");
        }
        rejects(
            with("[cache]\nprojects = { \"x.y\" = { ttl = \"1s\" } }\n"),
            "cache.projects",
            Some(4),
        );
        with(&format!("[cache.projects.\"{}\"]\n", "a".repeat(64))).unwrap();
    }

    #[test]
    fn load_names_the_path() {
        let path = Path::new("/nonexistent/cph-cache-test.toml");
        let err = Config::load(path).unwrap_err();
        assert_eq!((err.key.as_deref(), err.line), (None, None));
        assert!(
            err.to_string().contains("/nonexistent/cph-cache-test.toml"),
            "{err}"
        );

        let dir = std::env::temp_dir().join(format!("cph-cache-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ok.toml");
        std::fs::write(&file, MINIMAL).unwrap();
        let loaded = Config::load(&file);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(loaded.unwrap(), parse(MINIMAL).unwrap());
    }
}
