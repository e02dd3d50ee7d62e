"""File-level import graph of the workspace's Rust sources, and its cycles.

Each `.rs` file is a node. A file imports another when its code (comments, doc comments and
`#[cfg(test)]` items left out; `--with-tests` keeps them) names a path into it: `crate::a::b`, `super::x`, `self::x`, or
another workspace crate's `fedlora_x::a` (an edge between crates). A path is resolved to the
longest module prefix that has a file of its own; `mod.rs` / `lib.rs` are a folder's own module.
A module's `mod child;` declarations and `pub use` re-exports of its own children are not
counted as imports of the child (they are the tree, not a dependency upward).

Prints every strongly connected component with more than one file; exits 1 if there is one.
Run: python3 tools/import_cycles.py
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def crates():
    """(crate name as used in paths, src dir) for each workspace member and the CLI."""
    out = [("fedlora", os.path.join(ROOT, "src"))]
    for d in sorted(os.listdir(ROOT)):
        toml = os.path.join(ROOT, d, "Cargo.toml")
        src = os.path.join(ROOT, d, "src")
        if os.path.isfile(toml) and os.path.isdir(src) and d != "target":
            name = re.search(r'^name\s*=\s*"([^"]+)"', open(toml).read(), re.M).group(1)
            out.append((name.replace("-", "_"), src))
    return out


def modules(src):
    """module path (tuple) -> file, for one crate."""
    mods = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, f), src)
            parts = rel[:-3].split(os.sep)
            if parts == ["main"] and os.path.exists(os.path.join(src, "lib.rs")):
                # a binary beside a library is a crate of its own that uses the library
                parts = ["<bin main>"]
            elif parts[-1] in ("mod", "lib", "main"):
                parts = parts[:-1]
            mods[tuple(parts)] = os.path.join(dirpath, f)
    return mods


def strip(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(line.split("//")[0] for line in text.splitlines())


WITH_TESTS = "--with-tests" in sys.argv


def drop_tests(code):
    """Removes `#[cfg(test)]` items (a test module may use anything: it is not part of the
    layering). Brace-matched from the item after the attribute."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]", code):
        if m.start() < i:
            continue
        out.append(code[i:m.start()])
        j = code.find("{", m.end())
        semi = code.find(";", m.end())
        if j < 0 or (0 <= semi < j):
            i = semi + 1
            continue
        depth = 0
        for k in range(j, len(code)):
            if code[k] == "{":
                depth += 1
            elif code[k] == "}":
                depth -= 1
                if depth == 0:
                    i = k + 1
                    break
        else:
            i = len(code)
    out.append(code[i:])
    return "".join(out)


def resolve(mods, path):
    for n in range(len(path), -1, -1):
        if tuple(path[:n]) in mods:
            return mods[tuple(path[:n])]
    return None


def expand_groups(code):
    """`a::{b, c::{d}}` -> `a::b a::c::d` (enough for use trees)."""
    pat = re.compile(r"((?:[A-Za-z_][A-Za-z0-9_]*::)+)\{([^{}]*)\}")
    while True:
        m = pat.search(code)
        if not m:
            return code
        prefix, inner = m.group(1), m.group(2)
        items = [i.strip() for i in inner.split(",") if i.strip()]
        code = code[: m.start()] + " ".join(prefix + i for i in items) + code[m.end():]


def main():
    all_crates = crates()
    tables = {name: modules(src) for name, src in all_crates}
    edges = {}
    for name, src in all_crates:
        mods = tables[name]
        for modpath, f in mods.items():
            code = expand_groups(strip(open(f).read()))
            if not WITH_TESTS:
                code = drop_tests(code)
            is_dir_mod = os.path.basename(f) in ("mod.rs", "lib.rs", "main.rs")
            targets = set()
            # inside an inline `mod name {` (tests), `super` is this file's own module
            inline = re.search(r"^\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+[a-z_0-9]+\s*\{", code, re.M)
            split = inline.start() if inline else len(code)
            for part, depth in ((code[:split], 0), (code[split:], 1)):
                for m in re.finditer(r"\b(crate|super|self|fedlora_[a-z_]+)((?:::[A-Za-z_][A-Za-z0-9_]*)+)", part):
                    head, rest = m.group(1), m.group(2).split("::")[1:]
                    if head == "crate":
                        t = resolve(mods, rest)
                    elif head in ("self", "super"):
                        base = list(modpath)
                        ups = (1 if head == "super" else 0) - depth
                        while rest and rest[0] == "super":
                            rest = rest[1:]
                            ups += 1
                        base = base[: len(base) - ups] if ups > 0 else base
                        t = resolve(mods, base + rest)
                    else:
                        if head not in tables:
                            continue
                        t = resolve(tables[head], rest)
                    if t and t != f:
                        targets.add(t)
            # `mod x;` children and `pub use x::...` of own children are the tree
            if is_dir_mod:
                for c in re.findall(r"^\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+([a-z_0-9]+)\s*;", code, re.M):
                    child = mods.get(tuple(modpath) + (c,))
                    targets.discard(child)
                for c in re.findall(r"^\s*(?:pub(?:\([a-z]+\))?\s+)?use\s+(?:self::)?([a-z_0-9]+)::", code, re.M):
                    child = mods.get(tuple(modpath) + (c,))
                    if child:
                        targets.discard(child)
            edges[f] = targets
    # Tarjan's strongly connected components
    index, low, stack, on, sccs = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    for comp in sccs:
        print("cycle:", " <-> ".join(os.path.relpath(c, ROOT) for c in comp))
        for c in comp:
            inside = sorted(os.path.relpath(t, ROOT) for t in edges[c] if t in comp)
            print("   ", os.path.relpath(c, ROOT), "->", ", ".join(inside))
    n_edges = sum(len(t) for t in edges.values())
    print(f"{len(edges)} files, {n_edges} imports, {len(sccs)} cycles")
    return 1 if sccs else 0


if __name__ == "__main__":
    sys.exit(main())
