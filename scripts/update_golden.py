"""Regenerate graphs/golden/: the committed structure summary of the reference model's 30% Flexi export.

    .venv/bin/python scripts/update_golden.py [--plan-from CHECKPOINT]

``--plan-from`` first copies the plan of a real compressed checkpoint (e.g. the output of
``flexi-export compress <reference model> --ratio 0.3``) to graphs/golden/reference-flexi-30.plan.json; the
summary is then rebuilt from that plan, the reference architecture and seeded random weights (it records
structure, not values), exactly as tests/verify/test_golden.py rebuilds it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flexi_export.plan import BlockPlan
from flexi_export.verify.summary import GOLDEN, GOLDEN_NAME, reference_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan-from", type=Path, default=None, help="a Flexi checkpoint whose plan becomes golden")
    args = parser.parse_args()
    GOLDEN.mkdir(parents=True, exist_ok=True)
    if args.plan_from is not None:
        BlockPlan.load(args.plan_from).save(GOLDEN / f"{GOLDEN_NAME}.plan.json")
    (GOLDEN / f"{GOLDEN_NAME}.md").write_text(reference_summary())
    print(f"wrote {GOLDEN / (GOLDEN_NAME + '.md')}")


if __name__ == "__main__":
    main()
