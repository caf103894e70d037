//! Profiles and `--set`: overrides addressed by dotted paths into the pipeline file
//! (`stages.base.model`, `defaults.finetune.steps`, `sweeps.level.over.sparsity`,
//! `sweeps.level.stages.tuned.steps`, `pipeline.seed`). Applied before anything is hashed.

use super::diag::{Diagnostic, Span};
use super::node::{Entry, Node, Val};
use super::schema::Catalog;

/// One override: a path and the value to put there.
pub struct Override {
    pub path: String,
    pub path_span: Span,
    pub value: Node,
}

/// Number of components of a complete path that starts with these components, if known.
fn complete_len(comps: &[&str]) -> Option<usize> {
    match comps.first().copied()? {
        "pipeline" => Some(2),
        "defaults" | "stages" => Some(3),
        "sweeps" => match comps.get(2).copied()? {
            "over" | "chain" => Some(4),
            "stages" => Some(5),
            _ => Some(3),
        },
        _ => Some(comps.len().max(2)),
    }
}

/// Flattens a profile table into overrides; nested tables are followed until a path is complete,
/// so both `"stages.base.model" = ...` and `stages.base.model = ...` work.
pub fn profile_overrides(profile: &Node, prefix: &mut Vec<String>, out: &mut Vec<Override>) {
    let Some(entries) = profile.as_table() else {
        return;
    };
    for e in entries {
        let parts: Vec<String> = e.key.split('.').map(str::to_string).collect();
        let n = parts.len();
        prefix.extend(parts);
        let comps: Vec<&str> = prefix.iter().map(String::as_str).collect();
        let complete = complete_len(&comps).is_some_and(|len| comps.len() >= len);
        if !complete && matches!(e.value.val, Val::Table(_)) {
            profile_overrides(&e.value, prefix, out);
        } else {
            out.push(Override { path: prefix.join("."), path_span: e.key_span.clone(), value: e.value.clone() });
        }
        prefix.truncate(prefix.len() - n);
    }
}

fn table_keys(node: Option<&Node>) -> Vec<&str> {
    node.and_then(Node::as_table).map(|t| t.iter().map(|e| e.key.as_str()).collect()).unwrap_or_default()
}

fn child<'a>(node: Option<&'a Node>, key: &str) -> Option<&'a Node> {
    node?.get(key).map(|e| &e.value)
}

/// Checks that a path names something that exists (or a parameter the addressed stage kind has).
pub fn check_path(root: &Node, path: &str, span: &Span, catalog: &Catalog) -> Result<(), Diagnostic> {
    let comps: Vec<&str> = path.split('.').collect();
    let nothing = |what: String| Diagnostic::at(span, format!("override path `{path}` matches nothing: {what}"));
    let want = |n: usize, form: &str| {
        if comps.len() != n {
            Err(nothing(format!("expected the form `{form}`")))
        } else {
            Ok(())
        }
    };
    let stage_key_ok = |stage: Option<&Node>, key: &str| -> Result<(), Diagnostic> {
        let kind = child(stage, "kind").and_then(Node::as_str).and_then(|k| catalog.get(k));
        match kind {
            Some(schema) if !schema.keys().any(|k| k == key) => {
                Err(nothing(format!("stage kind `{}` has no parameter `{key}`", schema.kind))
                    .suggest(key, schema.keys()))
            }
            _ => Ok(()),
        }
    };
    match comps[0] {
        "pipeline" => {
            want(2, "pipeline.<name|seed|description>")?;
            if !["name", "seed", "description"].contains(&comps[1]) {
                return Err(nothing(format!("[pipeline] has no `{}`", comps[1]))
                    .suggest(comps[1], ["name", "seed", "description"]));
            }
        }
        "defaults" => {
            want(3, "defaults.<kind>.<parameter>")?;
            let Some(schema) = catalog.get(comps[1]) else {
                return Err(nothing(format!("no stage kind `{}`", comps[1])).suggest(comps[1], catalog.names()));
            };
            if schema.param(comps[2]).is_none() {
                return Err(nothing(format!("stage kind `{}` has no parameter `{}`", comps[1], comps[2]))
                    .suggest(comps[2], schema.params.iter().map(|p| p.name)));
            }
        }
        "stages" => {
            want(3, "stages.<stage>.<parameter>")?;
            let stages = child(Some(root), "stages");
            let Some(stage) = child(stages, comps[1]) else {
                return Err(nothing(format!("no stage `{}`", comps[1])).suggest(comps[1], table_keys(stages)));
            };
            stage_key_ok(Some(stage), comps[2])?;
        }
        "sweeps" => {
            let sweeps = child(Some(root), "sweeps");
            let Some(name) = comps.get(1) else {
                return Err(nothing("expected `sweeps.<sweep>.…`".into()));
            };
            let Some(sweep) = child(sweeps, name) else {
                return Err(nothing(format!("no sweep `{name}`")).suggest(name, table_keys(sweeps)));
            };
            match comps.get(2).copied() {
                Some("over") => {
                    want(4, "sweeps.<sweep>.over.<variable>")?;
                    let over = child(Some(sweep), "over");
                    if child(over, comps[3]).is_none() {
                        return Err(nothing(format!("sweep `{name}` has no variable `{}`", comps[3]))
                            .suggest(comps[3], table_keys(over)));
                    }
                }
                Some("chain") => {
                    want(4, "sweeps.<sweep>.chain.<from|carry>")?;
                    if !["from", "carry"].contains(&comps[3]) {
                        return Err(
                            nothing("a chain has only `from` and `carry`".into()).suggest(comps[3], ["from", "carry"])
                        );
                    }
                }
                Some("stages") => {
                    want(5, "sweeps.<sweep>.stages.<stage>.<parameter>")?;
                    let templates = child(Some(sweep), "stages");
                    let Some(stage) = child(templates, comps[3]) else {
                        return Err(nothing(format!("sweep `{name}` has no stage `{}`", comps[3]))
                            .suggest(comps[3], table_keys(templates)));
                    };
                    stage_key_ok(Some(stage), comps[4])?;
                }
                other => {
                    return Err(nothing(format!("a sweep has no `{}`", other.unwrap_or("")))
                        .suggest(other.unwrap_or(""), ["over", "chain", "stages"]))
                }
            }
        }
        other => {
            return Err(nothing(format!("no top-level table `{other}`"))
                .suggest(other, ["pipeline", "defaults", "stages", "sweeps"]))
        }
    }
    Ok(())
}

/// Puts the value at the path, creating missing tables (only `defaults.<kind>` can be missing
/// after `check_path`).
pub fn apply(root: &mut Node, ov: &Override) {
    let comps: Vec<&str> = ov.path.split('.').collect();
    let mut node = root;
    for (i, comp) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        let span = ov.path_span.clone();
        let Some(table) = node.as_table_mut() else {
            return;
        };
        let pos = match table.iter().position(|e| e.key == *comp) {
            Some(p) => p,
            None => {
                let value = if last { ov.value.clone() } else { Node { val: Val::Table(vec![]), span: span.clone() } };
                table.push(Entry { key: comp.to_string(), key_span: span, value });
                table.len() - 1
            }
        };
        if last {
            table[pos].value = ov.value.clone();
            return;
        }
        node = &mut table[pos].value;
    }
}
