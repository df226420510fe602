//! SDK-HMAC-SHA256: Huawei Cloud's AK/SK request signing, both ends of it.
//!
//! In `auth.mode = "aksk"` the upstream client calls [`Credentials::sign`] on every request it
//! sends to CPH, after the caller's own `X-Auth-Token`/`Authorization` have been dropped, so CPH
//! sees our identity and nobody else's. [`verify`] is the gateway's side of the same algorithm;
//! the simulated CPH (`fake_cph`) uses it so tests exercise the signer against an independent
//! check rather than against itself.
//!
//! The algorithm follows the public SDKs (Go `core/auth/signer`, Python `huaweicloudsdkcore`,
//! Java `AKSKSigner`) step by step; `shared/signing-vectors.md` has the steps and the published
//! vectors, and the tests below reproduce every one of them. Where the SDKs disagree on an input we
//! can receive but they never produce (a raw `+` in a query), we follow the Go SDK, whose
//! `url.ParseQuery` reads it as a space. A caller that wants no such ambiguity on the wire sends
//! [`canonical_query`] itself as the query: it decodes to the same pairs under every reading.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http::header::{AUTHORIZATION, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri};
use percent_encoding::{
    AsciiSet, NON_ALPHANUMERIC, percent_decode, percent_decode_str, utf8_percent_encode,
};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The scheme name that opens the `Authorization` header and the string to sign.
pub const ALGORITHM: &str = "SDK-HMAC-SHA256";
/// Request time as `YYYYMMDDTHHMMSSZ`; signed, and checked against the gateway's clock.
pub const X_SDK_DATE: &str = "x-sdk-date";
/// Replaces the body hash when set (e.g. `UNSIGNED-PAYLOAD` for streamed bodies).
pub const X_SDK_CONTENT_SHA256: &str = "x-sdk-content-sha256";
/// Project scope of the request, sent by the SDKs alongside the project in the path.
pub const X_PROJECT_ID: &str = "x-project-id";
/// Session token of temporary (STS) credentials.
pub const X_SECURITY_TOKEN: &str = "x-security-token";
/// The skew the real gateway tolerates before answering APIGW.0303.
pub const MAX_SKEW: Duration = Duration::from_secs(15 * 60);

/// Hash of the empty body, the common case for `GET`.
const EMPTY_BODY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// RFC 3986 unreserved characters stay; every other byte becomes `%XX` (upper-case hex), which is
/// what `percent-encoding` emits. Space is `%20`, never `+`.
const ENCODE_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

type HmacSha256 = Hmac<Sha256>;

/// Key material that must never reach a log line: `Debug` prints `***` and there is no `Display`.
#[derive(Clone)]
struct Secret(Box<[u8]>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// An AK/SK pair, optionally with the security token of temporary credentials.
///
/// The access key is an identifier and is printed; the secret key and token are not.
#[derive(Clone)]
pub struct Credentials {
    access_key: String,
    secret_key: Secret,
    security_token: Option<Secret>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key", &self.access_key)
            .field("secret_key", &self.secret_key)
            .field("security_token", &self.security_token)
            .finish()
    }
}

