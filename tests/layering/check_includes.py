#!/usr/bin/env python3
"""The layering rule of docs/architecture.md, checked on every `#include "..."`.

Arrows point down only: services/ -> actors/ -> core/ -> kernels/.

- A file may include headers of its own layer or of a lower one, never of a higher one.
- kernels/ is pure compute on raw buffers and shapes: besides kernels/ it includes only the leaf
  headers core/dtype.h and core/error.h (no other core/ header, no proto/, actors/ or services/).
- proto/ (the generated wire schemas) sits below core/: core/, actors/ and services/ may use it.
- No folder includes one that includes it back: among the folders of one layer (kernels/cpu and
  kernels/cuda, services/router and services/cli, ...) the include graph has no cycle. A folder and
  its own subfolders (core/ and core/backends/) count as one.

Includes are resolved from the repository root (how the build's include path has them) or, failing
that, next to the including file; anything else ("foo.pb.h" of another tree, a system header in
quotes) is outside the rule. Prints one line per violation, `file:line: ...`, and exits 1 when
there is any; `--self-test` checks the checker on a made-up tree.
"""
import argparse
import os
import re
import sys
import tempfile

# Lowest first. proto/ is not one of the architecture's layers; it is a leaf under core/.
LAYERS = ["kernels", "proto", "core", "actors", "services"]
CHECKED = ["kernels", "core", "actors", "services"]
RANK = {name: i for i, name in enumerate(LAYERS)}
KERNEL_LEAF_HEADERS = {"core/dtype.h", "core/error.h"}
SOURCE_EXTENSIONS = (".h", ".hh", ".hpp", ".cpp", ".cc", ".cxx", ".cu", ".cuh", ".inl", ".inc", ".ipp")
INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"')


def source_files(root):
    for top in CHECKED:
        base = os.path.join(root, top)
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.endswith(SOURCE_EXTENSIONS):
                    yield os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")


def resolve(root, including, target):
    """The repository path `target` names from `including`, or None when it is outside the tree."""
    first = target.split("/", 1)[0]
    if first in RANK:
        return os.path.normpath(target).replace(os.sep, "/")
    local = os.path.normpath(os.path.join(os.path.dirname(including), target)).replace(os.sep, "/")
    if not local.startswith("../") and os.path.exists(os.path.join(root, local)):
        return local
    return None


def includes(root, path):
    with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            m = INCLUDE.match(line)
            if m:
                yield lineno, m.group(1)


def folder_cycles(edges):
    """Cycles of the folder graph {src: {dst: (file, line, target)}}: a list of folder lists."""
    index, low, stack, on_stack, sccs = {}, {}, [], set(), []
    counter = [0]

    def visit(v):  # Tarjan; the graphs are small, recursion is fine
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sccs


def nested(a, b):
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def check(root):
    """(violations as `file:line: message` strings, files checked, includes checked)."""
    problems = []
    folder_edges = {}
    files = 0
    count = 0
    for path in source_files(root):
        files += 1
        layer = path.split("/", 1)[0]
        for lineno, target in includes(root, path):
            count += 1
            resolved = resolve(root, path, target)
            if resolved is None:
                continue
            where = f"{path}:{lineno}"
            to_layer = resolved.split("/", 1)[0]
            if resolved.startswith("../") or to_layer not in RANK:
                continue
            if layer == "kernels" and to_layer != "kernels":
                if resolved not in KERNEL_LEAF_HEADERS:
                    problems.append(f'{where}: kernels/ includes "{target}": kernels/ may include only '
                                    f"kernels/ and the leaf headers {', '.join(sorted(KERNEL_LEAF_HEADERS))}")
                continue
            if RANK[to_layer] > RANK[layer]:
                problems.append(f'{where}: {layer}/ includes "{target}" of {to_layer}/, a higher layer '
                                f"(services/ -> actors/ -> core/ -> kernels/)")
                continue
            src_dir, dst_dir = os.path.dirname(path), os.path.dirname(resolved)
            if to_layer == layer and not nested(src_dir, dst_dir):
                folder_edges.setdefault(src_dir, {}).setdefault(dst_dir, (where, target))
    for cycle in folder_cycles(folder_edges):
        members = set(cycle)
        links = [f'{src}/ -> {dst}/ ({where}: "{target}")'
                 for src in cycle for dst, (where, target) in sorted(folder_edges.get(src, {}).items())
                 if dst in members]
        first = folder_edges[cycle[0]]
        where = next(w for d, (w, _) in sorted(first.items()) if d in members)
        problems.append(f"{where}: folders include each other back: " + "; ".join(links))
    return problems, files, count


