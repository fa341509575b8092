"""Benchmarks of mendsrv against the raw libraries it is built on.

``python -m bench`` (or ``make bench``) starts mendsrv as a real process on a free
127.0.0.1 port with a temporary data directory, runs each measurement side by side
with its raw baseline in the same run, prints a table and writes
``bench/out/results.json``. ``bench/RESULTS.md`` records the figures.
"""
