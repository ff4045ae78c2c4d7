#!/usr/bin/env python
"""Patch an arcface_torch checkout for otface-plugin; the same code as the `otface-install` command.

    python install_plugin.py /path/to/insightface/recognition/arcface_torch [--check] [--dry-run] [--revert]
"""
import sys

from otface_plugin.arcface_torch.installer import main

if __name__ == "__main__":
    sys.exit(main())
