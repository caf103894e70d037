//! From the spanned TOML tree to resolved instances: top-level structure, profiles and overrides,
//! defaults, sweep expansion (grids and chains), `$variable` substitution, parameter typing and
//! input resolution.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value as Json};

use super::diag::{Diagnostic, Span};
use super::node::{Entry, Node, Val};
use super::overrides::{self, Override};
use super::schema::{Catalog, KindSchema, ParamType};
use super::{InputRef, Instance, SpecOptions, SweepPoint};

const TOP_LEVEL: [&str; 6] = ["pipeline", "defaults", "stages", "sweeps", "profiles", "executor"];
const CHAIN_MARKER: &str = "$chain";

type Built = (String, i64, String, Vec<String>, Vec<Instance>);

/// An instance before its parameters and inputs are resolved.
struct Raw<'c> {
    name: String,
    schema: Option<&'c KindSchema>,
    table: Vec<Entry>,
    kind_span: Span,
    sweep: Option<SweepPoint>,
    /// `level[sparsity=0.1].` for sweep instances: siblings are found under this prefix.
    prefix: Option<String>,
    templates: Vec<String>,
    /// What `$chain` names at this point (None when the sweep's chain is invalid: already
    /// reported).
    chain: Option<String>,
    /// Where the sweep's `chain.from` is written, for the first point's error.
    chain_from_span: Option<Span>,
    /// Keys whose value already produced an error: no follow-up errors for them.
    broken: Vec<String>,
}

pub fn build(
    root: &mut Node,
    catalog: &Catalog,
    options: &SpecOptions,
    sets: Vec<Override>,
    file_stem: &str,
    d: &mut Vec<Diagnostic>,
) -> Option<Built> {
    let top = root.as_table()?;
    for e in top {
        if !TOP_LEVEL.contains(&e.key.as_str()) {
            d.push(
                Diagnostic::at(&e.key_span, format!("unknown top-level table `{}`", e.key))
                    .help(format!("expected one of {}", TOP_LEVEL.map(|k| format!("[{k}]")).join(", ")))
                    .suggest(&e.key, TOP_LEVEL),
            );
        } else if e.value.as_table().is_none() {
            d.push(Diagnostic::at(
                &e.value.span,
                format!("`{}` must be a table, found {}", e.key, e.value.type_name()),
            ));
        }
    }

    let profiles = apply_profiles_and_sets(root, catalog, options, sets, d);

    let (name, seed, description) = pipeline_table(root, file_stem, d);
    let defaults = defaults_tables(root, catalog, d);

    let mut raws = Vec::new();
    if let Some(stages) = root.get("stages").and_then(|e| e.value.as_table()) {
        for e in stages {
            if let Some(r) = raw_stage(e, catalog, &[], Chain::None, None, d) {
                raws.push(r);
            }
        }
    }
    if let Some(sweeps) = root.get("sweeps").and_then(|e| e.value.as_table()) {
        let stage_names: HashSet<&str> = root
            .get("stages")
            .and_then(|e| e.value.as_table())
            .map(|t| t.iter().map(|e| e.key.as_str()).collect())
            .unwrap_or_default();
        for e in sweeps {
            if stage_names.contains(e.key.as_str()) {
                d.push(
                    Diagnostic::at(&e.key_span, format!("duplicate name `{}`: a stage and a sweep share it", e.key))
                        .help("give the sweep or the stage another name"),
                );
            }
            expand_sweep(e, catalog, &mut raws, d);
        }
    }

    if raws.is_empty() && d.is_empty() {
        d.push(Diagnostic::new("the pipeline has no stages", None).help(
            "add a [stages.<name>] table (or a [sweeps.<name>]) with a `kind`; `rpt-flow stages` lists the kinds",
        ));
    }
    let mut seen: HashSet<&str> = HashSet::new();
    for r in &raws {
        if !seen.insert(r.name.as_str()) {
            d.push(
                Diagnostic::at(&r.kind_span, format!("duplicate instance name `{}`", r.name))
                    .help("two sweep points produce the same name: the values in `over` must be distinct"),
            );
        }
    }

    let instances = resolve(&raws, &defaults, seed, d);
    // A template's mistake shows once, not once per sweep point.
    let mut seen_diags: HashSet<(String, usize, usize, usize)> = HashSet::new();
    d.retain(|x| {
        let span = x.span.clone().unwrap_or_default();
        seen_diags.insert((x.message.clone(), span.source, span.range.start, span.range.end))
    });
    if d.is_empty() {
        Some((name, seed, description, profiles, instances))
    } else {
        None
    }
}

