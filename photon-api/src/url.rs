//! Store URLs: the one parser every backend and tool reads its connection string with.
//!
//! A backend URL is `scheme://[user[:password]@]host[:port][,host[:port]...][/path][?k=v&...]`.
//! The `url` crate parses each host (IPv4, IPv6 in brackets, names) and the path; this module adds
//! what it does not know: several comma-separated hosts, options with typed getters whose errors
//! name the option and the rule, a refusal of unknown options that lists the known ones, and
//! credentials that never reach `Debug`, `Display` or an error message.
//!
//! Which scheme belongs to which backend is each backend crate's `SCHEMES`; which cargo feature
//! compiles it in is newton's business (it owns the features).

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use percent_encoding::percent_decode_str;

use crate::error::Error;

/// One `host[:port]` of a URL.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct HostPort {
    /// The host as written: a name, an IPv4 address, or an IPv6 address in brackets.
    pub host: String,
    /// The port, when one was given.
    pub port: Option<u16>,
}

impl HostPort {
    /// `host:port`, with `default_port` when the URL gave none; the form drivers take.
    pub fn with_default_port(&self, default_port: u16) -> String {
        format!("{}:{}", self.host, self.port.unwrap_or(default_port))
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

/// A parsed store URL.
///
/// Options are read with the typed getters ([`StoreUrl::bool_option`],
/// [`StoreUrl::number_option`], ...), whose errors name the URL (without its password), the
/// option and the rule; [`StoreUrl::check_options`] refuses the ones a backend does not know.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreUrl {
    what: &'static str,
    scheme: String,
    username: Option<String>,
    password: Option<String>,
    hosts: Vec<HostPort>,
    path: String,
    /// Decoded `(key, value)` pairs, in URL order.
    options: Vec<(String, String)>,
    /// The same pairs as written, for [`StoreUrl::to_string_keeping`].
    raw_options: Vec<String>,
    /// Everything before `?`, as written (credentials included).
    raw_base: String,
}

impl StoreUrl {
    /// Parses `url`, whose scheme must be one of `schemes`; `what` names the URL in errors
    /// (e.g. `"Kafka URL"`).
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for another scheme, a malformed host or port, or a part that is
    ///   not percent-encoded UTF-8.
    ///   (An option given twice is refused by [`StoreUrl::check_options`], since some drivers'
    ///   own options may repeat.)
    pub fn parse(url: &str, what: &'static str, schemes: &[&str]) -> Result<Self, Error> {
        let shown = redact(url);
        let invalid = |reason: String| Error::InvalidInput {
            what: format!("{what} {shown:?}"),
            reason,
        };
        let wanted = || {
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(" or ")
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid(format!("must start with {}", wanted())))?;
        let scheme = scheme.to_ascii_lowercase();
        if !schemes.contains(&scheme.as_str()) {
            return Err(invalid(format!("must start with {}", wanted())));
        }
        let (before_query, query) = rest.split_at(query_start(rest));
        let query = query.strip_prefix('?').unwrap_or(query);
        // Credentials end at the last '@' before the query, so a password holding an unencoded
        // '/', '#' or '@' still parses (and is still hidden) as the old parsers allowed.
        let (userinfo, after_userinfo) = split_userinfo(before_query);
        let authority_end = after_userinfo.find('/').unwrap_or(after_userinfo.len());
        let (host_list, path) = after_userinfo.split_at(authority_end);
        // Errors name the part, never its value: it may be a password.
        let decode = |s: &str, part: &str| -> Result<String, Error> {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| invalid(format!("the {part} is not percent-encoded UTF-8")))
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => {
                let (user, password) = match u.split_once(':') {
                    Some((user, password)) => (user, Some(decode(password, "password")?)),
                    None => (u, None),
                };
                (Some(decode(user, "user name")?), password)
            }
        };
        let hosts = if host_list.is_empty() {
            Vec::new()
        } else {
            host_list
                .split(',')
                .map(|h| {
                    parse_host(h.trim()).map_err(|reason| {
                        // What was read as a host may be the start of a password holding '?'.
                        invalid(if ambiguous(url) {
                            AMBIGUOUS.to_owned()
                        } else {
                            reason
                        })
                    })
                })
                .collect::<Result<_, _>>()?
        };
        let path = decode(path.strip_prefix('/').unwrap_or(path), "path")?;
        let mut options: Vec<(String, String)> = Vec::new();
        let mut raw_options = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = decode(key, "name of an option")?;
            let value = decode(value, &format!("value of option {key}"))?;
            options.push((key, value));
            raw_options.push(pair.to_owned());
        }
        Ok(Self {
            what,
            scheme,
            username,
            password,
            hosts,
            path,
            options,
            raw_options,
            raw_base: format!(
                "{}://{before_query}",
                url.split_once("://").map_or("", |p| p.0)
            ),
        })
    }

    /// The scheme, lower-cased.
    pub fn scheme(&self) -> &str {
        &self.scheme
    }

    /// The hosts, in URL order; empty when the URL names none (`memory://`).
    pub fn hosts(&self) -> &[HostPort] {
        &self.hosts
    }

    /// Each host as `host:port`, with `default_port` where none was given.
    pub fn host_ports(&self, default_port: u16) -> Vec<String> {
        self.hosts
            .iter()
            .map(|h| h.with_default_port(default_port))
            .collect()
    }

    /// The percent-decoded path without its leading `/` (a database or keyspace); empty when
    /// there is none.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The percent-decoded user name, when the URL has `user@`.
    pub fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    /// The percent-decoded password, when the URL has `user:password@`. Never log it.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Every option as `(key, value)`, decoded, in URL order.
    pub fn options(&self) -> impl Iterator<Item = (&str, &str)> {
        self.options.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The value of option `name`, when given (checked options are given at most once).
    pub fn option(&self, name: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Refuses options outside `known`, and any option given twice; an entry ending in `*`
    /// admits every name with that prefix (`rdkafka.*`).
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] naming the first unknown or repeated option and listing the
    ///   known ones.
    pub fn check_options(&self, known: &[&str]) -> Result<(), Error> {
        self.check_options_matching(|_| true, known)
    }

    /// As [`StoreUrl::check_options`], for the options whose key `ours` accepts only: a backend
    /// whose URL also carries its driver's options (which the driver checks) checks its own.
    ///
    /// # Errors
    /// - As [`StoreUrl::check_options`].
    pub fn check_options_matching(
        &self,
        ours: impl Fn(&str) -> bool,
        known: &[&str],
    ) -> Result<(), Error> {
        let is_known = |key: &str| {
            known.iter().any(|k| match k.strip_suffix('*') {
                Some(prefix) => key.starts_with(prefix) && key.len() > prefix.len(),
                None => *k == key,
            })
        };
        let checked = self.options.iter().map(|(k, _)| k).filter(|k| ours(k));
        for (i, key) in checked.clone().enumerate() {
            if !is_known(key) {
                return Err(self.invalid(format!(
                    "unknown option {key:?}; known options are {}",
                    known.join(", ")
                )));
            }
            if checked.clone().skip(i + 1).any(|k| k == key) {
                return Err(self.invalid(format!("option {key} is given twice")));
            }
        }
        Ok(())
    }

    /// Option `name` read by `parse`, which returns None for a value breaking `rule` (the
    /// error's wording, e.g. "must be a letter then up to 47 of A-Z a-z 0-9 _").
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] naming the option, the rule and the value given.
    pub fn parsed_option<T>(
        &self,
        name: &str,
        rule: &str,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, Error> {
        match self.option(name) {
            None => Ok(None),
            Some(value) => parse(value)
                .map(Some)
                .ok_or_else(|| self.invalid(format!("{name} {rule}, got {value:?}"))),
        }
    }

    /// Option `name` as `true` or `false`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] for any other value.
    pub fn bool_option(&self, name: &str) -> Result<Option<bool>, Error> {
        self.parsed_option(name, "must be true or false", |v| match v {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        })
    }

    /// Option `name` as a whole number within `range`.
    ///
    /// # Errors
    /// - [`Error::InvalidInput`] naming the range for a value outside it or not a number.
    pub fn number_option<T>(&self, name: &str, range: RangeInclusive<T>) -> Result<Option<T>, Error>
    where
        T: FromStr + PartialOrd + fmt::Display,
    {
        let rule = format!(
            "must be a whole number from {} to {}",
            range.start(),
            range.end()
        );
        self.parsed_option(name, &rule, |v| {
            v.parse::<T>().ok().filter(|n| range.contains(n))
        })
    }

    /// Option `name` as milliseconds within `range`.
    ///
    /// # Errors
    /// - As [`StoreUrl::number_option`].
    pub fn millis_option(
        &self,
        name: &str,
        range: RangeInclusive<u64>,
    ) -> Result<Option<Duration>, Error> {
        Ok(self.number_option(name, range)?.map(Duration::from_millis))
    }

    /// An [`Error::InvalidInput`] naming this URL (without its password) and `reason`.
    pub fn invalid(&self, reason: impl Into<String>) -> Error {
        Error::InvalidInput {
            what: format!("{} {:?}", self.what, self.to_string()),
            reason: reason.into(),
        }
    }

    /// The URL as written, credentials included, keeping only the options `keep` accepts: the
    /// string to hand a driver that parses its own options. Treat it as a secret.
    pub fn to_string_keeping(&self, keep: impl Fn(&str) -> bool) -> String {
        let kept: Vec<&str> = self
            .options
            .iter()
            .zip(&self.raw_options)
            .filter(|((k, _), _)| keep(k))
            .map(|(_, raw)| raw.as_str())
            .collect();
        let base = encode_userinfo(&self.raw_base);
        if kept.is_empty() {
            base
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    }
}

impl StoreUrl {
    /// `text` with every secret of this URL replaced by `***`, for a driver's error that may
    /// quote what it was handed: the password and each secret option's value
    /// ([`is_secret_option`]), decoded and as written, and each comma-separated entry of such a
    /// value and the part of an entry after its first `:` or `=` (a driver that refuses one
    /// entry of `authMechanismProperties=SERVICE_NAME:x,AWS_SESSION_TOKEN:...` quotes that
    /// entry alone). Parts shorter than 3 characters are left, so that a `:x` does not turn
    /// every `x` of the text into `***`; whole values are replaced whatever their length.
    pub fn hide_secrets(&self, text: &str) -> String {
        let raw_password = self
            .raw_base
            .split_once("://")
            .and_then(|(_, rest)| split_userinfo(rest).0)
            .and_then(|userinfo| userinfo.split_once(':'))
            .map(|(_, password)| password);
        let mut whole: Vec<&str> = self.password.iter().map(String::as_str).collect();
        whole.extend(raw_password);
        let mut parts = Vec::new();
        for ((key, value), raw) in self.options.iter().zip(&self.raw_options) {
            if !is_secret_option(key) {
                continue;
            }
            let raw_value = raw.split_once('=').map_or("", |(_, v)| v);
            for value in [value.as_str(), raw_value] {
                whole.push(value);
                for entry in value.split(',') {
                    parts.push(entry);
                    parts.extend(entry.split_once([':', '=']).map(|(_, v)| v));
                }
            }
        }
        parts.retain(|p| p.len() >= 3);
        let mut secrets: Vec<&str> = whole.into_iter().chain(parts).collect();
        secrets.retain(|s| !s.is_empty());
        // Longest first, so a secret holding a shorter one is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        let mut out = text.to_owned();
        for secret in secrets {
            out = out.replace(secret, "***");
        }
        out
    }
}

/// The URL with its password shown as `***`; secret-looking option values too.
impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.scheme)?;
        if let Some(user) = &self.username {
            f.write_str(user)?;
            if self.password.is_some() {
                f.write_str(":***")?;
            }
            f.write_str("@")?;
        }
        let hosts: Vec<String> = self.hosts.iter().map(ToString::to_string).collect();
        f.write_str(&hosts.join(","))?;
        if !self.path.is_empty() {
            write!(f, "/{}", self.path)?;
        }
        for (i, (k, v)) in self.options.iter().enumerate() {
            let v = if is_secret_option(k) { "***" } else { v };
            write!(f, "{}{k}={v}", if i == 0 { '?' } else { '&' })?;
        }
        Ok(())
    }
}