impl Credentials {
    pub fn new(
        access_key: impl Into<String>,
        secret_key: impl Into<String>,
        security_token: Option<String>,
    ) -> Self {
        Self {
            access_key: access_key.into(),
            secret_key: Secret(secret_key.into().into_bytes().into_boxed_slice()),
            security_token: security_token.map(|t| Secret(t.into_bytes().into_boxed_slice())),
        }
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    /// Sets `X-Sdk-Date` (from `now`), `Host`, `X-Project-Id` (if `project` is `Some`),
    /// `X-Security-Token` (if the credentials carry one), then `Authorization`.
    ///
    /// Signs `host;x-sdk-date`, plus `x-project-id` / `x-security-token` when the request carries
    /// them. The body is hashed unless `X-Sdk-Content-Sha256` is already set, in which case its
    /// value stands in for the hash (e.g. `UNSIGNED-PAYLOAD` for a streamed body).
    ///
    /// `Host` is set from the URI authority even when a `Host` header is present: a header
    /// forwarded from the caller names the sidecar, and the header sent must be the one signed.
    /// Without an authority (origin-form URI) the existing `Host` header is signed as is. A
    /// `X-Security-Token` not issued with these credentials is removed, because the gateway would
    /// otherwise judge the request as a temporary-credential one and reject our signature.
    pub fn sign(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &mut HeaderMap,
        body: &[u8],
        project: Option<&str>,
        now: SystemTime,
    ) -> Result<(), SignError> {
        match authority_host(uri) {
            Some(host) => {
                let value = HeaderValue::from_str(&host)
                    .map_err(|_| SignError::InvalidHeaderValue("host"))?;
                headers.insert(HOST, value);
            }
            None if headers.contains_key(HOST) => {}
            None => return Err(SignError::MissingHost),
        }

        let date = SdkDate::from_system_time(now);
        let date_value = HeaderValue::from_str(date.as_str())
            .map_err(|_| SignError::InvalidHeaderValue(X_SDK_DATE))?;
        headers.insert(X_SDK_DATE, date_value);

        if let Some(project) = project {
            let value = HeaderValue::from_str(project)
                .map_err(|_| SignError::InvalidHeaderValue(X_PROJECT_ID))?;
            headers.insert(X_PROJECT_ID, value);
        }

        match &self.security_token {
            Some(token) => {
                let mut value = HeaderValue::from_bytes(&token.0)
                    .map_err(|_| SignError::InvalidHeaderValue(X_SECURITY_TOKEN))?;
                value.set_sensitive(true);
                headers.insert(X_SECURITY_TOKEN, value);
            }
            None => {
                headers.remove(X_SECURITY_TOKEN);
            }
        }

        let mut signed: Vec<&str> = vec!["host", X_SDK_DATE];
        for optional in [X_PROJECT_ID, X_SECURITY_TOKEN] {
            if headers.contains_key(optional) {
                signed.push(optional);
            }
        }
        signed.sort_unstable();

        let body_hash = payload_hash(headers, body)
            .map_err(|_| SignError::InvalidHeaderValue(X_SDK_CONTENT_SHA256))?;

        let canonical = canonical_request(
            method,
            uri.path(),
            uri.query(),
            headers,
            &signed,
            &body_hash,
        );
        let sig = signature(&self.secret_key.0, &string_to_sign(&date, &canonical));
        let authorization = format!(
            "{ALGORITHM} Access={}, SignedHeaders={}, Signature={sig}",
            self.access_key,
            signed.join(";")
        );
        let mut value = HeaderValue::from_str(&authorization)
            .map_err(|_| SignError::InvalidHeaderValue("authorization"))?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
        Ok(())
    }
}

/// Why a request could not be signed. All are configuration or caller errors, never transient.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("the request URI has no authority and there is no Host header to sign")]
    MissingHost,
    #[error("the value for header `{0}` is not a valid HTTP header value")]
    InvalidHeaderValue(&'static str),
}

/// Why [`verify`] rejected a request. The gateway answers all of them with 401.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("no Authorization header")]
    MissingAuthorization,
    #[error("Authorization is not {ALGORITHM}")]
    UnsupportedAlgorithm,
    #[error("malformed Authorization header: {0}")]
    MalformedAuthorization(&'static str),
    #[error("signed header `{0}` is not in the request")]
    MissingSignedHeader(String),
    #[error("missing or malformed X-Sdk-Date")]
    InvalidDate,
    #[error("X-Sdk-Date is outside the allowed clock skew")]
    ClockSkew,
    #[error("unknown access key")]
    UnknownAccessKey,
    #[error("signature does not match")]
    SignatureMismatch,
}

impl VerifyError {
    /// The `error_code` the real gateway puts in its body for this failure (shared/SPEC.md §1).
    pub fn apigw_code(&self) -> &'static str {
        match self {
            VerifyError::ClockSkew => "APIGW.0303",
            _ => "APIGW.0301",
        }
    }
}

/// A validated `X-Sdk-Date` value: `YYYYMMDDTHHMMSSZ`, UTC, whole seconds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SdkDate(String);

impl SdkDate {
    /// Last second that fits four year digits (9999-12-31T23:59:59Z).
    const MAX_SECS: u64 = 253_402_300_799;

    /// Formats `t` in UTC, truncated to the second. Times outside 1970..=9999 are clamped so this
    /// never fails; a clock that far off is rejected by the gateway's skew check anyway.
    pub fn from_system_time(t: SystemTime) -> SdkDate {
        let secs = t
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .min(Self::MAX_SECS);
        let rfc3339 =
            humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string();
        // "2006-01-02T15:04:05Z" -> "20060102T150405Z"
        SdkDate(rfc3339.chars().filter(|c| *c != '-' && *c != ':').collect())
    }

    /// Accepts exactly `YYYYMMDDTHHMMSSZ` naming a real calendar second from 1970 on (no leap
    /// second, no offset, no fraction).
    pub fn parse(s: &str) -> Option<SdkDate> {
        let b = s.as_bytes();
        let shape_ok = b.len() == 16
            && b[8] == b'T'
            && b[15] == b'Z'
            && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit);
        // humantime accepts second 60 and folds it into 59; we want one spelling per instant.
        if !shape_ok || &s[13..15] > "59" {
            return None;
        }
        let date = SdkDate(s.to_owned());
        date.to_system_time().map(|_| date)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn to_system_time(&self) -> Option<SystemTime> {
        let s = self.0.get(..15)?;
        let rfc3339 = format!(
            "{}-{}-{}T{}:{}:{}Z",
            s.get(0..4)?,
            s.get(4..6)?,
            s.get(6..8)?,
            s.get(9..11)?,
            s.get(11..13)?,
            s.get(13..15)?
        );
        humantime::parse_rfc3339(&rfc3339).ok()
    }
}

impl fmt::Display for SdkDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// CanonicalURI: the path percent-decoded, each `/`-separated segment re-encoded, and a trailing
/// `/` added. Input is the path as sent (it may contain `%XX`); decoding first is what the SDKs do
/// (Go signs `URL.Path`, Python `unquote`s), so `%20` and a literal space sign the same.
pub fn canonical_uri(path: &str) -> String {
    let decoded: Vec<u8> = percent_decode_str(path).collect();
    let mut out = String::with_capacity(decoded.len() + 1);
    for (i, segment) in decoded.split(|b| *b == b'/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.extend(percent_encoding::percent_encode(segment, ENCODE_SET));
    }
    if !out.ends_with('/') {
        out.push('/');
    }
    out
}

