//! What a first read and a listing hold of a partition, against a real broker
//! (`PHOTON_TEST_KAFKA_URL`): a stream read in a partition this store has not indexed yet hands
//! out its first events after indexing a step of the partition, not all of it; a listing
//! builds no version index and holds a bounded window of names, yet lists every stream, sorted.
//! Each store here is fresh, so nothing but the call under test touches its indexes: the
//! observable is the bytes its indexes hold (`WriterStats::index_bytes`), not a time.

use futures::{StreamExt, TryStreamExt};
use photon_api::{
    Category, EventData, EventStore, EventStoreExt, ExpectedVersion, ReadOptions, StreamId, Uuid,
    Version,
};
use photon_conformance::server_url;
use photon_kafka::KafkaStore;

fn with_options(url: &str, options: &str) -> String {
    format!(
        "{url}{}{options}",
        if url.contains('?') { "&" } else { "?" }
    )
}

fn numbered(n: u64) -> EventData {
    EventData::json("Numbered", &serde_json::json!({ "n": n })).unwrap()
}

fn versions(events: &[photon_api::RecordedEvent]) -> Vec<u64> {
    events.iter().map(|e| e.version.0).collect()
}

/// Events behind the first stream in the one partition, and appends they come in.
const FILLER_EVENTS: u64 = 20_000;
const FILLER_APPEND: u64 = 500;
const FILLER_STREAMS: u64 = 8;

/// Issue 14 item 7: a first read of a stream at the start of a 20,000-event partition gets its
/// first event after the store indexed one step of the partition (before: the whole partition,
/// so its index then held as much as after the read). Reads that cross many steps, forwards,
/// backwards and from a version with a limit, deliver exactly their versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_read_yields_before_its_partition_is_indexed() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = format!("s{}", &Uuid::new_v4().simple().to_string()[..12]);
    let url = with_options(&url, &format!("prefix={prefix}&partitions=1"));
    let writer = KafkaStore::from_url(&url).await.unwrap();
    let first = StreamId::parse("big-first").unwrap();
    writer
        .append(
            &first,
            ExpectedVersion::NoStream,
            (0..3).map(numbered).collect(),
        )
        .await
        .unwrap();
    let fillers: Vec<StreamId> = (0..FILLER_STREAMS)
        .map(|i| StreamId::parse(format!("big-filler{i}")).unwrap())
        .collect();
    for a in 0..FILLER_EVENTS / FILLER_APPEND {
        let s = &fillers[(a % FILLER_STREAMS) as usize];
        let events = (0..FILLER_APPEND).map(|n| numbered(a * FILLER_APPEND + n));
        writer
            .append(s, ExpectedVersion::Any, events.collect())
            .await
            .unwrap();
    }

    let reader = KafkaStore::from_url(&url).await.unwrap();
    assert_eq!(reader.writer_stats().index_bytes, 0);
    let mut read = reader.read_stream(&first, ReadOptions::forwards());
    let e = read.next().await.unwrap().unwrap();
    assert_eq!(e.version, Version(0));
    let at_first = reader.writer_stats().index_bytes;
    let rest: Vec<_> = read.try_collect().await.unwrap();
    assert_eq!(versions(&rest), [1, 2]);
    // The whole partition indexed, for comparison.
    assert_eq!(
        reader.stream_version(&fillers[0]).await.unwrap(),
        Some(Version(FILLER_EVENTS / FILLER_STREAMS - 1))
    );
    let full = reader.writer_stats().index_bytes;
    assert!(
        at_first > 0 && at_first * 4 < full,
        "the first event came after indexing {at_first} bytes of the partition's {full}"
    );

    let per_stream = FILLER_EVENTS / FILLER_STREAMS;
    let fresh = KafkaStore::from_url(&url).await.unwrap();
    let forwards = fresh
        .read_to_vec(&fillers[3], ReadOptions::forwards())
        .await
        .unwrap();
    assert_eq!(versions(&forwards), (0..per_stream).collect::<Vec<_>>());
    let fresh = KafkaStore::from_url(&url).await.unwrap();
    let backwards = fresh
        .read_to_vec(&fillers[5], ReadOptions::backwards())
        .await
        .unwrap();
    assert_eq!(
        versions(&backwards),
        (0..per_stream).rev().collect::<Vec<_>>()
    );
    let fresh = KafkaStore::from_url(&url).await.unwrap();
    let window = fresh
        .read_to_vec(
            &fillers[6],
            ReadOptions::forwards()
                .from_version(Version(1_200))
                .limit(700),
        )
        .await
        .unwrap();
    assert_eq!(versions(&window), (1_200..1_900).collect::<Vec<_>>());
    let fresh = KafkaStore::from_url(&url).await.unwrap();
    let back_from = fresh
        .read_to_vec(
            &fillers[7],
            ReadOptions::backwards().from_version(Version(600)).limit(3),
        )
        .await
        .unwrap();
    assert_eq!(versions(&back_from), [600, 599, 598]);

    // Over `max_index_bytes`, a catch-up of another topic's partition between two steps of a
    // read bounds the indexes: the read's partition is pinned by the read, so its index is
    // kept (before, it was dropped and the read read the partition again from its start), and
    // the read delivers every version once. Once the read is over, the index may be dropped.
    let other = StreamId::parse("elsewhere-1").unwrap();
    writer
        .append(&other, ExpectedVersion::NoStream, vec![numbered(0)])
        .await
        .unwrap();
    let tight = KafkaStore::from_url(&with_options(&url, "max_index_bytes=1"))
        .await
        .unwrap();
    let mut read = tight.read_stream(&fillers[0], ReadOptions::forwards());
    let mut got = vec![read.next().await.unwrap().unwrap().version.0];
    let dropped = tight.writer_stats().indexes_dropped;
    assert_eq!(
        tight.stream_version(&other).await.unwrap(),
        Some(Version(0))
    );
    assert_eq!(
        tight.writer_stats().indexes_dropped,
        dropped,
        "the index of a partition a read was under way in was dropped between its steps"
    );
    while let Some(e) = read.next().await {
        got.push(e.unwrap().version.0);
    }
    assert_eq!(got, (0..per_stream).collect::<Vec<_>>());
    drop(read);
    tight
        .append(
            &other,
            ExpectedVersion::Exact(Version(0)),
            vec![numbered(1)],
        )
        .await
        .unwrap();
    assert!(
        tight.writer_stats().indexes_dropped > dropped,
        "the read's partition stayed pinned after the read"
    );
}

