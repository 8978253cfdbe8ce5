"""The runtime: loading a model folder, the torch model, the engine, routed-expert backends, the hot set,
the sampler."""
