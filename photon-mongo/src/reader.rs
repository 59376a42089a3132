//! Reads for callers: one stream's events in version order (forwards or backwards, from any
//! version), a stream's version, and the category and stream listings.
//!
//! Nothing here writes; reading in global position order is `subscription.rs`'s job.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use mongodb::bson::{doc, Bson, Document};
use mongodb::Cursor;
use photon_api::{
    error_stream, Category, Direction, Error, ReadOptions, RecordedEvent, StreamId, Version,
};

use crate::client::Shared;
use crate::codec::{self, CommitHead, TOMBSTONE_STREAM};
use crate::error;

/// The stream's last commit, None for a stream with none.
pub(crate) async fn last_commit(
    shared: &Shared,
    stream: &StreamId,
) -> Result<Option<CommitHead>, Error> {
    let last = shared
        .bounded(
            || format!("reading the version of {stream}"),
            shared
                .commits
                .find_one(doc! { "stream": stream.as_str() })
                .sort(doc! { "version": -1 })
                .projection(codec::head_fields())
                .max_time(shared.config.timeout),
        )
        .await?;
    last.as_ref().map(codec::head).transpose()
}

/// The version of the stream's last event, None for a stream with none.
pub(crate) async fn stream_version(
    shared: &Shared,
    stream: &StreamId,
) -> Result<Option<Version>, Error> {
    shared.ready().await?;
    Ok(last_commit(shared, stream).await?.map(|h| h.last_version()))
}

/// The stream's events as `options` ask, as a stream that opens on first poll.
pub(crate) fn read_stream(
    shared: Arc<Shared>,
    stream: StreamId,
    options: ReadOptions,
) -> BoxStream<'static, Result<RecordedEvent, Error>> {
    stream::once(async move { open_read(&shared, stream, options).await })
        .map(|opened| opened.unwrap_or_else(error_stream))
        .flatten()
        .boxed()
}

async fn open_read(
    shared: &Shared,
    stream: StreamId,
    options: ReadOptions,
) -> Result<BoxStream<'static, Result<RecordedEvent, Error>>, Error> {
    shared.ready().await?;
    let context = format!("reading {stream}");
    let (filter, sort) = read_filter(shared, &stream, &options).await?;
    let cursor = shared
        .bounded(
            || context.clone(),
            shared
                .commits
                .find(filter)
                .sort(doc! { "version": sort })
                .max_time(shared.config.timeout),
        )
        .await?;
    let from = options.from;
    let backwards = options.direction == Direction::Backwards;
    let events = bounded_cursor(cursor, shared.config.timeout, context)
        .map(move |commit| commit_events(&commit?, from, backwards))
        .map_ok(|events| stream::iter(events.into_iter().map(Ok)))
        .try_flatten()
        .take(options.limit.unwrap_or(usize::MAX));
    Ok(events.boxed())
}

/// The cursor's documents, each fetch (a getMore when its batch is used up) bounded by
/// `timeout`. Only the wait for the server counts: a consumer that is slow to poll is not.
fn bounded_cursor(
    cursor: Cursor<Document>,
    timeout: Duration,
    context: String,
) -> BoxStream<'static, Result<Document, Error>> {
    stream::unfold(Some(cursor), move |cursor| {
        let context = context.clone();
        async move {
            let mut cursor = cursor?;
            match tokio::time::timeout(timeout, cursor.next()).await {
                Ok(None) => None,
                Ok(Some(Ok(commit))) => Some((Ok(commit), Some(cursor))),
                Ok(Some(Err(e))) => Some((Err(error::driver(context, e)), None)),
                // The cursor is dropped: the driver closes its connection.
                Err(elapsed) => Some((Err(error::timed_out(context, timeout, elapsed)), None)),
            }
        }
    })
    .boxed()
}

/// The commits to read and their order on `version` (1 or -1).
async fn read_filter(
    shared: &Shared,
    stream: &StreamId,
    options: &ReadOptions,
) -> Result<(Document, i32), Error> {
    let s = stream.as_str();
    Ok(match (options.direction, options.from) {
        (Direction::Forwards, None) => (doc! { "stream": s }, 1),
        (Direction::Forwards, Some(v)) => {
            // Start at the commit holding `v`, which may begin before it.
            let from = holder_of(shared, stream, v)
                .await?
                .map_or(0, |h| h.version.0);
            (doc! { "stream": s, "version": { "$gte": from as i64 } }, 1)
        }
        (Direction::Backwards, None) => (doc! { "stream": s }, -1),
        (Direction::Backwards, Some(v)) => {
            (doc! { "stream": s, "version": { "$lte": v.0 as i64 } }, -1)
        }
    })
}