/// Events of the append a catch-up is cut off in: more than one poll of a task indexes
/// (tokio's budget yields the catch-up after at most 128 records).
const CUT_APPEND: u64 = 1_000;

/// Guarantee 2 (an append is visible whole or not at all, in every read): a catch-up cut off
/// inside an append (here a `stream_version` whose future is dropped after it indexed part of
/// one; an append's deadline or an `Unavailable` cut off the same way) leaves the index holding
/// the append's first events. A read that began before that append was committed delivers
/// all of it or none of it, never its first events as a finished read (before: it delivered
/// what was indexed and ended, since the index reached the stable end the read began at).
#[tokio::test(flavor = "current_thread")]
async fn a_read_never_ends_inside_an_append_a_cut_off_catch_up_left_half_indexed() {
    use std::task::Poll;
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = format!("s{}", &Uuid::new_v4().simple().to_string()[..12]);
    let url = with_options(&url, &format!("prefix={prefix}&partitions=1"));
    // The append comes from another process, as far as the reader's store knows.
    let writer = KafkaStore::from_url(&url).await.unwrap();
    let reader = KafkaStore::from_url(&url).await.unwrap();
    let s = StreamId::parse("half-1").unwrap();
    writer
        .append(
            &s,
            ExpectedVersion::NoStream,
            (0..5).map(numbered).collect(),
        )
        .await
        .unwrap();

    // The read begins (its stable end taken) and delivers versions 0 to 4.
    let mut read = reader.read_stream(&s, ReadOptions::forwards());
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(read.next().await.unwrap().unwrap().version.0);
    }
    assert_eq!(got, [0, 1, 2, 3, 4]);

    // Versions 5.. in one append, committed after the read began.
    writer
        .append(
            &s,
            ExpectedVersion::Exact(Version(4)),
            (5..5 + CUT_APPEND).map(numbered).collect(),
        )
        .await
        .unwrap();

    // A catch-up of the reader's store, dropped once it has indexed part of that append.
    let before = reader.writer_stats().index_bytes;
    {
        let mut version = Box::pin(reader.stream_version(&s));
        loop {
            match futures::poll!(version.as_mut()) {
                Poll::Ready(v) => panic!("the catch-up was not cut off: {v:?}"),
                Poll::Pending if reader.writer_stats().index_bytes > before => break,
                Poll::Pending => tokio::task::yield_now().await,
            }
        }
    }
    let grew = reader.writer_stats().index_bytes - before;
    assert!(
        grew > 0 && grew < 40 * CUT_APPEND as usize,
        "the catch-up indexed {grew} bytes, not part of the append"
    );

    let rest: Vec<u64> = read.map_ok(|e| e.version.0).try_collect().await.unwrap();
    let whole: Vec<u64> = (5..5 + CUT_APPEND).collect();
    assert!(
        rest.is_empty() || rest == whole,
        "the read delivered part of an append: versions {:?}..={:?} of 5..={}",
        rest.first(),
        rest.last(),
        4 + CUT_APPEND
    );
    // The index is whole again for the next reads.
    assert_eq!(
        reader.stream_version(&s).await.unwrap(),
        Some(Version(4 + CUT_APPEND))
    );
    let backwards: Vec<u64> = reader
        .read_to_vec(&s, ReadOptions::backwards())
        .await
        .unwrap()
        .iter()
        .map(|e| e.version.0)
        .collect();
    assert_eq!(backwards, (0..5 + CUT_APPEND).rev().collect::<Vec<_>>());
}

