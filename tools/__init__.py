"""The extras of eval.py that need the members' full distributions (K models at once): downstream.py, sample.py."""
