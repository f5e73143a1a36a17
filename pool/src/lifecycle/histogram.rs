//! The per-tenant histogram of idle gaps.

use std::time::Duration;

/// Number of buckets of a [`GapHistogram`]: 69 log-spaced buckets from
/// 100 ms to about 4.3 h (four per doubling), then one for longer gaps.
pub const BUCKETS: usize = 70;

/// Bucket bounds of the first doubling, in milliseconds: 100 ms times
/// 2^(0/4), 2^(1/4), 2^(2/4), 2^(3/4), rounded.
const MANTISSAS: [u64; 4] = [100, 119, 141, 168];

/// The lower bound of bucket `index` (0 for the first), in milliseconds;
/// `index == BUCKETS - 1` is the start of the overflow bucket.
const fn lower_ms(index: usize) -> u64 {
    if index == 0 {
        0
    } else {
        MANTISSAS[index % 4] << (index / 4)
    }
}

/// Where the histogram's finite buckets end: gaps at least this long all go
/// into the last (overflow) bucket. About 4 h 20 min.
pub const HISTOGRAM_RANGE: Duration = Duration::from_millis(lower_ms(BUCKETS - 1));

/// A fixed-size histogram of idle gaps: [`BUCKETS`] log-spaced buckets (four
/// per doubling, each about 19% wider than the last, from 100 ms to
/// [`HISTOGRAM_RANGE`], then one bucket for longer gaps), with 8-bit counts.
///
/// Aging: when a bucket would pass 255, every bucket is halved (rounding
/// down, so a gap seen once long ago is forgotten). The histogram therefore
/// weighs roughly a tenant's last few hundred gaps, and a tenant whose gaps
/// grow is followed within a handful of gaps (the new tail needs only 1% of
/// at most 70 x 255 counts, in practice a few); 16-bit counts would hold
/// 65,535 gaps in a bucket before any aging and take hundreds of cold starts
/// to notice the same change.
///
/// 72 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GapHistogram {
    counts: [u8; BUCKETS],
    /// Sum of `counts` (at most 70 x 255).
    total: u16,
}

impl Default for GapHistogram {
    fn default() -> Self {
        GapHistogram::new()
    }
}

impl GapHistogram {
    /// An empty histogram.
    pub const fn new() -> Self {
        GapHistogram {
            counts: [0; BUCKETS],
            total: 0,
        }
    }

    /// The bucket a gap falls in.
    pub fn bucket_of(gap: Duration) -> usize {
        let ms = u64::try_from(gap.as_millis()).unwrap_or(u64::MAX);
        // The first bucket whose upper bound is above `ms`.
        (1..BUCKETS)
            .find(|&index| ms < lower_ms(index))
            .map_or(BUCKETS - 1, |upper| upper - 1)
    }

    /// The lower bound of a bucket (zero for the first).
    pub fn lower_bound(bucket: usize) -> Duration {
        Duration::from_millis(lower_ms(bucket.min(BUCKETS - 1)))
    }

    /// The upper bound of a bucket (exclusive); [`Duration::MAX`] for the
    /// overflow bucket.
    pub fn upper_bound(bucket: usize) -> Duration {
        if bucket + 1 >= BUCKETS {
            Duration::MAX
        } else {
            Duration::from_millis(lower_ms(bucket + 1))
        }
    }

    /// Records one gap, halving every bucket first if its bucket is full.
    pub fn record(&mut self, gap: Duration) {
        let bucket = Self::bucket_of(gap);
        if self.counts[bucket] == u8::MAX {
            self.halve();
        }
        self.counts[bucket] += 1;
        self.total += 1;
    }

    /// Halves every bucket (rounding down): the aging step.
    pub fn halve(&mut self) {
        let mut total = 0;
        for count in &mut self.counts {
            *count /= 2;
            total += u16::from(*count);
        }
        self.total = total;
    }

    /// The weight of the histogram: gaps recorded, less what aging took.
    pub fn total(&self) -> u32 {
        u32::from(self.total)
    }

    /// The count of one bucket.
    pub fn count(&self, bucket: usize) -> u8 {
        self.counts.get(bucket).copied().unwrap_or(0)
    }

    /// The bucket holding the `q` quantile: the smallest bucket at which the
    /// cumulative count reaches `ceil(q * total)` (at least one gap). `None`
    /// when the histogram is empty; `q` is clamped to `[0, 1]`.
    pub fn quantile_bucket(&self, q: f64) -> Option<usize> {
        if self.total == 0 {
            return None;
        }
        let total = f64::from(self.total);
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        // Rank of the wanted gap, 1-based; a product a rounding error above
        // an integer (0.99 * 100) counts as that integer.
        let rank = ((q * total) - 1e-9).ceil().clamp(1.0, total) as u32;
        let mut seen = 0u32;
        for (bucket, &count) in self.counts.iter().enumerate() {
            seen += u32::from(count);
            if seen >= rank {
                return Some(bucket);
            }
        }
        Some(BUCKETS - 1)
    }

    /// A high percentile, rounded up: the upper bound of the bucket holding
    /// the `q` quantile ([`Duration::MAX`] if that is the overflow bucket).
    /// `None` when empty.
    pub fn percentile_upper(&self, q: f64) -> Option<Duration> {
        self.quantile_bucket(q).map(Self::upper_bound)
    }

    /// A low percentile, rounded down: the lower bound of the bucket
    /// holding the `q` quantile. `None` when empty.
    pub fn percentile_lower(&self, q: f64) -> Option<Duration> {
        self.quantile_bucket(q).map(Self::lower_bound)
    }
}