/// Issue 14 item 7: listing a category builds no version index (before: every partition's
/// whole index, kept afterwards), and with room for one name at a time (`max_index_bytes=1`)
/// still lists every stream once, sorted; a store whose indexes are built, or half built by a
/// read, lists the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listing_builds_no_index_and_holds_a_bounded_window() {
    let Some(url) = server_url("kafka", "PHOTON_TEST_KAFKA_URL") else {
        return;
    };
    let prefix = format!("s{}", &Uuid::new_v4().simple().to_string()[..12]);
    let url = with_options(&url, &format!("prefix={prefix}&partitions=3"));
    let writer = KafkaStore::from_url(&url).await.unwrap();
    let category = Category::new("listed").unwrap();
    let mut want: Vec<String> = (0..30).map(|i| format!("listed-{:x}", i * 7919)).collect();
    for (i, name) in want.iter().enumerate() {
        let s = StreamId::parse(name.as_str()).unwrap();
        let events = (0..=(i as u64 % 3)).map(numbered).collect();
        writer
            .append(&s, ExpectedVersion::NoStream, events)
            .await
            .unwrap();
    }
    want.sort();
    let list = |store: KafkaStore| {
        let category = category.clone();
        async move {
            let names: Vec<String> = store
                .list_streams(&category)
                .map_ok(|s| s.as_str().to_owned())
                .try_collect()
                .await
                .unwrap();
            (names, store.writer_stats().index_bytes)
        }
    };

    let (names, held) = list(KafkaStore::from_url(&url).await.unwrap()).await;
    assert_eq!(names, want);
    assert_eq!(held, 0, "a listing built version indexes");

    let one_at_a_time = with_options(&url, "max_index_bytes=1");
    let (names, held) = list(KafkaStore::from_url(&one_at_a_time).await.unwrap()).await;
    assert_eq!(names, want, "one name per pass");
    assert_eq!(held, 0);

    // The writer's indexes are built: they give the names.
    let (names, _) = list(writer.clone()).await;
    assert_eq!(names, want);

    // A read started on a fresh store (its partition's index part built) leaves the listing
    // whole.
    let half = KafkaStore::from_url(&url).await.unwrap();
    let mut read = half.read_stream(
        &StreamId::parse(want[0].as_str()).unwrap(),
        ReadOptions::forwards(),
    );
    read.next().await.unwrap().unwrap();
    drop(read);
    let (names, _) = list(half).await;
    assert_eq!(names, want);
}