/// CanonicalQueryString from the raw query as sent (`None`, `""` and `"?"`-only all give `""`).
///
/// Each `k=v` pair is decoded (`%XX`, and `+` as space like Go's `url.ParseQuery`), then pairs
/// are sorted by decoded key and then decoded value, and each is re-encoded with
/// [`canonical_uri`]'s rules. A key without `=` has an empty value.
pub fn canonical_query(query: Option<&str>) -> String {
    let Some(query) = query else {
        return String::new();
    };
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = query
        .split('&')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            let (k, v) = piece.split_once('=').unwrap_or((piece, ""));
            (form_decode(k), form_decode(v))
        })
        .collect();
    pairs.sort_unstable();

    let mut out = String::with_capacity(query.len() * 2);
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.extend(percent_encoding::percent_encode(k, ENCODE_SET));
        out.push('=');
        out.extend(percent_encoding::percent_encode(v, ENCODE_SET));
    }
    out
}

fn form_decode(s: &str) -> Vec<u8> {
    let plus_as_space = s.replace('+', " ");
    percent_decode(plus_as_space.as_bytes()).collect()
}

/// Encodes a single decoded query key or value the way [`canonical_query`] does.
pub fn encode_component(s: &str) -> String {
    utf8_percent_encode(s, ENCODE_SET).to_string()
}

/// `METHOD\nCanonicalURI\nCanonicalQuery\nCanonicalHeaders\nSignedHeaders\nBodyHash`.
///
/// `signed_headers` must be lower-case and in the order they will appear in `Authorization`
/// (sorted, for anything the gateway should accept). Each contributes one `name:trimmed-value`
/// line per value, values sorted, as the Go SDK does; a header missing from `headers` contributes
/// none, so callers that need it present (as [`verify`] does) check that first.
pub fn canonical_request(
    method: &Method,
    uri_path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    signed_headers: &[&str],
    body_sha256_hex: &str,
) -> String {
    let mut canonical_headers = String::new();
    for name in signed_headers {
        let mut values: Vec<String> = headers
            .get_all(*name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_owned())
            .collect();
        values.sort_unstable();
        for value in values {
            canonical_headers.push_str(name);
            canonical_headers.push(':');
            canonical_headers.push_str(&value);
            canonical_headers.push('\n');
        }
    }
    format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        method.as_str(),
        canonical_uri(uri_path),
        canonical_query(query),
        canonical_headers,
        signed_headers.join(";"),
        body_sha256_hex
    )
}

/// The SDKs' default choice of headers to sign: every header present, lower-cased and sorted,
/// leaving out names containing `_` (which some proxies drop or rewrite on the way).
pub fn signed_header_names(headers: &HeaderMap) -> Vec<&str> {
    let mut names: Vec<&str> = headers
        .keys()
        .map(HeaderName::as_str)
        .filter(|n| !n.contains('_'))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// The body's hash as signed: `X-Sdk-Content-Sha256` when the request carries one (e.g.
/// `UNSIGNED-PAYLOAD`), else the hex SHA-256 of the body.
fn payload_hash(headers: &HeaderMap, body: &[u8]) -> Result<String, http::header::ToStrError> {
    match headers.get(X_SDK_CONTENT_SHA256) {
        Some(value) => Ok(value.to_str()?.trim().to_owned()),
        None => Ok(sha256_hex(body)),
    }
}

/// `SDK-HMAC-SHA256\n{X-Sdk-Date}\n{hex(sha256(canonical_request))}`.
pub fn string_to_sign(date: &SdkDate, canonical_request: &str) -> String {
    format!(
        "{ALGORITHM}\n{}\n{}",
        date.as_str(),
        sha256_hex(canonical_request.as_bytes())
    )
}

/// Lower-case hex of HMAC-SHA256 keyed with the SK bytes.
pub fn signature(secret_key: &[u8], string_to_sign: &str) -> String {
    // HMAC takes keys of any length (RFC 2104 §2 hashes long ones), so the error arm cannot
    // happen; were it ever reached, an empty signature fails closed at the gateway (and in
    // `verify`, which only accepts 64 hex digits) instead of panicking on the request path.
    HmacSha256::new_from_slice(secret_key).map_or_else(
        |_| String::new(),
        |mut mac| {
            mac.update(string_to_sign.as_bytes());
            hex::encode(mac.finalize().into_bytes())
        },
    )
}

/// Lower-case hex SHA-256, as used for the body and the canonical request.
pub fn sha256_hex(data: &[u8]) -> String {
    if data.is_empty() {
        return EMPTY_BODY_SHA256.to_owned();
    }
    hex::encode(Sha256::digest(data))
}

/// True when the request carries an AK/SK signature (which a cache cannot verify locally).
pub fn is_sdk_signed(headers: &HeaderMap) -> bool {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim_start().strip_prefix(ALGORITHM))
        .is_some_and(|rest| rest.starts_with(' '))
}

