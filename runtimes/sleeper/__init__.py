"""A runtime kind for tests and benchmarks of slow requests: ``sleeper`` models wait a
fixed time, then answer their input (see ``model``)."""
