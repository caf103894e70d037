//! Glob patterns over names (prune's `targets`): `*` and `?`, nothing else.

/// `*` matches any run of characters, `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("model.layers.*_proj.weight", "model.layers.3.mlp.up_proj.weight"));
        assert!(glob_match("*.mlp.*", "model.layers.0.mlp.down_proj.weight"));
        assert!(!glob_match("*.self_attn.*", "model.layers.0.mlp.down_proj.weight"));
        assert!(glob_match("model.layers.?.mlp.up_proj.weight", "model.layers.7.mlp.up_proj.weight"));
        assert!(!glob_match("model.layers.?.mlp.up_proj.weight", "model.layers.17.mlp.up_proj.weight"));
    }
}
