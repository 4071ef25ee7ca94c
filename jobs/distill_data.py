"""Build exit-head distillation data (ppsd_ray/teacher.py): teacher-forced text + the model's answers.

    python jobs/distill_data.py --exit-layers 15 --positions 5000000 --out /shared/distill-data
    ray job submit --working-dir . -- python jobs/distill_data.py --exit-layers 15 --out /shared/distill-data

The same arguments as `ppsd distill-data`. Shards and their manifest go to --out (default under
the ppsd cache dir); re-submitting the same command continues where the last run stopped, and a
larger --positions extends the data. Train on it with
`python jobs/train_exit_head.py --exit-layer 15 --head-type linear --teacher-data OUT`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's ppsd_ray, also under ray job submit
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ppsd_ray import teacher  # noqa: E402
from ppsd_ray.model import resolve_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    teacher.add_arguments(p)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        summary = teacher.run(args, resolve_model(args.model))
    except ValueError as e:
        raise SystemExit(f"distill-data: {e}") from None
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
