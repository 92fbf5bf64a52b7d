#!/usr/bin/env python
"""Build an instance bank: the same build as ``instbank build`` (this script only forwards to it).

    python scripts/build_instance_bank.py --coco ann.json --out bank/ [options]
"""

import sys

from instbank.cli import main

if __name__ == "__main__":
    sys.argv[0] = "instbank"
    sys.argv.insert(1, "build")
    main()
