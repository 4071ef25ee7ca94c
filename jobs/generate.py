"""`ray job submit --working-dir . -- python jobs/generate.py [ppsd generate options]`"""
import sys

from ppsd_ray.cli import main

sys.exit(main(["generate", *sys.argv[1:]]))
