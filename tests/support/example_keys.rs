//! The completeness check of the commented examples under `examples/configs/`: an example must
//! name every key its config struct has, set or on a commented-out line, and no key that is
//! gone. Included by path (`#[path = …] mod example_keys;`) by the two tests that use it: the
//! coordinator's examples in `src/cmd/coordinator.rs` and the sweep and audit examples in
//! `simulations/tests/harness/example_configs.rs`. Not a test target of its own (no `main.rs`).

use std::collections::BTreeSet;

/// Adds to `out` the dotted path of every key of `value` under `prefix` (`""` at the top):
/// each object key, recursing into objects; anything else (a number, a string, an array, a
/// `null` from an unset `Option`) is a leaf. Serialising a config with `serde_json` and walking
/// it lists its keys, including the ones a TOML file leaves at their defaults.
pub(crate) fn key_paths(prefix: &str, value: &serde_json::Value, out: &mut BTreeSet<String>) {
    let serde_json::Value::Object(map) = value else {
        return;
    };
    for (key, v) in map {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        key_paths(&path, v, out);
        out.insert(path);
    }
}

/// The dotted key paths `text` names: table headers (`[a.b]`) and `key = value` lines, each
/// under the header above it, whether set or commented out (`# [a.b]`, `# key = value`). A
/// commented line counts only when it is TOML on its own, so prose comments are not keys.
/// Examples keep one key per line, no multi-line values, and a commented-out table only
/// where the next table header (set or commented) follows it.
pub(crate) fn named_keys(text: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    let mut table = String::new();
    for line in text.lines() {
        let line = line.trim();
        let (line, commented) = match line.strip_prefix('#') {
            Some(rest) => (rest.trim(), true),
            None => (line, false),
        };
        if line.is_empty() || (commented && toml::from_str::<toml::Table>(line).is_err()) {
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            if let Some((name, _)) = header.split_once(']') {
                table = name.trim().to_string();
                named.insert(table.clone());
            }
        } else if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            named.insert(if table.is_empty() {
                key.to_string()
            } else {
                format!("{table}.{key}")
            });
        }
    }
    named
}

/// Checks that the example `text` names every path of `required` ([`named_keys`]) and names
/// no other (a key whose field is gone); the error lists both kinds.
pub(crate) fn check_complete(text: &str, required: &BTreeSet<String>) -> Result<(), String> {
    let named = named_keys(text);
    let missing: Vec<&String> = required.iter().filter(|k| !named.contains(*k)).collect();
    let unknown: Vec<&String> = named.iter().filter(|k| !required.contains(*k)).collect();
    if missing.is_empty() && unknown.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "keys the example does not name (set them, or show them as `# key = default`): \
             {missing:?}; keys it names that its config does not have: {unknown:?}"
        ))
    }
}
