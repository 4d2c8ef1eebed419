"""Shared pytest setup (kept minimal).

The repo root goes first on sys.path so the tests exercise this checkout even when
the package is not installed (make test installs it editable anyway).
"""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
