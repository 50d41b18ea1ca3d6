"""Ray Job entry point for `vaeforge generate`; the CLI's options and exit codes.

Submit it with `ray job submit --working-dir . -- python jobs/generate.py ARGS`. The driver joins the job's
cluster through the RAY_ADDRESS Ray sets.
"""

import sys

from vaeforge.cli import main

if __name__ == "__main__":  # the data decoder's worker processes re-import __main__
    sys.exit(main(["generate", *sys.argv[1:]]))  # main exits 2 on a user error, 130 on Ctrl-C
