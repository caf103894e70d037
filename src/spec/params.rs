//! [`stage_params!`](crate::stage_params): a stage kind's parameters declared once. One struct
//! definition whose fields carry their [`ParamDef`] data yields both the typed struct the stage
//! deserializes and the `&'static [ParamDef]` list its schema gives the validator, `rpt-flow
//! stages`, the stage reference and the cache keys, so the two cannot drift. The helpers below
//! are what the expansion calls; they are public only for that.

use std::fmt;

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, Visitor};

use super::schema::{Default, ParamDef, ParamType};

/// Declares a stage kind's parameters once: a `#[derive(Deserialize)]` struct and, as its
/// associated `PARAMS: &'static [ParamDef]`, their definitions in field order, each named by its
/// field. A field is one of
///
/// - `name: Type { ty: …, default: …, help: "…" },` — defined here (the `ParamDef` fields but
///   `name`);
/// - `name: Type = path::SHARED,` — a shared `ParamDef` constant, whose own name must be the
///   field's (a compile error otherwise);
/// - `..name: Group,` — a group of shared parameters declared by `stage_params! { group … }`,
///   flattened into the struct (`#[serde(flatten)]`), its definitions listed in its place.
///
/// A field may be `pub`; attributes on it (e.g. `#[serde(default, deserialize_with = "…")]`) pass
/// through to the struct. Unknown parameters are refused (`deny_unknown_fields`; with a group, which serde
/// cannot combine with that, by a trailing flattened [`NoOtherParams`]). `group struct` declares
/// a group: no refusal, as it sees the other fields of the struct it is flattened into.
///
/// ```ignore
/// stage_params! {
///     struct Params {
///         data: Json = text_param::DATA,
///         steps: u64 {
///             ty: ParamType::Int { min: Some(1), max: None },
///             default: ParamDefault::Json("300"),
///             help: "optimizer steps",
///         },
///     }
/// }
/// static SCHEMA: KindSchema = KindSchema { params: Params::PARAMS, … };
/// ```
#[macro_export]
macro_rules! stage_params {
    ($(#[$attr:meta])* group $vis:vis struct $name:ident { $($body:tt)* }) => {
        $crate::stage_params!(@field [group [$(#[$attr])*] $vis $name] [] [] [] $($body)*);
    };
    ($(#[$attr:meta])* $vis:vis struct $name:ident { $($body:tt)* }) => {
        $crate::stage_params!(@field [kind [$(#[$attr])*] $vis $name] [] [] [] $($body)*);
    };

    // One field at a time: [head] [struct fields] [definition slices] [`flat` per group field].
    (@field $head:tt [$($fields:tt)*] [$($parts:tt)*] [$($flat:tt)*]
        $(#[$m:meta])* .. $f:ident : $t:ty $(, $($rest:tt)*)?) => {
        $crate::stage_params!(@field $head
            [$($fields)* $(#[$m])* #[serde(flatten)] $f: $t,]
            [$($parts)* (<$t>::PARAMS)]
            [$($flat)* flat]
            $($($rest)*)?);
    };
    (@field $head:tt [$($fields:tt)*] [$($parts:tt)*] [$($flat:tt)*]
        $(#[$m:meta])* $fv:vis $f:ident : $t:ty = $shared:path $(, $($rest:tt)*)?) => {
        const _: () = assert!(
            $crate::spec::params::named(&$shared, stringify!($f)),
            concat!("parameter `", stringify!($f), "`: its shared definition `", stringify!($shared), "` names another parameter"),
        );
        $crate::stage_params!(@field $head
            [$($fields)* $(#[$m])* $fv $f: $t,]
            [$($parts)* (&[$shared])]
            [$($flat)*]
            $($($rest)*)?);
    };
    (@field $head:tt [$($fields:tt)*] [$($parts:tt)*] [$($flat:tt)*]
        $(#[$m:meta])* $fv:vis $f:ident : $t:ty { $($def:tt)* } $(, $($rest:tt)*)?) => {
        $crate::stage_params!(@field $head
            [$($fields)* $(#[$m])* $fv $f: $t,]
            [$($parts)* (&[$crate::spec::schema::ParamDef { name: stringify!($f), $($def)* }])]
            [$($flat)*]
            $($($rest)*)?);
    };

    // Done: the struct and its definitions.
    (@field [group [$($attr:tt)*] $vis:vis $name:ident] [$($fields:tt)*] [$($parts:tt)*] [$($flat:tt)*]) => {
        #[derive(::serde::Deserialize)]
        $($attr)*
        $vis struct $name { $($fields)* }
        $crate::stage_params!(@list $name $($parts)*);
    };
    (@field [kind [$($attr:tt)*] $vis:vis $name:ident] [$($fields:tt)*] [$($parts:tt)*] []) => {
        #[derive(::serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        $($attr)*
        $vis struct $name { $($fields)* }
        $crate::stage_params!(@list $name $($parts)*);
    };
    (@field [kind [$($attr:tt)*] $vis:vis $name:ident] [$($fields:tt)*] [$($parts:tt)*] [$($flat:tt)+]) => {
        #[derive(::serde::Deserialize)]
        $($attr)*
        $vis struct $name {
            $($fields)*
            /// Refuses what the groups before it left: serde's `deny_unknown_fields` does not
            /// work with `flatten`.
            #[serde(flatten)]
            #[allow(dead_code)]
            __unknown: $crate::spec::params::NoOtherParams,
        }
        $crate::stage_params!(@list $name $($parts)*);
    };
    (@list $name:ident $($part:tt)*) => {
        impl $name {
            /// The parameters' definitions, in field order: what the kind's schema lists.
            pub const PARAMS: &'static [$crate::spec::schema::ParamDef] =
                &$crate::spec::params::concat::<{ 0 $(+ $part.len())* }>(&[$($part),*]);
        }
    };
}

/// Whether `def` is named `name` (a `const fn`, so that a mismatch fails the build).
pub const fn named(def: &ParamDef, name: &str) -> bool {
    let (a, b) = (def.name.as_bytes(), name.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The definitions of `parts` one after another (`N` is their total count).
pub const fn concat<const N: usize>(parts: &[&[ParamDef]]) -> [ParamDef; N] {
    const BLANK: ParamDef = ParamDef { name: "", ty: ParamType::Any, default: Default::Optional, help: "" };
    let mut out = [BLANK; N];
    let (mut i, mut n) = (0, 0);
    while i < parts.len() {
        let mut j = 0;
        while j < parts[i].len() {
            out[n] = parts[i][j];
            n += 1;
            j += 1;
        }
        i += 1;
    }
    assert!(n == N, "parameter count");
    out
}

/// The last, flattened field of a struct with a group: fails on any parameter the fields and
/// groups before it did not take.
#[derive(Clone, Copy, Debug)]
pub struct NoOtherParams;

impl<'de> Deserialize<'de> for NoOtherParams {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Rest;
        impl<'de> Visitor<'de> for Rest {
            type Value = NoOtherParams;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("no other parameters")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NoOtherParams, A::Error> {
                match map.next_key::<String>()? {
                    Some(k) => Err(A::Error::custom(format!("unknown field `{k}`"))),
                    None => Ok(NoOtherParams),
                }
            }
        }
        d.deserialize_map(Rest)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Map, Value as Json};

    use crate::spec::schema::{Default as ParamDefault, ParamDef, ParamType};

    const SHARED: ParamDef =
        ParamDef { name: "shared", ty: ParamType::Str, default: ParamDefault::Json("\"s\""), help: "shared one" };

    crate::stage_params! {
        #[derive(Debug)]
        group struct Group {
            shared: String = SHARED,
            g: u64 { ty: ParamType::UINT, default: ParamDefault::Json("1"), help: "in the group" },
        }
    }

    crate::stage_params! {
        #[derive(Debug)]
        struct Plain {
            a: f64 { ty: ParamType::FLOAT, default: ParamDefault::Required, help: "first" },
            #[serde(default)]
            b: Option<u64> { ty: ParamType::UINT, default: ParamDefault::Optional, help: "second" },
            shared: String = SHARED,
        }
    }

    crate::stage_params! {
        #[derive(Debug)]
        struct Grouped {
            ..group: Group,
            own: bool { ty: ParamType::Bool, default: ParamDefault::Json("false"), help: "own" },
        }
    }

    fn names(defs: &[ParamDef]) -> Vec<&str> {
        defs.iter().map(|d| d.name).collect()
    }

    fn parse<T: serde::de::DeserializeOwned>(v: Json) -> Result<T, String> {
        let Json::Object(m) = v else { unreachable!() };
        serde_json::from_value(Json::Object(Map::from_iter(m))).map_err(|e| e.to_string())
    }

    #[test]
    fn definitions_follow_the_fields() {
        assert_eq!(names(Plain::PARAMS), ["a", "b", "shared"]);
        assert_eq!(Plain::PARAMS[1].help, "second");
        assert_eq!(names(Group::PARAMS), ["shared", "g"]);
        assert_eq!(names(Grouped::PARAMS), ["shared", "g", "own"]);
    }

    #[test]
    fn structs_take_their_fields_and_refuse_others() {
        let p: Plain = parse(json!({ "a": 1.5, "shared": "x" })).unwrap();
        assert_eq!((p.a, p.b, p.shared.as_str()), (1.5, None, "x"));
        assert!(parse::<Plain>(json!({ "a": 1.5, "shared": "x", "c": 1 })).unwrap_err().contains("unknown field `c`"));
        let g: Grouped = parse(json!({ "shared": "x", "g": 2, "own": true })).unwrap();
        assert_eq!((g.group.shared.as_str(), g.group.g, g.own), ("x", 2, true));
        let e = parse::<Grouped>(json!({ "shared": "x", "g": 2, "own": true, "c": 1 })).unwrap_err();
        assert!(e.contains("unknown field `c`"), "{e}");
        assert!(parse::<Grouped>(json!({ "shared": "x", "own": true })).unwrap_err().contains("missing field `g`"));
    }
}
