"""The tiny-model world: synthetic tasks and tiny Llama base and experts, for tests, benchmarks and demos."""
