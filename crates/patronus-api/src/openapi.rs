//! OpenAPI schemas for the types that serialize as strings of their own syntax (feature
//! `openapi`); the structs and enums derive theirs.

use std::borrow::Cow;

use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::{PartialSchema, ToSchema};

use crate::{Dscp, Name, PortRange, Prefix, Protocol, WgPublicKey};

fn string(description: &str, pattern: Option<&str>, example: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .pattern(pattern)
        .examples([example])
        .into()
}

fn string_or_number(description: &str, example: &str) -> RefOr<Schema> {
    OneOfBuilder::new()
        .item(ObjectBuilder::new().schema_type(Type::String))
        .item(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .minimum(Some(0)),
        )
        .description(Some(description))
        .examples([example])
        .into()
}

macro_rules! schema {
    ($t:ty, $name:literal, $body:expr) => {
        impl PartialSchema for $t {
            fn schema() -> RefOr<Schema> {
                $body
            }
        }
        impl ToSchema for $t {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
        }
    };
}

schema!(
    Name,
    "Name",
    string(
        "1 to 63 letters, digits, '-', '_' and '.', starting with a letter or digit.",
        Some("^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"),
        "mpls"
    )
);
schema!(
    Prefix,
    "Prefix",
    string(
        "An IPv4 or IPv6 prefix in CIDR notation, no host bits set.",
        None,
        "10.1.0.0/16"
    )
);
schema!(
    PortRange,
    "PortRange",
    string_or_number(
        "A port (443) or an inclusive range (\"8000-8080\").",
        "16384-32767"
    )
);
schema!(
    Protocol,
    "Protocol",
    string_or_number(
        "An IP protocol: a name (tcp, udp, icmp, ...) or its number.",
        "udp"
    )
);
schema!(
    Dscp,
    "Dscp",
    string_or_number(
        "A DSCP value 0..=63 or its name (ef, af41, cs1, ...).",
        "ef"
    )
);
schema!(
    WgPublicKey,
    "WgPublicKey",
    string(
        "A WireGuard public key: 32 bytes in standard base64 (44 characters, one '=').",
        Some("^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"),
        "n0aI1nHk0yOa5R8uHzTq8M0oJ9Jt5Pq8wJm1f3V0rR4="
    )
);
