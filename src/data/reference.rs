//! References (the claim-check pattern): an image stored in an object store, named by a
//! URI in the message. Every scheme is fetched through the `object_store` crate (apache
//! arrow-rs), one interface for `s3://` (and S3-compatible stores through an endpoint),
//! `gs://`, `az://`/`abfs(s)://`, `http(s)://` and `file://`; credentials come from each
//! cloud's standard chain as `object_store` reads it, never from the message and never
//! logged.
//!
//! A reference is an instruction from whoever can produce to the topic, so the policy
//! ([`FetchPolicy`]) is checked before anything is fetched: `file://` only under
//! `file_root` (after resolving `..` and symlinks), `http(s)://` only to listed hosts,
//! redirects only to listed hosts, no link-local or cloud-metadata address (a literal, a
//! name that resolves to one, or a redirect to one) unless listed. Every fetch is cut at
//! `max_bytes` (refused from the size the store announces, before the body, and cut while
//! streaming in case it lied) and at `timeout`.
//!
//! Failures are classified once, here: permanent ones (not found, denied, too large, a
//! bad reference) fail the item at once; transient ones (timeouts, 5xx, throttling) are
//! retried with backoff `retries` times; an unreachable store (connection refused, DNS)
//! is an outage, retried until it answers when [`Persistence::UntilReachable`], so no
//! item is dead-lettered because a store was briefly down.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Component, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, GetOptions, ObjectStore, RetryConfig};
use serde::{Deserialize, Serialize};
use url::Url;

/// Options for the cloud stores, beside what their standard environment sets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectStoreOptions {
    /// An S3-compatible endpoint (MinIO, Ceph, R2, a local test server), e.g.
    /// `http://127.0.0.1:9000`. Empty: `AWS_ENDPOINT_URL` or AWS itself.
    pub endpoint: String,
    /// The S3 region. Empty: `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub region: String,
    /// Allow plain-HTTP endpoints (a local MinIO); `AWS_ALLOW_HTTP=true` does the same.
    pub allow_http: bool,
}

/// What references may name and how they are fetched.
#[derive(Debug, Clone, PartialEq)]
pub struct FetchPolicy {
    /// `file://` references are refused unless this is set; then only paths under it.
    pub file_root: Option<PathBuf>,
    /// Hosts `http(s)://` references may name (`host`, `host:port`, `*.domain`); none by
    /// default. A link-local or metadata address is fetched only when listed itself.
    pub allowed_hosts: Vec<String>,
    /// Buckets or containers cloud references may name (`s3://bucket`, `gs://bucket`,
    /// `az://container`, or a bare name for any scheme). Empty: any the credentials reach.
    pub allowed_buckets: Vec<String>,
    pub max_bytes: u64,
    /// Per attempt, connection to last byte.
    pub timeout: Duration,
    /// Retries of a transient failure (timeout, 5xx, throttling).
    pub retries: u32,
    pub persistence: Persistence,
    pub store: ObjectStoreOptions,
}

/// What happens while a store cannot be reached at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// Keep retrying (the daemon: an outage is a fault it waits out, loudly).
    UntilReachable,
    /// Give up after the retries (offline commands: the item fails with `fetch_unreachable`).
    Retries,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        Self {
            file_root: None,
            allowed_hosts: Vec::new(),
            allowed_buckets: Vec::new(),
            max_bytes: crate::data::DecodeLimits::default().max_bytes,
            timeout: Duration::from_secs(10),
            retries: 4,
            persistence: Persistence::UntilReachable,
            store: ObjectStoreOptions::default(),
        }
    }
}

/// Why a reference gave no image. Each has its own dead-letter code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FetchError {
    #[error("bad reference: {0}")]
    BadReference(String),
    #[error("{uri}: not found")]
    NotFound { uri: String },
    #[error("{uri}: access denied ({reason})")]
    Denied { uri: String, reason: String },
    #[error("{uri}: {size} bytes, over the limit of {limit} (pipeline.decode_limits.max_bytes)")]
    TooLarge { uri: String, size: u64, limit: u64 },
    #[error("{uri}: timed out after {attempts} attempts ({reason})")]
    Timeout { uri: String, attempts: u32, reason: String },
    #[error("{uri}: failed after {attempts} attempts: {reason}")]
    Failed { uri: String, attempts: u32, reason: String },
    #[error("{uri}: the store cannot be reached after {attempts} attempts: {reason}")]
    Unreachable { uri: String, attempts: u32, reason: String },
}

