"""What benchmarks and tests share: throwaway servers, worker processes, CLI runs, fault scenarios."""