impl fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("StoreUrl").field(&self.to_string()).finish()
    }
}

/// Whether an option's value is a secret (a password, a key, a token), hidden wherever the URL
/// is shown.
pub fn is_secret_option(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "passphrase",
        "secret",
        "pem",
        "token",
        "jaas",
        "oauthbearer.config",
        "credential",
        "authmechanismproperties",
    ]
    .iter()
    .any(|s| key.contains(s))
}

/// Why a URL whose reading is ambiguous is refused or shown hidden, without quoting any of it.
const AMBIGUOUS: &str = "the hosts are not valid; if the password holds '?', '@', '/' or '#', \
    percent-encode it (%3F, %40, %2F, %23)";

/// Whether `url` reads as hosts that are not valid followed by options holding an `@`: then
/// the "hosts" are most likely the start of a password holding an unencoded `?` (followed by
/// `=` or `&`, which an option value holding `@` also has), so [`redact`] hides everything
/// after the scheme and the refused host is not quoted.
fn ambiguous(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (before_query, query) = rest.split_at(query_start(rest));
    if !query.contains('@') {
        return false;
    }
    let (_, after_userinfo) = split_userinfo(before_query);
    let host_list = &after_userinfo[..after_userinfo.find('/').unwrap_or(after_userinfo.len())];
    host_list.split(',').any(|h| parse_host(h.trim()).is_err())
}

