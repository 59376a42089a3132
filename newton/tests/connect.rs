//! Backend choice by URL: the compiled-in ones connect, the others say which feature to enable.

use newton::store::EventStore;
use newton::Error;

#[tokio::test]
async fn memory_url_connects_with_options() {
    let store = newton::connect("memory://?max_event_size=2048")
        .await
        .unwrap();
    assert_eq!(store.backend(), "memory");
    assert_eq!(store.capabilities().max_event_size, 2048);
    assert_eq!(store.health().await.unwrap().backend, "memory");
}

#[tokio::test]
async fn known_backends_not_compiled_name_their_feature() {
    let mut urls = Vec::new();
    if cfg!(not(feature = "cassandra")) {
        urls.push(("cassandra://127.0.0.1:9042/photon", "cassandra"));
        urls.push(("scylla://127.0.0.1:9042/photon", "cassandra"));
    }
    if cfg!(not(feature = "kafka")) {
        urls.push(("kafka://127.0.0.1:9092", "kafka"));
    }
    for (url, feature) in urls {
        match newton::connect(url).await {
            Err(e @ Error::BackendNotCompiled { .. }) => {
                let Error::BackendNotCompiled {
                    feature: f,
                    url: shown,
                    ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(*f, feature);
                assert!(!shown.contains("secret"), "{shown}");
                assert!(e
                    .to_string()
                    .contains(&format!("enable cargo feature \"{feature}\"")));
            }
            other => panic!("{url}: {other:?}"),
        }
    }
}

#[cfg(not(feature = "mongo"))]
#[tokio::test]
async fn mongo_without_its_feature_names_it() {
    match newton::connect("mongodb://user:secret@127.0.0.1:27017/photon").await {
        Err(Error::BackendNotCompiled { feature, url, .. }) => {
            assert_eq!(feature, "mongo");
            assert!(!url.contains("secret"), "{url}");
        }
        other => panic!("{other:?}"),
    }
}

#[cfg(feature = "mongo")]
#[tokio::test]
async fn mongo_url_connects_lazily_and_reports_an_unreachable_server() {
    let store = newton::connect("mongodb://127.0.0.1:1/photon?photon_timeout_ms=500")
        .await
        .unwrap();
    assert_eq!(store.backend(), "mongo");
    assert!(matches!(
        store.health().await,
        Err(Error::Unavailable { .. })
    ));
}

#[cfg(feature = "kafka")]
#[tokio::test]
async fn kafka_url_connects_lazily_and_reports_an_unreachable_broker() {
    let store = newton::connect("kafka://127.0.0.1:1?timeout_ms=500")
        .await
        .unwrap();
    assert_eq!(store.backend(), "kafka");
    assert!(matches!(
        store.health().await,
        Err(Error::Unavailable { .. })
    ));
}

#[cfg(feature = "cassandra")]
#[tokio::test]
async fn cassandra_url_connects_lazily_and_reports_an_unreachable_cluster() {
    let store = newton::connect("cassandra://127.0.0.1:1/photon?timeout_ms=500")
        .await
        .unwrap();
    assert_eq!(store.backend(), "cassandra");
    assert!(matches!(
        store.health().await,
        Err(Error::Unavailable { .. })
    ));
}

#[tokio::test]
async fn unknown_schemes_and_bad_options_are_invalid_input() {
    for url in [
        "redis://localhost",
        "no-scheme",
        "memory://?nope=1",
        "memory://host",
    ] {
        assert!(
            matches!(newton::connect(url).await, Err(Error::InvalidInput { .. })),
            "{url}"
        );
    }
}

#[tokio::test]
async fn photon_url_defaults_to_memory() {
    // Only asserts the default when the variable is unset, so a developer's PHOTON_URL is honoured.
    if std::env::var(newton::URL_VARIABLE).is_err() {
        let store = newton::connect_from_env().await.unwrap();
        assert_eq!(store.backend(), "memory");
    }
}
