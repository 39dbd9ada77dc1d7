"""The torch side: SAE architectures, sparse ops and CPU kernels, SAELens format, the training loop,
checkpoints, evaluation and metric sinks. Import from the modules (`sae_core.engine.saes`, ...)."""