fn apply_profiles_and_sets(
    root: &mut Node,
    catalog: &Catalog,
    options: &SpecOptions,
    sets: Vec<Override>,
    d: &mut Vec<Diagnostic>,
) -> Vec<String> {
    let mut defined: Vec<(String, Vec<Override>)> = Vec::new();
    if let Some(profiles) = root.get("profiles").and_then(|e| e.value.as_table()) {
        for p in profiles {
            if !valid_name(&p.key) {
                d.push(
                    Diagnostic::at(&p.key_span, format!("invalid profile name `{}`", p.key))
                        .help("profile names use letters, digits, `-` and `_` (they name the session file)"),
                );
                continue;
            }
            if p.value.as_table().is_none() {
                d.push(Diagnostic::at(&p.value.span, format!("profile `{}` must be a table of path = value", p.key)));
                continue;
            }
            let mut ovs = Vec::new();
            overrides::profile_overrides(&p.value, &mut Vec::new(), &mut ovs);
            for ov in &ovs {
                if let Err(diag) = overrides::check_path(root, &ov.path, &ov.path_span, catalog) {
                    d.push(diag);
                }
            }
            defined.push((p.key.clone(), ovs));
        }
    }
    let names: Vec<String> = defined.iter().map(|(n, _)| n.clone()).collect();
    // Profiles apply in the order the file defines them, whatever the command-line order: the
    // author decides which wins where two set the same path (size profiles such as `tiny` go
    // last, so `--profile tiny --profile rigorous` is the rigorous protocol at tiny size), and
    // `-p a -p b` and `-p b -p a` are the same run with the same keys.
    for (name, ovs) in &defined {
        if options.profiles.contains(name) {
            ovs.iter().for_each(|ov| overrides::apply(root, ov));
        }
    }
    for wanted in &options.profiles {
        match defined.iter().find(|(n, _)| n == wanted) {
            Some(_) => {}
            None => {
                let help = if names.is_empty() {
                    "this pipeline defines no [profiles.<name>] tables".to_string()
                } else {
                    format!("profiles defined: {}", names.join(", "))
                };
                d.push(
                    Diagnostic::new(format!("unknown profile `{wanted}`"), None)
                        .help(help.clone())
                        .suggest(wanted, names.iter().map(String::as_str)),
                );
            }
        }
    }
    for ov in &sets {
        match overrides::check_path(root, &ov.path, &ov.path_span, catalog) {
            Ok(()) => overrides::apply(root, ov),
            Err(diag) => d.push(diag),
        }
    }
    names
}

