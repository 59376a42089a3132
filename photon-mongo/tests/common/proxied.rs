//! A store behind photon-faults' TCP proxy, for the test files that watch or disturb what goes
//! over the wire (`faults.rs`, `paging.rs`, `appends.rs`).

use photon_faults::proxy::FaultProxy;
use photon_mongo::MongoStore;

/// A store on fresh collections (prefix `tag` + random), connected through a fresh fault proxy
/// to the server of `url`, with `options` (`photon_*` or the driver's) added to its URL; the
/// proxy, the store and the prefix of its collections.
pub(crate) async fn proxied(
    url: &str,
    tag: &str,
    options: &str,
) -> (FaultProxy, MongoStore, String) {
    let rest = &url["mongodb://".len()..];
    let host = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let proxy = FaultProxy::start("127.0.0.1:0", host).await.unwrap();
    let prefix = format!("{tag}{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let through = url.replacen(host, &proxy.local_addr().to_string(), 1);
    let mut through = format!(
        "{through}{}photon_prefix={prefix}",
        if through.contains('?') { "&" } else { "?" }
    );
    if !options.is_empty() {
        through = format!("{through}&{options}");
    }
    let store = MongoStore::from_url(&through).await.unwrap();
    (proxy, store, prefix)
}