/// `base` (scheme, user info, hosts, path) with the user name and password percent-encoded
/// where they hold a character that ends them in a connection string (`?`, `/`, `#`, `@`,
/// `[`, `]`, and `:` in the password): a driver that splits at the first `?` would otherwise
/// read part of a password as a host, and quote it in its error. What is already encoded
/// stays as written.
fn encode_userinfo(base: &str) -> String {
    let Some((scheme, rest)) = base.split_once("://") else {
        return base.to_owned();
    };
    let (Some(userinfo), after) = split_userinfo(rest) else {
        return base.to_owned();
    };
    let encode = |part: &str, colon: bool| -> String {
        part.chars()
            .map(|c| match c {
                '?' => "%3F".to_owned(),
                '/' => "%2F".to_owned(),
                '#' => "%23".to_owned(),
                '@' => "%40".to_owned(),
                '[' => "%5B".to_owned(),
                ']' => "%5D".to_owned(),
                ':' if colon => "%3A".to_owned(),
                c => c.to_string(),
            })
            .collect()
    };
    let userinfo = match userinfo.split_once(':') {
        Some((user, password)) => format!("{}:{}", encode(user, true), encode(password, true)),
        None => encode(userinfo, true),
    };
    format!("{scheme}://{userinfo}@{after}")
}