fn pipeline_table(root: &Node, file_stem: &str, d: &mut Vec<Diagnostic>) -> (String, i64, String) {
    let (mut name, mut seed, mut description) = (file_stem.to_string(), 0, String::new());
    let Some(entries) = root.get("pipeline").and_then(|e| e.value.as_table()) else {
        return (name, seed, description);
    };
    for e in entries {
        match (e.key.as_str(), &e.value.val) {
            ("name", Val::Str(s)) => {
                if valid_name(s) {
                    name = s.clone()
                } else {
                    d.push(
                        Diagnostic::at(&e.value.span, format!("invalid pipeline name `{s}`"))
                            .help("use letters, digits, `-` and `_` (it names the session file)"),
                    );
                }
            }
            ("seed", Val::Int(i)) => seed = *i,
            ("description", Val::Str(s)) => description = s.clone(),
            ("name" | "description", _) => d.push(Diagnostic::at(
                &e.value.span,
                format!("`pipeline.{}` must be a string, found {}", e.key, e.value.type_name()),
            )),
            ("seed", _) => d.push(Diagnostic::at(
                &e.value.span,
                format!("`pipeline.seed` must be an integer, found {}", e.value.type_name()),
            )),
            _ => d.push(
                Diagnostic::at(&e.key_span, format!("unknown key `{}` in [pipeline]", e.key))
                    .help("[pipeline] takes name, seed and description")
                    .suggest(&e.key, ["name", "seed", "description"]),
            ),
        }
    }
    (name, seed, description)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `[defaults.<kind>]`, type-checked once.
fn defaults_tables(root: &Node, catalog: &Catalog, d: &mut Vec<Diagnostic>) -> HashMap<String, Vec<(String, Json)>> {
    let mut out = HashMap::new();
    let Some(tables) = root.get("defaults").and_then(|e| e.value.as_table()) else {
        return out;
    };
    for t in tables {
        let Some(schema) = catalog.get(&t.key) else {
            d.push(
                Diagnostic::at(&t.key_span, format!("unknown stage kind `{}` in [defaults]", t.key))
                    .suggest(&t.key, catalog.names()),
            );
            continue;
        };
        let Some(entries) = t.value.as_table() else {
            d.push(Diagnostic::at(&t.value.span, format!("`defaults.{}` must be a table", t.key)));
            continue;
        };
        let mut values = Vec::new();
        for e in entries {
            if schema.input(&e.key).is_some() || e.key == "kind" {
                d.push(
                    Diagnostic::at(&e.key_span, format!("`{}` cannot have a default", e.key))
                        .help("inputs and kinds belong in each stage's own table"),
                );
            } else if let Some(p) = schema.param(&e.key) {
                let mut value = e.value.clone();
                substitute_vars(&mut value, &[], false, d);
                if let Some(v) = typed(&value, &p.ty, &format!("defaults.{}.{}", t.key, e.key), d) {
                    values.push((e.key.clone(), v));
                }
            } else {
                d.push(
                    Diagnostic::at(
                        &e.key_span,
                        format!("unknown parameter `{}` for stage kind `{}`", e.key, schema.kind),
                    )
                    .suggest(&e.key, schema.params.iter().map(|p| p.name)),
                );
            }
        }
        out.insert(t.key.clone(), values);
    }
    out
}

fn raw_stage<'c>(
    e: &Entry,
    catalog: &Catalog<'c>,
    vars: &[(String, Node)],
    chain: Chain,
    sweep: Option<SweepCtx>,
    d: &mut Vec<Diagnostic>,
) -> Option<Raw<'c>> {
    if !valid_name(&e.key) {
        d.push(
            Diagnostic::at(&e.key_span, format!("invalid stage name `{}`", e.key))
                .help("stage names use letters, digits, `-` and `_`"),
        );
        return None;
    }
    let Some(entries) = e.value.as_table() else {
        d.push(Diagnostic::at(
            &e.value.span,
            format!("stage `{}` must be a table, found {}", e.key, e.value.type_name()),
        ));
        return None;
    };
    let (schema, kind_span) = match entries.iter().find(|x| x.key == "kind") {
        None => {
            d.push(
                Diagnostic::at(&e.key_span, format!("stage `{}` has no `kind`", e.key))
                    .help(format!("add kind = \"…\", one of: {}", catalog.names().collect::<Vec<_>>().join(", "))),
            );
            (None, e.key_span.clone())
        }
        Some(k) => match k.value.as_str() {
            Some(kind) => match catalog.get(kind) {
                Some(s) => (Some(s), k.value.span.clone()),
                None => {
                    d.push(
                        Diagnostic::at(&k.value.span, format!("unknown stage kind `{kind}`"))
                            .help(format!(
                                "known kinds: {} (see `rpt-flow stages`)",
                                catalog.names().collect::<Vec<_>>().join(", ")
                            ))
                            .suggest(kind, catalog.names()),
                    );
                    (None, k.value.span.clone())
                }
            },
            None => {
                d.push(Diagnostic::at(
                    &k.value.span,
                    format!("`kind` must be a string, found {}", k.value.type_name()),
                ));
                (None, k.value.span.clone())
            }
        },
    };
    let mut table = entries.to_vec();
    let mut broken = Vec::new();
    for x in table.iter_mut().filter(|x| x.key != "kind") {
        let is_input = schema.is_some_and(|s| s.input(&x.key).is_some());
        if !substitute_vars(&mut x.value, vars, !matches!(chain, Chain::None) && is_input, d) {
            broken.push(x.key.clone());
        }
    }
    let (chain, chain_from_span) = match chain {
        Chain::Valid { target, from_span } => (Some(target), Some(from_span)),
        _ => (None, None),
    };
    let (name, prefix, sweep_point, templates) = match sweep {
        None => (e.key.clone(), None, None, vec![]),
        Some(SweepCtx { name: sweep_name, index, values, templates }) => {
            let label = values.iter().map(|(k, v)| format!("{k}={}", json_display(v))).collect::<Vec<_>>().join(",");
            let prefix = format!("{sweep_name}[{label}].");
            let point =
                SweepPoint { sweep: sweep_name.to_string(), template: e.key.clone(), index, values: values.to_vec() };
            (format!("{prefix}{}", e.key), Some(prefix), Some(point), templates.to_vec())
        }
    };
    Some(Raw { name, schema, table, kind_span, sweep: sweep_point, prefix, templates, chain, chain_from_span, broken })
}

