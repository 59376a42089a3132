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

/// Every stream of `category`, sorted, as a stream that lists on first poll.
pub(crate) fn list_streams(
    shared: Arc<Shared>,
    category: Category,
) -> BoxStream<'static, Result<StreamId, Error>> {
    stream::once(async move {
        shared.ready().await?;
        let filter = doc! { "category": category.as_str() };
        let context = format!("listing streams of {category}");
        let streams = distinct_sorted(
            &shared,
            "stream",
            filter,
            |s: &str| StreamId::parse(s),
            context,
        )
        .await?;
        Ok::<_, Error>(stream::iter(streams.into_iter().map(Ok)).boxed())
    })
    .map(|r| r.unwrap_or_else(error_stream))
    .flatten()
    .boxed()
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