impl FetchError {
    pub fn code(&self) -> &'static str {
        match self {
            FetchError::BadReference(_) => "bad_reference",
            FetchError::NotFound { .. } => "fetch_not_found",
            FetchError::Denied { .. } => "fetch_denied",
            FetchError::TooLarge { .. } => "fetch_too_large",
            FetchError::Timeout { .. } => "fetch_timeout",
            FetchError::Failed { .. } => "fetch_failed",
            FetchError::Unreachable { .. } => "fetch_unreachable",
        }
    }
}

/// How one attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    Permanent(FetchError),
    /// Worth retrying a few times: a timeout, a 5xx, throttling, a dropped connection.
    Transient {
        kind: Transient,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transient {
    Timeout,
    Server,
    /// Nothing answers at all (connection refused, no route, DNS): an outage.
    Unreachable,
}

impl Transient {
    /// The `code` label of `dlsr_fetch_errors_total` for a failed attempt.
    pub fn code(self) -> &'static str {
        match self {
            Transient::Timeout => "timeout",
            Transient::Server => "server_error",
            Transient::Unreachable => "unreachable",
        }
    }
}

/// A parsed reference that the policy allows.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    /// As written in the message.
    pub uri: String,
    /// `s3`, `gs`, `az`, `http`, `https` or `file` (the metric label).
    pub scheme: &'static str,
    location: Location,
}

#[derive(Debug, Clone, PartialEq)]
enum Location {
    /// `store` keys the store cache (scheme and bucket, or the Azure URL's container).
    Cloud {
        store: String,
        url: String,
        key: String,
    },
    Http {
        origin: String,
        path: String,
    },
    File {
        path: PathBuf,
    },
}

fn bad(reason: impl Into<String>) -> FetchError {
    FetchError::BadReference(reason.into())
}

/// Link-local (169.254/16, fe80::/10) and the metadata addresses clouds serve on
/// other ranges (AWS's IPv6 one, Alibaba's).
pub fn is_metadata_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local() || v4.octets() == [100, 100, 100, 200],
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_metadata_address(IpAddr::V4(v4));
            }
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6 == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
        }
    }
}

