"""Load generator and baseline for measuring sse-fanout workers: `python -m bench --help`."""
