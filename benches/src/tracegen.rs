//! Synthetic call traces for [`replay`](crate::replay), deterministic for a
//! seed; the library behind `sandpool-tracegen`.
//!
//! Four kinds of tenant, drawn per tenant from its own random stream (a
//! tenant's calls depend only on the seed and its number, not on how many
//! other tenants there are, once its kind is given):
//!
//! - **steady**: calls all the time, gaps exponential with a mean of 1 to
//!   10 s (drawn per tenant);
//! - **periodic**: a burst of 1 to 5 calls (0.2 to 3 s apart) every period,
//!   the period 4 to 10 minutes (per tenant) with +-15% jitter per gap: longer
//!   than a 180 s timeout, so a fixed 180 s policy cold-starts nearly every
//!   period (the pattern of issue 15);
//! - **bursty**: clusters of 3 to 30 calls (exponential gaps, mean 2 s),
//!   separated by random long gaps, log-uniform from 1 minute to 2 hours;
//! - **rare**: a few calls a day (2 to 6 a day per tenant, Poisson), each a
//!   single call.
//!
//! Each tenant starts at a random point of its first gap.

use std::fmt::Write as _;

use thiserror::Error;

/// splitmix64 (Steele, Lea and Flood): a tiny, fast, well-mixed generator,
/// enough for traces; no dependency.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[low, high)`.
    pub fn range(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    /// Uniform integer in `low..=high`.
    pub fn int(&mut self, low: u32, high: u32) -> u32 {
        low + (self.next_u64() % u64::from(high - low + 1)) as u32
    }

    /// Exponential with the given mean.
    pub fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }

    /// Log-uniform in `[low, high)`.
    pub fn log_uniform(&mut self, low: f64, high: f64) -> f64 {
        low * (high / low).powf(self.unit())
    }
}

/// A kind of tenant (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Calls every few seconds.
    Steady,
    /// A burst every 4 to 10 minutes.
    Periodic,
    /// Clusters with random long gaps.
    Bursty,
    /// A few calls a day.
    Rare,
}

impl Kind {
    /// Every kind, in the order of `--mix`.
    pub const ALL: [Kind; 4] = [Kind::Steady, Kind::Periodic, Kind::Bursty, Kind::Rare];

    /// The name in `--mix` and in tenant names.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Steady => "steady",
            Kind::Periodic => "periodic",
            Kind::Bursty => "bursty",
            Kind::Rare => "rare",
        }
    }
}

/// The share of each kind among the tenants (weights; they need not sum
/// to 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mix {
    /// Weight of each of [`Kind::ALL`].
    pub weights: [f64; 4],
}

impl Default for Mix {
    /// `steady=0.2,periodic=0.3,bursty=0.3,rare=0.2`.
    fn default() -> Self {
        Mix {
            weights: [0.2, 0.3, 0.3, 0.2],
        }
    }
}

/// A `--mix` value could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ParseMixError {
    /// An entry is not `kind=weight`.
    #[error("mix entry {0:?} is not kind=weight")]
    Entry(String),
    /// An unknown kind.
    #[error("unknown tenant kind {0:?} (steady, periodic, bursty, rare)")]
    Kind(String),
    /// A weight that is not a finite non-negative number.
    #[error("weight {0:?} is not a non-negative number")]
    Weight(String),
    /// Every weight is zero.
    #[error("every weight is zero")]
    Empty,
}

impl std::str::FromStr for Mix {
    type Err = ParseMixError;

    /// `steady=..,periodic=..,bursty=..,rare=..`; kinds left out weigh 0.
    fn from_str(text: &str) -> Result<Mix, ParseMixError> {
        let mut weights = [0.0; 4];
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (kind, weight) = entry
                .split_once('=')
                .ok_or_else(|| ParseMixError::Entry(entry.to_owned()))?;
            let slot = Kind::ALL
                .iter()
                .position(|k| k.name() == kind.trim())
                .ok_or_else(|| ParseMixError::Kind(kind.trim().to_owned()))?;
            let value: f64 = weight
                .trim()
                .parse()
                .ok()
                .filter(|w: &f64| w.is_finite() && *w >= 0.0)
                .ok_or_else(|| ParseMixError::Weight(weight.trim().to_owned()))?;
            weights[slot] = value;
        }
        if weights.iter().all(|&w| w == 0.0) {
            return Err(ParseMixError::Empty);
        }
        Ok(Mix { weights })
    }
}