impl FetchPolicy {
    /// Whether `host` (as in a URL, IPv6 in brackets or not) with `port` is listed.
    pub fn host_allowed(&self, host: &str, port: Option<u16>) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        self.allowed_hosts.iter().any(|entry| {
            let entry = entry.trim().to_ascii_lowercase();
            let (name, entry_port) = match entry.rsplit_once(':') {
                Some((n, p)) if !n.contains(':') || n.ends_with(']') => {
                    (n.to_string(), p.parse::<u16>().ok())
                }
                _ => (entry.clone(), None),
            };
            let name = name.trim_start_matches('[').trim_end_matches(']').to_string();
            let name_matches = match name.strip_prefix("*.") {
                Some(domain) => host.ends_with(&format!(".{domain}")),
                None => host == name,
            };
            name_matches && entry_port.is_none_or(|p| Some(p) == port)
        })
    }

    /// Whether an address may be connected to for `host` (a listed literal passes).
    fn address_allowed(&self, ip: IpAddr, port: Option<u16>) -> bool {
        !is_metadata_address(ip) || self.host_allowed(&ip.to_string(), port)
    }

    fn bucket_allowed(&self, scheme: &str, bucket: &str) -> bool {
        self.allowed_buckets.is_empty()
            || self.allowed_buckets.iter().any(|b| {
                let b = b.trim().trim_end_matches('/');
                b == bucket || b == format!("{scheme}://{bucket}")
            })
    }

    /// Parses `uri` and checks it against the policy; nothing is fetched.
    pub fn parse(&self, uri: &str) -> Result<Reference, FetchError> {
        let url = Url::parse(uri.trim()).map_err(|e| bad(format!("{uri:?} is not a URI ({e})")))?;
        let scheme = match url.scheme() {
            "s3" | "s3a" => "s3",
            "gs" => "gs",
            "az" | "adl" | "azure" | "abfs" | "abfss" => "az",
            "http" => "http",
            "https" => "https",
            "file" => "file",
            other => {
                return Err(bad(format!(
                    "{uri:?}: the scheme {other}:// is not one dlsr fetches (s3, gs, az, abfs, http, https, file)"
                )))
            }
        };
        let location = match scheme {
            "file" => Location::File { path: self.file_path(&url, uri)? },
            "http" | "https" => self.http_location(&url, uri)?,
            _ => {
                let host = url
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .ok_or_else(|| bad(format!("{uri:?} names no bucket")))?;
                // abfs://container@account.dfs.core.windows.net/path names the container before the @.
                let bucket =
                    if url.username().is_empty() { host.to_string() } else { url.username().to_string() };
                if !self.bucket_allowed(scheme, &bucket) {
                    return Err(bad(format!(
                        "{uri:?}: the bucket {bucket} is not in input.allowed_buckets ({:?})",
                        self.allowed_buckets
                    )));
                }
                let key = object_key(&url, uri)?;
                let store = format!(
                    "{scheme}://{}",
                    if scheme == "az" { format!("{bucket}@{host}") } else { bucket }
                );
                Location::Cloud { store, url: url.to_string(), key }
            }
        };
        Ok(Reference { uri: uri.trim().to_string(), scheme, location })
    }

    fn file_path(&self, url: &Url, uri: &str) -> Result<PathBuf, FetchError> {
        let Some(root) = &self.file_root else {
            return Err(bad(format!(
                "{uri:?}: file:// references are off (set input.file_root to allow a folder)"
            )));
        };
        if url.host_str().is_some_and(|h| !h.is_empty() && h != "localhost") {
            return Err(bad(format!("{uri:?}: a file:// reference names no host")));
        }
        let path = url.to_file_path().map_err(|_| bad(format!("{uri:?} is not a file path")))?;
        // The URL parser already folds `..`; a raw one is refused in case a parser ever does not.
        if path.components().any(|c| matches!(c, Component::ParentDir)) || uri.contains("/../") {
            return Err(bad(format!("{uri:?}: `..` is not allowed in a file reference")));
        }
        let root =
            root.canonicalize().map_err(|e| bad(format!("input.file_root {}: {e}", root.display())))?;
        let resolved = match path.canonicalize() {
            Ok(p) => p,
            // A missing file under the root is "not found", not a bad reference.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.starts_with(&root) => return Ok(path),
            Err(e) => return Err(bad(format!("{uri:?}: {e}"))),
        };
        if !resolved.starts_with(&root) {
            return Err(bad(format!(
                "{uri:?} resolves to {}, outside input.file_root {}",
                resolved.display(),
                root.display()
            )));
        }
        Ok(resolved)
    }

    fn http_location(&self, url: &Url, uri: &str) -> Result<Location, FetchError> {
        let host =
            url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| bad(format!("{uri:?} names no host")))?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(format!("{uri:?}: credentials in a URL are refused")));
        }
        if url.query().is_some() {
            return Err(bad(format!(
                "{uri:?}: URLs with a query string (presigned URLs) are not supported; reference the object \
                 itself (s3://bucket/key) and give dlsr credentials"
            )));
        }
        let port = url.port_or_known_default();
        if !self.host_allowed(host, url.port()) && !self.host_allowed(host, port) {
            return Err(bad(format!(
                "{uri:?}: the host {host} is not in input.allowed_hosts ({:?})",
                self.allowed_hosts
            )));
        }
        if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            if !self.address_allowed(ip, port) {
                return Err(bad(format!("{uri:?}: {ip} is a link-local or metadata address")));
            }
        }
        let origin = url.origin().ascii_serialization();
        let path = percent_decode(url.path().trim_start_matches('/'));
        if path.is_empty() {
            return Err(bad(format!("{uri:?} names no object")));
        }
        Ok(Location::Http { origin, path })
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// Characters escaped in a key put back into a URI: all but RFC 3986's unreserved ones.
const KEY_ESCAPES: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

fn object_key(url: &Url, uri: &str) -> Result<String, FetchError> {
    let key = percent_decode(url.path().trim_start_matches('/'));
    if key.is_empty() {
        return Err(bad(format!("{uri:?} names a bucket but no object")));
    }
    Ok(key)
}

