#!/usr/bin/env python3
"""Structure figures of src/: the largest files, the longest functions
outside tests, the binaries' size, and the import circles between files.

Run from the repository root: python3 tools/structure.py
Functions are counted by braces from their `fn` line; `#[cfg(test)]`
modules are left out. An import is any `crate::a::b` or `super::x` path
outside comments that names another file of src/.
"""
import os
import re
import sys

SRC = "src"


def files():
    for root, _, names in os.walk(SRC):
        for n in names:
            if n.endswith(".rs"):
                yield os.path.join(root, n)


def module_of(path):
    rel = os.path.relpath(path, SRC)[:-3]
    parts = rel.split(os.sep)
    if parts[0] == "bin":
        return None
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


def strip_tests(text):
    out, skip, depth = [], False, 0
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == "#[cfg(test)]" and i + 1 < len(lines) and re.match(r"\s*mod \w+ \{", lines[i + 1]):
            depth = 0
            i += 1
            while i < len(lines):
                depth += lines[i].count("{") - lines[i].count("}")
                i += 1
                if depth <= 0:
                    break
            continue
        out.append(line)
        i += 1
    return out


def functions(path, lines):
    fns = []
    for i, line in enumerate(lines):
        m = re.match(r"\s*(pub(\([\w:]+\))? )?(const )?(async )?(unsafe )?fn (\w+)", line)
        if not m:
            continue
        depth, started = 0, False
        for j in range(i, len(lines)):
            depth += lines[j].count("{") - lines[j].count("}")
            if "{" in lines[j]:
                started = True
            if started and depth <= 0:
                fns.append((j - i + 1, path, m.group(6)))
                break
            if not started and lines[j].rstrip().endswith(";"):
                break
    return fns


def cycles(edges):
    """The strongly connected groups of more than one file (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(out)


def main():
    paths = sorted(files())
    mods = {module_of(p): p for p in paths if module_of(p) is not None}
    sizes, fns, edges = [], [], {}
    for p in paths:
        text = open(p).read()
        sizes.append((text.count("\n"), p))
        code = strip_tests(text)
        fns += functions(p, code)
        me = module_of(p)
        if me is None:
            continue
        # Doc links and comments name modules without importing them.
        body = "\n".join(l for l in code if not l.lstrip().startswith("//"))
        deps = set()
        for path in re.findall(r"\b(crate|super)((?:::\w+)+)", body):
            kind, rest = path
            names = rest.split("::")[1:]
            base = () if kind == "crate" else (me[:-1] if not p.endswith("mod.rs") else me[:-1])
            if kind == "super" and p.endswith("mod.rs"):
                base = me[:-1]
            full = base + tuple(names)
            for k in range(len(full), 0, -1):
                if full[:k] in mods and full[:k] != me:
                    deps.add(full[:k])
                    break
        # A child module named without a prefix (`scoped::Thing`).
        if p.endswith("mod.rs") or p.endswith("lib.rs") or me == ():
            for child in re.findall(r"(?<![:\w])(\w+)::", body):
                if me + (child,) in mods:
                    deps.add(me + (child,))
        # `use super::{a, b}`: the parent module itself.
        if re.search(r"\bsuper::\{", body) and me[:-1] in mods:
            deps.add(me[:-1])
        edges[me] = deps
    circles = cycles(edges)
    sizes.sort(reverse=True)
    fns.sort(reverse=True)
    bins = sum(n for n, p in sizes if p.startswith(os.path.join(SRC, "bin")))
    print(f"largest file: {sizes[0][0]} ({sizes[0][1]})")
    print("files over 1000 lines:", [f"{p} {n}" for n, p in sizes if n > 1000])
    print(f"longest function: {fns[0][0]} ({fns[0][1]} {fns[0][2]})")
    print("functions of 100+ lines:", sum(1 for f in fns if f[0] >= 100))
    print("functions over 120 lines:", [f"{p}:{n} {l}" for l, p, n in fns if l > 120])
    print(f"binaries: {bins} lines")
    print("import circles (files that reach themselves through imports):",
          [" -> ".join("::".join(m) or "lib" for m in c) for c in circles] or "none")
    return 0


if __name__ == "__main__":
    sys.exit(main())
