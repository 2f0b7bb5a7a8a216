"""vLLama benchmark suite: `python -m load_tests.bench --help`."""