/// Walks an error's sources for a `T`.
fn find_in_chain<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(e);
    while let Some(err) = current {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        current = err.source();
    }
    None
}

/// The full text of an error and its sources (object_store's top level says little).
fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut current = e.source();
    while let Some(err) = current {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = err.source();
    }
    parts.join(": ")
}

/// The HTTP status in object_store's error text (its retry error type is private).
fn status_in(text: &str) -> Option<u16> {
    let at = text.find("status code: ")? + "status code: ".len();
    text.get(at..at + 3)?.parse().ok()
}

/// Refusals raised inside the HTTP client; they make the attempt a bad reference.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// Maps one failed request to permanent or transient.
fn classify(err: object_store::Error, uri: &str) -> Attempt {
    use object_store::client::HttpErrorKind;
    use object_store::Error as E;
    let text = chain_text(&err);
    match &err {
        E::NotFound { .. } => return Attempt::Permanent(FetchError::NotFound { uri: uri.into() }),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            return Attempt::Permanent(FetchError::Denied { uri: uri.into(), reason: short(&text) })
        }
        _ => {}
    }
    if let Some(refused) = find_in_chain::<Refused>(&err) {
        return Attempt::Permanent(bad(format!("{uri:?}: {refused}")));
    }
    if let Some(status) = status_in(&text) {
        return match status {
            404 | 410 => Attempt::Permanent(FetchError::NotFound { uri: uri.into() }),
            401 | 403 => {
                Attempt::Permanent(FetchError::Denied { uri: uri.into(), reason: format!("HTTP {status}") })
            }
            408 => Attempt::Transient { kind: Transient::Timeout, reason: format!("HTTP {status}") },
            429 | 500..=599 => {
                Attempt::Transient { kind: Transient::Server, reason: format!("HTTP {status}") }
            }
            301..=308 => {
                Attempt::Permanent(bad(format!("{uri:?}: a redirect dlsr did not follow (HTTP {status})")))
            }
            _ => {
                Attempt::Permanent(FetchError::Failed { uri: uri.into(), attempts: 1, reason: short(&text) })
            }
        };
    }
    if let Some(http) = find_in_chain::<object_store::client::HttpError>(&err) {
        let kind = match http.kind() {
            HttpErrorKind::Connect => Transient::Unreachable,
            HttpErrorKind::Timeout => Transient::Timeout,
            _ => Transient::Server,
        };
        return Attempt::Transient { kind, reason: short(&text) };
    }
    if let Some(io) = find_in_chain::<std::io::Error>(&err) {
        if io.kind() == std::io::ErrorKind::NotFound {
            return Attempt::Permanent(FetchError::NotFound { uri: uri.into() });
        }
        if io.kind() == std::io::ErrorKind::PermissionDenied {
            return Attempt::Permanent(FetchError::Denied { uri: uri.into(), reason: io.to_string() });
        }
    }
    Attempt::Permanent(FetchError::Failed { uri: uri.into(), attempts: 1, reason: short(&text) })
}

/// An error text cut to something a log line and a dead-letter header can carry.
fn short(text: &str) -> String {
    const MAX: usize = 400;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

/// What the fetcher reports as it goes (the daemon's metrics and readiness).
pub trait FetchObserver: Send + Sync {
    /// One attempt failed; `code` is a [`Transient::code`] or a [`FetchError::code`].
    fn attempt_failed(&self, _scheme: &'static str, _code: &'static str) {}
    /// `store` cannot be reached; called on every failed attempt while it lasts.
    fn unreachable(&self, _store: &str, _reason: &str) {}
    /// A fetch from `store` succeeded or failed for a reason of its own.
    fn reachable(&self, _store: &str) {}
    fn fetched(&self, _scheme: &'static str, _bytes: u64, _seconds: f64) {}
}

/// An observer that records nothing.
pub struct Unobserved;
impl FetchObserver for Unobserved {}

/// An image fetched.
#[derive(Debug)]
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub attempts: u32,
}

/// Fetches references under a policy, keeping one client per store.
pub struct Fetcher {
    policy: FetchPolicy,
    stores: Mutex<HashMap<String, Arc<dyn ObjectStore>>>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher").field("policy", &self.policy).finish()
    }
}