/// Which sweep point a template stage is being instantiated for.
struct SweepCtx<'a> {
    name: &'a str,
    index: usize,
    values: &'a [(String, Json)],
    templates: &'a [String],
}

/// What `$chain` means for one instance.
#[derive(Clone)]
enum Chain {
    /// Not a chain sweep: `$chain` is an error.
    None,
    /// The sweep's chain is malformed (reported once): `$chain` is silently unresolved.
    Invalid,
    Valid {
        target: String,
        from_span: Span,
    },
}

fn json_display(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        Json::Number(n) => {
            n.as_f64().filter(|_| n.is_f64()).map(super::node::format_float).unwrap_or_else(|| n.to_string())
        }
        other => other.to_string(),
    }
}

fn expand_sweep<'c>(e: &Entry, catalog: &Catalog<'c>, raws: &mut Vec<Raw<'c>>, d: &mut Vec<Diagnostic>) {
    if !valid_name(&e.key) {
        d.push(
            Diagnostic::at(&e.key_span, format!("invalid sweep name `{}`", e.key))
                .help("use letters, digits, `-` and `_`"),
        );
        return;
    }
    let Some(entries) = e.value.as_table() else {
        return;
    };
    for x in entries {
        if !["over", "chain", "stages"].contains(&x.key.as_str()) {
            d.push(
                Diagnostic::at(&x.key_span, format!("unknown key `{}` in sweep `{}`", x.key, e.key))
                    .help("a sweep has `over`, optional `chain`, and `stages`")
                    .suggest(&x.key, ["over", "chain", "stages"]),
            );
        }
    }
    // Variables and their values.
    let mut vars: Vec<(String, Vec<Node>)> = Vec::new();
    match e.value.get("over") {
        None => d.push(
            Diagnostic::at(&e.key_span, format!("sweep `{}` has no `over`", e.key))
                .help("add over = { name = [values, …] }"),
        ),
        Some(over) => match over.value.as_table() {
            None => d.push(Diagnostic::at(
                &over.value.span,
                "`over` must be a table of lists, e.g. over = { sparsity = [0.1, 0.2] }",
            )),
            Some([]) => d.push(Diagnostic::at(&over.value.span, "`over` names no variable")),
            Some(t) => {
                for v in t {
                    match &v.value.val {
                        Val::Array(items) if !items.is_empty() => {
                            if let Some(bad) = items.iter().find(|i| matches!(i.val, Val::Array(_) | Val::Table(_))) {
                                d.push(Diagnostic::at(
                                    &bad.span,
                                    format!(
                                        "sweep values must be numbers, strings or booleans, found {}",
                                        bad.type_name()
                                    ),
                                ));
                            }
                            vars.push((v.key.clone(), items.clone()))
                        }
                        Val::Array(_) => {
                            d.push(Diagnostic::at(&v.value.span, format!("sweep variable `{}` has no values", v.key)))
                        }
                        _ => d.push(
                            Diagnostic::at(
                                &v.value.span,
                                format!("sweep values must be a list, found {}", v.value.type_name()),
                            )
                            .help(format!("write {} = [{}]", v.key, v.value.display())),
                        ),
                    }
                }
            }
        },
    }
    let templates_node = e.value.get("stages");
    let templates: Vec<&Entry> = match templates_node.map(|t| &t.value) {
        Some(t) => match t.as_table() {
            Some(entries) if !entries.is_empty() => entries.iter().collect(),
            _ => {
                d.push(Diagnostic::at(
                    &t.span,
                    format!("sweep `{}` must define stages under [sweeps.{}.stages.<name>]", e.key, e.key),
                ));
                vec![]
            }
        },
        None => {
            d.push(
                Diagnostic::at(&e.key_span, format!("sweep `{}` has no stages", e.key))
                    .help(format!("add [sweeps.{}.stages.<name>] tables", e.key)),
            );
            vec![]
        }
    };
    let template_names: Vec<String> = templates.iter().map(|t| t.key.clone()).collect();

    // Chain: `from` is resolved later like any input; `carry` must be a template of this sweep.
    let mut chain: Option<(String, String, Span)> = None;
    let mut chain_invalid = false;
    if let Some(c) = e.value.get("chain") {
        chain_invalid = true;
        let from = c.value.get("from").and_then(|f| f.value.as_str());
        let carry = c.value.get("carry");
        for k in c.value.as_table().unwrap_or(&[]) {
            if !["from", "carry"].contains(&k.key.as_str()) {
                d.push(
                    Diagnostic::at(&k.key_span, format!("unknown key `{}` in chain", k.key))
                        .suggest(&k.key, ["from", "carry"]),
                );
            }
        }
        let from_span = c.value.get("from").map(|f| f.value.span.clone()).unwrap_or_default();
        match (from, carry.and_then(|c| c.value.as_str().map(|s| (s, &c.value.span)))) {
            (Some(from), Some((carry, carry_span))) => {
                if template_names.iter().any(|t| t == carry) {
                    chain = Some((from.to_string(), carry.to_string(), from_span));
                    chain_invalid = false;
                } else {
                    d.push(
                        Diagnostic::at(
                            carry_span,
                            format!("chain carry `{carry}` is not a stage of sweep `{}`", e.key),
                        )
                        .suggest(carry, template_names.iter().map(String::as_str)),
                    );
                }
            }
            _ => d.push(
                Diagnostic::at(
                    &c.value.span,
                    "`chain` needs `from` (a stage name) and `carry` (a stage of this sweep), both strings",
                )
                .help("chain = { from = \"base\", carry = \"tuned\" }"),
            ),
        }
    }
    if vars.is_empty() || templates.is_empty() {
        return;
    }

    // Cartesian product, first variable slowest; values keep their source order.
    let mut points: Vec<Vec<(String, Node)>> = vec![vec![]];
    for (name, values) in &vars {
        points = points
            .into_iter()
            .flat_map(|p| {
                values.iter().map(move |v| {
                    let mut q = p.clone();
                    q.push((name.clone(), v.clone()));
                    q
                })
            })
            .collect();
    }
    let mut previous: Option<String> = None;
    for (index, point) in points.iter().enumerate() {
        let values: Vec<(String, Json)> = point.iter().map(|(k, v)| (k.clone(), v.to_json())).collect();
        let chain_state = match &chain {
            Some((from, carry, from_span)) => Chain::Valid {
                target: match &previous {
                    None => from.clone(),
                    Some(prefix) => format!("{prefix}{carry}"),
                },
                from_span: from_span.clone(),
            },
            None if chain_invalid => Chain::Invalid,
            None => Chain::None,
        };
        let mut prefix = None;
        for t in &templates {
            if let Some(r) = raw_stage(
                t,
                catalog,
                point,
                chain_state.clone(),
                Some(SweepCtx { name: &e.key, index, values: &values, templates: &template_names }),
                d,
            ) {
                prefix.clone_from(&r.prefix);
                raws.push(r);
            }
        }
        previous = prefix;
    }
}

