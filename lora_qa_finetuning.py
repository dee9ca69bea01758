#!/usr/bin/env python
"""Single-file entry point of the assignment layout: `python lora_qa_finetuning.py SUBCOMMAND ...`.

Everything lives in the `loraqa` package; this delegates to its CLI (`loraqa --help` lists subcommands).
"""
import sys

from loraqa.cli import main

if __name__ == "__main__":
    sys.exit(main())