impl Fetcher {
    pub fn new(policy: FetchPolicy) -> Self {
        Self { policy, stores: Mutex::new(HashMap::new()) }
    }

    pub fn policy(&self) -> &FetchPolicy {
        &self.policy
    }

    /// The store a reference is fetched from (its cache key names it in logs).
    pub fn store_name(reference: &Reference) -> String {
        match &reference.location {
            Location::Cloud { store, .. } => store.clone(),
            Location::Http { origin, .. } => origin.clone(),
            Location::File { .. } => "file://".into(),
        }
    }

    /// object_store retries nothing itself: the attempts, their classes and the metrics
    /// are ours, and a store outage must not hide inside its 3-minute retry loop.
    fn retry_config(&self) -> RetryConfig {
        RetryConfig { max_retries: 0, retry_timeout: self.policy.timeout, ..RetryConfig::default() }
    }

    fn client_options(&self, allow_http: bool) -> ClientOptions {
        ClientOptions::new()
            .with_timeout(self.policy.timeout)
            .with_connect_timeout(self.policy.timeout.min(Duration::from_secs(5)))
            .with_allow_http(allow_http)
    }

    fn store_for(&self, reference: &Reference) -> Result<(Arc<dyn ObjectStore>, ObjectPath), FetchError> {
        let (cache_key, key) = match &reference.location {
            Location::Cloud { store, key, .. } => (store.clone(), key.clone()),
            Location::Http { origin, path } => (origin.clone(), path.clone()),
            Location::File { path } => {
                let object = ObjectPath::from_absolute_path(path)
                    .map_err(|e| bad(format!("{:?}: {e}", reference.uri)))?;
                return Ok((Arc::new(object_store::local::LocalFileSystem::new()), object));
            }
        };
        let object = ObjectPath::parse(&key).map_err(|e| bad(format!("{:?}: {e}", reference.uri)))?;
        let mut stores = self.stores.lock().map_err(|_| bad("the store cache is poisoned"))?;
        if let Some(store) = stores.get(&cache_key) {
            return Ok((store.clone(), object));
        }
        let store = self.build_store(reference).map_err(|e| bad(format!("{:?}: {e}", reference.uri)))?;
        stores.insert(cache_key, store.clone());
        Ok((store, object))
    }

