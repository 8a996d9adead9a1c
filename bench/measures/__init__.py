"""One module per measure of `make bench` (bench/run.py runs them in order)."""
