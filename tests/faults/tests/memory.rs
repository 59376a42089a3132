//! The fault scenarios that apply in one process: concurrent writers, cancelled appends, slow
//! consumers and `Hot` from now (memory has no network, server or writer process to break).

use photon_faults::scenarios;
use photon_faults::target::Target;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers() {
    scenarios::concurrent_writers(&Target::memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_appends() {
    scenarios::cancelled_appends(&Target::memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_consumers() {
    scenarios::slow_consumers(&Target::memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_start_now() {
    scenarios::hot_start_now(&Target::memory()).await;
}

/// The same scenarios on a memory store that plays production's faults: the harness and its
/// checker must hold there too, and they are what an application's own tests would meet.
mod weak {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers() {
        scenarios::concurrent_writers(&Target::weak_memory(13, "")).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn cancelled_appends() {
        scenarios::cancelled_appends(&Target::weak_memory(14, "")).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn hot_start_now() {
        // A Hot subscription that drops cannot resume where it was (it has no start but now),
        // so this one keeps its subscriptions.
        scenarios::hot_start_now(&Target::weak_memory(15, "&subscription_drop=0")).await;
    }
}
