//! Data-handling policies of orgs and keys: which deployments a request may reach.
//!
//! The org policy and the key policy both apply (a key can only narrow its org). A denial
//! names the rule, from a fixed set of texts, and never any part of the request.

use std::collections::HashSet;

use serde::Deserialize;

use crate::snapshot::Deployment;

/// `orgs[].policy` and `keys[].policy` in the snapshot. Every field is optional; the
/// defaults permit everything except, for an org, providers that train on submitted data
/// (`no_training` absent counts as true there: only an explicit `false`, the org owner's
/// audited choice in the control plane, lets such a provider serve the org).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyDoc {
    /// Vendors allowed; null means any.
    pub allow_vendors: Option<Vec<String>>,
    /// Vendors refused.
    pub deny_vendors: Vec<String>,
    /// Regions allowed; null means any.
    pub allow_regions: Option<Vec<String>>,
    /// Regions refused.
    pub deny_regions: Vec<String>,
    /// Model names allowed (public name or upstream model); null means any.
    pub allow_models: Option<Vec<String>>,
    /// Model names refused (public name or upstream model).
    pub deny_models: Vec<String>,
    /// Refuse providers that train on submitted data; absent: true for an org, false for
    /// a key (a key only narrows its org).
    pub no_training: Option<bool>,
    /// Refuse providers that are not zero-retention.
    pub zero_retention_only: bool,
    /// Org only: a client's W3C `traceparent` is continued in the gateway's traces, and
    /// the gateway sends its own to the upstream (docs/observability.md). Off by default:
    /// trace context crosses the relay only when the org asked for it.
    pub trace_context: bool,
}

/// Which policy a rule belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scope {
    Org,
    Key,
}

/// The rule that refused a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rule {
    Vendor,
    Region,
    Model,
    Training,
    Retention,
}

/// A refusal: the policy and the rule, rendered as a fixed text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Denial {
    pub(crate) scope: Scope,
    pub(crate) rule: Rule,
}

impl Denial {
    /// The client-facing message: written by the gateway, names only the rule.
    pub(crate) fn message(self) -> &'static str {
        // Each rule's text once, under both scopes' prefixes (still static strings).
        macro_rules! messages {
            ($($rule:ident => $text:literal,)*) => {
                match (self.scope, self.rule) {
                    $(
                        (Scope::Org, Rule::$rule) => concat!("org policy: ", $text),
                        (Scope::Key, Rule::$rule) => concat!("key policy: ", $text),
                    )*
                }
            };
        }
        messages! {
            Vendor => "vendor not allowed",
            Region => "region not allowed",
            Model => "model not allowed",
            Training => "no_training (provider may train on data)",
            Retention => "zero_retention_only (provider is not zero-retention)",
        }
    }
}

/// A compiled policy. Vendors and regions compare case-insensitively (lowercased once
/// here and in the provider); model names compare exactly.
#[derive(Debug, Clone, Default)]
pub(crate) struct Policy {
    allow_vendors: Option<HashSet<String>>,
    deny_vendors: HashSet<String>,
    allow_regions: Option<HashSet<String>>,
    deny_regions: HashSet<String>,
    allow_models: Option<HashSet<String>>,
    deny_models: HashSet<String>,
    no_training: bool,
    zero_retention_only: bool,
    /// Nothing to check: the common case costs one branch.
    permissive: bool,
}

fn lower_set(v: Vec<String>) -> HashSet<String> {
    v.into_iter().map(|s| s.to_ascii_lowercase()).collect()
}

impl Policy {
    pub(crate) fn compile(doc: PolicyDoc, scope: Scope) -> Policy {
        let no_training = doc.no_training.unwrap_or(scope == Scope::Org);
        let permissive = doc.allow_vendors.is_none()
            && doc.deny_vendors.is_empty()
            && doc.allow_regions.is_none()
            && doc.deny_regions.is_empty()
            && doc.allow_models.is_none()
            && doc.deny_models.is_empty()
            && !no_training
            && !doc.zero_retention_only;
        Policy {
            allow_vendors: doc.allow_vendors.map(lower_set),
            deny_vendors: lower_set(doc.deny_vendors),
            allow_regions: doc.allow_regions.map(lower_set),
            deny_regions: lower_set(doc.deny_regions),
            allow_models: doc.allow_models.map(|v| v.into_iter().collect()),
            deny_models: doc.deny_models.into_iter().collect(),
            no_training,
            zero_retention_only: doc.zero_retention_only,
            permissive,
        }
    }

    /// Whether this policy lets `d` serve; the first failing rule otherwise.
    pub(crate) fn check(&self, d: &Deployment) -> Result<(), Rule> {
        if self.permissive {
            return Ok(());
        }
        let p = &d.provider;
        if refused(&self.deny_vendors, self.allow_vendors.as_ref(), &p.vendor) {
            return Err(Rule::Vendor);
        }
        if refused(&self.deny_regions, self.allow_regions.as_ref(), &p.region) {
            return Err(Rule::Region);
        }
        let named =
            |set: &HashSet<String>| set.contains(&d.name) || set.contains(&d.upstream_model);
        if named(&self.deny_models) || self.allow_models.as_ref().is_some_and(|a| !named(a)) {
            return Err(Rule::Model);
        }
        if self.no_training && p.trains_on_data {
            return Err(Rule::Training);
        }
        if self.zero_retention_only && !p.zero_retention {
            return Err(Rule::Retention);
        }
        Ok(())
    }
}

/// Org policy first, then key policy: both must permit.
pub(crate) fn permits(org: &Policy, key: &Policy, d: &Deployment) -> Result<(), Denial> {
    org.check(d).map_err(|rule| Denial {
        scope: Scope::Org,
        rule,
    })?;
    key.check(d).map_err(|rule| Denial {
        scope: Scope::Key,
        rule,
    })
}

/// `value` is denied, or an allow-list is set and does not name it.
#[inline]
fn refused(deny: &HashSet<String>, allow: Option<&HashSet<String>>, value: &str) -> bool {
    deny.contains(value) || allow.is_some_and(|a| !a.contains(value))
}
