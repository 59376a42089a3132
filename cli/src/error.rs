//! What can go wrong in a command, and how each failure is shown: one line on stderr and an exit
//! code a script can branch on.
//!
//! This module owns the exit codes and the scrubbing of credentials out of messages; it must not
//! print anything itself (`main` does, once).

use std::fmt;

use photon_api::Error;

/// Exit code for success.
pub const EXIT_OK: i32 = 0;
/// Exit code for any failure without a more specific code.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code for a command line that cannot work (clap uses the same for its own refusals).
pub const EXIT_USAGE: i32 = 2;
/// Exit code of `verify` when the two stores differ.
pub const EXIT_DIFFERENCES: i32 = 3;
/// Exit code for a refused append: wrong expected version or an idempotency conflict.
pub const EXIT_CONFLICT: i32 = 4;
/// Exit code for `Unavailable`: the store did not answer; running the command again may work.
pub const EXIT_UNAVAILABLE: i32 = 5;
/// Exit code for `AccessDenied`: the server refused the credentials, the certificate or the
/// permission. Running the command again fails the same way until the URL or the grants change,
/// so a script must not loop on it as it may on 5.
pub const EXIT_ACCESS_DENIED: i32 = 6;

/// A failed command.
#[derive(Debug)]
#[non_exhaustive]
pub enum CliError {
    /// The store refused or failed; its typed error says what and where.
    Store(Error),
    /// Reading input or writing output failed.
    Io {
        /// What was being read or written.
        context: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// An argument that clap accepted but that cannot work (a bad selector, JSON that does not
    /// parse, an expected version that is not one).
    Usage(String),
    /// A dump line that cannot be read; the 1-based line number makes it findable.
    Dump {
        /// 1-based line number in the dump.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// `verify` found this many differences (they were printed on stdout).
    Differences(usize),
}

impl CliError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Store(Error::WrongExpectedVersion { .. })
            | CliError::Store(Error::IdempotencyConflict { .. })
            | CliError::Store(Error::RevisionConflict { .. }) => EXIT_CONFLICT,
            CliError::Store(Error::Unavailable { .. }) => EXIT_UNAVAILABLE,
            CliError::Store(Error::AccessDenied { .. }) => EXIT_ACCESS_DENIED,
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Differences(_) => EXIT_DIFFERENCES,
            _ => EXIT_FAILURE,
        }
    }

    /// An I/O failure while doing `context`.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        CliError::Io {
            context: context.into(),
            source,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Store(e) => {
                write!(f, "{e}")?;
                if e.is_retryable() {
                    f.write_str(" (retryable: running the command again may succeed)")?;
                }
                Ok(())
            }
            CliError::Io { context, source } => write!(f, "{context}: {source}"),
            CliError::Usage(m) => f.write_str(m),
            CliError::Dump { line, reason } => write!(f, "dump line {line}: {reason}"),
            CliError::Differences(n) => write!(
                f,
                "the stores differ in {n} stream{}",
                if *n == 1 { "" } else { "s" }
            ),
        }
    }
}

impl std::error::Error for CliError {}

impl From<Error> for CliError {
    fn from(e: Error) -> Self {
        CliError::Store(e)
    }
}

/// The credentials found in the URLs a command was given, so that no message shows them even if
/// a driver's error quotes the connection string it was handed.
#[derive(Default)]
pub struct Secrets(Vec<String>, Vec<photon_api::url::StoreUrl>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The point of this type is not to show them.
        write!(f, "Secrets({} hidden)", self.0.len())
    }
}

