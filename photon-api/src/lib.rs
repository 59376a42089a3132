#![doc = include_str!("../README.md")]

mod checkpoint;
mod error;
mod event;
mod opener;
mod register;
mod store;
mod stream_id;
mod subscription;
pub mod telemetry;
pub mod url;
pub mod validate;
mod version;

pub use checkpoint::Checkpoint;
pub use error::{AccessKind, BoxError, Error, Result};
pub use event::{
    ContentType, EventData, EventType, Headers, Metadata, Payload, RecordedEvent, Timestamp,
    MAX_EVENT_TYPE_LEN,
};
pub use opener::{
    batched, cursor_stream, now_start_wait, open_batched_subscription, open_subscription,
    SubscriptionCursor, SubscriptionRequest,
};
pub use register::{
    classify_save, validate_register, Register, MAX_REGISTER_NAME_LEN, MAX_REGISTER_VALUE,
};
pub use store::{error_stream, AppendResult, Capabilities, EventStore, EventStoreExt, Health};
pub use stream_id::{Category, StreamId, MAX_CATEGORY_LEN, MAX_ID_LEN};
pub use subscription::{
    Direction, ReadOptions, Selector, Start, SubscriptionBatch, SubscriptionItem, SubscriptionMode,
};
pub use version::{ExpectedVersion, Version};

/// Re-exported so backends and applications agree on one version.
pub use bytes::Bytes;
/// Re-exported so backends and applications agree on one version.
pub use uuid::Uuid;

#[cfg(test)]
mod dyn_tests {
    use super::*;
    use std::sync::Arc;

    // The trait must stay usable as a trait object, through Arc and Box alike.
    #[allow(dead_code)]
    fn takes_dyn(store: Arc<dyn EventStore>) -> Box<dyn EventStore> {
        Box::new(store)
    }
}