/// The gateway's check, used by the simulated CPH in tests.
///
/// Parses `Authorization`, looks the SK up by access key, recomputes the signature over the
/// request as received and compares in constant time, and checks `X-Sdk-Date` is within
/// `max_skew` of `now`. `host` and `x-sdk-date` must be among the signed headers (otherwise the
/// date, and so the replay window, would not be authenticated), and every signed header must be
/// present. The host signed is the URI authority when the URI has one (HTTP/2, absolute-form),
/// else the `Host` header.
pub fn verify(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    lookup_sk: impl Fn(&str) -> Option<Vec<u8>>,
    now: SystemTime,
    max_skew: Duration,
) -> Result<(), VerifyError> {
    let authorization = headers
        .get(AUTHORIZATION)
        .ok_or(VerifyError::MissingAuthorization)?
        .to_str()
        .map_err(|_| VerifyError::MalformedAuthorization("not visible ASCII"))?;
    let auth = ParsedAuthorization::parse(authorization)?;

    for required in ["host", X_SDK_DATE] {
        if !auth.signed_headers.contains(&required) {
            return Err(VerifyError::MalformedAuthorization(
                "host and x-sdk-date must be signed",
            ));
        }
    }

    let date = headers
        .get(X_SDK_DATE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| SdkDate::parse(v.trim()))
        .ok_or(VerifyError::InvalidDate)?;
    let signed_at = date.to_system_time().ok_or(VerifyError::InvalidDate)?;
    let skew = now
        .duration_since(signed_at)
        .unwrap_or_else(|ahead| ahead.duration());
    if skew > max_skew {
        return Err(VerifyError::ClockSkew);
    }

    // Sign over the host the request was addressed to: the authority if the URI has one.
    let owned;
    let headers = match authority_host(uri) {
        Some(host) => {
            let mut with_host = headers.clone();
            let value = HeaderValue::from_str(&host)
                .map_err(|_| VerifyError::MissingSignedHeader("host".into()))?;
            with_host.insert(HOST, value);
            owned = with_host;
            &owned
        }
        None => headers,
    };
    if let Some(missing) = auth
        .signed_headers
        .iter()
        .find(|name| !headers.contains_key(**name))
    {
        return Err(VerifyError::MissingSignedHeader((*missing).to_owned()));
    }

    let secret_key = lookup_sk(auth.access_key).ok_or(VerifyError::UnknownAccessKey)?;

    let body_hash = payload_hash(headers, body)
        .map_err(|_| VerifyError::MalformedAuthorization("bad X-Sdk-Content-Sha256"))?;
    let canonical = canonical_request(
        method,
        uri.path(),
        uri.query(),
        headers,
        &auth.signed_headers,
        &body_hash,
    );
    let expected = signature(&secret_key, &string_to_sign(&date, &canonical));

    if bool::from(expected.as_bytes().ct_eq(auth.signature.as_bytes())) {
        Ok(())
    } else {
        Err(VerifyError::SignatureMismatch)
    }
}

/// `SDK-HMAC-SHA256 Access=AK, SignedHeaders=a;b, Signature=hex`, borrowed from the header.
struct ParsedAuthorization<'a> {
    access_key: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

