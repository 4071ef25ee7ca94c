"""`ray job submit --working-dir . -- python jobs/bench.py [ppsd bench options]`"""
import sys

from ppsd_ray.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
