//! Reads of the `commits` table (one stream: forwards, backwards, from any version, in pages),
//! what this process knows of a stream brought up to date from it, and the listings of
//! categories and streams.
//!
//! Nothing here writes: appends and repairs are `writer`; category and all-stream reading is
//! `subscription`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::stream::{self, BoxStream};
use futures::StreamExt;
use photon_api::validate::StoredId;
use photon_api::{
    error_stream, Bytes, Category, Direction, Error, ReadOptions, RecordedEvent, StreamId, Uuid,
    Version,
};
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimeuuid;

use crate::client::{Shared, StreamMeta, ALL, COMMITS_PER_PAGE};
use crate::codec::{self, Commit};
use crate::error;

impl Shared {
    /// Brings this process's knowledge of `stream` up to date by reading the commits after the
    /// ones it knows. `serial`: a linearizable read, which also settles a conditional write in
    /// flight (the append path needs it; plain reads do not).
    pub(crate) async fn refresh(
        &self,
        stream: &StreamId,
        serial: bool,
    ) -> Result<StreamMeta, Error> {
        let mut meta = self.cached_meta(stream);
        // A void can only be at the head, which the first read below starts at.
        meta.void = None;
        loop {
            let bucket = self.bucket_of(meta.next_first);
            let seen = self
                .read_commit_ids(stream, bucket, serial, &mut meta)
                .await?;
            // The next commit, if any, is in the bucket of its first version.
            if seen == 0 || self.bucket_of(meta.next_first) == bucket {
                break;
            }
        }
        self.remember(stream, &meta);
        Ok(meta)
    }

    /// Adds the commits of `bucket` from `meta.next_first` on to `meta`; returns how many.
    async fn read_commit_ids(
        &self,
        stream: &StreamId,
        bucket: i64,
        serial: bool,
        meta: &mut StreamMeta,
    ) -> Result<usize, Error> {
        let (session, st) = self.ready().await?;
        let query = if serial {
            &st.commit_ids_from_serial
        } else {
            &st.commit_ids_from
        };
        let context = || format!("reading the commits of {stream}");
        let rows = session
            .execute_unpaged(query, (stream.as_str(), bucket, meta.next_first as i64))
            .await
            .map_err(|e| error::request(context(), e))?
            .into_rows_result()
            .map_err(|e| error::driver(context(), e))?;
        let mut seen = 0;
        for row in rows
            .rows::<(i64, i32, CqlTimeuuid, Vec<Uuid>)>()
            .map_err(|e| error::driver(context(), e))?
        {
            let (first, count, time_id, ids) = row.map_err(|e| error::driver(context(), e))?;
            let (first, time_id) = (first as u64, Uuid::from(time_id));
            if count == 0 {
                // A repair's fence at the head: no events, not the head's time.
                meta.void = (first == meta.next_first).then_some(time_id);
                continue;
            }
            meta.push(first, time_id, ids.into());
            seen += 1;
        }
        Ok(seen)
    }

    /// Where each of `ids` is stored in `stream`, with its commit's time id, from every commit
    /// up to the one starting at `head` (exclusive; later ones are found by the append's
    /// conditional write failing): the check of a batch against ids older than the ones this
    /// process keeps. It reads 16 bytes per event of the stream and keeps only the batch's.
    pub(crate) async fn find_ids(
        &self,
        stream: &StreamId,
        ids: &[Uuid],
        head: u64,
    ) -> Result<HashMap<Uuid, (StoredId, Uuid)>, Error> {
        let (session, st) = self.ready().await?;
        let wanted: HashSet<&Uuid> = ids.iter().collect();
        let mut found = HashMap::new();
        let context = || format!("reading the event ids of {stream}");
        let last = match head.checked_sub(1) {
            Some(top) => self.bucket_of(top),
            None => return Ok(found),
        };
        for bucket in 0..=last {
            let rows = session
                .execute_unpaged(&st.commit_ids_from, (stream.as_str(), bucket, 0_i64))
                .await
                .map_err(|e| error::request(context(), e))?
                .into_rows_result()
                .map_err(|e| error::driver(context(), e))?;
            for row in rows
                .rows::<(i64, i32, CqlTimeuuid, Vec<Uuid>)>()
                .map_err(|e| error::driver(context(), e))?
            {
                let (first, count, time_id, stored) =
                    row.map_err(|e| error::driver(context(), e))?;
                for (i, id) in stored.iter().enumerate() {
                    if wanted.contains(id) {
                        let at = StoredId {
                            version: Version(first as u64 + i as u64),
                            batch_first: Version(first as u64),
                            batch_len: count as usize,
                        };
                        found.insert(*id, (at, Uuid::from(time_id)));
                    }
                }
            }
        }
        Ok(found)
    }

