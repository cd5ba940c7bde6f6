"""Serving and evaluation: the decode engine, sampling, workloads, scoring."""
