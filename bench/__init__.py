"""Benchmarks that drive a real Enclave deployment and print what they measure."""
