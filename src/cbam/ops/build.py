"""``python -m cbam.ops.build``: build the C++ CPU engine ahead of time, so that no later run waits for it.

The README's set-up commands run it right after ``pip install``. It prints where the build is and how
long it took (or, where it was built already, how long loading it took) and exits 0; where the build
fails (no C++ compiler, no ninja, a compile error) it prints one line saying why and exits 1; the fused
path then runs on torch ops. With ``CBAM_NO_EXTENSION=1`` there is nothing to build and it exits 0.
"""

from __future__ import annotations

import os
import sys
import time

from .engines.cpp import build


def main() -> int:
    if os.environ.get("CBAM_NO_EXTENSION") == "1":
        print("cbam: CBAM_NO_EXTENSION=1, so no C++ engine to build; the fused path runs on torch ops")
        return 0
    start = time.perf_counter()
    try:
        built = build.load()
    except Exception as error:  # any failure of the build: one line
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"cbam: the C++ CPU engine did not build ({reason}); the fused path will run on torch ops",
              file=sys.stderr)
        return 1
    took = (f"built in {built.seconds:.0f} s" if built.seconds is not None
            else f"built already, loaded in {time.perf_counter() - start:.1f} s")
    print(f"cbam: the C++ CPU engine is ready in {built.directory} ({took})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
