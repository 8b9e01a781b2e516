"""Human descriptions of the kernel families' problem dicts (what ``cache list``, ``report`` and the dashboard
show). Plain Python: importing it loads no kernel."""
from __future__ import annotations

from typing import Any


def describe_problem(family: str, problem: dict[str, Any]) -> str:
    """A short human description of a problem dict, e.g. ``mm 127x257x67 float16 row/col bias=row relu``."""
    p = problem
    try:
        if family == "gemm":
            batch = f"{p['batch']}x" if p.get("batch", 1) != 1 else ""
            words = [f"{p['op']} {batch}{p['M']}x{p['N']}x{p['K']}", p["dtype"]]
            layouts = (p.get("a_layout", "row"), p.get("b_layout", "row"))
            if layouts != ("row", "row"):
                words.append("/".join(layouts))
            if p.get("bias", "none") != "none":
                words.append(f"bias={p['bias']}")
            if p.get("activation", "none") != "none":
                words.append(p["activation"])
            if p.get("precision") == "tf32":
                words.append("tf32")
            return " ".join(words)
        if family == "conv2d":
            groups = max(p.get("groups", 1), 1)
            words = [f"conv {p['N']}x{p['C']}x{p['H']}x{p['W']} k{p['K']}x{p['C'] // groups}x{p['R']}x{p['S']}",
                     p.get("dtype", "")]
            # every value of every hyper-parameter: padding is (top, bottom, left, right)
            for short, name, default in (("s", "stride", [1, 1]), ("p", "padding", [0, 0, 0, 0]),
                                         ("d", "dilation", [1, 1])):
                v = list(p.get(name, default))
                if v != default:
                    words.append(f"{short}({','.join(map(str, v))})")
            if groups != 1:
                words.append(f"g{groups}")
            if p.get("layout", "nchw") != "nchw":
                words.append(p["layout"])
            if p.get("bias"):
                words.append("+bias")
            if p.get("activation", "none") != "none":
                words.append(p["activation"])
            return " ".join(words)
    except (KeyError, TypeError, IndexError):
        pass
    return ",".join(f"{k}={v}" for k, v in p.items())
