//! Connection URLs: which scheme means which backend, and which cargo feature compiles it in.
//!
//! The dispatcher itself lives in `newton` (the crate that knows the features); this table lives
//! here so that every crate gives the same answer for a scheme that was not compiled in.

use crate::error::Error;

/// A backend this project knows, compiled in or not.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct KnownBackend {
    /// URL scheme, without `://`.
    pub scheme: &'static str,
    /// Backend name (also its checkpoint tag).
    pub backend: &'static str,
    /// The `newton` cargo feature that compiles it in.
    pub feature: &'static str,
}

/// Every backend of the project, by scheme.
pub const KNOWN_BACKENDS: &[KnownBackend] = &[
    KnownBackend {
        scheme: "memory",
        backend: "memory",
        feature: "memory",
    },
    KnownBackend {
        scheme: "kafka",
        backend: "kafka",
        feature: "kafka",
    },
    KnownBackend {
        scheme: "cassandra",
        backend: "cassandra",
        feature: "cassandra",
    },
    KnownBackend {
        scheme: "scylla",
        backend: "cassandra",
        feature: "cassandra",
    },
    KnownBackend {
        scheme: "mongodb",
        backend: "mongo",
        feature: "mongo",
    },
    KnownBackend {
        scheme: "mongodb+srv",
        backend: "mongo",
        feature: "mongo",
    },
];

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

/// The error for a URL whose backend is not compiled in (or does not exist).
pub fn not_compiled(url: &str) -> Error {
    let shown = redact(url);
    let scheme = match scheme(url) {
        Ok(s) => s,
        Err(e) => return e,
    };
    match KNOWN_BACKENDS.iter().find(|b| b.scheme == scheme) {
        Some(b) => Error::BackendNotCompiled {
            url: shown,
            backend: b.backend,
            feature: b.feature,
        },
        None => Error::InvalidInput {
            what: format!("store URL {shown:?}"),
            reason: format!(
                "unknown scheme {scheme:?}; known are {}",
                KNOWN_BACKENDS
                    .iter()
                    .map(|b| b.scheme)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
    }
}

/// `url` with any password replaced by `***`, for errors and logs.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_scheme_names_its_feature() {
        let e = not_compiled("kafka://127.0.0.1:9092");
        assert!(
            matches!(
                e,
                Error::BackendNotCompiled {
                    feature: "kafka",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("enable cargo feature \"kafka\""));
        let e = not_compiled("mongodb://u:secret@h/db");
        assert!(matches!(
            e,
            Error::BackendNotCompiled {
                feature: "mongo",
                ..
            }
        ));
        assert!(!e.to_string().contains("secret"));
    }

    #[test]
    fn unknown_or_missing_scheme_is_invalid_input() {
        assert!(
            matches!(not_compiled("redis://x"), Error::InvalidInput { reason, .. } if reason.contains("unknown scheme \"redis\""))
        );
        assert!(matches!(
            not_compiled("nothing"),
            Error::InvalidInput { .. }
        ));
    }

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("mongodb://u:p@h:1/db?x=y"),
            "mongodb://u:***@h:1/db?x=y"
        );
        assert_eq!(redact("kafka://h:1"), "kafka://h:1");
        assert_eq!(redact("memory://"), "memory://");
    }
}
