"""The GPUs and the host, without torch: NVML probe, host figures, availability of GPUs for a job,
the memory estimate, the multi-GPU scaling model, and the sampler's history in lab.db."""