impl Mix {
    /// How many of `tenants` are of each kind: proportional to the weights,
    /// rounded by largest remainder (ties to the earlier kind).
    pub fn counts(&self, tenants: usize) -> [usize; 4] {
        let sum: f64 = self.weights.iter().sum();
        let exact = self.weights.map(|w| w / sum * tenants as f64);
        let mut counts = exact.map(|x| x.floor() as usize);
        let mut left = tenants - counts.iter().sum::<usize>();
        let mut order = [0, 1, 2, 3];
        order.sort_by(|&a, &b| {
            (exact[b] - exact[b].floor())
                .total_cmp(&(exact[a] - exact[a].floor()))
                .then(a.cmp(&b))
        });
        for &slot in order.iter().cycle() {
            if left == 0 {
                break;
            }
            if self.weights[slot] > 0.0 {
                counts[slot] += 1;
                left -= 1;
            }
        }
        counts
    }
}

/// The calls of one tenant of `kind` over `duration_s` seconds, sorted.
pub fn tenant_calls(kind: Kind, rng: &mut SplitMix64, duration_s: f64) -> Vec<f64> {
    let mut calls = Vec::new();
    match kind {
        Kind::Steady => {
            let mean = rng.range(1.0, 10.0);
            let mut at = rng.exp(mean);
            while at < duration_s {
                calls.push(at);
                at += rng.exp(mean);
            }
        }
        Kind::Periodic => {
            let period = rng.range(240.0, 600.0);
            let mut at = rng.range(0.0, period);
            while at < duration_s {
                let mut call = at;
                for _ in 0..rng.int(1, 5) {
                    if call < duration_s {
                        calls.push(call);
                    }
                    call += rng.range(0.2, 3.0);
                }
                at += period * rng.range(0.85, 1.15);
            }
        }
        Kind::Bursty => {
            let mut at = rng.log_uniform(60.0, 7200.0) * rng.unit();
            while at < duration_s {
                let mut call = at;
                for _ in 0..rng.int(3, 30) {
                    if call < duration_s {
                        calls.push(call);
                    }
                    call += rng.exp(2.0);
                }
                at = call + rng.log_uniform(60.0, 7200.0);
            }
        }
        Kind::Rare => {
            let mean_gap = 86_400.0 / rng.range(2.0, 6.0);
            let mut at = rng.exp(mean_gap);
            while at < duration_s {
                calls.push(at);
                at += rng.exp(mean_gap);
            }
        }
    }
    calls
}

/// A whole trace, in the format [`parse_trace`](crate::replay::parse_trace)
/// reads, with a comment header naming the parameters. Tenants are named
/// `KIND-NNNN`. Times are written to the millisecond.
pub fn generate(seed: u64, tenants: usize, hours: f64, mix: &Mix) -> String {
    let duration_s = hours * 3600.0;
    let counts = mix.counts(tenants);
    let mut calls: Vec<(u64, usize)> = Vec::new();
    let mut names = Vec::with_capacity(tenants);
    let mut number = 0usize;
    for (slot, &count) in counts.iter().enumerate() {
        let kind = Kind::ALL[slot];
        for _ in 0..count {
            // Each tenant's own stream: seed and tenant number, mixed.
            let mut rng =
                SplitMix64::new(seed ^ (number as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03));
            rng.next_u64();
            names.push(format!("{}-{number:04}", kind.name()));
            calls.extend(
                tenant_calls(kind, &mut rng, duration_s)
                    .into_iter()
                    .map(|at| ((at * 1000.0).round() as u64, number)),
            );
            number += 1;
        }
    }
    calls.sort_unstable();
    let mut out = String::with_capacity(calls.len() * 20 + 200);
    let weights = mix.weights;
    let _ = writeln!(
        out,
        "# sandpool-tracegen --seed {seed} --tenants {tenants} --hours {hours} --mix steady={},periodic={},bursty={},rare={}",
        weights[0], weights[1], weights[2], weights[3]
    );
    let _ = writeln!(
        out,
        "# tenants: {} steady, {} periodic, {} bursty, {} rare; {} calls",
        counts[0],
        counts[1],
        counts[2],
        counts[3],
        calls.len()
    );
    for (ms, tenant) in calls {
        let _ = writeln!(out, "{}.{:03},{}", ms / 1000, ms % 1000, names[tenant]);
    }
    out
}