/// The commit of `stream` holding version `v` (the last one starting at or before it).
async fn holder_of(
    shared: &Shared,
    stream: &StreamId,
    v: Version,
) -> Result<Option<CommitHead>, Error> {
    let holder = shared
        .bounded(
            || format!("reading {stream}"),
            shared
                .commits
                .find_one(doc! { "stream": stream.as_str(), "version": { "$lte": v.0 as i64 } })
                .sort(doc! { "version": -1 })
                .projection(codec::head_fields())
                .max_time(shared.config.timeout),
        )
        .await?;
    holder.as_ref().map(codec::head).transpose()
}

/// A commit's events in reading order, without those before `from` (after it, backwards).
fn commit_events(
    commit: &Document,
    from: Option<Version>,
    backwards: bool,
) -> Result<Vec<RecordedEvent>, Error> {
    let mut events = codec::events(commit)?;
    if let Some(v) = from {
        events.retain(|e| {
            if backwards {
                e.version <= v
            } else {
                e.version >= v
            }
        });
    }
    if backwards {
        events.reverse();
    }
    Ok(events)
}

/// Every category with a commit, sorted.
pub(crate) async fn list_categories(shared: &Shared) -> Result<Vec<Category>, Error> {
    shared.ready().await?;
    let filter = doc! { "category": { "$ne": TOMBSTONE_STREAM } };
    distinct_sorted(
        shared,
        "category",
        filter,
        |s: &str| Category::new(s),
        "listing categories",
    )
    .await
}

/// Streams listed per query by [`list_streams`].
const STREAMS_PAGE: i64 = 256;

/// Every stream of `category`, sorted, a page at a time as the consumer reaches it.
///
/// Each page is one query for the streams' first commits (every stream has exactly one at
/// version 0) after the last name listed, so no reply grows with the number of streams
/// (`distinct` answers in one document, which MongoDB caps at 16 MiB) and no cursor stays open
/// while the consumer is slow. The names of one category are the strings between `<category>-`
/// and `<category>.` (`.` follows `-`), a range of the `stream_version` index on MongoDB.
pub(crate) fn list_streams(
    shared: Arc<Shared>,
    category: Category,
) -> BoxStream<'static, Result<StreamId, Error>> {
    let first = format!("{category}-");
    stream::try_unfold(Some(first), move |after| {
        let (shared, category) = (shared.clone(), category.clone());
        async move {
            let Some(after) = after else {
                return Ok(None);
            };
            let page = streams_page(&shared, &category, &after).await?;
            let next = match page.last() {
                Some(last) if page.len() as i64 == STREAMS_PAGE => Some(last.as_str().to_owned()),
                _ => None,
            };
            Ok(Some((stream::iter(page.into_iter().map(Ok)), next)))
        }
    })
    .try_flatten()
    .boxed()
}

/// The next page of `category`'s streams after the name `after`, sorted.
async fn streams_page(
    shared: &Shared,
    category: &Category,
    after: &str,
) -> Result<Vec<StreamId>, Error> {
    shared.ready().await?;
    let filter = doc! {
        "stream": { "$gt": after, "$lt": format!("{category}.") },
        "version": 0_i64,
        "category": category.as_str(),
    };
    let page = async {
        shared
            .commits
            .find(filter)
            .sort(doc! { "stream": 1 })
            .limit(STREAMS_PAGE)
            .projection(doc! { "stream": 1, "_id": 0 })
            .max_time(shared.config.timeout)
            .await?
            .try_collect::<Vec<Document>>()
            .await
    };
    let page = shared
        .bounded(|| format!("listing streams of {category}"), page)
        .await?;
    page.iter()
        .map(|d| {
            let name = d
                .get_str("stream")
                .map_err(|_| error::corrupt(None, "stream is not a string"))?;
            StreamId::parse(name).map_err(|e| error::corrupt(None, format!("stream: {e}")))
        })
        .collect()
}

/// The distinct values of `field` among the commits `filter` selects, parsed and sorted.
async fn distinct_sorted<T: Ord>(
    shared: &Shared,
    field: &str,
    filter: Document,
    parse: impl Fn(&str) -> Result<T, Error>,
    context: impl Into<String>,
) -> Result<Vec<T>, Error> {
    let names = shared
        .bounded(
            || context.into(),
            // No maxTimeMS here: FerretDB 1.24 refuses it on distinct ("unknown field").
            shared.commits.distinct(field, filter),
        )
        .await?;
    let mut values = names
        .iter()
        .filter_map(Bson::as_str)
        .map(parse)
        .collect::<Result<Vec<_>, _>>()?;
    values.sort();
    Ok(values)
}