impl<'a> ParsedAuthorization<'a> {
    fn parse(value: &'a str) -> Result<Self, VerifyError> {
        let rest = value
            .trim()
            .strip_prefix(ALGORITHM)
            .filter(|rest| rest.starts_with(' '))
            .ok_or(VerifyError::UnsupportedAlgorithm)?;

        let (mut access_key, mut signed_headers, mut signature) = (None, None, None);
        for part in rest.split(',') {
            let (key, val) = part
                .trim()
                .split_once('=')
                .ok_or(VerifyError::MalformedAuthorization("expected key=value"))?;
            let slot = match key {
                "Access" => &mut access_key,
                "SignedHeaders" => &mut signed_headers,
                "Signature" => &mut signature,
                _ => return Err(VerifyError::MalformedAuthorization("unknown field")),
            };
            if slot.replace(val).is_some() {
                return Err(VerifyError::MalformedAuthorization("repeated field"));
            }
        }

        let access_key = access_key
            .filter(|ak| !ak.is_empty())
            .ok_or(VerifyError::MalformedAuthorization("missing Access"))?;
        let signed_headers: Vec<&str> = signed_headers
            .ok_or(VerifyError::MalformedAuthorization("missing SignedHeaders"))?
            .split(';')
            .collect();
        if signed_headers
            .iter()
            .any(|h| h.is_empty() || h.contains('_') || h.bytes().any(|b| b.is_ascii_uppercase()))
        {
            return Err(VerifyError::MalformedAuthorization("bad SignedHeaders"));
        }
        // Exactly 64 lower-case hex digits: also keeps an empty signature from ever matching.
        let signature = signature
            .filter(|s| s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .ok_or(VerifyError::MalformedAuthorization(
                "Signature must be 64 lower-case hex digits",
            ))?;

        Ok(Self {
            access_key,
            signed_headers,
            signature,
        })
    }
}

/// Host as signed: the URI authority's host, with the port only when it is not the scheme's
/// default (that is also how hyper fills in `Host`). `None` for an origin-form URI.
fn authority_host(uri: &Uri) -> Option<String> {
    let authority = uri.authority()?;
    let host = authority.host();
    let default_port = match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    };
    Some(match authority.port_u16() {
        Some(port) if Some(port) != default_port => format!("{host}:{port}"),
        _ => host.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const AK: &str = "AccessKey";
    const SK: &str = "SecretKey";

    fn date(s: &str) -> SdkDate {
        SdkDate::parse(s).unwrap()
    }

    fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    /// Runs one published vector through the public pieces; returns (canonical request, signature).
    fn vector(
        method: Method,
        url: &str,
        headers: &HeaderMap,
        body: &[u8],
        sk: &str,
        signed_headers: &[&str],
    ) -> (String, String) {
        let uri: Uri = url.parse().unwrap();
        let date = date(headers.get(X_SDK_DATE).unwrap().to_str().unwrap());
        let canonical = canonical_request(
            &method,
            uri.path(),
            uri.query(),
            headers,
            signed_headers,
            &sha256_hex(body),
        );
        let sig = signature(sk.as_bytes(), &string_to_sign(&date, &canonical));
        (canonical, sig)
    }

    #[test]
    fn vector_a_go_sdk_get_underscore_header_skipped() {
        let headers = header_map(&[
            ("X-Sdk-Date", "20060102T150405Z"),
            ("TEST_UNDERSCORE", "TEST_VALUE"),
        ]);
        let signed = signed_header_names(&headers);
        assert_eq!(signed, ["x-sdk-date"]);
        let (canonical, sig) = vector(
            Method::GET,
            "https://example.huaweicloud.com/path?limit=1",
            &headers,
            b"",
            SK,
            &signed,
        );
        assert_eq!(
            canonical,
            "GET\n/path/\nlimit=1\nx-sdk-date:20060102T150405Z\n\nx-sdk-date\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sig,
            "5a2ce64c865e0e6046321c6f3d5a77ba8413eeaf355c3166c03d58d02ac79624"
        );
    }

    #[test]
    fn vector_b_go_sdk_post_with_body() {
        let headers = header_map(&[
            ("X-Sdk-Date", "20060102T150405Z"),
            ("Content-Type", "application/json"),
        ]);
        let (_, sig) = vector(
            Method::POST,
            "https://example.huaweicloud.com/path?key=value",
            &headers,
            b"{\"Name\":\"test\",\"Id\":1}\n",
            SK,
            &["x-sdk-date"],
        );
        assert_eq!(
            sig,
            "cecc2af119b18ab70b4d094c0750f3b42c02f254903179a0fc2cc72fc9db4f59"
        );
    }

    #[test]
    fn vector_c_python_sdk_get() {
        let headers = header_map(&[
            ("X-Sdk-Date", "20200608T023900Z"),
            ("Host", "service.endpoint.myhuaweicloud.com"),
        ]);
        let (_, sig) = vector(
            Method::GET,
            "https://service.endpoint.myhuaweicloud.com/resources?size=1",
            &headers,
            b"",
            SK,
            &["host", "x-sdk-date"],
        );
        assert_eq!(
            sig,
            "cfb4171acec81de07d50e53d57eb77edd537414d66ddb1d7d780f128e12cd842"
        );
    }

    #[test]
    fn vector_c_through_sign() {
        // The same vector end to end: sign() derives Host from the URI and the date from `now`.
        let creds = Credentials::new(AK, SK, None);
        let uri: Uri = "https://service.endpoint.myhuaweicloud.com/resources?size=1"
            .parse()
            .unwrap();
        let mut headers = HeaderMap::new();
        let now = date("20200608T023900Z").to_system_time().unwrap();
        creds
            .sign(&Method::GET, &uri, &mut headers, b"", None, now)
            .unwrap();
        assert_eq!(headers[HOST], "service.endpoint.myhuaweicloud.com");
        assert_eq!(headers[X_SDK_DATE], "20200608T023900Z");
        assert_eq!(
            headers[AUTHORIZATION],
            "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=host;x-sdk-date, \
             Signature=cfb4171acec81de07d50e53d57eb77edd537414d66ddb1d7d780f128e12cd842"
        );
    }

    #[test]
    fn vector_d_python_sdk_post() {
        let headers = header_map(&[
            ("X-Sdk-Date", "20200608T023900Z"),
            ("Host", "service.endpoint.myhuaweicloud.com"),
        ]);
        let (_, sig) = vector(
            Method::POST,
            "https://service.endpoint.myhuaweicloud.com/resources?size=1",
            &headers,
            b"{\"name\":\"test\",\"id\":1}",
            SK,
            &["host", "x-sdk-date"],
        );
        assert_eq!(
            sig,
            "436b1ac0a1ae03705934bb70ef2f2e09f7bfed2117d731a38235053199323a1f"
        );

        let creds = Credentials::new(AK, SK, None);
        let uri: Uri = "https://service.endpoint.myhuaweicloud.com/resources?size=1"
            .parse()
            .unwrap();
        let mut signed = HeaderMap::new();
        let now = date("20200608T023900Z").to_system_time().unwrap();
        creds
            .sign(
                &Method::POST,
                &uri,
                &mut signed,
                b"{\"name\":\"test\",\"id\":1}",
                None,
                now,
            )
            .unwrap();
        assert!(signed[AUTHORIZATION].to_str().unwrap().ends_with(&sig));
    }

    #[test]
    fn vector_e_signing_guide() {
        let headers = header_map(&[
            ("content-type", "application/json"),
            ("host", "service.region.example.com"),
            ("x-sdk-date", "20191115T033655Z"),
        ]);
        let signed = signed_header_names(&headers);
        assert_eq!(signed, ["content-type", "host", "x-sdk-date"]);
        let (canonical, sig) = vector(
            Method::GET,
            "https://service.region.example.com/v1/77b6a44cba5143ab91d13ab9a8ff44fd/vpcs\
             ?limit=2&marker=13551d6b-755d-4757-b956-536f674975c0",
            &headers,
            b"",
            "MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc",
            &signed,
        );
        assert_eq!(
            sha256_hex(canonical.as_bytes()),
            "b25362e603ee30f4f25e7858e8a7160fd36e803bb2dfe206278659d71a9bcd7a"
        );
        assert_eq!(
            sig,
            "7be6668032f70418fcc22abc52071e57aff61b84a1d2381bb430d6870f4f6ebe"
        );
    }

    #[test]
    fn vector_f_query_canonicalisation() {
        let expected = "enable=true&limit=1&multi=1&multi=2&multi=3&path=%2Ftmp%2F123\
                        &test=%E4%B8%80%20%28%26%3D%3F%21%23%25.%2A%29";
        // Built from the decoded parameters, in an unsorted order...
        let params = [
            ("limit", "1"),
            ("enable", "true"),
            ("test", "一 (&=?!#%.*)"),
            ("path", "/tmp/123"),
            ("multi", "3"),
            ("multi", "1"),
            ("multi", "2"),
        ];
        let raw: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{}={}", encode_component(k), encode_component(v)))
            .collect();
        assert_eq!(canonical_query(Some(&raw.join("&"))), expected);
        // ...and from the looser spelling a browser or curl would send.
        let loose = "limit=1&enable=true&test=%E4%B8%80+(%26%3D%3F!%23%25.*)&path=/tmp/123&multi=1&multi=2&multi=3";
        assert_eq!(canonical_query(Some(loose)), expected);
    }

    #[test]
    fn canonical_query_edge_cases() {
        assert_eq!(canonical_query(None), "");
        assert_eq!(canonical_query(Some("")), "");
        assert_eq!(canonical_query(Some("&&")), "");
        assert_eq!(canonical_query(Some("flag&a=")), "a=&flag=");
        assert_eq!(canonical_query(Some("b=2&a=1&b=1")), "a=1&b=1&b=2");
        assert_eq!(canonical_query(Some("x=a%2Bb&y=a+b")), "x=a%2Bb&y=a%20b");
        assert_eq!(canonical_query(Some("k=%7E~")), "k=~~");
    }

    #[test]
    fn canonical_uri_rules() {
        assert_eq!(canonical_uri(""), "/");
        assert_eq!(canonical_uri("/"), "/");
        assert_eq!(canonical_uri("/path"), "/path/");
        assert_eq!(canonical_uri("/path/"), "/path/");
        assert_eq!(
            canonical_uri("/v1/p/cloud-phone/phone-images"),
            "/v1/p/cloud-phone/phone-images/"
        );
        assert_eq!(canonical_uri("/a b/c%20d/é"), "/a%20b/c%20d/%C3%A9/");
        assert_eq!(canonical_uri("/a~b_c.d-e*"), "/a~b_c.d-e%2A/");
    }

    #[test]
    fn host_port_only_when_not_default() {
        let host = |s: &str| authority_host(&s.parse().unwrap());
        assert_eq!(
            host("https://cph.example.com:443/x").as_deref(),
            Some("cph.example.com")
        );
        assert_eq!(
            host("http://cph.example.com:80/x").as_deref(),
            Some("cph.example.com")
        );
        assert_eq!(
            host("https://cph.example.com:8443/x").as_deref(),
            Some("cph.example.com:8443")
        );
        assert_eq!(
            host("http://127.0.0.1:39001/x").as_deref(),
            Some("127.0.0.1:39001")
        );
        assert_eq!(host("http://[::1]:39001/x").as_deref(), Some("[::1]:39001"));
        assert_eq!(host("/x"), None);
    }

    #[test]
    fn sdk_date_format_and_parse() {
        let t = UNIX_EPOCH + Duration::from_secs(1_136_214_245); // 2006-01-02T15:04:05Z
        let d = SdkDate::from_system_time(t + Duration::from_millis(999));
        assert_eq!(d.as_str(), "20060102T150405Z");
        assert_eq!(d.to_system_time(), Some(t));
        assert_eq!(SdkDate::parse("20060102T150405Z"), Some(d));
        assert_eq!(
            SdkDate::from_system_time(UNIX_EPOCH - Duration::from_secs(5)).as_str(),
            "19700101T000000Z"
        );
        assert_eq!(
            SdkDate::parse("20240229T235959Z").map(|d| d.0),
            Some("20240229T235959Z".into())
        );
        for bad in [
            "",
            "20060102T150405",
            "20060102 150405Z",
            "2006-01-02T15:04:05Z",
            "20230229T000000Z",
            "20061301T000000Z",
            "20060102T240000Z",
            "20060102T150460Z",
            "19691231T235959Z",
            "2006010２T150405Z",
            "+0060102T150405Z",
        ] {
            assert_eq!(SdkDate::parse(bad), None, "{bad}");
        }
    }

    fn lookup(ak: &str) -> Option<Vec<u8>> {
        (ak == AK).then(|| SK.as_bytes().to_vec())
    }

    /// What the fake CPH sees: origin-form URI, Host header as hyper sent it.
    fn signed_request(creds: &Credentials, now: SystemTime) -> (Uri, HeaderMap) {
        let uri: Uri = "http://127.0.0.1:39001/v1/0123456789abcdef0123456789abcdef/cloud-phone/phone-images?image_type=private"
            .parse()
            .unwrap();
        let mut headers = header_map(&[("accept", "application/json")]);
        creds
            .sign(
                &Method::GET,
                &uri,
                &mut headers,
                b"",
                Some("0123456789abcdef0123456789abcdef"),
                now,
            )
            .unwrap();
        let origin_form: Uri = uri.path_and_query().unwrap().as_str().parse().unwrap();
        (origin_form, headers)
    }

    #[test]
    fn sign_then_verify_roundtrip() {
        let now = SystemTime::now();
        let (uri, headers) = signed_request(&Credentials::new(AK, SK, None), now);
        assert_eq!(headers[HOST], "127.0.0.1:39001");
        assert_eq!(headers[X_PROJECT_ID], "0123456789abcdef0123456789abcdef");
        assert!(
            headers[AUTHORIZATION]
                .to_str()
                .unwrap()
                .starts_with("SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=host;x-project-id;x-sdk-date, Signature=")
        );
        assert!(is_sdk_signed(&headers));
        assert_eq!(
            verify(&Method::GET, &uri, &headers, b"", lookup, now, MAX_SKEW),
            Ok(())
        );
        // Absolute-form on the server side signs the same host.
        let absolute: Uri = format!("http://127.0.0.1:39001{uri}").parse().unwrap();
        assert_eq!(
            verify(
                &Method::GET,
                &absolute,
                &headers,
                b"",
                lookup,
                now,
                MAX_SKEW
            ),
            Ok(())
        );
    }

    #[test]
    fn roundtrip_with_security_token_and_body() {
        let creds = Credentials::new(AK, SK, Some("sts-token".into()));
        let uri: Uri =
            "https://cph.cn-east-3.myhuaweicloud.com/v1/p/cloud-phone/phones/batch-restart"
                .parse()
                .unwrap();
        let mut headers = header_map(&[("x-security-token", "stale")]);
        let now = SystemTime::now();
        let body = br#"{"phones":[{"phone_id":"x"}]}"#;
        creds
            .sign(&Method::POST, &uri, &mut headers, body, None, now)
            .unwrap();
        assert_eq!(headers[X_SECURITY_TOKEN], "sts-token");
        assert!(
            headers[AUTHORIZATION]
                .to_str()
                .unwrap()
                .contains("SignedHeaders=host;x-sdk-date;x-security-token,")
        );
        assert_eq!(
            verify(&Method::POST, &uri, &headers, body, lookup, now, MAX_SKEW),
            Ok(())
        );
        assert_eq!(
            verify(&Method::POST, &uri, &headers, b"{}", lookup, now, MAX_SKEW),
            Err(VerifyError::SignatureMismatch)
        );
        assert_eq!(
            verify(&Method::PUT, &uri, &headers, body, lookup, now, MAX_SKEW),
            Err(VerifyError::SignatureMismatch)
        );

        // Without a token of our own, a caller's token is not sent along unsigned.
        let mut headers = header_map(&[("x-security-token", "theirs")]);
        Credentials::new(AK, SK, None)
            .sign(&Method::GET, &uri, &mut headers, b"", None, now)
            .unwrap();
        assert!(!headers.contains_key(X_SECURITY_TOKEN));
    }

    #[test]
    fn unsigned_payload_uses_header_value() {
        let uri: Uri = "https://cph.example.com/v1/p/upload".parse().unwrap();
        let mut headers = header_map(&[("x-sdk-content-sha256", "UNSIGNED-PAYLOAD")]);
        let now = SystemTime::now();
        Credentials::new(AK, SK, None)
            .sign(&Method::PUT, &uri, &mut headers, b"streamed", None, now)
            .unwrap();
        // The body is not covered, so any body verifies; the header itself is what was hashed.
        assert_eq!(
            verify(
                &Method::PUT,
                &uri,
                &headers,
                b"other",
                lookup,
                now,
                MAX_SKEW
            ),
            Ok(())
        );
    }

    #[test]
    fn wrong_secret_key_fails() {
        let now = SystemTime::now();
        let (uri, headers) = signed_request(&Credentials::new(AK, "NotTheSecretKey", None), now);
        assert_eq!(
            verify(&Method::GET, &uri, &headers, b"", lookup, now, MAX_SKEW),
            Err(VerifyError::SignatureMismatch)
        );
        let (uri, headers) = signed_request(&Credentials::new("OtherKey", SK, None), now);
        assert_eq!(
            verify(&Method::GET, &uri, &headers, b"", lookup, now, MAX_SKEW),
            Err(VerifyError::UnknownAccessKey)
        );
    }

    #[test]
    fn tampered_request_fails() {
        let now = SystemTime::now();
        let (uri, mut headers) = signed_request(&Credentials::new(AK, SK, None), now);
        let other: Uri =
            "/v1/0123456789abcdef0123456789abcdef/cloud-phone/phone-images?image_type=public"
                .parse()
                .unwrap();
        assert_eq!(
            verify(&Method::GET, &other, &headers, b"", lookup, now, MAX_SKEW),
            Err(VerifyError::SignatureMismatch)
        );
        headers.insert(HOST, HeaderValue::from_static("evil.example.com"));
        assert_eq!(
            verify(&Method::GET, &uri, &headers, b"", lookup, now, MAX_SKEW),
            Err(VerifyError::SignatureMismatch)
        );
        headers.remove(X_PROJECT_ID);
        assert_eq!(
            verify(&Method::GET, &uri, &headers, b"", lookup, now, MAX_SKEW),
            Err(VerifyError::MissingSignedHeader("x-project-id".into()))
        );
    }

    #[test]
    fn clock_skew_beyond_fifteen_minutes_fails() {
        let signed_at = SystemTime::now();
        let (uri, headers) = signed_request(&Credentials::new(AK, SK, None), signed_at);
        let ok = |now| verify(&Method::GET, &uri, &headers, b"", lookup, now, MAX_SKEW);
        // Second truncation of X-Sdk-Date costs up to a second, hence the margins.
        assert_eq!(ok(signed_at + MAX_SKEW - Duration::from_secs(1)), Ok(()));
        assert_eq!(ok(signed_at - MAX_SKEW + Duration::from_secs(1)), Ok(()));
        assert_eq!(
            ok(signed_at + MAX_SKEW + Duration::from_secs(2)),
            Err(VerifyError::ClockSkew)
        );
        assert_eq!(
            ok(signed_at - MAX_SKEW - Duration::from_secs(2)),
            Err(VerifyError::ClockSkew)
        );
        assert_eq!(VerifyError::ClockSkew.apigw_code(), "APIGW.0303");
        assert_eq!(VerifyError::SignatureMismatch.apigw_code(), "APIGW.0301");
    }

    #[test]
    fn malformed_authorization_is_rejected() {
        let now = SystemTime::now();
        let (uri, headers) = signed_request(&Credentials::new(AK, SK, None), now);
        let with_auth = |value: &str| {
            let mut h = headers.clone();
            h.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            verify(&Method::GET, &uri, &h, b"", lookup, now, MAX_SKEW)
        };
        let sig = "0".repeat(64);
        assert_eq!(
            with_auth("Bearer abc"),
            Err(VerifyError::UnsupportedAlgorithm)
        );
        assert_eq!(
            with_auth("SDK-HMAC-SHA256X Access=a"),
            Err(VerifyError::UnsupportedAlgorithm)
        );
        assert!(matches!(
            with_auth(
                "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=host;x-sdk-date, Signature="
            ),
            Err(VerifyError::MalformedAuthorization(_))
        ));
        assert!(matches!(
            with_auth(&format!(
                "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=host, Signature={sig}"
            )),
            Err(VerifyError::MalformedAuthorization(_))
        ));
        assert!(matches!(
            with_auth(&format!(
                "SDK-HMAC-SHA256 Access=AccessKey, Access=x, SignedHeaders=host;x-sdk-date, Signature={sig}"
            )),
            Err(VerifyError::MalformedAuthorization(_))
        ));
        assert_eq!(
            with_auth(&format!(
                "SDK-HMAC-SHA256 Access=AccessKey, SignedHeaders=host;x-sdk-date, Signature={sig}"
            )),
            Err(VerifyError::SignatureMismatch)
        );
        let mut bearer = headers.clone();
        bearer.insert(AUTHORIZATION, HeaderValue::from_static("Bearer abc"));
        assert!(!is_sdk_signed(&bearer));
        let mut no_auth = headers.clone();
        no_auth.remove(AUTHORIZATION);
        assert!(!is_sdk_signed(&no_auth));
        assert_eq!(
            verify(&Method::GET, &uri, &no_auth, b"", lookup, now, MAX_SKEW),
            Err(VerifyError::MissingAuthorization)
        );
        let mut bad_date = headers.clone();
        bad_date.insert(X_SDK_DATE, HeaderValue::from_static("2006-01-02T15:04:05Z"));
        assert_eq!(
            verify(&Method::GET, &uri, &bad_date, b"", lookup, now, MAX_SKEW),
            Err(VerifyError::InvalidDate)
        );
    }

    #[test]
    fn sign_needs_a_host_and_valid_values() {
        let creds = Credentials::new(AK, SK, None);
        let origin: Uri = "/v1/p/cloud-phone/phone-images".parse().unwrap();
        let now = SystemTime::now();
        assert!(matches!(
            creds.sign(&Method::GET, &origin, &mut HeaderMap::new(), b"", None, now),
            Err(SignError::MissingHost)
        ));
        let mut with_host = header_map(&[("host", "cph.example.com")]);
        creds
            .sign(&Method::GET, &origin, &mut with_host, b"", None, now)
            .unwrap();
        assert_eq!(
            verify(
                &Method::GET,
                &origin,
                &with_host,
                b"",
                lookup,
                now,
                MAX_SKEW
            ),
            Ok(())
        );

        let absolute: Uri = "https://cph.example.com/v1/p/cloud-phone/phone-images"
            .parse()
            .unwrap();
        assert!(matches!(
            creds.sign(
                &Method::GET,
                &absolute,
                &mut HeaderMap::new(),
                b"",
                Some("bad\nproject"),
                now
            ),
            Err(SignError::InvalidHeaderValue(_))
        ));
        // A forwarded Host naming the sidecar is replaced by the one actually signed.
        let mut forwarded = header_map(&[("host", "127.0.0.1:8080")]);
        creds
            .sign(&Method::GET, &absolute, &mut forwarded, b"", None, now)
            .unwrap();
        assert_eq!(forwarded[HOST], "cph.example.com");
    }

    #[test]
    fn debug_hides_secrets() {
        let creds = Credentials::new(AK, "VerySecretKey123", Some("TokenValue456".into()));
        let debug = format!("{creds:?}");
        assert!(debug.contains("AccessKey"), "{debug}");
        assert!(debug.contains("***"), "{debug}");
        assert!(!debug.contains("VerySecretKey123"), "{debug}");
        assert!(!debug.contains("TokenValue456"), "{debug}");
        assert_eq!(creds.access_key(), AK);

        let uri: Uri = "https://cph.example.com/x".parse().unwrap();
        let mut headers = HeaderMap::new();
        creds
            .sign(
                &Method::GET,
                &uri,
                &mut headers,
                b"",
                None,
                SystemTime::now(),
            )
            .unwrap();
        assert!(headers[AUTHORIZATION].is_sensitive());
        assert!(headers[X_SECURITY_TOKEN].is_sensitive());
    }
}
