use std::net::SocketAddr;

use crate::{FieldErrors, Name};

/// What kind of transport a WAN link is. The kind feeds link preferences in policies and is the
/// last tie-break of the `lowest-cost` steering mode.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum LinkKind {
    Mpls,
    Broadband,
    Lte,
    Satellite,
    Other,
}

impl LinkKind {
    pub const ALL: [LinkKind; 5] = [
        LinkKind::Mpls,
        LinkKind::Broadband,
        LinkKind::Lte,
        LinkKind::Satellite,
        LinkKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Mpls => "mpls",
            LinkKind::Broadband => "broadband",
            LinkKind::Lte => "lte",
            LinkKind::Satellite => "satellite",
            LinkKind::Other => "other",
        }
    }

    /// Usual marginal cost order when the operator gave no per-GB cost: flat-rate broadband
    /// first, then MPLS (flat but scarce), other, satellite, and LTE (usually metered) last.
    pub fn cost_rank(self) -> u8 {
        match self {
            LinkKind::Broadband => 0,
            LinkKind::Mpls => 1,
            LinkKind::Other => 2,
            LinkKind::Satellite => 3,
            LinkKind::Lte => 4,
        }
    }
}

fn default_mtu() -> u16 {
    1500
}

fn default_priority() -> u8 {
    100
}

/// A WAN link of a site.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub name: Name,
    pub kind: LinkKind,
    /// Where peers reach this link (`ip:port`), when it has a stable public address.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "198.51.100.1:51820"))]
    pub endpoint: Option<SocketAddr>,
    /// Upstream and downstream capacity in kbit/s, when known. `load-balance` spreads flows in
    /// proportion to the capacity of each path; unknown capacity counts as equal shares.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub up_kbps: Option<u64>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub down_kbps: Option<u64>,
    /// Flat monthly price (any one currency across the deployment).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0))]
    pub monthly_cost: Option<f64>,
    /// Price per GB transferred, for metered links. This, not the flat price, is what makes a
    /// link expensive to *use*, so `lowest-cost` orders by it.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0))]
    pub cost_per_gb: Option<f64>,
    /// Metered links (LTE with a data cap, say) are used last by `lowest-cost` and can be
    /// avoided or forbidden per policy.
    #[serde(default)]
    pub metered: bool,
    /// Operator preference among otherwise equal links: lower is preferred.
    #[serde(default = "default_priority")]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 255))]
    pub priority: u8,
    /// The IP MTU of the underlay on this link.
    #[serde(default = "default_mtu")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1280, maximum = 9216))]
    pub mtu: u16,
}

impl Link {
    /// A link with the given name and kind and every optional field at its default.
    pub fn new(name: Name, kind: LinkKind) -> Self {
        Self {
            name,
            kind,
            endpoint: None,
            up_kbps: None,
            down_kbps: None,
            monthly_cost: None,
            cost_per_gb: None,
            metered: false,
            priority: default_priority(),
            mtu: default_mtu(),
        }
    }

    pub fn validate(&self) -> Result<(), FieldErrors> {
        let mut errs = FieldErrors::default();
        for (field, v) in [
            ("monthly_cost", self.monthly_cost),
            ("cost_per_gb", self.cost_per_gb),
        ] {
            if let Some(v) = v {
                if !v.is_finite() || v < 0.0 {
                    errs.push(field, format!("must be a finite number >= 0, got {v}"));
                }
            }
        }
        for (field, v) in [("up_kbps", self.up_kbps), ("down_kbps", self.down_kbps)] {
            if v == Some(0) {
                errs.push(field, "must be > 0 when given (leave it out when unknown)");
            }
        }
        if !(1280..=9216).contains(&self.mtu) {
            errs.push(
                "mtu",
                format!("must be within 1280..=9216, got {}", self.mtu),
            );
        }
        errs.into_result()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_link_document_gets_defaults() {
        let l: Link = serde_json::from_str(r#"{"name":"inet","kind":"broadband"}"#).unwrap();
        assert_eq!(
            l,
            Link::new(Name::new("inet").unwrap(), LinkKind::Broadband)
        );
        assert!(l.validate().is_ok());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = serde_json::from_str::<Link>(r#"{"name":"inet","kind":"broadband","colour":1}"#)
            .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let mut l = Link::new(Name::new("lte").unwrap(), LinkKind::Lte);
        l.cost_per_gb = Some(-1.0);
        l.mtu = 500;
        let errs = l.validate().unwrap_err();
        let fields: Vec<_> = errs.0.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["cost_per_gb", "mtu"]);
    }
}