def self_test():
    tree = {
        "kernels/cpu/ok.h": '#include "core/dtype.h"\n#include "core/error.h"\n#include "kernels/cpu/a.h"\n',
        "kernels/cpu/a.h": "",
        "kernels/cpu/bad_core.h": '#include <vector>\n\n#include "core/engine.h"\n',
        "kernels/cuda/bad_actor.cpp": '#include "kernels/cpu/a.h"\n#  include "actors/transport.h"\n',
        "kernels/cuda/bad_proto.cpp": '#include "proto/control.pb.h"\n',
        "core/engine.h": '#include "kernels/cpu/a.h"\n#include "proto/control.pb.h"\n#include "local.h"\n',
        "core/local.h": "",
        "core/backends/b.h": '#include "core/engine.h"\n',
        "core/factory.cpp": '#include "core/backends/b.h"\n',
        "core/bad.cpp": '// comment\n#include "actors/transport.h"\n',
        "actors/transport.h": '#include "core/engine.h"\n',
        "actors/bad.cpp": '#include "services/cli/commands.h"\n',
        "services/cli/commands.h": '#include "actors/transport.h"\n#include "services/router/r.h"\n',
        "services/router/r.h": '#include "services/cli/commands.h"\n',
        "services/expert/ok.cpp": '#include "services/cli/commands.h"\n#include "external.pb.h"\n',
    }
    expected = [
        "kernels/cpu/bad_core.h:3:",
        "kernels/cuda/bad_actor.cpp:2:",
        "kernels/cuda/bad_proto.cpp:1:",
        "core/bad.cpp:2:",
        "actors/bad.cpp:1:",
        "services/cli/commands.h:2: folders include each other back",
    ]
    with tempfile.TemporaryDirectory() as root:
        for path, text in tree.items():
            os.makedirs(os.path.join(root, os.path.dirname(path)), exist_ok=True)
            with open(os.path.join(root, path), "w") as f:
                f.write(text)
        problems, _, _ = check(root)
    ok = True
    for prefix in expected:
        if not any(p.startswith(prefix) for p in problems):
            print(f"self-test: expected a violation at {prefix}", file=sys.stderr)
            ok = False
    for p in problems:
        if not any(p.startswith(prefix) for prefix in expected):
            print(f"self-test: unexpected violation: {p}", file=sys.stderr)
            ok = False
    if ok:
        print(f"self-test: ok ({len(problems)} violations found as expected)")
    else:
        print("self-test: the checker reported:\n  " + "\n  ".join(problems), file=sys.stderr)
    return 0 if ok else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."),
                        help="the repository root (default: two folders above this script)")
    parser.add_argument("--self-test", action="store_true", help="check the checker on a made-up tree")
    args = parser.parse_args()
    if args.self_test:
        return self_test()
    root = os.path.abspath(args.root)
    missing = [d for d in CHECKED if not os.path.isdir(os.path.join(root, d))]
    if missing:
        print(f"check_includes: {root} has no {', '.join(d + '/' for d in missing)}", file=sys.stderr)
        return 2
    problems, files, count = check(root)
    for p in problems:
        print(p)
    if problems:
        print(f"check_includes: {len(problems)} include(s) break the layering rule "
              f"(services/ -> actors/ -> core/ -> kernels/; docs/architecture.md)", file=sys.stderr)
        return 1
    print(f"check_includes: ok ({files} files, {count} quoted includes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