/// Where the query of what follows `://` starts (its `?`), or its length when there is none.
/// A `?` in a password is not one: when nothing before the first `?` is followed by `@` but the
/// first option holds an `@` before any `=` (an option's name never does), the `?` was in the
/// user info, and the query starts at the first `?` after that `@`. (Before, the password of
/// `user:pa?ss@host` was read as a host and an option, and shown in full by errors and `redact`.)
fn query_start(rest: &str) -> usize {
    let Some(first) = rest.find('?') else {
        return rest.len();
    };
    if rest[..first].contains('@') {
        return first;
    }
    let query = &rest[first + 1..];
    let pair = &query[..query.find('&').unwrap_or(query.len())];
    match pair.find('@') {
        Some(at) if !pair[..at].contains('=') => {
            let after_at = first + 1 + at;
            rest[after_at..]
                .find('?')
                .map_or(rest.len(), |i| after_at + i)
        }
        _ => first,
    }
}

/// `(user info, the rest)` of what stands between `://` and `?`: the user info ends at the last
/// `@`, so an unencoded `/`, `#` or `@` in a password stays in the password.
fn split_userinfo(before_query: &str) -> (Option<&str>, &str) {
    match before_query.rsplit_once('@') {
        Some((userinfo, rest)) => (Some(userinfo), rest),
        None => (None, before_query),
    }
}