    fn build_store(&self, reference: &Reference) -> Result<Arc<dyn ObjectStore>, object_store::Error> {
        let o = &self.policy.store;
        let allow_http_env = std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
        Ok(match &reference.location {
            Location::Cloud { url, .. } if reference.scheme == "s3" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url.clone())
                    .with_retry(self.retry_config())
                    .with_client_options(self.client_options(o.allow_http || allow_http_env));
                if !o.endpoint.is_empty() {
                    b = b.with_endpoint(o.endpoint.clone());
                }
                if !o.region.is_empty() {
                    b = b.with_region(o.region.clone());
                }
                Arc::new(b.build()?)
            }
            Location::Cloud { url, .. } if reference.scheme == "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url.clone())
                    .with_retry(self.retry_config())
                    .with_client_options(self.client_options(false))
                    .build()?,
            ),
            Location::Cloud { url, .. } => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url.clone())
                    .with_retry(self.retry_config())
                    .with_client_options(self.client_options(false))
                    .build()?,
            ),
            Location::Http { origin, .. } => Arc::new(
                object_store::http::HttpBuilder::new()
                    .with_url(origin.clone())
                    .with_retry(self.retry_config())
                    .with_client_options(self.client_options(true))
                    .with_http_connector(GuardedConnector { policy: Arc::new(self.policy.clone()) })
                    .build()?,
            ),
            Location::File { .. } => Arc::new(object_store::local::LocalFileSystem::new()),
        })
    }

    /// One attempt: the announced size checked before the body, the body cut at the limit.
    pub async fn fetch_once(&self, reference: &Reference) -> Result<Vec<u8>, Attempt> {
        let (store, path) = self.store_for(reference).map_err(Attempt::Permanent)?;
        let limit = self.policy.max_bytes;
        let uri = reference.uri.as_str();
        let too_large = |size| Attempt::Permanent(FetchError::TooLarge { uri: uri.into(), size, limit });
        let attempt = async {
            let result = store.get_opts(&path, GetOptions::default()).await.map_err(|e| classify(e, uri))?;
            if result.meta.size > limit {
                return Err(too_large(result.meta.size));
            }
            let mut body = Vec::with_capacity(result.meta.size as usize);
            let mut stream = result.into_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| classify(e, uri))?;
                if body.len() as u64 + chunk.len() as u64 > limit {
                    return Err(too_large(body.len() as u64 + chunk.len() as u64));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body)
        };
        match tokio::time::timeout(self.policy.timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(Attempt::Transient {
                kind: Transient::Timeout,
                reason: format!(
                    "no complete answer within {:?} (input.fetch_timeout_ms)",
                    self.policy.timeout
                ),
            }),
        }
    }

    /// Fetches with retries: transient failures `retries` times with backoff, an
    /// unreachable store until it answers when the policy says so.
    pub async fn fetch(
        &self,
        reference: &Reference,
        observer: &dyn FetchObserver,
    ) -> Result<Fetched, FetchError> {
        let store = Self::store_name(reference);
        let started = Instant::now();
        let mut attempts = 0u32;
        let mut transient_failures = 0u32;
        loop {
            attempts += 1;
            match self.fetch_once(reference).await {
                Ok(bytes) => {
                    observer.reachable(&store);
                    observer.fetched(reference.scheme, bytes.len() as u64, started.elapsed().as_secs_f64());
                    return Ok(Fetched { bytes, attempts });
                }
                Err(Attempt::Permanent(e)) => {
                    observer.reachable(&store);
                    observer.attempt_failed(reference.scheme, e.code());
                    return Err(e);
                }
                Err(Attempt::Transient { kind, reason }) => {
                    observer.attempt_failed(reference.scheme, kind.code());
                    let waits_out = kind == Transient::Unreachable
                        && self.policy.persistence == Persistence::UntilReachable;
                    if waits_out {
                        observer.unreachable(&store, &reason);
                    } else {
                        transient_failures += 1;
                    }
                    if !waits_out && transient_failures > self.policy.retries {
                        let uri = reference.uri.clone();
                        return Err(match kind {
                            Transient::Timeout => FetchError::Timeout { uri, attempts, reason },
                            Transient::Server => FetchError::Failed { uri, attempts, reason },
                            Transient::Unreachable => FetchError::Unreachable { uri, attempts, reason },
                        });
                    }
                    tokio::time::sleep(backoff(attempts)).await;
                }
            }
        }
    }
}

/// 100 ms doubling to 5 s, with jitter so retries of many items do not march together.
fn backoff(attempt: u32) -> Duration {
    let base = 100u64.saturating_mul(1 << attempt.min(6).saturating_sub(1)).min(5_000);
    let jitter = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos()) as u64)
        % (base / 4 + 1);
    Duration::from_millis(base + jitter)
}

/// The HTTP client for `http(s)://` references: object_store's own follows any redirect
/// and connects to any address; this one follows a redirect only to a listed host and
/// never connects to a link-local or metadata address that is not listed.
#[derive(Debug)]
struct GuardedConnector {
    policy: Arc<FetchPolicy>,
}

impl object_store::client::HttpConnector for GuardedConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<object_store::client::HttpClient> {
        let _ = options;
        let redirect_policy = self.policy.clone();
        let redirects = reqwest::redirect::Policy::custom(move |attempt| {
            let url = attempt.url().clone();
            let host = url.host_str().unwrap_or_default().to_string();
            let port = url.port_or_known_default();
            if attempt.previous().len() >= 5 {
                return attempt.error(Refused("more than 5 redirects".into()));
            }
            if !redirect_policy.host_allowed(&host, url.port()) && !redirect_policy.host_allowed(&host, port)
            {
                return attempt.error(Refused(format!(
                    "redirected to {url}, whose host {host} is not in input.allowed_hosts"
                )));
            }
            if let Ok(ip) = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
                if !redirect_policy.address_allowed(ip, port) {
                    return attempt
                        .error(Refused(format!("redirected to {ip}, a link-local or metadata address")));
                }
            }
            attempt.follow()
        });
        let client = reqwest::Client::builder()
            .redirect(redirects)
            .dns_resolver(Arc::new(GuardedResolver { policy: self.policy.clone() }))
            .timeout(self.policy.timeout)
            .connect_timeout(self.policy.timeout.min(Duration::from_secs(5)))
            .no_gzip()
            .no_brotli()
            .no_zstd()
            .no_deflate()
            .user_agent(concat!("dlsr/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| object_store::Error::Generic { store: "HTTP", source: Box::new(e) })?;
        Ok(object_store::client::HttpClient::new(client))
    }
}

