"""Run the shared ``pyserve.py`` (plain asyncio, fixed answer) on uvloop: the event loop's own ceiling.

    python bench/uvloop_pyserve.py /tmp/ve-bench/tools/pyserve.py SOCKET
"""

from __future__ import annotations

import runpy
import sys

import uvloop

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: uvloop_pyserve.py PYSERVE SOCKET")
    uvloop.install()  # pyserve.py calls asyncio.run(), which then builds a uvloop loop
    script, sys.argv = sys.argv[1], [sys.argv[1], sys.argv[2]]
    runpy.run_path(script, run_name="__main__")
