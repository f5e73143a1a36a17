//! Per-tenant lifecycle policy: which idle rule a tenant's helper lives by,
//! and whether it is kept warm or launched ahead of its calls.
//!
//! A tenant's policy is, first match wins: the override set for it with
//! `Pool::set_tenant_policy`; else the configuration's `tenant_policies`
//! entry with the longest `prefix` of its id; else the pool's own
//! (`idle_policy`, `idle_timeout`). Each field of an override or an entry
//! that is left unset falls back to the pool's.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, MAX_DURATION};

/// How idle helpers are judged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum IdlePolicyKind {
    /// A helper idle for `idle_timeout` is quiesced. The default.
    #[default]
    Fixed,
    /// Per tenant, from the history of the gaps between its calls: an idle
    /// helper is kept while the gap since the last call is below a high
    /// percentile of that history (within the `adaptive` bounds), and a
    /// tenant with a regular history gets a helper launched shortly before
    /// its predicted next call.
    Adaptive,
}

/// A tenant's own lifecycle policy ([`Pool::set_tenant_policy`]); unset
/// fields are the pool's.
///
/// [`Pool::set_tenant_policy`]: crate::Pool::set_tenant_policy
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantPolicy {
    /// The idle rule for this tenant. Default: the pool's `idle_policy`.
    pub idle_policy: Option<IdlePolicyKind>,
    /// The fixed rule's timeout for this tenant. Default: the pool's
    /// `idle_timeout`.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Never quiesce this tenant's idle helper. It can still be closed to
    /// make room under `max_helpers` or the memory budget (the budget
    /// wins), recycled after `max_requests_per_helper`, or die.
    pub keep_warm: bool,
    /// Keep a helper bound to this tenant at all times: launched ahead of
    /// its first call (as soon as the policy applies to a tenant the pool
    /// knows), and again whenever it is lost (closed to make room, died:
    /// after the tenant's back-off). Implies `keep_warm`. It takes a slot
    /// under `max_helpers` like any helper, and is never launched over the
    /// memory budget.
    pub prewarm: bool,
}

/// An entry of `Config::tenant_policies`: the policy of every tenant whose
/// id starts with `prefix` (the longest matching prefix wins).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPolicyRule {
    /// A prefix of tenant ids (bytes of this UTF-8 string); `""` matches
    /// every tenant.
    pub prefix: String,
    /// As [`TenantPolicy::idle_policy`].
    #[serde(default)]
    pub idle_policy: Option<IdlePolicyKind>,
    /// As [`TenantPolicy::idle_timeout`].
    #[serde(default, with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// As [`TenantPolicy::keep_warm`].
    #[serde(default)]
    pub keep_warm: bool,
    /// As [`TenantPolicy::prewarm`].
    #[serde(default)]
    pub prewarm: bool,
}

impl TenantPolicyRule {
    /// The policy this entry gives its tenants.
    pub fn policy(&self) -> TenantPolicy {
        TenantPolicy {
            idle_policy: self.idle_policy,
            idle_timeout: self.idle_timeout,
            keep_warm: self.keep_warm,
            prewarm: self.prewarm,
        }
    }
}

impl TenantPolicy {
    /// Checks the fields; `field` names where the policy came from in the
    /// error (e.g. `tenant_policies[2].idle_timeout`).
    pub fn validate(&self, field: &'static str) -> Result<(), ConfigError> {
        if let Some(timeout) = self.idle_timeout
            && (timeout.is_zero() || timeout > MAX_DURATION)
        {
            return Err(ConfigError::new(
                field,
                format!("idle_timeout {timeout:?} is outside (0, 1 day]"),
            ));
        }
        Ok(())
    }
}

/// The idle rule a tenant's helper lives by, resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IdleRule {
    /// Quiesce after this long idle.
    Fixed(Duration),
    /// Ask the tenant's gap history.
    Adaptive,
}

/// A tenant's policy with every field resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Effective {
    pub(crate) idle: IdleRule,
    pub(crate) keep_warm: bool,
    pub(crate) prewarm: bool,
}

/// The pool-wide defaults a tenant policy falls back to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Defaults {
    pub(crate) idle_policy: IdlePolicyKind,
    pub(crate) idle_timeout: Duration,
}