/// Replaces `$name` (the whole string) by the variable's value and `${name}` inside strings by
/// its text; `$$` is a literal `$`. `$chain` is kept as a marker where an input may use it.
/// Returns false when it reported an error.
fn substitute_vars(node: &mut Node, vars: &[(String, Node)], chain_allowed: bool, d: &mut Vec<Diagnostic>) -> bool {
    match &mut node.val {
        Val::Str(s) => {
            if s == CHAIN_MARKER {
                if !chain_allowed {
                    d.push(
                        Diagnostic::at(
                            &node.span,
                            "`$chain` is only defined for inputs of stages in a sweep with `chain`",
                        )
                        .help("add chain = { from = \"…\", carry = \"…\" } to the sweep, or name the input stage"),
                    );
                    return false;
                }
                return true;
            }
            let result = match s.strip_prefix('$').filter(|n| is_ident(n)) {
                Some(name) => match vars.iter().find(|(k, _)| k == name) {
                    Some((_, v)) => {
                        node.val = v.val.clone();
                        return true;
                    }
                    None => Err(name.to_string()),
                },
                None => interpolate(s, vars).map(|t| *s = t),
            };
            match result {
                Ok(()) => true,
                Err(name) => {
                    d.push(unknown_var(&name, &node.span, vars));
                    false
                }
            }
        }
        // Every element is visited (no short circuit) so that every mistake is reported.
        Val::Array(items) => {
            items.iter_mut().map(|n| substitute_vars(n, vars, false, d)).collect::<Vec<_>>().into_iter().all(|ok| ok)
        }
        Val::Table(entries) => entries
            .iter_mut()
            .map(|e| substitute_vars(&mut e.value, vars, false, d))
            .collect::<Vec<_>>()
            .into_iter()
            .all(|ok| ok),
        _ => true,
    }
}