    /// The version of the last event of `stream`, by a plain read.
    pub(crate) async fn stream_version(&self, stream: &StreamId) -> Result<Option<Version>, Error> {
        let meta = self.refresh(stream, false).await?;
        Ok(meta.next_first.checked_sub(1).map(Version))
    }

    /// The commit at `version` by a serial read.
    pub(crate) async fn stored_commit(
        &self,
        stream: &StreamId,
        version: u64,
    ) -> Result<Option<(Commit, i32)>, Error> {
        let (session, st) = self.ready().await?;
        let context = || format!("reading the commit {stream}@{version}");
        let rows = session
            .execute_unpaged(
                &st.commit_at_serial,
                (stream.as_str(), self.bucket_of(version), version as i64),
            )
            .await
            .map_err(|e| error::request(context(), e))?
            .into_rows_result()
            .map_err(|e| error::driver(context(), e))?;
        Ok(rows
            .maybe_first_row::<(i32, CqlTimeuuid, Vec<u8>)>()
            .map_err(|e| error::driver(context(), e))?
            .map(|(count, t, events)| {
                let commit = Commit {
                    stream: stream.clone(),
                    first: version,
                    time_id: t.into(),
                    events: Bytes::from(events),
                };
                (commit, count)
            }))
    }

    /// The first version of the commit holding `version`, found from the bucket of `version`
    /// back to earlier ones (a commit may run past the end of the bucket it starts in).
    async fn commit_holding(&self, stream: &StreamId, version: u64) -> Result<Option<u64>, Error> {
        let (session, st) = self.ready().await?;
        let context = || format!("reading the commits of {stream}");
        let mut bucket = self.bucket_of(version);
        while bucket >= 0 {
            let rows = session
                .execute_unpaged(
                    &st.commit_at_or_before,
                    (stream.as_str(), bucket, version as i64),
                )
                .await
                .map_err(|e| error::request(context(), e))?
                .into_rows_result()
                .map_err(|e| error::driver(context(), e))?;
            if let Some((first, count)) = rows
                .maybe_first_row::<(i64, i32)>()
                .map_err(|e| error::driver(context(), e))?
            {
                let (first, count) = (first as u64, count as u64);
                return Ok((first + count > version).then_some(first));
            }
            bucket -= 1;
        }
        Ok(None)
    }

