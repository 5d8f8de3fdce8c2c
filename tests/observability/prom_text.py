"""The Prometheus text format as the observability tests and the bench tools read it: families
of samples, and a family's total. Stdlib only."""
import re

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """{family: {"type": t, "samples": [(sample name, {labels}, value)]}}."""
    fams = {}
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, t = line.split(None, 3)
            types[name] = t
            fams.setdefault(name, {"type": t, "samples": []})
            continue
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        name, labels, value = m.group(1), dict(_LABEL.findall(m.group(3) or "")), float(m.group(4))
        fam = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and types.get(name[: -len(suffix)]) == "histogram":
                fam = name[: -len(suffix)]
        fams.setdefault(fam, {"type": types.get(fam, "untyped"), "samples": []})["samples"].append((name, labels, value))
    return fams


def total(fams, name, **match):
    """Sum of a family's plain samples (the _count of a histogram) whose labels match."""
    fam = fams.get(name)
    if not fam:
        return 0.0
    want = name + "_count" if fam["type"] == "histogram" else name
    return sum(v for n, l, v in fam["samples"] if n == want and all(l.get(k) == x for k, x in match.items()))