/// The configuration entry with the longest prefix of `tenant`.
pub(crate) fn longest_rule<'a>(
    rules: &'a [TenantPolicyRule],
    tenant: &[u8],
) -> Option<&'a TenantPolicyRule> {
    rules
        .iter()
        .filter(|rule| tenant.starts_with(rule.prefix.as_bytes()))
        .max_by_key(|rule| rule.prefix.len())
}

/// Resolves a tenant's policy: its override, else its configuration entry,
/// else nothing; unset fields from `defaults`.
pub(crate) fn resolve(
    overridden: Option<&TenantPolicy>,
    rule: Option<&TenantPolicyRule>,
    defaults: Defaults,
) -> Effective {
    let policy = overridden
        .cloned()
        .or_else(|| rule.map(TenantPolicyRule::policy))
        .unwrap_or_default();
    let idle = match policy.idle_policy.unwrap_or(defaults.idle_policy) {
        IdlePolicyKind::Fixed => {
            IdleRule::Fixed(policy.idle_timeout.unwrap_or(defaults.idle_timeout))
        }
        IdlePolicyKind::Adaptive => IdleRule::Adaptive,
    };
    Effective {
        idle,
        keep_warm: policy.keep_warm || policy.prewarm,
        prewarm: policy.prewarm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: Defaults = Defaults {
        idle_policy: IdlePolicyKind::Fixed,
        idle_timeout: Duration::from_secs(300),
    };

    fn rule(prefix: &str, idle_timeout: Option<u64>) -> TenantPolicyRule {
        TenantPolicyRule {
            prefix: prefix.into(),
            idle_timeout: idle_timeout.map(Duration::from_secs),
            ..TenantPolicyRule::default()
        }
    }

    #[test]
    fn the_longest_prefix_wins_and_an_override_beats_every_prefix() {
        let rules = [
            rule("", Some(1)),
            rule("gold-", Some(2)),
            rule("gold-eu-", Some(3)),
        ];
        let of = |tenant: &[u8]| longest_rule(&rules, tenant).map(|r| r.prefix.as_str());
        assert_eq!(of(b"gold-eu-7"), Some("gold-eu-"));
        assert_eq!(of(b"gold-us-7"), Some("gold-"));
        assert_eq!(of(b"free-1"), Some(""));
        let timeout = |effective: Effective| match effective.idle {
            IdleRule::Fixed(timeout) => timeout.as_secs(),
            IdleRule::Adaptive => 0,
        };
        assert_eq!(
            timeout(resolve(None, longest_rule(&rules, b"gold-eu-7"), DEFAULTS)),
            3
        );
        let mine = TenantPolicy {
            idle_timeout: Some(Duration::from_secs(9)),
            ..TenantPolicy::default()
        };
        assert_eq!(
            timeout(resolve(
                Some(&mine),
                longest_rule(&rules, b"gold-eu-7"),
                DEFAULTS
            )),
            9
        );
        assert_eq!(timeout(resolve(None, None, DEFAULTS)), 300);
    }

    #[test]
    fn unset_fields_fall_back_and_prewarm_implies_keep_warm() {
        let adaptive = TenantPolicy {
            idle_policy: Some(IdlePolicyKind::Adaptive),
            ..TenantPolicy::default()
        };
        assert_eq!(
            resolve(Some(&adaptive), None, DEFAULTS).idle,
            IdleRule::Adaptive
        );
        let prewarm = TenantPolicy {
            prewarm: true,
            ..TenantPolicy::default()
        };
        let effective = resolve(Some(&prewarm), None, DEFAULTS);
        assert!(effective.keep_warm && effective.prewarm);
        assert_eq!(effective.idle, IdleRule::Fixed(Duration::from_secs(300)));
        let adaptive_pool = Defaults {
            idle_policy: IdlePolicyKind::Adaptive,
            ..DEFAULTS
        };
        assert_eq!(resolve(None, None, adaptive_pool).idle, IdleRule::Adaptive);
    }

    #[test]
    fn a_zero_or_huge_timeout_is_refused() {
        for bad in [Duration::ZERO, MAX_DURATION + Duration::from_secs(1)] {
            let policy = TenantPolicy {
                idle_timeout: Some(bad),
                ..TenantPolicy::default()
            };
            assert_eq!(
                policy.validate("tenant_policy").expect_err("refused").field,
                "tenant_policy"
            );
        }
    }
}