    /// One page of commits of `stream` in `bucket`, from `from` upwards (or downwards): as
    /// many as fit in `page_bytes`, at most `COMMITS_PER_PAGE`; and whether more may follow in
    /// the partition.
    async fn commits_page(
        &self,
        stream: &StreamId,
        bucket: i64,
        from: u64,
        forwards: bool,
    ) -> Result<(Vec<(Commit, i32)>, bool), Error> {
        let (session, st) = self.ready().await?;
        let q = if forwards {
            &st.commits_from
        } else {
            &st.commits_down_from
        };
        let context = || format!("reading the commits of {stream}");
        // The counts first, so the page fetches only what fits in `page_bytes`.
        let counts = if forwards {
            &st.commit_counts_from
        } else {
            &st.commit_counts_down_from
        };
        let values = (stream.as_str(), bucket, from as i64, COMMITS_PER_PAGE);
        let (limit, more) = self.page_limit(counts, values, &context()).await?;
        let rows = session
            .execute_unpaged(q, (stream.as_str(), bucket, from as i64, limit))
            .await
            .map_err(|e| error::request(context(), e))?
            .into_rows_result()
            .map_err(|e| error::driver(context(), e))?;
        let page = rows
            .rows::<(i64, i32, CqlTimeuuid, Vec<u8>)>()
            .map_err(|e| error::driver(context(), e))?
            .map(|r| {
                let (first, count, t, events) = r.map_err(|e| error::driver(context(), e))?;
                let commit = Commit {
                    stream: stream.clone(),
                    first: first as u64,
                    time_id: t.into(),
                    events: Bytes::from(events),
                };
                Ok((commit, count))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok((page, more))
    }

    /// How many commits the page that `counts` (a statement selecting the `count` of each of
    /// the page's next commits, at most `COMMITS_PER_PAGE`, bound with `values`) counts may
    /// fetch within `page_bytes`; and whether more may follow after them: some counted commits
    /// were left out, or there were as many as a page may count.
    pub(crate) async fn page_limit(
        &self,
        counts: &PreparedStatement,
        values: impl SerializeRow,
        context: &str,
    ) -> Result<(i32, bool), Error> {
        let (session, _) = self.ready().await?;
        let counts = session
            .execute_unpaged(counts, values)
            .await
            .map_err(|e| error::request(context, e))?
            .into_rows_result()
            .map_err(|e| error::driver(context, e))?
            .rows::<(i32,)>()
            .map_err(|e| error::driver(context, e))?
            .map(|r| r.map(|(count,)| count))
            .collect::<Result<Vec<i32>, _>>()
            .map_err(|e| error::driver(context, e))?;
        let limit = self.config.commits_in_a_page(counts.iter().copied());
        let more = (limit as usize) < counts.len() || counts.len() == COMMITS_PER_PAGE as usize;
        Ok((limit, more))
    }

    /// Every category with events, sorted.
    pub(crate) async fn list_categories(&self) -> Result<Vec<Category>, Error> {
        let (session, st) = self.ready().await?;
        let context = "listing categories";
        let rows = session
            .execute_unpaged(&st.categories, ())
            .await
            .map_err(|e| error::request(context, e))?
            .into_rows_result()
            .map_err(|e| error::driver(context, e))?;
        let mut out = Vec::new();
        for r in rows
            .rows::<(String,)>()
            .map_err(|e| error::driver(context, e))?
        {
            let (c,) = r.map_err(|e| error::driver(context, e))?;
            if c != ALL {
                out.push(Category::new(c)?);
            }
        }
        out.sort();
        Ok(out)
    }
}

/// The streams of `category`, paged by the driver as the caller pulls: a category may hold
/// millions of streams.
pub(crate) fn list_streams(
    shared: Arc<Shared>,
    category: Category,
) -> BoxStream<'static, Result<StreamId, Error>> {
    let context = format!("listing the streams of {category}");
    let opening = context.clone();
    stream::once(async move {
        let (session, st) = shared.ready().await?;
        session
            .execute_iter(st.streams.clone(), (category.as_str(),))
            .await
            .map_err(|e| error::driver(&opening, e))?
            .rows_stream::<(String,)>()
            .map_err(|e| error::driver(&opening, e))
    })
    .flat_map(move |r| match r {
        Ok(rows) => {
            let context = context.clone();
            rows.map(move |row| {
                let (s,) = row.map_err(|e| error::driver(&context, e))?;
                StreamId::parse(s)
            })
            .boxed()
        }
        Err(e) => error_stream(e),
    })
    .boxed()
}

/// Where a stream read stands between pages.
struct ReadCursor {
    shared: Arc<Shared>,
    stream: StreamId,
    /// Next commit's first version (forwards) or the highest version still wanted (backwards).
    at: u64,
    bucket: i64,
    /// Versions outside `[lo, hi]` are not delivered.
    lo: u64,
    hi: u64,
    left: usize,
    forwards: bool,
    done: bool,
}

impl ReadCursor {
    /// Where a read with `options` starts; None when it has nothing to deliver.
    async fn open(
        shared: Arc<Shared>,
        stream: StreamId,
        options: ReadOptions,
    ) -> Result<Option<Self>, Error> {
        let forwards = options.direction == Direction::Forwards;
        let head = shared.refresh(&stream, false).await?.next_first;
        let (at, lo, hi) = if forwards {
            let from = options.from.map_or(0, |v| v.0);
            // Past the head there is nothing to find (and no partition to look in).
            if from >= head {
                return Ok(None);
            }
            (from, from, u64::MAX)
        } else {
            let Some(top) = head.checked_sub(1) else {
                return Ok(None);
            };
            let hi = options.from.map_or(top, |v| v.0.min(top));
            (hi, 0, hi)
        };
        let Some(first) = shared.commit_holding(&stream, at).await? else {
            return Ok(None);
        };
        let left = options.limit.unwrap_or(usize::MAX);
        Ok(Some(ReadCursor {
            bucket: shared.bucket_of(first),
            // Forwards, the read starts at the commit holding `from`.
            at: if forwards { first } else { at },
            shared,
            stream,
            lo,
            hi,
            left,
            forwards,
            done: left == 0,
        }))
    }