fn parse_host(host: &str) -> Result<HostPort, String> {
    if host.is_empty() {
        return Err("names an empty host (host[:port][,host[:port]...])".into());
    }
    // A scheme without special rules, so that the url crate keeps every port as given.
    let parsed =
        url::Url::parse(&format!("photon://{host}")).map_err(|e| format!("host {host:?}: {e}"))?;
    let name = match parsed.host() {
        Some(url::Host::Domain(d)) => d.to_owned(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        None => return Err(format!("host {host:?} names no host")),
    };
    if !parsed.path().is_empty() || !parsed.username().is_empty() {
        return Err(format!("host {host:?} is not host[:port]"));
    }
    Ok(HostPort {
        host: name,
        port: parsed.port(),
    })
}

/// The scheme of `url` (before `://`), lower-cased.
///
/// # Errors
/// - [`Error::InvalidInput`] when there is no `scheme://`.
pub fn scheme(url: &str) -> Result<String, Error> {
    match url.split_once("://") {
        Some((s, _)) if !s.is_empty() => Ok(s.to_ascii_lowercase()),
        _ => Err(Error::InvalidInput {
            what: format!("store URL {:?}", redact(url)),
            reason:
                "must start with a scheme such as memory://, kafka://, cassandra:// or mongodb://"
                    .into(),
        }),
    }
}

/// `url` with any password replaced by `***`, for errors and logs; works on URLs that do not
/// parse, so an error about a malformed URL can still show it.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    if ambiguous(url) {
        return format!("{scheme}://***");
    }
    let (before_query, tail) = rest.split_at(query_start(rest));
    let (userinfo, after_userinfo) = split_userinfo(before_query);
    let authority = match userinfo {
        Some(userinfo) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{after_userinfo}"),
            None => format!("{userinfo}@{after_userinfo}"),
        },
        None => after_userinfo.to_owned(),
    };
    let tail = match tail.split_once('?') {
        None => tail.to_owned(),
        Some((path, query)) => {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) if is_secret_option(k) => format!("{k}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", pairs.join("&"))
        }
    };
    format!("{scheme}://{authority}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review of issue 19 part 3: a password holding an unencoded '?' followed by '=' or '&'
    /// was read as hosts ("alice:pa") and options, and the error quoted the hosts and showed
    /// the options, password and all.
    #[test]
    fn an_ambiguous_url_is_refused_and_shown_without_any_of_it() {
        for url in [
            "kafka://alice:pa?s=s@broker:9092",
            "kafka://alice:pa?ss&x@broker:9092",
        ] {
            assert_eq!(redact(url), "kafka://***", "{url}");
            let e = StoreUrl::parse(url, "Kafka URL", &["kafka"]).unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(shown.contains("percent-encode"), "{shown}");
            for part in ["alice:pa", "pa?s", "s=s", "ss&x"] {
                assert!(!shown.contains(part), "{url}: {shown}");
            }
        }
        // An '@' in an option value of a URL whose hosts are valid is read as before.
        assert_eq!(
            redact("test://h:1?user=bob@corp"),
            "test://h:1?user=bob@corp"
        );
    }

    #[test]
    fn a_driver_gets_the_user_info_encoded() {
        let u = StoreUrl::parse("test://ann:hunter?2@h:1/db?x=1", "test URL", &["test"]).unwrap();
        assert_eq!(u.password.as_deref(), Some("hunter?2"));
        assert_eq!(
            u.to_string_keeping(|_| true),
            "test://ann:hunter%3F2@h:1/db?x=1"
        );
        let encoded = StoreUrl::parse("test://a%3Ab:p%40ss@h:1", "test URL", &["test"]).unwrap();
        assert_eq!(
            encoded.to_string_keeping(|_| true),
            "test://a%3Ab:p%40ss@h:1"
        );
    }

    #[test]
    fn a_key_passphrase_is_a_secret() {
        assert!(is_secret_option(
            "rdkafka.sasl.oauthbearer.assertion.private.key.passphrase"
        ));
        assert_eq!(
            redact("kafka://h:9092?rdkafka.sasl.oauthbearer.assertion.private.key.passphrase=S&colour=blue"),
            "kafka://h:9092?rdkafka.sasl.oauthbearer.assertion.private.key.passphrase=***&colour=blue"
        );
    }

    fn parse(url: &str) -> Result<StoreUrl, Error> {
        StoreUrl::parse(url, "Test URL", &["test", "test+srv"])
    }

    fn reason(e: Error) -> String {
        match e {
            Error::InvalidInput { reason, .. } => reason,
            other => panic!("not InvalidInput: {other:?}"),
        }
    }

    #[test]
    fn hosts_ports_path_and_credentials() {
        let u =
            parse("test://al%40ce:p%3Ass@h1:1,10.0.0.1,[::1]:3/key%20space?a=1&b=x%26y").unwrap();
        assert_eq!(u.scheme(), "test");
        assert_eq!(u.username(), Some("al@ce"));
        assert_eq!(u.password(), Some("p:ss"));
        assert_eq!(u.host_ports(9), vec!["h1:1", "10.0.0.1:9", "[::1]:3"]);
        assert_eq!(u.path(), "key space");
        assert_eq!(u.option("b"), Some("x&y"));
        assert_eq!(u.options().count(), 2);
        let bare = parse("TEST://").unwrap();
        assert!(bare.hosts().is_empty());
        assert_eq!(bare.path(), "");
    }

    #[test]
    fn malformed_urls_are_invalid_input_naming_the_rule() {
        assert!(reason(parse("kafka://h").unwrap_err()).contains("test:// or test+srv://"));
        assert!(reason(parse("test://h:99999").unwrap_err()).contains("h:99999"));
        assert!(reason(parse("test://h1,,h2").unwrap_err()).contains("empty host"));
        let twice = parse("test://h?a=1&a=2&t=x&t=y").unwrap();
        assert!(reason(twice.check_options(&["a", "t"]).unwrap_err()).contains("a is given twice"));
        // A driver's own options may repeat (MongoDB's readPreferenceTags); only ours are checked.
        twice
            .check_options_matching(|k| k != "t", &["a"])
            .unwrap_err();
        parse("test://h?p_a=1&t=x&t=y")
            .unwrap()
            .check_options_matching(|k| k.starts_with("p_"), &["p_a"])
            .unwrap();
        let e = parse("test://h?p_b=1&t=x")
            .unwrap()
            .check_options_matching(|k| k.starts_with("p_"), &["p_a"])
            .unwrap_err();
        assert!(reason(e).contains("unknown option \"p_b\""));
    }

    #[test]
    fn typed_getters_name_the_option_and_rule() {
        let u = parse("test://h?n=7&big=900&flag=yes&ms=250").unwrap();
        assert_eq!(u.number_option::<u32>("n", 1..=10).unwrap(), Some(7));
        assert_eq!(u.number_option::<u32>("absent", 1..=10).unwrap(), None);
        let e = reason(u.number_option::<u32>("big", 1..=10).unwrap_err());
        assert_eq!(e, "big must be a whole number from 1 to 10, got \"900\"");
        let e = reason(u.bool_option("flag").unwrap_err());
        assert_eq!(e, "flag must be true or false, got \"yes\"");
        assert_eq!(
            u.millis_option("ms", 1..=1000).unwrap(),
            Some(Duration::from_millis(250))
        );
    }

    #[test]
    fn unknown_options_are_refused_with_the_known_list() {
        let u = parse("test://h?prefix=a&rdkafka.linger.ms=5&typo=1").unwrap();
        let e = reason(u.check_options(&["prefix", "rdkafka.*"]).unwrap_err());
        assert_eq!(
            e,
            "unknown option \"typo\"; known options are prefix, rdkafka.*"
        );
        let u = parse("test://h?prefix=a&rdkafka.linger.ms=5").unwrap();
        u.check_options(&["prefix", "rdkafka.*"]).unwrap();
        // A bare prefix is not an option name.
        let u = parse("test://h?rdkafka.=5").unwrap();
        assert!(u.check_options(&["rdkafka.*"]).is_err());
    }

    #[test]
    fn secrets_never_show() {
        let u = parse("test://user:hunter2@h/db?sasl_password=s3cret&x=1").unwrap();
        for shown in [u.to_string(), format!("{u:?}")] {
            assert!(
                !shown.contains("hunter2") && !shown.contains("s3cret"),
                "{shown}"
            );
        }
        assert_eq!(u.to_string(), "test://user:***@h/db?sasl_password=***&x=1");
        let e = u.invalid("bad").to_string();
        assert!(!e.contains("hunter2") && !e.contains("s3cret"), "{e}");
        // An error about a URL that does not parse hides the password too.
        for bad in [
            "test://user:hunter2@h:bad",
            "test://user:hunter2%FF@h",
            "test://h?sasl_password=hunter2%FF",
            "test://user:hun/ter2@h:bad",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(!e.contains("hunter2") && !e.contains("ter2"), "{e}");
        }
        // Unencoded '/', '#' and '@' in a password stay in the password.
        let u = parse("test://user:p/a#s@s@h:1/db?x=1").unwrap();
        assert_eq!(u.password(), Some("p/a#s@s"));
        assert_eq!(u.host_ports(0), vec!["h:1"]);
        assert_eq!(u.path(), "db");
        assert_eq!(u.to_string(), "test://user:***@h:1/db?x=1");
        assert_eq!(
            redact("test://user:p/a#s@s@h:1/db"),
            "test://user:***@h:1/db"
        );
        // And an unencoded '?', which parse and redact read as the start of the options (an
        // error then showed the URL as given, password and all).
        for (url, password, shown) in [
            (
                "test://user:pa?ss@h:1/db?x=1",
                "pa?ss",
                "test://user:***@h:1/db?x=1",
            ),
            ("test://user:1234?x@h:1", "1234?x", "test://user:***@h:1"),
            (
                "test://user:a?b?c@h:1?x=y@z",
                "a?b?c",
                "test://user:***@h:1?x=y@z",
            ),
        ] {
            let u = parse(url).unwrap();
            assert_eq!(u.password(), Some(password));
            assert_eq!(u.host_ports(0), vec!["h:1"]);
            assert_eq!(u.to_string(), shown);
            assert_eq!(redact(url), shown);
        }
        let e = parse("test://user:hun?ter2@h:bad").unwrap_err().to_string();
        assert!(!e.contains("ter2"), "{e}");
        // An '@' in an option's value is not user info.
        let u = parse("test://h:1?user=bob@corp&x=1").unwrap();
        assert_eq!((u.username(), u.option("user")), (None, Some("bob@corp")));
        assert_eq!(
            redact("test://h:1?user=bob@corp"),
            "test://h:1?user=bob@corp"
        );
    }

    #[test]
    fn hide_secrets_replaces_passwords_option_values_and_their_entries() {
        let u = parse(
            "test://u:pa%3Ass@h/db?authMechanismProperties=SERVICE_NAME:x,AWS_SESSION_TOKEN:tok%2Fen&keyPassword=kp&w=majority",
        )
        .unwrap();
        let quoted = "bad pa:ss pa%3Ass got AWS_SESSION_TOKEN:tok/en or tok%2Fen, kp; x w=majority";
        assert_eq!(
            u.hide_secrets(quoted),
            "bad *** *** got *** or ***, ***; x w=majority"
        );
        assert_eq!(parse("test://h").unwrap().hide_secrets("as is"), "as is");
        // As parse reads it: the user info ends at the last '@'.
        let u = parse("test://u:p/a%40s@h/db").unwrap();
        assert_eq!(u.hide_secrets("p/a@s or p/a%40s"), "*** or ***");
    }

    #[test]
    fn driver_url_keeps_chosen_options_as_written() {
        let u = parse("test://u:p%40ss@h:1/db?photon_x=1&w=majority&tls=true").unwrap();
        assert_eq!(
            u.to_string_keeping(|k| !k.starts_with("photon_")),
            "test://u:p%40ss@h:1/db?w=majority&tls=true"
        );
        assert_eq!(u.to_string_keeping(|_| false), "test://u:p%40ss@h:1/db");
    }

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("mongodb://u:p@h:1/db?x=y"),
            "mongodb://u:***@h:1/db?x=y"
        );
        assert_eq!(
            redact("kafka://h:1?sasl_password=x"),
            "kafka://h:1?sasl_password=***"
        );
        assert_eq!(redact("kafka://h:1"), "kafka://h:1");
        assert_eq!(redact("memory://"), "memory://");
    }
}
