"""Reliability and security suite (issue 8): real server, real processes, real faults. See conftest.py."""
