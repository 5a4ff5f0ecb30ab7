"""Real sparse decoding: batch-1 kernels that read only the weights of active entries, and a
lean decoder that runs them without the per-op overhead of a generic model forward."""