    /// The next events, at most a page of commits' worth; empty at the end.
    async fn page(&mut self) -> Result<Vec<RecordedEvent>, Error> {
        let mut out = Vec::new();
        while out.is_empty() && !self.done && self.left > 0 {
            let (page, full) = self
                .shared
                .commits_page(&self.stream, self.bucket, self.at, self.forwards)
                .await?;
            for (commit, count) in &page {
                self.take(commit, *count, &mut out)?;
            }
            self.next_bucket(full).await?;
        }
        Ok(out)
    }

    /// Delivers the wanted events of `commit` into `out` and moves past it.
    fn take(
        &mut self,
        commit: &Commit,
        count: i32,
        out: &mut Vec<RecordedEvent>,
    ) -> Result<(), Error> {
        if count == 0 {
            // A void (a repair's fence) holds no events and is only ever at the head.
            if self.forwards {
                self.at = commit.first;
            }
            return Ok(());
        }
        let mut events = codec::events_of(commit)?;
        events.retain(|e| (self.lo..=self.hi).contains(&e.version.0));
        if !self.forwards {
            events.reverse();
        }
        let n = events.len().min(self.left);
        self.left -= n;
        out.extend(events.into_iter().take(n));
        if self.forwards {
            self.at = commit.first + count as u64;
        } else if commit.first == 0 {
            self.done = true;
        } else {
            self.at = commit.first - 1;
        }
        Ok(())
    }

    /// After a page: stays in the bucket while pages are `full`, else finds the next bucket to
    /// read or ends.
    async fn next_bucket(&mut self, full: bool) -> Result<(), Error> {
        if self.forwards {
            if full {
                return Ok(());
            }
            // The next commit, if any, starts in the bucket of its first version.
            let next = self.shared.bucket_of(self.at);
            if next == self.bucket {
                self.done = true;
            } else {
                self.bucket = next;
            }
        } else if !full && !self.done {
            // Earlier commits are in this bucket's predecessors.
            match self.shared.commit_holding(&self.stream, self.at).await? {
                Some(first) => self.bucket = self.shared.bucket_of(first),
                None => self.done = true,
            }
        }
        Ok(())
    }
}

/// The events of `stream` as `options` ask, a page of commits at a time as the caller pulls.
pub(crate) fn read_stream(
    shared: Arc<Shared>,
    stream: StreamId,
    options: ReadOptions,
) -> BoxStream<'static, Result<RecordedEvent, Error>> {
    stream::once(ReadCursor::open(shared, stream, options))
        .flat_map(|r| match r {
            Err(e) => error_stream(e),
            Ok(None) => stream::empty().boxed(),
            Ok(Some(cursor)) => pages(cursor),
        })
        .boxed()
}

fn pages(cursor: ReadCursor) -> BoxStream<'static, Result<RecordedEvent, Error>> {
    stream::unfold(Some(cursor), |cursor| async move {
        let mut cursor = cursor?;
        match cursor.page().await {
            Ok(events) if events.is_empty() => None,
            Ok(events) => Some((
                stream::iter(events.into_iter().map(Ok)).boxed(),
                Some(cursor),
            )),
            Err(e) => Some((error_stream(e), None)),
        }
    })
    .flatten()
    .boxed()
}
