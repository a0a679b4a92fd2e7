"""One measurement in a fresh process (so its peak memory belongs to one model): ``python -m detkd.bench.worker JSON``.

JSON holds the keyword arguments of `detkd.bench.latency.measure` (``path``, ``engine``, ``imgsz``, ``threads``,
``batch_sizes``, ``runs``, ``warmup``). The result is printed as one line ``DETKD_BENCH_RESULT <json>``; a user
error is printed as ``DETKD_BENCH_ERROR <message>`` with exit status 2.
"""

from __future__ import annotations

import json
import sys

MARK, ERR = "DETKD_BENCH_RESULT ", "DETKD_BENCH_ERROR "


def main(argv: list[str] | None = None) -> int:
    args = json.loads((argv or sys.argv[1:])[0])
    from detkd.bench.latency import measure
    from detkd.errors import DetkdError

    try:
        r = measure(**args)
    except DetkdError as e:
        print(ERR + str(e), flush=True)
        return 2
    print(MARK + json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
