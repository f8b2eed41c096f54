//! The per-request counts and latency histogram, kept in per-thread shards of plain atomics
//! and summed at scrape time.
//!
//! Every answered request is counted, on whichever runtime thread served it. With one set of
//! shared atomics (a prometheus counter and histogram) each count moved the same cache lines
//! between cores, on every request; a shard is written by the threads mapped to it (one, as
//! long as there are no more threads than shards), so its lines stay in that core's cache.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus::proto::{self, MetricFamily, MetricType};

/// Shards: more than the runtime threads a node has on machines it runs on.
const SHARDS: usize = 16;

/// One thread's counts. `COUNTS` counters by slot, and per route a latency histogram of
/// `BUCKETS + 1` non-cumulative buckets (the last past every bound) and a sum.
#[repr(align(128))]
struct Shard<const COUNTS: usize, const ROUTES: usize, const BUCKETS: usize> {
    counts: [AtomicU64; COUNTS],
    buckets: [[AtomicU64; BUCKETS]; ROUTES],
    overflow: [AtomicU64; ROUTES],
    nanos: [AtomicU64; ROUTES],
}

impl<const COUNTS: usize, const ROUTES: usize, const BUCKETS: usize>
    Shard<COUNTS, ROUTES, BUCKETS>
{
    fn new() -> Self {
        Shard {
            counts: [const { AtomicU64::new(0) }; COUNTS],
            buckets: [const { [const { AtomicU64::new(0) }; BUCKETS] }; ROUTES],
            overflow: [const { AtomicU64::new(0) }; ROUTES],
            nanos: [const { AtomicU64::new(0) }; ROUTES],
        }
    }
}

/// Counters by slot and a latency histogram by route, with `BUCKETS` upper bounds.
pub(super) struct RequestStats<const COUNTS: usize, const ROUTES: usize, const BUCKETS: usize> {
    shards: Box<[Shard<COUNTS, ROUTES, BUCKETS>]>,
    /// The buckets' upper bounds, in seconds and in nanoseconds.
    bounds: [f64; BUCKETS],
    bound_nanos: [u64; BUCKETS],
}

thread_local! {
    /// The shard this thread counts into.
    static SHARD: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS
    };
}

impl<const COUNTS: usize, const ROUTES: usize, const BUCKETS: usize>
    RequestStats<COUNTS, ROUTES, BUCKETS>
{
    pub(super) fn new(bounds: [f64; BUCKETS]) -> Self {
        RequestStats {
            shards: (0..SHARDS).map(|_| Shard::new()).collect(),
            bound_nanos: bounds.map(|seconds| (seconds * 1e9).round() as u64),
            bounds,
        }
    }

    /// Counts one request in counter `slot` (if any) and its latency under `route`.
    pub(super) fn record(&self, slot: Option<usize>, route: usize, elapsed: Duration) {
        let shard = &self.shards[SHARD.with(|shard| *shard)];
        if let Some(counter) = slot.and_then(|slot| shard.counts.get(slot)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        let (Some(buckets), Some(overflow), Some(sum)) = (
            shard.buckets.get(route),
            shard.overflow.get(route),
            shard.nanos.get(route),
        ) else {
            return;
        };
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        // The first bucket whose bound the latency does not pass, as prometheus counts.
        let bucket = self.bound_nanos.partition_point(|&bound| bound < nanos);
        buckets
            .get(bucket)
            .unwrap_or(overflow)
            .fetch_add(1, Ordering::Relaxed);
        sum.fetch_add(nanos, Ordering::Relaxed);
    }

    /// The sum of one atomic over every shard.
    fn total(&self, read: impl Fn(&Shard<COUNTS, ROUTES, BUCKETS>) -> &AtomicU64) -> u64 {
        self.shards
            .iter()
            .map(|shard| read(shard).load(Ordering::Acquire))
            .sum()
    }

    /// Takes every counter's count since the last take, by slot (zero counts left out).
    pub(super) fn take_counts(&self) -> Vec<(usize, u64)> {
        (0..COUNTS)
            .filter_map(|slot| {
                let taken: u64 = self
                    .shards
                    .iter()
                    .map(|shard| shard.counts[slot].swap(0, Ordering::AcqRel))
                    .sum();
                (taken > 0).then_some((slot, taken))
            })
            .collect()
    }

    /// The latency histograms as one prometheus family, a metric per route labelled
    /// `label=<route_names[i]>`.
    pub(super) fn histogram_family(
        &self,
        name: &str,
        help: &str,
        label: &str,
        route_names: [&str; ROUTES],
    ) -> MetricFamily {
        let metrics = route_names
            .iter()
            .enumerate()
            .map(|(route, route_name)| {
                let mut cumulative = 0;
                let buckets = (0..BUCKETS)
                    .map(|bucket| {
                        cumulative += self.total(|shard| &shard.buckets[route][bucket]);
                        let mut out = proto::Bucket::default();
                        out.set_upper_bound(self.bounds[bucket]);
                        out.set_cumulative_count(cumulative);
                        out
                    })
                    .collect();
                let count = cumulative + self.total(|shard| &shard.overflow[route]);
                let nanos = self.total(|shard| &shard.nanos[route]);
                let mut histogram = proto::Histogram::default();
                histogram.set_bucket(buckets);
                histogram.set_sample_count(count);
                histogram.set_sample_sum(nanos as f64 / 1e9);
                let mut pair = proto::LabelPair::default();
                pair.set_name(label.to_string());
                pair.set_value(route_name.to_string());
                let mut metric = proto::Metric::from_label(vec![pair]);
                metric.set_histogram(histogram);
                metric
            })
            .collect();
        let mut family = MetricFamily::default();
        family.set_name(name.to_string());
        family.set_help(help.to_string());
        family.set_field_type(MetricType::HISTOGRAM);
        family.set_metric(metrics);
        family
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_taken_once_and_latencies_land_in_prometheus_buckets() {
        let stats: RequestStats<4, 2, 3> = RequestStats::new([0.001, 0.01, 0.1]);
        let ms = Duration::from_millis;
        stats.record(Some(1), 0, ms(1)); // on a bound: counted in it
        stats.record(Some(1), 0, ms(5));
        stats.record(None, 0, ms(2_000)); // past every bound
        stats.record(Some(3), 1, Duration::from_micros(10));
        // Counts from other threads land in other shards; the take sums them.
        std::thread::scope(|scope| {
            scope.spawn(|| stats.record(Some(1), 1, ms(50)));
        });
        assert_eq!(stats.take_counts(), vec![(1, 3), (3, 1)]);
        assert_eq!(stats.take_counts(), vec![], "a count is taken once");
        let family = stats.histogram_family("h", "help", "route", ["a", "b"]);
        assert_eq!(family.get_field_type(), MetricType::HISTOGRAM);
        let routes: Vec<_> = family
            .get_metric()
            .iter()
            .map(|metric| {
                let histogram = metric.get_histogram();
                let cumulative: Vec<u64> = histogram
                    .get_bucket()
                    .iter()
                    .map(|bucket| bucket.cumulative_count())
                    .collect();
                let label = metric.get_label()[0].value().to_string();
                (label, cumulative, histogram.get_sample_count())
            })
            .collect();
        assert_eq!(
            routes,
            vec![
                ("a".to_string(), vec![1, 2, 2], 3),
                ("b".to_string(), vec![1, 1, 2], 2),
            ]
        );
        let sum = family.get_metric()[0].get_histogram().get_sample_sum();
        assert!((sum - 2.006).abs() < 1e-9, "sum {sum}");
    }
}
