#!/usr/bin/env python
"""The A/B study of BASIC against LLaVA — a benchmark, not a test. Protocol: docs/ab_study.md; code:
research/study/ (not part of the installed package).

  python scripts/ab_study.py --quick            # <= 10 min on 2 cores: 1 seed, llava vs basic
  python scripts/ab_study.py                    # the full preset quoted in the README
  python scripts/ab_study.py --preset ablations # + every table-4 ablation (hours on 2 CPU cores)
  python scripts/ab_study.py --report-only --out ab_study/full

Results: <out>/protocol.json, <out>/runs/<arm>-seed<seed>.json (a rerun skips finished runs),
<out>/report.md, <out>/figures/*.png, <out>/pictures/*.png (lens pictures per arm).
"""
import os
import sys

_REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, _REPO)
sys.path.insert(0, os.path.join(_REPO, "research"))  # the study's package `study` (not installed)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from study.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