fn unknown_var(name: &str, span: &Span, vars: &[(String, Node)]) -> Diagnostic {
    let known: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
    let help = if known.is_empty() {
        "variables exist only inside a sweep (the names in its `over`); write `$$` for a literal `$`".to_string()
    } else {
        format!("variables here: {}", known.iter().map(|k| format!("${k}")).collect::<Vec<_>>().join(", "))
    };
    Diagnostic::at(span, format!("unknown variable `${name}`")).help(help).suggest(name, known)
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn interpolate(s: &str, vars: &[(String, Node)]) -> Result<String, String> {
    if !s.contains('$') {
        return Ok(s.to_string());
    }
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{') {
            let end = r.find('}').ok_or_else(|| r.to_string())?;
            let name = &r[..end];
            let v = vars.iter().find(|(k, _)| k == name).ok_or_else(|| name.to_string())?;
            out.push_str(&v.1.display());
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks a value against a parameter type and converts it to its canonical JSON form.
fn typed(node: &Node, ty: &ParamType, what: &str, d: &mut Vec<Diagnostic>) -> Option<Json> {
    match check(node, ty) {
        Ok(v) => Some(v),
        Err((span, msg, help)) => {
            let mut diag = Diagnostic::at(&span, format!("`{what}`: {msg}"));
            if let Some(h) = help {
                diag = diag.help(h);
            }
            d.push(diag);
            None
        }
    }
}

type TypeError = (Span, String, Option<String>);

fn check(node: &Node, ty: &ParamType) -> Result<Json, TypeError> {
    let mismatch = || (node.span.clone(), format!("expected {}, found {}", ty.describe(), node.type_name()), None);
    match (ty, &node.val) {
        (ParamType::Any, _) => Ok(node.to_json()),
        (ParamType::Bool, Val::Bool(b)) => Ok(Json::Bool(*b)),
        (ParamType::Str, Val::Str(s)) => Ok(Json::String(s.clone())),
        (ParamType::Int { min, max }, Val::Int(i)) => {
            if min.is_some_and(|m| *i < m) || max.is_some_and(|m| *i > m) {
                Err((node.span.clone(), format!("{i} is out of range: expected {}", ty.describe()), None))
            } else {
                Ok(Json::from(*i))
            }
        }
        (ParamType::Float { min, max }, Val::Int(_) | Val::Float(_)) => {
            let x = match node.val {
                Val::Int(i) => i as f64,
                Val::Float(f) => f,
                _ => unreachable!(),
            };
            if !x.is_finite() || min.is_some_and(|m| x < m) || max.is_some_and(|m| x > m) {
                Err((
                    node.span.clone(),
                    format!("{} is out of range: expected {}", node.display(), ty.describe()),
                    None,
                ))
            } else {
                Ok(serde_json::Number::from_f64(x).map(Json::Number).expect("finite"))
            }
        }
        (ParamType::Enum(options), Val::Str(s)) => {
            if options.contains(&s.as_str()) {
                Ok(Json::String(s.clone()))
            } else {
                let help = super::diag::nearest(s, options.iter().copied()).map(|b| format!("did you mean `{b}`?"));
                Err((node.span.clone(), format!("`{s}` is not {}", ty.describe()), help))
            }
        }
        (ParamType::List(inner), Val::Array(items)) => {
            items.iter().map(|i| check(i, inner)).collect::<Result<Vec<_>, _>>().map(Json::Array)
        }
        (ParamType::Table, Val::Table(_)) => Ok(node.to_json()),
        (ParamType::Either(options), _) => {
            let mut first_err = None;
            for o in options.iter() {
                match check(node, o) {
                    Ok(v) => return Ok(v),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            Err(mismatch())
        }
        _ => Err(mismatch()),
    }
}

fn resolve(
    raws: &[Raw],
    defaults: &HashMap<String, Vec<(String, Json)>>,
    seed: i64,
    d: &mut Vec<Diagnostic>,
) -> Vec<Instance> {
    let index: HashMap<&str, usize> = raws.iter().enumerate().map(|(i, r)| (r.name.as_str(), i)).collect();
    let top_names: Vec<&str> = raws.iter().filter(|r| r.sweep.is_none()).map(|r| r.name.as_str()).collect();
    let mut out = Vec::new();
    for r in raws {
        let Some(schema) = r.schema else { continue };
        let mut params = Map::new();
        let mut param_spans = Vec::new();
        for (k, v) in defaults.get(schema.kind).into_iter().flatten() {
            params.insert(k.clone(), v.clone());
        }
        let mut inputs = Vec::new();
        for e in &r.table {
            if e.key == "kind" || r.broken.contains(&e.key) {
                continue;
            }
            if let Some(slot) = schema.input(&e.key) {
                let Some(target) = e.value.as_str() else {
                    d.push(Diagnostic::at(
                        &e.value.span,
                        format!("input `{}` must name a stage, found {}", e.key, e.value.type_name()),
                    ));
                    continue;
                };
                let resolved = if target == CHAIN_MARKER {
                    let Some(chain) = r.chain.clone() else { continue };
                    if !index.contains_key(chain.as_str()) {
                        if r.sweep.as_ref().is_some_and(|s| s.index == 0) {
                            let span = r.chain_from_span.clone().unwrap_or_else(|| e.value.span.clone());
                            d.push(
                                Diagnostic::at(&span, format!("chain `from` names no stage `{chain}`"))
                                    .suggest(&chain, top_names.iter().copied()),
                            );
                        }
                        continue;
                    }
                    Some(chain)
                } else if r.templates.iter().any(|t| t == target) {
                    r.prefix.as_ref().map(|p| format!("{p}{target}"))
                } else {
                    Some(target.to_string())
                };
                let Some(&t) = resolved.as_deref().and_then(|n| index.get(n)) else {
                    let shown = resolved.as_deref().unwrap_or(target);
                    let candidates: Vec<&str> =
                        r.templates.iter().map(String::as_str).chain(top_names.iter().copied()).collect();
                    let mut diag = Diagnostic::at(
                        &e.value.span,
                        format!("unknown input `{shown}` for `{}` of stage `{}`", e.key, r.name),
                    );
                    diag = match super::diag::nearest(target, candidates.iter().copied()) {
                        Some(best) => diag.help(format!("did you mean `{best}`?")),
                        None => diag.help(format!("stages that can be named here: {}", candidates.join(", "))),
                    };
                    d.push(diag);
                    continue;
                };
                if raws[t].name == r.name {
                    d.push(Diagnostic::at(&e.value.span, format!("stage `{}` names itself as its input", r.name)));
                    continue;
                }
                if let Some(ts) = raws[t].schema {
                    if ts.output != slot.ty {
                        d.push(
                            Diagnostic::at(
                                &e.value.span,
                                format!(
                                    "input `{}` of stage `{}` ({}) expects {}, but `{}` ({}) produces {}",
                                    e.key,
                                    r.name,
                                    schema.kind,
                                    slot.ty.noun(),
                                    raws[t].name,
                                    ts.kind,
                                    ts.output.noun()
                                ),
                            )
                            .help(format!("name a stage that produces {}", slot.ty.noun())),
                        );
                        continue;
                    }
                }
                inputs.push(InputRef { slot: e.key.clone(), target: t, span: e.value.span.clone() });
            } else if let Some(p) = schema.param(&e.key) {
                if let Some(v) = typed(&e.value, &p.ty, &format!("{}.{}", r.name, e.key), d) {
                    params.insert(e.key.clone(), v);
                    param_spans.push((e.key.clone(), e.value.span.clone()));
                }
            } else {
                d.push(
                    Diagnostic::at(
                        &e.key_span,
                        format!("unknown parameter `{}` for stage kind `{}`", e.key, schema.kind),
                    )
                    .help(format!("see `rpt-flow stages {}` for its parameters", schema.kind))
                    .suggest(&e.key, schema.keys()),
                );
            }
        }
        let given = |key: &str| r.table.iter().any(|e| e.key == key);
        for p in schema.params {
            if params.contains_key(p.name) || given(p.name) {
                continue;
            }
            match p.default.value(seed) {
                Some(v) => {
                    params.insert(p.name.to_string(), v);
                }
                None if matches!(p.default, super::schema::Default::Required) => d.push(
                    Diagnostic::at(
                        &r.kind_span,
                        format!("stage `{}` ({}) is missing parameter `{}`", r.name, schema.kind, p.name),
                    )
                    .help(format!("add {} = … ({}): {}", p.name, p.ty.describe(), p.help)),
                ),
                None => {}
            }
        }
        for slot in schema.inputs.iter().filter(|s| s.required) {
            if !given(slot.name) {
                d.push(
                    Diagnostic::at(
                        &r.kind_span,
                        format!("stage `{}` ({}) is missing input `{}`", r.name, schema.kind, slot.name),
                    )
                    .help(format!(
                        "add {} = \"<stage name>\" naming a stage that produces {}",
                        slot.name,
                        slot.ty.noun()
                    )),
                );
            }
        }
        // Sort for a stable order that does not depend on how the table was written.
        let mut sorted: Vec<(String, Json)> = params.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        out.push(Instance {
            name: r.name.clone(),
            kind: schema.kind.to_string(),
            params: sorted.into_iter().collect(),
            inputs,
            span: r.kind_span.clone(),
            param_spans,
            sweep: r.sweep.clone(),
        });
    }
    out
}