/// Resolves names, dropping link-local and metadata addresses that are not listed (a
/// listed name that resolves to 169.254.169.254 is still refused: DNS rebinding).
struct GuardedResolver {
    policy: Arc<FetchPolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> =
                addrs.iter().copied().filter(|a| policy.address_allowed(a.ip(), None)).collect();
            if allowed.is_empty() && !addrs.is_empty() {
                let refused: Box<dyn std::error::Error + Send + Sync> =
                    Box::new(Refused(format!("{host} resolves only to link-local or metadata addresses")));
                return Err(refused);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Lists the objects under a `scheme://bucket/prefix/` SPEC (offline commands), sorted.
pub async fn list_prefix(fetcher: &Fetcher, spec: &str) -> Result<Vec<(String, u64)>, FetchError> {
    let bucket = spec.split_once("://").map_or("", |(_, rest)| rest.split('/').next().unwrap_or_default());
    if bucket.is_empty() {
        return Err(bad(format!("{spec:?} names no bucket (s3://bucket/prefix/)")));
    }
    let probe = if spec.ends_with('/') { format!("{spec}_") } else { format!("{spec}/_") };
    let reference = fetcher.policy.parse(&probe)?;
    if !matches!(reference.location, Location::Cloud { .. } | Location::File { .. }) {
        return Err(bad(format!("{spec:?}: only s3://, gs://, az:// and file:// prefixes can be listed")));
    }
    // Errors name the SPEC, not the probe key used to parse it.
    let named = |e: FetchError| match e {
        FetchError::BadReference(r) => bad(r.replace(&format!("{probe:?}"), &format!("{spec:?}"))),
        other => other,
    };
    let (store, probe_path) = fetcher.store_for(&reference).map_err(named)?;
    let prefix = probe_path.as_ref().strip_suffix('_').unwrap_or_default().trim_end_matches('/').to_string();
    let prefix_path = (!prefix.is_empty()).then(|| ObjectPath::from(prefix.as_str()));
    let mut listing = store.list(prefix_path.as_ref());
    let mut objects = Vec::new();
    // Each page within the attempt timeout: a store that stops answering mid-listing
    // is an error, not a command that hangs.
    let timeout = fetcher.policy.timeout;
    while let Some(meta) =
        tokio::time::timeout(timeout, listing.next()).await.map_err(|_| FetchError::Timeout {
            uri: spec.into(),
            attempts: 1,
            reason: format!(
                "listing gave no answer within {:?} (input.fetch_timeout_ms)",
                fetcher.policy.timeout
            ),
        })?
    {
        let meta = meta.map_err(|e| match classify(e, spec) {
            Attempt::Permanent(e) => e,
            Attempt::Transient { reason, .. } => FetchError::Failed { uri: spec.into(), attempts: 1, reason },
        })?;
        objects.push((meta.location.to_string(), meta.size));
    }
    objects.sort();
    Ok(objects)
}

/// Whether a SPEC is a URI the fetcher reads rather than a local path.
pub fn is_remote_spec(spec: &str) -> bool {
    ["s3://", "s3a://", "gs://", "az://", "abfs://", "abfss://"].iter().any(|s| spec.starts_with(s))
}

/// Turns `key` from [`list_prefix`] back into a reference under `spec`'s bucket.
pub fn object_uri(spec: &str, key: &str) -> String {
    let (scheme, rest) = spec.split_once("://").unwrap_or(("s3", spec));
    let bucket = rest.split('/').next().unwrap_or_default();
    let escaped: Vec<String> =
        key.split('/').map(|s| percent_encoding::utf8_percent_encode(s, KEY_ESCAPES).to_string()).collect();
    format!("{scheme}://{bucket}/{}", escaped.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> FetchPolicy {
        FetchPolicy {
            allowed_hosts: vec!["images.example.com".into(), "127.0.0.1:8080".into(), "*.cdn.net".into()],
            ..FetchPolicy::default()
        }
    }

    #[test]
    fn hosts_are_allowed_only_when_listed() {
        let p = policy();
        assert!(p.parse("https://images.example.com/a.png").is_ok());
        assert!(p.parse("http://127.0.0.1:8080/a.png").is_ok());
        assert!(p.parse("https://x.cdn.net/a.png").is_ok());
        for (uri, want) in [
            ("https://evil.example.com/a.png", "not in input.allowed_hosts"),
            ("http://127.0.0.1:8081/a.png", "not in input.allowed_hosts"),
            ("http://169.254.169.254/latest/meta-data/", "not in input.allowed_hosts"),
            ("https://images.example.com/a.png?X-Amz-Signature=1", "query string"),
            ("https://user:pw@images.example.com/a.png", "credentials"),
            ("ftp://images.example.com/a.png", "not one dlsr fetches"),
            ("file:///etc/passwd", "file:// references are off"),
            ("s3://", "names no bucket"),
            ("s3://bucket", "no object"),
            ("not a uri", "not a URI"),
        ] {
            let err = p.parse(uri).unwrap_err();
            assert_eq!(err.code(), "bad_reference");
            assert!(err.to_string().contains(want), "{uri}: {err}");
        }
        let listed = FetchPolicy { allowed_hosts: vec!["169.254.169.254".into()], ..FetchPolicy::default() };
        assert!(
            listed.parse("http://169.254.169.254/latest").is_ok(),
            "a listed metadata address is allowed"
        );
        assert!(is_metadata_address("fe80::1".parse().unwrap()));
        assert!(is_metadata_address("::ffff:169.254.169.254".parse().unwrap()));
        assert!(is_metadata_address("fd00:ec2::254".parse().unwrap()));
        assert!(!is_metadata_address("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn cloud_references_name_bucket_and_key() {
        let p = FetchPolicy {
            allowed_buckets: vec!["s3://images".into(), "pics".into()],
            ..FetchPolicy::default()
        };
        let r = p.parse("s3://images/cam%201/a.png").unwrap();
        assert_eq!((r.scheme, Fetcher::store_name(&r)), ("s3", "s3://images".to_string()));
        assert!(matches!(&r.location, Location::Cloud { key, .. } if key == "cam 1/a.png"));
        assert!(p.parse("gs://pics/a.png").is_ok());
        assert!(p.parse("s3://other/a.png").unwrap_err().to_string().contains("allowed_buckets"));
        let az = FetchPolicy::default().parse("abfss://box@acct.dfs.core.windows.net/dir/a.png").unwrap();
        assert_eq!(Fetcher::store_name(&az), "az://box@acct.dfs.core.windows.net");
        assert_eq!(object_uri("s3://images/cam/", "cam/a b.png"), "s3://images/cam/a%20b.png");
    }

    #[test]
    fn file_references_stay_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.png"), b"x").unwrap();
        std::fs::write(dir.path().join("secret.png"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.png"), root.join("link.png")).unwrap();
        let p = FetchPolicy { file_root: Some(root.clone()), ..FetchPolicy::default() };
        let url = |p: &std::path::Path| format!("file://{}", p.display());
        assert!(p.parse(&url(&root.join("sub/a.png"))).is_ok());
        assert!(
            p.parse(&url(&root.join("missing.png"))).is_ok(),
            "missing under the root: fetched, then not found"
        );
        for escape in [
            url(&root.join("link.png")),
            format!("file://{}/sub/../../secret.png", root.display()),
            url(&dir.path().join("secret.png")),
        ] {
            let err = p.parse(&escape).unwrap_err();
            assert_eq!(err.code(), "bad_reference", "{escape}: {err}");
        }
    }

    #[test]
    fn statuses_and_errors_are_classified() {
        assert_eq!(status_in("Error performing GET http://h/x in 2ms - Server returned non-2xx status code: 503 Service Unavailable: "), Some(503));
        assert_eq!(status_in("no status"), None);
        assert!(backoff(1) >= Duration::from_millis(100) && backoff(30) <= Duration::from_millis(6_250));
    }
}
