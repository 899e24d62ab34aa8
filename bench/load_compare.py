"""Two load generators against the same servers in one run: does udsbench measure what another does?

Starts each series of ``socket_read.py`` once (by default the C ceiling and the fixture agent) and
drives it with ``udsbench`` and with ``--other`` (any generator taking udsbench's flags -u -c -d -W
-p -H -j and printing its JSON keys, such as the shared ``udsload``), alternately: every run measures
each series with both, the order swapped from one run to the next. Prints a markdown table of
medians per series, connection count and generator, and ours divided by theirs.

    .venv/bin/python bench/load_compare.py --other /tmp/ve-bench/tools/udsload --runs 3 -d 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import socket_read as sr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--other", type=Path, required=True, help="the generator to compare with (e.g. udsload)")
    p.add_argument("--tools", type=Path, default=sr.ROOT / "bench" / "tools" / "build")
    p.add_argument("--series", default="raw-c,vault-edge")
    p.add_argument("--conns", default="1,16")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", "-d", type=float, default=3.0)
    p.add_argument("--warmup", "-W", type=float, default=1.0)
    p.add_argument("--path", default=f"/v1/secrets/{sr.SECRET[0]}")
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--pin", action="store_true", help="generators on CPU 0, servers on CPU 1 (as socket_read.py)")
    args = p.parse_args(argv)
    args.header, args.no_start = [], False
    args.load_cpu, args.server_cpu = (0, 1) if args.pin else (None, None)

    ours = args.tools / "udsbench"
    for tool in (ours, args.tools / "udsceiling", args.other):
        if not tool.exists():
            print(f"{tool} is missing (make bench-tools)", file=sys.stderr)
            return 2
    known = sr.default_series(args.python)
    selected = [known[n.strip()] for n in args.series.split(",") if n.strip()]
    conns_list = [int(c) for c in args.conns.split(",")]
    fill = {"python": args.python, "tools": str(args.tools), "root": str(sr.ROOT)}
    gens = {"udsbench": ours, args.other.name: args.other}
    results: dict[tuple[str, int, str], list[dict[str, Any]]] = {}

    with tempfile.TemporaryDirectory(prefix="ve-cmp-") as tmp, sr.running(selected, Path(tmp), args, fill):
        for rep in range(args.runs):
            order = list(gens.items()) if rep % 2 == 0 else list(gens.items())[::-1]
            for c in conns_list:
                for s in selected:
                    for name, tool in order:
                        r = sr.measure(tool, s, c, args)
                        results.setdefault((s.name, c, name), []).append(r)
                        print(
                            f"  {s.name:<11} c{c:<3} {name:<9} run {rep + 1}: {r['rps']:>10,.0f} req/s  "
                            f"p50 {r['p50_us']:.0f}  p99 {r['p99_us']:.0f}  p99.9 {r['p999_us']:.0f} µs  "
                            f"errors {r['errors']} non-2xx {r['non_2xx']}",
                            file=sys.stderr,
                        )

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"{args.runs} runs, -d {args.duration:g} -W {args.warmup:g}, generators alternated on the same server "
        f"processes{', pinned (generators CPU 0, servers CPU 1)' if args.pin else ''}; {os.cpu_count()} vCPUs, "
        f"CPython {platform.python_version()}; load average at the end {load}.\n"
    )
    print(
        f"| series | conns | generator | req/s median (min{sr.DASH}max) | p50 | p90 | p99 | p99.9 | errors, non-2xx "
        "| req/s ours / theirs: medians, per run (median) |"
    )
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    other = args.other.name
    for c in conns_list:
        for s in selected:
            for name in gens:
                runs = results[(s.name, c, name)]
                rps = [r["rps"] for r in runs]

                def med(key: str, runs: list[dict[str, Any]] = runs) -> str:
                    return sr.fmt_us(statistics.median(r[key] for r in runs))

                ratio = ""
                if name == "udsbench":  # per run: the two measured back to back on the same server
                    theirs = [r["rps"] for r in results[(s.name, c, other)]]
                    paired = statistics.median(a / b for a, b in zip(rps, theirs, strict=True))
                    ratio = f"{statistics.median(rps) / statistics.median(theirs):.2f}, {paired:.2f}"
                print(
                    f"| {s.name} | {c} | {name} | {sr.fmt_int(statistics.median(rps))} ({sr.fmt_int(min(rps))}"
                    f"{sr.DASH}{sr.fmt_int(max(rps))}) | {med('p50_us')} | {med('p90_us')} | {med('p99_us')} | "
                    f"{med('p999_us')} | {sum(r['errors'] for r in runs)}, {sum(r['non_2xx'] for r in runs)} "
                    f"| {ratio} |"
                )
    names = [s.name for s in selected]
    if "raw-c" in names and "vault-edge" in names:  # the figure socket_read.py reports, by each generator
        print()
        for c in conns_list:
            ratios = []
            for name in gens:
                ve, ceiling = (
                    statistics.median(r["rps"] for r in results[(series, c, name)])
                    for series in ("vault-edge", "raw-c")
                )
                ratios.append(f"{name} {ve / ceiling:.2f}")
            print(f"- vault-edge / raw-c at {c} connections: {', '.join(ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
