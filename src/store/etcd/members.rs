//! [`run`]: keeps the client's balancer on the members that answer.
//!
//! etcd-client balances requests over every endpoint with a power-of-two
//! choice on pending requests. A dead member answers at once (connection
//! refused), so it looks the least loaded and draws a share of the
//! requests that all fail: with one of three members down, about a quarter
//! of the requests failed in a test here, and the retries that covered
//! them made every call slower and some run out of their deadline. This
//! task asks every member, on its own connection, for a linearizable read
//! each interval; a member that does not answer within the request timeout
//! (dead, frozen, or cut off from the leader) is taken out of the balancer
//! until it answers again.
//!
//! # Invariants
//!
//! - A member is out of the balancer only while another one answered the
//!   last round: when none answers, every member is back in, so requests
//!   still reach whichever recovers first.
//! - The task holds no lock; it ends when the store's stop token is
//!   cancelled (the store dropped).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use etcd_client::{Client, ConnectOptions, GetOptions, KvClient};
use tokio::time::{Duration, timeout};
use tokio_util::sync::CancellationToken;

/// What the task counts, for `EtcdStore::stats`.
#[derive(Debug, Default)]
pub(super) struct MemberCounters {
    /// Members out of the balancer now.
    pub(super) excluded: AtomicU64,
    /// Times a member was taken out.
    pub(super) exclusions: AtomicU64,
}

/// One member: its endpoint as the balancer knows it, and its own client.
struct Member {
    endpoint: String,
    kv: KvClient,
    excluded: bool,
}

/// The endpoint as etcd-client keys it in its balancer (`http://` added
/// when no scheme is given, as it does when connecting).
fn normalized(endpoint: &str) -> String {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    }
}

/// Connects one client per endpoint (lazily: nothing is sent yet). `None`
/// with fewer than two endpoints: there is nothing to fail over to.
pub(super) async fn members(
    endpoints: &[String],
    options: &ConnectOptions,
) -> Result<Option<Vec<(String, KvClient)>>, etcd_client::Error> {
    if endpoints.len() < 2 {
        return Ok(None);
    }
    let mut members = Vec::with_capacity(endpoints.len());
    for endpoint in endpoints {
        let client = Client::connect([endpoint], Some(options.clone())).await?;
        members.push((normalized(endpoint), client.kv_client()));
    }
    Ok(Some(members))
}

/// The task: a round of reads every `interval`, each bounded by `patience`.
pub(super) async fn run(
    client: Client,
    members: Vec<(String, KvClient)>,
    probe: Vec<u8>,
    interval: Duration,
    patience: Duration,
    stop: CancellationToken,
    counters: Arc<MemberCounters>,
) {
    let mut members: Vec<Member> = members
        .into_iter()
        .map(|(endpoint, kv)| Member {
            endpoint,
            kv,
            excluded: false,
        })
        .collect();
    loop {
        let answers = futures::future::join_all(members.iter().map(|member| {
            let mut kv = member.kv.clone();
            let probe = probe.clone();
            async move {
                let read = kv.get(probe, Some(GetOptions::new().with_count_only()));
                matches!(timeout(patience, read).await, Ok(Ok(_)))
            }
        }))
        .await;
        let any = answers.iter().any(|answered| *answered);
        for (member, answered) in members.iter_mut().zip(answers) {
            let exclude = any && !answered;
            if exclude && !member.excluded {
                if client.remove_endpoint(&member.endpoint).await.is_ok() {
                    tracing::warn!(
                        endpoint = %member.endpoint,
                        "etcd member does not answer; requests avoid it until it does"
                    );
                    member.excluded = true;
                    counters.exclusions.fetch_add(1, Ordering::Relaxed);
                }
            } else if !exclude
                && member.excluded
                && client.add_endpoint(&member.endpoint).await.is_ok()
            {
                tracing::info!(endpoint = %member.endpoint, "etcd member answers again");
                member.excluded = false;
            }
        }
        let excluded = members.iter().filter(|member| member.excluded).count();
        counters.excluded.store(
            u64::try_from(excluded).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::normalized;

    #[test]
    fn endpoints_are_keyed_as_the_balancer_keys_them() {
        assert_eq!(normalized("127.0.0.1:2379"), "http://127.0.0.1:2379");
        assert_eq!(normalized("http://a:1"), "http://a:1");
        assert_eq!(normalized("https://a:1"), "https://a:1");
    }
}