impl Secrets {
    /// Collects the password and every secret option (`password=`, `sasl.password=`, ...) of
    /// each URL, as written and percent-decoded.
    pub fn from_urls<'a>(urls: impl IntoIterator<Item = &'a str>) -> Self {
        let mut found = Vec::new();
        let mut parsed = Vec::new();
        for url in urls {
            // The stores' own reading too, whose `hide_secrets` also knows the entries of a
            // secret option and a password the simple reading below would miss.
            if let Some((scheme, _)) = url.split_once("://") {
                if let Ok(u) = photon_api::url::StoreUrl::parse(url, "URL", &[scheme]) {
                    parsed.push(u);
                }
            }
            let Some((_, rest)) = url.split_once("://") else {
                continue;
            };
            let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
            if let Some((userinfo, _)) = rest[..authority_end].rsplit_once('@') {
                if let Some((_, password)) = userinfo.split_once(':') {
                    found.push(password.to_owned());
                }
            }
            if let Some((_, query)) = rest.split_once('?') {
                for pair in query.split('&') {
                    if let Some((k, v)) = pair.split_once('=') {
                        if photon_api::url::is_secret_option(k) {
                            found.push(v.to_owned());
                        }
                    }
                }
            }
        }
        let decoded: Vec<String> = found.iter().filter_map(|s| percent_decode(s)).collect();
        found.extend(decoded);
        found.retain(|s| !s.is_empty());
        // Longest first, so a secret containing a shorter one is replaced whole.
        found.sort_by_key(|s| std::cmp::Reverse(s.len()));
        found.dedup();
        Secrets(found, parsed)
    }

    /// `text` with every secret replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in &self.0 {
            out = out.replace(secret.as_str(), "***");
        }
        for url in &self.1 {
            out = url.hide_secrets(&out);
        }
        out
    }
}

/// `%XX`-decodes `s`; None when it is not valid UTF-8 after decoding or has nothing to decode.
fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return None;
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_found_in_userinfo_and_options() {
        let s = Secrets::from_urls([
            "mongodb://admin:p%40ss@h:27017/db?authSource=admin",
            "kafka://h:9092?sasl.username=u&sasl.password=k3y",
        ]);
        let text = "failed mongodb://admin:p%40ss@h and p@ss, kafka sasl.password=k3y";
        let scrubbed = s.scrub(text);
        assert!(!scrubbed.contains("p%40ss"), "{scrubbed}");
        assert!(!scrubbed.contains("p@ss"), "{scrubbed}");
        assert!(!scrubbed.contains("k3y"), "{scrubbed}");
        assert!(scrubbed.contains("admin"), "{scrubbed}");
    }

    /// Review of issue 19 part 3: the simple reading ends the user info at the first '/' or
    /// '?' and keeps `authMechanismProperties` whole, so these passed through.
    #[test]
    fn secrets_the_simple_reading_misses_are_scrubbed_too() {
        let s = Secrets::from_urls([
            "mongodb://u:hunter?2@h/db",
            "mongodb://h/db?authMechanismProperties=SERVICE_NAME:x,AWS_SESSION_TOKEN:t0kenvalue",
        ]);
        let scrubbed = s.scrub("refused hunter?2 and got t0kenvalue");
        assert!(!scrubbed.contains("hunter"), "{scrubbed}");
        assert!(!scrubbed.contains("t0kenvalue"), "{scrubbed}");
    }

    #[test]
    fn exit_codes_follow_the_error() {
        let unavailable = CliError::Store(Error::Unavailable {
            backend: "kafka",
            message: "x".into(),
            source: None,
        });
        assert_eq!(unavailable.exit_code(), EXIT_UNAVAILABLE);
        assert!(unavailable.to_string().contains("retryable"));
        let denied = CliError::Store(Error::access_denied(
            "kafka",
            photon_api::AccessKind::Authentication,
            "connecting to 127.0.0.1:9094",
            "SASL authentication failed",
        ));
        assert_eq!(denied.exit_code(), EXIT_ACCESS_DENIED);
        assert!(!denied.to_string().contains("retryable"));
        assert_eq!(CliError::Usage("x".into()).exit_code(), EXIT_USAGE);
        assert_eq!(CliError::Differences(2).exit_code(), EXIT_DIFFERENCES);
    }
}
